"""Review of issues 18-20 under the roles of docs/roles-and-poolers.md: the operator's
backfill (--jobs 2) SIGKILLed mid records walk and resumed; the CI role watching it with
`runs RUN` and `status` while it runs, after the kill and after the resume."""

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
from tests.test_roles import Roles, roles  # noqa: F401 - the fixture

BACKFILL = ("backfill", "--batch-size", "1", "--jobs", "2", "--max-replica-lag", "0", "--create-missing-masters")


def watched(s: Settings, run_id: str) -> dict[str, Any]:
    shown = CliRunner().invoke(app, ["runs", run_id, "--format", "json"], env=cli_env(s))
    assert shown.exit_code == 0, shown.output
    body: dict[str, Any] = json.loads(shown.stdout)
    return body


@pytest.mark.sampled_shapes
def test_ci_watches_the_operators_killed_and_resumed_backfill(roles: Roles) -> None:  # noqa: F811
    admin, operator, ci = roles.admin, roles.operator, roles.ci
    expected = dataset(admin, imports=3, records=600)
    with Gate(admin, "raw_import_records", at=4) as gate:
        sql(admin, "GRANT USAGE ON SEQUENCE flowfix_test_gate_seq TO PUBLIC")
        proc = flowfix(operator, *BACKFILL)
        try:
            try:
                gate.wait(timeout=30)
            except AssertionError:
                proc.kill()
                raise AssertionError(proc.communicate()) from None
            (run,) = sql(admin, "SELECT id::text AS id FROM flowfix_runs WHERE status = 'running'")
            body = watched(ci, run["id"])
            assert (
                body["active"]
                and 0 < next(x for x in body["steps"] if x["step"] == "raw_import_records")["fraction"] < 1
            )
            status = CliRunner().invoke(app, ["status"], env=cli_env(ci))
            assert "state: ACTIVE" in status.output, status.output
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=60)
        finally:
            gate.open()
    wait_run_lock_released(admin)
    body = watched(ci, run["id"])
    assert not body["active"] and body["run"]["status"] == "running" and body["paused"] is None
    status = CliRunner().invoke(app, ["status"], env=cli_env(ci))
    assert "RUNNING" not in status.output, status.output

    resumed = flowfix(operator, *(a for a in BACKFILL if a not in ("--batch-size", "1")))  # not part of its identity
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, (out, err)
    assert run["id"] in out + err  # the same run, resumed
    body = watched(ci, run["id"])
    assert body["run"]["status"] == "finished" and not body["active"]
    assert "live" not in body["run"]["counts"]
    assert all(step["fraction"] == 1.0 for step in body["steps"]), body["steps"]
    assert None not in record_links(admin).values()
    linked = {r["id"]: r["master_flow_id"] for r in sql(admin, "SELECT id, master_flow_id FROM data_imports")}
    assert {k: linked[k] for k in expected} == expected
    listing = CliRunner().invoke(app, ["runs", "--format", "json"], env=cli_env(ci))
    assert listing.exit_code == 0, listing.output
    validate = CliRunner().invoke(app, ["validate"], env=cli_env(ci))
    assert validate.exit_code in (0, 1), validate.output
