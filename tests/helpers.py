"""Small helpers for tests: run SQL against a test database and read the catalog."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.dialects.postgresql.asyncpg import dialect as asyncpg_dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from flowfix import catalog
from flowfix.config import Settings
from flowfix.db import run_with_engine

T = TypeVar("T")


def sql(settings: Settings, statement: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run one statement in its own committed transaction; return the rows as dicts.

    The statement is compiled the way flowfix's engine compiles ``text()`` (``:name``
    parameters) and runs on a connection kept open per database for the rest of the test
    (closed by the ``_close_sql_connections`` fixture), on one event loop in a thread of
    its own: about 1 ms a statement instead of a new engine, loop and connection (15 ms).
    Because that loop lives in another thread, ``sql()`` is safe to call from sync tests,
    from threads, and from async tests alike (no nested event loop)."""
    compiled = text(statement).compile(dialect=_DIALECT)
    values = [(params or {})[name] for name in compiled.positiontup or ()]
    return _on_loop(_fetch(settings, compiled.string, values))


_DIALECT = asyncpg_dialect()
_loop: asyncio.AbstractEventLoop | None = None
_connections: dict[tuple[str, str], Any] = {}


def _on_loop(coro: Coroutine[Any, Any, T]) -> T:
    global _loop
    if _loop is None:
        _loop = asyncio.new_event_loop()
        threading.Thread(target=_loop.run_forever, name="tests.helpers.sql", daemon=True).start()
    return asyncio.run_coroutine_threadsafe(coro, _loop).result()


async def _fetch(settings: Settings, statement: str, values: list[Any]) -> list[dict[str, Any]]:
    import asyncpg

    key = (plain_url(settings), settings.schema)
    conn = _connections.get(key)
    if conn is None or conn.is_closed():
        server_settings = {"search_path": settings.schema, "application_name": "flowfix-tests"}
        if settings.lock_timeout:
            server_settings["lock_timeout"] = settings.lock_timeout
        # no statement cache: tests change the schema under it (revisions, triggers)
        conn = await asyncpg.connect(key[0], server_settings=server_settings, statement_cache_size=0)
        # json values as flowfix's engine gives them (SQLAlchemy's asyncpg dialect): JSON
        # text in, Python objects out
        for kind in ("json", "jsonb"):
            await conn.set_type_codec(kind, encoder=str, decoder=json.loads, schema="pg_catalog")
        _connections[key] = conn
    async with conn.transaction():
        return [dict(r) for r in await conn.fetch(statement, *values)]


def close_connections(settings: Settings | None = None) -> None:
    """Close what :func:`sql` kept open: to one database (before it is copied: a template
    may have no other session), or all (after each test: its databases are dropped next)."""
    keys = [k for k in _connections if settings is None or k[0] == plain_url(settings)]

    async def close() -> None:
        for key in keys:
            conn = _connections.pop(key)
            if not conn.is_closed():
                conn.terminate()

    if _loop is not None and keys:
        _on_loop(close())


def script(settings: Settings, *statements: str) -> None:
    for statement in statements:
        sql(settings, statement)


def with_catalog(settings: Settings, fn: Any, *args: Any) -> Any:
    """Call a flowfix.catalog function on a connection to the test database."""

    async def run(engine: AsyncEngine) -> Any:
        async with engine.connect() as conn:
            return await conn.run_sync(fn, *args)

    return run_with_engine(settings, run)


def revision(settings: Settings) -> str | None:
    return with_catalog(settings, catalog.current_revision)


def links(settings: Settings, table: str) -> dict[uuid.UUID, uuid.UUID | None]:
    """``{row id: master_flow_id}`` of one table."""
    return {r["id"]: r["master_flow_id"] for r in sql(settings, f"SELECT id, master_flow_id FROM {table}")}


#: NOT NULL columns without a default (what an INSERT must supply), with their type and,
#: for a single-column FK, what they reference.
REQUIRED_COLUMNS_SQL = """
SELECT a.attname AS name, format_type(a.atttypid, a.atttypmod) AS type,
       (SELECT format('%I.%I', tn.nspname, tc.relname) || '.' || quote_ident(ta.attname)
        FROM pg_constraint c
        JOIN pg_class tc ON tc.oid = c.confrelid JOIN pg_namespace tn ON tn.oid = tc.relnamespace
        JOIN pg_attribute ta ON ta.attrelid = c.confrelid AND ta.attnum = c.confkey[1]
        WHERE c.conrelid = a.attrelid AND c.contype = 'f' AND c.conkey = ARRAY[a.attnum]
        LIMIT 1) AS refers_to
FROM pg_attribute a
WHERE a.attrelid = to_regclass(:table) AND a.attnum > 0 AND NOT a.attisdropped
  AND a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''
"""

_required: dict[tuple[str, str, str], list[dict[str, Any]]] = {}


