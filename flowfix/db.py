"""The one engine and session factory every part of flowfix uses.

Each connection starts with ``search_path`` set to the configured schema (and nothing
else), so models, revisions and hand-written SQL name tables without a schema and still
land in ``FLOWFIX_SCHEMA``; a missing schema fails loudly instead of falling back to
``public``. ``application_name`` makes flowfix's sessions easy to spot in
``pg_stat_activity``.

Connections are opened by asyncpg from a libpq-style DSN (``async_creator``), not from
keyword arguments SQLAlchemy derives from the URL: that is what makes ``sslmode``,
``sslrootcert``, ``?host=``, PG* variables and ``~/.pgpass`` work as they do with libpq.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

from sqlalchemy import URL, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from flowfix.config import ConnectArgs, Settings, connect_args, libpq_url, mask_url
from flowfix.errors import ConfigError, DatabaseUnavailable, FlowfixError, translate

T = TypeVar("T")


def make_engine(settings: Settings, **kwargs: Any) -> AsyncEngine:
    """Create the AsyncEngine for ``settings`` (asyncpg, search_path pinned to the schema)."""
    import asyncpg

    args = connect_args(settings.require_url(), settings.schema, settings.lock_timeout)
    probed: list[bool] = []  # the path to the server is checked once per engine

    async def connect() -> Any:
        conn = await asyncpg.connect(**args.kwargs())
        try:
            await start_session(conn, args, probe=not probed)
        except BaseException:
            conn.terminate()
            raise
        probed.append(True)
        return conn

    return create_async_engine(URL.create("postgresql+asyncpg"), async_creator=connect, pool_pre_ping=True, **kwargs)


#: Give the session flowfix's settings (``set_config(..., false)``: for the session, not
#: the transaction), and a probe value only this session holds; read back what took.
SESSION_SETUP_SQL = """
SELECT pg_backend_pid() AS pid,
       array_agg(set_config(s.name, s.value, false) ORDER BY s.n) AS took
FROM unnest(CAST($1 AS text[]), CAST($2 AS text[])) WITH ORDINALITY AS s(name, value, n)
"""
#: What a later transaction sees of the same settings and probe.
SESSION_STATE_SQL = """
SELECT pg_backend_pid() AS pid,
       array_agg(current_setting(s.name, true) ORDER BY s.n) AS took
