"""enforce_master_flow_not_null, the legacy revision's create-or-adopt, and deletes."""

from __future__ import annotations

import dataclasses
import uuid

import pytest
from alembic.util import CommandError

from flowfix import alembic_runner, catalog
from flowfix.config import Settings
from tests.conftest import downgrade, upgrade
from tests.helpers import (
    add_discovery_flow,
    add_import,
    add_master,
    add_record,
    links,
    plain_url,
    revision,
    script,
    sql,
    with_catalog,
)

C, E = uuid.uuid4(), uuid.uuid4()


def _nullable(s: Settings) -> bool:
    return with_catalog(s, catalog.columns, ["discovery_flows"])["discovery_flows"]["master_flow_id"]


def test_enforce_stops_with_a_count_while_rows_are_null_then_succeeds(shaped: Settings) -> None:
    settings = shaped  # on each production shape
    upgrade(settings, "fix_master_flow_fk")
    _, f1 = add_master(settings, client=C, engagement=E)
    d_null = [add_discovery_flow(settings, flow_id=uuid.uuid4(), master=None, client=C, engagement=E) for _ in range(3)]
    add_discovery_flow(settings, flow_id=f1, master=f1, client=C, engagement=E)

    with pytest.raises(CommandError) as err:
        upgrade(settings, "head")
    assert "3 discovery_flows rows still have master_flow_id NULL" in str(err.value)
    assert "flowfix backfill" in str(err.value)
    assert revision(settings) == "fix_master_flow_fk"
    assert _nullable(settings)
    assert (
        sql(
            settings, "SELECT conname FROM pg_constraint WHERE contype = 'c' AND conrelid = 'discovery_flows'::regclass"
        )
        == []
    )

    for d in d_null:
        _, f = add_master(settings, client=C, engagement=E)
        sql(settings, "UPDATE discovery_flows SET master_flow_id = :f WHERE id = :d", {"f": f, "d": d})
    upgrade(settings, "head")
    assert revision(settings) == alembic_runner.head()
    assert not _nullable(settings)
    # The helper CHECK is gone; the column's own NOT NULL does the work now.
    assert (
        sql(
            settings, "SELECT conname FROM pg_constraint WHERE contype = 'c' AND conrelid = 'discovery_flows'::regclass"
        )
        == []
    )
    with pytest.raises(Exception, match="null value"):
        add_discovery_flow(settings, flow_id=uuid.uuid4(), master=None, client=C, engagement=E)

    downgrade(settings, "fix_master_flow_fk")
    assert _nullable(settings)


def test_delete_rules_are_the_ones_the_replaced_fks_had(settings: Settings) -> None:
    """The legacy imports' FK cascaded, the records' did not, discovery flows had none: the
    FKs to flow_id keep exactly that, so a hard delete protects what it protected before."""
    upgrade(settings, "head")
    bare_id, bare_flow = add_master(settings, client=C, engagement=E)
    bare_import = add_import(settings, master=bare_flow, client=C, engagement=E)
    busy_id, busy_flow = add_master(settings, client=C, engagement=E)
    busy_import = add_import(settings, master=busy_flow, client=C, engagement=E)
    for n in range(3):
        add_record(settings, data_import=busy_import, master=busy_flow, row=n)

    sql(settings, "DELETE FROM crewai_flow_state_extensions WHERE id = :id", {"id": bare_id})
    assert links(settings, "data_imports") == {busy_import: busy_flow}  # the import cascaded away
    with pytest.raises(Exception, match="fk_raw_import_records_master_flow_id"):
        sql(settings, "DELETE FROM crewai_flow_state_extensions WHERE id = :id", {"id": busy_id})
    assert links(settings, "data_imports") == {busy_import: busy_flow}
    assert set(links(settings, "raw_import_records").values()) == {busy_flow}
    assert bare_import not in links(settings, "data_imports")


