"""The apply steps: one small unit per step, one short transaction per batch.

Every statement re-checks its guards against the rows as they are now (still NULL, same
tenant, master present), so an application's concurrent write always wins, and logs
what it changed to the ledger in the same statement.

The records step walks ``raw_import_records`` by physical ranges (TID Range Scan,
PostgreSQL 14+), joining each slice to its imports by primary key: no batch scans the
whole table, and no index but the primary keys is assumed (the application's schema has
none on ``data_import_id``). Older servers walk by primary key. A closing pass links the
records a physical walk cannot see (moved behind it, or added, by the application).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from flowfix import catalog, ledger
from flowfix.backfill.model import Counts, Options, Plan, Reporter
from flowfix.batches import BatchSizer, Throttle, timed
from flowfix.config import Settings
from flowfix.db import connect
from flowfix.evidence import Evidence
from flowfix.models import TENANT_SCOPE
from flowfix.tenancy import known_and_equal_sql, unknown_matches_sql

T = TypeVar("T")

RECORDS = "raw_import_records"
RECORD_TENANT_OK = unknown_matches_sql("r", "m")
#: TID Range Scans exist from PostgreSQL 14: before that a ctid slice is a full scan.
TID_RANGE_SCAN_VERSION = 140000

LINK_DISCOVERY_FLOWS = f"""
WITH todo AS (SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:masters AS uuid[])) AS x(id, master)),
changed AS (
    UPDATE discovery_flows t SET master_flow_id = todo.master
    FROM todo
    JOIN crewai_flow_state_extensions m ON m.flow_id = todo.master
    WHERE t.id = todo.id AND t.master_flow_id IS NULL
      AND {known_and_equal_sql("t", "m")}
    RETURNING t.id, todo.master
)
{ledger.LOG_LINKS}
"""

#: A master for each discovery flow of :ids that still has none, from the flow's own
#: columns; flowfix supplies the id (the application's schema has no default for it).
#: The planner's refusals are checked again, so a row changed since planning is skipped,
#: never an error.
CREATE_MASTERS = f"""
WITH todo AS (SELECT * FROM unnest(CAST(:ids AS uuid[])) AS x(id)),
created AS (
    INSERT INTO crewai_flow_state_extensions (id, flow_id, client_account_id, engagement_id, user_id, flow_type,
                                              flow_name, flow_status, flow_configuration)
    SELECT gen_random_uuid(), d.flow_id, d.client_account_id, d.engagement_id, d.user_id, 'discovery', d.flow_name,
           COALESCE(d.status, 'initialized'),
           jsonb_build_object('created_by', 'flowfix backfill', 'run_id', CAST(:run_text AS text))
    FROM discovery_flows d JOIN todo ON todo.id = d.id
    WHERE d.master_flow_id IS NULL
      AND (d.user_id IS NOT NULL OR NOT :need_user_id) AND (d.flow_name IS NOT NULL OR NOT :need_flow_name)
      AND NOT EXISTS (SELECT 1 FROM crewai_flow_state_extensions m WHERE m.flow_id = d.flow_id OR m.id = d.flow_id)
    RETURNING flow_id
)
{ledger.LOG_CREATED_MASTERS}
"""

#: Apply the next batch of the stored import plan. Every guard is checked again against
#: the rows as they are now: still NULL, same tenant, master present and not deleted,
#: and (time window) the master still not linked to another import.
APPLY_IMPORT_BATCH = f"""
WITH batch AS ({ledger.PENDING_IMPORT_LINKS}
), changed AS (
    UPDATE data_imports t SET master_flow_id = b.new_value
    FROM batch b
    JOIN crewai_flow_state_extensions m ON m.flow_id = b.new_value AND m.flow_status IS DISTINCT FROM 'deleted'
    WHERE t.id = b.row_id AND t.master_flow_id IS NULL
      AND {unknown_matches_sql("t", "m")}
      AND (b.evidence <> CAST(:ev_time_window AS text) OR NOT EXISTS (
           SELECT 1 FROM data_imports x WHERE x.master_flow_id = b.new_value AND x.id <> t.id))
    RETURNING b.change_id
), applied AS ({ledger.MARK_APPLIED}
), skipped AS ({ledger.MARK_SKIPPED}
)
SELECT (SELECT row_id FROM batch ORDER BY row_id DESC LIMIT 1) AS last_id,
       (SELECT count(*) FROM applied) AS applied, (SELECT count(*) FROM skipped) AS skipped
