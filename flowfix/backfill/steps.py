"""The apply steps: one small unit per step, one short transaction per batch.

Every statement re-checks its guards against the rows as they are now (still NULL, same
tenant, master present), so an application's concurrent write always wins, and logs
what it changed to the ledger in the same statement.

The records step is one :class:`flowfix.walk.Walk` (physical ranges where the server has
TID Range Scans, by key otherwise, then the closing pass), joining each slice to its
imports by primary key: no batch scans the whole table, and no index but the primary
keys is assumed (the application's schema has none on ``data_import_id``).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from flowfix import ledger, walk
from flowfix.backfill.model import Counts, Options, Plan, Reporter
from flowfix.batches import BatchSizer, Throttle, timed
from flowfix.config import Settings
from flowfix.db import connect
from flowfix.evidence import Evidence
from flowfix.models import TENANT_SCOPE
from flowfix.tenancy import known_and_equal_sql, unknown_matches_sql
from flowfix.walk import Walk

T = TypeVar("T")

RECORDS = "raw_import_records"
RECORD_TENANT_OK = unknown_matches_sql("r", "m")

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
#: never an error; a master the application creates meanwhile with the same flow_id wins
#: (ON CONFLICT DO NOTHING: no unique violation, no master of flowfix's, nothing logged).
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
    ON CONFLICT DO NOTHING
    RETURNING flow_id
)
{ledger.LOG_CREATED_MASTERS}
"""

#: Apply the next batch of the stored import plan. Every guard is checked again against
#: the rows as they are now: still NULL, same tenant, master present and not deleted,
#: and (time window) the master still not linked to another import, nor claimed by an
#: earlier link of the same batch.
APPLY_IMPORT_BATCH = f"""
WITH pending AS ({ledger.PENDING_IMPORT_LINKS}
), batch AS (
    -- one master per time-window import within this statement too: the NOT EXISTS below
    -- reads the statement's snapshot and cannot see a sibling row of the same batch, so
    -- a time link goes ahead only as its master's first claim here (exact links first)
    SELECT p.*, row_number() OVER (PARTITION BY p.new_value
                                   ORDER BY p.evidence = CAST(:ev_time_window AS text), p.row_id) AS claim
    FROM pending p
), changed AS (
    UPDATE data_imports t SET master_flow_id = b.new_value
    FROM batch b
    JOIN crewai_flow_state_extensions m ON m.flow_id = b.new_value AND m.flow_status IS DISTINCT FROM 'deleted'
    WHERE t.id = b.row_id AND t.master_flow_id IS NULL
      AND {unknown_matches_sql("t", "m")}
      AND (b.evidence <> CAST(:ev_time_window AS text) OR (b.claim = 1 AND NOT EXISTS (
           SELECT 1 FROM data_imports x WHERE x.master_flow_id = b.new_value AND x.id <> t.id)))
    RETURNING b.change_id
), applied AS ({ledger.MARK_APPLIED}
), skipped AS ({ledger.MARK_SKIPPED}
)
SELECT (SELECT row_id FROM batch ORDER BY row_id DESC LIMIT 1) AS last_id,
       (SELECT count(*) FROM applied) AS applied, (SELECT count(*) FROM skipped) AS skipped
"""

#: How a record is linked, whichever batch of the walk finds it: to its import's master,
#: where the record is still NULL, the import is in scope and the tenants agree (alias r:
#: the records' table, t: the import, m: its master). One :class:`flowfix.walk.Walk`: the
#: pages, keys and closing pass all run this statement.
RECORDS_WALK = Walk(
    RECORDS,
    work=f"""
WITH changed AS (
    UPDATE {{table}} r SET master_flow_id = t.master_flow_id
    FROM data_imports t JOIN crewai_flow_state_extensions m ON m.flow_id = t.master_flow_id
    WHERE r.master_flow_id IS NULL AND t.id = r.data_import_id AND {TENANT_SCOPE} AND {RECORD_TENANT_OK}
      AND {{slice}}
    RETURNING r.id, r.data_import_id, r.master_flow_id
), logged AS ({ledger.LOG_RECORD_LINKS})
SELECT count(*) FROM changed
""",
    needs=f"""r.master_flow_id IS NULL AND EXISTS (
    SELECT 1 FROM data_imports t JOIN crewai_flow_state_extensions m ON m.flow_id = t.master_flow_id
    WHERE t.id = r.data_import_id AND {TENANT_SCOPE} AND {RECORD_TENANT_OK})""",
)


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
    for evidence in sorted({link.evidence for link in plan.discovery_links}):
        # the ledger records the plan's evidence (exact:flow_id, or created_by_backfill)
        links = [link for link in plan.discovery_links if link.evidence == evidence]
        for chunk in _chunks(links, sizer.size):
            params = ctx.params(
                ids=[link.id for link in chunk],
                masters=[link.master_flow_id for link in chunk],
                table_name="discovery_flows",
                evidence=str(evidence),
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
    """Step 3: the records walk (on ``jobs`` connections, progress as ledger rows), then
    the closing pass. With nothing planned (``total`` 0) only the closing pass runs."""
    ctx.reporter.start(RECORDS, total)

    def advance(n: int) -> None:
        ctx.counts.raw_import_records += n
        ctx.reporter.advance(RECORDS, n)

    driver = walk.Driver(
        conn=ctx.conn,
        run_id=ctx.run.id,
        step=RECORDS,
        params=ctx.params(),
        jobs=ctx.opts.jobs,
        batch_rows=ctx.opts.batch_size,
        lock_retries=ctx.opts.lock_retries,
        throttle=ctx.throttle,
        connect=lambda: connect(engine, settings),
        advance=advance,
        walk=ctx.opts.walk,
    )
    await walk.walk_async(driver, RECORDS_WALK, skip=total == 0)
    ctx.counts.records_walk = driver.stats.get("walk", "")
    ctx.counts.jobs = driver.stats.get("jobs", 1)
    ctx.counts.records_final_pass = driver.stats.get("closing", 0)
    ctx.counts.batches += driver.stats.get("batches", 0)
    ctx.counts.longest_batch_ms = max(ctx.counts.longest_batch_ms, driver.stats.get("longest_batch_ms", 0.0))