PRODUCTION_DDL = (
    # The application's own tables, with an extra column and its own version table.
    "CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)",
    "INSERT INTO alembic_version VALUES ('app_rev_42')",
    "CREATE TABLE crewai_flow_state_extensions (id uuid PRIMARY KEY DEFAULT gen_random_uuid(),"
    " flow_id uuid NOT NULL, client_account_id uuid NOT NULL, engagement_id uuid NOT NULL,"
    " user_id varchar(255), flow_type varchar(50) NOT NULL, flow_name varchar(255),"
    " flow_status varchar(50) NOT NULL DEFAULT 'initialized',"
    " flow_configuration jsonb NOT NULL DEFAULT '{}', flow_persistence_data jsonb NOT NULL DEFAULT '{}',"
    " created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now(),"
    " phase_state jsonb)",
    "CREATE TABLE data_imports (id uuid PRIMARY KEY, client_account_id uuid, engagement_id uuid,"
    " master_flow_id uuid REFERENCES crewai_flow_state_extensions (id) ON DELETE CASCADE,"
    " status varchar(50) NOT NULL DEFAULT 'pending', created_at timestamptz NOT NULL DEFAULT now())",
    "CREATE TABLE raw_import_records (id uuid PRIMARY KEY,"
    " data_import_id uuid NOT NULL REFERENCES data_imports (id) ON DELETE CASCADE,"
    " client_account_id uuid, engagement_id uuid,"
    " master_flow_id uuid REFERENCES crewai_flow_state_extensions (id), row_number integer NOT NULL)",
    "CREATE TABLE discovery_flows (id uuid PRIMARY KEY, flow_id uuid NOT NULL UNIQUE, master_flow_id uuid,"
    " data_import_id uuid REFERENCES data_imports (id), client_account_id uuid NOT NULL,"
    " engagement_id uuid NOT NULL, user_id varchar NOT NULL, flow_name varchar(255) NOT NULL,"
    " status varchar(20) DEFAULT 'active')",
)


def test_legacy_adopts_existing_tables_unchanged_and_downgrade_never_drops_them(settings: Settings) -> None:
    script(settings, *PRODUCTION_DDL)
    m, f = add_master(settings, client=C, engagement=E)
    i = add_import(settings, master=m, client=C, engagement=E)

    upgrade(settings, "legacy")
    assert revision(settings) == "legacy"
    assert sql(settings, "SELECT version_num FROM alembic_version") == [{"version_num": "app_rev_42"}]
    assert sql(settings, "SELECT kind FROM flowfix_schema_changes") == []  # adopted, nothing created

    upgrade(settings, "fix_master_flow_fk")
    assert sql(settings, "SELECT master_flow_id FROM data_imports") == [{"master_flow_id": f}]
    downgrade(settings, "base")
    assert revision(settings) is None
    assert sql(settings, "SELECT id, master_flow_id FROM data_imports") == [{"id": i, "master_flow_id": m}]
    assert sql(settings, "SELECT version_num FROM alembic_version") == [{"version_num": "app_rev_42"}]
    assert sql(settings, "SELECT to_regclass('flowfix_schema_changes') AS t") == [{"t": None}]


def test_legacy_refuses_to_adopt_tables_missing_a_column_and_names_it(settings: Settings) -> None:
    script(settings, *PRODUCTION_DDL, "ALTER TABLE raw_import_records DROP COLUMN master_flow_id")
    with pytest.raises(CommandError) as err:
        upgrade(settings, "legacy")
    assert "missing columns: raw_import_records.master_flow_id" in str(err.value)
    assert revision(settings) is None
    assert sql(settings, "SELECT to_regclass('flowfix_schema_changes') AS t") == [{"t": None}]


def test_legacy_refuses_a_partial_set_of_tables(settings: Settings) -> None:
    script(settings, PRODUCTION_DDL[2])
    with pytest.raises(CommandError, match="missing: data_imports, raw_import_records, discovery_flows"):
        upgrade(settings, "legacy")


def test_a_null_row_committed_during_enforce_undoes_the_check_and_stops(shaped: Settings) -> None:
    """The race the precondition cannot see: a writer's NULL row commits after the count,
    while the ADD CHECK waits for its lock. VALIDATE then fails; the CHECK is removed
    again and the revision stays at fix_master_flow_fk."""
    import asyncio
    import threading

    import asyncpg

    settings = shaped  # on each production shape
    upgrade(settings, "fix_master_flow_fk")
    inserted = threading.Event()

    def writer() -> None:
        async def go() -> None:
            conn = await asyncpg.connect(plain_url(settings), server_settings={"search_path": settings.schema})
            try:
                async with conn.transaction():
                    await conn.execute(
                        "INSERT INTO discovery_flows (id, flow_id, client_account_id, engagement_id, user_id, flow_name)"
                        " VALUES (gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), gen_random_uuid(), 'u', 'n')"
                    )
                    inserted.set()
                    await asyncio.sleep(1.0)
            finally:
                await conn.close()

        asyncio.run(go())

    t = threading.Thread(target=writer)
    t.start()
    inserted.wait(10)
    with pytest.raises(CommandError, match="written while enforcing; the CHECK was removed"):
        upgrade(settings, "head")
    t.join()
    assert revision(settings) == "fix_master_flow_fk"
    assert _nullable(settings)
    assert (
        sql(
            settings, "SELECT conname FROM pg_constraint WHERE contype = 'c' AND conrelid = 'discovery_flows'::regclass"
        )
        == []
    )