"""

#: How a record is linked, whichever walk found it: to its import's master, where the
#: record is still NULL, the import is in scope and the tenants agree (alias r: the
#: records' table, t: the import, m: its master).
_LINK_RECORD = f"""SET master_flow_id = t.master_flow_id
    FROM data_imports t JOIN crewai_flow_state_extensions m ON m.flow_id = t.master_flow_id
    WHERE r.master_flow_id IS NULL AND t.id = r.data_import_id AND {TENANT_SCOPE} AND {RECORD_TENANT_OK}"""

#: One physical slice, pages [:lo, :hi) of the leaf table {relation}.
LINK_RECORDS_SLICE = f"""
WITH changed AS (
    UPDATE {{relation}} r {_LINK_RECORD}
      AND r.ctid >= CAST(:lo AS tid) AND r.ctid < CAST(:hi AS tid)
    RETURNING r.id, r.data_import_id, r.master_flow_id
), logged AS ({ledger.LOG_RECORD_LINKS})
SELECT count(*) FROM changed
"""

#: One slice by primary key, after :after (servers without TID Range Scans).
LINK_RECORDS_BY_KEY = f"""
WITH slice AS (
    SELECT s.id FROM raw_import_records s
    WHERE CAST(:after AS uuid) IS NULL OR s.id > CAST(:after AS uuid)
    ORDER BY s.id LIMIT :limit
), changed AS (
    UPDATE raw_import_records r {_LINK_RECORD}
      AND r.id IN (SELECT id FROM slice)
    RETURNING r.id, r.data_import_id, r.master_flow_id
), logged AS ({ledger.LOG_RECORD_LINKS})
SELECT (SELECT id FROM slice ORDER BY id DESC LIMIT 1) AS last_id, (SELECT count(*) FROM changed) AS changed
"""

#: The closing pass: records still NULL that a linked import in scope would take: one
#: read, then batches by primary key over what it found.
RECORDS_LEFT = f"""
SELECT r.id FROM raw_import_records r
JOIN data_imports t ON t.id = r.data_import_id
JOIN crewai_flow_state_extensions m ON m.flow_id = t.master_flow_id
WHERE r.master_flow_id IS NULL AND {TENANT_SCOPE} AND {RECORD_TENANT_OK}
ORDER BY r.id
"""

LINK_RECORDS_BY_ID = f"""
WITH changed AS (
    UPDATE raw_import_records r {_LINK_RECORD}
      AND r.id = ANY(CAST(:ids AS uuid[]))
    RETURNING r.id, r.data_import_id, r.master_flow_id
), logged AS ({ledger.LOG_RECORD_LINKS})
SELECT count(*) FROM changed
"""


@dataclass
class Context:
    """What every step works with: one connection, the run, its options and counters."""

    conn: AsyncConnection
    run: ledger.Run
    opts: Options
    counts: Counts
    reporter: Reporter
    throttle: Throttle

    async def batch(self, sizer: BatchSizer, work: Callable[[AsyncConnection], Awaitable[T]], units: int) -> T:
        """One batch: wait while a health signal says so, then one timed, retried transaction."""
        await self.throttle.wait(self.conn)
        out = await timed(self.conn, sizer, self.opts.lock_retries, work, units)
        self.counts.batches += 1
        self.counts.longest_batch_ms = round(max(self.counts.longest_batch_ms, sizer.longest * 1000), 1)
        return out

    async def statement(self, sizer: BatchSizer, sql: str, params: dict[str, Any], units: int, fetch: str) -> Any:
        """One statement as one batch; ``fetch``: "all" rows, "one" row or a "scalar"."""

        async def work(c: AsyncConnection) -> Any:
            result = await c.execute(text(sql), params)
            return result.all() if fetch == "all" else result.one() if fetch == "one" else result.scalar_one()

        return await self.batch(sizer, work, units)

    def params(self, **extra: Any) -> dict[str, Any]:
        # evidence names are bound, never spelled in the SQL (flowfix.evidence)
        return {**Evidence.params(), **self.opts.scope, "run": self.run.id, **extra}


def _chunks(items: list[T], size: int) -> list[list[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def create_masters(ctx: Context, plan: Plan) -> None:
    """Step 1a (--create-missing-masters): the masters planned for discovery flows."""
    sizer = BatchSizer(ctx.opts.batch_size)
    for chunk in _chunks(plan.masters_to_create, sizer.size):
        params = ctx.params(run_text=str(ctx.run.id), ids=[c.discovery_flow_id for c in chunk], **plan.master_needs)
        made = await ctx.statement(sizer, CREATE_MASTERS, params, len(chunk), "all")
        ctx.counts.masters_created += len(made)


async def link_discovery_flows(ctx: Context, plan: Plan) -> None:
    """Step 1b: discovery flows to the master their own flow_id names."""
    ctx.reporter.start("discovery_flows", len(plan.discovery_links))
    sizer = BatchSizer(ctx.opts.batch_size)
    for chunk in _chunks(plan.discovery_links, sizer.size):
        params = ctx.params(
            ids=[link.id for link in chunk],
            masters=[link.master_flow_id for link in chunk],
            table_name="discovery_flows",
            evidence=Evidence.FLOW_ID.value,
        )
        done = await ctx.statement(sizer, LINK_DISCOVERY_FLOWS, params, len(chunk), "all")
        ctx.counts.discovery_flows += len(done)
        ctx.reporter.advance("discovery_flows", len(done))


async def link_imports(ctx: Context, total: int) -> None:
    """Step 2: the run's stored import plan, in row_id order."""
    ctx.reporter.start("data_imports", total)
    sizer = BatchSizer(ctx.opts.batch_size, start=min(ctx.opts.batch_size, 1000))
    after: uuid.UUID | None = None
    while True:
        params = ctx.params(after=after, limit=sizer.size)
        last_id, applied, skipped = await ctx.statement(sizer, APPLY_IMPORT_BATCH, params, sizer.size, "one")
        if last_id is None:
            return
        after = last_id
        ctx.counts.data_imports += applied
        ctx.counts.skipped += skipped
        ctx.reporter.advance("data_imports", applied)


