"""The runbook through a real PgBouncer, as many production databases are reached.

Session pooling must work: a stock PgBouncer refuses unknown startup parameters, so
flowfix sets what it needs (search_path, lock_timeout, application_name) with
``set_config`` after connecting and checks that they hold. Transaction pooling cannot
keep a session's state (the run's advisory lock, those settings, asyncpg's prepared
statements): flowfix detects it and refuses in one line, changing nothing.

Skipped only when PgBouncer is not installed (CI installs it: .ci/run).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from flowfix.cli import Exit, app
from flowfix.config import Settings
from flowfix.db import run_with_engine
from tests import snapshot
from tests.conftest import upgrade
from tests.helpers import (
    add_discovery_flow,
    add_master,
    cli_env,
    orphans_by_time,
    revision,
    sql,
)
from tests.pgbouncer import SKIP_REASON, Bouncer, binary, pgbouncer

pytestmark = pytest.mark.skipif(binary() is None, reason=SKIP_REASON)

runner = CliRunner()
C, E = uuid.uuid4(), uuid.uuid4()


@pytest.fixture(scope="module")
def bouncers(pg_server: str) -> Iterator[Callable[[str], Bouncer]]:
    """``bouncer(mode)``: a PgBouncer in front of the test server, started once per mode."""
    started: dict[str, Bouncer] = {}
    with ExitStack() as stack:

        def bouncer(mode: str) -> Bouncer:
            if mode not in started:
                started[mode] = stack.enter_context(pgbouncer(pg_server, mode))
            return started[mode]

        yield bouncer


def broken(s: Settings) -> None:
    """Imports and records the backfill links by time, and a discovery flow linked by its
    flow_id (what upgrade head then enforces)."""
    orphans_by_time(s, 3, client=C, engagement=E)
    _, flow = add_master(s, client=C, engagement=E, created_at=datetime(2025, 6, 1, tzinfo=UTC))
    add_discovery_flow(s, flow_id=flow, master=None, client=C, engagement=E)


def cli(s: Settings, *args: str):  # type: ignore[no-untyped-def]
    return runner.invoke(app, list(args), env=cli_env(s))


def test_the_urls_options_reach_the_session_through_pgbouncer(
    settings: Settings, bouncers: Callable[[str], Bouncer]
) -> None:
    """libpq's ``options`` is a startup parameter a stock PgBouncer refuses; flowfix sets
    its settings after connecting instead (and application_name, which PgBouncer would
    pass, the same way)."""
    url = settings.require_url().update_query_dict({"options": "-c statement_timeout=5min", "application_name": "ops"})
    pooled = bouncers("session").settings(replace(settings, url=url))

    async def read(engine: AsyncEngine) -> list[str]:
        async with engine.connect() as conn:
            got = await conn.execute(
                text("SELECT current_setting('statement_timeout'), current_setting('application_name')")
            )
            return list(got.one())

    assert run_with_engine(pooled, read) == ["5min", "ops"]


def session_state(s: Settings) -> dict[str, str]:
    async def read(engine: AsyncEngine) -> dict[str, str]:
        async with engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT current_setting('search_path') AS search_path,"
                        " current_setting('lock_timeout') AS lock_timeout,"
                        " current_setting('application_name') AS application_name"
                    )
                )
            ).one()
            return dict(row._mapping)

    return run_with_engine(s, read)


def test_session_pooling_runs_the_runbook_with_flowfix_settings_in_force(
    shaped: Settings, bouncers: Callable[[str], Bouncer]
) -> None:
    """Every runbook shape (the schema differs: public or migration): upgrade, backfill,
    validate, upgrade head through PgBouncer; the settings flowfix relies on hold there."""
    pooled = bouncers("session").settings(shaped)
    assert session_state(pooled) == {
        "search_path": shaped.schema,
        "lock_timeout": shaped.lock_timeout,
        "application_name": "flowfix",
    }
    broken(shaped)
    for args in (("upgrade", "fix_master_flow_fk"), ("backfill",), ("validate",), ("upgrade", "head")):
        result = cli(pooled, *args)
        assert result.exit_code == Exit.OK, (args, result.output)
    assert revision(shaped) not in (None, "legacy", "fix_master_flow_fk")  # head, whatever its name
    for table in ("data_imports", "raw_import_records", "discovery_flows"):
        assert sql(shaped, f"SELECT count(*) AS n FROM {table} WHERE master_flow_id IS NULL") == [{"n": 0}]
    status = cli(pooled, "status")
    assert status.exit_code == Exit.OK, status.output
    assert f"schema {shaped.schema}" in status.output


@pytest.mark.parametrize(
    "args",
    [("status",), ("backfill",), ("upgrade", "head")],
    ids=["read", "write", "revision"],
)
def test_transaction_pooling_is_refused_in_one_line_changing_nothing(
    make_shape: Callable[..., Settings], bouncers: Callable[[str], Bouncer], args: tuple[str, ...]
) -> None:
    """One shape: the refusal comes when the engine's first connection opens, before any
    table is read, so it is the same on every shape and for every command; one command of
    each path to the database (a read, a run under the run lock, a revision through
    Alembic's env.py)."""
    s = make_shape("deployed")
    upgrade(s, "fix_master_flow_fk")
    broken(s)
    before = snapshot.take(s, flowfix_tables=True)
    result = cli(bouncers("transaction").settings(s), *args)
    assert result.exit_code == Exit.USAGE, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("flowfix: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert "transaction pooling" in lines[0] and "session pooling" in lines[0], lines[0]
    assert "direct connection" in lines[0], lines[0]
    assert snapshot.take(s, flowfix_tables=True) == before
