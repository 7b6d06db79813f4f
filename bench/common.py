"""Shared by all benchmarks: a server to run on, and a deterministic legacy dataset.

The dataset is built set-based in SQL (ids derived from md5 of a counter, so two builds
are identical), on a production shape (tests/shapes): shape H (``app_head``, what the
application's migrations build: no id defaults, no index on the records' import or
master columns) unless ``FLOWFIX_BENCH_SHAPE`` names another (``friendly``, the schema
flowfix's own ``legacy`` revision creates; ``deployed``). Master flows spread over several
tenants and months, one import per discovery master created within minutes of it, 50
raw records per import, and a discovery flow per master whose ``master_flow_id`` is its
``flow_id``. ``master_flow_id`` on imports and records is NULL: the production state the
issues describe ("always NULL").
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import asyncpg

from flowfix import alembic_runner, embedded
from flowfix.config import Settings, libpq_url, normalize_url
from flowfix.db import admin
from tests.shapes import SHAPES

TENANTS = 8  # client accounts, two engagements each
SHAPE = SHAPES[os.environ.get("FLOWFIX_BENCH_SHAPE", "app_head")]


def use_shape(name: str) -> None:
    """Switch the shape (a benchmark whose subject only exists on one shape)."""
    global SHAPE
    SHAPE = SHAPES[name]


#: the one user the shapes with a users table hold (data_imports.imported_by references it)
BENCH_USER = "00000000-0000-4000-8000-00000000a11c"


@contextmanager
def server() -> Iterator[str]:
    """DATABASE_URL's server if set (databases are created on it), else an embedded one."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    srv = embedded.start()
    try:
        yield srv.url
    finally:
        srv.stop()


def settings_for(url: str) -> Settings:
    return Settings(url=normalize_url(url), schema=SHAPE.schema, create_tables=True)


def app_writes() -> tuple[str, str, str]:
    """What the application writes in one transaction, on the current shape: a master, an
    import (``RETURNING id``) and five records of it (``$1``), every id supplied."""
    friendly = not SHAPE.files
    imported_by = "'bench'" if friendly else f"'{BENCH_USER}'::uuid"
    raw_type = "json" if SHAPE.name == "app_head" else "jsonb"
    return (
        "INSERT INTO crewai_flow_state_extensions (id, flow_id, client_account_id, engagement_id, user_id, flow_type)"
        " VALUES (gen_random_uuid(), gen_random_uuid(), md5('client-1')::uuid, md5('engagement-1-1')::uuid,"
        " 'bench', 'discovery')",
        "INSERT INTO data_imports (id, client_account_id, engagement_id, import_name, import_type, filename,"
        f" imported_by, status) VALUES (gen_random_uuid(), md5('client-1')::uuid, md5('engagement-1-1')::uuid,"
        f" 'live', 'csv', 'live.csv', {imported_by}, 'pending') RETURNING id",
        f"INSERT INTO raw_import_records (id, data_import_id, {SHAPE.position_column}, raw_data)"
        f" SELECT gen_random_uuid(), $1, r, CAST('{{}}' AS {raw_type}) FROM generate_series(1, 5) r",
    )


async def connect(url: str) -> asyncpg.Connection:
    """A plain asyncpg connection whose search_path is the shape's schema."""
    return await asyncpg.connect(url, server_settings={"search_path": SHAPE.schema})


def fresh_database(server_url: str, name: str, template: str | None = None) -> str:
    clause = f" TEMPLATE {template}" if template else ""
    asyncio.run(admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}{clause}"))
    return libpq_url(server_url, name)