def _filler(column: dict[str, Any]) -> tuple[str, Any]:
    """A SQL expression (and its parameter) for a required column the test left out."""
    kind = column["type"]
    if column["refers_to"]:
        table, col = column["refers_to"].rsplit(".", 1)
        return f"(SELECT {col} FROM {table} LIMIT 1)", None
    if kind == "uuid":
        return "", uuid.uuid4()
    if kind.startswith(("character", "text")):
        return "", "x"
    if kind in ("integer", "bigint", "smallint", "double precision"):
        return "", 0
    if kind in ("json", "jsonb"):
        return f"CAST('{{}}' AS {kind})", None
    if kind == "boolean":
        return "", False
    if kind.startswith("timestamp"):
        return "now()", None
    raise AssertionError(f"no test value for a required {kind} column {column['name']}")


def insert(settings: Settings, table: str, values: dict[str, Any]) -> None:
    """INSERT one row into ``table``, filling every NOT NULL column without a default that
    ``values`` leaves out (ids included: the application's schema has no id defaults), so
    the same test data goes into every production shape."""
    key = (str(settings.url), settings.schema, table)
    if key not in _required:
        _required[key] = sql(settings, REQUIRED_COLUMNS_SQL, {"table": table})
    columns, exprs, params = [], [], {}
    for name, value in values.items():
        columns.append(name)
        exprs.append(f":{name}")
        params[name] = value
    for column in _required[key]:
        if column["name"] in values:
            continue
        expr, value = _filler(column)
        columns.append(column["name"])
        if expr:
            exprs.append(expr)
        else:
            exprs.append(f":{column['name']}")
            params[column["name"]] = value
    sql(settings, f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(exprs)})", params)


_position: dict[tuple[str, str], str] = {}


