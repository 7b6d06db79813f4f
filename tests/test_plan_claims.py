"""Issue 19, the planner: one planning call for a fresh run, a resume and a dry run (the
stored plan's pending links claim their imports and masters); the outcome read back from
the database; one master per time-window import within one statement; the evidence the
ledger records; exact evidence compared as uuid. Every test on each runbook shape."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from flowfix import backfill as bf
from flowfix import ledger
from flowfix.backfill import steps
from flowfix.cli import Exit, app
from flowfix.config import Settings
from flowfix.db import make_engine
from flowfix.evidence import Evidence
from tests.conftest import upgrade
from tests.helpers import add_discovery_flow, add_import, cli_env, links, sql
from tests.test_backfill import A, master, orphan, run
from tests.test_validate import run_validate

runner = CliRunner()


@pytest.fixture
def s(shaped: Settings) -> Settings:
    upgrade(shaped, "fix_master_flow_fk")
    return shaped


def interrupted(s: Settings, stored: list[tuple[uuid.UUID, uuid.UUID, str, float | None]] | None = None) -> uuid.UUID:
    """A run that planned, stored its import plan and died before applying any of it
    (status running), as a killed process leaves it; ``stored``: these links instead of
    the planner's."""

    async def go() -> uuid.UUID:
        engine = make_engine(s)
        try:
            async with engine.begin() as conn:
                links_ = stored
                if links_ is None:
                    plan = await bf.make_plan(conn, bf.Options())
                    links_ = [(x.id, x.master_flow_id, x.evidence, x.distance_seconds) for x in plan.import_links]
                run_id = await ledger.start_run(conn, "backfill", bf.Options().arguments())
                await ledger.store_import_plan(conn, run_id, links_)
                return run_id
        finally:
            await engine.dispose()

    return asyncio.run(go())


def imports_per_master(s: Settings) -> dict[uuid.UUID, int]:
    rows = sql(
        s,
        "SELECT master_flow_id AS m, count(*) AS n FROM data_imports WHERE master_flow_id IS NOT NULL"
        " GROUP BY master_flow_id",
    )
    return {r["m"]: r["n"] for r in rows}


# --- item 1: plan with claims --------------------------------------------------------


def test_a_resume_never_gives_a_stored_master_to_a_nearer_new_orphan(s: Settings) -> None:
    m = master(s, minutes=0)
    i = orphan(s, minutes=30)
    interrupted(s)  # stores I -> M (time_window) and dies
    j = orphan(s, minutes=1)  # nearer to M, arrived since
    result = run(s)
    assert result.resumed
    assert max(imports_per_master(s).values()) == 1
    assert links(s, "data_imports") == {i: m, j: None}
    assert result.exit_code == Exit.PROBLEMS
    assert [u.id for u in result.plan.unmatched] == [j]


def test_a_resume_keeps_the_nearest_of_two_stored_time_links_to_one_master(s: Settings) -> None:
    """A stored plan from before the claims gives one master to two imports by time."""
    m = master(s, minutes=0)
    near, far = orphan(s, minutes=1), orphan(s, minutes=5)
    interrupted(s, [(far, m, "time_window", 300.0), (near, m, "time_window", 60.0)])
    result = run(s)
    assert links(s, "data_imports") == {near: m, far: None}
    assert result.exit_code == Exit.PROBLEMS
    assert [u.id for u in result.plan.unmatched] == [far]


def test_one_statement_never_links_two_imports_to_one_master_by_time(s: Settings) -> None:
    """The apply statement on its own: two pending time links to one master in one batch.
    Its NOT EXISTS guard reads the statement's snapshot and cannot see the sibling row;
    the statement keeps the first claim (an exact link before any time link)."""
    m, other = master(s, minutes=0), master(s, minutes=900)
    a, b, c = sorted([orphan(s, minutes=1), orphan(s, minutes=5), orphan(s, minutes=901)])
    run_id = interrupted(
        s, [(b, m, "time_window", 60.0), (c, m, "exact:configuration", None), (a, other, "time_window", 1.0)]
    )
    sql(s, "UPDATE data_imports SET client_account_id = client_account_id")  # nothing else changes

    async def apply() -> None:
        engine = make_engine(s)
        try:
            async with engine.begin() as conn:
                params = {
                    **Evidence.params(),
                    "run": run_id,
                    "after": None,
                    "limit": 10,
                    "client": None,
                    "engagement": None,
                }
                await conn.execute(text(steps.APPLY_IMPORT_BATCH), params)
        finally:
            await engine.dispose()

    asyncio.run(apply())
    assert links(s, "data_imports") == {a: other, b: None, c: m}
    skipped = sql(s, "SELECT row_id FROM flowfix_changes WHERE skipped IS NOT NULL")
    assert [r["row_id"] for r in skipped] == [b]


