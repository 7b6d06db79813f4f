"""Read-only introspection of the live schema: one place for catalog SQL.

Functions take a *sync* SQLAlchemy ``Connection`` because revisions run in Alembic's
sync facade; async callers use ``await conn.run_sync(fn, ...)``. Everything is looked up
by table and column in ``current_schema()`` (the pinned ``search_path``), never by an
assumed constraint name: production names differ from the plan's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import Connection, text
from sqlalchemy.orm import Session

from flowfix.config import VERSION_TABLE

#: What the functions below read through: a Connection (revisions, validate) or a Session
#: (the linking service, which works on the application's session).
SyncExecutor = Connection | Session

#: Every foreign key whose (single) source column is :column on :table, with its target.
FOREIGN_KEYS_SQL = """
SELECT c.conname            AS name,
       tt.relname           AS target_table,
       ta.attname           AS target_column,
       c.convalidated       AS validated,
       c.confdeltype::text  AS on_delete,
       pg_get_constraintdef(c.oid) AS definition
FROM pg_constraint c
JOIN pg_class st      ON st.oid = c.conrelid
JOIN pg_namespace n   ON n.oid = st.relnamespace
JOIN pg_attribute sa  ON sa.attrelid = c.conrelid AND sa.attnum = c.conkey[1]
JOIN pg_class tt      ON tt.oid = c.confrelid
JOIN pg_attribute ta  ON ta.attrelid = c.confrelid AND ta.attnum = c.confkey[1]
WHERE c.contype = 'f'
  AND n.nspname = current_schema()
  AND st.relname = :table
  AND sa.attname = :column
  AND cardinality(c.conkey) = 1
ORDER BY c.conname
"""

#: Indexes of :table whose leading key column is :column (partial ones included, flagged).
INDEXES_SQL = """
SELECT ic.relname            AS name,
       i.indisunique         AS is_unique,
       i.indisvalid          AS is_valid,
       i.indpred IS NOT NULL AS is_partial,
       i.indnkeyatts         AS key_columns,
       con.conname           AS constraint_name
FROM pg_index i
JOIN pg_class ic     ON ic.oid = i.indexrelid
JOIN pg_class tc     ON tc.oid = i.indrelid
JOIN pg_namespace n  ON n.oid = tc.relnamespace
JOIN pg_attribute a  ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.conrelid = i.indrelid
WHERE n.nspname = current_schema()
  AND tc.relname = :table
  AND a.attname = :column
ORDER BY ic.relname
"""

COLUMNS_SQL = """
SELECT table_name, column_name, is_nullable = 'YES' AS nullable
FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name = ANY(:tables)
"""

#: Tables (of the array ``{tables}``) whose row-level security applies to the current
#: role: enabled, and the role is neither superuser nor BYPASSRLS nor (unless FORCE) the
#: table's owner. Also inlined into the revisions' preflight (a DO block).
RLS_LIMITED_TEMPLATE = """
SELECT c.relname
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_roles r     ON r.rolname = current_user
WHERE n.nspname = current_schema() AND c.relname = ANY({tables})
  AND c.relrowsecurity
  AND NOT r.rolsuper AND NOT r.rolbypassrls
  AND (c.relforcerowsecurity OR NOT pg_has_role(current_user, c.relowner, 'USAGE'))
ORDER BY c.relname
"""
RLS_LIMITED_SQL = RLS_LIMITED_TEMPLATE.format(tables=":tables")

#: Every FK in the database that references :table (in the current schema), whatever its
#: arity or schema: pairs of (referencing column, referenced column), quoted for SQL.
REFERENCING_SQL = """
SELECT c.conname AS name,
       sn.nspname::text AS schema,
       st.relname::text AS source,
       array_agg(sa.attname::text ORDER BY k.n) AS columns,
       array_agg(ta.attname::text ORDER BY k.n) AS referenced
