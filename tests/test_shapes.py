"""fix_master_flow_fk on every production shape (tests/shapes): what each shape ends with,
an exact round trip (every row and the catalog), and a clean refusal, changing nothing,
where the shape cannot be handled."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from alembic.util import CommandError

from flowfix import catalog
from flowfix.config import Settings
from flowfix.models import CHILD_TABLES, MASTER_TABLE
from tests import snapshot
from tests.conftest import downgrade, upgrade
from tests.helpers import (
    add_discovery_flow,
    add_import,
    add_master,
    add_record,
    cli_env,
    revision,
    sql,
    with_catalog,
)

C, E = uuid.uuid4(), uuid.uuid4()
T0 = datetime(2026, 3, 1, tzinfo=UTC)

#: What each FK on master_flow_id is after fix_master_flow_fk, per shape: the FK flowfix
#: adds keeps the delete rule and DEFERRABLE of the one it replaces (a plain FK where
#: there was none); an FK that already referenced flow_id is left exactly as it was.
EXPECTED_AFTER_UPGRADE: dict[str, dict[str, set[tuple[str, str]]]] = {
    "friendly": {
        "data_imports": {("fk_data_imports_master_flow_id", " ON DELETE CASCADE")},
        "raw_import_records": {("fk_raw_import_records_master_flow_id", "")},
        "discovery_flows": {("fk_discovery_flows_master_flow_id", "")},
    },
    "deployed": {
        "data_imports": {("fk_data_imports_master_flow_id", " ON DELETE CASCADE")},
        "raw_import_records": {("fk_raw_import_records_master_flow_id", "")},
        "discovery_flows": {("fk_discovery_flows_master_flow_id", "")},
    },
    "app_head": {
        "data_imports": {
            ("fk_data_imports_master_flow_id_crewai_flow_state_extensions", " DEFERRABLE INITIALLY DEFERRED")
        },
        "raw_import_records": {("fk_raw_import_records_master_flow_id_crewai_flow_state__e097", "")},
        "discovery_flows": {("discovery_flows_master_flow_id_fkey", " ON DELETE CASCADE")},
    },
    "between": {
        "data_imports": {("data_imports_master_flow_id_flow_fkey", " ON DELETE SET NULL")},
        "raw_import_records": {("fk_raw_import_records_master_flow_id", "")},
        "discovery_flows": {("fk_discovery_flows_master_flow_id", "")},
    },
}
EXPECTED_AFTER_UPGRADE["violated"] = EXPECTED_AFTER_UPGRADE["deployed"]
EXPECTED_AFTER_UPGRADE["partitioned"] = EXPECTED_AFTER_UPGRADE["deployed"]


def target_of(s: Settings, table: str) -> str | None:
    """The master column the (single) FK on ``table.master_flow_id`` references, if any."""
    fks = with_catalog(s, catalog.foreign_keys, table, "master_flow_id")
    return fks[0].target_column if fks else None


def seed(s: Settings) -> dict[str, uuid.UUID]:
    """Links the way the application wrote them on this shape: a master's id where the FK
    references id, its flow_id otherwise; plus NULLs."""
    m1, f1 = add_master(s, client=C, engagement=E, created_at=T0)
    m2, f2 = add_master(s, client=C, engagement=E, created_at=T0)

    def link(table: str, master_id: uuid.UUID, flow_id: uuid.UUID) -> uuid.UUID:
        return master_id if target_of(s, table) == "id" else flow_id

    i1 = add_import(s, master=link("data_imports", m1, f1), client=C, engagement=E)
    i2 = add_import(s, master=None, client=C, engagement=E)
    r1 = add_record(s, data_import=i1, master=link("raw_import_records", m1, f1))
    r2 = add_record(s, data_import=i2, master=None, row=1)
    d1 = add_discovery_flow(
        s, flow_id=f1, master=link("discovery_flows", m1, f1), client=C, engagement=E, data_import=i1
    )
    d2 = add_discovery_flow(s, flow_id=f2, master=None, client=C, engagement=E)
    return dict(m1=m1, f1=f1, m2=m2, f2=f2, i1=i1, i2=i2, r1=r1, r2=r2, d1=d1, d2=d2)


def fk_rules(s: Settings, table: str) -> set[tuple[str, str]]:
    """(name, what follows the target in the definition: ON DELETE, DEFERRABLE) of the FKs
    on ``table.master_flow_id``, which must all reference the master's flow_id."""
    out = set()
    for fk in with_catalog(s, catalog.foreign_keys, table, "master_flow_id"):
        assert (fk.target_table, fk.target_column, fk.validated) == (MASTER_TABLE, "flow_id", True), fk
        out.add((fk.name, fk.definition.split(")", 2)[-1].removesuffix(" NOT VALID")))
    return out