# --- item 2: the outcome comes from the database -----------------------------------------


def app_links_once_when_the_plan_is_stored(s: Settings, other: uuid.UUID, flow: uuid.UUID) -> None:
    """The application links ``other`` to ``flow`` right after the plan is stored, before
    the first batch (a trigger that fires once: a handshake, no sleep)."""
    sql(s, "CREATE TABLE fired (x int)")
    sql(
        s,
        "CREATE FUNCTION app_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF NOT EXISTS (SELECT 1 FROM fired) THEN INSERT INTO fired VALUES (1);"
        f" UPDATE data_imports SET master_flow_id = '{flow}' WHERE id = '{other}'; END IF; RETURN NULL; END $$",
    )
    sql(s, "CREATE TRIGGER app_write AFTER INSERT ON flowfix_changes FOR EACH STATEMENT EXECUTE FUNCTION app_write()")


def test_a_link_skipped_at_apply_is_reported_and_the_run_exits_1(s: Settings) -> None:
    m = master(s, minutes=0)
    i = orphan(s, minutes=1, records=2)
    other_master = master(s, minutes=500)
    other = add_import(s, master=other_master, client=A[0], engagement=A[1])
    app_links_once_when_the_plan_is_stored(s, other, m)
    result = run(s)
    assert result.counts is not None and result.counts.skipped == 1
    assert links(s, "data_imports")[i] is None
    assert result.exit_code == Exit.PROBLEMS
    reported = {(u.table, u.id): u.reason for u in result.plan.unmatched}
    assert "changed since planning" in reported[("data_imports", i)]
    cli = runner.invoke(app, ["backfill"], env=cli_env(s))
    assert cli.exit_code == Exit.PROBLEMS, cli.output


def test_a_resume_reports_an_import_its_stored_plan_covers_that_was_skipped(s: Settings) -> None:
    m = master(s, minutes=0)
    i = orphan(s, minutes=1)
    interrupted(s)
    other_master = master(s, minutes=500)
    add_import(s, master=other_master, client=A[0], engagement=A[1])
    sql(s, "UPDATE data_imports SET master_flow_id = :m WHERE master_flow_id = :o", {"m": m, "o": other_master})
    result = run(s)
    assert links(s, "data_imports")[i] is None
    assert result.exit_code == Exit.PROBLEMS
    assert i in {u.id for u in result.plan.unmatched}
    again = run(s)  # the next run: still reported, still exit 1
    assert again.exit_code == Exit.PROBLEMS and i in {u.id for u in again.plan.unmatched}


def test_an_orphan_the_application_adds_during_the_run_keeps_exit_1(s: Settings) -> None:
    """Exit 0 is a promise about the database: an import left NULL in scope is reported
    even when the plan never saw it."""
    m = master(s, minutes=0)
    orphan(s, minutes=1)
    sql(s, "CREATE TABLE fired (x int)")
    sql(
        s,
        "CREATE FUNCTION app_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF NOT EXISTS (SELECT 1 FROM fired) THEN INSERT INTO fired VALUES (1);"
        " UPDATE data_imports SET master_flow_id = NULL WHERE id = (SELECT id FROM data_imports"
        f" WHERE master_flow_id IS NOT NULL AND master_flow_id <> '{m}' LIMIT 1); END IF; RETURN NULL; END $$",
    )
    late = add_import(s, master=master(s, minutes=9000), client=A[0], engagement=A[1])
    sql(s, "CREATE TRIGGER app_write AFTER INSERT ON flowfix_changes FOR EACH STATEMENT EXECUTE FUNCTION app_write()")
    result = run(s)
    assert links(s, "data_imports")[late] is None
    assert result.exit_code == Exit.PROBLEMS
    assert late in {u.id for u in result.plan.unmatched}


def test_validate_warns_on_a_master_linked_to_more_than_one_import(s: Settings) -> None:
    m = master(s, minutes=0)
    first = add_import(s, master=m, client=A[0], engagement=A[1])
    second = add_import(s, master=m, client=A[0], engagement=A[1])
    report = run_validate(s)
    check = report.check("data_imports.shared_master")
    assert check.status == "warn" and check.count == 1
    assert check.samples == [str(m)]
    sql(s, "UPDATE data_imports SET master_flow_id = NULL WHERE id = :i", {"i": second})
    assert run_validate(s).check("data_imports.shared_master").status == "pass"
    assert first


