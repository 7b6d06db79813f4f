"""The one walker of big tables: the revisions' translation and the backfill's records.

A :class:`Walk` is a statement that does the work on ``{table} r`` for the rows of one
slice (``{slice}``, a predicate on ``r``) and returns how many rows it changed, plus the
predicate ``needs`` that is true of a row the work would still change. From that one
definition come every way the table is walked:

* **by pages** (TID Range Scan, PostgreSQL 14+): ``[lo, hi)`` page ranges of each leaf
  table, so no batch reads the whole table and no index is assumed;
* **by key** (older servers, and the ``--sql`` DO block for a partitioned table):
  ``(after, upto]`` ranges of the primary key, ``upto`` the ``size``-th key after ``after``;
* **the closing pass**, never optional: one read of the rows that still ``need`` the work
  (the application's UPDATE of *any* column writes a new row version, often behind the
  cursor or past the planned end, where a physical walk never looks), then batches by
  primary key over what it found;
* **the --sql DO block** (:meth:`Walk.do_block`): the same statements, one COMMIT each.

Online there are two drivers over the same statements: :func:`walk_sync` for a revision
(Alembic's synchronous connection; a lock timeout retries the whole revision, whose
batches are idempotent) and :func:`walk_async` for the backfill (``--jobs`` connections,
the batch sizer, retries, the throttle (replica lag and other health signals), and progress as ledger rows claimed with
``FOR UPDATE SKIP LOCKED``: :mod:`flowfix.ledger`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection

from flowfix import catalog, ledger
from flowfix.batches import BatchSizer, Throttle, timed
from flowfix.sql import quote_qualified

log = logging.getLogger("flowfix.walk")

#: TID Range Scans exist from PostgreSQL 14: before that a ctid slice is a full scan.
TID_RANGE_SCAN_VERSION = 140000
#: The key walk's bounds: (KEY_FIRST, KEY_LAST]. A row whose id is the nil uuid is left to
#: the closing pass (which finds it if it needs the work).
KEY_FIRST = uuid.UUID(int=0)
KEY_LAST = uuid.UUID(int=2**128 - 1)
#: Pages of one ledger range of a physical walk (about 32 MB): ranges, not batches, are
#: what workers claim, so a range is many batches and a table is many ranges.
RANGE_PAGES = 4096

PAGES_SLICE = "r.ctid >= CAST(:lo AS tid) AND r.ctid < CAST(:hi AS tid)"
KEYS_SLICE = "r.id > CAST(:after AS uuid) AND r.id <= CAST(:upto AS uuid)"
IDS_SLICE = "r.id = ANY(CAST(:ids AS uuid[]))"
#: The upper key of the next key batch: the ``:limit``-th id after ``:after`` (NULL: none left).
UPTO = """SELECT id FROM (
    SELECT id FROM {table} WHERE id > CAST(:after AS uuid) AND id <= CAST(:hi AS uuid) ORDER BY id LIMIT :limit
) s ORDER BY id DESC LIMIT 1"""


@dataclass(frozen=True)
class Walk:
    """One pass over ``table``. ``work``: a statement on ``{table} r`` restricted by
    ``{slice}``, whose result is one row, one column: the rows it changed. ``needs``: a
    predicate on ``r``, true of a row the work would change (what the closing pass looks
    for). ``busy``: a predicate on ``r`` without which no row needs the work; when no row
    has it the walk is skipped (one read). Names are flowfix's own or the catalog's."""

    table: str
    work: str
    needs: str
    busy: str = "TRUE"

    def statement(self, relation: str, slice_: str) -> str:
        return self.work.replace("{table}", relation).replace("{slice}", slice_)

    def by_pages(self, relation: str) -> str:
        return self.statement(relation, PAGES_SLICE)

    def by_keys(self) -> str:
        return self.statement(self.table, KEYS_SLICE)

    def upto(self) -> str:
        return UPTO.format(table=self.table)

    def by_ids(self) -> str:
        return self.statement(self.table, IDS_SLICE)

    def left(self) -> str:
        """The closing pass's read: every row still needing the work, by key."""
        return f"SELECT r.id FROM {self.table} r WHERE {self.needs} ORDER BY r.id"

    def any_busy(self) -> str:
        return f"SELECT EXISTS (SELECT 1 FROM {self.table} r WHERE {self.busy})"

    def do_block(self, *, pages: int, rows: int) -> str:
        """The whole walk as one DO block for ``--sql``: the server chooses pages or keys
        as the online walk does (a partitioned table goes by key), one COMMIT per batch,
        then the closing pass."""
        into = " INTO v_changed"
        by_pages = self.statement(
            self.table,
            f"r.ctid >= format('(%s,0)', v_lo)::tid AND r.ctid < format('(%s,0)', v_lo + {int(pages)})::tid",
        )
        by_keys = self.statement(self.table, "r.id > v_after AND r.id <= v_upto")
        by_ids = self.statement(self.table, f"r.id = ANY(v_ids[v_at:v_at + {int(rows) - 1}])")
        return f"""DO $walk$
DECLARE
  v_changed bigint; v_lo bigint := 0; v_pages bigint; v_ids uuid[]; v_at int := 1;
  v_after uuid := '00000000-0000-0000-0000-000000000000'; v_upto uuid;  -- KEY_FIRST
BEGIN
  IF NOT EXISTS (SELECT 1 FROM {self.table} r WHERE {self.busy}) THEN
    RETURN;
  END IF;
  IF current_setting('server_version_num')::int >= {TID_RANGE_SCAN_VERSION}
     AND (SELECT relkind FROM pg_class WHERE oid = '{self.table}'::regclass) <> 'p' THEN
    v_pages := pg_relation_size('{self.table}') / current_setting('block_size')::int;
    WHILE v_lo < v_pages LOOP
      {by_pages}{into};
      v_lo := v_lo + {pages};
      COMMIT;
    END LOOP;
  ELSE
    LOOP
      v_upto := NULL;
      SELECT id INTO v_upto FROM (
        SELECT id FROM {self.table} WHERE id > v_after ORDER BY id LIMIT {rows}) s ORDER BY id DESC LIMIT 1;
      EXIT WHEN v_upto IS NULL;
      {by_keys}{into};
      v_after := v_upto;
      COMMIT;
    END LOOP;
  END IF;
  -- the closing pass: rows the application moved behind the walk or past its end
  SELECT array_agg(r.id ORDER BY r.id) INTO v_ids FROM {self.table} r WHERE {self.needs};
  WHILE v_at <= coalesce(cardinality(v_ids), 0) LOOP
    {by_ids}{into};
    v_at := v_at + {rows};
    COMMIT;
  END LOOP;
END $walk$"""


