"""``flowfix upgrade head`` from ``legacy`` while discovery flows are orphaned applies
fix_master_flow_fk, then the last revision refuses: the line says where the database is
now (the revision reached, which stays) and the next step, not only "this revision
changed nothing" (true of that revision, misleading for the command)."""

from __future__ import annotations

import uuid

from typer.testing import CliRunner

from flowfix.cli import Exit, app
from flowfix.config import Settings
from tests.conftest import upgrade
from tests.helpers import add_discovery_flow, cli_env, revision

runner = CliRunner()


def test_upgrade_head_says_where_it_stopped_and_what_next(settings: Settings) -> None:
    upgrade(settings, "legacy")
    add_discovery_flow(settings, flow_id=uuid.uuid4(), master=None, client=uuid.uuid4(), engagement=uuid.uuid4())
    result = runner.invoke(app, ["upgrade", "head"], env=cli_env(settings))
    assert result.exit_code == Exit.USAGE, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("flowfix: error")]
    assert len(errors) == 1, result.stderr
    line = errors[0]
    assert revision(settings) == "fix_master_flow_fk"
    assert line.index("now at revision fix_master_flow_fk") < line.index("changed nothing"), line
    assert "enforce_master_flow_not_null" in line, line
    assert "flowfix backfill" in line and "flowfix upgrade head" in line, line
    assert "alembic upgrade head" not in line
