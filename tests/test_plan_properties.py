"""Property-based (issue 19): on random small datasets, a backfill that is killed part-way,
raced by the application (links written between plan and apply, new orphans), resumed and
undone never gives a master to two imports by time, never links across tenants, exits 0
exactly when nothing in scope is left NULL, exits as its dry run said, and a resumed run
reports what an uninterrupted twin does (the twin: the same data, run once, then undone).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import text

from flowfix import backfill as bf
from flowfix import ledger
from flowfix.backfill import steps
from flowfix.cli import Exit
from flowfix.config import Settings
from flowfix.db import make_engine, run_with_engine
from flowfix.evidence import Evidence
from tests.conftest import upgrade
from tests.helpers import sql
from tests.test_backfill import T0, run
from tests.test_backfill_properties import TENANTS, WINDOW, load

masters = st.lists(
    st.tuples(
        st.integers(0, 2),
        st.integers(0, 12),
        st.sampled_from(["discovery", "discovery", "assessment"]),
        st.just("running"),
    ),
    max_size=8,
)
imports = st.lists(
    st.tuples(st.one_of(st.none(), st.integers(0, 2)), st.integers(0, 12), st.integers(0, 2)), min_size=1, max_size=8
)
#: what happens between the kill and the resume, in order
events = st.lists(
    st.one_of(
        st.tuples(st.just("app_links"), st.integers(0, 99), st.integers(0, 99)),
        st.tuples(st.just("new_orphan"), st.integers(0, 2), st.integers(0, 12)),
    ),
    max_size=3,
)


def interrupted(s: Settings, applied: int) -> uuid.UUID:
    """A run that planned, stored its plan, committed ``applied`` import links in one
    batch, and died (status running): what a killed process leaves."""

    async def go() -> uuid.UUID:
        engine = make_engine(s)
        try:
            async with engine.begin() as conn:
                plan = await bf.make_plan(conn, bf.Options(window_seconds=WINDOW))
                run_id = await ledger.start_run(conn, "backfill", bf.Options(window_seconds=WINDOW).arguments())
                await ledger.store_import_plan(
                    conn, run_id, [(x.id, x.master_flow_id, x.evidence, x.distance_seconds) for x in plan.import_links]
                )
            if applied:
                async with engine.begin() as conn:
                    params = {**Evidence.params(), "run": run_id, "after": None, "limit": applied}
                    await conn.execute(text(steps.APPLY_IMPORT_BATCH), {**params, "client": None, "engagement": None})
            return run_id
        finally:
            await engine.dispose()

    return asyncio.run(go())


def app_links(s: Settings, pick_import: int, pick_master: int) -> None:
    """The application links an orphan import to a discovery master of its tenant that no
    import holds yet (perhaps one the stored plan gave to another import)."""
    orphans = sql(
        s,
        "SELECT id, client_account_id AS c, engagement_id AS e FROM data_imports"
        " WHERE master_flow_id IS NULL AND client_account_id IS NOT NULL ORDER BY id",
    )
    if not orphans:
        return
    imp = orphans[pick_import % len(orphans)]
    free = sql(
        s,
        "SELECT flow_id FROM crewai_flow_state_extensions m WHERE flow_type = 'discovery'"
        " AND client_account_id = :c AND engagement_id = :e"
        " AND NOT EXISTS (SELECT 1 FROM data_imports x WHERE x.master_flow_id = m.flow_id) ORDER BY flow_id",
        {"c": imp["c"], "e": imp["e"]},
    )
    if free:
        flow = free[pick_master % len(free)]["flow_id"]
        sql(s, "UPDATE data_imports SET master_flow_id = :m WHERE id = :i", {"m": flow, "i": imp["id"]})


def new_orphan(s: Settings, tenant: int, t: int) -> None:
    sql(
        s,
        "WITH i AS (INSERT INTO data_imports (client_account_id, engagement_id, created_at) VALUES (:c, :e, :at)"
        " RETURNING id) INSERT INTO raw_import_records (data_import_id, client_account_id, engagement_id, row_number)"
        " SELECT i.id, :c, :e, 1 FROM i",
        {"c": TENANTS[tenant][0], "e": TENANTS[tenant][1], "at": T0 + timedelta(minutes=10 * t)},
    )


def check_invariants(s: Settings, result: bf.Result) -> None:
    by_time_shared = sql(
        s,
        "SELECT count(*) AS n FROM flowfix_changes c JOIN data_imports t ON t.id = c.row_id AND t.master_flow_id ="
        " c.new_value WHERE c.table_name = 'data_imports' AND c.evidence = :ev AND c.applied_at IS NOT NULL"
        " AND c.undone_at IS NULL AND EXISTS (SELECT 1 FROM data_imports x WHERE x.master_flow_id = c.new_value"
        " AND x.id <> t.id)",
        {"ev": Evidence.TIME_WINDOW.value},
    )
    assert by_time_shared == [{"n": 0}], "a master given to two imports, one by time"
    cross = sql(
        s,
        "SELECT count(*) AS n FROM (SELECT t.client_account_id, t.engagement_id, m.client_account_id AS mc,"
        " m.engagement_id AS me FROM data_imports t JOIN crewai_flow_state_extensions m ON m.flow_id ="
        " t.master_flow_id UNION ALL SELECT t.client_account_id, t.engagement_id, m.client_account_id,"
        " m.engagement_id FROM raw_import_records t JOIN crewai_flow_state_extensions m ON m.flow_id ="
        " t.master_flow_id) x WHERE x.client_account_id IS DISTINCT FROM x.mc OR x.engagement_id IS DISTINCT FROM x.me",
    )
    assert cross == [{"n": 0}], "a link across tenants"
    left = sql(
        s,
        "SELECT (SELECT count(*) FROM data_imports WHERE master_flow_id IS NULL)"
        " + (SELECT count(*) FROM raw_import_records WHERE master_flow_id IS NULL)"
        " + (SELECT count(*) FROM discovery_flows WHERE master_flow_id IS NULL) AS n",
    )[0]["n"]
    assert (result.exit_code == Exit.OK) == (left == 0), (result.exit_code, left)


def links_now(s: Settings) -> dict[Any, Any]:
    return {r["id"]: r["m"] for r in sql(s, "SELECT id, master_flow_id AS m FROM data_imports")}


def undo(s: Settings, run_id: uuid.UUID) -> None:
    run_with_engine(s, lambda engine: ledger.undo_run(engine, s, run_id))


@hsettings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ms=masters, ims=imports, applied=st.integers(0, 3), between=events)
def test_kill_resume_races_and_undo_keep_the_promises(
    settings: Settings, ms: list[Any], ims: list[Any], applied: int, between: list[Any]
) -> None:
    if not sql(settings, "SELECT to_regclass('flowfix_runs') IS NOT NULL AS ready")[0]["ready"]:
        upgrade(settings, "fix_master_flow_fk")
    load(settings, ms, ims)
    before = links_now(settings)

    # the uninterrupted twin: the same data, run once (its dry run first), then undone
    dry = run(settings, window_seconds=WINDOW, dry_run=True)
    twin = run(settings, window_seconds=WINDOW)
    check_invariants(settings, twin)
    assert dry.exit_code == twin.exit_code
    twin_links = links_now(settings)
    assert twin.run_id is not None
    undo(settings, twin.run_id)
    assert links_now(settings) == before

    # killed part-way, raced by the application, resumed
    interrupted(settings, applied)
    for event in between:
        if event[0] == "app_links":
            app_links(settings, event[1], event[2])
        else:
            new_orphan(settings, event[1], event[2])
    dry = run(settings, window_seconds=WINDOW, dry_run=True)
    assert dry.resumed
    resumed = run(settings, window_seconds=WINDOW)
    assert resumed.resumed
    check_invariants(settings, resumed)
    assert dry.exit_code == resumed.exit_code
    if not between:
        assert links_now(settings) == twin_links
        assert resumed.counts is not None and twin.counts is not None
        assert resumed.counts.data_imports == twin.counts.data_imports
        assert resumed.counts.skipped == twin.counts.skipped == 0

    # a rerun changes nothing and keeps its word
    again = run(settings, window_seconds=WINDOW)
    check_invariants(settings, again)
    assert again.counts is not None and again.counts.data_imports == 0
