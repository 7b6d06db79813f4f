"""flowfix validate --format openmetrics, read back by prometheus_client's own parsers
(the OpenMetrics one, and the classic text one node_exporter's textfile collector uses)."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.parser import text_string_to_metric_families as classic_families
from typer.testing import CliRunner

from flowfix.alembic_runner import head
from flowfix.cli import app
from flowfix.config import Settings
from flowfix.render import check_labels
from tests.conftest import ROOT, upgrade
from tests.helpers import add_import, add_master, cli_env

runner = CliRunner()


def test_openmetrics_has_a_gauge_per_check_the_revision_and_the_scan_time(settings: Settings, tmp_path: Path) -> None:
    upgrade(settings, "fix_master_flow_fk")
    client, engagement = uuid.uuid4(), uuid.uuid4()
    add_master(settings, client=client, engagement=engagement)
    for _ in range(3):
        add_import(settings, master=None, client=client, engagement=engagement)
    prom = tmp_path / "flowfix.prom"

    before = time.time()
    result = runner.invoke(app, ["validate", "--format", "openmetrics", "--output", str(prom)], env=cli_env(settings))
    assert result.exit_code == 1, result.output  # the orphans fail, as in every format
    as_json = runner.invoke(app, ["validate", "--format", "json"], env=cli_env(settings))
    report = json.loads(as_json.stdout)

    text = prom.read_text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert all(f.type == "gauge" for f in families.values())
    status = {(s.labels["table"], s.labels["check"]): s.value for s in families["flowfix_check_status"].samples}
    count = {(s.labels["table"], s.labels["check"]): s.value for s in families["flowfix_check_count"].samples}
    expected = {(check_labels(c["name"])["table"], check_labels(c["name"])["check"]): c for c in report["checks"]}
    assert len(expected) == len(report["checks"])  # the labels tell every check apart
    assert status == {k: {"pass": 0, "warn": 1, "fail": 2}[c["status"]] for k, c in expected.items()}
    assert count == {k: c["count"] for k, c in expected.items()}
    assert status[("data_imports", "orphaned")] == 2 and count[("data_imports", "orphaned")] == 3
    assert status[("", "tenant_mismatch")] == 0

    [info] = families["flowfix_revision_info"].samples
    assert info.labels == {"revision": "fix_master_flow_fk", "head": head()} and info.value == 1
    assert families["flowfix_at_head"].samples[0].value == 0
    assert families["flowfix_ok"].samples[0].value == 0
    [duration] = families["flowfix_scan_duration_seconds"].samples
    assert families["flowfix_scan_duration_seconds"].unit == "seconds" and 0 < duration.value < 60
    assert before <= families["flowfix_last_run_timestamp_seconds"].samples[0].value <= time.time()

    # node_exporter's textfile collector reads the classic text format: the same samples
    classic = {f.name: f for f in classic_families(text)}
    assert {s.value for s in classic["flowfix_check_count"].samples} == set(count.values())

    # the example alert rules in the docs use metrics and labels this output has
    rules = (ROOT / "docs" / "validate.md").read_text().split("```yaml\ngroups:", 1)[1].split("```", 1)[0]
    assert set(re.findall(r"\bflowfix_\w+", rules)) <= set(families)
    labels = {k for f in families.values() for s in f.samples for k in s.labels}
    assert set(re.findall(r"\$labels\.(\w+)", rules)) | set(re.findall(r"(\w+)=\"", rules)) <= labels
