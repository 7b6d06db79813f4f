"""flowfix validate: each check planted exactly once, counted exactly, sampled in id order."""

from __future__ import annotations

import dataclasses
import json
import uuid
from xml.etree import ElementTree as ET

import pytest
from typer.testing import CliRunner

from flowfix import catalog
from flowfix import validate as v
from flowfix.alembic_runner import head
from flowfix.cli import app
from flowfix.config import Settings, normalize_url
from flowfix.db import run_with_engine
from tests.conftest import upgrade
from tests.helpers import (
    add_discovery_flow,
    add_import,
    add_master,
    add_record,
    cli_env,
    plain_url,
    script,
    sql,
    with_catalog,
)

A_C, A_E = uuid.uuid4(), uuid.uuid4()  # tenant A
B_C, B_E = uuid.uuid4(), uuid.uuid4()  # tenant B
runner = CliRunner()


@pytest.fixture
def settings(shaped: Settings) -> Settings:
    """Every validate test runs on each production shape (tests/shapes), from legacy."""
    return shaped


def run_validate(s: Settings, **options: object) -> v.Report:
    return run_with_engine(s, lambda engine: v.validate(engine, s, v.Options(**options)))  # type: ignore[arg-type]


def linked_flow(s: Settings, client: uuid.UUID = A_C, engagement: uuid.UUID = A_E, records: int = 2) -> dict:
    """A master with its import, records and discovery flow, all linked as they should be."""
    _, flow = add_master(s, client=client, engagement=engagement)
    imp = add_import(s, master=flow, client=client, engagement=engagement)
    recs = [add_record(s, data_import=imp, master=flow, row=n) for n in range(records)]
    disc = add_discovery_flow(s, flow_id=flow, master=flow, client=client, engagement=engagement, data_import=imp)
    return {"flow": flow, "import": imp, "records": recs, "discovery": disc}


def statuses(report: v.Report) -> dict[str, str]:
    return {c.name: c.status for c in report.checks}


def test_a_clean_database_at_head_passes_every_check(settings: Settings) -> None:
    upgrade(settings, "head")
    for _ in range(3):
        linked_flow(settings)
    report = run_validate(settings)
    assert set(statuses(report).values()) == {"pass"}
    assert [c.name for c in report.checks] == list(v.CHECK_ORDER)
    assert report.ok and report.revision == head()


def test_orphans_are_counted_per_table_and_sampled_in_id_order(settings: Settings) -> None:
    upgrade(settings, "fix_master_flow_fk")
    linked_flow(settings)
    imports = sorted(add_import(settings, master=None, client=A_C, engagement=A_E) for _ in range(3))
    records = sorted(add_record(settings, data_import=imports[0], master=None, row=n) for n in range(7))
    disc = add_discovery_flow(settings, flow_id=uuid.uuid4(), master=None, client=A_C, engagement=A_E)

    report = run_validate(settings, samples=5)
    assert (report.check("data_imports.orphaned").count, report.check("data_imports.orphaned").samples) == (
        3,
        [str(i) for i in imports],
    )
    assert (report.check("raw_import_records.orphaned").count, report.check("raw_import_records.orphaned").samples) == (
        7,
        [str(r) for r in records[:5]],
    )
    assert (report.check("discovery_flows.orphaned").count, report.check("discovery_flows.orphaned").samples) == (
        1,
        [str(disc)],
    )
    assert statuses(report)["data_imports.orphaned"] == "fail" and not report.ok
    # A known backlog can be accepted; the rest of the report is unchanged.
    accepted = run_validate(settings, max_orphans=7)
    assert {n: s for n, s in statuses(accepted).items() if n.endswith(".orphaned")} == {
        "data_imports.orphaned": "warn",
        "raw_import_records.orphaned": "warn",
        "discovery_flows.orphaned": "warn",
    }
    assert accepted.ok
    assert not run_validate(settings, max_orphans=6).ok  # 7 records > 6


def test_dangling_values_are_found_while_the_fk_is_missing(settings: Settings) -> None:
    upgrade(settings, "fix_master_flow_fk")
    linked_flow(settings)
    (fk,) = with_catalog(settings, catalog.foreign_keys, "data_imports", "master_flow_id")  # named per shape
    script(settings, f'ALTER TABLE data_imports DROP CONSTRAINT "{fk.name}"')
    ghost = uuid.uuid4()
    bad = sorted(add_import(settings, master=ghost, client=A_C, engagement=A_E) for _ in range(2))
    report = run_validate(settings)
    assert report.check("data_imports.dangling").count == 2
    assert report.check("data_imports.dangling").samples == [str(b) for b in bad]
    assert report.check("raw_import_records.dangling").count == 0
    assert report.check("fk.data_imports").status == "fail"
    assert "no foreign key" in report.check("fk.data_imports").message
    assert report.check("fk.raw_import_records").status == "pass"


