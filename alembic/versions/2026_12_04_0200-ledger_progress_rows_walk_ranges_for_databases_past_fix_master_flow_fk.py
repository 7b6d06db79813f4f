"""ledger_progress_rows: the progress rows of walks (``flowfix_walk_ranges``) where missing.

fix_master_flow_fk creates the table with the other ledger tables, so a database that
runs it now has it (the backfill runs at that revision). A database that was past it
before the table existed gets it here. Idempotent: the table is created only if missing,
and noted in ``flowfix_schema_changes`` first, so the downgrade drops it only if this
revision created it (its rows describe how far walks got: an interrupted backfill
resumed by an older flowfix walks its records again, touching only rows still NULL).

Revision ID: ledger_progress_rows
Revises: ledger_privileges
Create Date: 2026-12-04 02:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from flowfix import ledger, privileges
from flowfix import revision_helpers as helpers

revision: str = "ledger_progress_rows"
down_revision: str | Sequence[str] | None = "ledger_privileges"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RECORD = """INSERT INTO flowfix_schema_changes (revision, kind, table_name, object_name)
SELECT 'ledger_progress_rows', 'table_created', 'flowfix_walk_ranges', 'flowfix_walk_ranges'
WHERE to_regclass('flowfix_walk_ranges') IS NULL AND NOT EXISTS (
  SELECT 1 FROM flowfix_schema_changes WHERE revision = 'ledger_progress_rows' AND kind = 'table_created')"""


def upgrade() -> None:
    helpers.note("the ledger's progress rows (flowfix_walk_ranges), if this database has none yet")
    helpers.execute(RECORD)
    for sql in ledger.CREATE_WALK_RANGES:
        helpers.execute(sql)
    helpers.execute(privileges.REVOKE_DEFAULT_GRANTS)  # private to its owner, as ledger_privileges made the rest


def downgrade() -> None:
    helpers.note("drop flowfix_walk_ranges only if ledger_progress_rows created it")
    helpers.execute("""DO $drop$
BEGIN
  IF EXISTS (SELECT 1 FROM flowfix_schema_changes WHERE revision = 'ledger_progress_rows'
             AND kind = 'table_created') THEN
    DROP TABLE IF EXISTS flowfix_walk_ranges;
  END IF;
END $drop$""")
    helpers.execute("DELETE FROM flowfix_schema_changes WHERE revision = 'ledger_progress_rows'")
