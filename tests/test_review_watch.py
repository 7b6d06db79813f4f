"""Review of the watchable run (issue 18) against real runs in other processes: what
`flowfix runs RUN` and `--watch` say once the backfill's process is SIGKILLed, and while
another flowfix run (an undo of the interrupted run) holds the one run lock."""

from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest
from typer.testing import CliRunner

from flowfix.cli import app
from flowfix.config import Settings
from tests.helpers import Gate, cli_env, sql, wait_run_lock_released
from tests.helpers import flowfix_process as flowfix
from tests.test_records_walk import dataset, record_links
from tests.test_watch import reading


def killed_mid_records(s: Settings) -> str:
    """A backfill SIGKILLed while its records walk is parked at its 4th batch; returns its
    run id once its backend has gone (the gate opened, the orphaned session ended)."""
    with Gate(s, "raw_import_records", at=4) as gate:
        proc = flowfix(s, "backfill", "--batch-size", "1", "--max-replica-lag", "0")
        try:
            gate.wait()
            (run,) = sql(s, "SELECT id::text AS id FROM flowfix_runs WHERE status = 'running'")
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
        finally:
            gate.open()
    wait_run_lock_released(s)
    return str(run["id"])


@pytest.mark.sampled_shapes
def test_watch_of_a_killed_backfill_ends_and_does_not_exit_0(shaped_fixed: Settings) -> None:
    """`runs RUN --watch` stops when the run's process dies; its exit code must not promise
    a finished run (exit 0) while the run is interrupted and rows are still NULL."""
    s = shaped_fixed
    dataset(s, imports=3, records=600)
    with Gate(s, "raw_import_records", at=4) as gate:
        proc = flowfix(s, "backfill", "--batch-size", "1", "--max-replica-lag", "0")
        try:
            gate.wait()
            (run,) = sql(s, "SELECT id::text AS id FROM flowfix_runs WHERE status = 'running'")
            watcher = flowfix(s, "runs", run["id"], "--watch", "--format", "json", "--interval", "0.2")
            assert watcher.stdout is not None
            assert json.loads(watcher.stdout.readline())["active"]
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
        finally:
            gate.open()
        out, err = watcher.communicate(timeout=60)
    last = json.loads(out.strip().splitlines()[-1])
    assert not last["active"] and last["run"]["status"] == "running" and last["paused"] is None
    assert None in record_links(s).values()  # the run left rows behind
    assert watcher.returncode != 0, (watcher.returncode, err)


@pytest.mark.sampled_shapes
def test_an_interrupted_run_is_not_shown_active_while_another_run_holds_the_lock(shaped_fixed: Settings) -> None:
    """The run lock is one per database: while `flowfix undo` of the interrupted backfill
    holds it, the backfill itself is not being worked on; `runs` must say INTERRUPTED (and
    `--watch` of it must end), not ACTIVE."""
    s = shaped_fixed
    dataset(s, imports=3, records=600)
    run_id = killed_mid_records(s)
    body: dict[str, Any] = reading(s, run_id)
    assert not body["active"], body  # nothing holds the lock now
    with Gate(s, "raw_import_records", at=1) as gate:
        undo = flowfix(s, "undo", run_id)
        try:
            try:
                gate.wait(timeout=20)
            except AssertionError:
                undo.kill()
                raise AssertionError(undo.communicate()) from None
            held = CliRunner().invoke(app, ["runs", run_id], env=cli_env(s))
            assert held.exit_code == 0, held.output
            assert "state: ACTIVE" not in held.output, held.output
        finally:
            gate.open()
            _, err = undo.communicate(timeout=60)
    assert undo.returncode == 0, err
    assert sql(s, "SELECT status FROM flowfix_runs WHERE id = :id", {"id": run_id})[0]["status"] == "undone"


def test_an_undone_interrupted_run_keeps_no_live_state(shaped_fixed: Settings) -> None:
    """What the interrupted process said while it ran (counts->'live': "the finished run's
    counts replace it") must not outlive the run once it is undone: `runs --format json`
    would list a pause state for a run nobody will ever work on again."""
    s = shaped_fixed
    dataset(s, imports=2, records=300)
    run_id = killed_mid_records(s)
    undone = CliRunner().invoke(app, ["undo", run_id], env=cli_env(s))
    assert undone.exit_code == 0, undone.output
    listing = CliRunner().invoke(app, ["runs", "--format", "json"], env=cli_env(s))
    (row,) = [r for r in json.loads(listing.stdout) if r["id"] == run_id]
    assert row["status"] == "undone" and "live" not in row["counts"], row


def test_an_interrupted_run_shows_no_workers_and_no_eta(shaped_fixed: Settings) -> None:
    """A range the killed process had claimed stays 'running' in flowfix_walk_ranges; no
    worker is on it, and no ETA can be promised for a run nobody works on: the JSON for
    scripts must not say otherwise (the text view already hides both)."""
    s = shaped_fixed
    dataset(s, imports=2, records=300)
    run_id = killed_mid_records(s)
    body = reading(s, run_id)
    assert not body["active"]
    assert body["workers"] == 0, body
    (records,) = [x for x in body["steps"] if x["step"] == "raw_import_records"]
    assert not records["finished"] and records["eta_seconds"] is None and records["eta_at"] is None, records
    assert all(step["workers"] == 0 for step in body["steps"])