FROM pg_constraint c
JOIN pg_class st ON st.oid = c.conrelid
JOIN pg_namespace sn ON sn.oid = st.relnamespace
CROSS JOIN LATERAL unnest(c.conkey, c.confkey) WITH ORDINALITY AS k(src, dst, n)
JOIN pg_attribute sa ON sa.attrelid = c.conrelid AND sa.attnum = k.src
JOIN pg_attribute ta ON ta.attrelid = c.confrelid AND ta.attnum = k.dst
WHERE c.contype = 'f' AND c.confrelid = to_regclass(:table) AND c.conparentid = 0
GROUP BY c.oid, c.conname, sn.nspname, st.relname
ORDER BY 2, 3, 1
"""

#: Columns of :table that an INSERT must supply: NOT NULL, no default, not generated.
REQUIRED_COLUMNS_SQL = """
SELECT a.attname
FROM pg_attribute a
WHERE a.attrelid = to_regclass(:table) AND a.attnum > 0 AND NOT a.attisdropped
  AND a.attnotnull AND NOT a.atthasdef AND a.attidentity = '' AND a.attgenerated = ''
ORDER BY a.attnum
"""

#: Schemas of the database, other than the current one, that hold a table named :table.
SCHEMAS_HOLDING_SQL = """
SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relname = :table AND c.relkind IN ('r', 'p') AND n.nspname <> current_schema()
ORDER BY 1
"""


@dataclass(frozen=True)
class ForeignKey:
    name: str
    target_table: str
    target_column: str
    validated: bool
    on_delete: str  # pg_constraint.confdeltype: a=no action, r=restrict, c=cascade, n=set null, d=set default
    definition: str

    @property
    def rule(self) -> str:
        """What the FK does on delete (and update, and whether it is DEFERRABLE), as its
        definition says after the referenced columns; NO ACTION spelled out."""
        after = self.definition.split(" REFERENCES ", 1)[-1]
        rule = after[after.find(")") + 1 :].replace(" NOT VALID", "").strip()
        return rule if "ON DELETE" in rule else f"ON DELETE NO ACTION {rule}".strip()


@dataclass(frozen=True)
class Reference:
    """A foreign key that references a table: its table ``schema``.``source`` and the column
    pairs, as the catalog names them (unquoted: flowfix.sql quotes them where SQL uses them)."""

    name: str
    schema: str
    source: str
    columns: list[str]
    referenced: list[str]


@dataclass(frozen=True)
class IndexInfo:
    name: str
    is_unique: bool
    is_valid: bool
    is_partial: bool
    key_columns: int
    constraint_name: str | None


def foreign_keys(conn: SyncExecutor, table: str, column: str) -> list[ForeignKey]:
    rows = conn.execute(text(FOREIGN_KEYS_SQL), {"table": table, "column": column}).mappings()
    return [ForeignKey(**row) for row in rows]


def indexes(conn: SyncExecutor, table: str, column: str) -> list[IndexInfo]:
    rows = conn.execute(text(INDEXES_SQL), {"table": table, "column": column}).mappings()
    return [IndexInfo(**row) for row in rows]


def has_unique_index(conn: SyncExecutor, table: str, column: str) -> bool:
    """A valid, non-partial unique index on exactly (column): what a FK target needs."""
    return any(
        ix.is_unique and ix.is_valid and not ix.is_partial and ix.key_columns == 1
        for ix in indexes(conn, table, column)
    )


def has_usable_index(conn: SyncExecutor, table: str, column: str) -> bool:
    """A valid, non-partial index led by ``column``: enough for joins and FK cascades."""
    return any(ix.is_valid and not ix.is_partial for ix in indexes(conn, table, column))


def columns(conn: SyncExecutor, tables: list[str]) -> dict[str, dict[str, bool]]:
    """``{table: {column: nullable}}`` for the tables that exist in the schema."""
    out: dict[str, dict[str, bool]] = {}
    for row in conn.execute(text(COLUMNS_SQL), {"tables": tables}).mappings():
        out.setdefault(row["table_name"], {})[row["column_name"]] = row["nullable"]
    return out


def referencing(conn: SyncExecutor, table: str) -> list[Reference]:
    """Every FK in the database that references ``table``: the catalog's list, not a
    fixed one (the application adds tables that reference the master)."""
    return [Reference(**row) for row in conn.execute(text(REFERENCING_SQL), {"table": table}).mappings()]


def required_columns(conn: SyncExecutor, table: str) -> list[str]:
    """The columns an INSERT into ``table`` must supply (the application's schema has no
    server default even on ``id``)."""
    return list(conn.execute(text(REQUIRED_COLUMNS_SQL), {"table": table}).scalars())


def schemas_holding(conn: SyncExecutor, table: str) -> list[str]:
    """The other schemas of this database that have a table named ``table``."""
    return list(conn.execute(text(SCHEMAS_HOLDING_SQL), {"table": table}).scalars())


def rls_limited_tables(conn: SyncExecutor, tables: list[str]) -> list[str]:
    """The tables on which row-level security may hide rows from the current role."""
    return list(conn.execute(text(RLS_LIMITED_SQL), {"tables": tables}).scalars())


def require_full_visibility(conn: SyncExecutor, what: str) -> None:
    """Refuse (before anything is read or written) when row-level security may hide rows
    of the four tables from this role: a backfill would link nothing and exit 0, an undo
    would revert half. ``what`` names the command."""
    from flowfix.errors import DatabaseRefused
    from flowfix.models import CHILD_TABLES, MASTER_TABLE

    hidden = rls_limited_tables(conn, [MASTER_TABLE, *CHILD_TABLES])
    if hidden:
        role = conn.execute(text("SELECT current_user")).scalar_one()
        raise DatabaseRefused(
            f"row-level security may hide rows of {', '.join(hidden)} from role {role}, so {what} cannot see every"
            " row: run it as the tables' owner (without FORCE ROW LEVEL SECURITY), a superuser or a BYPASSRLS role"
        )


#: Whether flowfix's version table exists here and this role may read it; who asks, where.
VERSION_TABLE_ACCESS_SQL = """
SELECT to_regclass(:t) IS NOT NULL AS present,
       COALESCE(has_table_privilege(to_regclass(:t), 'SELECT'), false) AS readable,
       current_user::text AS role, current_schema()::text AS schema