def test_orm_models_work_through_the_session_factory(settings: Settings) -> None:
    """The corrected models, used as an application would, on the migrated schema."""
    import asyncio

    from sqlalchemy import select
    from sqlalchemy.orm import selectinload

    from flowfix.db import make_engine, make_sessionmaker
    from flowfix.models import CrewAIFlowStateExtensions, DataImport, DiscoveryFlow, RawImportRecord

    upgrade(settings, "head")

    async def run() -> tuple[int, str, uuid.UUID]:
        engine = make_engine(settings)
        try:
            sessions = make_sessionmaker(engine)
            async with sessions() as s, s.begin():
                master = CrewAIFlowStateExtensions(
                    flow_id=uuid.uuid4(), client_account_id=C, engagement_id=E, flow_type="discovery"
                )
                imp = DataImport(
                    client_account_id=C,
                    engagement_id=E,
                    master_flow_id=master.flow_id,
                    records=[RawImportRecord(row_number=n, master_flow_id=master.flow_id) for n in range(3)],
                )
                s.add_all([master, imp])
                await s.flush()
                s.add(
                    DiscoveryFlow(
                        flow_id=master.flow_id,
                        master_flow_id=master.flow_id,
                        data_import_id=imp.id,
                        client_account_id=C,
                        engagement_id=E,
                    )
                )
            async with sessions() as s:
                loaded = (
                    await s.execute(
                        select(DataImport).options(
                            selectinload(DataImport.records), selectinload(DataImport.master_flow)
                        )
                    )
                ).scalar_one()
                flow = (
                    await s.execute(select(DiscoveryFlow).options(selectinload(DiscoveryFlow.master_flow)))
                ).scalar_one()
                return len(loaded.records), loaded.master_flow.flow_type, flow.master_flow.flow_id
        finally:
            await engine.dispose()

    n_records, flow_type, flow_master = asyncio.run(run())
    assert (n_records, flow_type) == (3, "discovery")
    assert sql(settings, "SELECT flow_id FROM crewai_flow_state_extensions") == [{"flow_id": flow_master}]


def test_enforce_giving_up_on_validate_removes_its_check_again(shaped: Settings) -> None:
    """VALIDATE gives up (a lock it cannot get: simulated by an event trigger raising
    lock_not_available for that one statement): the CHECK added just before must not stay,
    or new discovery flows without a master would be refused while the revision is not
    applied."""
    settings = dataclasses.replace(shaped, lock_retries=0)
    upgrade(settings, "fix_master_flow_fk")
    script(
        settings,
        "CREATE FUNCTION refuse_validate() RETURNS event_trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF current_query() LIKE '%VALIDATE CONSTRAINT ck_discovery_flows_master_flow_id_not_null%' THEN"
        " RAISE EXCEPTION 'canceling statement due to lock timeout' USING ERRCODE = '55P03'; END IF; END $$",
        "CREATE EVENT TRIGGER refuse_validate ON ddl_command_start EXECUTE FUNCTION refuse_validate()",
    )
    try:
        with pytest.raises(CommandError, match="gave up waiting for a table lock"):
            upgrade(settings, "head")
        assert revision(settings) == "fix_master_flow_fk"
        assert (
            sql(
                settings,
                "SELECT conname FROM pg_constraint WHERE conname = 'ck_discovery_flows_master_flow_id_not_null'",
            )
            == []
        )
    finally:
        script(settings, "DROP EVENT TRIGGER refuse_validate")
    upgrade(settings, "head")
    assert revision(settings) == alembic_runner.head()
