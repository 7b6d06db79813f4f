"""fix_master_flow_fk on a realistic legacy database: links stored as master ids,
dangling values, NULLs, production constraint names, a non-public schema; then the
downgrade brings every value and constraint back."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from alembic.util import CommandError

from flowfix import catalog
from flowfix.config import Settings
from flowfix.models import CHILD_TABLES, MASTER_TABLE
from tests.conftest import downgrade, upgrade
from tests.helpers import (
    add_discovery_flow,
    add_import,
    add_master,
    add_record,
    links,
    revision,
    script,
    sql,
    with_catalog,
)

C, E = uuid.uuid4(), uuid.uuid4()


@pytest.fixture
def migration_schema(settings: Settings) -> Settings:
    """The tables in schema ``migration``, as real deployments keep them."""
    script(settings, "CREATE SCHEMA migration")
    return dataclasses.replace(settings, schema="migration")


def _constraints(s: Settings, table: str) -> dict[str, tuple[str, str, bool]]:
    return {
        fk.name: (fk.target_table, fk.target_column, fk.validated)
        for fk in with_catalog(s, catalog.foreign_keys, table, "master_flow_id")
    }


def _legacy_dataset(s: Settings) -> dict[str, object]:
    """Plant every kind of legacy value; returns the ids the assertions need."""
    upgrade(s, "legacy")
    m1, f1 = add_master(s, client=C, engagement=E)
    m2, f2 = add_master(s, client=C, engagement=E)
    # Production names differ from the plan's, and the records FK was added NOT VALID
    # after dangling values had crept in.
    script(
        s,
        "ALTER TABLE data_imports RENAME CONSTRAINT data_imports_master_flow_id_fkey TO di_master_prod",
        "ALTER TABLE raw_import_records DROP CONSTRAINT raw_import_records_master_flow_id_fkey",
    )
    dangling_r, dangling_d = uuid.uuid4(), uuid.uuid4()
    i1 = add_import(s, master=m1, client=C, engagement=E)
    i2 = add_import(s, master=None, client=C, engagement=E)
    i3 = add_import(s, master=m2, client=C, engagement=E)
    r1 = add_record(s, data_import=i1, master=m1)
    r2 = add_record(s, data_import=i1, master=None, row=1)
    r3 = add_record(s, data_import=i3, master=dangling_r)
    r4 = add_record(s, data_import=i2, master=f1)  # already a flow_id: left as it is
    script(
        s,
        "ALTER TABLE raw_import_records ADD CONSTRAINT rir_master_legacy FOREIGN KEY (master_flow_id)"
        " REFERENCES crewai_flow_state_extensions (id) NOT VALID",
    )
    d1 = add_discovery_flow(s, flow_id=f1, master=f1, client=C, engagement=E, data_import=i1)
    d2 = add_discovery_flow(s, flow_id=f2, master=m2, client=C, engagement=E, data_import=i3)
    d3 = add_discovery_flow(s, flow_id=uuid.uuid4(), master=dangling_d, client=C, engagement=E)
    d4 = add_discovery_flow(s, flow_id=uuid.uuid4(), master=None, client=C, engagement=E)
    return dict(
        m1=m1,
        f1=f1,
        m2=m2,
        f2=f2,
        i1=i1,
        i2=i2,
        i3=i3,
        r1=r1,
        r2=r2,
        r3=r3,
        r4=r4,
        d1=d1,
        d2=d2,
        d3=d3,
        d4=d4,
        dangling_r=dangling_r,
        dangling_d=dangling_d,
    )


def test_upgrade_translates_links_quarantines_dangling_and_downgrade_restores_all(migration_schema: Settings) -> None:
    s = migration_schema
    ids = _legacy_dataset(s)
    before = {t: links(s, t) for t in CHILD_TABLES}
    legacy_fks = {t: _constraints(s, t) for t in CHILD_TABLES}
    assert legacy_fks["data_imports"] == {"di_master_prod": (MASTER_TABLE, "id", True)}
    assert legacy_fks["raw_import_records"] == {"rir_master_legacy": (MASTER_TABLE, "id", False)}

    upgrade(s, "fix_master_flow_fk")
    assert revision(s) == "fix_master_flow_fk"

    # Catalog: one FK per table, to flow_id, validated; unique flow_id; indexes usable.
    for table in CHILD_TABLES:
        assert _constraints(s, table) == {f"fk_{table}_master_flow_id": (MASTER_TABLE, "flow_id", True)}
        assert with_catalog(s, catalog.has_usable_index, table, "master_flow_id")
    assert with_catalog(s, catalog.has_unique_index, MASTER_TABLE, "flow_id")
    on_delete = {t: with_catalog(s, catalog.foreign_keys, t, "master_flow_id")[0].on_delete for t in CHILD_TABLES}
    # each new FK keeps the delete rule of the one it replaced (none: a plain FK)
    assert on_delete == {"data_imports": "c", "raw_import_records": "a", "discovery_flows": "a"}

    # Data: ids became flow_ids, flow_ids and NULLs stayed, dangling values were moved aside.
    assert links(s, "data_imports") == {ids["i1"]: ids["f1"], ids["i2"]: None, ids["i3"]: ids["f2"]}
    assert links(s, "raw_import_records") == {
        ids["r1"]: ids["f1"],
        ids["r2"]: None,
        ids["r3"]: None,
        ids["r4"]: ids["f1"],
    }
    assert links(s, "discovery_flows") == {ids["d1"]: ids["f1"], ids["d2"]: ids["f2"], ids["d3"]: None, ids["d4"]: None}
    quarantine = sql(s, "SELECT table_name, row_id, column_name, old_value FROM flowfix_quarantine ORDER BY table_name")
    assert quarantine == [
        {
            "table_name": "discovery_flows",
            "row_id": ids["d3"],
            "column_name": "master_flow_id",
            "old_value": ids["dangling_d"],
        },
        {
            "table_name": "raw_import_records",
            "row_id": ids["r3"],
            "column_name": "master_flow_id",
            "old_value": ids["dangling_r"],
        },
    ]

    # Everything lives in schema "migration", flowfix's version table included.
    where = sql(
        s,
        "SELECT table_schema, table_name FROM information_schema.tables"
        " WHERE table_schema IN ('public', 'migration') ORDER BY 2",
    )
    assert {r["table_schema"] for r in where} == {"migration"}
    assert "flowfix_alembic_version" in {r["table_name"] for r in where}

    downgrade(s, "legacy")
    assert revision(s) == "legacy"
    assert {t: links(s, t) for t in CHILD_TABLES} == before
    assert {t: _constraints(s, t) for t in CHILD_TABLES} == legacy_fks
    assert not with_catalog(s, catalog.has_unique_index, MASTER_TABLE, "flow_id")
    assert [ix.name for ix in with_catalog(s, catalog.indexes, "data_imports", "master_flow_id")] == []
    assert [ix.name for ix in with_catalog(s, catalog.indexes, "discovery_flows", "master_flow_id")] == [
        "ix_discovery_flows_master_flow_id"
    ]  # was there before: kept
    tables = {
        r["table_name"]
        for r in sql(s, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'migration'")
    }
    assert not tables & {"flowfix_quarantine", "flowfix_runs", "flowfix_changes"}

    # And up again: the same result as the first time.
    upgrade(s, "fix_master_flow_fk")
    assert links(s, "data_imports") == {ids["i1"]: ids["f1"], ids["i2"]: None, ids["i3"]: ids["f2"]}


def test_duplicate_flow_ids_stop_the_upgrade_with_the_values_and_change_nothing(settings: Settings) -> None:
    upgrade(settings, "legacy")
    dup = uuid.uuid4()
    for _ in range(2):
        sql(
            settings,
            "INSERT INTO crewai_flow_state_extensions (flow_id, client_account_id, engagement_id, flow_type)"
            " VALUES (:f, :c, :e, 'discovery')",
            {"f": dup, "c": C, "e": E},
        )
    m, _ = add_master(settings, client=C, engagement=E)
    i = add_import(settings, master=m)

    with pytest.raises(CommandError) as err:
        upgrade(settings, "fix_master_flow_fk")
    message = str(err.value)
    assert "duplicate flow_id" in message and str(dup) in message
    assert "\n" not in message
    assert revision(settings) == "legacy"
    assert links(settings, "data_imports") == {i: m}
    assert _constraints(settings, "data_imports") == {"data_imports_master_flow_id_fkey": (MASTER_TABLE, "id", True)}


def test_an_existing_unique_index_on_flow_id_is_reused(settings: Settings) -> None:
    upgrade(settings, "legacy")
    script(settings, "CREATE UNIQUE INDEX prod_flow_id_key ON crewai_flow_state_extensions (flow_id)")
    upgrade(settings, "fix_master_flow_fk")
    names = [ix.name for ix in with_catalog(settings, catalog.indexes, MASTER_TABLE, "flow_id")]
    assert names == ["prod_flow_id_key"]
    downgrade(settings, "legacy")
    names = [ix.name for ix in with_catalog(settings, catalog.indexes, MASTER_TABLE, "flow_id")]
    assert names == ["prod_flow_id_key"]


def test_upgrade_is_resumable_after_an_interrupted_concurrent_index_build(settings: Settings) -> None:
    """An INVALID index left by a failed CREATE INDEX CONCURRENTLY is rebuilt, not trusted."""
    upgrade(settings, "legacy")
    # Simulate the leftover: an index marked invalid under our name.
    script(
        settings,
        "CREATE INDEX ix_data_imports_master_flow_id ON data_imports (master_flow_id)",
        "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'ix_data_imports_master_flow_id'::regclass",
    )
    upgrade(settings, "fix_master_flow_fk")
    ix = with_catalog(settings, catalog.indexes, "data_imports", "master_flow_id")
    assert [(i.name, i.is_valid) for i in ix] == [("ix_data_imports_master_flow_id", True)]
