"""Least privilege: who may touch flowfix's own tables, and what each command needs.

flowfix's own tables (its version table, bookkeeping, quarantine, translations and the
ledger) decide what a downgrade or an undo writes into the application's tables, so no
role but their owner may change them unless a DBA grants it (docs/roles-and-poolers.md
has the grants for the three roles). :data:`REVOKE_DEFAULT_GRANTS` takes back what
PUBLIC or the schema's default privileges (``ALTER DEFAULT PRIVILEGES ... GRANT``) gave
them when they were created; the revisions that create them run it, and revision
``ledger_privileges`` runs it on databases that had them before.

:data:`NEEDS` lists what each command reads and writes, checked with
``has_table_privilege`` before a command changes anything (:func:`missing`), so a role
that lacks a grant gets one line naming the table and the privilege, with nothing
changed, instead of failing half-way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from flowfix.config import VERSION_TABLE
from flowfix.errors import DatabaseRefused
from flowfix.models import CHILD_TABLES, MASTER_TABLE

#: flowfix's own tables, in the order they are created.
FLOWFIX_TABLES = (
    VERSION_TABLE,
    "flowfix_schema_changes",
    "flowfix_quarantine",
    "flowfix_translations",
    "flowfix_runs",
    "flowfix_changes",
    "flowfix_walk_ranges",
)

#: Revoke every privilege on flowfix's tables (and the sequences of their identity
#: columns) from PUBLIC and from each role the default privileges of the table's owner
#: grant to (in this schema, or everywhere). The owner keeps its own; a grant a DBA made
#: explicitly (the roles' recipes) stays. Idempotent: run again, it finds nothing.
REVOKE_DEFAULT_GRANTS = """DO $privileges$
DECLARE r record;
BEGIN
  FOR r IN
    WITH ours AS (
      SELECT c.oid FROM pg_class c
      WHERE c.oid = ANY (ARRAY[to_regclass('flowfix_alembic_version'), to_regclass('flowfix_schema_changes'),
                               to_regclass('flowfix_quarantine'), to_regclass('flowfix_translations'),
                               to_regclass('flowfix_runs'), to_regclass('flowfix_changes'),
                               to_regclass('flowfix_walk_ranges')])
      UNION
      SELECT d.objid FROM pg_depend d
      WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
        AND d.refobjid = ANY (ARRAY[to_regclass('flowfix_schema_changes'), to_regclass('flowfix_changes'),
                                     to_regclass('flowfix_walk_ranges')])
    )
    SELECT DISTINCT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END AS kind, c.oid::regclass AS object,
           CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(g.rolname) END AS grantee
    FROM pg_class c
    JOIN ours ON ours.oid = c.oid
    CROSS JOIN LATERAL aclexplode(c.relacl) a
    LEFT JOIN pg_roles g ON g.oid = a.grantee
    WHERE a.grantee <> c.relowner
      AND (a.grantee = 0 OR EXISTS (
        SELECT 1 FROM pg_default_acl d CROSS JOIN LATERAL aclexplode(d.defaclacl) da
        WHERE d.defaclrole = c.relowner AND d.defaclnamespace IN (0, c.relnamespace)
          AND d.defaclobjtype = CASE c.relkind WHEN 'S' THEN 'S' ELSE 'r' END AND da.grantee = a.grantee))
  LOOP
    EXECUTE format('REVOKE ALL ON %s %s FROM %s', r.kind, r.object, r.grantee);
  END LOOP;
