"""The ledger: every run that changes links (backfill, link, undo) and every value it
changed, so that ``flowfix undo RUN_ID`` can put them back.

Tables (created by revision fix_master_flow_fk): ``flowfix_runs`` and ``flowfix_changes``.
Every statement on them is here: starting and finishing runs, the stored plan of a
backfill and its walks' progress as rows (``flowfix_walk_ranges``, for resuming), the fragments other statements use to
log what they changed in the same statement, and undo. Undo reverts a change only where
the row still holds the value the run wrote: a later edit by anyone else is never
clobbered, it is reported instead.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from flowfix import catalog, privileges
from flowfix.batches import BatchSizer, timed, transaction
from flowfix.config import Settings
from flowfix.db import connect
from flowfix.errors import FlowfixError
from flowfix.models import CHILD_TABLES, MASTER_TABLE
from flowfix.sql import quote_ident, quote_qualified

Executor = AsyncConnection | AsyncSession

#: One advisory lock for every run that changes links: backfill, link, undo.
ADVISORY_LOCK_KEY = "flowfix.runs"

#: Undo builds UPDATE/DELETE statements from ledger rows; only these names may appear.
UNDOABLE_COLUMNS = {(table, "master_flow_id") for table in CHILD_TABLES}
CREATED_ROW = "*created*"  # column name of a change that created a whole row
#: Undo goes from the rows that follow others to the rows they follow (the reverse of the
#: backfill's steps); created masters come last, once nothing the run linked points at them.
UNDO_ORDER = ("raw_import_records", "data_imports", "discovery_flows")


class LedgerMissing(FlowfixError):
    """The ledger tables do not exist yet."""


class RunLocked(FlowfixError):
    """Another flowfix run holds the lock."""


RUN_LOCKED = "another flowfix run (backfill, link or undo) is in progress on this database; try again later"


class UnknownRun(FlowfixError):
    """No run with that id."""


@dataclass(frozen=True)
class Change:
    table: str
    row_id: uuid.UUID
    column: str
    old_value: uuid.UUID | None
    new_value: uuid.UUID | None
    evidence: str
    distance_seconds: float | None = None


@dataclass
class RunInfo:
    id: uuid.UUID
    command: str
    status: str
    arguments: dict[str, Any]
    counts: dict[str, Any]
    started_at: datetime
    finished_at: datetime | None


@dataclass
class UndoReport:
    run_id: uuid.UUID
    undo_run_id: uuid.UUID | None
    reverted: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)  # changed since: left alone
    deleted_masters: int = 0
    kept_masters: int = 0
    already_undone: bool = False


async def require_ledger(conn: Executor) -> None:
    """The ledger exists and the FKs reference flow_id (revision fix_master_flow_fk or
    later): after ``downgrade legacy`` the ledger tables may remain, but a link written
    then would be a flow_id in a column whose FK references id."""
    present = (await conn.execute(text("SELECT to_regclass('flowfix_runs') IS NOT NULL"))).scalar_one()
    if not present:
        raise LedgerMissing("the ledger tables do not exist yet: run `flowfix upgrade fix_master_flow_fk` first")
    revision = await conn.run_sync(catalog.readable_revision)
    if revision in (None, "legacy"):
        raise LedgerMissing(
            f"the database is at revision {revision or '(none)'}, where master_flow_id still references the master's"
            " id: run `flowfix upgrade fix_master_flow_fk` first"
        )


@dataclass(frozen=True)
class Run:
    """A run in the ledger; ``resumed``: started by an earlier, interrupted process."""

    id: uuid.UUID
    resumed: bool = False


@asynccontextmanager
async def run_lock(conn: AsyncConnection) -> AsyncIterator[None]:
    """Hold the per-database run lock for the session, across many short transactions
    (a batched run), or fail at once. A lost session releases it by itself."""
    got = (await conn.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"), {"k": ADVISORY_LOCK_KEY})).scalar_one()
    await conn.commit()
    if not got:
        raise RunLocked(RUN_LOCKED)
    try:
        yield
    finally:
        try:
            # the run lock and the run's own (hold_run); this session takes no other
            await conn.execute(text("SELECT pg_advisory_unlock_all()"))
            await conn.commit()
        except Exception:  # noqa: BLE001, S110 - a lost session took the lock with it; the first error counts
            pass


#: Which run the session holding the run lock works on: a second session-level advisory
#: lock (key, hashtext(run id)), taken by :func:`hold_run` once the run's id is known. The
#: run lock is one per database, so it alone cannot tell an interrupted run from one a
#: process works on while another run (its undo, a link) holds the lock.
HOLD_RUN = "SELECT pg_try_advisory_lock(hashtext(:k), hashtext(CAST(:run AS text)))"


async def hold_run(conn: Executor, run_id: uuid.UUID) -> None:
    """Mark ``run_id`` as the one this session (which holds the run lock) works on, until
    :func:`run_lock` ends or the session does."""
    await conn.execute(text(HOLD_RUN), {"k": ADVISORY_LOCK_KEY, "run": str(run_id)})


async def try_lock(conn: Executor) -> None:
    """Take the per-database run lock for this transaction, or fail at once."""
    got = (
        await conn.execute(text("SELECT pg_try_advisory_xact_lock(hashtext(:k))"), {"k": ADVISORY_LOCK_KEY})
    ).scalar_one()
    if not got:
        raise RunLocked(RUN_LOCKED)


async def start_run(conn: Executor, command: str, arguments: dict[str, Any]) -> uuid.UUID:
    run_id: uuid.UUID = (
        await conn.execute(
            text("INSERT INTO flowfix_runs (command, arguments) VALUES (:c, CAST(:a AS jsonb)) RETURNING id"),
            {"c": command, "a": json.dumps(arguments, default=str)},
        )
    ).scalar_one()
    return run_id


async def interrupted_run(conn: Executor, command: str, arguments: dict[str, Any]) -> Run | None:
    """The newest run of ``command`` still marked running (its process died), which a new
    run resumes; refused if it was started with other arguments."""
    row = (
        await conn.execute(
            text(
                "SELECT id, arguments FROM flowfix_runs WHERE command = :c AND status = 'running'"
                " ORDER BY started_at DESC LIMIT 1"
            ),
            {"c": command},
        )
    ).one_or_none()
    if row is None:
        return None
    if row.arguments != arguments:
        raise FlowfixError(
            f"{command} run {row.id} was interrupted with other arguments ({json.dumps(row.arguments)}): "
            "rerun it with those to finish it, or `flowfix undo` it first"
        )
    return Run(row.id, resumed=True)


async def store_import_plan(
    conn: Executor,
    run_id: uuid.UUID,
    links: Sequence[tuple[uuid.UUID, uuid.UUID, str, float | None]],
) -> None:
    """A backfill's planned import links, (import, master, evidence, distance), stored
    before any is applied: a resumed run applies these, not a fresh plan's."""
    await conn.execute(
        text(
            "INSERT INTO flowfix_changes (run_id, table_name, row_id, column_name, old_value, new_value, evidence,"
            " distance_seconds)"
            " SELECT :run, 'data_imports', x.id, 'master_flow_id', NULL, x.flow, x.evidence, x.distance"
            " FROM unnest(CAST(:ids AS uuid[]), CAST(:flows AS uuid[]), CAST(:evidence AS text[]),"
            " CAST(:distances AS float8[])) AS x(id, flow, evidence, distance)"
        ),
        {
            "run": run_id,
            "ids": [link[0] for link in links],
            "flows": [link[1] for link in links],
            "evidence": [link[2] for link in links],
            "distances": [link[3] for link in links],
        },
    )


