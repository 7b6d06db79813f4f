"""``flowfix validate``: prove the master-flow links are sound, fast enough for CI.

Each check reports a status (pass / warn / fail), an exact count and up to N sample row
ids ordered by id. Counts come from one scan per table (every row check of that table
is a ``FILTER`` of the same aggregate), joined only on unique keys, so nothing fans
out; samples are read only for checks that found something. Everything runs in one
READ ONLY, REPEATABLE READ transaction: a role with SELECT only can run it, and all the
counts describe the same snapshot.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from flowfix import catalog
from flowfix.alembic_runner import head
from flowfix.config import VERSION_TABLE, Settings
from flowfix.db import connect
from flowfix.errors import FlowfixError
from flowfix.models import CHILD_TABLES, MASTER_TABLE, RECORD_TENANT_SCOPE, TENANT_SCOPE
from flowfix.tenancy import unknown_matches_sql

Status = Literal["pass", "warn", "fail"]
FailOn = Literal["error", "warn"]

#: The master table as a join target. With a unique flow_id (after fix_master_flow_fk) it
#: is joined directly; before that, duplicate flow_ids would multiply rows, so it is
#: first reduced to one row per flow_id.
MASTERS_UNIQUE = MASTER_TABLE
MASTERS_DEDUPED = (
    f"(SELECT DISTINCT ON (flow_id) flow_id, client_account_id, engagement_id FROM {MASTER_TABLE} ORDER BY flow_id, id)"
)


TENANT_DIFFERS = f"m.flow_id IS NOT NULL AND NOT {unknown_matches_sql('t', 'm')}"


@dataclass(frozen=True)
class RowCheck:
    """A condition on the rows of one table; ``t`` is the row, ``m`` its master (NULL if
    none), ``i`` a record's import."""

    name: str
    table: str
    predicate: str
    severity: Status  # the status when rows match


ROW_CHECKS: tuple[RowCheck, ...] = (
    *(RowCheck(f"{t}.orphaned", t, "t.master_flow_id IS NULL", "fail") for t in CHILD_TABLES),
    *(RowCheck(f"{t}.dangling", t, "t.master_flow_id IS NOT NULL AND m.flow_id IS NULL", "fail") for t in CHILD_TABLES),
    *(RowCheck("tenant_mismatch", t, TENANT_DIFFERS, "fail") for t in CHILD_TABLES),
    RowCheck(
        "record_import_disagreement",
        "raw_import_records",
        "t.master_flow_id IS NOT NULL AND t.master_flow_id IS DISTINCT FROM i.master_flow_id",
        "fail",
    ),
    RowCheck(
        "discovery_flow_identity",
        "discovery_flows",
        "t.master_flow_id IS NOT NULL AND t.master_flow_id <> t.flow_id",
        "warn",
    ),
)

#: The order checks are reported in.
CHECK_ORDER: tuple[str, ...] = (
    *(f"{t}.orphaned" for t in CHILD_TABLES),
    *(f"{t}.dangling" for t in CHILD_TABLES),
    "tenant_mismatch",
    "record_import_disagreement",
    "discovery_flow_identity",
    "data_imports.shared_master",
    *(f"fk.{t}" for t in CHILD_TABLES),
    "discovery_flows.not_null",
    "revision",
    "rls_visibility",
)


def _from(table: str, masters: str) -> str:
    joins = f"{table} t LEFT JOIN {masters} m ON m.flow_id = t.master_flow_id"
    if table == "raw_import_records":
        joins += " LEFT JOIN data_imports i ON i.id = t.data_import_id"
    return joins


def _scope(table: str) -> str:
    """--client-account / --engagement: records without tenant columns count for their import's."""
    return RECORD_TENANT_SCOPE if table == "raw_import_records" else TENANT_SCOPE


def count_sql(table: str, checks: Sequence[RowCheck], masters: str) -> str:
    """One scan of ``table`` counting every row check at once."""
    columns = ",\n       ".join(f"count(*) FILTER (WHERE {c.predicate}) AS c{n}" for n, c in enumerate(checks))
    return f"SELECT {columns}\nFROM {_from(table, masters)}\nWHERE {_scope(table)}"


def sample_sql(check: RowCheck, masters: str) -> str:
    return (
        f"SELECT t.id FROM {_from(check.table, masters)}\n"
        f"WHERE {_scope(check.table)} AND ({check.predicate})\nORDER BY t.id LIMIT :limit"
    )


@dataclass
class Check:
    name: str
    status: Status
    count: int = 0
    samples: list[str] = field(default_factory=list)
    message: str = ""


