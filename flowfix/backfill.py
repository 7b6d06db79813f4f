"""``flowfix backfill``: link orphaned rows to their master flow, evidence first.

Plan, then apply. :func:`make_plan` reads the database and proposes links with their
evidence (pure data: the dry run prints it, the tests assert on it). :func:`run` stores
the plan of the data imports in the ledger, then applies everything in short batches,
each its own transaction, under a per-database advisory lock:

1. ``discovery_flows`` with NULL ``master_flow_id`` take the master whose ``flow_id``
   equals their own (same tenant, a discovery master); with ``create_missing_masters``,
   a discovery flow with no such master gets one, created from its own columns.
2. ``data_imports`` with NULL ``master_flow_id``, by the strongest evidence:
   ``exact:discovery_flow`` (a discovery flow names the import and has a master),
   ``exact:configuration`` (a discovery master's configuration names the import), then
   ``time_window`` (a discovery master of the same client account and engagement, not
   deleted, created within the window, not linked to or named by anything else), one
   master per import, nearest first; ties at the nearest distance are ambiguous.
3. ``raw_import_records`` with NULL ``master_flow_id`` take their import's value.

Rows of different tenants are never linked. A run that dies is resumed by the next
one, which applies the stored plan (so the result is that of one uninterrupted run);
a finished run leaves nothing to do for the next.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from flowfix import catalog, ledger
from flowfix.config import Settings
from flowfix.db import connect
from flowfix.errors import FlowfixError, RunInterrupted, is_lock_timeout, lock_backoff
from flowfix.evidence import STRENGTH, Evidence
from flowfix.models import MASTER_TABLE, TENANT_SCOPE
from flowfix.tenancy import known_and_equal, known_and_equal_sql, unknown_matches, unknown_matches_sql

#: Each batch aims to finish within this many seconds; the batch size shrinks (and grows
#: back up to --batch-size) to stay near it, so live traffic keeps flowing.
TARGET_BATCH_SECONDS = 0.5


@dataclass(frozen=True)
class Options:
    window_seconds: float = 7200.0
    batch_size: int = 5000
    create_missing_masters: bool = False
    client_account: uuid.UUID | None = None
    engagement: uuid.UUID | None = None
    dry_run: bool = False
    #: how often a batch that gave up waiting for a lock is retried (not part of a run's identity)
    lock_retries: int = 5

    def arguments(self) -> dict[str, Any]:
        """What identifies a run (a resumed run must have been started with the same)."""
        return {
            "window_seconds": self.window_seconds,
            "create_missing_masters": self.create_missing_masters,
            "client_account": str(self.client_account) if self.client_account else None,
            "engagement": str(self.engagement) if self.engagement else None,
        }

    @property
    def scope(self) -> dict[str, uuid.UUID | None]:
        return {"client": self.client_account, "engagement": self.engagement}


@dataclass
class Link:
    table: str
    id: str
    master_flow_id: str
    evidence: str
    distance_seconds: float | None = None
    rows: int | None = None  # records: one entry per import, with the number of records


@dataclass
class Ambiguous:
    table: str
    id: str
    candidates: list[str]
    reason: str


@dataclass
class Unmatched:
    table: str
    id: str
    reason: str


@dataclass
class Plan:
    discovery_links: list[Link] = field(default_factory=list)
    masters_to_create: list[dict[str, Any]] = field(default_factory=list)
    import_links: list[Link] = field(default_factory=list)
    record_links: list[Link] = field(default_factory=list)
    ambiguous: list[Ambiguous] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)
    #: which discovery-flow values a created master needs on this database (CREATE_MASTERS)
    master_needs: dict[str, bool] = field(default_factory=dict)

    @property
    def records_to_link(self) -> int:
        return sum(link.rows or 0 for link in self.record_links)

    def import_evidence(self) -> dict[str, int]:
        """How many import links each kind of evidence supports, by name."""
        counts: dict[str, int] = defaultdict(int)
        for link in self.import_links:
            counts[link.evidence] += 1
        return dict(sorted(counts.items()))


@dataclass
class Result:
    run_id: str | None
    dry_run: bool
    window_seconds: float
    plan: Plan
    counts: dict[str, Any]
    resumed: bool = False

    @property
    def exit_code(self) -> int:
        return 1 if self.plan.ambiguous or self.plan.unmatched else 0

    def to_dict(self) -> dict[str, Any]:
        links = [
            asdict(link) for link in (*self.plan.discovery_links, *self.plan.import_links, *self.plan.record_links)
        ]
        for link in links:
            if link["rows"] is None:
                del link["rows"]
        return {
            "run_id": self.run_id,
            "dry_run": self.dry_run,
            "window_seconds": self.window_seconds,
            "counts": self.counts,
            "links": links,
            "ambiguous": [asdict(a) for a in self.plan.ambiguous],
            "unmatched": [asdict(u) for u in self.plan.unmatched],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# --- planning --------------------------------------------------------------------------

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
#: deleted, not linked to an import, not named by any import's exact evidence. The
#: LATERAL range scan on (tenant, created_at) keeps it to the masters near each import.
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
  AND NOT EXISTS (SELECT 1 FROM unnest(CAST(:claimed AS uuid[])) AS c(flow_id) WHERE c.flow_id = m.flow_id)
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


_Node = tuple[str, uuid.UUID]  # ("i", import id) or ("m", master flow_id)


def _find(parent: dict[_Node, _Node], node: _Node) -> _Node:
    """Union-find root of ``node``, compressing the path on the way."""
    root = node
    while parent.setdefault(root, root) != root:
        root = parent[root]
    while parent[node] != root:
        parent[node], node = root, parent[node]
    return root


def assign_by_time(
    pairs: list[tuple[uuid.UUID, uuid.UUID, float]],
) -> tuple[dict[uuid.UUID, tuple[uuid.UUID, float]], dict[uuid.UUID, list[uuid.UUID]]]:
    """One-to-one, deterministic: pairs are taken in order of increasing distance, a
    master goes to at most one import. At each distance the free pairs form tie groups
    (connected imports and masters); a group of exactly one import and one master is a
    link, any larger group is a tie: its imports are reported ambiguous, with the group's
    masters as candidates, and those masters go to no farther import either.

    Near-linear (union-find per distance), so a bulk load where thousands of imports and
    masters share one timestamp plans in moments, not hours.

    Returns ({import: (master, distance)}, {ambiguous import: [candidate masters]}).
    """
    by_distance: dict[float, list[tuple[uuid.UUID, uuid.UUID]]] = defaultdict(list)
    for imp, master, distance in pairs:
        by_distance[distance].append((imp, master))
    assigned: dict[uuid.UUID, tuple[uuid.UUID, float]] = {}
    ambiguous: dict[uuid.UUID, list[uuid.UUID]] = {}
    taken: set[uuid.UUID] = set()
    for distance in sorted(by_distance):
        free = [(i, m) for i, m in by_distance[distance] if i not in assigned and i not in ambiguous and m not in taken]
        parent: dict[_Node, _Node] = {}
        for i, m in free:
            a, b = _find(parent, ("i", i)), _find(parent, ("m", m))
            if a != b:
                parent[a] = b
        groups: dict[_Node, tuple[set[uuid.UUID], set[uuid.UUID]]] = defaultdict(lambda: (set(), set()))
        for i, m in free:
            imports, masters = groups[_find(parent, ("i", i))]
            imports.add(i)
            masters.add(m)
        for imports, masters in groups.values():
            if len(imports) == 1 and len(masters) == 1:
                (i,), (m,) = imports, masters
                assigned[i] = (m, distance)
            else:
                candidates = sorted(masters)
                for i in imports:
                    ambiguous[i] = candidates
            taken |= masters
    return assigned, ambiguous


async def make_plan(conn: AsyncConnection, opts: Options) -> Plan:
    """What the backfill would do now, with the evidence for each link. Reads only."""
    plan = Plan()
    scope = opts.scope
    creation = MasterCreation(await conn.run_sync(catalog.required_columns, MASTER_TABLE))
    plan.master_needs = creation.needs

    # 1. discovery flows: their own flow_id names their master.
    df_ids: list[uuid.UUID] = []
    df_masters: list[uuid.UUID] = []
    for row in (await conn.execute(text(ORPHAN_DISCOVERY_FLOWS), scope)).mappings():
        if row["master"] is None:
            why_not = creation.refusal(row) if opts.create_missing_masters else None
            if why_not:
                plan.unmatched.append(
                    Unmatched("discovery_flows", str(row["id"]), f"cannot create its master: {why_not}")
                )
            elif opts.create_missing_masters:
                plan.masters_to_create.append(dict(row))
                plan.discovery_links.append(
                    Link("discovery_flows", str(row["id"]), str(row["flow_id"]), Evidence.CREATED)
                )
                df_ids.append(row["id"])
                df_masters.append(row["flow_id"])
            else:
                plan.unmatched.append(
                    Unmatched(
                        "discovery_flows",
                        str(row["id"]),
                        "no master flow has this flow_id (--create-missing-masters creates one)",
                    )
                )
        elif not known_and_equal(
            row["client_account_id"], row["engagement_id"], row["master_client"], row["master_engagement"]
        ):
            plan.unmatched.append(
                Unmatched(
                    "discovery_flows", str(row["id"]), "the master flow with this flow_id belongs to another tenant"
                )
            )
        elif row["flow_type"] != "discovery":
            plan.unmatched.append(
                Unmatched(
                    "discovery_flows",
                    str(row["id"]),
                    f"the master flow with this flow_id is a '{row['flow_type']}' flow",
                )
            )
        else:
            plan.discovery_links.append(Link("discovery_flows", str(row["id"]), str(row["master"]), Evidence.FLOW_ID))
            df_ids.append(row["id"])
            df_masters.append(row["master"])

    # 2. imports: exact evidence first.
    orphans = {r["id"]: r for r in (await conn.execute(text(ORPHAN_IMPORTS), scope)).mappings()}
    exact: dict[uuid.UUID, dict[uuid.UUID, str]] = defaultdict(dict)
    foreign: set[uuid.UUID] = set()
    for row in (
        await conn.execute(
            text(EXACT_EVIDENCE),
            {"imports": list(orphans), "df_ids": df_ids, "df_masters": df_masters, **Evidence.params()},
        )
    ).mappings():
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
    for imp_id in orphans:
        candidates = exact.get(imp_id)
        if candidates and len(candidates) == 1:
            ((flow, evidence),) = candidates.items()
            plan.import_links.append(Link("data_imports", str(imp_id), str(flow), evidence))
            claimed.append(flow)
        elif candidates:
            plan.ambiguous.append(
                Ambiguous(
                    "data_imports",
                    str(imp_id),
                    sorted(str(f) for f in candidates),
                    "contradicting exact evidence: more than one master names this import",
                )
            )
        elif imp_id in foreign:
            plan.unmatched.append(
                Unmatched("data_imports", str(imp_id), "the only exact evidence names a master flow of another tenant")
            )
        elif orphans[imp_id]["client_account_id"] is None or orphans[imp_id]["engagement_id"] is None:
            plan.unmatched.append(
                Unmatched("data_imports", str(imp_id), "no tenant on the import: never matched by time")
            )
        else:
            undecided.append(imp_id)

    # ... then time, one master per import.
    pairs = [
        (r.import_id, r.flow_id, r.distance)
        for r in (
            await conn.execute(
                text(TIME_CANDIDATES), {"imports": undecided, "window": opts.window_seconds, "claimed": claimed}
            )
        )
    ]
    assigned, tied = assign_by_time(pairs)
    for imp_id in undecided:
        if imp_id in assigned:
            flow, distance = assigned[imp_id]
            plan.import_links.append(Link("data_imports", str(imp_id), str(flow), Evidence.TIME_WINDOW, distance))
        elif imp_id in tied:
            plan.ambiguous.append(
                Ambiguous(
                    "data_imports",
                    str(imp_id),
                    [str(f) for f in tied[imp_id]],
                    "tie: more than one master at the nearest distance",
                )
            )
        else:
            plan.unmatched.append(
                Unmatched("data_imports", str(imp_id), "no free discovery master of this tenant within the window")
            )
    plan.import_links.sort(key=lambda link: link.id)

    # 3. records follow their import.
    created = plan.masters_to_create
    planned = {
        "imp_ids": [uuid.UUID(link.id) for link in plan.import_links],
        "imp_flows": [uuid.UUID(link.master_flow_id) for link in plan.import_links],
    }
    for row in (
        await conn.execute(
            text(RECORD_PLAN),
            {
                **scope,
                **planned,
                "c_flows": [c["flow_id"] for c in created],
                "c_clients": [c["client_account_id"] for c in created],
                "c_engagements": [c["engagement_id"] for c in created],
            },
        )
    ).mappings():
        if row["to_link"]:
            plan.record_links.append(
                Link(
                    "raw_import_records",
                    str(row["data_import_id"]),
                    str(row["flow"]),
                    Evidence.VIA_IMPORT,
                    rows=row["to_link"],
                )
            )
        if row["tenant_conflict"]:
            plan.unmatched.append(
                Unmatched(
                    "raw_import_records",
                    str(row["data_import_id"]),
                    f"{row['tenant_conflict']} records of this import belong to another tenant than its master",
                )
            )
        if row["no_master"]:
            plan.unmatched.append(
                Unmatched(
                    "raw_import_records",
                    str(row["data_import_id"]),
                    f"{row['no_master']} records: their import has no master",
                )
            )
    for row in (await conn.execute(text(DISAGREEING_RECORDS), {**scope, **planned})).mappings():
        plan.ambiguous.append(
            Ambiguous(
                "raw_import_records",
                str(row["id"]),
                [str(row["master_flow_id"]), str(row["import_master"])],
                "the record holds another master than its import: never overwritten",
            )
        )
    return plan


# --- applying --------------------------------------------------------------------------

LINK_DISCOVERY_FLOWS = f"""
WITH todo AS (SELECT * FROM unnest(CAST(:ids AS uuid[]), CAST(:masters AS uuid[])) AS x(id, master)),
changed AS (
    UPDATE discovery_flows t SET master_flow_id = todo.master, updated_at = now()
    FROM todo
    JOIN crewai_flow_state_extensions m ON m.flow_id = todo.master
    WHERE t.id = todo.id AND t.master_flow_id IS NULL
      AND {known_and_equal_sql("t", "m")}
    RETURNING t.id, todo.master
)
INSERT INTO flowfix_changes (run_id, table_name, row_id, column_name, old_value, new_value, evidence, applied_at)
SELECT :run, 'discovery_flows', id, 'master_flow_id', NULL, master, :evidence, now() FROM changed
RETURNING row_id
"""

#: A master for each discovery flow of :ids that still has none, from the flow's own
#: columns; flowfix supplies the id (the application's schema has no default for it).
#: The planner's refusals are checked again, so a row changed since planning is skipped,
#: never an error.
CREATE_MASTERS = """
WITH todo AS (SELECT * FROM unnest(CAST(:ids AS uuid[])) AS x(id)),
created AS (
    INSERT INTO crewai_flow_state_extensions (id, flow_id, client_account_id, engagement_id, user_id, flow_type,
                                              flow_name, flow_status, flow_configuration)
    SELECT gen_random_uuid(), d.flow_id, d.client_account_id, d.engagement_id, d.user_id, 'discovery', d.flow_name,
           COALESCE(d.status, 'initialized'),
           jsonb_build_object('created_by', 'flowfix backfill', 'run_id', CAST(:run_text AS text))
    FROM discovery_flows d JOIN todo ON todo.id = d.id
    WHERE d.master_flow_id IS NULL
      AND (d.user_id IS NOT NULL OR NOT :need_user_id) AND (d.flow_name IS NOT NULL OR NOT :need_flow_name)
      AND NOT EXISTS (SELECT 1 FROM crewai_flow_state_extensions m WHERE m.flow_id = d.flow_id OR m.id = d.flow_id)
    RETURNING flow_id
)
INSERT INTO flowfix_changes (run_id, table_name, row_id, column_name, old_value, new_value, evidence, applied_at)
SELECT :run, 'crewai_flow_state_extensions', c.flow_id, '*created*', NULL, c.flow_id, CAST(:ev_created AS text), now()
FROM created c
RETURNING row_id
"""

STORE_IMPORT_PLAN = """
INSERT INTO flowfix_changes (run_id, table_name, row_id, column_name, old_value, new_value, evidence, distance_seconds)
SELECT :run, 'data_imports', x.id, 'master_flow_id', NULL, x.flow, x.evidence, x.distance
FROM unnest(CAST(:ids AS uuid[]), CAST(:flows AS uuid[]), CAST(:evidence AS text[]), CAST(:distances AS float8[]))
     AS x(id, flow, evidence, distance)