async def skip_pending_imports(conn: Executor, run_id: uuid.UUID, imports: Sequence[uuid.UUID], reason: str) -> None:
    """Mark a resumed run's pending links of ``imports`` skipped (the planner found them
    stale), so the apply never writes them."""
    if imports:
        await conn.execute(
            text(
                "UPDATE flowfix_changes SET skipped = :reason WHERE run_id = :run AND table_name = 'data_imports'"
                " AND applied_at IS NULL AND skipped IS NULL AND row_id = ANY(CAST(:ids AS uuid[]))"
            ),
            {"run": run_id, "ids": list(imports), "reason": reason},
        )


#: The next batch of a backfill's stored import links not yet applied or skipped, after
#: the cursor :after (NULL: from the first). A CTE body for the apply statement.
PENDING_IMPORT_LINKS = """
    SELECT c.id AS change_id, c.row_id, c.new_value, c.evidence
    FROM flowfix_changes c
    WHERE c.run_id = :run AND c.table_name = 'data_imports' AND c.applied_at IS NULL AND c.skipped IS NULL
      AND (CAST(:after AS uuid) IS NULL OR c.row_id > CAST(:after AS uuid))
    ORDER BY c.row_id
    LIMIT :limit"""

#: Mark stored links applied (CTE ``changed``, column change_id) or skipped (the rest of
#: CTE ``batch``), in the statement that applied them.
MARK_APPLIED = (
    "UPDATE flowfix_changes c SET applied_at = now() FROM changed WHERE c.id = changed.change_id RETURNING c.id"
)
MARK_SKIPPED = """UPDATE flowfix_changes c SET skipped = 'the import or its master changed since planning'
    FROM batch b WHERE c.id = b.change_id AND c.id NOT IN (SELECT change_id FROM changed) RETURNING c.id"""

#: Log the rows a data-modifying CTE ``changed`` (columns id, master) linked in the table
#: :table_name, with :evidence, in the statement that linked them.
LOG_LINKS = """INSERT INTO flowfix_changes (run_id, table_name, row_id, column_name, old_value, new_value, evidence,
                                 applied_at)
    SELECT :run, CAST(:table_name AS text), id, 'master_flow_id', NULL, master, CAST(:evidence AS text), now()
    FROM changed RETURNING row_id"""

#: The same for records (CTE ``changed``: id, data_import_id, master_flow_id): one change
#: per import and master, with the ids of its records in row_ids.
LOG_RECORD_LINKS = """INSERT INTO flowfix_changes (run_id, table_name, row_id, column_name, old_value, new_value, evidence,
                                 row_ids, applied_at)
    SELECT :run, 'raw_import_records', data_import_id, 'master_flow_id', NULL, master_flow_id,
           CAST(:ev_via_import AS text), array_agg(id ORDER BY id), now()
    FROM changed GROUP BY data_import_id, master_flow_id
    RETURNING 1"""

#: Log the masters a CTE ``created`` (column flow_id) created.
LOG_CREATED_MASTERS = f"""INSERT INTO flowfix_changes (run_id, table_name, row_id, column_name, old_value, new_value, evidence,
                                 applied_at)
    SELECT :run, '{MASTER_TABLE}', c.flow_id, '{CREATED_ROW}', NULL, c.flow_id, CAST(:ev_created AS text), now()
    FROM created c RETURNING row_id"""