END $privileges$"""


#: Need.column for "some column of the table" (has_any_column_privilege).
ANY_COLUMN = "*"


@dataclass(frozen=True)
class Need:
    """A privilege a command needs on a table, or on one column of it (the links are
    written by a column grant: ``GRANT UPDATE (master_flow_id) ...``), or on any column
    (``ANY_COLUMN``: what a read of some columns needs)."""

    table: str
    privilege: str  # SELECT, INSERT, UPDATE, DELETE
    column: str | None = None

    def __str__(self) -> str:
        if self.column == ANY_COLUMN:
            return f"{self.table} (some column)"
        return self.table if self.column is None else f"{self.table} ({self.column})"


def _needs(tables: tuple[str, ...], *privileges: str) -> tuple[Need, ...]:
    return tuple(Need(t, p) for t in tables for p in privileges)


FOUR_TABLES = (MASTER_TABLE, *CHILD_TABLES)
LEDGER = ("flowfix_runs", "flowfix_changes", "flowfix_walk_ranges")

#: What each command reads and writes (docs/roles-and-poolers.md turns these into GRANTs).
NEEDS: dict[str, tuple[Need, ...]] = {
    "read": _needs((*FOUR_TABLES, VERSION_TABLE, "flowfix_schema_changes"), "SELECT"),
    "write": (
        *_needs((*FOUR_TABLES, VERSION_TABLE, "flowfix_schema_changes", *LEDGER), "SELECT"),
        *(Need(t, "UPDATE", "master_flow_id") for t in CHILD_TABLES),
        *_needs(LEDGER, "INSERT", "UPDATE"),
    ),
    # link stamps the import's updated_at, and locks the master FOR SHARE, which takes
    # UPDATE on some column of it
    "link": (Need("data_imports", "UPDATE", "updated_at"), Need(MASTER_TABLE, "UPDATE", ANY_COLUMN)),
    # backfill --create-missing-masters and undo (which deletes the masters a run created)
    "masters": (Need(MASTER_TABLE, "INSERT"), Need(MASTER_TABLE, "DELETE")),
}

#: The needs (tables, privileges, columns: NULL the whole table, '*' any column) the
#: current role lacks, on tables and columns that exist.
MISSING_SQL = text("""
SELECT n.t AS table_name, n.p AS privilege, n.c AS column_name
FROM unnest(CAST(:tables AS text[]), CAST(:privileges AS text[]), CAST(:columns AS text[])) WITH ORDINALITY AS n(t, p, c, i)
WHERE to_regclass(n.t) IS NOT NULL
  AND (n.c IS NULL OR n.c = '*'
       OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = to_regclass(n.t) AND a.attname = n.c
                  AND a.attnum > 0 AND NOT a.attisdropped))
  AND NOT CASE WHEN n.c IS NULL THEN has_table_privilege(to_regclass(n.t), n.p)
               WHEN n.c = '*' THEN has_any_column_privilege(to_regclass(n.t), n.p)
               ELSE has_column_privilege(to_regclass(n.t), n.c, n.p) END
ORDER BY n.i
""")


async def missing(conn: AsyncConnection | AsyncSession, *needs: Need) -> list[Need]:
    """The privileges of ``needs`` the current role lacks (on tables that exist)."""
    rows = await conn.execute(
        MISSING_SQL,
        {
            "tables": [n.table for n in needs],
            "privileges": [n.privilege for n in needs],
            "columns": [n.column for n in needs],
        },
    )
    return [Need(r.table_name, r.privilege, r.column_name) for r in rows]


async def require(conn: AsyncConnection | AsyncSession, command: str, *groups: str, extra: Sequence[Need] = ()) -> None:
    """Refuse ``command`` before it changes anything if the role lacks a privilege of
    ``groups`` (keys of :data:`NEEDS`) or ``extra``: one line naming the role, the
    privileges and the tables."""
    needs = tuple(dict.fromkeys([*(n for g in groups for n in NEEDS[g]), *extra]))
    lacking = await missing(conn, *needs)
    if not lacking:
        return
    role = (await conn.execute(text("SELECT current_user"))).scalar_one()
    by_privilege: dict[str, list[str]] = {}
    for need in lacking:
        by_privilege.setdefault(need.privilege, []).append(str(need))
    what = "; ".join(f"{p} on {', '.join(tables)}" for p, tables in by_privilege.items())
    raise DatabaseRefused(
        f"permission denied: role {role} lacks {what}, which flowfix {command} needs (see docs/roles-and-poolers.md"
        " for the grants); nothing was changed"
    )
