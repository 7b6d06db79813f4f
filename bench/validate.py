"""How fast is `flowfix validate` against the floor of counting every row once?

On the benchmark dataset (default 20,000 imports x 50 = 1M records), migrated to
fix_master_flow_fk, measures in one run, warm, median of --repeat runs:

  floor    - SELECT count(*) over each of the four tables, as Postgres plans it (an
             index-only scan of the smallest index where the visibility map allows)
  heap     - the same counts with index-only scans off: one read of every row, the
             least any check that looks at a row's tenant columns must do
  validate - flowfix.validate.validate(), every check, samples included

once with the links still NULL (as in production before the backfill) and once with
every import and record linked (what the CI gate sees afterwards). Target: at most 2x.
Run: python -m bench.validate [--imports N] [--repeat K]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from bench.common import build_legacy_dataset, connect, fresh_database, server, settings_for
from flowfix import alembic_runner
from flowfix.db import make_engine
from flowfix.models import CHILD_TABLES, MASTER_TABLE
from flowfix.validate import Options, validate

LINK_ALL = (
    "UPDATE data_imports d SET master_flow_id = md5('master-flow-' || substr(d.import_name, 8))::uuid",
    "UPDATE raw_import_records r SET master_flow_id = d.master_flow_id FROM data_imports d WHERE d.id = r.data_import_id",
    "VACUUM ANALYZE",
)


async def floor(url: str, heap: bool = False) -> float:
    conn = await connect(url)
    try:
        if heap:
            await conn.execute("SET enable_indexonlyscan = off; SET enable_bitmapscan = off")
        t0 = time.perf_counter()
        for table in (MASTER_TABLE, *CHILD_TABLES):
            await conn.fetchval(f"SELECT count(*) FROM {table}")
        return time.perf_counter() - t0
    finally:
        await conn.close()


async def flowfix_validate(url: str) -> tuple[float, bool]:
    settings = settings_for(url)
    engine = make_engine(settings)
    try:
        t0 = time.perf_counter()
        report = await validate(engine, settings, Options())
        return time.perf_counter() - t0, report.ok
    finally:
        await engine.dispose()


async def link_all(url: str) -> None:
    conn = await connect(url)
    try:
        for sql in LINK_ALL:
            await conn.execute(sql)
    finally:
        await conn.close()


def runs_of(repeat: int, fn, *args):  # type: ignore[no-untyped-def]
    return [asyncio.run(fn(*args)) for _ in range(repeat + 1)][1:]  # the first run warms the cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imports", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with server() as srv:
        url = fresh_database(srv, "bench_validate")
        build_legacy_dataset(url, imports=args.imports)
        alembic_runner.upgrade(settings_for(url), "fix_master_flow_fk")
        print(f"validate: {args.imports * 50:,} records, median of {args.repeat} warm runs")
        print(f"{'state':<8} {'floor':>9} {'heap':>9} {'validate':>9} {'vs floor':>9} {'vs heap':>8}  report")
        for state in ("orphans", "linked"):
            if state == "linked":
                asyncio.run(link_all(url))
            floor_s = statistics.median(runs_of(args.repeat, floor, url))
            heap_s = statistics.median(runs_of(args.repeat, floor, url, True))
            runs = runs_of(args.repeat, flowfix_validate, url)
            val_s = statistics.median(t for t, _ in runs)
            print(
                f"{state:<8} {floor_s * 1000:>6.0f} ms {heap_s * 1000:>6.0f} ms {val_s * 1000:>6.0f} ms"
                f" {val_s / floor_s:>8.2f}x {val_s / heap_s:>7.2f}x  {'ok' if runs[0][1] else 'fails (as it should)'}"
            )


if __name__ == "__main__":
    main()
