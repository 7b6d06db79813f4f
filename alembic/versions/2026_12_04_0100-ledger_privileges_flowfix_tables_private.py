"""ledger_privileges: flowfix's own tables private to their owner, on databases that had them.

flowfix's tables (version table, bookkeeping, quarantine, translations, the ledger)
decide what a downgrade or an undo writes into the application's tables. They were
created with whatever the schema's default privileges grant (``ALTER DEFAULT PRIVILEGES
... GRANT ... TO PUBLIC`` or to the application's roles). This revision revokes every
privilege on them, and on the sequences of their identity columns, from PUBLIC and from
each role those default privileges name; the owner keeps its own, and grants a DBA made
explicitly (docs/roles-and-poolers.md) stay. Revisions legacy and fix_master_flow_fk do
the same when they create the tables, so a new database never has the grants.

Catalog only, no lock on the application's tables; safe to rerun. The downgrade changes
nothing: granting to PUBLIC again would reopen what this closed.

Revision ID: ledger_privileges
Revises: enforce_master_flow_not_null
Create Date: 2026-12-04 01:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from flowfix import privileges
from flowfix import revision_helpers as helpers

revision: str = "ledger_privileges"
down_revision: str | Sequence[str] | None = "enforce_master_flow_not_null"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    helpers.note("flowfix's own tables: revoke what PUBLIC and the schema's default privileges granted on them")
    helpers.execute(privileges.REVOKE_DEFAULT_GRANTS)


def downgrade() -> None:
    helpers.note("ledger_privileges: privileges stay as they are (granting to PUBLIC again would reopen them)")
