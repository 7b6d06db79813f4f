"""Planning: what the backfill would do now, with the evidence for each link. Reads only.

One function per step (discovery flows, imports by exact evidence, imports by time,
records); each returns plain data the next one builds on, and :func:`make_plan` strings
them together. The SQL is here, readable in one place.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from flowfix import catalog
from flowfix.backfill.matching import assign_by_time
from flowfix.backfill.model import Ambiguous, Link, NewMaster, Options, Plan, Unmatched
from flowfix.evidence import STRENGTH, Evidence
from flowfix.models import MASTER_TABLE, TENANT_SCOPE
from flowfix.tenancy import known_and_equal, known_and_equal_sql, unknown_matches, unknown_matches_sql

ORPHAN_DISCOVERY_FLOWS = f"""
SELECT t.id, t.flow_id, t.client_account_id, t.engagement_id, t.user_id, t.flow_name, t.status,
       m.flow_id AS master, m.flow_type, m.client_account_id AS master_client, m.engagement_id AS master_engagement,
       EXISTS (SELECT 1 FROM crewai_flow_state_extensions x WHERE x.id = t.flow_id) AS flow_id_is_a_master_id
FROM discovery_flows t
LEFT JOIN crewai_flow_state_extensions m ON m.flow_id = t.flow_id
WHERE t.master_flow_id IS NULL AND {TENANT_SCOPE}
ORDER BY t.id
"""

ORPHAN_IMPORTS = f"""
SELECT t.id, t.client_account_id, t.engagement_id, t.created_at
FROM data_imports t
WHERE t.master_flow_id IS NULL AND {TENANT_SCOPE}
ORDER BY t.id
"""

#: Exact evidence for orphan imports. A discovery flow's master is its own (or the one
#: step 1 plans for it: :df_ids / :df_masters); the master's tenant comes from the master
#: table or, for a master step 1 will create, from the discovery flow.
EXACT_EVIDENCE = """
WITH orphan AS (SELECT id FROM data_imports WHERE id = ANY(CAST(:imports AS uuid[]))),
planned AS (SELECT * FROM unnest(CAST(:df_ids AS uuid[]), CAST(:df_masters AS uuid[])) AS p(df_id, master)),
evidence AS (
    SELECT o.id AS import_id, COALESCE(d.master_flow_id, p.master) AS flow_id, CAST(:ev_discovery_flow AS text) AS evidence,
           d.client_account_id AS df_client, d.engagement_id AS df_engagement
    FROM orphan o
    JOIN discovery_flows d ON d.data_import_id = o.id
    LEFT JOIN planned p ON p.df_id = d.id
    WHERE COALESCE(d.master_flow_id, p.master) IS NOT NULL
  UNION ALL
    SELECT o.id, m.flow_id, CAST(:ev_configuration AS text), NULL, NULL
    FROM orphan o JOIN crewai_flow_state_extensions m ON lower(m.flow_configuration->>'import_id') = o.id::text
    WHERE m.flow_type = 'discovery' AND m.flow_status IS DISTINCT FROM 'deleted'
  UNION ALL
    SELECT o.id, m.flow_id, CAST(:ev_configuration AS text), NULL, NULL
    FROM orphan o JOIN crewai_flow_state_extensions m ON lower(m.flow_persistence_data->>'data_import_id') = o.id::text
    WHERE m.flow_type = 'discovery' AND m.flow_status IS DISTINCT FROM 'deleted'
)
SELECT e.import_id, e.flow_id, e.evidence,
       COALESCE(m.client_account_id, e.df_client) AS master_client,
       COALESCE(m.engagement_id, e.df_engagement) AS master_engagement
