"""The ledger: every run that changes links (link, and later backfill) and every value it
changed, so that ``flowfix undo RUN_ID`` can put them back.

Tables (created by revision fix_master_flow_fk): ``flowfix_runs`` and ``flowfix_changes``.
Undo reverts a change only where the row still holds the value the run wrote: a later
edit by anyone else is never clobbered, it is reported instead.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from flowfix import catalog
from flowfix.errors import FlowfixError
from flowfix.models import CHILD_TABLES, MASTER_TABLE

Executor = AsyncConnection | AsyncSession

#: One advisory lock for every run that changes links: backfill, link, undo.
ADVISORY_LOCK_KEY = "flowfix.runs"

#: Undo builds UPDATE/DELETE statements from ledger rows; only these names may appear.
UNDOABLE_COLUMNS = {(table, "master_flow_id") for table in CHILD_TABLES}
CREATED_ROW = "*created*"  # column name of a change that created a whole row


class LedgerMissing(FlowfixError):
    """The ledger tables do not exist yet."""


class RunLocked(FlowfixError):
    """Another flowfix run holds the lock."""


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


async def try_lock(conn: Executor) -> None:
    """Take the per-database run lock for this transaction, or fail at once."""
    got = (
        await conn.execute(text("SELECT pg_try_advisory_xact_lock(hashtext(:k))"), {"k": ADVISORY_LOCK_KEY})
    ).scalar_one()
    if not got:
        raise RunLocked("another flowfix run (backfill, link or undo) is in progress on this database; try again later")


async def start_run(conn: Executor, command: str, arguments: dict[str, Any]) -> uuid.UUID:
    run_id: uuid.UUID = (
        await conn.execute(
            text("INSERT INTO flowfix_runs (command, arguments) VALUES (:c, CAST(:a AS jsonb)) RETURNING id"),
            {"c": command, "a": json.dumps(arguments, default=str)},
        )
    ).scalar_one()
    return run_id


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


async def list_runs(conn: Executor, limit: int = 20) -> list[RunInfo]:
    await require_ledger(conn)
    rows = (
        await conn.execute(
            text(
                "SELECT id, command, status, arguments, counts, started_at, finished_at FROM flowfix_runs"
                " ORDER BY started_at DESC, id LIMIT :n"
            ),
            {"n": limit},
        )
    ).mappings()
    return [RunInfo(**row) for row in rows]


async def undo(conn: Executor, run_id: uuid.UUID) -> UndoReport:
    """Revert ``run_id`` inside the caller's transaction, which has checked the ledger and
    holds the run lock (:func:`undo_run`). Everything is checked before the first write."""
    run = (
        await conn.execute(text("SELECT command, status FROM flowfix_runs WHERE id = :id FOR UPDATE"), {"id": run_id})
    ).one_or_none()
    if run is None:
        raise UnknownRun(f"no flowfix run with id {run_id} (see `flowfix runs`)")
    if run.command == "undo":
        raise UnknownRun(f"run {run_id} is an undo run, which cannot be undone: run the backfill or link again instead")
    if run.status == "undone":
        return UndoReport(run_id=run_id, undo_run_id=None, already_undone=True)

    changes = (
        await conn.execute(
            text(
                "SELECT id, table_name, row_id, column_name, old_value, new_value, row_ids FROM flowfix_changes"
                " WHERE run_id = :id AND applied_at IS NOT NULL AND undone_at IS NULL ORDER BY id DESC"
            ),
            {"id": run_id},
        )
    ).all()
    await _refuse_null_into_not_null(conn, run_id, changes)
    undo_run = await start_run(conn, "undo", {"run_id": str(run_id)})
    report = UndoReport(run_id=run_id, undo_run_id=undo_run)
    for ch in changes:
        if ch.column_name == CREATED_ROW:
            continue  # created rows go last, once nothing the run linked points at them
        if (ch.table_name, ch.column_name) not in UNDOABLE_COLUMNS:
            raise FlowfixError(
                f"ledger change {ch.id} names {ch.table_name}.{ch.column_name}, which undo does not touch"
            )
        # one change may stand for many rows (a batch of an import's records): row_ids
        rows = list(ch.row_ids) if ch.row_ids is not None else [ch.row_id]
        result = await conn.execute(
            text(
                f"UPDATE {ch.table_name} SET master_flow_id = :old"
                " WHERE id = ANY(:rows) AND master_flow_id IS NOT DISTINCT FROM :new"
            ),
            {"old": ch.old_value, "new": ch.new_value, "rows": rows},
        )
        reverted, expected = result.rowcount, len(rows)  # type: ignore[attr-defined]
        report.reverted += reverted
        if reverted:
            await conn.execute(text("UPDATE flowfix_changes SET undone_at = now() WHERE id = :id"), {"id": ch.id})
        if reverted < expected:
            what = f"{expected - reverted} of its records" if ch.row_ids is not None else "it"
            report.skipped.append(
                {"table": ch.table_name, "id": str(ch.row_id), "reason": f"{what} changed since the run"}
            )
    created = [ch for ch in changes if ch.column_name == CREATED_ROW and ch.table_name == MASTER_TABLE]
    if created:
        unreferenced = await _unreferenced_master_sql(conn)
    for ch in created:
        deleted = (await conn.execute(text(unreferenced), {"flow": ch.new_value})).first()
        if deleted:
            report.deleted_masters += 1
            await conn.execute(text("UPDATE flowfix_changes SET undone_at = now() WHERE id = :id"), {"id": ch.id})
        else:
            report.kept_masters += 1
    counts = {
        "reverted": report.reverted,
        "skipped": len(report.skipped),
        "deleted_masters": report.deleted_masters,
        "kept_masters": report.kept_masters,
    }
    await finish_run(conn, undo_run, "finished", counts)
    await conn.execute(text("UPDATE flowfix_runs SET status = 'undone' WHERE id = :id"), {"id": run_id})
    return report


async def _refuse_null_into_not_null(conn: Executor, run_id: uuid.UUID, changes: Any) -> None:
    """Before anything is written: a change whose old value is NULL cannot go back into a
    column that is NOT NULL now (discovery_flows.master_flow_id at head). The rollback
    order is undo first, then the downgrade; say so instead of failing half-way."""
    tables = sorted({ch.table_name for ch in changes if ch.old_value is None and ch.column_name != CREATED_ROW})
    if not tables:
        return
    nullable = await conn.run_sync(catalog.columns, tables)
    blocked = [t for t in tables if not nullable.get(t, {}).get("master_flow_id", True)]
    if blocked:
        raise FlowfixError(
            f"run {run_id} linked rows of {', '.join(blocked)}, whose master_flow_id is NOT NULL now: undoing it would"
            " write NULL there. Run `flowfix downgrade fix_master_flow_fk` first, then undo (nothing was changed)"
        )


async def _unreferenced_master_sql(conn: Executor) -> str:
    """DELETE a master created by a run (``:flow``) only if no row anywhere references it:
    every FK in the database that points at the master table, read from the catalog
    (the application has tables flowfix does not know, some with ON DELETE CASCADE)."""
    refs = await conn.run_sync(catalog.referencing, MASTER_TABLE)
    guards = "".join(
        f" AND NOT EXISTS (SELECT 1 FROM {ref.source} x WHERE "
        + " AND ".join(f"x.{col} = m.{target}" for col, target in zip(ref.columns, ref.referenced, strict=True))
        + ")"
        for ref in refs
    )
    return f"DELETE FROM {MASTER_TABLE} m WHERE m.flow_id = :flow{guards} RETURNING m.id"


async def undo_run(session: AsyncSession, run_id: uuid.UUID) -> UndoReport:
    """``flowfix undo``: lock, revert, record, commit, in one transaction."""
    async with session.begin():
        await require_ledger(session)
        await session.run_sync(catalog.require_full_visibility, "undo")
        await try_lock(session)
        return await undo(session, run_id)