# --- item 3: a dry run with a run pending ----------------------------------------------


def test_a_dry_run_with_an_interrupted_run_says_it_would_resume_it_and_exits_like_it(s: Settings) -> None:
    m = master(s, minutes=0)
    i = orphan(s, minutes=1)
    run_id = interrupted(s)
    # the master now names some other import in its configuration: a fresh plan would
    # leave I unmatched, but the resume applies the stored link
    sql(
        s,
        "UPDATE crewai_flow_state_extensions SET flow_configuration = jsonb_build_object('import_id', CAST(:x AS text))"
        " WHERE flow_id = :m",
        {"x": str(uuid.uuid4()), "m": m},
    )
    dry = runner.invoke(app, ["backfill", "--dry-run"], env=cli_env(s))
    assert f"would resume run {run_id}" in dry.output
    dry_json = runner.invoke(app, ["backfill", "--dry-run", "--format", "json"], env=cli_env(s))
    assert json.loads(dry_json.stdout)["run_id"] == str(run_id)
    real = runner.invoke(app, ["backfill"], env=cli_env(s))
    assert "resumed" in real.output
    assert dry.exit_code == real.exit_code == Exit.OK, (dry.output, real.output)
    assert links(s, "data_imports") == {i: m}


def test_a_dry_run_predicts_a_stored_link_the_application_made_stale(s: Settings) -> None:
    m = master(s, minutes=0)
    i = orphan(s, minutes=1)
    interrupted(s)
    other_master = master(s, minutes=500)
    add_import(s, master=other_master, client=A[0], engagement=A[1])
    sql(s, "UPDATE data_imports SET master_flow_id = :m WHERE master_flow_id = :o", {"m": m, "o": other_master})
    dry = run(s, dry_run=True)
    assert i in {u.id for u in dry.plan.unmatched}
    real = run(s)
    assert dry.exit_code == real.exit_code == Exit.PROBLEMS


# --- item 9: one vocabulary ------------------------------------------------------------


def test_links_to_created_masters_are_recorded_as_created_by_backfill(s: Settings) -> None:
    flow = uuid.uuid4()
    existing = master(s, minutes=0)
    made = add_discovery_flow(s, flow_id=flow, master=None, client=A[0], engagement=A[1])
    own = add_discovery_flow(s, flow_id=existing, master=None, client=A[0], engagement=A[1])
    result = run(s, create_missing_masters=True)
    planned = {link.id: link.evidence for link in result.plan.discovery_links}
    stored = {
        r["row_id"]: r["evidence"]
        for r in sql(s, "SELECT row_id, evidence FROM flowfix_changes WHERE table_name = 'discovery_flows'")
    }
    assert stored == planned == {made: "created_by_backfill", own: "exact:flow_id"}


# --- item 10: exact evidence compared as uuid ------------------------------------------


@pytest.mark.parametrize("spelling", ["braces", "upper_braces", "no_hyphens"])
def test_configuration_naming_the_import_in_another_uuid_spelling_is_exact_evidence(s: Settings, spelling: str) -> None:
    decoy = master(s, minutes=1)
    named = master(s, minutes=90)
    i = orphan(s, minutes=0)
    value = {"braces": f"{{{i}}}", "upper_braces": f"{{{str(i).upper()}}}", "no_hyphens": i.hex}[spelling]
    sql(
        s,
        "UPDATE crewai_flow_state_extensions SET flow_configuration = jsonb_build_object('import_id', CAST(:v AS text))"
        " WHERE flow_id = :f",
        {"v": value, "f": named},
    )
    # a malformed value elsewhere must not break the query
    bad = master(s, minutes=5000)
    sql(
        s,
        "UPDATE crewai_flow_state_extensions SET flow_configuration = jsonb_build_object('import_id', 'not-a-uuid{')"
        " WHERE flow_id = :f",
        {"f": bad},
    )
    result = run(s)
    assert links(s, "data_imports") == {i: named}
    assert [link.evidence for link in result.plan.import_links] == ["exact:configuration"]
    assert decoy not in links(s, "data_imports").values()


def test_persistence_data_naming_the_import_in_braces_is_exact_evidence(s: Settings) -> None:
    master(s, minutes=1)
    named = master(s, minutes=90)
    i = orphan(s, minutes=0)
    sql(
        s,
        "UPDATE crewai_flow_state_extensions SET flow_persistence_data = jsonb_build_object('data_import_id', CAST(:v AS text))"
        " WHERE flow_id = :f",
        {"v": f"{{{str(i).upper()}}}", "f": named},
    )
    run(s)
    assert links(s, "data_imports") == {i: named}