FROM evidence e
LEFT JOIN crewai_flow_state_extensions m ON m.flow_id = e.flow_id
ORDER BY e.import_id, e.flow_id
"""

#: Candidate (import, master) pairs within the window: same tenant, discovery, not
#: deleted, not linked to an import (the masters exact evidence claims are left out by the
#: caller, in Python). The LATERAL range scan on (tenant, created_at) keeps it to the
#: masters near each import.
TIME_CANDIDATES = f"""
WITH pairs AS MATERIALIZED (
    SELECT o.id AS import_id, near.flow_id,
           abs(extract(epoch FROM (near.created_at - o.created_at)))::float8 AS distance
    FROM data_imports o
    CROSS JOIN LATERAL (
        SELECT m.flow_id, m.created_at FROM crewai_flow_state_extensions m
        WHERE {known_and_equal_sql("o", "m")}
          AND m.created_at BETWEEN o.created_at - make_interval(secs => :window)
                               AND o.created_at + make_interval(secs => :window)
    ) near
    WHERE o.id = ANY(CAST(:imports AS uuid[]))
)
SELECT p.import_id, p.flow_id, p.distance
FROM pairs p
JOIN crewai_flow_state_extensions m ON m.flow_id = p.flow_id
WHERE m.flow_type = 'discovery' AND m.flow_status IS DISTINCT FROM 'deleted'
  AND m.flow_configuration->>'import_id' IS NULL
  AND m.flow_persistence_data->>'data_import_id' IS NULL
  AND NOT EXISTS (SELECT 1 FROM data_imports x WHERE x.master_flow_id = m.flow_id)
  AND NOT EXISTS (SELECT 1 FROM discovery_flows d WHERE d.master_flow_id = m.flow_id AND d.data_import_id IS NOT NULL)
  AND NOT EXISTS (SELECT 1 FROM discovery_flows d WHERE d.flow_id = m.flow_id AND d.data_import_id IS NOT NULL)
ORDER BY p.distance, p.import_id, p.flow_id
"""

RECORD_TENANT_OK = unknown_matches_sql("r", "m")

#: Each import's master once the planned links (:imp_ids / :imp_flows) are in: the
#: starting point of both record queries below.
IMPORT_MASTERS = f"""planned AS (SELECT * FROM unnest(CAST(:imp_ids AS uuid[]), CAST(:imp_flows AS uuid[]))
                AS p(import_id, flow)),
eff AS (SELECT t.id, COALESCE(t.master_flow_id, p.flow) AS flow
        FROM data_imports t LEFT JOIN planned p ON p.import_id = t.id WHERE {TENANT_SCOPE})"""

#: Records per import once the imports are linked; masters step 1 will create count too.
RECORD_PLAN = f"""
WITH {IMPORT_MASTERS},
created AS (SELECT * FROM unnest(CAST(:c_flows AS uuid[]), CAST(:c_clients AS uuid[]), CAST(:c_engagements AS uuid[]))
            AS c(flow_id, client_account_id, engagement_id)),
masters AS (SELECT flow_id, client_account_id, engagement_id FROM crewai_flow_state_extensions
            UNION ALL SELECT flow_id, client_account_id, engagement_id FROM created)
SELECT r.data_import_id, e.flow,
       count(*) FILTER (WHERE e.flow IS NOT NULL AND {RECORD_TENANT_OK}) AS to_link,
       count(*) FILTER (WHERE e.flow IS NOT NULL AND NOT ({RECORD_TENANT_OK})) AS tenant_conflict,
       count(*) FILTER (WHERE e.flow IS NULL) AS no_master
