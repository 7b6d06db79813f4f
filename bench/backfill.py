"""flowfix backfill against the floor: one ``UPDATE ... FROM`` with and without a ledger.

Builds the dataset on the production shape (shape H by default: no index on the records'
``data_import_id`` or ``master_flow_id``; ``FLOWFIX_BENCH_SHAPE`` picks another), default
20,000 imports x 50 records = 1M records, time the only evidence; migrates it to
fix_master_flow_fk, and measures on identical copies, in one run:

  flowfix -j1   flowfix backfill --window 2h --jobs 1 (plan, ledger, batches, guards)
  flowfix -j2   the same with --jobs 2
  floor         records only: one UPDATE ... FROM linking every record to its import's
                master (imports already carry flowfix's links), one transaction
  floor+ledger  flowfix's own record link as one statement: the same, with the tenant
                check, also writing flowfix's ledger rows (one per import, with the record
                ids), as flowfix's batches do (bench.common.FLOOR_WITH_LEDGER)

Prints wall time, the records step's time and rows/s, the longest transaction, and the
ratio of flowfix's records throughput to the floor with a ledger (target: 0.9 or more).
``--curve N ...`` adds flowfix's cost per record at several sizes (target: flat within
+-20% from 5k to 200k imports).

Run: python -m bench.backfill [--imports N] [--curve 5000 20000 50000 200000]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.common import SHAPE, build_legacy_dataset, fresh_database, run_floor, server, settings_for
from flowfix import alembic_runner, backfill
from flowfix.db import make_engine


async def run_flowfix(url: str, jobs: int) -> tuple[float, backfill.Result]:
    settings = settings_for(url)
    engine = make_engine(settings)
    try:
        t0 = time.perf_counter()
        result = await backfill.run(engine, settings, backfill.Options(window_seconds=7200, jobs=jobs))
        return time.perf_counter() - t0, result
    finally:
        await engine.dispose()


def prepare(srv: str, imports: int, *, scattered: bool = False) -> None:
    url = fresh_database(srv, "bench_backfill_src")
    build_legacy_dataset(url, imports=imports, discovery_names_import=False, scattered=scattered)
    alembic_runner.upgrade(settings_for(url), "fix_master_flow_fk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imports", type=int, default=20_000)
    parser.add_argument("--curve", type=int, nargs="*", default=[], help="import counts for the cost-per-record curve")
    parser.add_argument(
        "--scattered", action="store_true", help="interleave every import's records over the table (see bench.common)"
    )
    args = parser.parse_args()

    with server() as srv:
        prepare(srv, args.imports, scattered=args.scattered)

        def copy(name: str) -> str:
            return fresh_database(srv, name, template="bench_backfill_src")

        rows = []
        results = {}
        for jobs in (1, 2):
            wall, result = asyncio.run(run_flowfix(copy(f"bench_backfill_j{jobs}"), jobs))
            assert result.counts is not None
            c = result.counts
            rows.append(
                (f"flowfix -j{jobs}", wall, c.raw_import_records, c.seconds["raw_import_records"], c.longest_batch_ms)
            )
            results[jobs] = result
        links = [(link.id, link.master_flow_id) for link in results[1].plan.import_links]
        for ledger in (False, True):
            seconds, linked = asyncio.run(run_floor(copy("bench_backfill_floor"), links, ledger=ledger))
            rows.append(("floor+ledger" if ledger else "floor", seconds, linked, seconds, seconds * 1000))

        layout = "scattered" if args.scattered else "import by import"
        print(f"backfill: {args.imports:,} imports x 50 records ({layout}) on shape {SHAPE.name}, window 2h")
        print(f"{'variant':<13} {'wall':>8} {'records':>10} {'records step':>13} {'records/s':>11} {'longest txn':>12}")
        for name, wall, records, step, longest in rows:
            print(
                f"{name:<13} {wall:>7.2f}s {records:>10,} {step:>12.2f}s {records / step:>11,.0f} {longest:>10,.0f} ms"
            )
        rate = {name: records / step for name, _, records, step, _ in rows}
        print(
            f"records throughput / floor+ledger: -j1 {rate['flowfix -j1'] / rate['floor+ledger']:.2f},"
            f" -j2 {rate['flowfix -j2'] / rate['floor+ledger']:.2f} (target >= 0.9)"
        )

        if args.curve:
            print("cost per record (flowfix -j1, fresh dataset per size):")
            costs = []
            for n in args.curve:
                prepare(srv, n)
                wall, res = asyncio.run(run_flowfix(copy("bench_backfill_j1"), 1))
                assert res.counts is not None
                per_record = res.counts.seconds["raw_import_records"] / max(1, res.counts.raw_import_records) * 1e6
                costs.append(per_record)
                print(
                    f"  {n:>7,} imports {n * 50:>10,} records  wall {wall:>7.2f}s  records step {per_record:5.1f} us"
                    f"/record  whole run {wall / (n * 50) * 1e6:5.1f} us/record  longest txn"
                    f" {res.counts.longest_batch_ms:,.0f} ms"
                )
            mean = sum(costs) / len(costs)
            print(
                f"  records step: from {min(costs) / mean - 1:+.0%} to {max(costs) / mean - 1:+.0%} of the mean"
                f" {mean:.1f} us/record (target: within +-20%); max/min {max(costs) / min(costs):.2f}"
            )


if __name__ == "__main__":
    main()
