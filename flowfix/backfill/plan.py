"""Planning: what the backfill would do now, with the evidence for each link. Reads only.

One function per step (discovery flows, imports by exact evidence, imports by time,
records); each returns plain data the next one builds on, and :func:`make_plan` strings
them together. The SQL is here, readable in one place.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from flowfix import catalog
from flowfix.backfill.matching import assign_by_time
from flowfix.backfill.model import Ambiguous, Link, NewMaster, Options, Plan, Unmatched
from flowfix.evidence import STRENGTH, Evidence
from flowfix.models import MASTER_TABLE, TENANT_SCOPE
from flowfix.tenancy import known_and_equal, known_and_equal_sql, unknown_matches_sql

ORPHAN_DISCOVERY_FLOWS = f"""
SELECT t.id, t.flow_id, t.client_account_id, t.engagement_id, t.user_id, t.flow_name, t.status,
       m.flow_id AS master, m.flow_type, m.client_account_id AS master_client, m.engagement_id AS master_engagement,
       EXISTS (SELECT 1 FROM crewai_flow_state_extensions x WHERE x.id = t.flow_id) AS flow_id_is_a_master_id
FROM discovery_flows t
LEFT JOIN crewai_flow_state_extensions m ON m.flow_id = t.flow_id
WHERE t.master_flow_id IS NULL AND {TENANT_SCOPE}
ORDER BY t.id
"""

#: Imports named in a master's JSON, compared as uuid (any spelling the type accepts:
#: braces, upper case, no hyphens); a value that is no uuid is no evidence, and never an
#: error (the regex guards the cast; pg_input_is_valid exists only from PostgreSQL 16).
UUID_TEXT = r"^(\{[0-9a-f]{4}(-?[0-9a-f]{4}){7}\}|[0-9a-f]{4}(-?[0-9a-f]{4}){7})$"


def json_uuid(expr: str) -> str:
    """``expr`` (a text) as a uuid, or NULL when it is no uuid."""
    return f"CASE WHEN {expr} ~* CAST(:uuid_text AS text) THEN CAST({expr} AS uuid) END"


#: The planner's work tables: temporary, dropped at the end of the planning transaction,
#: ANALYZEd once filled, so every join below is planned on true row counts (an unnest()
#: of a 200k-element array is estimated at 10 rows, and the plans built on that took
#: minutes). ``flowfix_plan_links``: the links planned so far (and, resuming, the stored
#: ones still pending); ``flowfix_plan_orphans``: the imports left to decide.
WORK_TABLES = (
    "CREATE TEMPORARY TABLE flowfix_plan_links (tbl text NOT NULL, id uuid NOT NULL, master uuid NOT NULL,"
    " evidence text NOT NULL, client_account_id uuid, engagement_id uuid, distance_seconds float8) ON COMMIT DROP",
    "CREATE TEMPORARY TABLE flowfix_plan_orphans (id uuid NOT NULL, client_account_id uuid, engagement_id uuid,"
    " created_at timestamptz) ON COMMIT DROP",
)

#: Orphan imports in scope that no pending stored link decides, kept server-side.
ORPHAN_IMPORTS = f"""
INSERT INTO flowfix_plan_orphans (id, client_account_id, engagement_id, created_at)
SELECT t.id, t.client_account_id, t.engagement_id, t.created_at
FROM data_imports t
WHERE t.master_flow_id IS NULL AND {TENANT_SCOPE}
  AND NOT EXISTS (SELECT 1 FROM flowfix_plan_links p WHERE p.tbl = 'data_imports' AND p.id = t.id)
"""

#: A resumed run's stored import links not yet applied or skipped, checked against the
#: rows as they are now with the guards the apply statement will use: ``applies`` says
#: whether the batch will link it (the import still NULL, master present, not deleted,
#: same tenant, and by time no other import on the master).
STORED_PENDING = f"""
SELECT c.row_id, c.new_value, c.evidence, c.distance_seconds, t.master_flow_id IS NULL AS still_null,
       (m.flow_id IS NOT NULL AND m.flow_status IS DISTINCT FROM 'deleted' AND {unknown_matches_sql("t", "m")}
        AND (c.evidence <> CAST(:ev_time_window AS text) OR NOT EXISTS (
             SELECT 1 FROM data_imports x WHERE x.master_flow_id = c.new_value AND x.id <> t.id))) AS applies
