"""backfill --dry-run tells how long the real run will take, per step, changing nothing.
(How close the estimate comes is measured in bench/estimate.py, not here.)"""

from __future__ import annotations

import json
import uuid

from typer.testing import CliRunner

from flowfix.config import Settings
from tests.conftest import upgrade
from tests.helpers import add_discovery_flow, add_import, add_master, add_record, cli_env, sql
from tests.snapshot import take

runner = CliRunner()


def test_the_dry_run_estimates_each_step_from_the_plan_and_changes_nothing(settings: Settings) -> None:
    from flowfix.cli import app

    upgrade(settings, "fix_master_flow_fk")
    client, engagement = uuid.uuid4(), uuid.uuid4()
    for _ in range(3):
        _, flow = add_master(settings, client=client, engagement=engagement)
        imp = add_import(settings, master=None, client=client, engagement=engagement)
        add_discovery_flow(settings, flow_id=flow, master=None, client=client, engagement=engagement, data_import=imp)
        for n in range(40):
            add_record(settings, data_import=imp, master=None, row=n)
    before = take(settings, flowfix_tables=True)

    result = runner.invoke(app, ["backfill", "--dry-run", "--format", "json"], env=cli_env(settings))
    assert result.exit_code == 0, result.output
    guess = json.loads(result.stdout)["estimate"]
    steps = {s["step"]: s for s in guess["steps"]}
    assert list(steps) == ["planning", "discovery_flows", "data_imports", "raw_import_records"]
    assert [steps[t]["rows"] for t in ("discovery_flows", "data_imports", "raw_import_records")] == [3, 3, 120]
    assert steps["raw_import_records"]["seconds"] >= 0 and guess["seconds"] >= steps["planning"]["seconds"] > 0

    text = runner.invoke(app, ["backfill", "--dry-run"], env=cli_env(settings))
    assert "estimate for the real run: about " in text.stdout and "raw_import_records" in text.stdout
    assert take(settings, flowfix_tables=True) == before
    assert sql(settings, "SELECT count(*) AS n FROM flowfix_runs")[0]["n"] == 0