def test_cross_tenant_links_always_fail_even_with_a_backlog_accepted(settings: Settings) -> None:
    upgrade(settings, "fix_master_flow_fk")
    a = linked_flow(settings, A_C, A_E)
    b = linked_flow(settings, B_C, B_E)
    leak_import = add_import(settings, master=b["flow"], client=A_C, engagement=A_E)  # A's import -> B's master
    leak_record = add_record(settings, data_import=a["import"], master=a["flow"], row=9)
    sql(settings, "UPDATE raw_import_records SET engagement_id = :e WHERE id = :r", {"e": B_E, "r": leak_record})
    report = run_validate(settings, max_orphans=100)
    check = report.check("tenant_mismatch")
    assert (check.status, check.count) == ("fail", 2)
    assert sorted(check.samples) == sorted([f"data_imports:{leak_import}", f"raw_import_records:{leak_record}"])
    assert not report.ok


def test_record_import_disagreement_and_discovery_identity(settings: Settings) -> None:
    upgrade(settings, "fix_master_flow_fk")
    a = linked_flow(settings)
    other = linked_flow(settings)
    sql(
        settings,
        "UPDATE raw_import_records SET master_flow_id = :f WHERE id = :r",
        {"f": other["flow"], "r": a["records"][0]},
    )
    sql(
        settings,
        "UPDATE discovery_flows SET master_flow_id = :f WHERE id = :d",
        {"f": other["flow"], "d": a["discovery"]},
    )
    report = run_validate(settings)
    assert (report.check("record_import_disagreement").count, report.check("record_import_disagreement").samples) == (
        1,
        [str(a["records"][0])],
    )
    assert (report.check("discovery_flow_identity").status, report.check("discovery_flow_identity").count) == (
        "warn",
        1,
    )
    assert report.check("discovery_flow_identity").samples == [str(a["discovery"])]
    assert not dataclasses.replace(report, fail_on="warn").ok


def test_legacy_schema_reports_the_wrong_fk_targets_and_no_fanout_on_duplicate_flow_ids(
    empty_settings: Settings,
) -> None:
    settings = empty_settings  # the friendly shape: shape H forbids duplicate flow_ids
    upgrade(settings, "legacy")
    m, flow = add_master(settings, client=A_C, engagement=A_E)
    sql(
        settings,
        "INSERT INTO crewai_flow_state_extensions (flow_id, client_account_id, engagement_id, flow_type)"
        " VALUES (:f, :c, :e, 'discovery')",
        {"f": flow, "c": A_C, "e": A_E},
    )  # duplicate flow_id
    script(settings, "ALTER TABLE data_imports DROP CONSTRAINT data_imports_master_flow_id_fkey")
    add_import(settings, master=flow, client=B_C, engagement=B_E)  # cross-tenant, to a duplicated flow_id
    add_import(settings, master=m, client=A_C, engagement=A_E)  # an id, as legacy stores it
    report = run_validate(settings)
    assert report.check("tenant_mismatch").count == 1  # not 2: the duplicate does not multiply rows
    assert report.check("data_imports.dangling").count == 1
    assert report.check("fk.raw_import_records").message.startswith(
        "raw_import_records_master_flow_id_fkey -> crewai_flow_state_extensions(id)"
    )
    assert (report.check("revision").status, report.check("revision").message) == (
        "warn",
        f"at legacy; head is {head()}",
    )


def _reader(settings: Settings) -> tuple[Settings, str]:
    role = f"flowfix_reader_{uuid.uuid4().hex[:8]}"
    script(
        settings,
        f"CREATE ROLE {role} LOGIN PASSWORD 'reader-pw'",
        f"GRANT USAGE ON SCHEMA {settings.schema} TO {role}",
        f"GRANT SELECT ON ALL TABLES IN SCHEMA {settings.schema} TO {role}",
    )
    url = normalize_url(plain_url(settings)).set(username=role, password="reader-pw")
    return dataclasses.replace(settings, url=url), role


def _drop_role(settings: Settings, role: str) -> None:
    script(settings, f"DROP OWNED BY {role}", f"DROP ROLE {role}")


