"""The CLI: exit codes, one-line errors, no passwords, --help for every command."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flowfix import alembic_runner
from flowfix.cli import app
from flowfix.config import Settings
from tests.helpers import revision

runner = CliRunner()


def _env(database_url: str, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": database_url, "FLOWFIX_SCHEMA": "public", **extra}


@pytest.mark.parametrize(
    "command",
    [[], ["upgrade"], ["downgrade"], ["validate"], ["status"], ["backfill"], ["link"], ["undo"], ["runs"], ["demo"]],
)
def test_help_renders(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_upgrade_and_downgrade(database_url: str, settings: Settings) -> None:
    result = runner.invoke(app, ["upgrade", "fix_master_flow_fk", "--create-tables"], env=_env(database_url))
    assert result.exit_code == 0, result.output
    assert revision(settings) == "fix_master_flow_fk"
    result = runner.invoke(app, ["downgrade", "legacy"], env=_env(database_url))
    assert result.exit_code == 0, result.output
    assert revision(settings) == "legacy"


def test_wrong_revision_is_exit_2_and_changes_nothing(database_url: str, settings: Settings) -> None:
    result = runner.invoke(app, ["upgrade", "no_such_rev"], env=_env(database_url))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == "flowfix: error: Can't locate revision identified by 'no_such_rev'"
    assert revision(settings) is None


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"DATABASE_URL": "postgresql://ops:hunter2@127.0.0.1:1/prod"}, "cannot connect to postgresql://ops:***@"),
        ({"DATABASE_URL": "mysql://ops:hunter2@db/prod"}, "must be a PostgreSQL URL"),
        ({"DATABASE_URL": "postgresql://ops:hunter2@db/prod", "FLOWFIX_SCHEMA": "Bad-Name"}, "not a plain identifier"),
        ({"DATABASE_URL": "postgresql://ops:hunter2@db/prod", "FLOWFIX_LOCK_TIMEOUT": "forever"}, "must look like"),
        ({}, "DATABASE_URL is not set"),
    ],
)
def test_bad_settings_are_one_line_exit_2_without_password(env: dict[str, str], expected: str) -> None:
    result = runner.invoke(app, ["upgrade"], env={"DATABASE_URL": "", **env})
    assert result.exit_code == 2
    assert expected in result.stderr
    assert "hunter2" not in result.output + result.stderr
    assert "Traceback" not in result.output + result.stderr


def test_upgrade_sql_prints_reviewable_sql_without_a_database() -> None:
    result = runner.invoke(app, ["upgrade", "head", "--sql"], env={"DATABASE_URL": ""})
    assert result.exit_code == 0, result.output
    assert "CREATE UNIQUE INDEX CONCURRENTLY" in result.stdout
    assert "-- OUTSIDE A TRANSACTION" in result.stdout


def test_the_plans_script_entry_points_wrap_the_cli(database_url: str, settings: Settings) -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT, upgrade

    upgrade(settings, "fix_master_flow_fk")
    env = {"DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"}
    validate = subprocess.run(
        [sys.executable, "scripts/validate_flow_relationships.py", "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert validate.returncode == 0, validate.stderr
    assert '"revision": "fix_master_flow_fk"' in validate.stdout
    backfill = subprocess.run(
        [sys.executable, "scripts/fix_orphaned_data_imports.py", "--dry-run", "--format", "json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert backfill.returncode == 0, backfill.stderr
    assert '"window_seconds": 7200' in backfill.stdout


def test_alembic_itself_runs_the_revisions_from_the_checkout(database_url: str, settings: Settings) -> None:
    """The runbook's `alembic upgrade head`: same env.py, DATABASE_URL from the environment."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {"DATABASE_URL": database_url, "PATH": "/usr/bin:/bin"}
    ok = subprocess.run(
        [sys.executable, "-m", "alembic", "-x", "create_tables=true", "upgrade", "head"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert revision(settings) == alembic_runner.head()
    bad = subprocess.run(
        [sys.executable, "-m", "alembic", "downgrade", "nope"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert bad.returncode != 0
    assert "Traceback" not in bad.stdout + bad.stderr
    assert "FAILED: Can't locate revision identified by 'nope'" in bad.stdout


def test_pg_variables_alone_reach_the_database_as_with_psql(settings: Settings) -> None:
    """No DATABASE_URL: host, port, user and database come from PG* variables (libpq's way)."""
    url = settings.require_url()
    host = url.query.get("host") or url.host
    env = {
        "DATABASE_URL": None,
        "PGHOST": str(host),
        "PGPORT": str(url.port or 5432),
        "PGUSER": url.username or "",
        "PGDATABASE": url.database or "",
        "FLOWFIX_SCHEMA": "public",
    }
    result = runner.invoke(app, ["upgrade", "legacy", "--create-tables"], env=env)  # type: ignore[arg-type]
    assert result.exit_code == 0, result.output
    assert revision(settings) == "legacy"
    assert "connection from the PG* environment variables" in result.stderr
