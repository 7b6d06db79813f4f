"""The whole runbook at scale, with the application writing all along.

Builds the dataset on the production shape (shape H by default, ``FLOWFIX_BENCH_SHAPE``
picks another): ``--records`` records (default 1M; 5M and 10M are manual runs), 50 per
import, every import and record with ``master_flow_id`` NULL, each discovery flow naming
its import. Then, while a writer thread commits the application's transaction (a master,
an import, five records) in a loop, runs and times:

  upgrade fix_master_flow_fk, backfill --window 2h, validate, upgrade head

and prints each step (the revision's own steps from its log lines), the total, and the
writer's longest stall and p99 over the whole runbook.

Run: python -m bench.runbook [--records 1000000] [--jobs 1]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import logging
import time

from bench.common import SHAPE, Latencies, build_legacy_dataset, fresh_database, ms, server, settings_for
from bench.migration_locks import Writer
from flowfix import alembic_runner, backfill, validate
from flowfix.db import make_engine


class StepClock(logging.Handler):
    """Times the revisions' steps from their log lines ("step N: ...")."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.marks: list[tuple[float, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("step "):
            step, _, rest = message.partition(":")
            self.marks.append((time.perf_counter(), f"{step}:{rest.split(':')[0]}"[:44]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=1)
    args = parser.parse_args()
    imports = max(1, args.records // 50)

    with server() as srv:
        url = fresh_database(srv, "bench_runbook")
        t0 = time.perf_counter()
        build_legacy_dataset(url, imports=imports)
        print(
            f"runbook: {imports:,} imports, {imports * 50:,} records on shape {SHAPE.name}"
            f" (built in {time.perf_counter() - t0:.0f} s)"
        )
        settings = settings_for(url)
        clock = StepClock()
        logging.getLogger("flowfix").addHandler(clock)
        logging.getLogger("flowfix").setLevel(logging.INFO)

        writer = Writer(url)
        writer.start()
        writer.ready.wait(30)
        times: list[tuple[str, float]] = []

        def step(name: str, fn) -> object:  # type: ignore[no-untyped-def]
            started = time.perf_counter()
            out = fn()
            times.append((name, time.perf_counter() - started))
            return out

        try:
            start = time.perf_counter()
            clock.marks.clear()
            step("upgrade fix_master_flow_fk", lambda: alembic_runner.upgrade(settings, "fix_master_flow_fk"))
            revision_steps = [*list(clock.marks), (time.perf_counter(), "end")]

            async def run_backfill() -> backfill.Result:
                engine = make_engine(settings)
                try:
                    return await backfill.run(engine, settings, backfill.Options(window_seconds=7200, jobs=args.jobs))
                finally:
                    await engine.dispose()

            result = step("backfill --window 2h", lambda: asyncio.run(run_backfill()))

            async def run_validate() -> validate.Report:
                engine = make_engine(settings)
                try:
                    return await validate.validate(engine, settings, validate.Options(samples=0))
                finally:
                    await engine.dispose()

            report = step("validate", lambda: asyncio.run(run_validate()))
            step("upgrade head", lambda: alembic_runner.upgrade(settings, "head"))
            total = time.perf_counter() - start
        finally:
            writer.stop.set()
            writer.join(30)
        if writer.error:
            raise writer.error
        latencies = Latencies(writer.latencies)

        for name, seconds in times:
            print(f"  {name:<28} {seconds:>8.1f} s")
            if name.startswith("upgrade fix"):
                for (at, label), (nxt, _) in itertools.pairwise(revision_steps):
                    print(f"      {label:<44} {nxt - at:>8.1f} s")
            if name.startswith("backfill"):
                c = result.counts  # type: ignore[attr-defined]
                print(
                    f"      {c.raw_import_records:,} records, {c.data_imports:,} imports, {c.batches:,} batches,"
                    f" longest {c.longest_batch_ms:,.0f} ms; steps {c.seconds}"
                )
        print(f"  {'total':<28} {total:>8.1f} s")
        print(
            f"  validate ok: {report.ok}"  # type: ignore[attr-defined]
            " (the writer's own new imports and records have no master: orphans by design)"
        )
        print(
            f"  application writer: {len(latencies.samples):,} transactions, longest stall {ms(latencies.longest)},"
            f" p99 {ms(latencies.p99)}"
        )


if __name__ == "__main__":
    main()