FROM raw_import_records r
JOIN eff e ON e.id = r.data_import_id
LEFT JOIN masters m ON m.flow_id = e.flow
WHERE r.master_flow_id IS NULL
GROUP BY r.data_import_id, e.flow
ORDER BY r.data_import_id
"""

#: Records holding another master than their import will (after the planned links).
DISAGREEING_RECORDS = f"""
WITH {IMPORT_MASTERS}
SELECT r.id, r.master_flow_id, e.flow AS import_master
FROM raw_import_records r JOIN eff e ON e.id = r.data_import_id
WHERE r.master_flow_id IS NOT NULL AND e.flow IS NOT NULL AND r.master_flow_id <> e.flow
ORDER BY r.id
"""


#: The master's columns CREATE_MASTERS fills, and for those that may be NULL on the
#: discovery flow, where the value comes from.
MASTER_VALUES_FROM_DISCOVERY_FLOW = ("user_id", "flow_name")
MASTER_COLUMNS_FILLED = {
    "id",
    "flow_id",
    "client_account_id",
    "engagement_id",
    "flow_type",
    "flow_status",
    "flow_configuration",
    *MASTER_VALUES_FROM_DISCOVERY_FLOW,
}


@dataclass(frozen=True)
class MasterCreation:
    """What --create-missing-masters can fill on this database: the application's schema
    has NOT NULL columns without defaults (found in the catalog, not assumed)."""

    required: list[str]

    @property
    def unknown(self) -> list[str]:
        """Required columns flowfix has no value for: no master can be created."""
        return [c for c in self.required if c not in MASTER_COLUMNS_FILLED]

    @property
    def needs(self) -> dict[str, bool]:
        """For CREATE_MASTERS: which discovery-flow values must be present."""
        return {f"need_{c}": c in self.required for c in MASTER_VALUES_FROM_DISCOVERY_FLOW}

    def refusal(self, row: Any) -> str | None:
        """Why no master can be created for this orphan discovery flow, or None."""
        if self.unknown:
            return (
                f"{MASTER_TABLE}.{', '.join(self.unknown)} is NOT NULL without a default, and flowfix has no"
                " value for it"
            )
        for column in MASTER_VALUES_FROM_DISCOVERY_FLOW:
            if column in self.required and row[column] is None:
                return f"its {column} is NULL and {MASTER_TABLE}.{column} is NOT NULL"
        if row["flow_id_is_a_master_id"]:
            return "its flow_id is another master's id (the upgrade could no longer tell the two apart)"
        return None


async def make_plan(conn: AsyncConnection, opts: Options) -> Plan:
    """What the backfill would do now, with the evidence for each link. Reads only."""
    plan = Plan()
    creation = MasterCreation(await conn.run_sync(catalog.required_columns, MASTER_TABLE))
    plan.master_needs = creation.needs
    await _plan_discovery_flows(conn, opts, creation, plan)
    undecided, claimed = await _plan_imports_by_exact_evidence(conn, opts, plan)
    await _plan_imports_by_time(conn, opts, undecided, claimed, plan)
    plan.import_links.sort(key=lambda link: link.id)
    await _plan_records(conn, opts, plan)
    return plan


def _unmatched_discovery_flow(row: Any, opts: Options, creation: MasterCreation) -> str | None:
    """Why this orphan discovery flow cannot be linked (None: it can)."""
    if row["master"] is None:
        if not opts.create_missing_masters:
            return "no master flow has this flow_id (--create-missing-masters creates one)"
        why_not = creation.refusal(row)
        return f"cannot create its master: {why_not}" if why_not else None
    if not known_and_equal(
        row["client_account_id"], row["engagement_id"], row["master_client"], row["master_engagement"]
    ):
        return "the master flow with this flow_id belongs to another tenant"
    if row["flow_type"] != "discovery":
        return f"the master flow with this flow_id is a '{row['flow_type']}' flow"
    return None


async def _plan_discovery_flows(conn: AsyncConnection, opts: Options, creation: MasterCreation, plan: Plan) -> None:
    """Step 1: a discovery flow's own flow_id names its master (or the one to create)."""
    for row in (await conn.execute(text(ORPHAN_DISCOVERY_FLOWS), opts.scope)).mappings():
        why_not = _unmatched_discovery_flow(row, opts, creation)
        if why_not:
            plan.unmatched.append(Unmatched("discovery_flows", row["id"], why_not))
        elif row["master"] is None:
            plan.masters_to_create.append(
                NewMaster(row["id"], row["flow_id"], row["client_account_id"], row["engagement_id"])
            )
            plan.discovery_links.append(Link("discovery_flows", row["id"], row["flow_id"], Evidence.CREATED))
        else:
            plan.discovery_links.append(Link("discovery_flows", row["id"], row["master"], Evidence.FLOW_ID))