"""

#: Apply the next batch of the stored import plan. Every guard is checked again against
#: the rows as they are now: still NULL, same tenant, master present and not deleted,
#: and (time window) the master still not linked to another import.
APPLY_IMPORT_BATCH = f"""
WITH batch AS (
    SELECT c.id AS change_id, c.row_id, c.new_value, c.evidence
    FROM flowfix_changes c
    WHERE c.run_id = :run AND c.table_name = 'data_imports' AND c.applied_at IS NULL AND c.skipped IS NULL
      AND (CAST(:after AS uuid) IS NULL OR c.row_id > CAST(:after AS uuid))
    ORDER BY c.row_id
    LIMIT :limit
), changed AS (
    UPDATE data_imports t SET master_flow_id = b.new_value, updated_at = now()
    FROM batch b
    JOIN crewai_flow_state_extensions m ON m.flow_id = b.new_value AND m.flow_status IS DISTINCT FROM 'deleted'
    WHERE t.id = b.row_id AND t.master_flow_id IS NULL
      AND {unknown_matches_sql("t", "m")}
      AND (b.evidence <> CAST(:ev_time_window AS text) OR NOT EXISTS (
           SELECT 1 FROM data_imports x WHERE x.master_flow_id = b.new_value AND x.id <> t.id))
    RETURNING b.change_id
), applied AS (
    UPDATE flowfix_changes c SET applied_at = now() FROM changed WHERE c.id = changed.change_id RETURNING c.id
), skipped AS (
    UPDATE flowfix_changes c SET skipped = 'the import or its master changed since planning'
    FROM batch b WHERE c.id = b.change_id AND c.id NOT IN (SELECT change_id FROM changed) RETURNING c.id
)
SELECT (SELECT row_id FROM batch ORDER BY row_id DESC LIMIT 1) AS last_id,
       (SELECT count(*) FROM applied) AS applied, (SELECT count(*) FROM skipped) AS skipped
