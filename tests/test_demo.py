"""`flowfix demo` end to end (small), and no command ever prints a password."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flowfix.cli import app
from flowfix.config import Settings, normalize_url
from tests.conftest import upgrade

runner = CliRunner()


def test_demo_walks_the_runbook_and_ends_green() -> None:
    result = runner.invoke(app, ["demo", "--size", "40"], env={"DATABASE_URL": ""})
    assert result.exit_code == 0, result.output
    out = result.stdout
    for step in (
        "flowfix validate, before anything",
        "flowfix upgrade fix_master_flow_fk",
        "--dry-run",
        "flowfix undo",
        "flowfix link",
        "flowfix upgrade head",
    ):
        assert step in out
    assert "FAILED (exit 1)" in out  # the first validation
    assert out.rstrip().splitlines()[-2].endswith("OK (exit 0)")  # the last one
    assert "tie: more than one master at the nearest distance" in out


@pytest.mark.parametrize(
    "command",
    [
        ["validate"],
        ["validate", "--format", "json"],
        ["status"],
        ["runs"],
        ["backfill", "--dry-run"],
        ["backfill", "--dry-run", "--format", "json"],
        ["link", "--import", "00000000-0000-0000-0000-000000000001", "--flow", "00000000-0000-0000-0000-000000000002"],
        ["undo", "00000000-0000-0000-0000-000000000003"],
        ["upgrade", "nope"],
        ["upgrade", "head", "--sql"],
        ["downgrade", "legacy", "--sql"],
    ],
)
def test_no_command_prints_the_password(command: list[str], settings: Settings, database_url: str) -> None:
    upgrade(settings, "fix_master_flow_fk")
    secret = "Sup3r-s3cret-pw"
    url = (
        normalize_url(database_url).set(drivername="postgresql", password=secret).render_as_string(hide_password=False)
    )
    result = runner.invoke(app, command, env={"DATABASE_URL": url})
    assert result.exit_code in (0, 1, 2), result.output
    assert secret not in result.stdout + result.stderr


def test_an_unreachable_server_with_a_password_is_one_line() -> None:
    result = runner.invoke(app, ["validate"], env={"DATABASE_URL": "postgresql://ops:Sup3r-s3cret-pw@127.0.0.1:1/x"})
    assert result.exit_code == 2
    assert "Sup3r-s3cret-pw" not in result.stdout + result.stderr
    assert result.stderr.strip().startswith("flowfix: error: cannot connect to postgresql://ops:***@127.0.0.1:1/x")
