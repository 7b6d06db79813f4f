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