"""

#: Link the NULL records of the next batch of linked imports, and log one ledger change
#: per import with the ids of the records it set. Imports are taken in id order, after the
#: cursor :after (NULL: from the start, so the nil UUID is not skipped); an import without
#: created_at, or with a naive one, is walked like any other.
LINK_RECORDS_BATCH = f"""
WITH imports AS (
    SELECT t.id, t.master_flow_id FROM data_imports t
    WHERE t.master_flow_id IS NOT NULL AND (CAST(:after AS uuid) IS NULL OR t.id > CAST(:after AS uuid))
      AND {TENANT_SCOPE}
    ORDER BY t.id
    LIMIT :limit
), changed AS (
    UPDATE raw_import_records r SET master_flow_id = i.master_flow_id
    FROM imports i
    JOIN crewai_flow_state_extensions m ON m.flow_id = i.master_flow_id
    WHERE r.data_import_id = i.id AND r.master_flow_id IS NULL AND {RECORD_TENANT_OK}
    RETURNING r.id, r.data_import_id, r.master_flow_id
), logged AS (
    INSERT INTO flowfix_changes (run_id, table_name, row_id, column_name, old_value, new_value, evidence,
                                 row_ids, applied_at)
    SELECT :run, 'raw_import_records', data_import_id, 'master_flow_id', NULL, master_flow_id, CAST(:ev_via_import AS text),
           array_agg(id ORDER BY id), now()
    FROM changed GROUP BY data_import_id, master_flow_id
    RETURNING 1
)
SELECT (SELECT id FROM imports ORDER BY id DESC LIMIT 1) AS last_id, (SELECT count(*) FROM changed) AS changed
"""


class Batcher:
    """Batch sizes that adapt to measured duration, up to the configured maximum."""

    def __init__(self, maximum: int) -> None:
        self.maximum = max(1, maximum)
        self.size = self.maximum
        self.count = 0
        self.longest = 0.0

    def done(self, seconds: float) -> None:
        self.count += 1
        self.longest = max(self.longest, seconds)
        if seconds > TARGET_BATCH_SECONDS:
            self.size = max(1, int(self.size * TARGET_BATCH_SECONDS / seconds))
        elif seconds < TARGET_BATCH_SECONDS / 2:
            self.size = min(self.maximum, self.size * 2)


Progress = Callable[[str, int], None]


async def _batch(
    conn: AsyncConnection, batcher: Batcher, retries: int, sql: str, params: dict[str, Any], *, rows: bool = False
) -> Any:
    """One statement in its own short transaction, timed for the batch size. Every flowfix
    session has a lock_timeout (flowfix.config.connect_args): a batch that gives up
    waiting for an application's row lock is rolled back and retried with jittered
    backoff, holding nothing in between."""
    for attempt in range(retries + 1):
        started = time.perf_counter()
        try:
            async with conn.begin():
                # evidence names are bound, never spelled in the SQL (flowfix.evidence)
                result = await conn.execute(text(sql), {**Evidence.params(), **params, "limit": batcher.size})
                out = result.all() if rows else result.one()
            batcher.done(time.perf_counter() - started)
            return out
        except DBAPIError as exc:
            if not is_lock_timeout(exc) or attempt == retries:
                raise
            await asyncio.sleep(lock_backoff(attempt))
    raise AssertionError("unreachable")


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


async def _store_import_plan(conn: AsyncConnection, run_id: uuid.UUID, links: list[Link]) -> None:
    """The import links of a plan go to the ledger before any is applied (resumable)."""
    await conn.execute(
        text(STORE_IMPORT_PLAN),
        {
            "run": run_id,
            "ids": [uuid.UUID(link.id) for link in links],
            "flows": [uuid.UUID(link.master_flow_id) for link in links],
            "evidence": [link.evidence for link in links],
            "distances": [link.distance_seconds for link in links],
        },
    )


async def _interrupted_run(conn: AsyncConnection, opts: Options) -> uuid.UUID | None:
    row = (
        await conn.execute(
            text(
                "SELECT id, arguments FROM flowfix_runs WHERE command = 'backfill' AND status = 'running'"
                " ORDER BY started_at DESC LIMIT 1"
            )
        )
    ).one_or_none()
    if row is None:
        return None
    if row.arguments != opts.arguments():
        raise FlowfixError(
            f"backfill run {row.id} was interrupted with other arguments ({json.dumps(row.arguments)}): "
            "rerun it with those to finish it, or `flowfix undo` it first"
        )
    run_id: uuid.UUID = row.id
    return run_id


async def run(engine: AsyncEngine, settings: Settings, opts: Options, progress: Progress | None = None) -> Result:
    """Plan and (unless ``opts.dry_run``) apply, resuming an interrupted run if any."""
    note = progress or (lambda step, n: None)
    async with connect(engine, settings) as conn:
        async with conn.begin():
            await ledger.require_ledger(conn)
            await conn.run_sync(catalog.require_full_visibility, "the backfill")
            if opts.dry_run:
                plan = await make_plan(conn, opts)
                return Result(None, True, opts.window_seconds, plan, _plan_counts(plan))

        got = (
            await conn.execute(text("SELECT pg_try_advisory_lock(hashtext(:k))"), {"k": ledger.ADVISORY_LOCK_KEY})
        ).scalar_one()
        await conn.commit()
        if not got:
            raise ledger.RunLocked("another flowfix run (backfill, link or undo) is in progress on this database")
        started: list[uuid.UUID] = []
        try:
            return await _apply(conn, opts, note, started)
        except Exception as exc:
            if not started:
                raise
            raise RunInterrupted(
                f"backfill run {started[0]} stopped part-way; the batches it committed stay (they are in the"
                f" ledger): run `flowfix backfill` again with the same options to resume it, or"
                f" `flowfix undo {started[0]}` to revert them",
                started[0],
            ) from exc
        finally:
            try:
                await conn.execute(text("SELECT pg_advisory_unlock(hashtext(:k))"), {"k": ledger.ADVISORY_LOCK_KEY})
                await conn.commit()
            except Exception:  # noqa: BLE001, S110 - a lost session took the lock with it; the first error counts
                pass


async def _apply(conn: AsyncConnection, opts: Options, note: Progress, run_ids: list[uuid.UUID]) -> Result:
    """Plan, store (or resume), apply; ``run_ids`` receives the run id as soon as the run
    is committed, so that a failure after that can name it."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[step] = round(now - clock, 3)
        clock = now

    async with conn.begin():
        run_id = await _interrupted_run(conn, opts)
        resumed = run_id is not None
        plan = await make_plan(conn, opts)
        if run_id is None:
            run_id = await ledger.start_run(conn, "backfill", opts.arguments())
            await _store_import_plan(conn, run_id, plan.import_links)
        else:
            planned = (
                await conn.execute(
                    text(
                        "SELECT row_id, new_value, evidence, distance_seconds, applied_at IS NULL AND skipped IS NULL"
                        " AS pending FROM flowfix_changes WHERE run_id = :run AND table_name = 'data_imports'"
                        " ORDER BY row_id"
                    ),
                    {"run": run_id},
                )
            ).all()
            # the stored plan wins over a fresh one for the imports it covers (same result as
            # one uninterrupted run); orphans that appeared since are planned afresh and stored
            stored = [r for r in planned if r.pending]
            covered = {str(r.row_id) for r in planned}
            new_links = [link for link in plan.import_links if link.id not in covered]
            await _store_import_plan(conn, run_id, new_links)
            plan.import_links = [
                Link("data_imports", str(r.row_id), str(r.new_value), r.evidence, r.distance_seconds) for r in stored
            ] + new_links
            stale = {link.id for link in plan.import_links}
            plan.ambiguous = [a for a in plan.ambiguous if a.table != "data_imports" or a.id not in stale]
            plan.unmatched = [u for u in plan.unmatched if u.table != "data_imports" or u.id not in stale]
    run_ids.append(run_id)

    lap("plan")
    batcher = Batcher(opts.batch_size)
    counts: dict[str, int] = defaultdict(int)

    # 1. discovery flows (and the masters --create-missing-masters adds)
    for chunk in _chunks(plan.masters_to_create, opts.batch_size):
        made = await _batch(
            conn,
            batcher,
            opts.lock_retries,
            CREATE_MASTERS,
            {"run": run_id, "run_text": str(run_id), "ids": [c["id"] for c in chunk], **plan.master_needs},
            rows=True,
        )
        counts["masters_created"] += len(made)
    for chunk in _chunks(plan.discovery_links, opts.batch_size):
        done = await _batch(
            conn,
            batcher,
            opts.lock_retries,
            LINK_DISCOVERY_FLOWS,
            {
                "run": run_id,
                "ids": [uuid.UUID(link.id) for link in chunk],
                "masters": [uuid.UUID(link.master_flow_id) for link in chunk],
                "evidence": Evidence.FLOW_ID.value,
            },
            rows=True,
        )
        counts["discovery_flows"] += len(done)
        note("discovery_flows", len(done))
    lap("discovery_flows")

    # 2. imports, from the stored plan
    after: uuid.UUID | None = None
    while True:
        last_id, applied, skipped = await _batch(
            conn, batcher, opts.lock_retries, APPLY_IMPORT_BATCH, {"run": run_id, "after": after}
        )
        if last_id is None:
            break
        after = last_id
        counts["data_imports"] += applied
        counts["skipped"] += skipped
        note("data_imports", applied)
    lap("data_imports")

    # 3. records follow their import; a batch is as many imports as make --batch-size records
    per_import = -(-plan.records_to_link // max(1, len(plan.record_links))) or 1
    by_import = Batcher(max(1, opts.batch_size // per_import))
    after = None
    while True:
        last_id, changed = await _batch(
            conn, by_import, opts.lock_retries, LINK_RECORDS_BATCH, {"run": run_id, "after": after, **opts.scope}
        )
        if last_id is None:
            break
        after = last_id
        counts["raw_import_records"] += changed
        note("raw_import_records", changed)
    lap("raw_import_records")

    final = {
        **_plan_counts(plan),
        **counts,
        "batches": batcher.count + by_import.count,
        "longest_batch_ms": round(max(batcher.longest, by_import.longest) * 1000, 1),
        "seconds": seconds,
    }
    async with conn.begin():
        await ledger.finish_run(conn, run_id, "finished", final)
    return Result(str(run_id), False, opts.window_seconds, plan, final, resumed=resumed)


def _plan_counts(plan: Plan) -> dict[str, int]:
    return {
        "planned_discovery_flows": len(plan.discovery_links),
        "planned_masters_created": len(plan.masters_to_create),
        "planned_data_imports": len(plan.import_links),
        "planned_raw_import_records": plan.records_to_link,
        **{f"planned_{k}": v for k, v in plan.import_evidence().items()},
        "ambiguous": len(plan.ambiguous),
        "unmatched": len(plan.unmatched),
    }
