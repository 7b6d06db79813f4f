"""Review of issue 19: an undo SIGKILLed part way while the application relinks some of
the run's records and moves others; the rerun must end as one uninterrupted undo would:
what the application changed since is kept, every other value the run wrote reverted."""

from __future__ import annotations

import os
import signal

import pytest

from flowfix.config import Settings
from tests.helpers import Gate, add_master, position_column, sql, wait_run_lock_released
from tests.helpers import flowfix_process as flowfix
from tests.test_records_walk import C, E, dataset


@pytest.mark.sampled_shapes
def test_killed_undo_with_a_writer_reruns_to_the_uninterrupted_result(shaped_fixed: Settings) -> None:
    s = shaped_fixed
    dataset(s, imports=2, records=3000)
    done = flowfix(s, "backfill", "--batch-size", "1", "--max-replica-lag", "0")
    out, err = done.communicate(timeout=300)
    assert done.returncode == 0, (out, err)
    (run,) = sql(s, "SELECT id::text AS id FROM flowfix_runs WHERE command = 'backfill'")
    _, other = add_master(s, client=C, engagement=E)
    position = position_column(s)
    with Gate(s, "raw_import_records", at=2) as gate:
        undo = flowfix(s, "undo", run["id"])
        try:
            try:
                gate.wait(timeout=60)
            except AssertionError:
                undo.kill()
                raise AssertionError(undo.communicate()) from None
            # the application: relinks 30 records by hand, moves every record
            relinked = sql(
                s,
                "UPDATE raw_import_records SET master_flow_id = :m WHERE id IN"
                " (SELECT id FROM raw_import_records WHERE master_flow_id IS NOT NULL ORDER BY id LIMIT 30)"
                " RETURNING id",
                {"m": other},
            )
            sql(s, f"UPDATE raw_import_records SET {position} = {position} + 100000")
            os.kill(undo.pid, signal.SIGKILL)
            undo.communicate(timeout=60)
        finally:
            gate.open()
    wait_run_lock_released(s)
    again = flowfix(s, "undo", run["id"])
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, (out, err)
    kept = {r["id"] for r in relinked}
    rows = {r["id"]: r["master_flow_id"] for r in sql(s, "SELECT id, master_flow_id FROM raw_import_records")}
    assert {i for i, m in rows.items() if m is not None} == kept
    assert all(rows[i] == other for i in kept)
    assert (
        sql(s, "SELECT status FROM flowfix_runs WHERE id = CAST(:r AS uuid)", {"r": run["id"]})[0]["status"] == "undone"
    )
