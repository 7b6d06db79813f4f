"""Nothing stored becomes code: the downgrade of fix_master_flow_fk rebuilds each FK it
restores from checked parts of the definition kept in ``flowfix_schema_changes`` (source
column, referenced table and column found in the catalog and quoted, MATCH / ON UPDATE /
ON DELETE rules from a fixed set, DEFERRABLE / INITIALLY DEFERRED, NOT VALID), never by
executing the stored text. A tampered row is refused in one line, exit 2, and the
database is left exactly as it was; every legitimate shape of FK comes back exactly
(``pg_get_constraintdef`` and ``convalidated`` compared)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from flowfix.cli import Exit, app
from flowfix.config import Settings
from tests import snapshot
from tests.conftest import downgrade, upgrade
from tests.helpers import cli_env, plain_url, revision, script, sql

runner = CliRunner()

FK_SQL = """SELECT cl.relname AS table_name, c.conname AS name, pg_get_constraintdef(c.oid) AS definition,
       c.convalidated AS validated
FROM pg_constraint c JOIN pg_class cl ON cl.oid = c.conrelid
WHERE c.contype = 'f' AND cl.relnamespace = current_schema()::regnamespace AND cl.relname NOT LIKE 'flowfix%'
ORDER BY 1, 2"""

#: (table, the FK it has before the upgrade): every option the rebuild must carry back
SHAPES = {
    "every-rule": (
        "data_imports",
        "REFERENCES crewai_flow_state_extensions (id) MATCH FULL ON UPDATE CASCADE ON DELETE SET NULL"
        " DEFERRABLE INITIALLY DEFERRED",
        True,
    ),
    "deferrable-not-valid": (
        "raw_import_records",
        "REFERENCES crewai_flow_state_extensions (id) ON DELETE RESTRICT DEFERRABLE",
        False,
    ),
    "set-default-quoted-name": (
        "discovery_flows",
        "REFERENCES crewai_flow_state_extensions (id) ON UPDATE SET DEFAULT ON DELETE CASCADE",
        True,
    ),
}


def _replace_fk(s: Settings, table: str, references: str, validated: bool, name: str) -> None:
    """Drop ``table``'s FKs on master_flow_id and add one named ``name`` with ``references``."""
    rows = sql(
        s,
        "SELECT conname FROM pg_constraint WHERE conrelid = CAST(:t AS regclass) AND contype = 'f'"
        " AND conkey = ARRAY[(SELECT attnum FROM pg_attribute WHERE attrelid = CAST(:t AS regclass)"
        " AND attname = 'master_flow_id')]",
        {"t": table},
    )
    for row in rows:
        script(s, f'ALTER TABLE {table} DROP CONSTRAINT "{row["conname"]}"')
    script(
        s,
        f'ALTER TABLE {table} ADD CONSTRAINT "{name}" FOREIGN KEY (master_flow_id) {references}'
        + ("" if validated else " NOT VALID"),
    )


@pytest.mark.parametrize("shape", list(SHAPES))
def test_the_downgrade_restores_each_kind_of_fk_exactly(settings: Settings, shape: str) -> None:
    upgrade(settings, "legacy")
    table, references, validated = SHAPES[shape]
    _replace_fk(settings, table, references, validated, "Prod FK" if "quoted" in shape else "prod_fk")
    before = sql(settings, FK_SQL)
    upgrade(settings, "fix_master_flow_fk")
    assert sql(settings, FK_SQL) != before  # it was replaced
    downgrade(settings, "legacy")
    assert sql(settings, FK_SQL) == before


TAMPERED = {
    "statement-after": "FOREIGN KEY (master_flow_id) REFERENCES crewai_flow_state_extensions(id); DROP TABLE canary; --",
    "in-the-rule": "FOREIGN KEY (master_flow_id) REFERENCES crewai_flow_state_extensions(id) ON DELETE CASCADE; DROP TABLE canary",
    "in-the-table": 'FOREIGN KEY (master_flow_id) REFERENCES canary(id); DROP TABLE canary; SELECT "x"(id)',
    "unknown-table": "FOREIGN KEY (master_flow_id) REFERENCES no_such_table(id)",
    "unknown-column": "FOREIGN KEY (master_flow_id) REFERENCES crewai_flow_state_extensions(no_such_column)",
    "other-column": "FOREIGN KEY (client_account_id) REFERENCES crewai_flow_state_extensions(id)",
    "check-instead": "CHECK ((SELECT count(*) FROM canary) >= 0)",
}


@pytest.mark.parametrize("how", list(TAMPERED))
def test_a_tampered_definition_is_refused_in_one_line_and_nothing_changes(settings: Settings, how: str) -> None:
    upgrade(settings, "legacy")
    _replace_fk(settings, "data_imports", "REFERENCES crewai_flow_state_extensions (id)", True, "prod_fk")
    upgrade(settings, "fix_master_flow_fk")
    script(settings, "CREATE TABLE canary (id int)")
    script(
        settings,
        "UPDATE flowfix_schema_changes SET definition = "
        + "'"
        + TAMPERED[how].replace("'", "''")
        + "' WHERE kind = 'foreign_key_replaced' AND table_name = 'data_imports'",
    )
    assert sql(settings, "SELECT count(*) AS n FROM flowfix_schema_changes WHERE kind = 'foreign_key_replaced'")[0]["n"]
    before = snapshot.fingerprint(plain_url(settings))
    result = runner.invoke(app, ["downgrade", "legacy"], env=cli_env(settings))
    lines = [line for line in result.stderr.splitlines() if line.startswith("flowfix: error")]
    assert result.exit_code == Exit.USAGE, result.output
    assert len(lines) == 1, result.stderr
    assert "flowfix_schema_changes" in lines[0] and "prod_fk" in lines[0], lines[0]
    assert "changed nothing" in lines[0]
    assert "Traceback" not in result.output
    assert sql(settings, "SELECT to_regclass('canary') IS NOT NULL AS here")[0]["here"]
    assert revision(settings) == "fix_master_flow_fk"
    assert snapshot.fingerprint(plain_url(settings)) == before
