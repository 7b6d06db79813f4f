"""The dry run's estimate against the real run, step by step.

For each size: builds the dataset on shape H (``--records`` records, 50 per import, every
link NULL, each discovery flow naming its import), migrates it to ``fix_master_flow_fk``,
runs ``backfill --dry-run`` (which prints the estimate) and then the real backfill, and
prints estimate and measured time per step with the error (target: within +-35%). It
also prints the write/read ratios that would have made the writing steps exact, which is
how flowfix/estimate.py's WRITE_READ_RATIO and IMPORT_ROW_RATIO were chosen.

Run: python -m bench.estimate [--records 1000000 5000000] [--jobs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench.common import SHAPE, build_legacy_dataset, fresh_database, server, settings_for
from flowfix import alembic_runner, backfill, estimate
from flowfix.config import Settings
from flowfix.db import make_engine


def run(settings: Settings, **options: Any) -> backfill.Result:
    async def go() -> backfill.Result:
        engine = make_engine(settings)
        try:
            return await backfill.run(engine, settings, backfill.Options(window_seconds=7200, **options))
        finally:
            await engine.dispose()

    return asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    rows: list[tuple[int, str, float, float]] = []
    with server() as srv:
        for records in args.records:
            imports = max(1, records // 50)
            url = fresh_database(srv, f"bench_estimate_{records}")
            t0 = time.perf_counter()
            build_legacy_dataset(url, imports=imports)
            settings = settings_for(url)
            alembic_runner.upgrade(settings, "fix_master_flow_fk")
            print(
                f"estimate: {imports:,} imports, {imports * 50:,} records on shape {SHAPE.name}"
                f" (built and migrated in {time.perf_counter() - t0:.0f} s)"
            )
            started = time.perf_counter()
            dry = run(settings, dry_run=True, jobs=args.jobs)
            dry_seconds = time.perf_counter() - started
            guess = dry.estimate
            assert guess is not None
            started = time.perf_counter()
            real = run(settings, jobs=args.jobs)
            real_seconds = time.perf_counter() - started
            assert real.counts is not None
            measured = {"planning": real.counts.seconds.get("plan", 0.0), **real.counts.seconds}
            print(
                f"  dry run {dry_seconds:.1f} s (calibration: {guess.seconds_per_page * 1e6:.1f} us per page,"
                f" {guess.rows_per_page:.1f} rows per page); real run {real_seconds:.1f} s"
            )
            print(f"  {'step':<20} {'rows':>10} {'estimate':>9} {'real':>9} {'error':>7}")
            for step in guess.steps:
                actual = measured.get(step.step, 0.0)
                error = (step.seconds - actual) / actual if actual else 0.0
                print(f"  {step.step:<20} {step.rows:>10,} {step.seconds:>8.1f}s {actual:>8.1f}s {error:>+7.0%}")
                rows.append((records, step.step, step.seconds, actual))
            total_real = sum(measured.get(s.step, 0.0) for s in guess.steps)
            error = (guess.seconds - total_real) / total_real if total_real else 0.0
            print(f"  {'total':<20} {'':>10} {guess.seconds:>8.1f}s {total_real:>8.1f}s {error:>+7.0%}")
            # the ratios that would have made the writing steps exact
            per_row = guess.seconds_per_page / guess.rows_per_page if guess.rows_per_page else 0.0
            records_step = next(s for s in guess.steps if s.step == "raw_import_records")
            walk = records_step.seconds - records_step.rows * estimate.WRITE_READ_RATIO * per_row / args.jobs
            if records_step.rows and per_row:
                fit = (measured["raw_import_records"] - walk) * args.jobs / (records_step.rows * per_row)
                imports_fit = measured["data_imports"] / (imports * per_row * fit) if fit > 0 else 0.0
                print(f"  exact WRITE_READ_RATIO here: {fit:.2f}; IMPORT_ROW_RATIO: {imports_fit:.2f}")


if __name__ == "__main__":
    main()