@pytest.mark.parametrize("name", ["friendly", "deployed", "app_head", "between", "violated"])
def test_upgrade_keeps_delete_rules_and_the_round_trip_is_exact(make_shape: Callable[..., Settings], name: str) -> None:
    s = make_shape(name)
    ids = seed(s)
    before = snapshot.take(s)

    upgrade(s, "fix_master_flow_fk")
    assert revision(s) == "fix_master_flow_fk"
    assert {t: fk_rules(s, t) for t in CHILD_TABLES} == EXPECTED_AFTER_UPGRADE[name]
    for table in CHILD_TABLES:
        assert sql(
            s,
            f"SELECT master_flow_id FROM {table} WHERE id = ANY(:ids) AND master_flow_id IS NOT NULL",
            {"ids": [ids["i1"], ids["r1"], ids["d1"]]},
        ) == [{"master_flow_id": ids["f1"]}]
    # validate names each FK with its rule (NO ACTION spelled out)
    from tests.test_validate import run_validate

    report = run_validate(s)
    for table, ((fk_name, rule),) in EXPECTED_AFTER_UPGRADE[name].items():
        shown = rule.strip() if "ON DELETE" in rule else f"ON DELETE NO ACTION {rule.strip()}".strip()
        assert report.check(f"fk.{table}").message == f"{fk_name} -> {MASTER_TABLE}(flow_id) {shown}, validated"
    after = snapshot.take(s, rows=False)
    # the other tables' FKs and the unique key they depend on are untouched
    others = [c for c in before.constraints if c["table_name"] not in CHILD_TABLES]
    assert [c for c in others if c not in after.constraints] == []

    downgrade(s, "legacy")
    assert revision(s) == "legacy"
    restored = snapshot.take(s)
    if name == "violated":
        # the records' FK was VALID over two rows that break it: it comes back as it was,
        # but NOT VALID (PostgreSQL cannot validate it); everything else is exact
        fk = "raw_import_records_master_flow_id_fkey"
        was = [c for c in before.constraints if c["name"] == fk]
        now = [c for c in restored.constraints if c["name"] == fk]
        assert [c["validated"] for c in was] == [True] and [c["validated"] for c in now] == [False]
        assert [c["definition"] for c in now] == [c["definition"] + " NOT VALID" for c in was]
        before.constraints = [c for c in before.constraints if c["name"] != fk]
        restored.constraints = [c for c in restored.constraints if c["name"] != fk]
    assert restored == before


def nothing_changed(s: Settings, before: snapshot.Snapshot, rev: str | None) -> None:
    assert snapshot.take(s) == before
    assert revision(s) == rev
    flowfix_tables = sql(
        s,
        "SELECT relname FROM pg_class WHERE relname IN ('flowfix_quarantine', 'flowfix_runs',"
        " 'flowfix_translations') AND relnamespace = to_regnamespace(current_schema())",
    )
    assert flowfix_tables == [] or rev == "fix_master_flow_fk"


