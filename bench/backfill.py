"""flowfix backfill against the plan's Phase 3.1 script and against one big UPDATE.

Generates the legacy dataset (default 20,000 imports x 50 records = 1M records, masters
over 8 tenants and months; no discovery flow names its import, so time is the only
evidence, as the plan's script assumes), migrates it to fix_master_flow_fk, copies it,
and measures on identical copies, in one run:

  (a) flowfix  - flowfix backfill --window 2h (plan, ledger, batches, guards)
  (b) plan     - the plan's algorithm: per orphan import one nearest-flow query and two
                 updates, one transaction for everything (its abs() of an interval
                 fixed to abs(extract(epoch ...)) so that it runs), on the same schema,
                 which has the (tenant, created_at) index fix_master_flow_fk adds
  (b') plan-   - the same without that index, as the plan's own migration leaves it
  (c) floor    - records only: one UPDATE ... FROM linking every record to its import's
                 master, on a copy whose imports carry flowfix's links

Prints wall times, rows/s, the longest transaction, the ratios, and flowfix's cost at
several sizes (the growth curve). Run: python -m bench.backfill [--imports N] [--curve ...]
"""

from __future__ import annotations

import argparse
import asyncio
import time

from bench.common import build_legacy_dataset, connect, fresh_database, server, settings_for
from flowfix import backfill, schema
from flowfix.db import make_engine

PLAN_NEAREST = """
SELECT flow_id FROM crewai_flow_state_extensions
WHERE flow_type = 'discovery' AND client_account_id = $1 AND engagement_id = $2
  AND created_at >= $3::timestamptz - interval '2 hours' AND created_at <= $3::timestamptz + interval '2 hours'
ORDER BY abs(extract(epoch FROM (created_at - $3::timestamptz)))
LIMIT 1
"""


async def run_plan_script(url: str, without_index: bool = False) -> tuple[float, int, int]:
    """The plan's Phase 3.1 loop: one session, one transaction, three queries per orphan."""
    conn = await connect(url)
    try:
        if without_index:
            await conn.execute("DROP INDEX ix_crewai_flow_state_extensions_tenant_created")
        t0 = time.perf_counter()
        fixed = records = 0
        async with conn.transaction():
            orphans = await conn.fetch(
                "SELECT id, client_account_id, engagement_id, created_at FROM data_imports WHERE master_flow_id IS NULL"
            )
            for o in orphans:
                flow = await conn.fetchval(PLAN_NEAREST, o["client_account_id"], o["engagement_id"], o["created_at"])
                if flow is None:
                    continue
                await conn.execute("UPDATE data_imports SET master_flow_id = $1 WHERE id = $2", flow, o["id"])
                status = await conn.execute(
                    "UPDATE raw_import_records SET master_flow_id = $1 WHERE data_import_id = $2", flow, o["id"]
                )
                records += int(status.split()[-1])
                fixed += 1
        return time.perf_counter() - t0, fixed, records
    finally:
        await conn.close()


async def run_flowfix(url: str) -> tuple[float, backfill.Result]:
    settings = settings_for(url)
    engine = make_engine(settings)
    try:
        t0 = time.perf_counter()
        result = await backfill.run(engine, settings, backfill.Options(window_seconds=7200))
        return time.perf_counter() - t0, result
    finally:
        await engine.dispose()


async def run_floor(url: str, links: list[tuple[str, str]]) -> tuple[float, int]:
    conn = await connect(url)
    try:
        await conn.execute(
            "UPDATE data_imports d SET master_flow_id = x.flow FROM unnest($1::uuid[], $2::uuid[]) AS x(id, flow)"
            " WHERE d.id = x.id",
            [i for i, _ in links],
            [f for _, f in links],
        )
        await conn.execute("VACUUM ANALYZE data_imports")
        t0 = time.perf_counter()
        status = await conn.execute(
            "UPDATE raw_import_records r SET master_flow_id = d.master_flow_id FROM data_imports d"
            " WHERE d.id = r.data_import_id AND r.master_flow_id IS NULL AND d.master_flow_id IS NOT NULL"
        )
        return time.perf_counter() - t0, int(status.split()[-1])
    finally:
        await conn.close()


def prepare(srv: str, imports: int) -> None:
    url = fresh_database(srv, "bench_backfill_src")
    build_legacy_dataset(url, imports=imports, discovery_names_import=False)
    schema.upgrade(settings_for(url), "fix_master_flow_fk")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--imports", type=int, default=20_000)
    parser.add_argument(
        "--curve",
        type=int,
        nargs="*",
        default=[5_000, 10_000, 20_000],
        help="sizes (imports) for flowfix's growth curve",
    )
    args = parser.parse_args()
    with server() as srv:
        prepare(srv, args.imports)
        copy = lambda name: fresh_database(srv, name, template="bench_backfill_src")  # noqa: E731

        wall_a, result = asyncio.run(run_flowfix(copy("bench_backfill_a")))
        c = result.counts
        wall_b, fixed_b, records_b = asyncio.run(run_plan_script(copy("bench_backfill_b")))
        wall_b2, fixed_b2, records_b2 = asyncio.run(run_plan_script(copy("bench_backfill_b2"), without_index=True))
        links = [(link.id, link.master_flow_id) for link in result.plan.import_links]
        wall_c, records_c = asyncio.run(run_floor(copy("bench_backfill_c"), links))

        rec_a = c["seconds"]["raw_import_records"]
        print(f"backfill: {args.imports:,} imports x 50 records, window 2h")
        print(f"{'variant':<9} {'wall':>8} {'imports':>8} {'records':>10} {'records/s':>11} {'longest txn':>12}")
        print(
            f"{'flowfix':<9} {wall_a:>7.2f}s {c['data_imports']:>8,} {c['raw_import_records']:>10,}"
            f" {c['raw_import_records'] / rec_a:>11,.0f} {c['longest_batch_ms']:>9,.0f} ms"
        )
        print(
            f"{'plan':<9} {wall_b:>7.2f}s {fixed_b:>8,} {records_b:>10,} {records_b / wall_b:>11,.0f}"
            f" {wall_b * 1000:>9,.0f} ms"
        )
        print(
            f"{'plan-':<9} {wall_b2:>7.2f}s {fixed_b2:>8,} {records_b2:>10,} {records_b2 / wall_b2:>11,.0f}"
            f" {wall_b2 * 1000:>9,.0f} ms"
        )
        print(
            f"{'floor':<9} {wall_c:>7.2f}s {'-':>8} {records_c:>10,} {records_c / wall_c:>11,.0f}"
            f" {wall_c * 1000:>9,.0f} ms"
        )
        print(
            f"flowfix steps: {c['seconds']}; {c['batches']} batches;"
            f" ambiguous {c['ambiguous']}, unmatched {c['unmatched']}"
        )
        print(
            f"ratios: plan/flowfix wall x{wall_b / wall_a:.1f}, plan-/flowfix x{wall_b2 / wall_a:.1f};"
            f" flowfix record throughput / floor = {(c['raw_import_records'] / rec_a) / (records_c / wall_c):.2f}"
        )

        if args.curve:
            print("growth (flowfix, fresh dataset per size):")
            for n in args.curve:
                prepare(srv, n)
                wall, res = asyncio.run(run_flowfix(copy("bench_backfill_a")))
                print(
                    f"  {n:>7,} imports  {n * 50:>9,} records  {wall:>6.2f}s  {wall / n * 1000:.3f} ms per import"
                    f"  longest txn {res.counts['longest_batch_ms']:,.0f} ms"
                )


if __name__ == "__main__":
    main()
