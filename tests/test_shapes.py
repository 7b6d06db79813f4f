"""fix_master_flow_fk on every production shape (tests/shapes): what each shape ends with,
an exact round trip (every row and the catalog), and a clean refusal, changing nothing,
where the shape cannot be handled."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import pytest
from alembic.util import CommandError

from flowfix import catalog
from flowfix.config import Settings
from flowfix.models import CHILD_TABLES, MASTER_TABLE
from tests import snapshot
from tests.conftest import downgrade, shape_settings, upgrade
from tests.helpers import add_discovery_flow, add_import, add_master, add_record, revision, sql, with_catalog
from tests.shapes import SHAPES, Shape

C, E = uuid.uuid4(), uuid.uuid4()
T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)

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
        "data_imports": {("fk_data_imports_master_flow_id_crewai_flow_state_extensions",
                          " DEFERRABLE INITIALLY DEFERRED")},
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


@pytest.fixture
def make_shape(pg_server: str, shape_template: Callable[[Shape, bool], str]) -> Iterator[Callable[..., Settings]]:
    """``make_shape(name, adopted=True)``: a fresh database of that shape."""
    clones: list[Iterator[Settings]] = []

    def make(name: str, adopted: bool = True) -> Settings:
        gen = shape_settings(pg_server, shape_template, SHAPES[name], adopted)
        clones.append(gen)
        return next(gen)

    yield make
    for gen in clones:
        gen.close()


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
    d1 = add_discovery_flow(s, flow_id=f1, master=link("discovery_flows", m1, f1), client=C, engagement=E,
                            data_import=i1)
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
def test_upgrade_keeps_delete_rules_and_the_round_trip_is_exact(make_shape: Callable[..., Settings],
                                                                 name: str) -> None:
    s = make_shape(name)
    ids = seed(s)
    before = snapshot.take(s)

    upgrade(s, "fix_master_flow_fk")
    assert revision(s) == "fix_master_flow_fk"
    assert {t: fk_rules(s, t) for t in CHILD_TABLES} == EXPECTED_AFTER_UPGRADE[name]
    for table in CHILD_TABLES:
        assert sql(s, f"SELECT master_flow_id FROM {table} WHERE id = ANY(:ids) AND master_flow_id IS NOT NULL",
                   {"ids": [ids["i1"], ids["r1"], ids["d1"]]}) == [{"master_flow_id": ids["f1"]}]
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
    flowfix_tables = sql(s, "SELECT relname FROM pg_class WHERE relname IN ('flowfix_quarantine', 'flowfix_runs',"
                            " 'flowfix_translations') AND relnamespace = to_regnamespace(current_schema())")
    assert flowfix_tables == [] or rev == "fix_master_flow_fk"


def cli_env(s: Settings, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": s.url.render_as_string(hide_password=False), "FLOWFIX_SCHEMA": s.schema, **extra}


def test_a_composite_fk_on_master_flow_id_is_refused_in_one_line_changing_nothing(
        make_shape: Callable[..., Settings]) -> None:
    from typer.testing import CliRunner

    from flowfix.cli import app

    s = make_shape("composite")
    seed(s)
    before = snapshot.take(s)
    result = CliRunner().invoke(app, ["upgrade", "fix_master_flow_fk"], env=cli_env(s))
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("flowfix: error: composite foreign key fk_raw_import_records_master_tenant")
    assert "Nothing was changed" in last and "Traceback" not in result.output
    nothing_changed(s, before, "legacy")


def server_version(s: Settings) -> int:
    return int(sql(s, "SELECT current_setting('server_version_num') AS v")[0]["v"])


def test_a_partitioned_records_table_round_trips_on_18_and_is_refused_before_18(
        make_shape: Callable[..., Settings]) -> None:
    s = make_shape("partitioned")
    ids = seed(s)
    before = snapshot.take(s)
    if server_version(s) < 180000:
        with pytest.raises(CommandError, match="raw_import_records is partitioned, and PostgreSQL .* cannot add"):
            upgrade(s, "fix_master_flow_fk")
        nothing_changed(s, before, "legacy")
        return
    upgrade(s, "fix_master_flow_fk")
    assert {t: fk_rules(s, t) for t in CHILD_TABLES} == EXPECTED_AFTER_UPGRADE["partitioned"]
    assert sql(s, "SELECT master_flow_id FROM raw_import_records WHERE id = :r", {"r": ids["r1"]}) == [
        {"master_flow_id": ids["f1"]}]
    # the index on the partitioned table was built partition by partition, and is valid
    assert with_catalog(s, catalog.has_usable_index, "raw_import_records", "master_flow_id")
    downgrade(s, "legacy")
    assert snapshot.take(s) == before


def test_force_row_level_security_for_the_owner_is_refused_changing_nothing(
        make_shape: Callable[..., Settings]) -> None:
    s = make_shape("app_head")
    seed(s)
    sql(s, "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'flowfix_owner') THEN"
           " CREATE ROLE flowfix_owner LOGIN; END IF; END $$")
    for statement in (
            "GRANT USAGE, CREATE ON SCHEMA migration TO flowfix_owner",
            *(f"ALTER TABLE {t} OWNER TO flowfix_owner" for t in (MASTER_TABLE, *CHILD_TABLES)),
            "GRANT ALL ON flowfix_alembic_version, flowfix_schema_changes TO flowfix_owner",
            f"ALTER TABLE {MASTER_TABLE} FORCE ROW LEVEL SECURITY"):
        sql(s, statement)
    before = snapshot.take(s)
    owner = Settings(url=s.url.set(username="flowfix_owner", password=None), schema=s.schema,
                     lock_timeout="2s", lock_retries=0)
    with pytest.raises(CommandError, match="row-level security hides rows of crewai_flow_state_extensions from"
                                           " role flowfix_owner"):
        upgrade(owner, "fix_master_flow_fk")
    nothing_changed(s, before, "legacy")


def test_downgrade_refuses_while_an_application_fk_depends_on_the_new_unique_constraint(settings: Settings) -> None:
    upgrade(settings, "fix_master_flow_fk")
    sql(settings, "CREATE TABLE app_refs (id uuid PRIMARY KEY,"
                  " flow uuid REFERENCES crewai_flow_state_extensions (flow_id))")
    before = snapshot.take(settings)
    with pytest.raises(CommandError, match="is referenced by foreign key app_refs_flow_fkey on app_refs"):
        downgrade(settings, "legacy")
    assert snapshot.take(settings) == before
    assert revision(settings) == "fix_master_flow_fk"


def test_a_forgotten_flowfix_schema_is_refused_naming_the_schema_that_holds_the_tables(
        make_shape: Callable[..., Settings]) -> None:
    s = make_shape("deployed", adopted=False)
    public = Settings(url=s.url, schema="public", lock_timeout="2s", lock_retries=0)
    before = snapshot.take(public)
    with pytest.raises(CommandError, match="schema public has none of the discovery-flow tables, but schema"
                                           " migration has them: set FLOWFIX_SCHEMA"):
        upgrade(public, "head")
    assert snapshot.take(public) == before
    assert sql(public, "SELECT count(*) AS n FROM pg_class WHERE relname LIKE 'flowfix%'") == [{"n": 0}]


def test_an_empty_schema_needs_the_explicit_choice_to_create_tables(settings: Settings) -> None:
    import dataclasses

    with pytest.raises(CommandError, match="run flowfix upgrade legacy --create-tables"):
        upgrade(dataclasses.replace(settings, create_tables=False), "legacy")
    assert sql(settings, "SELECT count(*) AS n FROM pg_class WHERE relname LIKE 'flowfix%'"
                         " OR relname = 'data_imports'") == [{"n": 0}]
    upgrade(settings, "legacy")
    assert revision(settings) == "legacy"


@pytest.mark.parametrize("schema", ["information_schema", "pg_catalog", "pg_toast"])
def test_a_system_schema_is_refused(schema: str) -> None:
    from typer.testing import CliRunner

    from flowfix.cli import app

    result = CliRunner().invoke(app, ["upgrade"], env={"DATABASE_URL": "postgresql://u@h/d", "FLOWFIX_SCHEMA": schema})
    assert result.exit_code == 2
    assert "is a PostgreSQL system schema" in result.stderr
