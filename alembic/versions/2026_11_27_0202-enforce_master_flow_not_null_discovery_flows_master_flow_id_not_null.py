"""enforce_master_flow_not_null: discovery_flows.master_flow_id NOT NULL, the online way.

Run it after the backfill has linked every discovery flow. If any row is still NULL it
stops before changing anything, says how many and what to do next; the database stays
at fix_master_flow_fk. Otherwise:

1. ``CHECK (master_flow_id IS NOT NULL) NOT VALID`` (instant; from here on new rows
   must carry a master: deploy the linking service first);
2. ``VALIDATE`` the CHECK in its own transaction (SHARE UPDATE EXCLUSIVE: writes go on);
3. ``SET NOT NULL`` (no scan: Postgres proves it from the validated CHECK), then drop
   the CHECK, in one short transaction.

Revision ID: enforce_master_flow_not_null
Revises: fix_master_flow_fk
Create Date: 2026-11-27 02:02:00
"""

from __future__ import annotations

from collections.abc import Sequence

from flowfix import catalog
from flowfix import revision_helpers as helpers

revision: str = "enforce_master_flow_not_null"
down_revision: str | Sequence[str] | None = "fix_master_flow_fk"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECK = catalog.ENFORCE_CHECK

PRECONDITION = """DO $precondition$
DECLARE orphans bigint;
BEGIN
  SELECT count(*) INTO orphans FROM discovery_flows WHERE master_flow_id IS NULL;
  IF orphans > 0 THEN
    RAISE EXCEPTION 'flowfix: % discovery_flows rows still have master_flow_id NULL; revision enforce_master_flow_not_null changed nothing. Next: `flowfix backfill` (then `flowfix validate`), then `flowfix upgrade head` again.', orphans USING ERRCODE = 'FF000';
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'discovery_flows'::regclass AND contype = 'f'
                 AND confrelid = 'crewai_flow_state_extensions'::regclass AND convalidated) THEN
    RAISE EXCEPTION 'flowfix: discovery_flows has no validated FK to crewai_flow_state_extensions; run revision fix_master_flow_fk first' USING ERRCODE = 'FF000';
  END IF;
END $precondition$"""


def upgrade() -> None:
    helpers.note("step 0: stop, changing nothing, while any discovery flow has no master")
    helpers.execute(PRECONDITION)
    helpers.note("step 1: CHECK ... NOT VALID (instant)")
    exists = (
        not helpers.offline()
        and helpers.bind()
        .exec_driver_sql(
            f"SELECT count(*) FROM pg_constraint WHERE conrelid = 'discovery_flows'::regclass AND conname = '{CHECK}'"
        )
        .scalar_one()
    )
    if not exists:
        helpers.execute(
            f"ALTER TABLE discovery_flows ADD CONSTRAINT {CHECK} CHECK (master_flow_id IS NOT NULL) NOT VALID"
        )
    helpers.commit()
    helpers.note("step 2: VALIDATE the CHECK in its own transaction")
    helpers.run_or_undo(
        f"ALTER TABLE discovery_flows VALIDATE CONSTRAINT {CHECK}",
        undo=f"ALTER TABLE discovery_flows DROP CONSTRAINT IF EXISTS {CHECK}",
        when_sqlstate="23514",  # check_violation: a row without master was written since step 0
        message="flowfix: a discovery flow without master was written while enforcing; the CHECK was removed "
        "again and nothing else changed. Deploy the linking service, run `flowfix backfill`, then upgrade again.",
    )
    helpers.note("step 3: SET NOT NULL (proved by the CHECK, no scan) and drop the CHECK")
    helpers.execute("ALTER TABLE discovery_flows ALTER COLUMN master_flow_id SET NOT NULL")
    helpers.lint_ignore("ban-drop-constraint", "the column's own NOT NULL, set just above, now guarantees the same")
    helpers.execute(f"ALTER TABLE discovery_flows DROP CONSTRAINT {CHECK}")


def downgrade() -> None:
    helpers.note("discovery_flows.master_flow_id back to nullable (instant)")
    helpers.lint_ignore("ban-drop-not-null", "downgrade: back to the nullable column of fix_master_flow_fk")
    helpers.execute("ALTER TABLE discovery_flows ALTER COLUMN master_flow_id DROP NOT NULL")
    # a part-done upgrade (its session lost between adding and dropping the CHECK) leaves it
    helpers.lint_ignore("ban-drop-constraint", "downgrade: the CHECK of a part-done upgrade, if any")
    helpers.execute(f"ALTER TABLE discovery_flows DROP CONSTRAINT IF EXISTS {CHECK}")
