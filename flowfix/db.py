"""The one engine and session factory every part of flowfix uses.

Each connection starts with ``search_path`` set to the configured schema (and nothing
else), so models, revisions and hand-written SQL name tables without a schema and still
land in ``FLOWFIX_SCHEMA``; a missing schema fails loudly instead of falling back to
``public``. ``application_name`` makes flowfix's sessions easy to spot in
``pg_stat_activity``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from flowfix.config import Settings, libpq_url, mask_url
from flowfix.errors import DatabaseUnavailable

CONNECT_TIMEOUT_S = 10
T = TypeVar("T")


def make_engine(settings: Settings, **kwargs: object) -> AsyncEngine:
    """Create the AsyncEngine for ``settings`` (asyncpg, search_path pinned to the schema)."""
    return create_async_engine(
        settings.require_url(),
        connect_args={
            "server_settings": {"search_path": settings.schema, "application_name": "flowfix"},
            "timeout": CONNECT_TIMEOUT_S,
        },
        pool_pre_ping=True,
        **kwargs,
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded attributes after commit (reports read them afterwards)."""
    return async_sessionmaker(engine, expire_on_commit=False)


def unavailable(settings: Settings, exc: BaseException) -> DatabaseUnavailable:
    """A one-line, password-free error for a connection failure."""
    detail = str(getattr(exc, "orig", None) or exc).strip()
    reason = detail.splitlines()[0] if detail else type(exc).__name__
    url = settings.url
    if url is not None and url.password:
        reason = reason.replace(url.password, "***")
    return DatabaseUnavailable(f"cannot connect to {mask_url(url) if url else 'database'}: {reason}")


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
    in its own event loop, and dispose of the engine afterwards."""

    async def go() -> T:
        engine = make_engine(settings)
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return asyncio.run(go())