def test_a_composite_fk_on_master_flow_id_is_refused_in_one_line_changing_nothing(
    make_shape: Callable[..., Settings],
) -> None:
    from typer.testing import CliRunner

    from flowfix.cli import app

    s = make_shape("composite")
    seed(s)
    before = snapshot.take(s)
    result = CliRunner().invoke(app, ["upgrade", "fix_master_flow_fk"], env=cli_env(s))
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("flowfix: error: composite foreign key fk_raw_import_records_master_tenant")
    assert "This revision changed nothing" in last and "Traceback" not in result.output
    nothing_changed(s, before, "legacy")


def server_version(s: Settings) -> int:
    return int(sql(s, "SELECT current_setting('server_version_num') AS v")[0]["v"])


def test_a_partitioned_records_table_round_trips_on_18_and_is_refused_before_18(
    make_shape: Callable[..., Settings],
) -> None:
    s = make_shape("partitioned")
    ids = seed(s)
    before = snapshot.take(s)
    if server_version(s) < 180000:
        with pytest.raises(CommandError, match=r"raw_import_records is partitioned, and PostgreSQL .* cannot add"):
            upgrade(s, "fix_master_flow_fk")
        nothing_changed(s, before, "legacy")
        return
    upgrade(s, "fix_master_flow_fk")
    assert {t: fk_rules(s, t) for t in CHILD_TABLES} == EXPECTED_AFTER_UPGRADE["partitioned"]
    assert sql(s, "SELECT master_flow_id FROM raw_import_records WHERE id = :r", {"r": ids["r1"]}) == [
        {"master_flow_id": ids["f1"]}
    ]
    # the index on the partitioned table was built partition by partition, and is valid
    assert with_catalog(s, catalog.has_usable_index, "raw_import_records", "master_flow_id")
    downgrade(s, "legacy")
    assert snapshot.take(s) == before


def test_force_row_level_security_for_the_owner_is_refused_changing_nothing(
    make_shape: Callable[..., Settings],
) -> None:
    s = make_shape("app_head")
    seed(s)
    sql(
        s,
        "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'flowfix_owner') THEN"
        " CREATE ROLE flowfix_owner LOGIN; END IF; END $$",
    )
    for statement in (
        "GRANT USAGE, CREATE ON SCHEMA migration TO flowfix_owner",
        *(f"ALTER TABLE {t} OWNER TO flowfix_owner" for t in (MASTER_TABLE, *CHILD_TABLES)),
        "GRANT ALL ON flowfix_alembic_version, flowfix_schema_changes TO flowfix_owner",
        f"ALTER TABLE {MASTER_TABLE} FORCE ROW LEVEL SECURITY",
    ):
        sql(s, statement)
    before = snapshot.take(s)
    owner = Settings(
        url=s.url.set(username="flowfix_owner", password=None), schema=s.schema, lock_timeout="2s", lock_retries=0
    )
    with pytest.raises(
        CommandError, match="row-level security hides rows of crewai_flow_state_extensions from role flowfix_owner"
    ):
        upgrade(owner, "fix_master_flow_fk")
    nothing_changed(s, before, "legacy")


def test_downgrade_refuses_while_an_application_fk_depends_on_the_new_unique_constraint(settings: Settings) -> None:
    upgrade(settings, "fix_master_flow_fk")
    sql(
        settings,
        "CREATE TABLE app_refs (id uuid PRIMARY KEY, flow uuid REFERENCES crewai_flow_state_extensions (flow_id))",
    )
    before = snapshot.take(settings)
    with pytest.raises(CommandError, match="is referenced by foreign key app_refs_flow_fkey on app_refs"):
        downgrade(settings, "legacy")
    assert snapshot.take(settings) == before
    assert revision(settings) == "fix_master_flow_fk"