DATASET_SQL = (
    # Master flows: one discovery master per import, plus one assessment flow in ten.
    """INSERT INTO crewai_flow_state_extensions
         (id, flow_id, client_account_id, engagement_id, user_id, flow_type, flow_name, flow_status,
          flow_configuration, created_at, updated_at)
       SELECT md5('master-id-' || g)::uuid, md5('master-flow-' || g)::uuid,
              md5('client-' || (g % {tenants}))::uuid, md5('engagement-' || (g % {tenants}) || '-' || (g % 2))::uuid,
              'user-' || (g % 50), CASE WHEN g % 10 = 9 THEN 'assessment' ELSE 'discovery' END,
              'Discovery ' || g, 'running', '{{}}'::jsonb,
              timestamptz '2026-01-01' + g * interval '11 minutes',
              timestamptz '2026-01-01' + g * interval '11 minutes'
       FROM generate_series(1, {masters}) AS g""",
    """INSERT INTO data_imports (id, client_account_id, engagement_id, master_flow_id, import_name, import_type,
                                filename, imported_by, status, created_at, updated_at)
       SELECT md5('import-' || g)::uuid,
              md5('client-' || (g % {tenants}))::uuid, md5('engagement-' || (g % {tenants}) || '-' || (g % 2))::uuid,
              NULL, 'Import ' || g, 'cmdb', 'import_' || g || '.csv', {imported_by}, 'completed',
              timestamptz '2026-01-01' + g * interval '11 minutes' - (g % 7) * interval '1 minute',
              timestamptz '2026-01-01' + g * interval '11 minutes'
       FROM generate_series(1, {imports}) AS g""",
    """INSERT INTO raw_import_records (id, data_import_id, client_account_id, engagement_id, master_flow_id,
                                      {position}, raw_data, created_at)
       SELECT md5('record-' || g || '-' || r)::uuid, md5('import-' || g)::uuid,
              md5('client-' || (g % {tenants}))::uuid, md5('engagement-' || (g % {tenants}) || '-' || (g % 2))::uuid,
              NULL, r,
              CAST(jsonb_build_object('hostname', 'host-' || g || '-' || r,
                                      'ip', '10.0.' || (r % 250) || '.' || (g % 250),
                                      'os', 'linux', 'owner', 'team-' || (g % 40)) AS {raw_type}),
              timestamptz '2026-01-01' + g * interval '11 minutes'
       FROM generate_series(1, {imports}) AS g, generate_series(1, {records_per_import}) AS r
       ORDER BY {record_order}""",
    """INSERT INTO discovery_flows (id, flow_id, master_flow_id, data_import_id, client_account_id, engagement_id,
                                   user_id, flow_name, status, created_at, updated_at)
       SELECT md5('discovery-' || g)::uuid, md5('master-flow-' || g)::uuid, md5('master-flow-' || g)::uuid,
              CASE WHEN g <= {imports} AND {discovery_names_import} THEN md5('import-' || g)::uuid END,
              md5('client-' || (g % {tenants}))::uuid, md5('engagement-' || (g % {tenants}) || '-' || (g % 2))::uuid,
              'user-' || (g % 50), 'Discovery ' || g, 'running',
              timestamptz '2026-01-01' + g * interval '11 minutes', timestamptz '2026-01-01' + g * interval '11 minutes'
       FROM generate_series(1, {masters}) AS g WHERE g % 10 <> 9""",
    "VACUUM ANALYZE",
)


def build_legacy_dataset(
    url: str,
    *,
    imports: int,
    records_per_import: int = 50,
    discovery_names_import: bool = True,
    scattered: bool = False,
) -> None:
    """The shape's tables (adopted by revision ``legacy``) plus the dataset, in the
    database at ``url``. With ``discovery_names_import=False`` no discovery flow names
    its import, so the only evidence left is time (what the plan's script relies on).
    Records are stored import by import, as the application writes them; ``scattered``
    interleaves every import's records over the whole table instead (record 1 of every
    import, then record 2 ...), the layout where each record needs its own ledger entry."""

    async def create() -> None:
        conn = await asyncpg.connect(url)
        try:
            for body in SHAPE.sql():
                await conn.execute(body)
        finally:
            await conn.close()

    asyncio.run(create())
    alembic_runner.upgrade(settings_for(url), "legacy")
    friendly = not SHAPE.files
    params = dict(
        tenants=TENANTS,
        imports=imports,
        masters=imports + imports // 9,
        records_per_import=records_per_import,
        discovery_names_import="TRUE" if discovery_names_import else "FALSE",
        imported_by="'user-' || (g % 50)" if friendly else f"'{BENCH_USER}'::uuid",
        position=SHAPE.position_column,
        raw_type="json" if SHAPE.name == "app_head" else "jsonb",
        record_order="r, g" if scattered else "g, r",
    )

    async def load() -> None:
        conn = await connect(url)
        try:
            for sql in DATASET_SQL:
                await conn.execute(sql.format(**params))
        finally:
            await conn.close()

    asyncio.run(load())


@dataclass
class Latencies:
    """Per-transaction latencies of a writer, in seconds."""

    samples: list[float]

    @property
    def longest(self) -> float:
        return max(self.samples) if self.samples else 0.0

    @property
    def p99(self) -> float:
        if len(self.samples) < 2:
            return self.longest
        return statistics.quantiles(self.samples, n=100)[98]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms"


def timed(fn, *args, **kwargs) -> float:  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - t0