"""


def readable_revision(conn: SyncExecutor) -> str | None:
    """Like :func:`current_revision`, but the privilege is checked first, so a read-only
    transaction is not aborted by the attempt: a role that may not read the version table
    (a CI role granted SELECT on the application's tables only) is told which grant is
    missing, instead of being shown "revision (none)"."""
    from flowfix.errors import DatabaseRefused

    access = conn.execute(text(VERSION_TABLE_ACCESS_SQL), {"t": VERSION_TABLE}).one()
    if not access.present:
        return None
    if not access.readable:
        where = f"{_ident(access.schema)}.{VERSION_TABLE}" if access.schema else VERSION_TABLE
        role = _ident(access.role)
        raise DatabaseRefused(
            f"role {access.role} may read the tables but not flowfix's version table {where}, so the revision"
            f" cannot be known: GRANT SELECT ON {where} TO {role}; (docs/security.md)"
        )
    return current_revision(conn)


def _ident(name: str) -> str:
    """A name as an operator would type it in SQL: quoted only when it must be."""
    from flowfix.sql import quote_ident

    return name if re.match(r"^[a-z_][a-z0-9_]*$", name, re.ASCII) else quote_ident(name)


def current_revision(conn: SyncExecutor) -> str | None:
    """flowfix's revision, from its own version table; None when flowfix never ran here."""
    exists = conn.execute(text("SELECT to_regclass(:t) IS NOT NULL"), {"t": VERSION_TABLE}).scalar_one()
    if not exists:
        return None
    return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one_or_none()


@dataclass(frozen=True)
class Leaf:
    """A table that holds rows of ``table`` (itself, or each leaf partition), by name as
    ``regclass`` prints it (quoted where needed), with its size in pages."""

    name: str
    pages: int
    rows_per_page: float
    schema: str = ""  # the catalog's names, unquoted (flowfix.sql quotes them for SQL)
    relname: str = ""


#: The leaves of :table (a plain table is its own leaf), largest first.
LEAVES_SQL = """
SELECT c.oid::regclass::text AS name,
       (pg_relation_size(c.oid) / current_setting('block_size')::int)::bigint AS pages,
       CASE WHEN c.relpages > 0 AND c.reltuples > 0 THEN c.reltuples / c.relpages ELSE 0 END AS rows_per_page,
       n.nspname::text AS schema,
       c.relname::text AS relname
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.oid IN (SELECT relid FROM pg_partition_tree(to_regclass(:table)) WHERE isleaf)
   OR (c.oid = to_regclass(:table) AND c.relkind <> 'p')
ORDER BY pages DESC, name
"""


def leaves(conn: SyncExecutor, table: str) -> list[Leaf]:
    return [Leaf(**row) for row in conn.execute(text(LEAVES_SQL), {"table": table}).mappings()]


def server_version(conn: SyncExecutor) -> int:
    """``server_version_num``: 150018 for 15.18."""
    return int(conn.execute(text("SELECT current_setting('server_version_num')::int")).scalar_one())


#: enforce_master_flow_not_null's CHECK, in place only while that revision runs (or if its
#: session died between adding and dropping it).
ENFORCE_CHECK = "ck_discovery_flows_master_flow_id_not_null"

#: What fix_master_flow_fk has recorded doing, in the order it did it.
SCHEMA_CHANGES_SQL = """
SELECT kind, table_name, object_name FROM flowfix_schema_changes
WHERE revision = 'fix_master_flow_fk' ORDER BY id
"""

_KIND_WORDS = {
    "constraint_created": "added {object} on {table}",
    "index_created": "built index {object} on {table}",
    "foreign_key_replaced": "dropped {object} on {table} (recorded, to be restored)",
}


@dataclass(frozen=True)
class PartDone:
    """A revision that stopped part-way: the database is still at ``at`` (each revision
    is recorded only when it finishes), but ``steps`` of ``revision`` are in place; or,
    ``downgrade``, the downgrade of ``revision`` (the current one) stopped part-way,
    having done ``steps``; ``back_to``: the revision that downgrade goes to."""

    revision: str
    at: str | None
    steps: list[str]
    downgrade: bool = False
    back_to: str | None = None

    def message(self) -> str:
        if self.downgrade:
            return (
                f"the downgrade of revision {self.revision} is part-done ({'; '.join(self.steps)}):"
                f" `{self.next_step()}` finishes it"
            )
        return (
            f"revision {self.revision} is part-done ({'; '.join(self.steps)}): `flowfix upgrade {self.revision}`"
            f" finishes it, `flowfix downgrade {self.at or 'base'}` takes it back"
        )

    def next_step(self) -> str:
        if self.downgrade:
            return f"flowfix downgrade {self.back_to or 'base'}"
        return f"flowfix upgrade {self.revision}"


def require_not_part_done(conn: SyncExecutor, what: str) -> None:
    """Refuse ``what`` (backfill, link, undo) while a revision or its downgrade stopped
    part-way: the FKs it would write under may be missing or half restored."""
    from flowfix.errors import MigrationError

    unfinished = part_done(conn)
    if unfinished is not None:
        raise MigrationError(f"{what} refused: {unfinished.message()}; run `{unfinished.next_step()}` first")


#: At fix_master_flow_fk: what its downgrade has done, if it stopped part-way: a
#: constraint the upgrade added that is gone, or an FK the upgrade replaced that is back.
DOWNGRADE_DONE_SQL = """
SELECT sc.kind, sc.table_name, sc.object_name FROM flowfix_schema_changes sc
WHERE sc.revision = 'fix_master_flow_fk'
  AND ((sc.kind = 'constraint_created'
        AND NOT EXISTS (SELECT 1 FROM pg_constraint c
                        WHERE c.conrelid = to_regclass(sc.table_name) AND c.conname = sc.object_name))
    OR (sc.kind = 'foreign_key_replaced'
        AND EXISTS (SELECT 1 FROM pg_constraint c
                    WHERE c.conrelid = to_regclass(sc.table_name) AND c.conname = sc.object_name)))
ORDER BY sc.id
"""

_UNDONE_WORDS = {
    "constraint_created": "dropped {object} on {table}",
    "foreign_key_replaced": "restored {object} on {table}",
}


def part_done(conn: SyncExecutor) -> PartDone | None:
    """The revision above the current one that left steps in place, if any."""
    revision = readable_revision(conn)
    if revision == "legacy":
        if not conn.execute(text("SELECT to_regclass('flowfix_schema_changes') IS NOT NULL")).scalar_one():
            return None
        rows = conn.execute(text(SCHEMA_CHANGES_SQL)).all()
        if rows:
            steps = [
                _KIND_WORDS.get(r.kind, "{kind} {object} on {table}").format(
                    kind=r.kind, object=r.object_name, table=r.table_name
                )
                for r in rows
            ]
            return PartDone("fix_master_flow_fk", revision, steps)
    if revision == "fix_master_flow_fk":
        undone = conn.execute(text(DOWNGRADE_DONE_SQL)).all()
        if undone:
            steps = [_UNDONE_WORDS[r.kind].format(object=r.object_name, table=r.table_name) for r in undone]
            return PartDone("fix_master_flow_fk", revision, steps, downgrade=True, back_to="legacy")
        present = conn.execute(
            text("SELECT count(*) FROM pg_constraint WHERE conrelid = to_regclass('discovery_flows') AND conname = :c"),
            {"c": ENFORCE_CHECK},
        ).scalar_one()
        if present:
            return PartDone("enforce_master_flow_not_null", revision, [f"added {ENFORCE_CHECK} on discovery_flows"])
    return None


#: The unique constraint fix_master_flow_fk adds on the master's flow_id when no other
#: unique index serves (shape H's own constraint has this very name).
UNIQUE_FLOW_ID = "uq_crewai_flow_state_extensions_flow_id"


@dataclass(frozen=True)
class IndexFacts:
    """What decides which indexes fix_master_flow_fk builds. Read online by the revision
    itself; for ``--sql`` with a database at hand, read beforehand, so that the printed
    SQL builds exactly what the online upgrade of that database would build."""

    #: a valid unique index on the master's flow_id that flowfix did not build (any name,
    #: shape H's constraint has flowfix's own): nothing to build then
    other_unique_flow_id: str | None
    indexed: tuple[str, ...]  # child tables whose master_flow_id already has a usable index


def index_facts(conn: SyncExecutor) -> IndexFacts:
    from flowfix.models import CHILD_TABLES, MASTER_TABLE

    ours: set[str] = set()
    if conn.execute(text("SELECT to_regclass('flowfix_schema_changes') IS NOT NULL")).scalar_one():
        ours = set(conn.execute(text("SELECT object_name FROM flowfix_schema_changes")).scalars())
    others = [
        ix.name
        for ix in indexes(conn, MASTER_TABLE, "flow_id")
        if ix.name not in ours and ix.is_unique and ix.is_valid and not ix.is_partial and ix.key_columns == 1
    ]
    indexed = tuple(t for t in CHILD_TABLES if has_usable_index(conn, t, "master_flow_id"))
    return IndexFacts(others[0] if others else None, indexed)