def test_a_forgotten_flowfix_schema_is_refused_naming_the_schema_that_holds_the_tables(
    make_shape: Callable[..., Settings],
) -> None:
    s = make_shape("deployed", revision=None)
    public = Settings(url=s.url, schema="public", lock_timeout="2s", lock_retries=0)
    before = snapshot.take(public)
    with pytest.raises(
        CommandError,
        match="schema public has none of the discovery-flow tables, but schema migration has them: set FLOWFIX_SCHEMA",
    ):
        upgrade(public, "head")
    assert snapshot.take(public) == before
    from typer.testing import CliRunner

    from flowfix.cli import app

    result = CliRunner().invoke(app, ["validate"], env=cli_env(public))
    assert result.exit_code == 2
    assert "schema 'public' has no table crewai_flow_state_extensions" in result.stderr
    assert "schema migration has it: set FLOWFIX_SCHEMA" in result.stderr
    assert sql(public, "SELECT count(*) AS n FROM pg_class WHERE relname LIKE 'flowfix%'") == [{"n": 0}]


def test_an_empty_schema_needs_the_explicit_choice_to_create_tables(settings: Settings) -> None:
    import dataclasses

    with pytest.raises(CommandError, match="run flowfix upgrade legacy --create-tables"):
        upgrade(dataclasses.replace(settings, create_tables=False), "legacy")
    assert sql(
        settings, "SELECT count(*) AS n FROM pg_class WHERE relname LIKE 'flowfix%' OR relname = 'data_imports'"
    ) == [{"n": 0}]
    upgrade(settings, "legacy")
    assert revision(settings) == "legacy"


@pytest.mark.parametrize("schema", ["information_schema", "pg_catalog", "pg_toast"])
def test_a_system_schema_is_refused(schema: str) -> None:
    from typer.testing import CliRunner

    from flowfix.cli import app

    result = CliRunner().invoke(app, ["upgrade"], env={"DATABASE_URL": "postgresql://u@h/d", "FLOWFIX_SCHEMA": schema})
    assert result.exit_code == 2
    assert "is a PostgreSQL system schema" in result.stderr


# --- the backfill and undo on shape H --------------------------------------------------


def test_create_missing_masters_on_shape_h_supplies_ids_and_reports_what_it_cannot_fill(
    make_shape: Callable[..., Settings],
) -> None:
    """Shape H has no id defaults and NOT NULL user_id: flowfix supplies both. A master it
    cannot fill is reported while planning; every other link is still made."""
    from tests.test_backfill import run

    s = make_shape("app_head")
    upgrade(s, "fix_master_flow_fk")
    lonely_flow, blank_flow = uuid.uuid4(), uuid.uuid4()
    lonely = add_discovery_flow(s, flow_id=lonely_flow, master=None, client=C, engagement=E)
    sql(s, "UPDATE discovery_flows SET user_id = 'alice', flow_name = 'Q3 import' WHERE id = :d", {"d": lonely})
    sql(s, "ALTER TABLE discovery_flows ALTER COLUMN user_id DROP NOT NULL")
    blank = add_discovery_flow(s, flow_id=blank_flow, master=None, client=C, engagement=E)
    sql(s, "UPDATE discovery_flows SET user_id = NULL WHERE id = :d", {"d": blank})
    _, existing = add_master(s, client=C, engagement=E)
    linked = add_discovery_flow(s, flow_id=existing, master=None, client=C, engagement=E)

    result = run(s, create_missing_masters=True)
    assert result.exit_code == 1  # the blank one is left, and said
    reasons = {u.id: u.reason for u in result.plan.unmatched}
    assert reasons == {blank: f"cannot create its master: its user_id is NULL and {MASTER_TABLE}.user_id is NOT NULL"}
    created = sql(
        s,
        "SELECT id, user_id, flow_name, flow_type FROM crewai_flow_state_extensions WHERE flow_id = :f",
        {"f": lonely_flow},
    )
    assert len(created) == 1 and created[0]["id"] is not None and created[0]["id"] != lonely_flow
    assert (created[0]["user_id"], created[0]["flow_name"], created[0]["flow_type"]) == (
        "alice",
        "Q3 import",
        "discovery",
    )
    got = {r["id"]: r["master_flow_id"] for r in sql(s, "SELECT id, master_flow_id FROM discovery_flows")}
    assert got == {lonely: lonely_flow, blank: None, linked: existing}
    assert sql(s, "SELECT status FROM flowfix_runs") == [{"status": "finished"}]


