"""Property-based: on random small datasets, a backfill never links across tenants,
gives a master to at most one import by time, stays within the window, and a rerun
changes nothing."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from flowfix.config import Settings
from tests.conftest import upgrade
from tests.helpers import insert, position_column, script, sql
from tests.test_backfill import T0, run

TENANTS = [
    (uuid.UUID(int=1), uuid.UUID(int=11)),
    (uuid.UUID(int=1), uuid.UUID(int=12)),
    (uuid.UUID(int=2), uuid.UUID(int=11)),
]

masters = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.integers(0, 40),
        st.sampled_from(["discovery", "discovery", "assessment"]),
        st.sampled_from(["running", "running", "deleted"]),
    ),
    max_size=12,
)
imports = st.lists(
    st.tuples(st.one_of(st.none(), st.integers(0, 2)), st.integers(0, 40), st.integers(0, 2)), min_size=1, max_size=12
)
WINDOW = 3 * 600  # the dataset's time unit is 10 minutes


def load(s: Settings, ms: list, ims: list) -> None:  # type: ignore[type-arg]
    script(
        s,
        "TRUNCATE flowfix_walk_ranges, flowfix_changes, flowfix_runs, raw_import_records, discovery_flows, data_imports,"
        " crewai_flow_state_extensions",
    )
    for tenant, t, flow_type, status in ms:
        sql(
            s,
            "INSERT INTO crewai_flow_state_extensions (flow_id, client_account_id, engagement_id, flow_type,"
            " flow_status, created_at) VALUES (gen_random_uuid(), :c, :e, :t, :st, :at)",
            {
                "c": TENANTS[tenant][0],
                "e": TENANTS[tenant][1],
                "t": flow_type,
                "st": status,
                "at": T0 + timedelta(minutes=10 * t),
            },
        )
    for tenant, t, records in ims:
        client, engagement = TENANTS[tenant] if tenant is not None else (None, None)
        sql(
            s,
            "WITH i AS (INSERT INTO data_imports (client_account_id, engagement_id, created_at)"
            " VALUES (:c, :e, :at) RETURNING id)"
            " INSERT INTO raw_import_records (data_import_id, client_account_id, engagement_id, row_number)"
            " SELECT i.id, :c, :e, n FROM i, generate_series(1, :r) n",
            {"c": client, "e": engagement, "at": T0 + timedelta(minutes=10 * t), "r": records},
        )


def state(s: Settings) -> list[dict]:  # type: ignore[type-arg]
    return sql(
        s,
        "SELECT 'i' AS k, id, master_flow_id FROM data_imports"
        " UNION ALL SELECT 'r', id, master_flow_id FROM raw_import_records ORDER BY 1, 2",
    )


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ms=masters, ims=imports)
def test_backfill_invariants(settings: Settings, ms: list, ims: list) -> None:  # type: ignore[type-arg]
    if not sql(settings, "SELECT to_regclass('flowfix_runs') IS NOT NULL AS ready")[0]["ready"]:
        upgrade(settings, "fix_master_flow_fk")
    load(settings, ms, ims)
    run(settings, window_seconds=WINDOW)

    cross = sql(
        settings,
        """
        SELECT count(*) AS n FROM (
          SELECT t.client_account_id, t.engagement_id, m.client_account_id AS mc, m.engagement_id AS me
          FROM data_imports t JOIN crewai_flow_state_extensions m ON m.flow_id = t.master_flow_id
          UNION ALL
          SELECT t.client_account_id, t.engagement_id, m.client_account_id, m.engagement_id
          FROM raw_import_records t JOIN crewai_flow_state_extensions m ON m.flow_id = t.master_flow_id) x
        WHERE x.client_account_id IS DISTINCT FROM x.mc OR x.engagement_id IS DISTINCT FROM x.me""",
    )
    assert cross == [{"n": 0}]
    shared = sql(
        settings,
        "SELECT master_flow_id, count(*) AS n FROM data_imports WHERE master_flow_id IS NOT NULL"
        " GROUP BY 1 HAVING count(*) > 1",
    )
    assert shared == []
    bad = sql(
        settings,
        """
        SELECT count(*) AS n FROM data_imports t JOIN crewai_flow_state_extensions m ON m.flow_id = t.master_flow_id
        WHERE m.flow_type <> 'discovery' OR m.flow_status = 'deleted'
           OR abs(extract(epoch FROM m.created_at - t.created_at)) > :w""",
        {"w": WINDOW},
    )
    assert bad == [{"n": 0}]
    records = sql(
        settings,
        "SELECT count(*) AS n FROM raw_import_records r JOIN data_imports t ON t.id = r.data_import_id"
        " WHERE r.master_flow_id IS DISTINCT FROM t.master_flow_id",
    )
    assert records == [{"n": 0}]

    before = state(settings)
    again = run(settings, window_seconds=WINDOW)
    assert state(settings) == before
    assert again.counts.data_imports == 0 and again.counts.raw_import_records == 0


# --- issue 11: the edges, on the production shapes H and D ---------------------------------

EDGE_IDS = st.one_of(st.just(uuid.UUID(int=0)), st.just(uuid.UUID(int=2**128 - 1)), st.uuids())
#: created_at in 10-minute units, often NULL and often equal (rows loaded in one transaction)
WHEN = st.one_of(st.none(), st.integers(0, 4))
edge_masters = st.lists(
    st.tuples(
        st.integers(0, 2),  # tenant
        WHEN,
        st.sampled_from(["discovery", "discovery", "assessment"]),
        st.sampled_from(["running", None, "deleted"]),  # flow_status, NULL included
        st.sampled_from([None, None, str.upper, str.lower]),  # names an import in its configuration, any case
        st.integers(0, 9),  # ... which one
    ),
    max_size=8,
)
edge_imports = st.lists(
    st.tuples(EDGE_IDS, st.one_of(st.none(), st.integers(0, 2)), WHEN, st.integers(0, 3), st.booleans()),
    min_size=1,
    max_size=8,
    unique_by=lambda row: row[0],
)


@pytest.fixture(scope="module", params=["app_head", "deployed"])
def shape_h(pg_server: str, shape_template: Any, request: pytest.FixtureRequest) -> Iterator[Settings]:
    """Shape H (the application's schema), and D, where flow_status may be NULL."""
    from tests.conftest import shape_settings
    from tests.shapes import SHAPES

    for s in shape_settings(pg_server, shape_template, SHAPES[request.param]):
        upgrade(s, "fix_master_flow_fk")
        yield s


def load_edges(s: Settings, ms: list, ims: list) -> dict[str, Any]:  # type: ignore[type-arg]
    script(
        s,
        "TRUNCATE flowfix_walk_ranges, flowfix_changes, flowfix_runs, raw_import_records, discovery_flows, data_imports,"
        " crewai_flow_state_extensions CASCADE",
    )
    at = {None: None} | {n: T0 + timedelta(minutes=10 * n) for n in range(5)}
    imported = []
    for imp_id, tenant, when, records, tenantless_records in ims:
        client, engagement = TENANTS[tenant] if tenant is not None else (None, None)
        insert(
            s,
            "data_imports",
            {
                "id": imp_id,
                "master_flow_id": None,
                "client_account_id": client,
                "engagement_id": engagement,
                "created_at": at[when],
            },
        )
        for n in range(records):
            rid = uuid.uuid4()
            insert(
                s,
                "raw_import_records",
                {
                    "id": rid,
                    "data_import_id": imp_id,
                    "master_flow_id": None,
                    position_column(s): n,
                    "client_account_id": None if tenantless_records else client,
                    "engagement_id": None if tenantless_records else engagement,
                },
            )
        imported.append(imp_id)
    status_nullable = sql(
        s,
        "SELECT is_nullable = 'YES' AS ok FROM information_schema.columns WHERE table_schema = current_schema()"
        " AND table_name = 'crewai_flow_state_extensions' AND column_name = 'flow_status'",
    )[0]["ok"]
    for tenant, when, flow_type, status, case, named in ms:
        if status is None and not status_nullable:  # shape H: NOT NULL (the deployed shape allows it)
            status = "initialized"
        config = {"source": "data_import", "import_id": case(str(imported[named % len(imported)]))} if case else {}
        insert(
            s,
            "crewai_flow_state_extensions",
            {
                "id": uuid.uuid4(),
                "flow_id": uuid.uuid4(),
                "client_account_id": TENANTS[tenant][0],
                "engagement_id": TENANTS[tenant][1],
                "flow_type": flow_type,
                "flow_status": status,
                "flow_configuration": json.dumps(config),
                "created_at": at[when],
            },
        )
    return at


@hsettings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ms=edge_masters, ims=edge_imports)
def test_backfill_invariants_at_the_edges(shape_h: Settings, ms: list, ims: list) -> None:  # type: ignore[type-arg]
    """NULL and equal timestamps, nil and extreme UUIDs, configuration in any case, records
    without a tenant, masters without a status: no cross-tenant link; a master goes to at
    most one import by time, and no nearer import was passed over silently; what was
    written is the plan; exit 0 only when no orphan is left."""
    s = shape_h
    load_edges(s, ms, ims)
    result = run(s, window_seconds=WINDOW)
    imports = {
        r["id"]: r
        for r in sql(s, "SELECT id, master_flow_id, client_account_id, engagement_id, created_at FROM data_imports")
    }
    masters = {
        r["flow_id"]: r
        for r in sql(
            s,
            "SELECT flow_id, client_account_id, engagement_id, created_at,"
            " flow_type, flow_status FROM crewai_flow_state_extensions",
        )
    }

    # what was written is the plan
    assert {i: r["master_flow_id"] for i, r in imports.items() if r["master_flow_id"]} == {
        link.id: link.master_flow_id for link in result.plan.import_links
    }
    linked_records = sql(s, "SELECT count(*) AS n FROM raw_import_records WHERE master_flow_id IS NOT NULL")[0]["n"]
    assert linked_records == result.plan.records_to_link

    # no cross-tenant link: a known tenant on the row always equals the master's
    for table in ("data_imports", "raw_import_records"):
        assert sql(
            s,
            f"SELECT count(*) AS n FROM {table} t JOIN crewai_flow_state_extensions m ON m.flow_id = t.master_flow_id"
            " WHERE (t.client_account_id IS NOT NULL AND t.client_account_id <> m.client_account_id)"
            " OR (t.engagement_id IS NOT NULL AND t.engagement_id <> m.engagement_id)",
        ) == [{"n": 0}]

    # by time: one import per master, both tenants known and equal, within the window,
    # and no import nearer to that master was left unlinked without a word
    reported = {a.id for a in result.plan.ambiguous} | {u.id for u in result.plan.unmatched}
    by_time = [link for link in result.plan.import_links if link.evidence == "time_window"]
    assert len({link.master_flow_id for link in by_time}) == len(by_time)
    for link in by_time:
        imp, master = imports[link.id], masters[link.master_flow_id]
        assert imp["client_account_id"] is not None and imp["engagement_id"] is not None
        assert (imp["client_account_id"], imp["engagement_id"]) == (
            master["client_account_id"],
            master["engagement_id"],
        )
        assert master["flow_type"] == "discovery" and master["flow_status"] != "deleted"
        distance = abs((master["created_at"] - imp["created_at"]).total_seconds())
        assert distance <= WINDOW and distance == link.distance_seconds
        for other in imports.values():
            if other["id"] == link.id or other["created_at"] is None:
                continue
            if (other["client_account_id"], other["engagement_id"]) != (imp["client_account_id"], imp["engagement_id"]):
                continue
            nearer = abs((master["created_at"] - other["created_at"]).total_seconds()) < distance
            assert not nearer or other["master_flow_id"] is not None or other["id"] in reported

    # exact evidence wins, in any case: an import a live discovery master's configuration
    # names (same tenant, or none on the import) is linked to it, or ambiguous (named twice)
    ambiguous = {a.id for a in result.plan.ambiguous}
    named = sql(
        s,
        "SELECT lower(m.flow_configuration->>'import_id') AS import_id, m.flow_id FROM crewai_flow_state_extensions m"
        " WHERE m.flow_type = 'discovery' AND m.flow_status IS DISTINCT FROM 'deleted'"
        " AND m.flow_configuration->>'import_id' IS NOT NULL",
    )
    for row in named:
        imp = imports[uuid.UUID(row["import_id"])]
        master = masters[row["flow_id"]]
        same_tenant = imp["client_account_id"] in (None, master["client_account_id"]) and imp["engagement_id"] in (
            None,
            master["engagement_id"],
        )
        if same_tenant:
            assert imp["master_flow_id"] == row["flow_id"] or imp["id"] in ambiguous, (imp, row)

    # exit 0 only when nothing in scope is left NULL
    left = sql(
        s,
        "SELECT (SELECT count(*) FROM data_imports WHERE master_flow_id IS NULL)"
        " + (SELECT count(*) FROM raw_import_records WHERE master_flow_id IS NULL) AS n",
    )[0]["n"]
    assert (result.exit_code == 0) == (left == 0)