FROM flowfix_changes c
JOIN data_imports t ON t.id = c.row_id
LEFT JOIN crewai_flow_state_extensions m ON m.flow_id = c.new_value
WHERE c.run_id = :run AND c.table_name = 'data_imports' AND c.applied_at IS NULL AND c.skipped IS NULL
ORDER BY c.row_id
"""

#: Exact evidence for the orphan imports. A discovery flow's master is its own (or the
#: one step 1 plans for it, from the planned links); the master's tenant comes from the
#: master table or, for a master step 1 will create, from the planned link.
EXACT_EVIDENCE = f"""
CREATE TEMPORARY TABLE flowfix_plan_exact ON COMMIT DROP AS
WITH evidence AS (
    SELECT o.id AS import_id, COALESCE(d.master_flow_id, p.master) AS flow_id,
           CAST(:ev_discovery_flow AS text) AS evidence, p.client_account_id AS p_client, p.engagement_id AS p_engagement
    FROM flowfix_plan_orphans o
    JOIN discovery_flows d ON d.data_import_id = o.id
    LEFT JOIN flowfix_plan_links p ON p.tbl = 'discovery_flows' AND p.id = d.id
    WHERE COALESCE(d.master_flow_id, p.master) IS NOT NULL
  UNION ALL
    SELECT o.id, m.flow_id, CAST(:ev_configuration AS text), NULL, NULL
    FROM flowfix_plan_orphans o
    JOIN crewai_flow_state_extensions m ON {json_uuid("m.flow_configuration->>'import_id'")} = o.id
    WHERE m.flow_type = 'discovery' AND m.flow_status IS DISTINCT FROM 'deleted'
  UNION ALL
    SELECT o.id, m.flow_id, CAST(:ev_configuration AS text), NULL, NULL
    FROM flowfix_plan_orphans o
    JOIN crewai_flow_state_extensions m ON {json_uuid("m.flow_persistence_data->>'data_import_id'")} = o.id
    WHERE m.flow_type = 'discovery' AND m.flow_status IS DISTINCT FROM 'deleted'
)
SELECT e.import_id, e.flow_id, e.evidence,
       {unknown_matches_sql("o", "x")} AS same_tenant
FROM evidence e
JOIN flowfix_plan_orphans o ON o.id = e.import_id
LEFT JOIN crewai_flow_state_extensions m ON m.flow_id = e.flow_id
CROSS JOIN LATERAL (SELECT COALESCE(m.client_account_id, e.p_client) AS client_account_id,
                           COALESCE(m.engagement_id, e.p_engagement) AS engagement_id) x
"""

#: Which exact evidence is stronger (:data:`flowfix.evidence.STRENGTH`), as SQL over the
#: bound evidence names.
EXACT_STRENGTH = (
    "CASE evidence "
    + " ".join(f"WHEN CAST(:ev_{Evidence(name).name.lower()} AS text) THEN {rank}" for name, rank in STRENGTH.items())
    + " END"
)

#: The imports exact evidence decides (every same-tenant piece names one master), linked
#: in the links table at once with the strongest evidence; the client gets only the links.
EXACT_LINKS = f"""
WITH per_import AS (
    SELECT import_id, array_agg(DISTINCT flow_id) AS flows, (array_agg(evidence ORDER BY {EXACT_STRENGTH}))[1] AS evidence
    FROM flowfix_plan_exact WHERE same_tenant GROUP BY import_id
), stored AS (
    INSERT INTO flowfix_plan_links (tbl, id, master, evidence)
    SELECT 'data_imports', import_id, flows[1], evidence FROM per_import WHERE cardinality(flows) = 1
    RETURNING id, master, evidence
)
SELECT array_agg(id) AS imports, array_agg(master) AS flows, array_agg(evidence) AS evidence FROM stored
"""

#: The orphans no link decides, in id order, with why: "contradicting" (exact evidence
#: names several masters), "foreign" (its only exact evidence is another tenant's),
#: "no_tenant" (time matching needs one) or "time".
ORPHANS_LEFT = """
SELECT array_agg(o.id ORDER BY o.id) AS ids,
       array_agg(CASE WHEN x.same_tenant THEN 'contradicting'
                      WHEN x.import_id IS NOT NULL THEN 'foreign'
                      WHEN o.client_account_id IS NULL OR o.engagement_id IS NULL THEN 'no_tenant'
                      ELSE 'time' END ORDER BY o.id) AS kinds