def test_a_select_only_role_can_validate_and_rls_is_detected(settings: Settings) -> None:
    upgrade(settings, "head")
    linked_flow(settings)
    hidden = linked_flow(settings, B_C, B_E)
    reader, role = _reader(settings)
    try:
        enabled = [
            r["relname"]
            for r in sql(
                settings,
                "SELECT relname FROM pg_class WHERE relrowsecurity"
                " AND relnamespace = to_regnamespace(current_schema())"
                " ORDER BY 1",
            )
        ]
        if enabled:
            # shape H: RLS is on for three tables, with no policy for this role: it sees
            # none of their rows, and validate says so instead of passing on partial counts
            report = run_validate(reader)
            assert (report.check("rls_visibility").status, report.check("rls_visibility").samples) == ("fail", enabled)
            assert not report.ok
            assert run_validate(settings).check("rls_visibility").status == "pass"
            return
        report = run_validate(reader)
        assert report.ok and report.revision == head()
        with pytest.raises(Exception, match="permission denied"):
            sql(reader, "DELETE FROM data_imports")

        script(
            settings,
            "ALTER TABLE data_imports ENABLE ROW LEVEL SECURITY",
            f"CREATE POLICY only_a ON data_imports FOR SELECT TO {role} USING (client_account_id = '{A_C}')",
        )
        # The role now sees one import; the report says its counts may be partial.
        assert sql(reader, "SELECT count(*) AS n FROM data_imports") == [{"n": 1}]
        report = run_validate(reader)
        rls = report.check("rls_visibility")
        assert (rls.status, rls.samples) == ("fail", ["data_imports"]) and not report.ok
        allowed = run_validate(reader, allow_rls=True)
        assert allowed.check("rls_visibility").status == "warn"
        # Why RLS fails by default: the role sees tenant B's records but not their import,
        # so those records look as if they disagreed with it.
        assert allowed.check("record_import_disagreement").count == len(hidden["records"])
        # The owner (who bypasses RLS without FORCE) sees everything: no finding.
        assert run_validate(settings).check("rls_visibility").status == "pass"
    finally:
        _drop_role(settings, role)


def test_scope_restricts_counts_to_one_tenant(settings: Settings) -> None:
    upgrade(settings, "fix_master_flow_fk")
    add_import(settings, master=None, client=A_C, engagement=A_E)
    add_import(settings, master=None, client=B_C, engagement=B_E)
    add_import(settings, master=None, client=B_C, engagement=A_E)
    assert run_validate(settings).check("data_imports.orphaned").count == 3
    assert run_validate(settings, client_account=B_C).check("data_imports.orphaned").count == 2
    assert run_validate(settings, client_account=B_C, engagement=B_E).check("data_imports.orphaned").count == 1


# --- CLI ------------------------------------------------------------------------------


def test_cli_exit_codes_json_and_junit(settings: Settings, tmp_path) -> None:
    upgrade(settings, "head")
    linked_flow(settings)
    ok = runner.invoke(app, ["validate", "--format", "json"], env=cli_env(settings))
    assert ok.exit_code == 0, ok.output
    body = json.loads(ok.stdout)
    assert body["ok"] is True and body["revision"] == head()
    assert set(body["checks"][0]) == {"name", "status", "count", "samples", "message"}

    a = linked_flow(settings)
    sql(settings, "UPDATE data_imports SET client_account_id = :c WHERE id = :i", {"c": B_C, "i": a["import"]})
    out = tmp_path / "validate.xml"
    bad = runner.invoke(app, ["validate", "--format", "junit", "--output", str(out)], env=cli_env(settings))
    assert bad.exit_code == 1
    suite = ET.parse(out).getroot()
    failed = [case.get("name") for case in suite.iter("testcase") if case.find("failure") is not None]
    assert failed == ["tenant_mismatch"]
    assert suite.get("tests") == str(len(v.CHECK_ORDER)) and suite.get("failures") == "1"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--client-account", "not-a-uuid"], "--client-account 'not-a-uuid' is not a UUID"),
        (
            ["--format", "yaml"],
            "Invalid value for '--format': 'yaml' is not one of 'text', 'json', 'junit', 'openmetrics'.",
        ),
        (["--fail-on", "never"], "Invalid value for '--fail-on': 'never' is not one of 'error', 'warn'."),
    ],
)
def test_cli_bad_options_exit_2_with_one_line(args: list[str], message: str, empty_settings: Settings) -> None:
    result = runner.invoke(app, ["validate", *args], env=cli_env(empty_settings))
    assert result.exit_code == 2
    assert result.stderr.strip() == f"flowfix: error: {message}"


def test_cli_wrong_schema_is_exit_2(empty_settings: Settings) -> None:
    result = runner.invoke(app, ["validate"], env=cli_env(empty_settings))
    assert result.exit_code == 2
    assert "schema 'public' has no table crewai_flow_state_extensions" in result.stderr


def test_status_names_the_next_runbook_step(settings: Settings) -> None:
    upgrade(settings, "legacy")
    result = runner.invoke(app, ["status"], env=cli_env(settings))
    assert result.exit_code == 0, result.output
    assert "next step: flowfix upgrade fix_master_flow_fk" in result.stdout
    upgrade(settings, "fix_master_flow_fk")
    add_import(settings, master=None, client=A_C, engagement=A_E)
    result = runner.invoke(app, ["status"], env=cli_env(settings))
    assert "next step: flowfix backfill --dry-run" in result.stdout
    assert "data_imports        orphaned         1" in result.stdout