def test_a_required_column_flowfix_cannot_fill_is_found_while_planning(make_shape: Callable[..., Settings]) -> None:
    from tests.test_backfill import run

    s = make_shape("app_head")
    upgrade(s, "fix_master_flow_fk")
    sql(
        s,
        "ALTER TABLE crewai_flow_state_extensions ADD COLUMN tier_budget integer NOT NULL DEFAULT 0",
    )
    sql(s, "ALTER TABLE crewai_flow_state_extensions ALTER COLUMN tier_budget DROP DEFAULT")
    orphan_flow = add_discovery_flow(s, flow_id=uuid.uuid4(), master=None, client=C, engagement=E)
    _, existing = add_master(s, client=C, engagement=E)
    linked = add_discovery_flow(s, flow_id=existing, master=None, client=C, engagement=E)

    dry = run(s, create_missing_masters=True, dry_run=True)
    assert [(u.id, u.reason) for u in dry.plan.unmatched] == [
        (
            orphan_flow,
            f"cannot create its master: {MASTER_TABLE}.tier_budget is NOT NULL without a default,"
            " and flowfix has no value for it",
        )
    ]
    result = run(s, create_missing_masters=True)
    assert result.exit_code == 1
    got = {r["id"]: r["master_flow_id"] for r in sql(s, "SELECT id, master_flow_id FROM discovery_flows")}
    assert got == {orphan_flow: None, linked: existing}
    assert sql(s, "SELECT status FROM flowfix_runs") == [{"status": "finished"}]


def test_undo_keeps_a_created_master_that_another_table_references(make_shape: Callable[..., Settings]) -> None:
    """Shape H: nine FKs of other tables reference masters by flow_id, some with ON DELETE
    CASCADE. A master the backfill created is deleted by undo only if nothing points at it."""
    from typer.testing import CliRunner

    from flowfix.cli import app
    from tests.test_backfill import run

    s = make_shape("app_head")
    upgrade(s, "fix_master_flow_fk")
    kept_flow, gone_flow = uuid.uuid4(), uuid.uuid4()
    for flow in (kept_flow, gone_flow):
        add_discovery_flow(s, flow_id=flow, master=None, client=C, engagement=E)
    result = run(s, create_missing_masters=True)
    assert result.counts.masters_created == 2
    # the application starts a collection flow on one of them (ON DELETE CASCADE)
    collection = uuid.uuid4()
    sql(s, "INSERT INTO collection_flows (id, master_flow_id) VALUES (:id, :f)", {"id": collection, "f": kept_flow})

    undone = CliRunner().invoke(app, ["undo", str(result.run_id)], env=cli_env(s))
    assert undone.exit_code == 0, undone.output
    masters = {r["flow_id"] for r in sql(s, "SELECT flow_id FROM crewai_flow_state_extensions")}
    assert masters == {kept_flow}
    assert sql(s, "SELECT id, master_flow_id FROM collection_flows") == [
        {"id": collection, "master_flow_id": kept_flow}
    ]
    assert {r["master_flow_id"] for r in sql(s, "SELECT master_flow_id FROM discovery_flows")} == {None}


def test_the_violated_shape_runs_the_whole_runbook(make_shape: Callable[..., Settings]) -> None:
    """Shape D restored with triggers off: the upgrade moves the two breaking values to
    quarantine, the backfill links those records through their import, validate passes."""
    from tests.test_backfill import run
    from tests.test_validate import run_validate

    s = make_shape("violated")
    upgrade(s, "fix_master_flow_fk")
    quarantined = sql(s, "SELECT row_id::text, old_value::text FROM flowfix_quarantine ORDER BY row_id")
    assert [q["old_value"] for q in quarantined] == [
        "0000dead-0000-4000-8000-000000000001",
        "0000dead-0000-4000-8000-000000000002",
    ]
    result = run(s)
    assert result.exit_code == 0 and result.counts.raw_import_records == 2
    report = run_validate(s)
    failing = {c.name for c in report.checks if c.status == "fail"}
    assert failing == set(), report.to_text()