#: What a run has applied, per table, whichever process applied it: a records change
#: stands for the records in its row_ids.
RUN_TOTALS = f"""
SELECT table_name,
       COALESCE(sum(COALESCE(cardinality(row_ids), 1)) FILTER (WHERE applied_at IS NOT NULL), 0)::bigint AS n,
       count(*) FILTER (WHERE skipped IS NOT NULL)::bigint AS skipped
FROM flowfix_changes WHERE run_id = :run
  AND (column_name = 'master_flow_id' OR (table_name = '{MASTER_TABLE}' AND column_name = '{CREATED_ROW}'))
GROUP BY table_name
"""
#: The key of :func:`run_totals` for the planned links the run skipped (their row had
#: changed since planning), whichever table.
SKIPPED = "skipped"


async def run_totals(conn: Executor, run_id: uuid.UUID) -> dict[str, int]:
    """Rows the run linked per table (the master table: masters it created), and the
    planned links it skipped (``SKIPPED``), summed over every process that worked on it:
    a resumed run reports the whole run's work."""
    totals = {SKIPPED: 0}
    for row in await conn.execute(text(RUN_TOTALS), {"run": run_id}):
        totals[row.table_name] = int(row.n)
        totals[SKIPPED] += int(row.skipped)
    return totals


async def record(conn: Executor, run_id: uuid.UUID, changes: list[Change]) -> None:
    if not changes:
        return
    await conn.execute(
        text(
            "INSERT INTO flowfix_changes (run_id, table_name, row_id, column_name, old_value, new_value,"
            " evidence, distance_seconds, applied_at) VALUES (:run, :t, :r, :c, :o, :n, :e, :d, now())"
        ),
        [
            {
                "run": run_id,
                "t": c.table,
                "r": c.row_id,
                "c": c.column,
                "o": c.old_value,
                "n": c.new_value,
                "e": c.evidence,
                "d": c.distance_seconds,
            }
            for c in changes
        ],
    )


async def finish_run(conn: Executor, run_id: uuid.UUID, status: str, counts: dict[str, Any]) -> None:
    await conn.execute(
        text("UPDATE flowfix_runs SET status = :s, counts = CAST(:c AS jsonb), finished_at = now() WHERE id = :id"),
        {"s": status, "c": json.dumps(counts), "id": run_id},
    )


#: The columns of :class:`RunInfo`, for the listing and for one run's progress.
SELECT_RUNS = "SELECT id, command, status, arguments, counts, started_at, finished_at FROM flowfix_runs"


async def list_runs(conn: Executor, limit: int = 20) -> list[RunInfo]:
    await require_ledger(conn)
    rows = (
        await conn.execute(
            text(SELECT_RUNS + " ORDER BY started_at DESC, id LIMIT :n"),
            {"n": limit},
        )
    ).mappings()
    return [RunInfo(**row) for row in rows]


#: One batch of undo for one table (:table_name, from UNDOABLE_COLUMNS): the next ledger
#: changes before the cursor :after (newest first), each expanded to its rows (a records
#: change lists them in row_ids), reverted where the row still holds what the run wrote.
#: One row out per change: how many rows it stood for and how many went back.
UNDO_BATCH = """
WITH ch AS (
    SELECT id, row_id, row_ids, old_value, new_value FROM flowfix_changes
    WHERE run_id = :run AND table_name = CAST(:table_name AS text) AND column_name = 'master_flow_id'
      AND applied_at IS NOT NULL AND undone_at IS NULL AND (CAST(:after AS bigint) IS NULL OR id < CAST(:after AS bigint))
    ORDER BY id DESC
    LIMIT :limit
), target AS (
    SELECT ch.id AS change_id, x.row_id, ch.old_value, ch.new_value
    FROM ch CROSS JOIN LATERAL unnest(COALESCE(ch.row_ids, ARRAY[ch.row_id])) AS x(row_id)
), reverted AS (
    UPDATE {table} t SET master_flow_id = target.old_value
    FROM target WHERE t.id = target.row_id AND t.master_flow_id IS NOT DISTINCT FROM target.new_value
    RETURNING target.change_id
), got AS (SELECT change_id, count(*) AS n FROM reverted GROUP BY change_id
), marked AS (
    UPDATE flowfix_changes c SET undone_at = now() FROM got WHERE c.id = got.change_id RETURNING c.id
), want AS (SELECT change_id, count(*) AS n FROM target GROUP BY change_id)
SELECT ch.id, ch.row_id, ch.row_ids IS NOT NULL AS many, COALESCE(want.n, 0) AS expected, COALESCE(got.n, 0) AS reverted
FROM ch LEFT JOIN want ON want.change_id = ch.id LEFT JOIN got ON got.change_id = ch.id
ORDER BY ch.id DESC
"""

#: Created masters of the run (CREATED_ROW changes) not yet undone, newest first.
CREATED_MASTERS = f"""
SELECT id, new_value FROM flowfix_changes
WHERE run_id = :run AND table_name = '{MASTER_TABLE}' AND column_name = '{CREATED_ROW}'
  AND applied_at IS NOT NULL AND undone_at IS NULL
ORDER BY id DESC
"""


