"""Progress as rows (issue 19, items 5 and 6): a resumed backfill and a resumed undo report
the whole run's work, summed over every process that worked on it; `flowfix runs RUN`
shows the run's ranges from those rows. Every runbook shape."""

from __future__ import annotations

import json
import uuid

import pytest
from typer.testing import CliRunner

from flowfix import ledger
from flowfix.backfill.model import Silent
from flowfix.cli import app
from flowfix.config import Settings
from flowfix.db import run_with_engine
from flowfix.errors import RunInterrupted
from tests.helpers import cli_env, links, script, sql
from tests.test_records_walk import Crash, dataset, record_links, run


@pytest.fixture
def s(shaped: Settings) -> Settings:
    from tests.conftest import upgrade

    upgrade(shaped, "fix_master_flow_fk")
    return shaped


def test_a_resumed_backfill_reports_the_whole_runs_work_in_its_summary_and_in_runs(s: Settings) -> None:
    expected = dataset(s, imports=4, records=150)
    with pytest.raises(RunInterrupted):
        run(s, Crash(after=2), walk="ctid", jobs=2, batch_size=40)
    resumed = run(s, walk="ctid", jobs=2, batch_size=40)
    assert resumed.resumed and resumed.exit_code == 0 and resumed.counts is not None
    assert links(s, "data_imports") == expected
    records = len(record_links(s))
    # the whole run: imports the first process linked, records both processes linked
    assert resumed.counts.data_imports == len(expected)
    assert resumed.counts.raw_import_records == records
    stored = sql(s, "SELECT counts FROM flowfix_runs WHERE id = :id", {"id": resumed.run_id})[0]["counts"]
    assert stored["data_imports"] == len(expected) and stored["raw_import_records"] == records

    shown = CliRunner().invoke(app, ["runs", str(resumed.run_id), "--format", "json"], env=cli_env(s))
    assert shown.exit_code == 0, shown.output
    body = json.loads(shown.output)
    imports, step = body["steps"]  # the stored import plan, then the records walk
    assert imports["step"] == "data_imports" and imports["walk"] == "plan"
    assert imports["done"] == imports["ranges"] == len(expected) and imports["fraction"] == 1.0
    assert step["step"] == "raw_import_records" and step["walk"] == "ctid" and step["fraction"] == 1.0
    assert step["done"] == step["ranges"] >= 2
    assert step["rows_changed"] == records
    assert step["attempts"] > step["ranges"]  # the range the crash stopped was claimed again
    assert step["started_at"] and step["updated_at"]
    listed = CliRunner().invoke(app, ["runs", "--format", "json"], env=cli_env(s))
    assert listed.exit_code == 0 and [r["id"] for r in json.loads(listed.output)] == [str(resumed.run_id)]
    text = CliRunner().invoke(app, ["runs", str(resumed.run_id)], env=cli_env(s))
    assert text.exit_code == 0 and f"100% of pages ({step['done']}/{step['ranges']} ranges)" in text.output, text.output


#: The first UPDATE of data_imports (undo's batch for imports, after its records' batch
#: committed) fails once, as a lost session would: a sequence, not a table, counts it (a
#: failed transaction keeps no row, but keeps nextval).
FAIL_ONCE = [
    "CREATE SEQUENCE progress_test_once",
    """CREATE FUNCTION progress_test_fail_once() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  IF nextval('progress_test_once') = 1 THEN
    RAISE EXCEPTION 'the session went away' USING ERRCODE = 'admin_shutdown';
  END IF;
  RETURN NULL;
END $f$""",
    "CREATE TRIGGER progress_test_fail_once AFTER UPDATE ON data_imports FOR EACH STATEMENT"
    " EXECUTE FUNCTION progress_test_fail_once()",
]


def test_a_resumed_undo_reports_every_value_the_undo_reverted(s: Settings) -> None:
    dataset(s, imports=3, records=40)
    done = run(s)
    assert done.exit_code == 0 and done.run_id is not None
    linked = sum(v is not None for v in record_links(s).values()) + 3
    script(s, *FAIL_ONCE)

    def undo(engine):  # type: ignore[no-untyped-def]
        return ledger.undo_run(engine, s, done.run_id, lock_retries=0)

    with pytest.raises(Exception, match="went away"):
        run_with_engine(s, undo)
    assert sum(v is None for v in record_links(s).values()) > 0  # the records' batch committed
    report = run_with_engine(s, undo)
    assert report.reverted == linked
    assert set(links(s, "data_imports").values()) == {None}
    stored = sql(s, "SELECT counts FROM flowfix_runs WHERE id = :id", {"id": report.undo_run_id})[0]["counts"]
    assert stored["reverted"] == linked


def test_runs_of_an_unknown_run_is_one_line_exit_2(s: Settings) -> None:
    shown = CliRunner().invoke(app, ["runs", str(uuid.uuid4())], env=cli_env(s))
    assert shown.exit_code == 2 and "no flowfix run with id" in shown.output


def test_a_rerun_with_no_record_planned_skips_the_walk_but_not_the_closing_pass(s: Settings) -> None:
    """Item 8: nothing planned, no range walked (an idempotent rerun at 10M records costs
    one read, not a pass over every page); a record the application adds meanwhile to a
    linked import is still linked, by the closing pass."""
    from tests.helpers import add_record
    from tests.test_records_walk import in_another_thread

    expected = dataset(s, imports=2, records=60)
    first = run(s)
    assert first.exit_code == 0
    imp = next(iter(expected))
    added: list[uuid.UUID] = []

    class Writer(Silent):
        def start(self, step: str, total: int | None) -> None:
            if step == "raw_import_records":
                assert total == 0  # the precondition: nothing planned
                in_another_thread(lambda: added.append(add_record(s, data_import=imp, master=None, row=99_999)))

    again = run(s, Writer(), walk="ctid")
    assert again.exit_code == 0 and again.counts is not None and added
    assert again.counts.records_walk == "" and again.counts.records_final_pass == 1
    assert record_links(s)[added[0]] == expected[imp]
    ranges = sql(s, "SELECT walk, rows_changed FROM flowfix_walk_ranges WHERE run_id = :r", {"r": again.run_id})
    assert ranges == [{"walk": "closing", "rows_changed": 1}]