def position_column(settings: Settings) -> str:
    """The records' position column: ``row_number`` or ``record_index`` depending on the shape."""
    key = (str(settings.url), settings.schema)
    if key not in _position:
        _position[key] = sql(
            settings,
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass("
            "'raw_import_records') AND attname IN ('row_number', 'record_index')",
        )[0]["attname"]
    return _position[key]


def add_master(
    settings: Settings,
    *,
    client: uuid.UUID,
    engagement: uuid.UUID,
    flow_type: str = "discovery",
    created_at: datetime | None = None,
) -> tuple[uuid.UUID, uuid.UUID]:
    """Insert a master flow; returns (id, flow_id), two different UUIDs as in production."""
    id_, flow_id = uuid.uuid4(), uuid.uuid4()
    insert(
        settings,
        "crewai_flow_state_extensions",
        {
            "id": id_,
            "flow_id": flow_id,
            "client_account_id": client,
            "engagement_id": engagement,
            "flow_type": flow_type,
            "created_at": created_at or datetime(2026, 1, 1, tzinfo=UTC),
        },
    )
    return id_, flow_id


def add_import(
    settings: Settings,
    *,
    master: uuid.UUID | None,
    client: uuid.UUID | None = None,
    engagement: uuid.UUID | None = None,
) -> uuid.UUID:
    id_ = uuid.uuid4()
    insert(
        settings,
        "data_imports",
        {
            "id": id_,
            "master_flow_id": master,
            "client_account_id": client,
            "engagement_id": engagement,
            "created_at": datetime.now(UTC),
        },
    )
    return id_


def add_record(settings: Settings, *, data_import: uuid.UUID, master: uuid.UUID | None, row: int = 0) -> uuid.UUID:
    id_ = uuid.uuid4()
    insert(
        settings,
        "raw_import_records",
        {
            "id": id_,
            "data_import_id": data_import,
            "master_flow_id": master,
            position_column(settings): row,
            "created_at": datetime.now(UTC),
        },
    )
    return id_


def orphans_by_time(
    settings: Settings, n: int, *, client: uuid.UUID, engagement: uuid.UUID
) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """``n`` orphan imports, a record each, that the backfill links by time: each created
    at its own master's moment (a day apart). Returns (import, flow_id) pairs."""
    from datetime import UTC, datetime

    made = []
    for k in range(n):
        _, flow = add_master(
            settings, client=client, engagement=engagement, created_at=datetime(2026, 1, 1 + k, tzinfo=UTC)
        )
        imp = add_import(settings, master=None, client=client, engagement=engagement)
        add_record(settings, data_import=imp, master=None, row=k)
        sql(
            settings,
            "UPDATE data_imports SET created_at = m.created_at FROM crewai_flow_state_extensions m"
            " WHERE data_imports.id = :i AND m.flow_id = :f",
            {"i": imp, "f": flow},
        )
        made.append((imp, flow))
    return made


def add_discovery_flow(
    settings: Settings,
    *,
    flow_id: uuid.UUID,
    master: uuid.UUID | None,
    client: uuid.UUID,
    engagement: uuid.UUID,
    data_import: uuid.UUID | None = None,
) -> uuid.UUID:
    id_ = uuid.uuid4()
    insert(
        settings,
        "discovery_flows",
        {
            "id": id_,
            "flow_id": flow_id,
            "master_flow_id": master,
            "data_import_id": data_import,
            "client_account_id": client,
            "engagement_id": engagement,
        },
    )
    return id_


def plain_url(settings: Settings) -> str:
    """The libpq-style URL (password included) of the test database, for asyncpg and
    for DATABASE_URL."""
    return settings.require_url().set(drivername="postgresql").render_as_string(hide_password=False)


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a flowfix command needs to reach this test database and schema."""
    return {"DATABASE_URL": plain_url(settings), "FLOWFIX_SCHEMA": settings.schema, **extra}


def hold_row_lock(settings: Settings, table: str, row_id: uuid.UUID, seconds: float) -> Any:
    """Another session locks one row (as an application transaction would) for up to
    ``seconds``; returns ``release()``, which ends it early and waits for the session."""
    import threading

    import asyncpg

    locked, done = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(plain_url(settings), server_settings={"search_path": settings.schema})
        try:
            async with conn.transaction():
                await conn.execute(f"SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE", row_id)
                locked.set()
                for _ in range(int(seconds * 20)):
                    if done.is_set():
                        break
                    await asyncio.sleep(0.05)
        finally:
            locked.set()
            await conn.close()

    holder = threading.Thread(target=lambda: asyncio.run(hold()))
    holder.start()
    locked.wait(10)

    def release() -> None:
        done.set()
        holder.join()

    return release


class Gate:
    """A handshake with a flowfix command at work, instead of slowing it down with sleeps.

    A real statement trigger on ``table`` makes the ``at``-th UPDATE statement on it wait
    for an advisory lock that this test holds (``lock_timeout`` lifted for that wait), so
    every statement before it has run and committed as it would, and the command is
    caught mid-run at a known point whatever the machine's speed. ``at`` may name several
    statements, each with its own lock: :meth:`wait` returns the pid of the backend parked
    at the ``point``-th of them; :meth:`open` lets it go on (``point`` None: all of them).
    Use as a context manager: leaving it opens every gate and removes the trigger."""

    KEY = 710017

    def __init__(self, settings: Settings, table: str, at: int | tuple[int, ...]) -> None:
        self.settings, self.table = settings, table
        self.at = (at,) if isinstance(at, int) else tuple(at)
        self._holder: Any = None
        self._held: set[int] = set()

    def __enter__(self) -> Gate:
        import asyncpg

        points = " ".join(
            f"WHEN {int(n)} THEN PERFORM set_config('lock_timeout', '0', true);"
            f" PERFORM pg_advisory_xact_lock({self.KEY + i});"
            for i, n in enumerate(self.at)
        )
        script(
            self.settings,
            "CREATE SEQUENCE flowfix_test_gate_seq",
            "CREATE FUNCTION flowfix_test_gate() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
            f" CASE nextval('flowfix_test_gate_seq') {points} ELSE NULL; END CASE; RETURN NULL; END $$",
            f"CREATE TRIGGER flowfix_test_gate BEFORE UPDATE ON {self.table}"
            " FOR EACH STATEMENT EXECUTE FUNCTION flowfix_test_gate()",
        )

        async def hold() -> Any:
            conn = await asyncpg.connect(plain_url(self.settings))
            for i in range(len(self.at)):
                await conn.execute(f"SELECT pg_advisory_lock({self.KEY + i})")
            return conn

        self._holder = _on_loop(hold())
        self._held = set(range(len(self.at)))
        return self

    def wait(self, timeout: float = 60, point: int = 0) -> int:
        """Block until a session waits at the ``point``-th gate; return its pid."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            rows = sql(
                self.settings,
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                " AND objid = :key AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                {"key": self.KEY + point},
            )
            if rows:
                return int(rows[0]["pid"])
            assert time.monotonic() < deadline, f"nothing reached the gate on {self.table} (statement {self.at[point]})"
            time.sleep(0.01)

    def open(self, point: int | None = None) -> None:
        if self._holder is None:
            return
        if point is None or self._held == {point}:
            holder, self._holder, self._held = self._holder, None, set()
            _on_loop(holder.close())
            return
        self._held.discard(point)
        _on_loop(self._holder.execute(f"SELECT pg_advisory_unlock({self.KEY + int(point)})"))

    def __exit__(self, *exc: object) -> None:
        self.open()
        script(
            self.settings,
            f"DROP TRIGGER IF EXISTS flowfix_test_gate ON {self.table}",
            "DROP FUNCTION IF EXISTS flowfix_test_gate()",
            "DROP SEQUENCE IF EXISTS flowfix_test_gate_seq",
        )


def wait_run_lock_released(settings: Settings, timeout: float = 60) -> None:
    """After a SIGKILL: wait until the server has ended the killed session and with it
    the run lock (the server notices a dead client on its own schedule)."""
    import time

    from flowfix import ledger

    deadline = time.monotonic() + timeout
    while sql(settings, ledger.RUN_LOCK_HELD, {"k": ledger.ADVISORY_LOCK_KEY})[0]["exists"]:
        assert time.monotonic() < deadline, "the killed session never ended"
        time.sleep(0.05)


def flowfix_process(settings: Settings, *args: str) -> subprocess.Popen[str]:
    """``flowfix *args`` in a process of its own against ``settings``' database (as an
    operator's second shell would run it), output piped as text."""
    from tests.conftest import ROOT

    return subprocess.Popen(
        [sys.executable, "-m", "flowfix", *args],
        env={**os.environ, **cli_env(settings)},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
