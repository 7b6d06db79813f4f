"""Review of issue 20: the planner works in temporary tables (flowfix/backfill/plan.py), so
`backfill` and `backfill --dry-run` need TEMPORARY on the database. PostgreSQL grants it
to PUBLIC by default, and hardened databases revoke it (a common CIS benchmark item); the
recipes of docs/roles-and-poolers.md must then still give the CI and operator roles what
their commands need."""

from __future__ import annotations

from typer.testing import CliRunner

from flowfix.cli import app
from flowfix.exitcodes import Exit
from tests.helpers import cli_env, sql
from tests.test_roles import Roles, roles, run  # noqa: F401 - the fixture


def test_the_recipes_work_where_public_may_not_create_temporary_tables(roles: Roles) -> None:  # noqa: F811
    admin, operator, ci = roles.admin, roles.operator, roles.ci
    sql(admin, "DO $$ BEGIN EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC', current_database()); END $$")
    run(ci, "backfill", "--dry-run", "--create-missing-masters")
    run(operator, "backfill", "--create-missing-masters")
    run(ci, "validate", expect=Exit.OK)


def test_a_role_that_may_not_create_temporary_tables_is_told_so(roles: Roles) -> None:  # noqa: F811
    admin, ci = roles.admin, roles.ci
    (me,) = sql(ci, "SELECT current_user AS u")
    sql(
        admin,
        "DO $$ BEGIN EXECUTE format('REVOKE TEMPORARY ON DATABASE %I FROM PUBLIC, %I', current_database(), "
        f"'{me['u']}'); END $$",
    )
    result = CliRunner().invoke(app, ["backfill", "--dry-run"], env=cli_env(ci))
    assert result.exit_code == Exit.USAGE
    assert "TEMPORARY on database" in result.stderr, result.stderr
