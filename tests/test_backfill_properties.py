"""Property-based: on random small datasets, a backfill never links across tenants,
gives a master to at most one import by time, stays within the window, and a rerun
changes nothing."""

from __future__ import annotations

import uuid
from datetime import timedelta

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from flowfix.config import Settings
from tests.conftest import upgrade
from tests.helpers import script, sql
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
        "TRUNCATE flowfix_changes, flowfix_runs, raw_import_records, discovery_flows, data_imports,"
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
