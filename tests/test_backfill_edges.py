"""Regression tests for the defects of issue 11 where a run exited 0 and the database was
wrong, each on every runbook shape: a nil-UUID import, imports without created_at, masters
with a NULL status, configuration naming an import in upper case, naive timestamps; and
the refusals that keep a command from writing where it must not."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from flowfix.cli import Exit, app
from flowfix.config import Settings
from tests import snapshot
from tests.conftest import downgrade, upgrade
from tests.helpers import (
    add_discovery_flow,
    add_import,
    add_master,
    add_record,
    cli_env,
    hold_row_lock,
    insert,
    links,
    sql,
)
from tests.test_backfill import run
from tests.test_validate import run_validate

C, E = uuid.uuid4(), uuid.uuid4()
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
NIL = uuid.UUID(int=0)
runner = CliRunner()


@pytest.fixture
def s(shaped_fixed: Settings) -> Settings:
    return shaped_fixed


def master_at(s: Settings, minutes: float) -> uuid.UUID:
    _, flow = add_master(s, client=C, engagement=E, created_at=T0 + timedelta(minutes=minutes))
    return flow


def import_at(
    s: Settings, minutes: float | None, id_: uuid.UUID | None = None, records: int = 2, naive: bool = False
) -> uuid.UUID:
    """An orphan import ``minutes`` after T0 (None: no created_at; ``naive``: for a
    ``timestamp without time zone`` column) with ``records`` orphan records."""
    imp = id_ or uuid.uuid4()
    at = None if minutes is None else T0 + timedelta(minutes=minutes)
    insert(
        s,
        "data_imports",
        {
            "id": imp,
            "master_flow_id": None,
            "client_account_id": C,
            "engagement_id": E,
            "created_at": at.replace(tzinfo=None) if at is not None and naive else at,
        },
    )
    for n in range(records):
        add_record(s, data_import=imp, master=None, row=n)
    return imp


def test_an_import_whose_id_is_the_nil_uuid_is_linked_not_just_reported(s: Settings) -> None:
    flow = master_at(s, 0)
    imp = import_at(s, 1, id_=NIL)
    result = run(s)
    assert result.exit_code == 0
    assert links(s, "data_imports") == {imp: flow}
    assert set(links(s, "raw_import_records").values()) == {flow}


def test_records_of_an_import_without_created_at_are_linked(s: Settings) -> None:
    sql(s, "ALTER TABLE data_imports ALTER COLUMN created_at DROP NOT NULL")
    flow = master_at(s, 0)
    imp = import_at(s, None)
    add_discovery_flow(s, flow_id=flow, master=flow, client=C, engagement=E, data_import=imp)  # exact evidence
    result = run(s)
    assert result.exit_code == 0 and result.counts.raw_import_records == 2
    assert set(links(s, "raw_import_records").values()) == {flow}


def test_a_master_whose_status_is_null_is_not_deleted(s: Settings) -> None:
    sql(s, "ALTER TABLE crewai_flow_state_extensions ALTER COLUMN flow_status DROP NOT NULL")
    flow = master_at(s, 0)
    sql(s, "UPDATE crewai_flow_state_extensions SET flow_status = NULL WHERE flow_id = :f", {"f": flow})
    imp = import_at(s, 1)
    result = run(s)
    assert result.exit_code == 0 and result.counts.skipped == 0
    assert links(s, "data_imports") == {imp: flow}


def test_configuration_naming_the_import_in_upper_case_is_exact_evidence(s: Settings) -> None:
    near = master_at(s, 1)
    named = master_at(s, 90)
    imp = import_at(s, 0)
    sql(
        s,
        "UPDATE crewai_flow_state_extensions SET flow_configuration = jsonb_build_object('import_id', CAST(:i AS text))"
        " WHERE flow_id = :f",
        {"i": str(imp).upper(), "f": named},
    )
    result = run(s)
    assert links(s, "data_imports") == {imp: named}
    assert [link.evidence for link in result.plan.import_links] == ["exact:configuration"]
    assert near not in links(s, "data_imports").values()


def test_naive_timestamps_do_not_crash_the_records_step(s: Settings) -> None:
    sql(s, "ALTER TABLE data_imports ALTER COLUMN created_at TYPE timestamp without time zone")
    flow = master_at(s, 0)
    import_at(s, 1, naive=True)
    result = run(s)
    assert result.exit_code == 0 and result.counts.raw_import_records == 2
    assert set(links(s, "raw_import_records").values()) == {flow}


def test_link_without_force_never_overwrites_a_record_holding_another_master(s: Settings) -> None:
    flow, other = master_at(s, 0), master_at(s, 500)
    imp = import_at(s, 1, records=2)
    odd = add_record(s, data_import=imp, master=other, row=9)
    result = runner.invoke(app, ["link", "--import", str(imp), "--flow", str(flow)], env=cli_env(s))
    assert result.exit_code == 0, result.output
    values = links(s, "raw_import_records")
    assert values.pop(odd) == other
    assert set(values.values()) == {flow}


def test_validate_scoped_to_a_tenant_counts_its_records_without_tenant_columns(s: Settings) -> None:
    flow = master_at(s, 0)
    imp = add_import(s, master=flow, client=C, engagement=E)
    add_record(s, data_import=imp, master=None)  # the record carries no tenant of its own
    assert run_validate(s, client_account=C).check("raw_import_records.orphaned").count == 1


def test_undo_of_an_undo_run_is_refused_and_changes_nothing(s: Settings) -> None:
    master_at(s, 0)
    import_at(s, 1)
    first = run(s)
    assert runner.invoke(app, ["undo", str(first.run_id)], env=cli_env(s)).exit_code == 0
    (undo_run,) = sql(s, "SELECT id::text FROM flowfix_runs WHERE command = 'undo'")
    before = snapshot.take(s, flowfix_tables=True)
    again = runner.invoke(app, ["undo", undo_run["id"]], env=cli_env(s))
    assert again.exit_code == Exit.USAGE
    assert "is an undo run" in again.stderr
    assert snapshot.take(s, flowfix_tables=True) == before


def test_backfill_and_link_after_downgrade_to_legacy_are_refused(s: Settings) -> None:
    flow = master_at(s, 0)
    imp = import_at(s, 1)
    run(s, dry_run=True)
    sql(s, "INSERT INTO flowfix_runs (command) VALUES ('link')")  # keeps the ledger tables on downgrade
    downgrade(s, "legacy")
    before = snapshot.take(s, flowfix_tables=True)
    for args in (["backfill"], ["link", "--import", str(imp), "--flow", str(flow)]):
        result = runner.invoke(app, args, env=cli_env(s))
        assert result.exit_code == Exit.USAGE, result.output
        assert "flowfix upgrade fix_master_flow_fk" in result.stderr
    assert snapshot.take(s, flowfix_tables=True) == before


def test_a_role_under_row_level_security_is_refused_by_every_writer_and_warned_by_status(s: Settings) -> None:
    from tests.test_operator_contract import role

    flow = master_at(s, 0)
    imp = import_at(s, 1)
    sql(s, "ALTER TABLE data_imports ENABLE ROW LEVEL SECURITY")
    writer = role(s, "GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role}")
    sql(s, f"CREATE POLICY sees_nothing ON data_imports TO {writer.require_url().username} USING (false)")
    before = snapshot.take(s, flowfix_tables=True)
    for args in (
        ["backfill"],
        ["backfill", "--dry-run"],
        ["link", "--import", str(imp), "--flow", str(flow)],
        ["undo", str(uuid.uuid4())],
    ):
        result = runner.invoke(app, args, env=cli_env(writer))
        assert result.exit_code == Exit.USAGE, (args, result.output)
        assert "row-level security may hide rows of" in result.stderr and "data_imports" in result.stderr
    status = runner.invoke(app, ["status"], env=cli_env(writer))
    assert "WARNING: row-level security may hide rows" in status.stdout
    assert snapshot.take(s, flowfix_tables=True) == before


def test_a_master_tied_between_two_nearest_imports_goes_to_neither_nor_to_a_farther_one(s: Settings) -> None:
    flow = master_at(s, 0)
    near_a, near_b = import_at(s, -5, records=0), import_at(s, 5, records=0)
    far = import_at(s, 30, records=0)
    result = run(s, dry_run=True)
    assert [link.id for link in result.plan.import_links] == []
    assert sorted(a.id for a in result.plan.ambiguous) == sorted([near_a, near_b])
    assert far in {u.id for u in result.plan.unmatched}
    assert flow  # the contested master stays unlinked


def test_a_resumed_run_also_links_orphans_that_appeared_since(s: Settings) -> None:
    import asyncio

    from sqlalchemy import text

    from flowfix import backfill as bf
    from flowfix import ledger
    from flowfix.db import make_engine

    first_flow = master_at(s, 0)
    first = import_at(s, 1)

    async def interrupted_run() -> None:
        """Start a run and store its plan, as a killed run leaves it (status running)."""
        engine = make_engine(s)
        try:
            async with engine.begin() as conn:
                plan = await bf.make_plan(conn, bf.Options())
                run_id = await ledger.start_run(conn, "backfill", bf.Options().arguments())
                await ledger.store_import_plan(
                    conn, run_id, [(x.id, x.master_flow_id, x.evidence, x.distance_seconds) for x in plan.import_links]
                )
                await conn.execute(text("SELECT 1"))
        finally:
            await engine.dispose()

    asyncio.run(interrupted_run())
    later_flow = master_at(s, 600)
    later = import_at(s, 601)
    result = run(s)
    assert result.resumed and result.exit_code == 0
    assert links(s, "data_imports") == {first: first_flow, later: later_flow}


def test_a_batch_waits_at_most_lock_timeout_for_an_application_row_lock_then_retries(s: Settings) -> None:
    """Every backfill transaction has a lock_timeout: behind an application's row lock it
    gives up, holding nothing, and retries with backoff; out of retries it says so."""
    import threading

    import asyncpg

    from tests.helpers import plain_url

    master_at(s, 0)
    imp = import_at(s, 1)
    locked, release = threading.Event(), threading.Event()

    def application(seconds: float) -> None:
        async def go() -> None:
            conn = await asyncpg.connect(plain_url(s), server_settings={"search_path": s.schema})
            try:
                async with conn.transaction():
                    await conn.execute("SELECT 1 FROM data_imports WHERE id = $1 FOR UPDATE", imp)
                    locked.set()
                    for _ in range(int(seconds * 20)):
                        if release.is_set():
                            break
                        await asyncio.sleep(0.05)
            finally:
                await conn.close()

        asyncio.run(go())

    import asyncio

    holder = threading.Thread(target=application, args=(30,))
    holder.start()
    locked.wait(10)
    try:
        refused = runner.invoke(
            app, ["backfill"], env=cli_env(s, FLOWFIX_LOCK_TIMEOUT="300ms", FLOWFIX_LOCK_RETRIES="0")
        )
    finally:
        release.set()
        holder.join()
    assert refused.exit_code == Exit.USAGE, refused.output
    assert "gave up waiting for a lock" in refused.stderr and "stopped part-way" in refused.stderr

    holder = threading.Thread(target=application, args=(1.5,))
    locked.clear()
    release.clear()
    holder.start()
    locked.wait(10)
    resumed = runner.invoke(app, ["backfill"], env=cli_env(s, FLOWFIX_LOCK_TIMEOUT="300ms", FLOWFIX_LOCK_RETRIES="5"))
    holder.join()
    assert resumed.exit_code == Exit.OK, resumed.output
    assert links(s, "data_imports")[imp] is not None


def test_undo_at_head_of_a_run_that_linked_discovery_flows_is_refused_before_writing(s: Settings) -> None:
    flow = master_at(s, 0)
    add_discovery_flow(s, flow_id=flow, master=None, client=C, engagement=E)
    result = run(s)
    assert result.counts.discovery_flows == 1
    upgrade(s, "head")
    before = snapshot.take(s, flowfix_tables=True)
    refused = runner.invoke(app, ["undo", str(result.run_id)], env=cli_env(s))
    assert refused.exit_code == Exit.USAGE
    assert "Run `flowfix downgrade fix_master_flow_fk` first" in refused.stderr
    assert snapshot.take(s, flowfix_tables=True) == before
    downgrade(s, "fix_master_flow_fk")
    assert runner.invoke(app, ["undo", str(result.run_id)], env=cli_env(s)).exit_code == 0
    assert set(links(s, "discovery_flows").values()) == {None}


def test_undo_puts_every_column_of_the_four_tables_back_as_it_was(s: Settings) -> None:
    """Undo is exact: the backfill changes master_flow_id and nothing else (not updated_at),
    so after undo every row of the four tables is what it was before the run."""
    flow = master_at(s, 0)
    import_at(s, 1, records=3)
    add_discovery_flow(s, flow_id=flow, master=None, client=C, engagement=E)
    sql(s, "UPDATE data_imports SET updated_at = timestamptz '2026-01-02 03:04:05+00'")
    before = snapshot.take(s)
    first = run(s)
    assert first.exit_code == 0 and first.counts is not None and first.counts.data_imports == 1
    assert first.counts.discovery_flows == 1
    assert runner.invoke(app, ["undo", str(first.run_id)], env=cli_env(s)).exit_code == 0
    assert snapshot.take(s) == before


def test_an_undo_that_gives_up_on_a_lock_is_finished_by_running_it_again(s: Settings) -> None:
    """Undo runs in batches, each with lock_timeout: behind an application's row lock held
    past the retries it stops (exit 2, what it reverted stays reverted and marked); run
    again, it reverts the rest, and the end state is that of one undo."""

    flows = [master_at(s, n * 300) for n in range(4)]
    imports = [import_at(s, n * 300 + 1, records=2) for n in range(4)]
    before = snapshot.take(s)
    first = run(s)
    assert first.exit_code == 0
    release = hold_row_lock(s, "data_imports", imports[0], 30)
    try:
        stopped = runner.invoke(
            app, ["undo", str(first.run_id)], env=cli_env(s, FLOWFIX_LOCK_TIMEOUT="200ms", FLOWFIX_LOCK_RETRIES="1")
        )
    finally:
        release()
    assert stopped.exit_code == Exit.USAGE
    assert "lock" in stopped.output
    # the records (undone first) went back; the locked import did not
    assert set(links(s, "raw_import_records").values()) == {None}
    assert links(s, "data_imports")[imports[0]] == flows[0]
    again = runner.invoke(app, ["undo", str(first.run_id)], env=cli_env(s))
    assert again.exit_code == 0, again.output
    assert snapshot.take(s) == before
    runs = sql(s, "SELECT command, status FROM flowfix_runs ORDER BY started_at")
    assert [(r["command"], r["status"]) for r in runs] == [("backfill", "undone"), ("undo", "finished")]


def test_link_waits_out_an_application_row_lock_with_retries_or_says_it_gave_up(s: Settings) -> None:
    """flowfix link's transaction has lock_timeout and retries with backoff like every
    writing transaction: behind a short application lock it succeeds; behind one held
    past its retries it exits 2 and changes nothing."""
    import time

    flow = master_at(s, 0)
    imp = import_at(s, 1)
    before = snapshot.take(s, flowfix_tables=True)
    release = hold_row_lock(s, "data_imports", imp, 30)
    try:
        refused = runner.invoke(
            app,
            ["link", "--import", str(imp), "--flow", str(flow)],
            env=cli_env(s, FLOWFIX_LOCK_TIMEOUT="200ms", FLOWFIX_LOCK_RETRIES="0"),
        )
    finally:
        release()
    assert refused.exit_code == Exit.USAGE and "gave up waiting for a lock" in refused.stderr, refused.output
    assert snapshot.take(s, flowfix_tables=True) == before

    release = hold_row_lock(s, "data_imports", imp, 1.0)
    started = time.monotonic()
    try:
        linked = runner.invoke(
            app,
            ["link", "--import", str(imp), "--flow", str(flow)],
            env=cli_env(s, FLOWFIX_LOCK_TIMEOUT="200ms", FLOWFIX_LOCK_RETRIES="8"),
        )
    finally:
        release()
    assert linked.exit_code == 0, linked.output
    assert time.monotonic() - started >= 0.9  # it waited the lock out
    assert links(s, "data_imports") == {imp: flow}