# --- ranges ------------------------------------------------------------------------------


@dataclass
class Range:
    """One range of a walk, as the ledger stores it (``flowfix_walk_ranges``): pages
    ``[lo_page, hi_page)`` of ``relation`` walked up to ``next_page``, or keys
    ``(lo_key, hi_key]`` walked up to ``next_key``."""

    relation: str
    walk: str  # "ctid" or "key"
    lo_page: int | None = None
    hi_page: int | None = None
    next_page: int | None = None
    lo_key: uuid.UUID | None = None
    hi_key: uuid.UUID | None = None
    next_key: uuid.UUID | None = None
    id: int | None = None


def choose(forced: str, server_version: int) -> str:
    """``ctid`` (physical ranges) where the server has TID Range Scans, else ``key``;
    ``forced`` ("ctid", "key") wins."""
    if forced in ("ctid", "key"):
        return forced
    return "ctid" if server_version >= TID_RANGE_SCAN_VERSION else "key"


def plan_ranges(walk: str, table: str, leaves: list[catalog.Leaf], jobs: int) -> list[Range]:
    """The ranges of a new walk: each leaf's pages as they are now (pages added later are
    the closing pass's), cut into at least ``jobs`` ranges of at most RANGE_PAGES; or
    the key space cut into ``jobs`` ranges."""
    if walk == "key":
        step = (KEY_LAST.int + 1) // max(1, jobs)
        bounds = [KEY_FIRST.int + step * k for k in range(jobs)] + [KEY_LAST.int]
        return [
            Range(table, "key", lo_key=uuid.UUID(int=lo), hi_key=uuid.UUID(int=hi), next_key=uuid.UUID(int=lo))
            for lo, hi in itertools.pairwise(bounds)
        ]
    ranges: list[Range] = []
    for leaf in leaves:
        parts = max(1, min(leaf.pages, max(jobs, -(-leaf.pages // RANGE_PAGES))))
        cuts = [leaf.pages * k // parts for k in range(parts + 1)]
        ranges += [Range(leaf.name, "ctid", lo, hi, lo) for lo, hi in itertools.pairwise(cuts) if hi > lo]
    return ranges


# --- the revision's driver (synchronous, one connection) -----------------------------------


def walk_sync(conn: Connection, spec: Walk, *, forced: str = "auto", pages: int = 250, rows: int = 10_000) -> int:
    """Walk ``spec`` on a revision's connection (in autocommit: each batch is one
    statement, its own transaction), then the closing pass. Returns the rows changed."""
    started = time.monotonic()
    if not conn.execute(text(spec.any_busy())).scalar_one():
        log.info("%s: no row to walk (%.1fs)", spec.table, time.monotonic() - started)
        return 0
    walk = choose(forced, catalog.server_version(conn))
    total = batches = 0
    leaves = catalog.leaves(conn, spec.table)
    quoted = _quoted(leaves)
    for part in plan_ranges(walk, spec.table, leaves, 1):
        if part.walk == "ctid":
            stmt = text(spec.by_pages(quoted[part.relation]))
            assert part.lo_page is not None and part.hi_page is not None
            for lo in range(part.lo_page, part.hi_page, pages):
                total += conn.execute(stmt, {"lo": (lo, 0), "hi": (min(lo + pages, part.hi_page), 0)}).scalar_one()
                batches += 1
        else:
            after = part.lo_key
            while True:
                upto = conn.execute(text(spec.upto()), {"after": after, "hi": part.hi_key, "limit": rows}).scalar()
                if upto is None:
                    break
                total += conn.execute(text(spec.by_keys()), {"after": after, "upto": upto}).scalar_one()
                after, batches = upto, batches + 1
    closing = 0
    left = list(conn.execute(text(spec.left())).scalars())
    for at in range(0, len(left), rows):
        closing += conn.execute(text(spec.by_ids()), {"ids": left[at : at + rows]}).scalar_one()
    log.info("%s: %d rows changed in %d batches by %s, %d by the closing pass, %.1fs",
             spec.table, total + closing, batches, walk, closing, time.monotonic() - started)  # fmt: skip
    return total + closing


# --- the backfill's driver (asynchronous, --jobs connections, progress rows) --------------


@dataclass
class Driver:
    """What :func:`walk_async` needs from its caller: how to run one batch (throttled,
    timed, retried), extra connections for ``--jobs``, and what to say per batch."""

    conn: AsyncConnection
    run_id: uuid.UUID
    step: str
    params: dict[str, Any]
    jobs: int
    batch_rows: int
    lock_retries: int
    throttle: Throttle
    connect: Callable[[], Any]  # an async context manager giving another AsyncConnection
    advance: Callable[[int], None] = lambda n: None
    walk: str = "auto"
    stats: dict[str, Any] = field(default_factory=dict)


async def walk_async(d: Driver, spec: Walk, *, skip: bool = False) -> None:
    """Walk ``spec`` resumably: the run's ranges of ``d.step`` not done (stored before the
    first batch; a new walk plans them), each claimed by one of ``d.jobs`` workers with
    ``FOR UPDATE SKIP LOCKED`` and walked in sized batches that advance the range in the
    batch's own transaction; then the closing pass. ``skip``: no row can need the work
    by the plan, so only the closing pass runs."""
    async with d.conn.begin():
        leaves = await d.conn.run_sync(catalog.leaves, spec.table)
        stored = await ledger.resume_ranges(d.conn, d.run_id, d.step, spec.table, leaves)
        if stored is None and not skip:
            walk = choose(d.walk, await d.conn.run_sync(catalog.server_version))
            stored = await ledger.store_ranges(d.conn, d.run_id, d.step, plan_ranges(walk, spec.table, leaves, d.jobs))
    ranges = stored or []
    d.stats["walk"] = ranges[0].walk if ranges else ""
    todo = len(ranges)
    jobs = max(1, min(d.jobs, todo))
    d.stats["jobs"] = jobs
    sizer = _sizer(d, ranges, max((x.rows_per_page for x in leaves), default=0.0))
    by_page = {x.name: x.pages for x in leaves}
    quoted = _quoted(leaves)

    async def worker(conn: AsyncConnection) -> None:
        while True:
            async with conn.begin():
                part = await ledger.claim_range(conn, d.run_id, d.step)
            if part is None:
                return
            try:
                if part.walk == "ctid":
                    await _walk_pages(d, conn, spec, sizer, part, by_page.get(part.relation, 0), quoted[part.relation])
                else:
                    await _walk_keys(d, conn, spec, sizer, part)
            except Exception as exc:
                await ledger.fail_range(conn, part, exc)
                raise

    async def extra() -> None:
        async with d.connect() as conn:
            await worker(conn)

    if todo:
        await _all_or_nothing([worker(d.conn), *(extra() for _ in range(jobs - 1))])
    await _closing_pass(d, spec)


def _quoted(leaves: list[catalog.Leaf]) -> dict[str, str]:
    """Each leaf's SQL name built from the catalog's parts (a stored range names its
    leaf by ``regclass`` text, checked against the catalog on resume; only this is spliced)."""
    return {x.name: quote_qualified(x.schema, x.relname) for x in leaves}


def _sizer(d: Driver, ranges: list[Range], rows_per_page: float) -> BatchSizer:
    """Pages per batch (or keys): about ``batch_rows`` rows at most, pages from the
    table's own rows per page (20 when the statistics have none); the first batch
    small, so the first measurement comes early."""
    if not ranges or ranges[0].walk == "key":
        return BatchSizer(d.batch_rows, start=min(d.batch_rows, 1000))
    per_page = rows_per_page if rows_per_page >= 1 else 20.0
    return BatchSizer(max(1, int(d.batch_rows / per_page)), start=8)


async def _batch(
    d: Driver, conn: AsyncConnection, sizer: BatchSizer, work: Callable[[AsyncConnection], Awaitable[Any]], units: int
) -> Any:
    await d.throttle.wait(conn)
    out = await timed(conn, sizer, d.lock_retries, work, units)
    d.stats["batches"] = d.stats.get("batches", 0) + 1
    d.stats["longest_batch_ms"] = round(max(d.stats.get("longest_batch_ms", 0.0), sizer.longest * 1000), 1)
    return out


async def _walk_pages(
    d: Driver, conn: AsyncConnection, spec: Walk, sizer: BatchSizer, part: Range, pages_now: int, relation: str
) -> None:
    """Pages [next, hi) of the range; pages beyond the leaf's end now (VACUUM truncated
    it) hold no row: the range ends there."""
    sql = text(spec.by_pages(relation))  # the leaf's catalog name, quoted
    assert part.next_page is not None and part.hi_page is not None
    end = min(part.hi_page, pages_now)
    if part.next_page >= end:
        async with conn.begin():
            await ledger.advance_range(conn, part, part.hi_page, 0, 0.0, done=True)
        return
    while part.next_page < end:
        lo, hi = part.next_page, min(end, part.next_page + sizer.size)

        async def batch(c: AsyncConnection, lo: int = lo, hi: int = hi) -> int:
            started = time.perf_counter()
            changed = int((await c.execute(sql, {**d.params, "lo": (lo, 0), "hi": (hi, 0)})).scalar_one())
            done = hi >= end
            await ledger.advance_range(
                c, part, part.hi_page if done else hi, changed, time.perf_counter() - started, done=done
            )
            return changed

        changed = await _batch(d, conn, sizer, batch, hi - lo)
        part.next_page = hi
        d.advance(changed)


async def _walk_keys(d: Driver, conn: AsyncConnection, spec: Walk, sizer: BatchSizer, part: Range) -> None:
    while True:
        limit, after = sizer.size, part.next_key

        async def batch(c: AsyncConnection, after: uuid.UUID | None = after, limit: int = limit) -> tuple[Any, int]:
            started = time.perf_counter()
            upto = (await c.execute(text(spec.upto()), {"after": after, "hi": part.hi_key, "limit": limit})).scalar()
            changed = 0
            if upto is not None:
                changed = int(
                    (await c.execute(text(spec.by_keys()), {**d.params, "after": after, "upto": upto})).scalar_one()
                )
            await ledger.advance_range(
                c, part, upto or part.hi_key, changed, time.perf_counter() - started, done=upto is None
            )
            return upto, changed

        upto, changed = await _batch(d, conn, sizer, batch, limit)
        d.advance(changed)
        if upto is None:
            return
        part.next_key = upto


async def _closing_pass(d: Driver, spec: Walk) -> None:
    """Rows still needing the work, wherever they are now: one read, then batches by key.
    Recorded as the step's ``closing`` range (its rows are summed like the others')."""
    async with d.conn.begin():
        left = list((await d.conn.execute(text(spec.left()), d.params)).scalars())
        part = await ledger.closing_range(d.conn, d.run_id, d.step, spec.table)
    sizer = BatchSizer(d.batch_rows, start=min(d.batch_rows, 1000))
    at, closing = 0, 0
    while True:
        ids = left[at : at + sizer.size]
        last = at + len(ids) >= len(left)

        async def batch(c: AsyncConnection, ids: list[Any] = ids, last: bool = last) -> int:
            started = time.perf_counter()
            changed = int((await c.execute(text(spec.by_ids()), {**d.params, "ids": ids})).scalar_one()) if ids else 0
            await ledger.advance_range(c, part, None, changed, time.perf_counter() - started, done=last)
            return changed

        changed = await _batch(d, d.conn, sizer, batch, max(1, len(ids)))
        closing += changed
        d.advance(changed)
        at += len(ids)
        if last:
            break
    d.stats["closing"] = closing


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