@dataclass
class Report:
    revision: str | None
    checks: list[Check]
    fail_on: FailOn = "error"
    #: flowfix's head revision, and how long the checks took (for monitoring)
    head: str | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        bad: set[str] = {"fail", "warn"} if self.fail_on == "warn" else {"fail"}
        return not any(c.status in bad for c in self.checks)

    def check(self, name: str) -> Check:
        return next(c for c in self.checks if c.name == name)


@dataclass(frozen=True)
class Options:
    samples: int = 5
    max_orphans: int = 0
    allow_rls: bool = False
    fail_on: FailOn = "error"
    client_account: uuid.UUID | None = None
    engagement: uuid.UUID | None = None


async def _row_checks(conn: AsyncConnection, opts: Options, masters: str) -> dict[str, Check]:
    params = {"client": opts.client_account, "engagement": opts.engagement}
    found: dict[str, list[tuple[RowCheck, int]]] = {}
    for table in CHILD_TABLES:
        checks = [c for c in ROW_CHECKS if c.table == table]
        row = (await conn.execute(text(count_sql(table, checks, masters)), params)).one()
        for check, count in zip(checks, row, strict=True):
            found.setdefault(check.name, []).append((check, int(count)))

    out: dict[str, Check] = {}
    for name, parts in found.items():
        total = sum(n for _, n in parts)
        samples: list[str] = []
        for check, n in parts:
            if n and opts.samples:
                ids = (
                    await conn.execute(text(sample_sql(check, masters)), {**params, "limit": opts.samples})
                ).scalars()
                prefix = f"{check.table}:" if len(parts) > 1 else ""
                samples += [f"{prefix}{i}" for i in ids]
        severity = parts[0][0].severity
        status: Status = "pass" if total == 0 else severity
        if name.endswith(".orphaned") and 0 < total <= opts.max_orphans:
            status = "warn"
        out[name] = Check(name, status, total, samples[: opts.samples], _describe(name, total, opts))
    return out


#: Masters linked to more than one import: by time a master goes to one import only, so
#: each is a link to look at (two application writes, or a run that raced one).
SHARED_MASTERS = f"""
SELECT count(*) AS n, (array_agg(master_flow_id ORDER BY master_flow_id))[1:CAST(:limit AS int)] AS samples
FROM (SELECT t.master_flow_id FROM data_imports t WHERE t.master_flow_id IS NOT NULL AND {TENANT_SCOPE}
      GROUP BY t.master_flow_id HAVING count(*) > 1) g
"""


async def _shared_masters(conn: AsyncConnection, opts: Options) -> Check:
    params = {"client": opts.client_account, "engagement": opts.engagement, "limit": opts.samples}
    row = (await conn.execute(text(SHARED_MASTERS), params)).one()
    count = int(row.n)
    samples = [str(m) for m in row.samples or []][: opts.samples]
    message = "masters linked to more than one import (by time a master goes to one import)"
    return Check("data_imports.shared_master", "warn" if count else "pass", count, samples, message)


def _describe(name: str, count: int, opts: Options) -> str:
    if name.endswith(".orphaned"):
        base = "rows with master_flow_id NULL"
        return f"{base} (accepted backlog: {opts.max_orphans})" if opts.max_orphans else base
    return {
        "tenant_mismatch": "rows linked to a master of another tenant (a data leak)",
        "record_import_disagreement": "records whose master_flow_id differs from their import's",
        "discovery_flow_identity": "discovery flows whose master_flow_id is not their own flow_id",
    }.get(name, "master_flow_id values that match no master's flow_id")


def _schema_checks(conn, revision: str | None) -> list[Check]:  # type: ignore[no-untyped-def]
    """Sync (run via run_sync): FKs, NOT NULL, revision."""
    checks: list[Check] = []
    for table in CHILD_TABLES:
        fks = catalog.foreign_keys(conn, table, "master_flow_id")
        good = [f for f in fks if f.target_table == MASTER_TABLE and f.target_column == "flow_id"]
        wrong = [f"{f.name} -> {f.target_table}({f.target_column})" for f in fks if f not in good]
        target = f"{good[0].name} -> {MASTER_TABLE}(flow_id) {good[0].rule}" if good else ""
        if good and all(f.validated for f in good) and not wrong:
            checks.append(Check(f"fk.{table}", "pass", 0, [], f"{target}, validated"))
        elif good and not wrong:
            checks.append(Check(f"fk.{table}", "fail", 0, [], f"{target} is NOT VALID"))
        else:
            what = ", ".join(wrong) if wrong else "no foreign key"
            checks.append(Check(f"fk.{table}", "fail", 0, [], f"{what}; expected -> {MASTER_TABLE}(flow_id)"))
    nullable = catalog.columns(conn, ["discovery_flows"]).get("discovery_flows", {}).get("master_flow_id", True)
    checks.append(
        Check(
            "discovery_flows.not_null",
            "warn" if nullable else "pass",
            0,
            [],
            "master_flow_id is nullable (until enforce_master_flow_not_null)"
            if nullable
            else "master_flow_id is NOT NULL",
        )
    )
    if revision is None:
        checks.append(Check("revision", "fail", 0, [], f"no flowfix revision recorded ({VERSION_TABLE})"))
    elif revision != head():
        checks.append(Check("revision", "warn", 0, [], f"at {revision}; head is {head()}"))
    else:
        checks.append(Check("revision", "pass", 0, [], f"at head ({head()})"))
    return checks


