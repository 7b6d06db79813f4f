"""Watching a real run from another shell (issue 18): `flowfix runs RUN` and `flowfix
status` read the ledger's progress rows while a backfill in another process holds the run
lock, and show progress, a rate and an ETA that move as the run does; `--watch` streams
readings until the run ends. The backfill is caught at two known batches of its records
walk by a gate (a real trigger; no sleeps), so the readings do not depend on speed."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
from typer.testing import CliRunner

from flowfix import ledger
from flowfix.cli import app
from flowfix.config import Settings
from tests.helpers import Gate, _on_loop, cli_env, flowfix_process, links, plain_url, sql
from tests.test_records_walk import dataset, record_links


def reading(s: Settings, run_id: str) -> dict[str, Any]:
    shown = CliRunner().invoke(app, ["runs", run_id, "--format", "json"], env=cli_env(s))
    assert shown.exit_code == 0, shown.output
    body: dict[str, Any] = json.loads(shown.stdout)
    return body


def records_step(body: dict[str, Any]) -> dict[str, Any]:
    (step,) = [x for x in body["steps"] if x["step"] == "raw_import_records"]
    return step


def test_another_shell_watches_a_running_backfill_move_with_rate_eta_and_workers(shaped_fixed: Settings) -> None:
    s = shaped_fixed
    expected = dataset(s, imports=4, records=1500)
    # batches of one page (--batch-size 1 row: the sizer's floor is one page), so the
    # walk has many batches; the gate holds the 4th and the 12th UPDATE of the records
    with Gate(s, "raw_import_records", at=(4, 12)) as gate:
        proc = flowfix_process(s, "backfill", "--batch-size", "1", "--max-replica-lag", "0")
        try:
            gate.wait(point=0)
            (run_id,) = [r["id"] for r in sql(s, "SELECT id::text FROM flowfix_runs WHERE status = 'running'")]
            first = reading(s, run_id)
            assert first["active"] and first["run"]["status"] == "running" and first["workers"] == 1
            imports = next(x for x in first["steps"] if x["step"] == "data_imports")
            assert imports["fraction"] == 1.0 and imports["done"] == len(expected)  # step 2 is behind it
            a = records_step(first)
            assert 0 < a["fraction"] < 1 and a["rows_changed"] > 0 and not a["finished"]
            assert a["rows_per_second"] > 0 and a["eta_seconds"] > 0 and a["eta_at"]

            status = CliRunner().invoke(app, ["status"], env=cli_env(s))
            assert f"RUNNING   {run_id}" in status.output and "state: ACTIVE" in status.output, status.output
            assert "raw_import_records:" in status.output and "ETA" in status.output

            gate.open(point=0)
            gate.wait(point=1)
            second = reading(s, run_id)
            b = records_step(second)
            assert b["fraction"] > a["fraction"] and b["rows_changed"] > a["rows_changed"]
            assert b["eta_seconds"] > 0 and second["active"]

            # --watch streams one JSON object per reading until the run ends
            watcher = flowfix_process(s, "runs", run_id, "--watch", "--format", "json", "--interval", "0.2")
            assert watcher.stdout is not None
            assert json.loads(watcher.stdout.readline())["active"]  # a reading while the run is held
            gate.open()
            out, err = watcher.communicate(timeout=120)
            assert watcher.returncode == 0, err
        finally:
            gate.open()
            _, done_err = proc.communicate(timeout=120)
    assert proc.returncode == 0, done_err
    last = json.loads(out.strip().splitlines()[-1])
    assert not last["active"] and last["run"]["status"] == "finished"
    assert all(step["fraction"] == 1.0 and step["finished"] for step in last["steps"])
    assert links(s, "data_imports") == expected
    assert None not in record_links(s).values()

    text = CliRunner().invoke(app, ["runs", run_id], env=cli_env(s))
    assert text.exit_code == 0 and "state: finished" in text.output and "done" in text.output, text.output


def test_a_pause_is_shown_with_its_signal_and_why_while_the_run_is_active(shaped_fixed: Settings) -> None:
    """The live state a pausing throttle writes (ledger.NOTE_LIVE) is what `runs RUN`
    shows while a session holds the run lock, as the backfill's does; without one the run
    is shown interrupted and no pause."""
    s = shaped_fixed
    (run,) = sql(s, "INSERT INTO flowfix_runs (command, arguments) VALUES ('backfill', '{}') RETURNING id::text AS id")
    paused = {"signal": "replica_lag", "why": "a streaming replica is 12.5 s behind", "since": "02:10"}
    state = {"paused": paused, "pauses": {"replica_lag": {"pauses": 1, "seconds": 3.0}}, "blind": []}
    sql(s, ledger.NOTE_LIVE, {"run": run["id"], "live": json.dumps(state)})
    # the helpers' connection stays open between statements: it holds the lock as a run would
    sql(s, "SELECT pg_advisory_lock(hashtext(:k))", {"k": ledger.ADVISORY_LOCK_KEY})
    sql(s, ledger.HOLD_RUN, {"k": ledger.ADVISORY_LOCK_KEY, "run": run["id"]})
    try:
        held = CliRunner().invoke(app, ["runs", run["id"]], env=cli_env(s))
    finally:
        sql(s, "SELECT pg_advisory_unlock_all()")
    assert held.exit_code == 0, held.output
    assert "state: ACTIVE" in held.output
    assert "PAUSED since 02:10: a streaming replica is 12.5 s behind (replica_lag)" in held.output
    assert "pauses for replica_lag: 1, 3.0 s" in held.output
    later = CliRunner().invoke(app, ["runs", run["id"]], env=cli_env(s))
    assert "PAUSED" not in later.output and "INTERRUPTED" in later.output, later.output
    # another session's lock (a link or an undo meanwhile) is not this run at work
    other = _on_loop(asyncpg.connect(plain_url(s)))
    try:
        _on_loop(other.execute("SELECT pg_advisory_lock(hashtext($1))", ledger.ADVISORY_LOCK_KEY))
        meanwhile = CliRunner().invoke(app, ["runs", run["id"]], env=cli_env(s))
        status = CliRunner().invoke(app, ["status"], env=cli_env(s))
    finally:
        _on_loop(other.close())
    assert "INTERRUPTED" in meanwhile.output, meanwhile.output
    assert "RUNNING" not in status.output, status.output
