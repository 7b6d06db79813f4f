"""Running a backfill: the run lock, starting or resuming the run, the steps in order.

A run that dies is resumed by the next one, which applies the stored plan of the imports
and continues the records walk where each range stopped, so the result is that of one
uninterrupted run; a finished run leaves nothing to do for the next.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from flowfix import catalog, ledger, privileges
from flowfix.backfill import outcome, steps
from flowfix.backfill.model import Counts, Link, Options, Plan, Reporter, Result, Silent
from flowfix.backfill.plan import CHANGED_SINCE_PLANNING, make_plan
from flowfix.batches import REPLICA_LAG, Throttle
from flowfix.config import Settings
from flowfix.db import connect
from flowfix.errors import RunInterrupted
from flowfix.estimate import estimate
from flowfix.models import CHILD_TABLES, MASTER_TABLE


async def run(engine: AsyncEngine, settings: Settings, opts: Options, reporter: Reporter | None = None) -> Result:
    """Plan and (unless ``opts.dry_run``) apply, resuming an interrupted run if any."""
    reporter = reporter or Silent()
    async with connect(engine, settings) as conn:
        async with conn.begin():
            await ledger.require_ledger(conn)
            await conn.run_sync(catalog.require_full_visibility, "the backfill")
            await conn.run_sync(catalog.require_not_part_done, "the backfill")
            if opts.dry_run:  # the same planning call as the real run: it would resume this one
                started = time.perf_counter()
                pending = await ledger.interrupted_run(conn, "backfill", opts.arguments())
                plan = await make_plan(conn, opts, pending.id if pending else None)
                guess = await estimate(conn, time.perf_counter() - started, plan.totals(), opts.jobs)
                resumes = pending.id if pending else None
                return Result(
                    resumes, True, opts.window_seconds, plan, None, resumed=pending is not None, estimate=guess
                )
            await privileges.require(conn, "backfill", "write", *(("masters",) if opts.create_missing_masters else ()))
        async with ledger.run_lock(conn):
            started = time.perf_counter()
            async with conn.begin():
                run_, plan = await _start_or_resume(conn, opts)
                await ledger.hold_run(conn, run_.id)
            counts = Counts(seconds={"plan": round(time.perf_counter() - started, 3)})
            try:
                left = await _apply(conn, engine, settings, opts, run_, plan, counts, reporter)
            except Exception as exc:
                raise RunInterrupted(
                    f"backfill run {run_.id} stopped part-way; the batches it committed stay (they are in the"
                    f" ledger): run `flowfix backfill` again with the same options to resume it, or"
                    f" `flowfix undo {run_.id}` to revert them",
                    run_.id,
                ) from exc
    return Result(run_.id, False, opts.window_seconds, plan, counts, resumed=run_.resumed, left=left)


async def _start_or_resume(conn: AsyncConnection, opts: Options) -> tuple[ledger.Run, Plan]:
    """A new run with its import plan stored, or the interrupted one, planned by the same
    call given what it stored (:func:`make_plan`): its pending links stand, those made
    stale since are marked skipped now, and orphans that appeared since are planned
    around them and stored."""
    run_ = await ledger.interrupted_run(conn, "backfill", opts.arguments())
    plan = await make_plan(conn, opts, run_.id if run_ else None)
    if run_ is None:
        run_ = ledger.Run(await ledger.start_run(conn, "backfill", opts.arguments()))
    else:
        await ledger.skip_pending_imports(conn, run_.id, plan.stale, CHANGED_SINCE_PLANNING)
    new_links = [link for link in plan.import_links if link.id not in plan.stored]
    await ledger.store_import_plan(conn, run_.id, [_stored(link) for link in new_links])
    return run_, plan


def _stored(link: Link) -> tuple[uuid.UUID, uuid.UUID, str, float | None]:
    return link.id, link.master_flow_id, link.evidence, link.distance_seconds


async def _apply(
    conn: AsyncConnection,
    engine: AsyncEngine,
    settings: Settings,
    opts: Options,
    run_: ledger.Run,
    plan: Plan,
    counts: Counts,
    reporter: Reporter,
) -> dict[str, int]:
    """The steps in order, then the outcome read back from the database: the rows in
    scope still NULL, per table."""
    throttle = Throttle(
        opts.max_replica_lag, opts.max_archive_backlog, (MASTER_TABLE, *CHILD_TABLES), reporter.paused, reporter.resumed
    )
    for blind in await throttle.probe(conn):  # said once, at start, and kept for the report
        reporter.note(f"throttle blind: {blind}")
    counts.blind = list(throttle.blind)

    async def tell(c: AsyncConnection, state: dict[str, object]) -> None:  # for `flowfix runs RUN`
        await ledger.note_live(c, run_.id, state)

    throttle.on_state = tell
    await tell(conn, throttle.state())
    ctx = steps.Context(conn, run_, opts, counts, reporter, throttle)
    with _lap(counts, "discovery_flows"):
        await steps.create_masters(ctx, plan)
        await steps.link_discovery_flows(ctx, plan)
    with _lap(counts, "data_imports"):
        await steps.link_imports(ctx, len(plan.import_links))
    with _lap(counts, "raw_import_records"):
        await steps.link_records(ctx, engine, settings, plan.records_to_link)
    counts.pauses = throttle.pauses
    lag = throttle.pauses.get(REPLICA_LAG, {})
    counts.replica_pauses, counts.replica_paused_seconds = int(lag.get("pauses", 0)), lag.get("seconds", 0.0)
    async with conn.begin():
        left = await outcome.read_back(conn, opts, plan)
        _whole_run(counts, await ledger.run_totals(conn, run_.id))
    summary = {**plan.summary(), **asdict(counts), **{f"left_{t}": n for t, n in left.items()}}
    async with conn.begin():  # commits synchronously: every batch before it is durable too
        await ledger.finish_run(conn, run_.id, "finished", summary)
    return left


def _whole_run(counts: Counts, totals: dict[str, int]) -> None:
    """What the run linked, from the ledger: every process that worked on it (a resumed
    run's own process may have done only the last part)."""
    counts.discovery_flows = totals.get("discovery_flows", 0)
    counts.data_imports = totals.get("data_imports", 0)
    counts.raw_import_records = totals.get("raw_import_records", 0)
    counts.masters_created = totals.get(MASTER_TABLE, 0)
    counts.skipped = totals.get(ledger.SKIPPED, 0)


@contextmanager
def _lap(counts: Counts, step: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    counts.seconds[step] = round(time.perf_counter() - started, 3)