def _rls_check(conn, allow: bool) -> Check:  # type: ignore[no-untyped-def]
    hidden = catalog.rls_limited_tables(conn, [MASTER_TABLE, *CHILD_TABLES])
    if not hidden:
        return Check("rls_visibility", "pass", 0, [], "every row is visible to this role")
    message = f"row-level security may hide rows from this role on: {', '.join(hidden)}; counts may be partial"
    return Check(
        "rls_visibility",
        "warn" if allow else "fail",
        len(hidden),
        hidden,
        message + (" (accepted with --allow-rls)" if allow else "; use a role that bypasses RLS, or --allow-rls"),
    )


def require_tables(conn, schema: str) -> None:  # type: ignore[no-untyped-def]
    """Stop with one clear line when the schema does not hold the tables (wrong
    FLOWFIX_SCHEMA or database) instead of failing on the first query."""
    wanted = [MASTER_TABLE, *CHILD_TABLES]
    present = catalog.columns(conn, wanted)
    missing = [t for t in wanted if t not in present]
    if missing:
        elsewhere = catalog.schemas_holding(conn, missing[0])
        hint = (
            f"schema {', '.join(elsewhere)} has it: set FLOWFIX_SCHEMA"
            if elsewhere
            else "check DATABASE_URL and FLOWFIX_SCHEMA"
        )
        raise FlowfixError(f"schema '{schema}' has no table {', '.join(missing)}; {hint}")


async def validate(engine: AsyncEngine, settings: Settings, opts: Options = Options()) -> Report:
    """Run every check in one read-only snapshot and return the report."""
    started = time.perf_counter()
    async with connect(engine, settings) as raw:
        conn = await raw.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        async with conn.begin():
            await conn.run_sync(require_tables, settings.schema)
            revision = await conn.run_sync(catalog.readable_revision)
            unique = await conn.run_sync(catalog.has_unique_index, MASTER_TABLE, "flow_id")
            masters = MASTERS_UNIQUE if unique else MASTERS_DEDUPED
            rows = await _row_checks(conn, opts, masters)
            shared = await _shared_masters(conn, opts)
            schema_checks = await conn.run_sync(_schema_checks, revision)
            rls = await conn.run_sync(_rls_check, opts.allow_rls)
    by_name = {**rows, shared.name: shared, **{c.name: c for c in schema_checks}, rls.name: rls}
    checks = [by_name[n] for n in CHECK_ORDER]
    return Report(revision, checks, opts.fail_on, head=head(), seconds=round(time.perf_counter() - started, 3))


def next_step(report: Report) -> str:
    """The runbook step that comes next for the database this report describes."""
    if report.revision is None:
        return "flowfix upgrade legacy (adopt the tables), then flowfix upgrade fix_master_flow_fk"
    if report.revision == "legacy":
        return "flowfix upgrade fix_master_flow_fk (repoint the FKs to flow_id, online)"
    if report.check("tenant_mismatch").count:
        return "investigate the cross-tenant links first: flowfix validate --samples 20"
    orphans = sum(report.check(f"{t}.orphaned").count + report.check(f"{t}.dangling").count for t in CHILD_TABLES)
    if orphans:
        return "flowfix backfill --dry-run, then flowfix backfill --window 2h, then flowfix validate"
    if report.revision == "fix_master_flow_fk":
        return "flowfix upgrade head (enforce discovery_flows.master_flow_id NOT NULL)"
    if report.revision != head():
        return "flowfix upgrade head"
    return (
        "nothing: run flowfix validate in CI to keep it that way"
        if report.ok
        else "flowfix validate (see the failures)"
    )
