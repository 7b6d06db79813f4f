"""A role that may read the four tables but not flowfix's version table (a CI role made
the usual way, ``GRANT SELECT`` on the application's tables) is told just that, with the
grant that is missing, in one line, exit 2: not "revision (none)", not "no flowfix
revision recorded". A real role, made with CREATE ROLE ... LOGIN, connecting as itself."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from flowfix.cli import Exit, app
from flowfix.config import Settings
from flowfix.models import CHILD_TABLES, MASTER_TABLE
from tests.conftest import upgrade
from tests.helpers import cli_env, plain_url, script

runner = CliRunner()


@pytest.fixture
def ci_role(settings: Settings) -> Iterator[tuple[Settings, str]]:
    upgrade(settings, "fix_master_flow_fk")
    role = f"ci_{uuid.uuid4().hex[:8]}"
    tables = ", ".join(f"{settings.schema}.{t}" for t in (MASTER_TABLE, *CHILD_TABLES))
    script(
        settings,
        f"CREATE ROLE {role} LOGIN",
        f"GRANT USAGE ON SCHEMA {settings.schema} TO {role}",
        f"GRANT SELECT ON {tables} TO {role}",
    )
    as_role = Settings(url=settings.require_url().set(username=role), schema=settings.schema)
    try:
        yield as_role, role
    finally:
        script(settings, f"DROP OWNED BY {role}", f"DROP ROLE {role}")


@pytest.mark.parametrize(
    "command", [["status"], ["validate"], ["validate", "--format", "json"], ["backfill", "--dry-run"]]
)
def test_an_unreadable_version_table_is_named_with_the_missing_grant(
    ci_role: tuple[Settings, str], command: list[str]
) -> None:
    as_role, role = ci_role
    assert role in plain_url(as_role)
    result = runner.invoke(app, command, env=cli_env(as_role))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == Exit.USAGE, result.output
    assert len(lines) == 1, result.stderr
    assert f"GRANT SELECT ON {as_role.schema}.flowfix_alembic_version TO {role}" in lines[0], lines[0]
    assert "no flowfix revision recorded" not in result.output and "revision (none)" not in result.output
    assert "Traceback" not in result.output


def test_with_the_grant_the_same_role_validates(ci_role: tuple[Settings, str], settings: Settings) -> None:
    as_role, role = ci_role
    script(settings, f"GRANT SELECT ON {settings.schema}.flowfix_alembic_version TO {role}")
    result = runner.invoke(app, ["validate"], env=cli_env(as_role))
    assert result.exit_code in (Exit.OK, Exit.PROBLEMS), result.output
    assert "flowfix_alembic_version" not in result.stderr
