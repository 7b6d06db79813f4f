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
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from flowfix import alembic_runner, embedded, ledger
from flowfix.config import Settings, libpq_url, normalize_url
from flowfix.db import admin
from flowfix.evidence import Evidence
from flowfix.models import TENANT_SCOPE
from flowfix.tenancy import unknown_matches_sql
from tests.shapes import SHAPES

TENANTS = 8  # client accounts, two engagements each
SHAPE = SHAPES[os.environ.get("FLOWFIX_BENCH_SHAPE", "app_head")]


def use_shape(name: str) -> None:
    """Switch the shape (a benchmark whose subject only exists on one shape)."""
    global SHAPE
    SHAPE = SHAPES[name]


#: the one user the shapes with a users table hold (data_imports.imported_by references it)
BENCH_USER = "00000000-0000-4000-8000-00000000a11c"


@dataclass(frozen=True)
class Server:
    """A server to run on: its URL, its log file when the bench can read it, and whether
    the bench started it (then it may change the server's settings for the run)."""

    url: str
    log: Path | None
    owned: bool


@contextmanager
def server() -> Iterator[str]:
    """DATABASE_URL's server if set (databases are created on it), else an embedded one."""
    with bench_server() as srv:
        yield srv.url


@contextmanager
def bench_server(postgres: str = "") -> Iterator[Server]:
    """DATABASE_URL's server if set; else, with ``postgres="15"``, a throwaway cluster of
    the system's PostgreSQL 15 (as .ci/run starts it, default settings); else an
    embedded PostgreSQL 18."""
    if os.environ.get("DATABASE_URL") and not postgres:
        yield Server(os.environ["DATABASE_URL"], None, owned=False)
        return
    if postgres == "15":
        with system_postgres_15() as srv:
            yield srv
        return
    emb = embedded.start()
    try:
        yield Server(emb.url, emb.data_dir / "log", owned=True)
    finally:
        emb.stop()


@contextmanager
def system_postgres_15() -> Iterator[Server]:
    """Debian's postgresql-15 in a temporary directory on 127.0.0.1 (it refuses to run
    as root, so as the ``postgres`` user), stopped and removed afterwards."""
    listing = subprocess.run(["dpkg", "-L", "postgresql-15"], capture_output=True, text=True, check=True).stdout
    bindir = next(Path(line).parent for line in listing.splitlines() if line.endswith("/bin/initdb"))
    base = Path(tempfile.mkdtemp(prefix="flowfix-bench-pg15-"))
    shutil.chown(base, "postgres")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data, log = base / "data", base / "log"

    def as_postgres(*argv: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, stdout=subprocess.DEVNULL)

    as_postgres(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres")
    as_postgres(
        str(bindir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(log),
        "-w",
        "-o",
        f"-h 127.0.0.1 -p {port} -k {base}",
        "start",
    )
    try:
        yield Server(f"postgresql://postgres@127.0.0.1:{port}/postgres", log, owned=True)
    finally:
        as_postgres(str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(base, ignore_errors=True)


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


def fresh_database(server_url: str, name: str, template: str | None = None, *, file_copy: bool = False) -> str:
    """A new empty database ``name`` (or a copy of ``template``, which must have no other
    session); ``file_copy`` copies the files after a checkpoint instead of through the WAL
    (PostgreSQL 15+: much faster for a big template)."""
    clause = f" TEMPLATE {template}" if template else ""
    clause += " STRATEGY FILE_COPY" if template and file_copy else ""
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


async def app_transaction(conn: asyncpg.Connection, writes: tuple[str, str, str]) -> None:
    """The application's transaction (:func:`app_writes`): a master, an import, five records."""
    master, import_, records = writes
    async with conn.transaction():
        await conn.execute(master)
        imp = await conn.fetchval(import_)
        await conn.execute(records, imp)


# --- the floor: what flowfix's records step does, as one statement ----------------------------

#: The bare floor: every record takes its import's master, no guard, no ledger.
FLOOR = """UPDATE raw_import_records r SET master_flow_id = d.master_flow_id FROM data_imports d
WHERE d.id = r.data_import_id AND r.master_flow_id IS NULL AND d.master_flow_id IS NOT NULL"""

#: The floor for what flowfix does: flowfix's own record link (the master present, the
#: tenant check, the --client-account / --engagement scope) and its ledger rows (one per
#: import, with the record ids), over the whole table in one statement. Built from
#: flowfix's pieces, so it follows them.
FLOOR_WITH_LEDGER = f"""
WITH changed AS (
    UPDATE raw_import_records r SET master_flow_id = t.master_flow_id
    FROM data_imports t JOIN crewai_flow_state_extensions m ON m.flow_id = t.master_flow_id
    WHERE r.master_flow_id IS NULL AND t.id = r.data_import_id AND {TENANT_SCOPE} AND {unknown_matches_sql("r", "m")}
    RETURNING r.id, r.data_import_id, r.master_flow_id
), logged AS ({ledger.LOG_RECORD_LINKS})
SELECT count(*) FROM changed
"""


def positional(sql: str, params: dict[str, object]) -> tuple[str, list[object]]:
    """SQLAlchemy-style ``:name`` parameters as asyncpg's ``$n`` (``::`` casts untouched)."""
    names: list[str] = []

    def number(match: re.Match[str]) -> str:
        if match.group(1) not in names:
            names.append(match.group(1))
        return f"${names.index(match.group(1)) + 1}"

    out = re.sub(r"(?<![:\w]):([a-z_]+)\b", lambda m: number(m) if m.group(1) in params else m.group(0), sql)
    return out, [params[name] for name in names]


async def link_imports(conn: asyncpg.Connection, links: list[tuple[uuid.UUID, uuid.UUID]]) -> None:
    """Give the imports the masters flowfix linked them to (the state the records step
    starts from), then VACUUM ANALYZE them."""
    await conn.execute(
        "UPDATE data_imports d SET master_flow_id = x.flow FROM unnest($1::uuid[], $2::uuid[]) AS x(id, flow)"
        " WHERE d.id = x.id",
        [i for i, _ in links],
        [f for _, f in links],
    )
    await conn.execute("VACUUM ANALYZE data_imports")


async def run_floor(url: str, links: list[tuple[uuid.UUID, uuid.UUID]], *, ledger: bool = True) -> tuple[float, int]:
    """Link the imports as ``links`` say, then time the floor (with the ledger unless
    ``ledger=False``) in one transaction: (seconds, records linked)."""
    conn = await connect(url)
    try:
        await link_imports(conn, links)
        run_id = await conn.fetchval("INSERT INTO flowfix_runs (command) VALUES ('bench') RETURNING id")
        t0 = time.perf_counter()
        if ledger:
            sql, args = positional(
                FLOOR_WITH_LEDGER, {**Evidence.params(), "run": run_id, "client": None, "engagement": None}
            )
            await conn.fetchval(sql, *args)
        else:
            await conn.execute(FLOOR)
        seconds = time.perf_counter() - t0
        linked = await conn.fetchval("SELECT count(*) FROM raw_import_records WHERE master_flow_id IS NOT NULL")
        return seconds, int(linked)
    finally:
        await conn.close()
