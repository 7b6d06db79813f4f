"""flowfix's own tables are private to their owner: whatever PUBLIC or the schema's
default privileges (ALTER DEFAULT PRIVILEGES ... GRANT) gave them is taken back when
they are created, and by a revision on databases that had them before; a grant a DBA
made explicitly (the role recipes) stays."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest

from flowfix.config import Settings
from flowfix.privileges import FLOWFIX_TABLES
from tests.conftest import downgrade, upgrade
from tests.helpers import sql

#: flowfix's tables and the sequences of their identity columns.
OURS_SQL = """
SELECT c.relname, COALESCE(c.relacl::text, '') AS acl FROM pg_class c
WHERE c.relnamespace = to_regnamespace(current_schema())
  AND (c.relname LIKE 'flowfix%' AND c.relkind IN ('r', 'S'))
ORDER BY 1
"""


@pytest.fixture
def defaults(make_shape: Callable[..., Settings]) -> Iterator[tuple[Settings, str, str]]:
    """A raw deployed shape whose schema's default privileges grant every new table and
    sequence to PUBLIC and SELECT on tables to an application role (as shops set them);
    and a role that the DBA grants to by hand (not through the defaults)."""
    s = make_shape("deployed", revision=None)
    tag = uuid.uuid4().hex[:8]
    app_reader, granted = f"ff{tag}_reader", f"ff{tag}_granted"
    for statement in (
        f"CREATE ROLE {app_reader} NOLOGIN",
        f"CREATE ROLE {granted} NOLOGIN",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s.schema} GRANT ALL ON TABLES TO PUBLIC",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s.schema} GRANT ALL ON SEQUENCES TO PUBLIC",
        f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s.schema} GRANT SELECT ON TABLES TO {app_reader}",
    ):
        sql(s, statement)
    try:
        yield s, app_reader, granted
    finally:
        for statement in (
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s.schema} REVOKE ALL ON TABLES FROM PUBLIC, {app_reader}",
            f"ALTER DEFAULT PRIVILEGES IN SCHEMA {s.schema} REVOKE ALL ON SEQUENCES FROM PUBLIC",
            f"DROP OWNED BY {app_reader}, {granted}",
            f"DROP ROLE {app_reader}, {granted}",
        ):
            sql(s, statement)


def grantees(acl: str) -> set[str]:
    """Who holds a privilege in an ACL's text form (``=r/owner`` is PUBLIC)."""
    return {item.split("=", 1)[0] or "PUBLIC" for item in acl.strip("{}").split(",") if item}


def test_flowfix_tables_get_nothing_from_default_privileges(defaults: tuple[Settings, str, str]) -> None:
    s, app_reader, _ = defaults
    upgrade(s, "fix_master_flow_fk")
    ours = {r["relname"]: grantees(r["acl"]) for r in sql(s, OURS_SQL)}
    assert set(FLOWFIX_TABLES) <= set(ours)
    assert any(name.endswith("_seq") for name in ours)  # the identity sequences are covered too
    for name, holders in ours.items():
        assert "PUBLIC" not in holders and app_reader not in holders, (name, holders)
    # the defaults themselves are the schema's business: a new application table still gets them
    sql(s, "CREATE TABLE app_later (id int)")
    later = sql(s, "SELECT relacl::text AS acl FROM pg_class WHERE oid = to_regclass('app_later')")[0]["acl"]
    assert {"PUBLIC", app_reader} <= grantees(later)


def test_a_revision_takes_back_default_grants_on_databases_that_had_them(
    defaults: tuple[Settings, str, str],
) -> None:
    """A database flowfix set up before: its tables carry what the defaults granted (given
    here by hand, as the defaults did then), and a DBA's own grant."""
    s, app_reader, granted = defaults
    upgrade(s, "enforce_master_flow_not_null")
    tables = ", ".join(FLOWFIX_TABLES)
    sql(s, f"GRANT ALL ON {tables} TO PUBLIC")
    sql(s, f"GRANT SELECT ON {tables} TO {app_reader}")
    sql(s, f"GRANT ALL ON ALL SEQUENCES IN SCHEMA {s.schema} TO PUBLIC")
    sql(s, f"GRANT SELECT ON flowfix_runs, flowfix_changes TO {granted}")
    upgrade(s, "head")
    ours = {r["relname"]: grantees(r["acl"]) for r in sql(s, OURS_SQL)}
    for name, holders in ours.items():
        assert "PUBLIC" not in holders and app_reader not in holders, (name, holders)
    assert granted in ours["flowfix_runs"] and granted in ours["flowfix_changes"]
    before = sql(s, OURS_SQL)
    upgrade(s, "head")  # nothing left to revoke: the same
    downgrade(s, "enforce_master_flow_not_null")  # the downgrade leaves privileges alone
    assert sql(s, OURS_SQL) == before
