"""The linking service and `flowfix link` / `undo` / `runs`: atomic, idempotent,
tenant-safe, and undoable."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from flowfix import linking
from flowfix.cli import app
from flowfix.config import Settings
from flowfix.db import make_engine, make_sessionmaker, run_with_engine
from flowfix.linking import RequestContext
from tests.conftest import upgrade
from tests.helpers import add_import, add_master, add_record, cli_env, links, script, sql
from tests.test_validate import run_validate

CTX = RequestContext(uuid.uuid4(), uuid.uuid4(), "alice")
OTHER = RequestContext(uuid.uuid4(), uuid.uuid4(), "mallory")
runner = CliRunner()


@pytest.fixture
def settings(shaped_fixed: Settings) -> Settings:
    """Every linking test runs on each production shape (tests/shapes), at
    fix_master_flow_fk (where the linking service starts to work)."""
    return shaped_fixed


def with_session(settings: Settings, fn: Callable[[Any], Awaitable[Any]]) -> Any:
    async def go(engine: AsyncEngine) -> Any:
        async with make_sessionmaker(engine)() as session:
            return await fn(session)

    return run_with_engine(settings, go)


def new_import(s: Settings, ctx: RequestContext = CTX, records: int = 3) -> tuple[uuid.UUID, list[uuid.UUID]]:
    imp = add_import(s, master=None, client=ctx.client_account_id, engagement=ctx.engagement_id)
    return imp, [add_record(s, data_import=imp, master=None, row=n) for n in range(records)]


def count(s: Settings, table: str) -> int:
    return sql(s, f"SELECT count(*) AS n FROM {table}")[0]["n"]


async def start(engine: AsyncEngine, imp: uuid.UUID, ctx: RequestContext = CTX) -> uuid.UUID:
    async with make_sessionmaker(engine)() as session:
        return await linking.start_discovery_flow(session, data_import_id=imp, context=ctx)


@pytest.mark.asyncio
async def test_start_discovery_flow_links_everything_in_one_go(settings: Settings, engine: AsyncEngine) -> None:
    imp, records = new_import(settings)
    flow = await start(engine, imp)

    master = sql(
        settings,
        "SELECT flow_type, client_account_id, engagement_id, user_id,"
        " flow_configuration->>'import_id' AS cfg FROM crewai_flow_state_extensions"
        " WHERE flow_id = :f",
        {"f": flow},
    )
    assert master == [
        {
            "flow_type": "discovery",
            "client_account_id": CTX.client_account_id,
            "engagement_id": CTX.engagement_id,
            "user_id": "alice",
            "cfg": str(imp),
        }
    ]
    assert links(settings, "data_imports") == {imp: flow}
    assert links(settings, "raw_import_records") == {r: flow for r in records}
    assert sql(settings, "SELECT flow_id, master_flow_id, data_import_id FROM discovery_flows") == [
        {"flow_id": flow, "master_flow_id": flow, "data_import_id": imp}
    ]
    # Idempotent: a second call returns the same flow and creates nothing.
    assert await start(engine, imp) == flow
    assert (count(settings, "crewai_flow_state_extensions"), count(settings, "discovery_flows")) == (1, 1)


@pytest.mark.asyncio
async def test_twenty_concurrent_calls_create_exactly_one_flow(settings: Settings) -> None:
    imp, _ = new_import(settings, records=50)
    engine = make_engine(settings, pool_size=20, max_overflow=5)
    try:
        flows = set(await asyncio.gather(*(start(engine, imp) for _ in range(20))))
    finally:
        await engine.dispose()
    assert len(flows) == 1
    assert (count(settings, "crewai_flow_state_extensions"), count(settings, "discovery_flows")) == (1, 1)
    assert set(links(settings, "raw_import_records").values()) == flows


@pytest.mark.asyncio
async def test_another_tenant_is_refused_and_nothing_changes(settings: Settings, engine: AsyncEngine) -> None:
    imp, records = new_import(settings)
    with pytest.raises(linking.TenantMismatch):
        await start(engine, imp, OTHER)
    with pytest.raises(linking.ImportNotFound):
        await start(engine, uuid.uuid4())
    assert count(settings, "crewai_flow_state_extensions") == 0
    assert links(settings, "raw_import_records") == {r: None for r in records}


@pytest.mark.asyncio
async def test_a_failure_after_the_master_insert_leaves_nothing_behind(settings: Settings, engine: AsyncEngine) -> None:
    """A real failure inside the transaction: a trigger rejects the discovery flow insert."""
    imp, records = new_import(settings)
    script(
        settings,
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'injected'; END $$",
        "CREATE TRIGGER refuse BEFORE INSERT ON discovery_flows FOR EACH ROW EXECUTE FUNCTION refuse()",
    )
    with pytest.raises(Exception, match="injected"):
        await start(engine, imp)
    assert count(settings, "crewai_flow_state_extensions") == 0
    assert links(settings, "data_imports") == {imp: None}
    assert links(settings, "raw_import_records") == {r: None for r in records}


def test_after_enforce_the_service_works_and_validate_passes(settings: Settings) -> None:
    upgrade(settings, "head")
    made = []
    for ctx in (CTX, OTHER):
        for _ in range(3):
            imp, _ = new_import(settings, ctx)
            made.append(
                with_session(
                    settings, lambda s, i=imp, c=ctx: linking.start_discovery_flow(s, data_import_id=i, context=c)
                )
            )
    report = run_validate(settings)
    assert report.ok and {c.status for c in report.checks} == {"pass"}

    # a hard delete of a master is refused while its records and discovery flow point at
    # it (the application deletes softly; the legacy FKs protected them the same way)
    with pytest.raises(Exception, match="violates foreign key"):
        sql(settings, "DELETE FROM crewai_flow_state_extensions WHERE flow_id = :f", {"f": made[0]})
    assert count(settings, "data_imports") == 6
    assert count(settings, "raw_import_records") == 18
    assert count(settings, "discovery_flows") == 6
    assert run_validate(settings).ok


@pytest.mark.asyncio
async def test_inside_a_callers_transaction_a_refusal_leaves_it_usable(settings: Settings, engine: AsyncEngine) -> None:
    imp, _ = new_import(settings)
    async with make_sessionmaker(engine)() as session, session.begin():
        with pytest.raises(linking.TenantMismatch):
            await linking.start_discovery_flow(session, data_import_id=imp, context=OTHER)
        flow = await linking.start_discovery_flow(session, data_import_id=imp, context=CTX)
    assert links(settings, "data_imports") == {imp: flow}


# --- flowfix link / undo / runs ----------------------------------------------------------


def test_link_then_undo_from_the_cli(settings: Settings) -> None:
    imp, records = new_import(settings)
    _, flow = add_master(settings, client=CTX.client_account_id, engagement=CTX.engagement_id)

    result = runner.invoke(app, ["link", "--import", str(imp), "--flow", str(flow)], env=cli_env(settings))
    assert result.exit_code == 0, result.output
    assert f"linked import {imp} and 3 records to flow {flow}" in result.stdout
    assert links(settings, "raw_import_records") == {r: flow for r in records}
    run_id = sql(settings, "SELECT id FROM flowfix_runs WHERE command = 'link'")[0]["id"]
    assert sql(settings, "SELECT count(*) AS n FROM flowfix_changes WHERE run_id = :r", {"r": run_id}) == [{"n": 4}]

    # Somebody edits one record afterwards: undo leaves that one alone and says so.
    _, elsewhere = add_master(settings, client=CTX.client_account_id, engagement=CTX.engagement_id)
    sql(settings, "UPDATE raw_import_records SET master_flow_id = :f WHERE id = :r", {"f": elsewhere, "r": records[0]})
    result = runner.invoke(app, ["undo", str(run_id)], env=cli_env(settings))
    assert result.exit_code == 0, result.output
    assert "3 values reverted, 1 left alone" in result.stdout
    assert links(settings, "data_imports") == {imp: None}
    assert links(settings, "raw_import_records") == {records[0]: elsewhere, records[1]: None, records[2]: None}

    again = runner.invoke(app, ["undo", str(run_id)], env=cli_env(settings))
    assert again.exit_code == 0 and "already undone" in again.stdout
    listing = runner.invoke(app, ["runs"], env=cli_env(settings))
    assert listing.exit_code == 0
    assert [line.split()[1:3] for line in listing.stdout.splitlines()] == [["undo", "finished"], ["link", "undone"]]


def test_link_refusals_are_exit_2_one_line_and_change_nothing(settings: Settings) -> None:
    imp, _ = new_import(settings)
    _, foreign = add_master(settings, client=OTHER.client_account_id, engagement=OTHER.engagement_id)
    _, assessment = add_master(
        settings, client=CTX.client_account_id, engagement=CTX.engagement_id, flow_type="assessment"
    )
    _, mine = add_master(settings, client=CTX.client_account_id, engagement=CTX.engagement_id)
    _, mine2 = add_master(settings, client=CTX.client_account_id, engagement=CTX.engagement_id)
    cases = [
        (["--import", "nope", "--flow", str(mine)], "--import 'nope' is not a UUID"),
        (["--import", str(uuid.uuid4()), "--flow", str(mine)], "does not exist"),
        (["--import", str(imp), "--flow", str(uuid.uuid4())], "no master flow with flow_id"),
        (["--import", str(imp), "--flow", str(foreign)], "belong to different tenants"),
        (["--import", str(imp), "--flow", str(assessment)], "is a 'assessment' flow, not a discovery flow"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["link", *args], env=cli_env(settings))
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert links(settings, "data_imports") == {imp: None}
    assert sql(settings, "SELECT count(*) AS n FROM flowfix_runs") == [{"n": 0}]

    assert runner.invoke(app, ["link", "--import", str(imp), "--flow", str(mine)], env=cli_env(settings)).exit_code == 0
    refused = runner.invoke(app, ["link", "--import", str(imp), "--flow", str(mine2)], env=cli_env(settings))
    assert refused.exit_code == 2 and "already linked" in refused.stderr
    forced = runner.invoke(app, ["link", "--import", str(imp), "--flow", str(mine2), "--force"], env=cli_env(settings))
    assert forced.exit_code == 0
    assert links(settings, "data_imports") == {imp: mine2}


def test_link_before_the_fix_revision_says_what_to_do(shaped: Settings) -> None:
    result = runner.invoke(
        app, ["link", "--import", str(uuid.uuid4()), "--flow", str(uuid.uuid4())], env=cli_env(shaped)
    )
    assert result.exit_code == 2
    assert "run `flowfix upgrade fix_master_flow_fk` first" in result.stderr


def test_flowfix_link_places_a_tenantless_import_but_never_one_of_another_tenant(settings: Settings) -> None:
    """The backfill leaves an import without tenant "for a human": `flowfix link` is how
    the operator places it (its records follow); an import of another tenant is refused."""
    _, flow = add_master(settings, client=CTX.client_account_id, engagement=CTX.engagement_id)
    tenantless = add_import(settings, master=None)
    record = add_record(settings, data_import=tenantless, master=None)
    result = runner.invoke(app, ["link", "--import", str(tenantless), "--flow", str(flow)], env=cli_env(settings))
    assert result.exit_code == 0, result.output
    assert links(settings, "data_imports") == {tenantless: flow}
    assert links(settings, "raw_import_records") == {record: flow}
    foreign = add_import(settings, master=None, client=OTHER.client_account_id, engagement=OTHER.engagement_id)
    refused = runner.invoke(app, ["link", "--import", str(foreign), "--flow", str(flow)], env=cli_env(settings))
    assert refused.exit_code == 2 and "belong to different tenants" in refused.stderr
    assert links(settings, "data_imports")[foreign] is None
