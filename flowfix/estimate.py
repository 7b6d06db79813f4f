"""How long a backfill will take, told by its dry run: per step, from the plan, the
tables' sizes and a short read-only calibration on this server.

- planning: what the dry run's own planning took (a real run plans the same way; storing
  the plan is one statement);
- the writing steps: rows to write x the cost of writing one, and for the records the
  walk's read of every page of the table plus the closing pass's read. Reads are timed
  here, read-only, on a few slices of the records table spread over its length (the
  walk's own join to the imports, by primary key); a write is not something a dry run
  may do, so its cost is a ratio to the read cost of one row, :data:`WRITE_READ_RATIO`,
  measured by ``bench/estimate.py`` (shape H, PostgreSQL 18) and checked there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from flowfix import catalog
from flowfix.sql import quote_qualified

RECORDS = "raw_import_records"
#: Slices read to calibrate, spread over the table; together at most SAMPLE_SHARE of its
#: pages, and the calibration stops after SAMPLE_SECONDS (a short read even on a big table).
SAMPLE_SLICES = 8
SAMPLE_SHARE = 0.05
SAMPLE_SECONDS = 1.0
MIN_SLICE_PAGES = 8
#: Writing one row (UPDATE, its index entries, its share of the ledger) costs this many
#: times reading it through the walk's join; imports and discovery flows, written one
#: statement per batch with their own ledger rows, cost IMPORT_ROW_RATIO times a record.
#: Fitted by bench/estimate.py (shape H, PostgreSQL 18.6 embedded, 2 cores shared with
#: other work, 2026-12-04), with this calibration: the exact ratios were 54.5 and 39.5 at
#: 1M and 5M records; 1.21 and 0.81 for imports.
WRITE_READ_RATIO = 45.0
IMPORT_ROW_RATIO = 1.0
#: The closing pass reads the whole records table once more (a hash join, sequential).
CLOSING_PASS_SHARE = 0.25

#: the walk's read of one slice: every record of pages [lo, hi), joined to its import by
#: primary key, as LINK_RECORDS_SLICE joins it (read-only)
SLICE_READ_SQL = """
SELECT count(*) AS rows, count(t.id) AS joined FROM {relation} r
LEFT JOIN data_imports t ON t.id = r.data_import_id
WHERE r.ctid >= CAST(:lo AS tid) AND r.ctid < CAST(:hi AS tid)
"""


@dataclass
class StepEstimate:
    step: str
    rows: int
    seconds: float
    basis: str


@dataclass
class Estimate:
    steps: list[StepEstimate] = field(default_factory=list)
    #: what the calibration measured: seconds per page read and rows per page
    seconds_per_page: float = 0.0
    rows_per_page: float = 0.0

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)


async def calibrate(conn: AsyncConnection) -> tuple[float, float, int]:
    """(seconds per page read by the walk, rows per page, pages) of the records table,
    timed on a few slices spread over it; read-only."""
    leaves = await conn.run_sync(catalog.leaves, RECORDS)
    pages = sum(leaf.pages for leaf in leaves)
    if not leaves or pages == 0:
        return 0.0, 0.0, 0
    leaf = leaves[0]  # the largest
    size = max(MIN_SLICE_PAGES, int(leaf.pages * SAMPLE_SHARE / SAMPLE_SLICES))
    rows = read = 0
    started = time.perf_counter()
    for k in range(SAMPLE_SLICES):
        lo = min(leaf.pages * k // SAMPLE_SLICES, max(0, leaf.pages - size))
        got = (
            await conn.execute(
                text(SLICE_READ_SQL.format(relation=quote_qualified(leaf.schema, leaf.relname))),
                {"lo": (lo, 0), "hi": (lo + size, 0)},
            )
        ).one()
        rows, read = rows + got.rows, read + size
        if lo + size >= leaf.pages or time.perf_counter() - started > SAMPLE_SECONDS:
            break
    return (time.perf_counter() - started) / read, rows / read, pages


async def estimate(conn: AsyncConnection, planning_seconds: float, totals: dict[str, int], jobs: int = 1) -> Estimate:
    """The estimate for a plan whose planning took ``planning_seconds`` and that links
    ``totals`` rows per table (:meth:`flowfix.backfill.Plan.totals`)."""
    per_page, rows_per_page, pages = await calibrate(conn)
    per_row_read = per_page / rows_per_page if rows_per_page else 0.0
    write = WRITE_READ_RATIO * per_row_read
    out = Estimate(seconds_per_page=per_page, rows_per_page=rows_per_page)
    out.steps.append(StepEstimate("planning", 0, planning_seconds, "the dry run's own planning"))
    for table in ("discovery_flows", "data_imports"):
        n = totals.get(table, 0)
        out.steps.append(StepEstimate(table, n, n * IMPORT_ROW_RATIO * write, "rows x write cost"))
    n = totals.get(RECORDS, 0)
    walk = pages * per_page * (1 + CLOSING_PASS_SHARE) / max(1, jobs)
    out.steps.append(
        StepEstimate(RECORDS, n, walk + n * write / max(1, jobs), f"{pages:,} pages read + rows x write cost")
    )
    return out