async def undo_run(engine: AsyncEngine, settings: Settings, run_id: uuid.UUID, *, lock_retries: int = 5) -> UndoReport:
    """``flowfix undo``: revert ``run_id`` in short batches under the run lock, each its
    own transaction with lock_timeout and retries, so an application's write waits at
    most one batch. Everything is checked before the first write. An undo that dies part
    way is finished by running it again (its reverted changes are marked, in the batch
    that reverted them)."""
    async with connect(engine, settings) as conn:
        async with conn.begin():
            await require_ledger(conn)
            await conn.run_sync(catalog.require_full_visibility, "undo")
            await _require_undo_privileges(conn, run_id)
            await conn.run_sync(catalog.require_not_part_done, "undo")
        async with run_lock(conn):
            async with conn.begin():
                undo = await _begin_undo(conn, run_id)
                if undo is not None:
                    await hold_run(conn, undo)
            if undo is None:
                return UndoReport(run_id=run_id, undo_run_id=None, already_undone=True)
            report = UndoReport(run_id=run_id, undo_run_id=undo)
            for table in UNDO_ORDER:
                await _undo_table(conn, run_id, table, report, lock_retries, undo)
            await _undo_created_masters(conn, run_id, report, lock_retries)
            async with conn.begin():  # the whole undo's work, every process that worked on it
                report.reverted = await _reverted_so_far(conn, undo)
            counts = {
                "reverted": report.reverted,
                "skipped": len(report.skipped),
                "deleted_masters": report.deleted_masters,
                "kept_masters": report.kept_masters,
            }
            async with conn.begin():
                await finish_run(conn, undo, "finished", counts)
                await conn.execute(text(MARK_UNDONE), {"id": run_id, "live": LIVE})
            return report


async def _require_undo_privileges(conn: AsyncConnection, run_id: uuid.UUID) -> None:
    """What undo writes, checked before anything: the links and the ledger; for a run that
    created masters, deleting them, and reading every table that may reference them."""
    created = (
        await conn.execute(
            text("SELECT EXISTS (SELECT 1 FROM flowfix_changes WHERE run_id = :id AND column_name = :created)"),
            {"id": run_id, "created": CREATED_ROW},
        )
    ).scalar_one()
    if not created:
        await privileges.require(conn, "undo", "write")
        return
    refs = await conn.run_sync(catalog.referencing, MASTER_TABLE)
    readers = [privileges.Need(ref.source, "SELECT", privileges.ANY_COLUMN) for ref in refs]
    await privileges.require(conn, "undo", "write", "masters", extra=readers)


async def _begin_undo(conn: AsyncConnection, run_id: uuid.UUID) -> uuid.UUID | None:
    """Check the run can be undone; the undo run recording it (an interrupted undo of the
    same run is continued), or None if it is undone already."""
    run = (
        await conn.execute(text("SELECT command, status FROM flowfix_runs WHERE id = :id"), {"id": run_id})
    ).one_or_none()
    if run is None:
        raise UnknownRun(f"no flowfix run with id {run_id} (see `flowfix runs`)")
    if run.command == "undo":
        raise UnknownRun(f"run {run_id} is an undo run, which cannot be undone: run the backfill or link again instead")
    if run.status == "undone":
        return None
    tables = (
        await conn.execute(
            text(
                "SELECT DISTINCT table_name FROM flowfix_changes WHERE run_id = :id AND applied_at IS NOT NULL"
                " AND undone_at IS NULL AND old_value IS NULL AND column_name <> :created"
            ),
            {"id": run_id, "created": CREATED_ROW},
        )
    ).scalars()
    await _refuse_null_into_not_null(conn, run_id, sorted(tables))
    unknown = (
        await conn.execute(
            text(
                "SELECT id, table_name, column_name FROM flowfix_changes WHERE run_id = :id AND undone_at IS NULL"
                " AND applied_at IS NOT NULL AND NOT (column_name = 'master_flow_id' AND table_name = ANY(:tables))"
                " AND NOT (column_name = :created AND table_name = :master) LIMIT 1"
            ),
            {"id": run_id, "tables": list(CHILD_TABLES), "created": CREATED_ROW, "master": MASTER_TABLE},
        )
    ).one_or_none()
    if unknown is not None:
        raise FlowfixError(
            f"ledger change {unknown.id} names {unknown.table_name}.{unknown.column_name}, which undo does not touch"
            " (nothing was changed)"
        )
    existing = (
        await conn.execute(
            text(
                "SELECT id FROM flowfix_runs WHERE command = 'undo' AND status = 'running'"
                " AND arguments->>'run_id' = :target ORDER BY started_at DESC LIMIT 1"
            ),
            {"target": str(run_id)},
        )
    ).scalar_one_or_none()
    if existing is not None:
        return existing  # type: ignore[no-any-return]
    return await start_run(conn, "undo", {"run_id": str(run_id)})


#: The undone run; what an interrupted process said while it ran (``live``) goes with it.
MARK_UNDONE = "UPDATE flowfix_runs SET status = 'undone', counts = counts - CAST(:live AS text) WHERE id = :id"


#: Add a batch's reverted values to the undo run's count, in that batch's transaction: an
#: undo finished by a second process reports what both reverted.
ADD_REVERTED = """UPDATE flowfix_runs SET counts = jsonb_set(counts, '{reverted}',
    to_jsonb(COALESCE((counts->>'reverted')::bigint, 0) + :n)) WHERE id = :undo"""


async def _reverted_so_far(conn: Executor, undo: uuid.UUID) -> int:
    found = (
        await conn.execute(text("SELECT (counts->>'reverted')::bigint FROM flowfix_runs WHERE id = :id"), {"id": undo})
    ).scalar_one()
    return int(found or 0)


