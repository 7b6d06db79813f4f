"""Everything a test needs to say "the database is exactly as it was": every row of every
table in the schema and the catalog of the schema (constraints with their definitions and
validation state, indexes, row-level security, column nullability)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flowfix.config import Settings
from tests.helpers import sql

CONSTRAINTS_SQL = """
SELECT cl.relname AS table_name, c.conname AS name, c.contype::text AS type,
       pg_get_constraintdef(c.oid) AS definition, c.convalidated AS validated
FROM pg_constraint c
JOIN pg_class cl ON cl.oid = c.conrelid
JOIN pg_namespace n ON n.oid = cl.relnamespace
WHERE n.nspname = current_schema() AND cl.relname NOT LIKE 'flowfix%'
ORDER BY 1, 2, 4
"""

INDEXES_SQL = """
SELECT tablename, indexname, indexdef FROM pg_indexes
WHERE schemaname = current_schema() AND tablename NOT LIKE 'flowfix%'
ORDER BY 1, 2
"""

TABLES_SQL = """
SELECT c.relname AS name, c.relkind::text AS kind, c.relrowsecurity AS rls, c.relforcerowsecurity AS force_rls
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') AND c.relname NOT LIKE 'flowfix%'
ORDER BY 1
"""

COLUMNS_SQL = """
SELECT table_name, column_name, is_nullable, column_default FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name NOT LIKE 'flowfix%'
ORDER BY 1, 2
"""

POLICIES_SQL = """
SELECT tablename, policyname, roles::text, qual FROM pg_policies WHERE schemaname = current_schema() ORDER BY 1, 2
"""


@dataclass
class Snapshot:
    tables: list[dict[str, Any]]
    columns: list[dict[str, Any]]
    constraints: list[dict[str, Any]]
    indexes: list[dict[str, Any]]
    policies: list[dict[str, Any]]
    rows: dict[str, list[tuple[Any, ...]]]

    def foreign_keys(self, table: str) -> set[tuple[str, str, bool]]:
        """(name, definition, validated) of every FK of ``table``."""
        return {
            (c["name"], c["definition"], c["validated"])
            for c in self.constraints
            if c["table_name"] == table and c["type"] == "f"
        }


def take(settings: Settings, *, rows: bool = True, flowfix_tables: bool = False) -> Snapshot:
    """The whole schema; flowfix's own ``flowfix_*`` tables (its memory) only if asked."""

    def q(statement: str) -> list[dict[str, Any]]:
        return sql(
            settings, statement.replace(" NOT LIKE 'flowfix%'", " NOT LIKE '-'") if flowfix_tables else statement
        )

    tables = q(TABLES_SQL)
    data: dict[str, list[tuple[Any, ...]]] = {}
    if rows:
        for t in tables:
            if t["kind"] == "r" or t["kind"] == "p":
                got = sql(settings, f'SELECT t::text AS r FROM "{t["name"]}" t')
                data[t["name"]] = sorted(r["r"] for r in got)
    return Snapshot(tables, q(COLUMNS_SQL), q(CONSTRAINTS_SQL), q(INDEXES_SQL), q(POLICIES_SQL), data)


FINGERPRINT_TABLES = """
SELECT format('%I.%I', n.nspname, c.relname) AS name FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
ORDER BY 1
"""
FINGERPRINT_CATALOG = (
    "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid), convalidated FROM pg_constraint"
    " WHERE connamespace NOT IN ('pg_catalog'::regnamespace, 'information_schema'::regnamespace) ORDER BY 1, 2, 3",
    "SELECT schemaname, tablename, indexname, indexdef FROM pg_indexes"
    " WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2, 3",
    "SELECT table_schema, table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
    " WHERE table_schema NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2, 3",
    "SELECT schemaname, tablename, policyname, qual FROM pg_policies ORDER BY 1, 2, 3",
    # roles are the cluster's: only those this database's tables name (owner, grantee,
    # policy), so that roles other tests create on a shared server are not a change here
    "SELECT r.rolname, r.rolsuper, r.rolbypassrls FROM pg_roles r WHERE r.rolname NOT LIKE 'pg_%' AND ("
    " EXISTS (SELECT 1 FROM pg_class c WHERE c.relkind IN ('r', 'p') AND (c.relowner = r.oid"
    " OR EXISTS (SELECT 1 FROM aclexplode(c.relacl) a WHERE a.grantee = r.oid)))"
    " OR EXISTS (SELECT 1 FROM pg_policy p WHERE r.oid = ANY (p.polroles))) ORDER BY 1",
)


def fingerprint(url: str) -> str:
    """The whole database as text, over one connection: every row of every table (all
    schemas, flowfix's own included), constraints with definition and validation, indexes,
    columns, policies, the roles its tables name. Two equal fingerprints: nothing changed."""
    import asyncio

    import asyncpg

    async def go() -> str:
        conn = await asyncpg.connect(url)
        try:
            out = []
            for statement in FINGERPRINT_CATALOG:
                out.append(repr([tuple(r) for r in await conn.fetch(statement)]))
            for table in await conn.fetch(FINGERPRINT_TABLES):
                rows = await conn.fetch(f"SELECT t::text FROM {table['name']} t")
                out.append(table["name"] + repr(sorted(r[0] for r in rows)))
            return "\n".join(out)
        finally:
            await conn.close()

    return asyncio.run(go())
