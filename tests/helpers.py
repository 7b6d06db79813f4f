"""Small helpers for tests: run SQL against a test database and read the catalog."""

from __future__ import annotations

import asyncio
import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import text
from sqlalchemy.pool import NullPool

from flowfix import catalog
from flowfix.config import Settings
from flowfix.db import make_engine


def sql(settings: Settings, statement: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Run one statement in its own committed transaction; return the rows as dicts."""

    async def run() -> list[dict[str, Any]]:
        engine = make_engine(settings, poolclass=NullPool)
        try:
            async with engine.begin() as conn:
                result = await conn.execute(text(statement), params or {})
                return [dict(r) for r in result.mappings()] if result.returns_rows else []
        finally:
            await engine.dispose()

    return asyncio.run(run())


def script(settings: Settings, *statements: str) -> None:
    for statement in statements:
        sql(settings, statement)


def with_catalog(settings: Settings, fn: Any, *args: Any) -> Any:
    """Call a flowfix.catalog function on a connection to the test database."""

    async def run() -> Any:
        engine = make_engine(settings, poolclass=NullPool)
        try:
            async with engine.connect() as conn:
                return await conn.run_sync(fn, *args)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def revision(settings: Settings) -> str | None:
    return with_catalog(settings, catalog.current_revision)


def links(settings: Settings, table: str) -> dict[uuid.UUID, uuid.UUID | None]:
    """``{row id: master_flow_id}`` of one table."""
    return {r["id"]: r["master_flow_id"] for r in sql(settings, f"SELECT id, master_flow_id FROM {table}")}


def add_master(settings: Settings, *, client: uuid.UUID, engagement: uuid.UUID, flow_type: str = "discovery",
               created_at: datetime | None = None) -> tuple[uuid.UUID, uuid.UUID]:
    """Insert a master flow; returns (id, flow_id), two different UUIDs as in production."""
    id_, flow_id = uuid.uuid4(), uuid.uuid4()
    sql(settings,
        "INSERT INTO crewai_flow_state_extensions (id, flow_id, client_account_id, engagement_id, flow_type, created_at)"
        " VALUES (:id, :flow_id, :c, :e, :t, :at)",
        {"id": id_, "flow_id": flow_id, "c": client, "e": engagement, "t": flow_type,
         "at": created_at or datetime(2026, 1, 1, tzinfo=timezone.utc)})
    return id_, flow_id


def add_import(settings: Settings, *, master: uuid.UUID | None, client: uuid.UUID | None = None,
               engagement: uuid.UUID | None = None) -> uuid.UUID:
    id_ = uuid.uuid4()
    sql(settings,
        "INSERT INTO data_imports (id, master_flow_id, client_account_id, engagement_id) VALUES (:id, :m, :c, :e)",
        {"id": id_, "m": master, "c": client, "e": engagement})
    return id_


def add_record(settings: Settings, *, data_import: uuid.UUID, master: uuid.UUID | None, row: int = 0) -> uuid.UUID:
    id_ = uuid.uuid4()
    sql(settings,
        "INSERT INTO raw_import_records (id, data_import_id, master_flow_id, row_number) VALUES (:id, :i, :m, :r)",
        {"id": id_, "i": data_import, "m": master, "r": row})
    return id_


def add_discovery_flow(settings: Settings, *, flow_id: uuid.UUID, master: uuid.UUID | None,
                       client: uuid.UUID, engagement: uuid.UUID,
                       data_import: uuid.UUID | None = None) -> uuid.UUID:
    id_ = uuid.uuid4()
    sql(settings,
        "INSERT INTO discovery_flows (id, flow_id, master_flow_id, data_import_id, client_account_id, engagement_id)"
        " VALUES (:id, :f, :m, :i, :c, :e)",
        {"id": id_, "f": flow_id, "m": master, "i": data_import, "c": client, "e": engagement})
    return id_