async def _undo_table(
    conn: AsyncConnection, run_id: uuid.UUID, table: str, report: UndoReport, retries: int, undo: uuid.UUID
) -> None:
    assert (table, "master_flow_id") in UNDOABLE_COLUMNS  # the only names that reach the SQL
    sql = text(UNDO_BATCH.format(table=quote_ident(table)))
    sizer = BatchSizer(5000, start=100)
    after: int | None = None
    while True:
        limit = sizer.size

        async def batch(c: AsyncConnection, after: int | None = after, limit: int = limit) -> list[Any]:
            rows = list(await c.execute(sql, {"run": run_id, "table_name": table, "after": after, "limit": limit}))
            await c.execute(text(ADD_REVERTED), {"undo": undo, "n": sum(row.reverted for row in rows)})
            return rows

        rows = await timed(conn, sizer, retries, batch, limit)
        if not rows:
            return
        after = rows[-1].id
        for row in rows:
            report.reverted += row.reverted
            if row.reverted < row.expected:
                what = f"{row.expected - row.reverted} of its records" if row.many else "it"
                report.skipped.append(
                    {"table": table, "id": str(row.row_id), "reason": f"{what} changed since the run"}
                )


async def _undo_created_masters(conn: AsyncConnection, run_id: uuid.UUID, report: UndoReport, retries: int) -> None:
    """Last, once nothing the run linked points at them: delete each master the run created
    that nothing references (any FK in the database, from the catalog), keep the others."""
    async with conn.begin():
        created = list(await conn.execute(text(CREATED_MASTERS), {"run": run_id}))
        delete = await _unreferenced_masters_sql(conn)
    for start in range(0, len(created), 500):
        chunk = created[start : start + 500]

        async def batch(c: AsyncConnection, chunk: list[Any] = chunk) -> set[uuid.UUID]:
            deleted = set((await c.execute(text(delete), {"flows": [ch.new_value for ch in chunk]})).scalars())
            done = [ch.id for ch in chunk if ch.new_value in deleted]
            await c.execute(text("UPDATE flowfix_changes SET undone_at = now() WHERE id = ANY(:ids)"), {"ids": done})
            return deleted

        deleted = await transaction(conn, retries, batch)
        report.deleted_masters += len(deleted)
        report.kept_masters += len(chunk) - len(deleted)


async def _refuse_null_into_not_null(conn: Executor, run_id: uuid.UUID, tables: list[str]) -> None:
    """Before anything is written: a change whose old value is NULL (in ``tables``) cannot
    go back into a column that is NOT NULL now (discovery_flows.master_flow_id at head).
    The rollback order is undo first, then the downgrade; say so instead of failing."""
    if not tables:
        return
    nullable = await conn.run_sync(catalog.columns, tables)
    blocked = [t for t in tables if not nullable.get(t, {}).get("master_flow_id", True)]
    if blocked:
        raise FlowfixError(
            f"run {run_id} linked rows of {', '.join(blocked)}, whose master_flow_id is NOT NULL now: undoing it would"
            " write NULL there. Run `flowfix downgrade fix_master_flow_fk` first, then undo (nothing was changed)"
        )


async def _unreferenced_masters_sql(conn: Executor) -> str:
    """DELETE masters created by a run (``:flows``) only where no row anywhere references them:
    every FK in the database that points at the master table, read from the catalog
    (the application has tables flowfix does not know, some with ON DELETE CASCADE)."""
    refs = await conn.run_sync(catalog.referencing, MASTER_TABLE)
    guards = "".join(
        f" AND NOT EXISTS (SELECT 1 FROM {quote_qualified(ref.schema, ref.source)} x WHERE "
        + " AND ".join(
            f"x.{quote_ident(col)} = m.{quote_ident(target)}"
            for col, target in zip(ref.columns, ref.referenced, strict=True)
        )
        + ")"
        for ref in refs
    )
    return f"DELETE FROM {MASTER_TABLE} m WHERE m.flow_id = ANY(CAST(:flows AS uuid[])){guards} RETURNING m.flow_id"


# --- progress as rows: the ranges of a run's walks -----------------------------------------

#: One row per range of a walk (and one ``closing`` row per step for its closing pass),
#: after GitLab's batched_background_migration_jobs: bounds, status, attempts, rows
#: changed, time spent and the last error, each written in the transaction of the batch
#: it describes. Workers claim ranges with FOR UPDATE SKIP LOCKED; a resume walks the
#: ranges not done; a run's counts are sums over them, whichever process did the work.
#: Created by fix_master_flow_fk (new databases) and by ledger_progress_rows (databases
#: that were past it already): the same statements, safe to run twice.
CREATE_WALK_RANGES = (
    """CREATE TABLE IF NOT EXISTS flowfix_walk_ranges (
    id bigint GENERATED BY DEFAULT AS IDENTITY NOT NULL,
    run_id uuid NOT NULL,
    step text NOT NULL,
    relation text NOT NULL,
    walk text NOT NULL,
    lo_page bigint,
    hi_page bigint,
    next_page bigint,
    lo_key uuid,
    hi_key uuid,
    next_key uuid,
    status text DEFAULT 'pending' NOT NULL,
    attempts bigint DEFAULT 0 NOT NULL,
    batches bigint DEFAULT 0 NOT NULL,
    rows_changed bigint DEFAULT 0 NOT NULL,
    seconds double precision DEFAULT 0 NOT NULL,
    last_error text,
    created_at timestamptz DEFAULT now() NOT NULL,
    started_at timestamptz,
    updated_at timestamptz,
    finished_at timestamptz,
    CONSTRAINT pk_flowfix_walk_ranges PRIMARY KEY (id),
    CONSTRAINT fk_flowfix_walk_ranges_run_id FOREIGN KEY (run_id) REFERENCES flowfix_runs (id) ON DELETE CASCADE,
    CONSTRAINT ck_flowfix_walk_ranges_walk CHECK (walk IN ('ctid', 'key', 'closing')),
    CONSTRAINT ck_flowfix_walk_ranges_status CHECK (status IN ('pending', 'running', 'done', 'failed'))
)""",
    "CREATE INDEX IF NOT EXISTS ix_flowfix_walk_ranges_run_id ON flowfix_walk_ranges (run_id, step)",
)


