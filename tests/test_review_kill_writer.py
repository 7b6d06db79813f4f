"""Review of issue 19: a backfill SIGKILLed mid records walk while the application moves
rows ahead of the cursor (an UPDATE of another column writes each row elsewhere) and
inserts new orphan records of planned imports; the resume must end as an uninterrupted
run would: every record linked to its import's master, the run's ledger covering them."""

from __future__ import annotations

import os
import signal

import pytest

from flowfix.config import Settings
from tests.helpers import Gate, position_column, sql, wait_run_lock_released
from tests.helpers import flowfix_process as flowfix
from tests.test_records_walk import dataset

BACKFILL = ("backfill", "--batch-size", "1", "--max-replica-lag", "0")


@pytest.mark.sampled_shapes
def test_killed_backfill_with_a_writer_moving_rows_resumes_to_the_uninterrupted_result(shaped_fixed: Settings) -> None:
    s = shaped_fixed
    expected = dataset(s, imports=3, records=600)
    position = position_column(s)
    with Gate(s, "raw_import_records", at=4) as gate:
        proc = flowfix(s, *BACKFILL)
        try:
            gate.wait(timeout=30)
            (run,) = sql(s, "SELECT id::text AS id FROM flowfix_runs WHERE status = 'running'")
            # the application, meanwhile: every record moves; new orphan records arrive
            sql(s, f"UPDATE raw_import_records SET {position} = {position} + 100000")
            sql(
                s,
                "INSERT INTO raw_import_records SELECT (jsonb_populate_record(NULL::raw_import_records, to_jsonb(r)"
                f" || jsonb_build_object('id', gen_random_uuid(), '{position}', 500000 + g, 'master_flow_id', NULL))).*"
                " FROM generate_series(1, 40) g CROSS JOIN LATERAL (SELECT * FROM raw_import_records LIMIT 1) r",
            )
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
        finally:
            gate.open()
    wait_run_lock_released(s)
    assert sql(s, "SELECT count(*) AS n FROM raw_import_records WHERE master_flow_id IS NULL")[0]["n"] > 0
    resumed = flowfix(s, "backfill", "--max-replica-lag", "0")  # batch size is not part of a run's identity
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, (out, err)
    assert run["id"] in out + err
    rows = sql(s, "SELECT data_import_id, master_flow_id FROM raw_import_records")
    assert [r for r in rows if r["master_flow_id"] != expected.get(r["data_import_id"])] == []
    ledgered = sql(
        s,
        "SELECT count(*) AS n FROM (SELECT unnest(row_ids) FROM flowfix_changes"
        " WHERE run_id = CAST(:r AS uuid) AND table_name = 'raw_import_records') x",
        {"r": run["id"]},
    )[0]["n"]
    assert ledgered == len(rows)