FROM flowfix_plan_orphans o
LEFT JOIN (SELECT import_id, bool_or(same_tenant) AS same_tenant FROM flowfix_plan_exact GROUP BY import_id) x
       ON x.import_id = o.id
WHERE NOT EXISTS (SELECT 1 FROM flowfix_plan_links p WHERE p.tbl = 'data_imports' AND p.id = o.id)
"""

#: The masters each contradicted import's exact evidence names (a few rows, if any).
EXACT_CONTRADICTIONS = """
SELECT import_id, array_agg(DISTINCT flow_id ORDER BY flow_id) AS flows
FROM flowfix_plan_exact WHERE same_tenant GROUP BY import_id HAVING count(DISTINCT flow_id) > 1
"""

#: The masters time matching may give: discovery, not deleted, with a tenant and a
#: created_at, not linked to an import nor named by anything, nor claimed by a link in
#: the links table (exact evidence, a resumed run's pending links). Kept in a work table with its own
#: index on (tenant, created_at), so each import's window is one short range scan.
FREE_MASTERS = (
    """CREATE TEMPORARY TABLE flowfix_plan_free ON COMMIT DROP AS
SELECT m.flow_id, m.client_account_id, m.engagement_id, m.created_at
FROM crewai_flow_state_extensions m
WHERE m.flow_type = 'discovery' AND m.flow_status IS DISTINCT FROM 'deleted'
  AND m.client_account_id IS NOT NULL AND m.engagement_id IS NOT NULL AND m.created_at IS NOT NULL
  AND m.flow_configuration->>'import_id' IS NULL
  AND m.flow_persistence_data->>'data_import_id' IS NULL
  AND NOT EXISTS (SELECT 1 FROM data_imports x WHERE x.master_flow_id = m.flow_id)
  AND NOT EXISTS (SELECT 1 FROM discovery_flows d WHERE d.master_flow_id = m.flow_id AND d.data_import_id IS NOT NULL)
  AND NOT EXISTS (SELECT 1 FROM discovery_flows d WHERE d.flow_id = m.flow_id AND d.data_import_id IS NOT NULL)""",
    # the masters links already claim (exact evidence, a resumed run's pending links) go
    # before the ANALYZE, so the pairs below are planned on the masters truly free
    "DELETE FROM flowfix_plan_free f USING flowfix_plan_links p WHERE p.tbl = 'data_imports' AND p.master = f.flow_id",
    "CREATE INDEX ON flowfix_plan_free (client_account_id, engagement_id, created_at)",
    "ANALYZE flowfix_plan_free",
)

#: Candidate (import, master) pairs within the window, for the orphans with a tenant and
#: no exact evidence, kept server-side (the free masters no longer hold those a link
#: claims: :data:`FREE_MASTERS`).
TIME_PAIRS = f"""
CREATE TEMPORARY TABLE flowfix_plan_pairs ON COMMIT DROP AS
SELECT o.id AS import_id, near.flow_id, near.distance, near.import_nearest
FROM flowfix_plan_orphans o
CROSS JOIN LATERAL (
    -- ranked among the import's own few pairs: whether this is its only nearest master
    SELECT flow_id, distance, distance = min(distance) OVER () AND count(*) OVER (
               ORDER BY distance RANGE BETWEEN CURRENT ROW AND CURRENT ROW) = 1 AS import_nearest
    FROM (SELECT f.flow_id, abs(extract(epoch FROM (f.created_at - o.created_at)))::float8 AS distance
          FROM flowfix_plan_free f
          WHERE {known_and_equal_sql("o", "f")}
            AND f.created_at BETWEEN o.created_at - make_interval(secs => :window)
                                 AND o.created_at + make_interval(secs => :window)) window_pairs
) near
WHERE NOT EXISTS (SELECT 1 FROM flowfix_plan_exact e WHERE e.import_id = o.id)
"""

#: The pairs matching decides without looking further, stored as links at once: the
#: import's only nearest master is also the master's only nearest import. Taking pairs
#: by increasing distance (:func:`assign_by_time`) meets such a pair before anything else
#: of either side, alone at its distance, so it links them whatever the other pairs are;
#: and it removes nothing but the pairs of those two. So these links, plus
#: :func:`assign_by_time` over the pairs left (:data:`TIME_PAIRS_LEFT`), are exactly its
#: answer over all pairs; the client sees only the links and the tangled rest.
TIME_SURE_LINKS = """
WITH ranked AS (
    SELECT import_id, flow_id, distance, import_nearest,
           min(distance) OVER w AS master_nearest,
           count(*) OVER (w ORDER BY distance RANGE BETWEEN CURRENT ROW AND CURRENT ROW) AS master_at
    FROM flowfix_plan_pairs
    WINDOW w AS (PARTITION BY flow_id)
), stored AS (
    INSERT INTO flowfix_plan_links (tbl, id, master, evidence, distance_seconds)
    SELECT 'data_imports', import_id, flow_id, CAST(:ev_time_window AS text), distance
    FROM ranked
    WHERE import_nearest AND distance = master_nearest AND master_at = 1
    RETURNING id, master, distance_seconds
)
SELECT array_agg(id) AS imports, array_agg(master) AS flows, array_agg(distance_seconds) AS distances FROM stored
"""

#: The pairs neither of whose sides a sure link took: :func:`assign_by_time` decides them.
TIME_PAIRS_LEFT = """
SELECT array_agg(p.import_id) AS imports, array_agg(p.flow_id) AS flows, array_agg(p.distance) AS distances
FROM flowfix_plan_pairs p
WHERE NOT EXISTS (SELECT 1 FROM flowfix_plan_links l WHERE l.tbl = 'data_imports' AND l.id = p.import_id)
  AND NOT EXISTS (SELECT 1 FROM flowfix_plan_links l WHERE l.tbl = 'data_imports' AND l.master = p.flow_id)
