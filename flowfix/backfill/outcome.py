"""The outcome of a run, read back from the database after the work: an exit code is a
promise about the tables, so it is decided by what they hold, never by the plan.

Every row in scope still NULL is counted, and each is reported once: with the plan's
reason when the plan left it (ambiguous, unmatched), as changed since planning when the
plan linked it (a batch skipped it: the application wrote first), or as appeared since
planning otherwise. Rows the plan reported that are no longer NULL (the application
linked them meanwhile) leave the report.
"""

from __future__ import annotations

import uuid
from collections import defaultdict

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from flowfix.backfill.model import Options, Plan, Unmatched
from flowfix.backfill.plan import CHANGED_SINCE_PLANNING
from flowfix.models import CHILD_TABLES, RECORD_TENANT_SCOPE, TENANT_SCOPE

#: Rows in scope still NULL: discovery flows and imports one by one, records per import.
LEFT_NULL = f"""
SELECT 'discovery_flows' AS tbl, t.id, 1 AS n FROM discovery_flows t WHERE t.master_flow_id IS NULL AND {TENANT_SCOPE}
UNION ALL
SELECT 'data_imports', t.id, 1 FROM data_imports t WHERE t.master_flow_id IS NULL AND {TENANT_SCOPE}
UNION ALL
SELECT 'raw_import_records', t.data_import_id, count(*)
FROM raw_import_records t LEFT JOIN data_imports i ON i.id = t.data_import_id
WHERE t.master_flow_id IS NULL AND {RECORD_TENANT_SCOPE}
GROUP BY t.data_import_id
"""

#: A records row without an import (no data_import_id) is reported under this id.
NO_IMPORT = uuid.UUID(int=0)


async def read_back(conn: AsyncConnection, opts: Options, plan: Plan) -> dict[str, int]:
    """The rows in scope still NULL, per table; ``plan``'s report is brought in line with
    them (see the module's docstring)."""
    left: dict[str, int] = dict.fromkeys(CHILD_TABLES, 0)
    still: dict[str, dict[uuid.UUID, int]] = defaultdict(dict)
    for tbl, id_, n in await conn.execute(text(LEFT_NULL), opts.scope):
        left[tbl] += n
        still[tbl][id_ if id_ is not None else NO_IMPORT] = n
    plan.ambiguous = [a for a in plan.ambiguous if a.table == "raw_import_records" or a.id in still[a.table]]
    plan.unmatched = [u for u in plan.unmatched if u.id in still[u.table]]
    reported = {(a.table, a.id) for a in plan.ambiguous} | {(u.table, u.id) for u in plan.unmatched}
    planned = {(link.table, link.id) for link in (*plan.discovery_links, *plan.import_links, *plan.record_links)}
    for tbl, rows in still.items():
        for id_, n in rows.items():
            if (tbl, id_) in reported:
                continue
            what = f"{n} records of this import are" if tbl == "raw_import_records" else "it is"
            if (tbl, id_) in planned:
                reason = f"{CHANGED_SINCE_PLANNING}: {what} still NULL (the application wrote first; run again)"
            else:
                reason = f"appeared since planning: {what} still NULL (run the backfill again)"
            plan.unmatched.append(Unmatched(tbl, id_, reason))
    return left
