"""Planning only: how long ``flowfix backfill --dry-run`` takes to plan, and the client's
peak memory, at many imports (issue 21: <= 10 s at 200k imports, on both datasets).

Two datasets on the production shape (shape H unless FLOWFIX_BENCH_SHAPE says otherwise),
few records per import (the records are not what planning costs):

  time    no discovery flow names its import: time is the only evidence
  exact   every discovery flow names its import (exact:discovery_flow evidence)

Each is built once (deterministic ids), migrated to fix_master_flow_fk, and planned
``--repeat`` times (a dry run: the same planning call as a real run). Prints the seconds
of each plan, what it found, and the process's peak RSS (ru_maxrss).

Run: python -m bench.planning [--imports 200000] [--records 2] [--repeat 2]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time

from bench.common import SHAPE, build_legacy_dataset, fresh_database, server, settings_for
from flowfix import alembic_runner, backfill
from flowfix.db import run_with_engine


def plan_once(url: str) -> tuple[float, backfill.Result]:
    """One dry run, timed, through the CLI's own runner (run_with_engine)."""
    settings = settings_for(url)
    t0 = time.perf_counter()
    result = run_with_engine(
        settings, lambda engine: backfill.run(engine, settings, backfill.Options(window_seconds=7200, dry_run=True))
    )
    return time.perf_counter() - t0, result


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imports", type=int, default=200_000)
    parser.add_argument("--records", type=int, default=2, help="records per import")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    with server() as srv:
        for name, names_import in (("time", False), ("exact", True)):
            url = fresh_database(srv, f"bench_planning_{name}")
            t0 = time.perf_counter()
            build_legacy_dataset(
                url, imports=args.imports, records_per_import=args.records, discovery_names_import=names_import
            )
            alembic_runner.upgrade(settings_for(url), "fix_master_flow_fk")
            built = time.perf_counter() - t0
            version = asyncio.run(_version(url))
            print(
                f"planning: dataset {name} ({args.imports:,} imports x {args.records} records, shape {SHAPE.name},"
                f" {version}) built in {built:.0f} s; client RSS before planning {peak_rss_mb():.0f} MB"
            )
            for n in range(args.repeat):
                seconds, result = plan_once(url)
                p = result.plan
                print(
                    f"  plan {n + 1}: {seconds:6.2f} s  imports {len(p.import_links):,} {p.import_evidence()}"
                    f"  records {p.records_to_link:,}  ambiguous {len(p.ambiguous):,}  unmatched"
                    f" {len(p.unmatched):,}  peak RSS {peak_rss_mb():.0f} MB"
                )
                del result, p


async def _version(url: str) -> str:
    from bench.common import connect

    conn = await connect(url)
    try:
        return str(await conn.fetchval("SELECT 'PostgreSQL ' || current_setting('server_version')"))
    finally:
        await conn.close()


if __name__ == "__main__":
    main()