class BadProgress(FlowfixError):
    """A stored range that the catalog contradicts: resuming it could walk the wrong rows."""


_RANGE_COLUMNS = "id, relation, walk, lo_page, hi_page, next_page, lo_key, hi_key, next_key"


def _range(row: Any) -> Any:
    from flowfix.walk import Range

    return Range(
        row.relation, row.walk, row.lo_page, row.hi_page, row.next_page, row.lo_key, row.hi_key, row.next_key, row.id
    )


async def resume_ranges(
    conn: Executor, run_id: uuid.UUID, step: str, table: str, leaves: Sequence[Any]
) -> list[Any] | None:
    """The stored ranges of ``step`` not done yet, made claimable again (their process
    died: the run lock says no other works on them), each checked against the catalog
    first; None when the walk has not begun (no range stored)."""
    rows = list(
        await conn.execute(
            text(
                f"SELECT {_RANGE_COLUMNS}, status FROM flowfix_walk_ranges"
                " WHERE run_id = :run AND step = :step AND walk <> 'closing' ORDER BY id"
            ),
            {"run": run_id, "step": step},
        )
    )
    if not rows:
        return None
    names = {leaf.name for leaf in leaves}
    for row in rows:
        problem = _bad_range(row, table, names)
        if problem:
            raise BadProgress(
                f"run {run_id}: stored range {row.id} of {step} {problem}; it was not written by flowfix:"
                f" fix or delete that row of flowfix_walk_ranges (the closing pass covers its rows), then rerun"
            )
    await conn.execute(
        text(
            "UPDATE flowfix_walk_ranges SET status = 'pending', updated_at = now()"
            " WHERE run_id = :run AND step = :step AND walk <> 'closing' AND status IN ('running', 'failed')"
        ),
        {"run": run_id, "step": step},
    )
    return [_range(row) for row in rows if row.status != "done"]


def _bad_range(row: Any, table: str, leaves: set[str]) -> str | None:
    """What is wrong with a stored range, or None."""
    if row.walk == "ctid":
        if row.relation not in leaves:
            return f"names {row.relation!r}, which is not a table holding rows of {table}"
        if None in (row.lo_page, row.hi_page, row.next_page):
            return "has no page bounds"
        if not 0 <= row.lo_page <= row.next_page <= row.hi_page:
            return f"has page bounds out of order ({row.lo_page} <= {row.next_page} <= {row.hi_page} is false)"
        return None
    if row.walk == "key":
        if row.relation != table:
            return f"names {row.relation!r}, not {table}"
        if None in (row.lo_key, row.hi_key, row.next_key) or not row.lo_key <= row.next_key <= row.hi_key:
            return "has key bounds missing or out of order"
        return None
    return f"has an unknown walk {row.walk!r}"


async def store_ranges(conn: Executor, run_id: uuid.UUID, step: str, ranges: Sequence[Any]) -> list[Any]:
    """Store a new walk's ranges, before the first batch; returns them with their ids."""
    out = []
    for r in ranges:
        row = (
            await conn.execute(
                text(
                    "INSERT INTO flowfix_walk_ranges (run_id, step, relation, walk, lo_page, hi_page, next_page,"
                    " lo_key, hi_key, next_key) VALUES (:run, :step, :relation, :walk, :lo_page, :hi_page,"
                    f" :next_page, :lo_key, :hi_key, :next_key) RETURNING {_RANGE_COLUMNS}"
                ),
                {
                    "run": run_id,
                    "step": step,
                    "relation": r.relation,
                    "walk": r.walk,
                    "lo_page": r.lo_page,
                    "hi_page": r.hi_page,
                    "next_page": r.next_page,
                    "lo_key": r.lo_key,
                    "hi_key": r.hi_key,
                    "next_key": r.next_key,
                },
            )
        ).one()
        out.append(_range(row))
    return out


async def claim_range(conn: Executor, run_id: uuid.UUID, step: str) -> Any | None:
    """The next pending range of ``step``, now running and one attempt more; a range
    another worker is claiming is skipped (FOR UPDATE SKIP LOCKED), never waited for."""
    row = (
        await conn.execute(
            text(
                "UPDATE flowfix_walk_ranges SET status = 'running', attempts = attempts + 1,"
                " started_at = COALESCE(started_at, now()), updated_at = now()"
                " WHERE id = (SELECT id FROM flowfix_walk_ranges WHERE run_id = :run AND step = :step"
                " AND walk <> 'closing' AND status = 'pending' ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)"
                f" RETURNING {_RANGE_COLUMNS}"
            ),
            {"run": run_id, "step": step},
        )
    ).one_or_none()
    return None if row is None else _range(row)


async def advance_range(
    conn: Executor, part: Any, position: Any, changed: int, seconds: float, *, done: bool = False
) -> None:
    """Range ``part`` is walked up to ``position`` (a page, a key, or None) by a batch
    that changed ``changed`` rows: in that batch's transaction, so a resume neither
    redoes nor skips, and the counts are exact."""
    page = position if isinstance(position, int) else None
    key = position if isinstance(position, uuid.UUID) else None
    await conn.execute(
        text(
            "UPDATE flowfix_walk_ranges SET next_page = COALESCE(CAST(:page AS bigint), next_page),"
            " next_key = COALESCE(CAST(:key AS uuid), next_key), rows_changed = rows_changed + :changed,"
            " batches = batches + 1, seconds = seconds + :seconds, updated_at = now(),"
            " status = CASE WHEN :done THEN 'done' ELSE status END,"
            " finished_at = CASE WHEN :done THEN now() END WHERE id = :id"
        ),
        {"id": part.id, "page": page, "key": key, "changed": changed, "seconds": seconds, "done": done},
    )


