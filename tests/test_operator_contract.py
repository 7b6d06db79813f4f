"""The operator contract: whatever goes wrong, one line on stderr, a documented exit code,
and a message that says what was committed. Real roles, real server settings, real
terminated sessions; nothing mocked."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import uuid

import pytest
from typer.testing import CliRunner

from flowfix.cli import Exit, app
from flowfix.config import Settings
from flowfix.db import admin
from tests import snapshot
from tests.conftest import ROOT
from tests.helpers import Gate, cli_env, orphans_by_time, plain_url, sql

runner = CliRunner()
C, E = uuid.uuid4(), uuid.uuid4()


def one_line(result) -> str:  # type: ignore[no-untyped-def]
    lines = [line for line in result.stderr.splitlines() if line.startswith("flowfix: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def orphans(s: Settings, n: int = 3) -> None:
    """``n`` imports (a record each) that the backfill links by time, one master each."""
    orphans_by_time(s, n, client=C, engagement=E)


def role(s: Settings, *grants: str) -> Settings:
    """A login role with only ``grants`` on the test schema."""
    name = f"ff_role_{uuid.uuid4().hex[:8]}"
    sql(s, f"CREATE ROLE {name} LOGIN")
    sql(s, f"GRANT USAGE ON SCHEMA {s.schema} TO {name}")
    for grant in grants:
        sql(s, grant.format(role=name, schema=s.schema))
    return Settings(
        url=s.require_url().set(username=name, password=None), schema=s.schema, lock_timeout="2s", lock_retries=0
    )


@pytest.fixture
def fixed(shaped_fixed: Settings) -> Settings:
    orphans(shaped_fixed)
    return shaped_fixed


@pytest.mark.parametrize(
    "args",
    [
        ["backfill"],
        ["undo", str(uuid.uuid4())],
        ["downgrade", "legacy"],
        ["link", "--import", str(uuid.uuid4()), "--flow", str(uuid.uuid4())],
    ],
)
def test_a_select_only_role_gets_permission_denied_in_one_line_and_nothing_changes(
    fixed: Settings, args: list[str]
) -> None:
    reader = role(fixed, "GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role}")
    before = snapshot.take(fixed, flowfix_tables=True)
    result = runner.invoke(app, args, env=cli_env(reader))
    assert result.exit_code == Exit.USAGE, result.output
    line = one_line(result)
    assert any(w in line for w in ("permission denied", "no flowfix run", "row-level security")), line
    assert snapshot.take(fixed, flowfix_tables=True) == before


def test_a_role_that_does_not_own_the_tables_cannot_upgrade(shaped: Settings) -> None:
    other = role(
        shaped, "GRANT ALL ON ALL TABLES IN SCHEMA {schema} TO {role}", "GRANT CREATE ON SCHEMA {schema} TO {role}"
    )
    before = snapshot.take(shaped, flowfix_tables=True)
    result = runner.invoke(app, ["upgrade", "fix_master_flow_fk"], env=cli_env(other))
    assert result.exit_code == Exit.USAGE
    assert "permission denied" in one_line(result)
    assert snapshot.take(shaped, flowfix_tables=True) == before


def test_a_read_only_database_is_named_as_such(fixed: Settings) -> None:
    db = fixed.require_url().database
    sql(fixed, f"ALTER DATABASE {db} SET default_transaction_read_only = on")
    try:
        before = snapshot.take(fixed, flowfix_tables=True)
        for args in (["backfill"], ["downgrade", "legacy"]):
            result = runner.invoke(app, args, env=cli_env(fixed))
            assert result.exit_code == Exit.USAGE, result.output
            assert "the database is read-only" in one_line(result)
        assert snapshot.take(fixed, flowfix_tables=True) == before
    finally:
        asyncio.run(admin(plain_url(fixed), f"ALTER DATABASE {db} RESET default_transaction_read_only"))


def test_statement_timeout_is_one_line_and_names_the_run(fixed: Settings) -> None:
    db = fixed.require_url().database
    # the first update of the imports waits at a gate until statement_timeout cancels it
    with Gate(fixed, "data_imports", at=1):
        sql(fixed, f"ALTER DATABASE {db} SET statement_timeout = '200ms'")
        result = runner.invoke(app, ["backfill"], env=cli_env(fixed))
        sql(fixed, f"ALTER DATABASE {db} RESET statement_timeout")
    assert result.exit_code == Exit.USAGE, result.output
    line = one_line(result)
    assert "the server cancelled a statement" in line and "statement_timeout" in line
    (run,) = sql(fixed, "SELECT id::text FROM flowfix_runs")
    assert f"backfill run {run['id']} stopped part-way" in line and f"flowfix undo {run['id']}" in line


def test_a_terminated_session_is_one_line_and_the_rerun_finishes(fixed: Settings) -> None:
    with Gate(fixed, "data_imports", at=2) as gate:

        def terminate() -> None:
            sql(fixed, "SELECT pg_terminate_backend(:pid)", {"pid": gate.wait()})

        killer = threading.Thread(target=terminate)
        killer.start()
        result = runner.invoke(app, ["backfill", "--batch-size", "1"], env=cli_env(fixed))
        killer.join()
    assert result.exit_code == Exit.USAGE, result.output
    line = one_line(result)
    assert "ended flowfix's session" in line or "lost the connection" in line, line
    rerun = runner.invoke(app, ["backfill"], env=cli_env(fixed))
    assert rerun.exit_code == Exit.OK, rerun.output
    assert sql(fixed, "SELECT count(*) AS n FROM data_imports WHERE master_flow_id IS NULL") == [{"n": 0}]


def test_a_bug_is_exit_3_with_a_hint_and_debug_shows_the_traceback(fixed: Settings) -> None:
    # damaged bookkeeping: flowfix's own SQL now fails, which no operator input explains
    sql(fixed, "ALTER TABLE flowfix_changes DROP COLUMN skipped")
    result = runner.invoke(app, ["backfill"], env=cli_env(fixed))
    assert result.exit_code == Exit.BUG, result.output
    line = one_line(result)
    assert "this is a bug in flowfix; rerun with --debug" in line
    debug = runner.invoke(app, ["--debug", "backfill"], env=cli_env(fixed))
    assert debug.exit_code == Exit.BUG and "Traceback" in debug.stderr


def test_ctrl_c_is_exit_130_in_one_line(fixed: Settings) -> None:
    with Gate(fixed, "data_imports", at=2) as gate:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flowfix", "backfill", "--batch-size", "1"],
            cwd=ROOT,
            env={**os.environ, **cli_env(fixed)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        gate.wait()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == Exit.INTERRUPTED, (out, err)
    # progress lines (stderr is a pipe here) may come first; the error is one line, the last
    lines = [line for line in err.splitlines() if line.strip()]
    assert (
        [line for line in lines if line.startswith("flowfix:")]
        == lines[-1:]
        == [
            "flowfix: error: interrupted: what was committed stays (backfill and undo resume when run again;"
            " a revision resumes on the next upgrade)"
        ]
    )
    progress = [line for line in lines[:-1] if not line.startswith("throttle blind: ")]  # said once, at start
    assert all(": " in line and "done in" in line for line in progress), lines  # finished steps only


def test_upgrade_head_refused_at_its_last_revision_says_where_the_database_is(shaped: Settings) -> None:
    from tests.helpers import add_discovery_flow

    add_discovery_flow(shaped, flow_id=uuid.uuid4(), master=None, client=C, engagement=E)
    result = runner.invoke(app, ["upgrade", "head"], env=cli_env(shaped))
    assert result.exit_code == Exit.USAGE
    line = one_line(result)
    assert line.startswith(
        "flowfix: error: upgrade applied revisions up to fix_master_flow_fk (from legacy); the database is now at"
        " revision fix_master_flow_fk, where they stay. The next revision refused:"
    ), line
    assert (
        "1 discovery_flows rows still have master_flow_id NULL; revision enforce_master_flow_not_null changed nothing"
        in line
    )
    assert line.endswith("then `flowfix upgrade head` again.")


def test_an_unwritable_report_is_refused_before_the_database_is_touched(fixed: Settings, tmp_path) -> None:
    for path in (tmp_path / "missing" / "r.json", tmp_path):
        result = runner.invoke(app, ["backfill", "--report", str(path)], env=cli_env(fixed))
        assert result.exit_code == Exit.USAGE
        assert "--report" in one_line(result)
    assert sql(fixed, "SELECT count(*) AS n FROM flowfix_runs") == [{"n": 0}]
    assert sql(fixed, "SELECT count(*) AS n FROM data_imports WHERE master_flow_id IS NULL") == [{"n": 3}]


def test_no_args_prints_the_help() -> None:
    result = runner.invoke(app, [])
    assert "Usage" in result.output and result.exit_code == Exit.USAGE
