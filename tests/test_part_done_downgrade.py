"""A downgrade of fix_master_flow_fk that stops part-way (issue 19, item 7) is named like a
part-done upgrade: in its error, in `flowfix status` and in the next step (rerun the
downgrade), and backfill, link and undo refuse while it is part-done. Every runbook
shape where the upgrade replaces an FK (app_head's reference flow_id already)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from typer.testing import CliRunner

from flowfix import alembic_runner
from flowfix.cli import app
from flowfix.config import Settings
from tests.conftest import upgrade
from tests.helpers import cli_env, revision, script

#: Every attempt to restore the records' FK gives up on its lock, as under a long transaction
#: (by then the downgrade has dropped the FKs the upgrade added and translated values back).
LOCKED_OUT = [
    """CREATE FUNCTION part_done_test_locked() RETURNS event_trigger LANGUAGE plpgsql AS $f$
BEGIN
  -- the restore (a DO block that rebuilds each FK from checked parts) for the records
  IF current_query() ~ 'ADD CONSTRAINT' AND current_query() ~ 'table_name = ''raw_import_records''' THEN
    RAISE EXCEPTION 'canceling statement due to lock timeout' USING ERRCODE = 'lock_not_available';
  END IF;
END $f$""",
    "CREATE EVENT TRIGGER part_done_test_locked ON ddl_command_start WHEN TAG IN ('ALTER TABLE')"
    " EXECUTE FUNCTION part_done_test_locked()",
]


def one_line(output: str) -> str:
    return " ".join(output.split())


@pytest.mark.parametrize("shape", ("friendly", "deployed", "between"))
def test_a_downgrade_that_stops_part_way_is_named_refused_by_writers_and_finished_by_rerunning_it(
    make_shape: Callable[..., Settings], shape: str
) -> None:
    s = make_shape(shape)
    upgrade(s, "fix_master_flow_fk")
    script(s, *LOCKED_OUT)
    env = cli_env(s, FLOWFIX_LOCK_RETRIES="0")
    cli = CliRunner()
    try:
        down = cli.invoke(app, ["downgrade", "legacy"], env=env)
        assert down.exit_code == 2, down.output
        line = one_line(down.output)
        assert "downgrade of revision fix_master_flow_fk is part-done" in line, line
        assert "`flowfix downgrade legacy` finishes it" in line and "run the upgrade again" not in line, line
        assert revision(s) == "fix_master_flow_fk"
        unfinished = alembic_runner.part_done(s)
        assert unfinished is not None and unfinished.downgrade

        status = cli.invoke(app, ["status"], env=env)
        assert "PART-DONE the downgrade of revision fix_master_flow_fk" in one_line(status.output), status.output
        assert "next step: flowfix downgrade legacy" in status.output, status.output

        for command in (
            ["backfill", "--window", "2h"],
            ["link", "--import", str(uuid.uuid4()), "--flow", str(uuid.uuid4())],
            ["undo", str(uuid.uuid4())],
        ):
            refused = cli.invoke(app, command, env=env)
            assert refused.exit_code == 2, (command, refused.output)
            assert "part-done" in refused.output and "flowfix downgrade legacy" in one_line(refused.output), (
                command,
                refused.output,
            )
    finally:
        script(s, "DROP EVENT TRIGGER IF EXISTS part_done_test_locked")
    again = cli.invoke(app, ["downgrade", "legacy"], env=env)
    assert again.exit_code == 0, again.output
    assert revision(s) == "legacy" and alembic_runner.part_done(s) is None