"""

#: Store links in the work table; the arrays only feed an INSERT (no join is planned on them).
STORE_LINKS = """
INSERT INTO flowfix_plan_links (tbl, id, master, evidence, client_account_id, engagement_id, distance_seconds)
SELECT CAST(:tbl AS text), x.id, x.master, x.evidence, x.client, x.engagement, x.distance
FROM unnest(CAST(:ids AS uuid[]), CAST(:masters AS uuid[]), CAST(:evidence AS text[]), CAST(:clients AS uuid[]),
            CAST(:engagements AS uuid[]), CAST(:distances AS float8[])) AS x(id, master, evidence, client, engagement,
                                                                       distance)
"""

UNPLAN_IMPORTS = "DELETE FROM flowfix_plan_links WHERE tbl = 'data_imports' AND id = ANY(CAST(:ids AS uuid[]))"

RECORD_TENANT_OK = unknown_matches_sql("r", "m")

#: Each import's master once the planned links are in: the starting point of both record
#: queries below.
IMPORT_MASTERS = f"""eff AS (SELECT t.id, COALESCE(t.master_flow_id, p.master) AS flow
        FROM data_imports t LEFT JOIN flowfix_plan_links p ON p.tbl = 'data_imports' AND p.id = t.id
        WHERE {TENANT_SCOPE})"""

#: Records per import once the imports are linked; masters step 1 will create count too.
#: The records still NULL are counted per import and tenant first (one pass, a hash
#: aggregate), so the joins to imports and masters work on one row per import, not per
#: record; the answer comes back as three arrays (one row: no per-row cost in the client).
RECORD_PLAN = f"""
WITH {IMPORT_MASTERS},
created AS (SELECT DISTINCT ON (master) master AS flow_id, client_account_id, engagement_id FROM flowfix_plan_links
            WHERE tbl = 'discovery_flows' AND evidence = CAST(:ev_created AS text) ORDER BY master),
nulls AS (SELECT data_import_id, client_account_id, engagement_id, count(*) AS n FROM raw_import_records
          WHERE master_flow_id IS NULL GROUP BY data_import_id, client_account_id, engagement_id),
