"""How long does live traffic stall while the FKs are repointed?

Builds a database of shape D (``deployed``: its FKs reference the master's id, so there is
something to repoint; on shape H they already reference flow_id; FLOWFIX_BENCH_SHAPE
overrides), default 20,000 imports x 50 = 1M raw records, copies it, and
on each copy runs one migration while a writer keeps inserting a master flow, an import
and five records per transaction (what the application does all day):

  flowfix  - revision fix_master_flow_fk (lock_timeout, NOT VALID, VALIDATE apart,
             CONCURRENTLY, short transactions)
  plan     - the plan's migration as written, in one transaction, plus the unique index
             on flow_id it needs to run at all (created the plain way)

Two scenarios per size: "quiet" (only the writer) and "reader" (a report query keeps a
transaction open on data_imports for --reader-seconds while the migration starts: the
classic lock queue, where a waiting ALTER TABLE blocks every writer behind it).

Prints the writer's longest stall and p99 latency and the migration's wall time, side
by side, with ratios. Run: python -m bench.migration_locks [--imports N ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import threading
import time
from collections.abc import Callable

from bench import common
from bench.common import Latencies, build_legacy_dataset, connect, fresh_database, ms, server, settings_for
from flowfix import alembic_runner

PLAN_MIGRATION = """
BEGIN;
-- prerequisite the plan forgets: a FK needs a unique index on the referenced column
CREATE UNIQUE INDEX crewai_flow_state_extensions_flow_id_key ON crewai_flow_state_extensions (flow_id);
ALTER TABLE data_imports DROP CONSTRAINT data_imports_master_flow_id_fkey;
ALTER TABLE raw_import_records DROP CONSTRAINT raw_import_records_master_flow_id_fkey;
ALTER TABLE data_imports ADD CONSTRAINT data_imports_master_flow_id_fkey
  FOREIGN KEY (master_flow_id) REFERENCES crewai_flow_state_extensions (flow_id) ON DELETE CASCADE;
ALTER TABLE raw_import_records ADD CONSTRAINT raw_import_records_master_flow_id_fkey
  FOREIGN KEY (master_flow_id) REFERENCES crewai_flow_state_extensions (flow_id);
ALTER TABLE discovery_flows ALTER COLUMN master_flow_id SET NOT NULL;
ALTER TABLE discovery_flows ADD CONSTRAINT discovery_flows_master_flow_id_fkey
  FOREIGN KEY (master_flow_id) REFERENCES crewai_flow_state_extensions (flow_id);
COMMIT;
"""


class Writer(threading.Thread):
    """Application traffic: one master + one import + five records per transaction."""

    def __init__(self, url: str, pause: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.url, self.pause = url, pause
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.latencies: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._loop())
        except BaseException as exc:  # noqa: BLE001 - reported by the caller
            self.error = exc

    async def _loop(self) -> None:
        writes = common.app_writes()
        conn = await connect(self.url)
        n = 0
        try:
            while not self.stop.is_set():
                n += 1
                t0 = time.perf_counter()
                await common.app_transaction(conn, writes)
                self.latencies.append(time.perf_counter() - t0)
                if n == 20:
                    self.ready.set()
                await asyncio.sleep(self.pause)
        finally:
            self.ready.set()
            await conn.close()


def run_plan(url: str) -> None:
    async def go() -> None:
        conn = await connect(url)
        try:
            await conn.execute(PLAN_MIGRATION)
        finally:
            await conn.close()

    asyncio.run(go())


class Reader(threading.Thread):
    """A long report: one transaction holding ACCESS SHARE on ``table``."""

    def __init__(self, url: str, seconds: float, table: str = "data_imports") -> None:
        super().__init__(daemon=True)
        self.url, self.seconds, self.table = url, seconds, table
        self.started = threading.Event()

    def run(self) -> None:
        async def go() -> None:
            conn = await connect(self.url)
            try:
                async with conn.transaction():
                    await conn.fetchval(f"SELECT count(*) FROM {self.table}")
                    self.started.set()
                    await asyncio.sleep(self.seconds)
            finally:
                self.started.set()
                await conn.close()

        asyncio.run(go())


def measure(
    url: str, migrate: Callable[[str], None], reader_seconds: float = 0.0, reader_table: str = "data_imports"
) -> tuple[float, Latencies, int]:
    writer = Writer(url)
    writer.start()
    writer.ready.wait(30)
    time.sleep(0.3)  # a baseline of normal latencies
    if reader_seconds:
        reader = Reader(url, reader_seconds, reader_table)
        reader.start()
        reader.started.wait(30)
    t0 = time.perf_counter()
    migrate(url)
    wall = time.perf_counter() - t0
    time.sleep(0.3)
    writer.stop.set()
    writer.join(30)
    if writer.error:
        raise writer.error
    return wall, Latencies(writer.latencies), len(writer.latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--imports", type=int, nargs="+", default=[5_000, 20_000], help="dataset sizes (imports; 50 records each)"
    )
    parser.add_argument(
        "--reader-seconds",
        type=float,
        default=8.0,
        help="how long the report transaction of the 'reader' scenario stays open",
    )
    parser.add_argument(
        "--reader-tables",
        nargs="+",
        default=["data_imports"],
        choices=["data_imports", "raw_import_records", "discovery_flows"],
        help="the child tables the 'reader' scenario's report holds open, one run each",
    )
    args = parser.parse_args()
    common.use_shape(os.environ.get("FLOWFIX_BENCH_SHAPE", "deployed"))
    print(
        "migration_locks: writer latency while the FKs are repointed (lower is better);"
        f" flowfix lock_timeout {settings_for('postgresql://x/y').lock_timeout}"
    )
    print(f"{'records':>10} {'scenario':<28} {'variant':<8} {'wall':>9} {'longest stall':>14} {'p99':>9} {'txns':>6}")
    with server() as srv:
        for imports in args.imports:
            template = fresh_database(srv, "bench_legacy")
            build_legacy_dataset(template, imports=imports)
            scenarios = [("quiet", 0.0, "")] + [
                (f"reader on {table}", args.reader_seconds, table) for table in args.reader_tables
            ]
            for scenario, reader, table in scenarios:
                rows = {}
                for variant, fn in (
                    ("flowfix", lambda u: alembic_runner.upgrade(settings_for(u), "fix_master_flow_fk")),
                    ("plan", run_plan),
                ):
                    url = fresh_database(srv, f"bench_{variant}", template="bench_legacy")
                    wall, lat, n = measure(url, fn, reader, table or "data_imports")
                    rows[variant] = (wall, lat)
                    print(
                        f"{imports * 50:>10,} {scenario:<28} {variant:<8} {wall:>8.2f}s {ms(lat.longest):>14}"
                        f" {ms(lat.p99):>9} {n:>6,}"
                    )
                (fw, fl), (pw, pl) = rows["flowfix"], rows["plan"]
                print(
                    f"{'':>10} {scenario:<28} {'plan/flowfix':<12} longest stall x{pl.longest / fl.longest:.1f},"
                    f" p99 x{pl.p99 / fl.p99:.1f}, wall x{pw / fw:.2f}"
                )


if __name__ == "__main__":
    main()