# --- records -----------------------------------------------------------------------------


async def link_records(ctx: Context, engine: AsyncEngine, settings: Settings, total: int) -> None:
    """Step 3: the records walk (on ``jobs`` connections), then the closing pass."""
    ctx.reporter.start(RECORDS, total)
    async with ctx.conn.begin():
        leaves = await ctx.conn.run_sync(catalog.leaves, RECORDS)
        ranges = await ledger.walk_progress(ctx.conn, ctx.run.id)
        walk = ranges[0]["walk"] if ranges else ""
        if ranges is None:  # a new walk (a resumed one keeps the ranges it stored)
            walk = _choose_walk(ctx, await ctx.conn.run_sync(catalog.server_version))
            ranges = _plan_walk(ctx, walk, leaves)
            await ledger.start_walk(ctx.conn, ctx.run.id, ranges)
    ctx.counts.records_walk = walk
    known = {leaf.name for leaf in leaves}
    rows_per_page = max((leaf.rows_per_page for leaf in leaves), default=0.0)
    todo = [i for i, r in enumerate(ranges) if not r.get("done") and (r["walk"] == "key" or r["relation"] in known)]
    jobs = max(1, min(ctx.opts.jobs, len(todo)))
    ctx.counts.jobs = jobs
    sizer = _records_sizer(ctx, ranges, rows_per_page)
    queue = list(todo)

    async def worker(conn: AsyncConnection) -> None:
        mine = replace(ctx, conn=conn)
        while queue:
            index = queue.pop(0)
            if ranges[index]["walk"] == "ctid":
                await _walk_pages(mine, sizer, index, ranges[index])
            else:
                await _walk_keys(mine, sizer, index, ranges[index])

    async def extra_worker() -> None:
        async with connect(engine, settings) as conn:
            await worker(conn)

    await _all_or_nothing([worker(ctx.conn), *(extra_worker() for _ in range(jobs - 1))])
    await link_records_left(ctx)


def _choose_walk(ctx: Context, server_version: int) -> str:
    if ctx.opts.walk in ("ctid", "key"):
        return ctx.opts.walk
    return "ctid" if server_version >= TID_RANGE_SCAN_VERSION else "key"