async def _plan_imports_by_exact_evidence(
    conn: AsyncConnection, opts: Options, plan: Plan
) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Step 2a: imports a discovery flow or a master's configuration names. Returns the
    imports left for time matching and the masters exact evidence already claims."""
    orphans = {r["id"]: r for r in (await conn.execute(text(ORPHAN_IMPORTS), opts.scope)).mappings()}
    params = {
        "imports": list(orphans),
        "df_ids": [link.id for link in plan.discovery_links],
        "df_masters": [link.master_flow_id for link in plan.discovery_links],
        **Evidence.params(),
    }
    exact: dict[uuid.UUID, dict[uuid.UUID, str]] = defaultdict(dict)
    foreign: set[uuid.UUID] = set()
    for row in (await conn.execute(text(EXACT_EVIDENCE), params)).mappings():
        imp = orphans[row["import_id"]]
        if not unknown_matches(
            imp["client_account_id"], imp["engagement_id"], row["master_client"], row["master_engagement"]
        ):
            foreign.add(row["import_id"])
            continue
        known = exact[row["import_id"]].get(row["flow_id"])
        if known is None or STRENGTH[row["evidence"]] < STRENGTH[known]:
            exact[row["import_id"]][row["flow_id"]] = row["evidence"]
    claimed: list[uuid.UUID] = []
    undecided: list[uuid.UUID] = []
    for imp_id, imp in orphans.items():
        candidates = exact.get(imp_id)
        if candidates and len(candidates) == 1:
            ((flow, evidence),) = candidates.items()
            plan.import_links.append(Link("data_imports", imp_id, flow, evidence))
            claimed.append(flow)
        elif candidates:
            reason = "contradicting exact evidence: more than one master names this import"
            plan.ambiguous.append(Ambiguous("data_imports", imp_id, sorted(candidates), reason))
        elif imp_id in foreign:
            reason = "the only exact evidence names a master flow of another tenant"
            plan.unmatched.append(Unmatched("data_imports", imp_id, reason))
        elif imp["client_account_id"] is None or imp["engagement_id"] is None:
            plan.unmatched.append(Unmatched("data_imports", imp_id, "no tenant on the import: never matched by time"))
        else:
            undecided.append(imp_id)
    return undecided, claimed


async def _plan_imports_by_time(
    conn: AsyncConnection, opts: Options, undecided: list[uuid.UUID], claimed: list[uuid.UUID], plan: Plan
) -> None:
    """Step 2b: the rest by time, one master per import (:func:`assign_by_time`)."""
    params = {"imports": undecided, "window": opts.window_seconds}
    # the masters exact evidence claims are left out here, not in SQL: a NOT EXISTS over
    # unnest(:claimed) is estimated at 10 rows whatever its size, and at 200k imports the
    # planner's nested anti-join ran for over ten minutes on PostgreSQL 18
    taken = set(claimed)
    pairs = [
        (r.import_id, r.flow_id, r.distance)
        for r in await conn.execute(text(TIME_CANDIDATES), params)
        if r.flow_id not in taken
    ]
    assigned, tied = assign_by_time(pairs)
    for imp_id in undecided:
        if imp_id in assigned:
            flow, distance = assigned[imp_id]
            plan.import_links.append(Link("data_imports", imp_id, flow, Evidence.TIME_WINDOW, distance))
        elif imp_id in tied:
            reason = "tie: more than one master at the nearest distance"
            plan.ambiguous.append(Ambiguous("data_imports", imp_id, tied[imp_id], reason))
        else:
            reason = "no free discovery master of this tenant within the window"
            plan.unmatched.append(Unmatched("data_imports", imp_id, reason))


async def _plan_records(conn: AsyncConnection, opts: Options, plan: Plan) -> None:
    """Step 3: records follow their import (once its planned link is in)."""
    planned = {
        "imp_ids": [link.id for link in plan.import_links],
        "imp_flows": [link.master_flow_id for link in plan.import_links],
    }
    created = {
        "c_flows": [c.flow_id for c in plan.masters_to_create],
        "c_clients": [c.client_account_id for c in plan.masters_to_create],
        "c_engagements": [c.engagement_id for c in plan.masters_to_create],
    }
    for row in (await conn.execute(text(RECORD_PLAN), {**opts.scope, **planned, **created})).mappings():
        imp = row["data_import_id"]
        if row["to_link"]:
            plan.record_links.append(
                Link("raw_import_records", imp, row["flow"], Evidence.VIA_IMPORT, rows=row["to_link"])
            )
        if row["tenant_conflict"]:
            reason = f"{row['tenant_conflict']} records of this import belong to another tenant than its master"
            plan.unmatched.append(Unmatched("raw_import_records", imp, reason))
        if row["no_master"]:
            plan.unmatched.append(
                Unmatched("raw_import_records", imp, f"{row['no_master']} records: their import has no master")
            )
    for row in (await conn.execute(text(DISAGREEING_RECORDS), {**opts.scope, **planned})).mappings():
        reason = "the record holds another master than its import: never overwritten"
        plan.ambiguous.append(
            Ambiguous("raw_import_records", row["id"], [row["master_flow_id"], row["import_master"]], reason)
        )