per_import AS (
    SELECT r.data_import_id, e.flow,
           COALESCE(sum(r.n) FILTER (WHERE e.flow IS NOT NULL AND {RECORD_TENANT_OK}), 0)::bigint AS to_link,
           COALESCE(sum(r.n) FILTER (WHERE e.flow IS NOT NULL AND NOT ({RECORD_TENANT_OK})), 0)::bigint AS conflict,
           COALESCE(sum(r.n) FILTER (WHERE e.flow IS NULL), 0)::bigint AS no_master
    FROM nulls r
    JOIN eff e ON e.id = r.data_import_id
    LEFT JOIN crewai_flow_state_extensions known ON known.flow_id = e.flow
    LEFT JOIN created c ON c.flow_id = e.flow
    CROSS JOIN LATERAL (SELECT COALESCE(known.client_account_id, c.client_account_id) AS client_account_id,
                               COALESCE(known.engagement_id, c.engagement_id) AS engagement_id) m
    GROUP BY r.data_import_id, e.flow
)
SELECT array_agg(data_import_id) AS imports, array_agg(flow) AS flows, array_agg(to_link) AS to_link,
       array_agg(conflict) AS conflict, array_agg(no_master) AS no_master
FROM (SELECT * FROM per_import ORDER BY data_import_id) sorted
"""

#: Records holding another master than their import will (after the planned links).
DISAGREEING_RECORDS = f"""
WITH {IMPORT_MASTERS}
SELECT r.id, r.master_flow_id, e.flow AS import_master
FROM raw_import_records r JOIN eff e ON e.id = r.data_import_id
WHERE r.master_flow_id IS NOT NULL AND e.flow IS NOT NULL AND r.master_flow_id <> e.flow
ORDER BY r.id
"""

#: Why a planned link is not applied: the rows changed between planning and apply.
CHANGED_SINCE_PLANNING = "changed since planning"


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


async def make_plan(conn: AsyncConnection, opts: Options, resuming: uuid.UUID | None = None) -> Plan:
    """What the backfill would do now, with the evidence for each link. Changes no data
    (its work tables are temporary, dropped with the planning transaction).

    One call for a fresh run, a resume and a dry run: ``resuming`` names the interrupted
    run whose stored plan is an input. Its pending links decide their imports and claim
    their masters before any matching; those the application has made stale since are
    reported (:data:`CHANGED_SINCE_PLANNING`) and claim nothing; applied, skipped or
    undone links claim nothing (their imports, if NULL again, are planned afresh)."""
    plan = Plan()
    creation = MasterCreation(await conn.run_sync(catalog.required_columns, MASTER_TABLE))
    plan.master_needs = creation.needs
    for statement in WORK_TABLES:
        await conn.execute(text(statement))
    await _plan_discovery_flows(conn, opts, creation, plan)
    await _store_links(conn, "discovery_flows", plan.discovery_links, plan.masters_to_create)
    if resuming:
        await _stored_pending_links(conn, resuming, plan)
    await conn.execute(text(ORPHAN_IMPORTS), opts.scope)
    await conn.execute(text("ANALYZE flowfix_plan_orphans"))
    # exact links, stored as they are decided, claim their masters before time matching
    # (which leaves out every master the links table holds)
    exact, undecided = await _plan_imports_by_exact_evidence(conn, plan)
    released = _release_stored_time_links_exact_evidence_takes(plan, exact)
    if released:
        await conn.execute(text(UNPLAN_IMPORTS), {"ids": released})
    await _plan_imports_by_time(conn, opts, undecided, plan)
    _say_which_stored_links_went_stale(plan)
    plan.import_links.sort(key=lambda link: link.id)
    await _plan_records(conn, opts, plan)
    return plan


def _say_which_stored_links_went_stale(plan: Plan) -> None:
    """An import whose stored link went stale and that fresh planning leaves for a human
    says so (the reason a resumed run did not link it as the interrupted one planned)."""
    stale = set(plan.stale)
    prefix = f"{CHANGED_SINCE_PLANNING} (its stored link no longer applies); "
    items: list[Ambiguous | Unmatched] = [*plan.ambiguous, *plan.unmatched]
    for item in items:
        if item.table == "data_imports" and item.id in stale and not item.reason.startswith(CHANGED_SINCE_PLANNING):
            item.reason = prefix + item.reason


async def _store_links(
    conn: AsyncConnection, table: str, links: list[Link], created: list[NewMaster] | None = None
) -> None:
    """Put planned links into the work table (in chunks: nothing of this size is held
    twice), then ANALYZE it, so the joins on it are planned on its true size."""
    tenant = {c.discovery_flow_id: (c.client_account_id, c.engagement_id) for c in created or []}
    for at in range(0, len(links), STORE_CHUNK):
        chunk = links[at : at + STORE_CHUNK]
        params = {
            "tbl": table,
            "ids": [link.id for link in chunk],
            "masters": [link.master_flow_id for link in chunk],
            "evidence": [str(link.evidence) for link in chunk],
            "clients": [tenant.get(link.id, (None, None))[0] for link in chunk],
            "engagements": [tenant.get(link.id, (None, None))[1] for link in chunk],
            "distances": [link.distance_seconds for link in chunk],
        }
        await conn.execute(text(STORE_LINKS), params)
    await conn.execute(text("ANALYZE flowfix_plan_links"))


#: Rows per INSERT into the work tables.
STORE_CHUNK = 50_000


async def _stored_pending_links(conn: AsyncConnection, run_id: uuid.UUID, plan: Plan) -> None:
    """Resuming: the stored links still pending, as the apply will find them; stored in
    the links table, where they claim their masters. A link whose import the application has linked meanwhile is
    dropped (nothing is left to do); one that no longer applies is reported."""
    rows = list(await conn.execute(text(STORED_PENDING), {"run": run_id, **Evidence.params()}))
    # a stored plan from before the claims may give one master to two imports by time:
    # the nearest keeps it (then the first), as matching would have decided
    first: dict[uuid.UUID, tuple[float, uuid.UUID]] = {}
    for row in rows:
        if row.still_null and row.applies and row.evidence == Evidence.TIME_WINDOW:
            key = (row.distance_seconds if row.distance_seconds is not None else 0.0, row.row_id)
            first[row.new_value] = min(first.get(row.new_value, key), key)
    for row in rows:
        if not row.still_null:
            plan.stale.append(row.row_id)
            continue
        taken = row.evidence == Evidence.TIME_WINDOW and first[row.new_value][1] != row.row_id if row.applies else False
        if not row.applies or taken:
            plan.stale.append(row.row_id)  # claims nothing: planned afresh with the other orphans
            continue
        plan.import_links.append(Link("data_imports", row.row_id, row.new_value, row.evidence, row.distance_seconds))
        plan.stored.add(row.row_id)
    await _store_links(conn, "data_imports", plan.import_links)


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


async def _plan_imports_by_exact_evidence(conn: AsyncConnection, plan: Plan) -> tuple[set[uuid.UUID], list[uuid.UUID]]:
    """Step 2a: imports a discovery flow or a master's configuration names, linked in the
    links table (:data:`EXACT_LINKS`). Returns the masters exact evidence claims and the
    orphans left to time matching."""
    await conn.execute(text(EXACT_EVIDENCE), {**Evidence.params(), "uuid_text": UUID_TEXT})
    await conn.execute(text("ANALYZE flowfix_plan_exact"))
    linked = (await conn.execute(text(EXACT_LINKS), Evidence.params())).one()
    claimed: set[uuid.UUID] = set()
    for imp_id, flow, evidence in zip(*(c or [] for c in linked), strict=True):
        plan.import_links.append(Link("data_imports", imp_id, flow, evidence))
        claimed.add(flow)
    del linked
    await conn.execute(text("ANALYZE flowfix_plan_links"))
    contradicting = {row.import_id: row.flows for row in await conn.execute(text(EXACT_CONTRADICTIONS))}
    undecided: list[uuid.UUID] = []
    left = (await conn.execute(text(ORPHANS_LEFT))).one()
    for imp_id, kind in zip(left.ids or [], left.kinds or [], strict=True):
        if kind == "time":
            undecided.append(imp_id)
        elif kind == "contradicting":
            reason = "contradicting exact evidence: more than one master names this import"
            plan.ambiguous.append(Ambiguous("data_imports", imp_id, contradicting[imp_id], reason))
        elif kind == "foreign":
            reason = "the only exact evidence names a master flow of another tenant"
            plan.unmatched.append(Unmatched("data_imports", imp_id, reason))
        else:
            plan.unmatched.append(Unmatched("data_imports", imp_id, "no tenant on the import: never matched by time"))
    return claimed, undecided


def _release_stored_time_links_exact_evidence_takes(plan: Plan, exact: set[uuid.UUID]) -> list[uuid.UUID]:
    """A stored time link whose master fresh exact evidence now names would be refused by
    the apply (the master gets an import): report it now, as the run will end. Returns their imports."""
    released: list[uuid.UUID] = []
    for link in [x for x in plan.import_links if x.id in plan.stored and x.evidence == Evidence.TIME_WINDOW]:
        if link.master_flow_id in exact:
            plan.import_links.remove(link)
            plan.stored.discard(link.id)
            plan.stale.append(link.id)
            reason = f"{CHANGED_SINCE_PLANNING}: its stored link to master {link.master_flow_id} no longer applies"
            plan.unmatched.append(Unmatched("data_imports", link.id, reason))
            released.append(link.id)
    return released


async def _plan_imports_by_time(conn: AsyncConnection, opts: Options, undecided: list[uuid.UUID], plan: Plan) -> None:
    """Step 2b: the rest by time, one master per import (:func:`match_by_time`)."""
    for statement in FREE_MASTERS:
        await conn.execute(text(statement))
    assigned, tied = await match_by_time(conn, opts.window_seconds)
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


async def match_by_time(
    conn: AsyncConnection, window_seconds: float
) -> tuple[dict[uuid.UUID, tuple[uuid.UUID, float]], dict[uuid.UUID, list[uuid.UUID]]]:
    """The orphans' time links, stored in the links table, as :func:`assign_by_time`
    decides over every pair in the window (its return value): the sure pairs are linked
    in SQL (:data:`TIME_SURE_LINKS`), only the tangled rest goes through the client.
    Reads the work tables ``flowfix_plan_orphans``, ``flowfix_plan_exact`` and
    ``flowfix_plan_free``."""
    await conn.execute(text(TIME_PAIRS), {"window": window_seconds})
    await conn.execute(text("ANALYZE flowfix_plan_pairs"))
    sure = (await conn.execute(text(TIME_SURE_LINKS), Evidence.params())).one()
    assigned: dict[uuid.UUID, tuple[uuid.UUID, float]] = {
        i: (m, d) for i, m, d in zip(sure.imports or [], sure.flows or [], sure.distances or [], strict=True)
    }
    del sure
    await conn.execute(text("ANALYZE flowfix_plan_links"))
    left = (await conn.execute(text(TIME_PAIRS_LEFT))).one()
    tangled, tied = assign_by_time(list(zip(left.imports or [], left.flows or [], left.distances or [], strict=True)))
    del left
    await _store_links(
        conn, "data_imports", [Link("data_imports", i, m, Evidence.TIME_WINDOW, d) for i, (m, d) in tangled.items()]
    )
    assigned.update(tangled)
    return assigned, tied


async def _plan_records(conn: AsyncConnection, opts: Options, plan: Plan) -> None:
    """Step 3: records follow their import (once its planned link is in)."""
    params = {**opts.scope, **Evidence.params()}
    found = (await conn.execute(text(RECORD_PLAN), params)).one()
    columns = (found.imports, found.flows, found.to_link, found.conflict, found.no_master)
    for imp, flow, to_link, conflict, no_master in zip(*(c or [] for c in columns), strict=True):
        if to_link:
            plan.record_links.append(Link("raw_import_records", imp, flow, Evidence.VIA_IMPORT, rows=to_link))
        if conflict:
            reason = f"{conflict} records of this import belong to another tenant than its master"
            plan.unmatched.append(Unmatched("raw_import_records", imp, reason))
        if no_master:
            plan.unmatched.append(
                Unmatched("raw_import_records", imp, f"{no_master} records: their import has no master")
            )
    for row in (await conn.execute(text(DISAGREEING_RECORDS), opts.scope)).mappings():
        reason = "the record holds another master than its import: never overwritten"
        plan.ambiguous.append(
            Ambiguous("raw_import_records", row["id"], [row["master_flow_id"], row["import_master"]], reason)
        )