async def fail_range(conn: AsyncConnection, part: Any, exc: BaseException) -> None:
    """Note why a range stopped (best effort: the connection may be what failed)."""
    try:
        async with conn.begin():
            await conn.execute(
                text(
                    "UPDATE flowfix_walk_ranges SET status = 'failed', updated_at = now(), last_error = :e"
                    " WHERE id = :id"
                ),
                {"id": part.id, "e": (str(exc).splitlines() or [type(exc).__name__])[0][:500]},
            )
    except Exception:  # noqa: BLE001, S110 - the first error is the one reported
        pass


async def closing_range(conn: Executor, run_id: uuid.UUID, step: str, table: str) -> Any:
    """The row of ``step``'s closing pass, running now (one attempt more on a resume)."""
    row = (
        await conn.execute(
            text(
                "UPDATE flowfix_walk_ranges SET status = 'running', attempts = attempts + 1, updated_at = now(),"
                " started_at = COALESCE(started_at, now())"
                f" WHERE run_id = :run AND step = :step AND walk = 'closing' RETURNING {_RANGE_COLUMNS}"
            ),
            {"run": run_id, "step": step},
        )
    ).one_or_none()
    if row is None:
        row = (
            await conn.execute(
                text(
                    "INSERT INTO flowfix_walk_ranges (run_id, step, relation, walk, status, attempts, started_at,"
                    " updated_at) VALUES (:run, :step, :relation, 'closing', 'running', 1, now(), now())"
                    f" RETURNING {_RANGE_COLUMNS}"
                ),
                {"run": run_id, "step": step, "relation": table},
            )
        ).one()
    return _range(row)


@dataclass
class StepProgress:
    """One step of a run, summed over its progress rows (every process that worked on it):
    the records walk's ranges, or the import links the run stored (``walk`` "plan").
    ``units_done``/``units_total``: how much of the step is behind it (pages of a page
    walk, the key space of a key walk, links of the plan); ``workers``: ranges claimed
    right now."""

    step: str
    walk: str
    ranges: int
    done: int
    rows_changed: int
    closing_rows: int
    batches: int
    attempts: int
    seconds: float
    last_error: str | None
    started_at: datetime | None
    updated_at: datetime | None
    units_done: float = 0.0
    units_total: float = 0.0
    workers: int = 0
    closing_done: bool = False

    @property
    def fraction(self) -> float | None:
        """How much of the step is done, 0..1 (None: nothing to measure it by yet)."""
        if self.walk == "plan" or self.units_total > 0:
            return 1.0 if self.units_total <= 0 else min(1.0, self.units_done / self.units_total)
        return 1.0 if self.closing_done else None

    @property
    def finished(self) -> bool:
        return self.closing_done or (self.walk == "plan" and self.done >= self.ranges)

    def elapsed(self, now: datetime) -> float:
        return max(0.0, (now - self.started_at).total_seconds()) if self.started_at else 0.0

    def rate(self, now: datetime) -> float | None:
        """Rows changed per second of wall time since the step began."""
        elapsed = self.elapsed(now)
        return self.rows_changed / elapsed if elapsed > 0 else None

    def eta_seconds(self, now: datetime) -> float | None:
        """Seconds left at the pace so far (wall time since the step began, so pauses and
        a resumed run's gap count against it: an ETA that errs late)."""
        fraction = self.fraction
        if self.finished or fraction is None or fraction <= 0:
            return None if not self.finished else 0.0
        return self.elapsed(now) * (1 - fraction) / fraction


@dataclass
class RunProgress:
    """``flowfix runs RUN``: the run, its steps, whether a process works on it now (holds
    the run lock), and what it said about its pauses (``live``)."""

    run: RunInfo
    steps: list[StepProgress]
    active: bool = False
    now: datetime | None = None

    @property
    def live(self) -> dict[str, Any]:
        found = self.run.counts.get(LIVE)
        return found if isinstance(found, dict) else {}


#: The key of a running run's ``counts`` where it keeps what another shell shows: the
#: pause it is in (signal, why, since), pauses so far per signal, throttle blind spots.
#: The finished run's counts replace it.
LIVE = "live"

#: Record a run's live state (one short transaction between batches).
NOTE_LIVE = """UPDATE flowfix_runs SET counts = jsonb_set(COALESCE(counts, '{}'::jsonb), '{live}', CAST(:live AS jsonb))
WHERE id = :run AND status = 'running'"""


async def note_live(conn: AsyncConnection, run_id: uuid.UUID, live: dict[str, Any]) -> None:
    async with conn.begin():
        await conn.execute(text(NOTE_LIVE), {"run": run_id, "live": json.dumps(live, default=str)})