def _plan_walk(ctx: Context, walk: str, leaves: list[catalog.Leaf]) -> list[dict[str, Any]]:
    """The ranges to walk: each leaf table's pages as they are now, cut into ``jobs``
    contiguous ranges (pages added later are the closing pass's); or, walking by key,
    one range over the whole table."""
    if walk == "key":
        return [{"walk": "key", "relation": RECORDS, "next": None}]
    ranges: list[dict[str, Any]] = []
    for leaf in leaves:
        parts = max(1, min(ctx.opts.jobs, leaf.pages))
        bounds = [leaf.pages * k // parts for k in range(parts + 1)]
        for start, end in itertools.pairwise(bounds):
            if end > start:
                ranges.append({"walk": "ctid", "relation": leaf.name, "start": start, "end": end, "next": start})
    return ranges


def _records_sizer(ctx: Context, ranges: list[dict[str, Any]], rows_per_page: float) -> BatchSizer:
    """Pages per slice (or rows, by key): about --batch-size rows at most (pages from the
    table's own rows per page, as the statistics have it; 20 when it has none); the first
    slice small, so the first measurement comes early."""
    if ranges and ranges[0]["walk"] == "key":
        return BatchSizer(ctx.opts.batch_size, start=min(ctx.opts.batch_size, 1000))
    per_page = rows_per_page if rows_per_page >= 1 else 20.0
    return BatchSizer(max(1, int(ctx.opts.batch_size / per_page)), start=8)


async def _walk_pages(ctx: Context, sizer: BatchSizer, index: int, part: dict[str, Any]) -> None:
    sql = LINK_RECORDS_SLICE.replace("{relation}", part["relation"])  # a leaf's name, from the catalog
    while part["next"] < part["end"]:
        lo = part["next"]
        hi = min(part["end"], lo + sizer.size)

        async def slice_(c: AsyncConnection, lo: int = lo, hi: int = hi) -> int:
            changed = (await c.execute(text(sql), ctx.params(lo=(lo, 0), hi=(hi, 0)))).scalar_one()
            await ledger.advance_walk(c, ctx.run.id, index, hi)
            return int(changed)

        changed = await ctx.batch(sizer, slice_, hi - lo)
        part["next"] = hi
        ctx.counts.raw_import_records += changed
        ctx.reporter.advance(RECORDS, changed)


async def _walk_keys(ctx: Context, sizer: BatchSizer, index: int, part: dict[str, Any]) -> None:
    after = uuid.UUID(part["next"]) if part["next"] else None
    while True:
        limit = sizer.size

        async def slice_(c: AsyncConnection, after: uuid.UUID | None = after, limit: int = limit) -> Any:
            last_id, changed = (await c.execute(text(LINK_RECORDS_BY_KEY), ctx.params(after=after, limit=limit))).one()
            at = str(last_id) if last_id is not None else part["next"]
            await ledger.advance_walk(c, ctx.run.id, index, at, done=last_id is None)
            return last_id, changed

        last_id, changed = await ctx.batch(sizer, slice_, limit)
        ctx.counts.raw_import_records += changed
        ctx.reporter.advance(RECORDS, changed)
        if last_id is None:
            return
        after = last_id
        part["next"] = str(last_id)


async def link_records_left(ctx: Context) -> None:
    """The closing pass over records still NULL whose import is linked: what the
    application moved behind the walk, or added after it began."""
    async with ctx.conn.begin():
        left = list((await ctx.conn.execute(text(RECORDS_LEFT), ctx.params())).scalars())
    sizer = BatchSizer(ctx.opts.batch_size, start=min(ctx.opts.batch_size, 1000))
    at = 0
    while at < len(left):
        ids = left[at : at + sizer.size]
        params = ctx.params(ids=ids)
        changed = await ctx.statement(sizer, LINK_RECORDS_BY_ID, params, len(ids), "scalar")
        at += len(ids)
        ctx.counts.raw_import_records += changed
        ctx.counts.records_final_pass += changed
        ctx.reporter.advance(RECORDS, changed)


# --- helpers -------------------------------------------------------------------------------


async def _all_or_nothing(work: list[Awaitable[None]]) -> None:
    """Run the workers together; the first failure stops the others and is raised (their
    committed batches stay, with their progress, for the resume)."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