FROM unnest(CAST($1 AS text[])) WITH ORDINALITY AS s(name, n)
"""
PROBE_SETTING = "flowfix.session_probe"

TRANSACTION_POOLING = (
    "DATABASE_URL goes through a connection pooler in transaction pooling (or statement pooling) mode: a session's"
    " state does not survive from one transaction to the next there ({evidence}), and flowfix holds its run"
    " lock and settings for the session. Use a direct connection to PostgreSQL, or a pool in session pooling"
    " mode (PgBouncer: pool_mode = session); nothing was changed"
)


async def start_session(conn: Any, args: ConnectArgs, *, probe: bool) -> None:
    """Set flowfix's session settings (search_path, lock_timeout, application_name and the
    URL's ``options``) with ``set_config`` after connecting, not as startup parameters,
    which PgBouncer refuses ("unsupported startup parameter") or, when told to ignore
    them, drops silently.

    ``probe``: also check that the session keeps them. A direct connection is recognised
    by the server's own process id (``pg_backend_pid()``) matching the one the server sent
    at connect time (BackendKeyData); a pooler sends its own. Through a pooler, a second
    connection looks for this session's probe value and the first reads its settings
    again in a new transaction: in transaction pooling the server connection was handed
    on (PgBouncer reuses the one released last), so the second connection sees the probe,
    or the first finds another backend or lost settings. Either refuses in one line.
    """
    import asyncpg

    names = [*args.session_settings, PROBE_SETTING]
    token = uuid.uuid4().hex
    values = [*args.session_settings.values(), token]
    try:
        first = await conn.fetchrow(SESSION_SETUP_SQL, names, values)
        if not probe or first["pid"] == conn.get_server_pid():
            return
        other = await asyncpg.connect(**args.kwargs(), statement_cache_size=0)
        try:
            seen = await other.fetchrow(SESSION_STATE_SQL, [PROBE_SETTING])
        finally:
            await other.close()
        again = await conn.fetchrow(SESSION_STATE_SQL, names)
    except asyncpg.InvalidSQLStatementNameError:  # a statement prepared on one server connection, run on another
        raise ConfigError(TRANSACTION_POOLING.format(evidence="a prepared statement vanished")) from None
    if seen["took"] == [token] or seen["pid"] == first["pid"]:
        evidence = "another connection was given this session's server process"
    elif again["pid"] != first["pid"] or list(again["took"]) != list(first["took"]):
        evidence = "the next transaction ran in another server process"
    else:
        return
    raise ConfigError(TRANSACTION_POOLING.format(evidence=evidence))


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (reports read them afterwards)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def unavailable(settings: Settings, exc: BaseException) -> FlowfixError:
    """A one-line error for a connection failure (flowfix.errors.translate); the URL shown
    is rendered from its parts without the password (driver messages never carry it: it
    is passed apart)."""
    translated = translate(exc, mask_url(settings.url))
    if translated is not None:
        return translated
    detail = str(getattr(exc, "orig", None) or exc).strip()
    reason = detail.splitlines()[0] if detail else type(exc).__name__
    return DatabaseUnavailable(f"cannot connect to {mask_url(settings.url)}: {reason}")


@asynccontextmanager
async def connect(engine: AsyncEngine, settings: Settings) -> AsyncIterator[AsyncConnection]:
    """Open a connection, turning "could not connect" into :class:`DatabaseUnavailable`."""
    try:
        conn = await engine.connect()
    except Exception as exc:  # noqa: BLE001 - nothing of ours ran yet: any failure is "can't connect"
        raise unavailable(settings, exc) from None
    try:
        await conn.execute(text("SELECT 1"))
        await conn.rollback()  # leave no transaction open: callers choose their own
        yield conn
    finally:
        await conn.close()


async def admin(server_url: str, *statements: str) -> None:
    """Run statements that cannot run in a transaction (CREATE/DROP DATABASE) on the
    server's ``postgres`` database, one by one."""
    import asyncpg

    conn = await asyncpg.connect(libpq_url(server_url, "postgres"))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def run_with_engine(settings: Settings, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    """From synchronous code (the CLI, the demo): run ``work(engine)`` on a fresh engine
    in its own event loop, and dispose of the engine afterwards.

    The answer is handed over beside the task, never as its result: on Python 3.11,
    ``asyncio.run`` restoring the SIGINT handler formats the main task's repr, result
    included (``signal.getsignal`` builds a ValueError message from it), so a backfill
    plan of 200k imports returned as the result cost about 0.6 s and 200 MB of repr."""
    answer: list[T] = []

    async def go() -> None:
        engine = make_engine(settings)
        try:
            answer.append(await work(engine))
        finally:
            await engine.dispose()

    asyncio.run(go())
    return answer[0]


#: The server settings that end a session flowfix holds, as a lost connection's likely cause.
SESSION_TIMEOUTS_SQL = """
SELECT current_user::text AS role,
       current_setting('idle_in_transaction_session_timeout') AS idle_in_transaction,
       current_setting('idle_session_timeout') AS idle_session
"""


def session_timeouts(settings: Settings) -> str | None:
    """After a lost connection: the timeouts set for flowfix's role or database that may
    have ended the session (the server's reason is not always delivered before it closes
    the socket), as words for the operator; None when none is set or the server cannot
    be asked (best effort, a few seconds at most)."""
    import asyncpg

    async def ask() -> str | None:
        args = connect_args(settings.require_url(), settings.schema).kwargs()
        args["timeout"] = min(float(args["timeout"]), 3.0)
        conn = await asyncpg.connect(**args)
        try:
            row = await asyncio.wait_for(conn.fetchrow(SESSION_TIMEOUTS_SQL), 3.0)
        finally:
            await conn.close()
        set_ = [
            (name, value)
            for name, value in (
                ("idle_in_transaction_session_timeout", row["idle_in_transaction"]),
                ("idle_session_timeout", row["idle_session"]),
            )
            if value not in ("0", "0ms")
        ]
        if not set_:
            return None
        which = " and ".join(f"{name} is {value}" for name, value in set_)
        fix = "; ".join(f"ALTER ROLE {row['role']} SET {name} = '10min'" for name, _ in set_)
        return f"{which} for role {row['role']}: if that ended the session, raise it ({fix}) and rerun"

    try:
        return asyncio.run(ask())
    except Exception:  # noqa: BLE001 - a hint only: the error line stands without it
        return None