#: Per step: ranges done/total, rows, attempts, the newest error (closing pass included).
RUN_PROGRESS = """
SELECT step,
       COALESCE(min(walk) FILTER (WHERE walk <> 'closing'), '') AS walk,
       count(*) FILTER (WHERE walk <> 'closing') AS ranges,
       count(*) FILTER (WHERE walk <> 'closing' AND status = 'done') AS done,
       COALESCE(sum(rows_changed), 0)::bigint AS rows_changed,
       COALESCE(sum(rows_changed) FILTER (WHERE walk = 'closing'), 0)::bigint AS closing_rows,
       COALESCE(sum(batches), 0)::bigint AS batches,
       COALESCE(sum(attempts), 0)::bigint AS attempts,
       COALESCE(sum(seconds), 0)::float8 AS seconds,
       (array_agg(last_error ORDER BY updated_at DESC) FILTER (WHERE last_error IS NOT NULL))[1] AS last_error,
       min(started_at) AS started_at,
       max(updated_at) AS updated_at,
       count(*) FILTER (WHERE status = 'running' AND walk <> 'closing')::int AS workers,
       COALESCE(bool_or(walk = 'closing' AND status = 'done'), false) AS closing_done
FROM flowfix_walk_ranges WHERE run_id = :run GROUP BY step ORDER BY min(id)
"""

#: Each range of a walk: how far it got (pages, or keys, whose share of the key space
#: :func:`_units` computes: uuids are spread evenly, so it tracks rows too).
RANGE_UNITS = """
SELECT step, walk, status, lo_page, hi_page, next_page, lo_key, hi_key, next_key
FROM flowfix_walk_ranges WHERE run_id = :run AND walk <> 'closing'
"""

#: The import links a backfill stored: planned, applied or skipped (done), when.
IMPORT_PROGRESS = """
SELECT count(*)::int AS ranges,
       count(*) FILTER (WHERE applied_at IS NOT NULL OR skipped IS NOT NULL)::int AS done,
       count(*) FILTER (WHERE applied_at IS NOT NULL)::bigint AS rows_changed,
       min(applied_at) AS started_at, max(applied_at) AS updated_at
FROM flowfix_changes WHERE run_id = :run AND table_name = 'data_imports' AND column_name = 'master_flow_id'
"""

#: Whether some session works on this run (:func:`hold_run`: an advisory lock on the two
#: int4 keys, which pg_locks shows as classid and objid with objsubid 2).
RUN_HELD = """
SELECT EXISTS (
  SELECT 1 FROM pg_locks l
  WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
    AND l.classid = (hashtext(:k)::bigint & 4294967295)::oid
    AND l.objid = (hashtext(CAST(:run AS text))::bigint & 4294967295)::oid)
"""

#: Whether some session holds the run lock (:func:`run_lock`: a session-level advisory
#: lock on ``hashtext(key)``, which pg_locks shows as its high and low 32 bits).
RUN_LOCK_HELD = """
WITH k AS (SELECT hashtext(:k)::bigint AS v)
SELECT EXISTS (
  SELECT 1 FROM pg_locks l, k
  WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
    AND l.classid = ((k.v >> 32) & 4294967295)::oid AND l.objid = (k.v & 4294967295)::oid)
"""


def _units(r: Any) -> tuple[float, float]:
    """(done, total) of one range: pages, or its share of the key space."""
    if r.walk == "ctid":
        total = float(r.hi_page - r.lo_page)
        at = r.hi_page if r.status == "done" else min(r.next_page if r.next_page is not None else r.lo_page, r.hi_page)
        return float(at - r.lo_page), total
    lo, hi = r.lo_key.int, r.hi_key.int
    at = hi if r.status == "done" else min(max((r.next_key or r.lo_key).int, lo), hi)
    scale = float(2**128)
    return (at - lo) / scale, (hi - lo) / scale


async def run_held(conn: Executor, run_id: uuid.UUID) -> bool:
    """Whether a process works on ``run_id`` now (holds the run lock for this run)."""
    return bool((await conn.execute(text(RUN_HELD), {"k": ADVISORY_LOCK_KEY, "run": str(run_id)})).scalar_one())


async def run_progress(conn: Executor, run_id: uuid.UUID) -> RunProgress:
    """``flowfix runs RUN``: the run and, per step, its progress rows; whether a process
    holds the run lock now (a run marked running without one was interrupted)."""
    await require_ledger(conn)
    # the lock first: a run commits its end before it lets go of the lock, so a run seen
    # unheld here and marked running in the (later) read of its row was interrupted
    held = await run_held(conn, run_id)
    row = (
        (
            await conn.execute(
                text(SELECT_RUNS + " WHERE id = :run"),
                {"run": run_id},
            )
        )
        .mappings()
        .one_or_none()
    )
    if row is None:
        raise UnknownRun(f"no flowfix run with id {run_id} (see `flowfix runs`)")
    now = (await conn.execute(text("SELECT now()"))).scalar_one()
    steps: list[StepProgress] = []
    if row["command"] == "backfill":
        imports = (await conn.execute(text(IMPORT_PROGRESS), {"run": run_id})).mappings().one()
        if imports["ranges"]:
            steps.append(
                StepProgress(
                    step="data_imports",
                    walk="plan",
                    closing_rows=0,
                    batches=0,
                    attempts=0,
                    seconds=0.0,
                    last_error=None,
                    units_done=float(imports["done"]),
                    units_total=float(imports["ranges"]),
                    **imports,
                )
            )
    present = (await conn.execute(text("SELECT to_regclass('flowfix_walk_ranges') IS NOT NULL"))).scalar_one()
    if present:
        units: dict[str, list[float]] = {}
        for r in await conn.execute(text(RANGE_UNITS), {"run": run_id}):
            done, total = _units(r)
            units.setdefault(r.step, [0.0, 0.0])
            units[r.step][0] += done
            units[r.step][1] += total
        for step in (await conn.execute(text(RUN_PROGRESS), {"run": run_id})).mappings():
            done, total = units.get(step["step"], [0.0, 0.0])
            steps.append(StepProgress(**step, units_done=done, units_total=total))
    active = row["status"] == "running" and held
    return RunProgress(RunInfo(**row), steps, active=active, now=now)
