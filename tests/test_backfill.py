"""flowfix backfill on planted data: every kind of evidence, the window's edges, ties,
contention, tenants, reruns, undo, a killed run resumed, concurrent writes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
from typer.testing import CliRunner

from flowfix import backfill as bf
from flowfix.cli import app
from flowfix.config import Settings
from flowfix.db import run_with_engine
from tests.conftest import ROOT
from tests.helpers import Gate, add_discovery_flow, add_import, add_master, add_record, cli_env, links, plain_url, sql
from tests.test_validate import run_validate

A = (uuid.uuid4(), uuid.uuid4())  # tenant A: client account, engagement
B = (uuid.uuid4(), uuid.uuid4())
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
runner = CliRunner()


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def master(
    s: Settings, tenant=A, minutes: float = 0, flow_type: str = "discovery", status: str = "running"
) -> uuid.UUID:
    _, flow = add_master(s, client=tenant[0], engagement=tenant[1], flow_type=flow_type, created_at=at(minutes))
    sql(s, "UPDATE crewai_flow_state_extensions SET flow_status = :st WHERE flow_id = :f", {"st": status, "f": flow})
    return flow


def orphan(s: Settings, tenant=A, minutes: float = 0, records: int = 0) -> uuid.UUID:
    imp = add_import(s, master=None, client=tenant[0] if tenant else None, engagement=tenant[1] if tenant else None)
    sql(s, "UPDATE data_imports SET created_at = :t WHERE id = :i", {"t": at(minutes), "i": imp})
    for n in range(records):
        add_record(s, data_import=imp, master=None, row=n)
    return imp


def plan(s: Settings, **options) -> bf.Plan:  # type: ignore[no-untyped-def]
    return run(s, dry_run=True, **options).plan


def run(s: Settings, **options) -> bf.Result:  # type: ignore[no-untyped-def]
    return run_with_engine(s, lambda engine: bf.run(engine, s, bf.Options(**options)))


def import_links(p: bf.Plan) -> dict[uuid.UUID, tuple[uuid.UUID, str]]:
    return {link.id: (link.master_flow_id, link.evidence) for link in p.import_links}


@pytest.fixture
def s(shaped_fixed: Settings) -> Settings:
    """Every backfill test runs on each production shape (tests/shapes), after the fix."""
    return shaped_fixed


def test_discovery_flows_take_the_master_with_their_flow_id_or_get_one_created(s: Settings) -> None:
    flow = master(s)
    linked = add_discovery_flow(s, flow_id=flow, master=None, client=A[0], engagement=A[1])
    lonely_flow = uuid.uuid4()
    lonely = add_discovery_flow(s, flow_id=lonely_flow, master=None, client=A[0], engagement=A[1])
    foreign = master(s, B)
    trap = add_discovery_flow(s, flow_id=foreign, master=None, client=A[0], engagement=A[1])

    p = plan(s)
    assert [(link.id, link.master_flow_id, link.evidence) for link in p.discovery_links] == [
        (linked, flow, "exact:flow_id")
    ]
    reasons = {u.id: u.reason for u in p.unmatched}
    assert "--create-missing-masters" in reasons[lonely]
    assert "another tenant" in reasons[trap]

    result = run(s, create_missing_masters=True)
    assert links(s, "discovery_flows") == {linked: flow, lonely: lonely_flow, trap: None}
    created = sql(
        s,
        "SELECT client_account_id, engagement_id, flow_type, flow_configuration->>'run_id' AS run"
        " FROM crewai_flow_state_extensions WHERE flow_id = :f",
        {"f": lonely_flow},
    )
    assert created == [
        {"client_account_id": A[0], "engagement_id": A[1], "flow_type": "discovery", "run": str(result.run_id)}
    ]
    assert result.counts.masters_created == 1 and result.exit_code == 1  # the trap remains


def test_exact_evidence_beats_time_and_contradictions_are_ambiguous(s: Settings) -> None:
    by_df_flow = master(s, minutes=300)  # far outside any window
    imp_df = orphan(s, minutes=0)
    add_discovery_flow(s, flow_id=by_df_flow, master=by_df_flow, client=A[0], engagement=A[1], data_import=imp_df)
    master(s, minutes=1)  # a closer master by time: must not win
    imp_cfg = orphan(s, minutes=600)
    cfg_flow = master(s, minutes=900)
    sql(
        s,
        "UPDATE crewai_flow_state_extensions SET flow_configuration = jsonb_build_object('import_id', CAST(:i AS text))"
        " WHERE flow_id = :f",
        {"i": str(imp_cfg), "f": cfg_flow},
    )
    imp_two = orphan(s, minutes=1200)
    for key in ("flow_configuration", "flow_persistence_data"):
        f = master(s, minutes=1500)
        field = "import_id" if key == "flow_configuration" else "data_import_id"
        sql(
            s,
            f"UPDATE crewai_flow_state_extensions SET {key} = jsonb_build_object('{field}', CAST(:i AS text))"
            " WHERE flow_id = :f",
            {"i": str(imp_two), "f": f},
        )

    p = plan(s)
    got = import_links(p)
    assert got[imp_df] == (by_df_flow, "exact:discovery_flow")
    assert got[imp_cfg] == (cfg_flow, "exact:configuration")
    assert [(a.id, len(a.candidates)) for a in p.ambiguous] == [(imp_two, 2)]
    assert "contradicting exact evidence" in p.ambiguous[0].reason


@pytest.mark.parametrize("minutes, linked", [(119, True), (120, True), (121, False)])
def test_window_edges_inside_exactly_at_and_outside(s: Settings, minutes: float, linked: bool) -> None:
    flow = master(s, minutes=minutes)
    imp = orphan(s, minutes=0)
    got = import_links(plan(s, window_seconds=7200))
    assert (imp in got) is linked
    if linked:
        assert got[imp] == (flow, "time_window")
        assert plan(s).import_links[0].distance_seconds == minutes * 60


def test_ties_at_the_nearest_distance_are_ambiguous_not_guessed(s: Settings) -> None:
    before, after = master(s, minutes=-10), master(s, minutes=10)
    imp = orphan(s, minutes=0)
    p = plan(s)
    assert import_links(p) == {}
    assert [(a.id, sorted(a.candidates)) for a in p.ambiguous] == [(imp, sorted([before, after]))]


def test_one_master_goes_to_one_import_nearest_first(s: Settings) -> None:
    flow = master(s, minutes=0)
    near, far = orphan(s, minutes=5), orphan(s, minutes=-30)
    second = master(s, minutes=-60)
    got = import_links(plan(s))
    assert got[near] == (flow, "time_window")
    assert got[far] == (second, "time_window")  # the contended flow went to the nearer import
    # two imports exactly as near to one flow: neither gets it
    sql(s, "DELETE FROM crewai_flow_state_extensions WHERE flow_id = :f", {"f": second})
    sql(s, "UPDATE data_imports SET created_at = :t WHERE id = :i", {"t": at(-5), "i": far})
    p = plan(s)
    assert import_links(p) == {}
    assert sorted(a.id for a in p.ambiguous) == sorted([near, far])


def test_never_across_tenants_deleted_or_non_discovery_flows_or_tenantless_imports(s: Settings) -> None:
    right = master(s, A, minutes=50)
    master(s, B, minutes=1)  # closer, other tenant
    master(s, (A[0], B[1]), minutes=2)  # same client, other engagement
    master(s, A, minutes=3, status="deleted")
    master(s, A, minutes=4, flow_type="assessment")
    imp = orphan(s, A, minutes=0)
    nobody = orphan(s, None, minutes=0)
    p = plan(s)
    assert import_links(p) == {imp: (right, "time_window")}
    assert {u.id: u.reason for u in p.unmatched}[nobody] == "no tenant on the import: never matched by time"


def test_records_follow_their_import_and_disagreeing_ones_are_reported(s: Settings) -> None:
    flow = master(s, minutes=0)
    imp = orphan(s, minutes=1, records=4)
    other = master(s, minutes=500)
    odd = add_record(s, data_import=imp, master=other, row=9)
    result = run(s)
    values = links(s, "raw_import_records")
    assert values.pop(odd) == other  # never overwritten
    assert set(values.values()) == {flow}
    assert result.counts.raw_import_records == 4
    assert [(a.table, a.id) for a in result.plan.ambiguous] == [("raw_import_records", odd)]
    assert result.exit_code == 1


def test_rerun_changes_nothing_and_undo_restores_everything(s: Settings) -> None:
    for n in range(5):
        master(s, minutes=n * 300)
        orphan(s, minutes=n * 300 + 1, records=3)
    before = {t: links(s, t) for t in ("data_imports", "raw_import_records")}
    first = run(s)
    assert first.exit_code == 0 and first.counts.data_imports == 5 and first.counts.raw_import_records == 15
    after = {t: links(s, t) for t in ("data_imports", "raw_import_records")}
    second = run(s)
    assert second.counts.data_imports == 0 and second.counts.raw_import_records == 0
    assert {t: links(s, t) for t in ("data_imports", "raw_import_records")} == after
    assert run_validate(s).ok

    result = runner.invoke(app, ["undo", str(first.run_id)], env=cli_env(s))
    assert result.exit_code == 0, result.output
    assert {t: links(s, t) for t in ("data_imports", "raw_import_records")} == before


def test_a_second_concurrent_run_is_refused(s: Settings) -> None:
    import asyncpg

    async def hold_and_try() -> str:
        conn = await asyncpg.connect(plain_url(s))
        try:
            await conn.execute("SELECT pg_advisory_lock(hashtext('flowfix.runs'))")
            result = await asyncio.to_thread(runner.invoke, app, ["backfill"], env=cli_env(s))
            assert result.exit_code == 2
            return result.stderr
        finally:
            await conn.close()

    assert "another flowfix run" in asyncio.run(hold_and_try())
    assert sql(s, "SELECT count(*) AS n FROM flowfix_runs") == [{"n": 0}]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--window", "0"], "is not a duration"),
        (["--window", "-2h"], "is not a duration"),
        (["--window", "0s"], "must be longer than zero"),
        (["--window", "2 fortnights"], "is not a duration"),
        (["--client-account", "x"], "is not a UUID"),
        (["--format", "xml"], "'xml' is not one of 'text', 'json'"),
    ],
)
def test_bad_arguments_exit_2_and_change_nothing(s: Settings, args, message) -> None:  # type: ignore[no-untyped-def]
    orphan(s)
    master(s, minutes=1)
    result = runner.invoke(app, ["backfill", *args], env=cli_env(s))
    assert result.exit_code == 2 and message in result.stderr
    assert set(links(s, "data_imports").values()) == {None}


def test_dry_run_changes_nothing_and_exits_like_the_real_run(s: Settings, tmp_path) -> None:
    import json

    master(s, minutes=1)
    orphan(s, records=2)
    orphan(s, None)
    report = tmp_path / "plan.json"
    dry = runner.invoke(app, ["backfill", "--dry-run", "--format", "json", "--report", str(report)], env=cli_env(s))
    assert dry.exit_code == 1
    body = json.loads(dry.stdout)
    assert json.loads(report.read_text()) == body
    assert set(body) == {"run_id", "dry_run", "window_seconds", "counts", "links", "ambiguous", "unmatched", "estimate"}
    assert body["dry_run"] is True and body["window_seconds"] == 7200
    assert {link["evidence"] for link in body["links"]} == {"time_window", "via_import"}
    assert sql(s, "SELECT count(*) AS n FROM flowfix_runs") == [{"n": 0}]
    assert set(links(s, "data_imports").values()) == {None}
    real = runner.invoke(app, ["backfill"], env=cli_env(s))
    assert real.exit_code == 1


def test_a_killed_run_resumes_to_the_same_result_as_an_uninterrupted_one(
    s: Settings, copy_database: Callable[[Settings], Settings]
) -> None:
    """SIGKILL mid-run (batches of 2 rows), rerun, compare with a clean run on a copy."""
    for n in range(60):
        master(s, minutes=n * 30)
        orphan(s, minutes=n * 30 + (n % 7), records=3)
    twin_settings = copy_database(s)
    # The 6th batch of imports waits at a gate (a real trigger, nothing mocked): five have
    # committed when the kill lands, whatever the speed of the machine or server.
    with Gate(s, "data_imports", at=6) as gate:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flowfix", "backfill", "--batch-size", "2"],
            env={**os.environ, **cli_env(s)},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        gate.wait()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = sql(
        s,
        "SELECT count(*) AS n FROM flowfix_changes WHERE applied_at IS NOT NULL AND table_name = 'data_imports'",
    )[0]["n"]
    assert 10 <= done < 60, done
    assert sql(s, "SELECT status FROM flowfix_runs") == [{"status": "running"}]

    resumed = run(s)
    assert resumed.resumed
    run(twin_settings)
    for table in ("data_imports", "raw_import_records"):
        assert links(s, table) == links(twin_settings, table)
    assert set(links(s, "data_imports").values()) - {None}


def test_application_writes_during_a_run_are_not_lost_or_relinked(s: Settings) -> None:
    for n in range(40):
        master(s, minutes=n * 30)
        orphan(s, minutes=n * 30 + 1, records=5)
    stop, started = threading.Event(), threading.Event()
    written: list[uuid.UUID] = []

    def app_writes() -> None:
        while not stop.is_set():
            written.append(add_import(s, master=None, client=A[0], engagement=A[1]))  # created now()
            started.set()
            time.sleep(0.005)

    writer = threading.Thread(target=app_writes)
    writer.start()
    started.wait(10)
    try:
        result = run(s, batch_size=3)
    finally:
        stop.set()
        writer.join()
    assert result.counts.data_imports == 40 and result.counts.raw_import_records == 200
    assert len(written) >= 2  # the application kept writing while the run went on
    current = links(s, "data_imports")
    assert all(current[w] is None for w in written)  # created "now": no master within the window
