"""Bad input, table-driven: each case gives exactly one line on stderr (``flowfix:
error: ...``), its documented exit code, and leaves the database identical (every row of
every table and the catalog, compared before and after). Bounds are checked before
anything runs; only ASCII digits count."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flowfix.cli import Exit, app
from flowfix.config import Settings
from tests import snapshot
from tests.conftest import shape_settings, upgrade
from tests.helpers import add_discovery_flow, add_import, add_master, add_record, cli_env, plain_url
from tests.shapes import SHAPES

runner = CliRunner()
U = str(uuid.uuid4())
BIG = str(10**20)


@dataclass(frozen=True)
class Case:
    id: str
    args: list[str]
    expect: str
    env: dict[str, str] = field(default_factory=dict)  # "{url}" stands for the test database's URL
    code: int = Exit.USAGE
    #: a refusal after a revision started: its progress lines (INFO) come first, the error last
    progress: bool = False


def url_case(id: str, url: str, expect: str) -> Case:
    return Case(id, ["status"], expect, {"DATABASE_URL": url})


CASES = [
    # --- DATABASE_URL ---------------------------------------------------------------------
    url_case("url-mysql", "mysql://u:pw@h/d", "must be a PostgreSQL URL"),
    url_case("url-not-a-url", "not a url", "DATABASE_URL is not a URL"),
    url_case("url-port-letters", "postgresql://u:pw@h:abc/d", "a port that is not a number from 1 to 65535"),
    url_case("url-port-too-big", "postgresql://u:pw@h:99999/d", "a port that is not a number"),
    url_case("url-port-zero", "postgresql://u:pw@h:0/d", "a port that is not a number"),
    url_case("url-port-arabic", "postgresql://u:pw@h:٥٤٣٢/d", "is not a number from 1 to 65535"),
    # libpq's grammar (tests/test_url_grammar.py compares with libpq itself); none of these
    # errors may show a piece of the authority ("pw" is checked below, "s3" here)
    url_case(
        "url-password-bad-percent", "postgresql://u:s3%zz@h/d", "a '%' not followed by two hex digits in its password"
    ),
    url_case("url-password-percent-00", "postgresql://u:s3%00@h/d", "%00 in its password"),
    url_case("url-password-space", "postgresql://u:s3 x@h/d", "unencoded space in its password"),
    url_case("url-password-not-utf8", "postgresql://u:s3%E9@h/d", "not UTF-8 in its password"),
    url_case("url-password-slash", "postgresql://u:s3/x@h:5432/d", "unencoded '/' before its '@'"),
    url_case("url-password-as-port", "postgresql://u:s3@h:5432:77/d", "a port that is not a number"),
    url_case("url-query-password-equals", "postgresql://u@h/d?password=s3=x", "malformed query string"),
    url_case("url-ipv6-unclosed", "postgresql://u:s3@[::1/d", "IPv6 host without its closing ']'"),
    url_case("url-ipv6-trailing", "postgresql://u:s3@[::1]x/d", "after an IPv6 host's ']'"),
    url_case("url-hosts-some-ports", "postgresql://u:s3@h1:5432,h2/d", "a port for some hosts and not others"),
    url_case("url-hosts-empty", "postgresql://u:s3@h1,,h2/d", "an empty host in its list of hosts"),
    url_case("url-sslmode", "postgresql://u:pw@h/d?sslmode=bogus", "sslmode 'bogus' must be one of"),
    url_case("url-unknown-param", "postgresql://u:pw@h/d?frobnicate=1", "parameter 'frobnicate' is not supported"),
    url_case("url-param-twice", "postgresql://u:pw@h/d?sslmode=require&sslmode=disable", "is given twice"),
    url_case("url-connect-timeout", "postgresql://u:pw@h/d?connect_timeout=abc", "connect_timeout 'abc' must be"),
    url_case("url-connect-timeout-0", "postgresql://u:pw@h/d?connect_timeout=0", "connect_timeout '0' must be"),
    url_case("url-options", "postgresql://u:pw@h/d?options=-x", "options: '-x' is not a -c name=value"),
    url_case("url-options-quote", "postgresql://u:pw@h/d?options=-c%20a%3D%27b", "options is not a valid list"),
    url_case("url-malformed-query", "postgresql://u:pw@h/d?sslmode", "malformed query string"),
    url_case(
        "url-unreachable", "postgresql://u:pw@127.0.0.1:1/d", "cannot connect to postgresql://u:***@127.0.0.1:1/d"
    ),
    Case("url-no-database", ["status"], "does not exist: check the database name", {"DATABASE_URL": "{url_no_db}"}),
    Case("url-no-role", ["status"], "the server refused the login", {"DATABASE_URL": "{url_no_role}"}),
    Case("url-unset", ["status"], "DATABASE_URL is not set", {"DATABASE_URL": ""}),
    # --- FLOWFIX_SCHEMA --------------------------------------------------------------------
    *(
        Case(f"schema-{name}", ["status"], expect, {"FLOWFIX_SCHEMA": value})
        for name, value, expect in (
            ("quoted", "Bad-Name", "is not a plain identifier"),
            ("catalog", "pg_catalog", "is a PostgreSQL system schema"),
            ("information", "information_schema", "is a PostgreSQL system schema"),
            ("toast", "pg_toast", "is a PostgreSQL system schema"),
            ("long", "a" * 64, "is not a plain identifier"),
            ("empty", "", "is not a plain identifier"),
            ("space", "mig ration", "is not a plain identifier"),
            ("arabic-digit", "m٢", "is not a plain identifier"),
            ("missing", "nope", "schema 'nope' has no table crewai_flow_state_extensions"),
            ("elsewhere", "public", "schema migration has it: set FLOWFIX_SCHEMA"),
        )
    ),
    # --- settings --------------------------------------------------------------------------
    *(
        Case(f"lock-timeout-{name}", ["backfill"], "FLOWFIX_LOCK_TIMEOUT", {"FLOWFIX_LOCK_TIMEOUT": value})
        for name, value in (
            ("huge", "99999999s"),
            ("word", "forever"),
            ("zero", "0s"),
            ("minutes", "5m"),
            ("over-bound", "601s"),
            ("negative", "-1s"),
            ("arabic", "٢s"),
        )
    ),
    *(
        Case(f"lock-retries-{name}", ["backfill"], "FLOWFIX_LOCK_RETRIES", {"FLOWFIX_LOCK_RETRIES": value})
        for name, value in (("negative", "-1"), ("word", "abc"), ("over-bound", "101"), ("arabic", "١"))
    ),
    # --- --window --------------------------------------------------------------------------
    *(
        Case(f"window-{name}", ["backfill", "--window", value], expect)
        for name, value, expect in (
            ("arabic", "٢h", "is not a duration"),
            ("zero", "0", "is not a duration"),
            ("negative", "-2h", "is not a duration"),
            ("words", "2 fortnights", "is not a duration"),
            ("zero-seconds", "0s", "must be longer than zero"),
            ("too-long", "400d", "longer than a year"),
            ("bare-iso", "PT", "is not a duration"),
            ("empty", "", "is not a duration"),
            ("exponent", "1e3s", "is not a duration"),
            ("huge-digits", "9" * 30 + "s", "is not a duration"),
        )
    ),
    # --- UUID options and run ids ----------------------------------------------------------
    Case("backfill-client-not-uuid", ["backfill", "--client-account", "x"], "--client-account 'x' is not a UUID"),
    Case("backfill-engagement-not-uuid", ["backfill", "--engagement", "123"], "--engagement '123' is not a UUID"),
    Case("validate-client-empty", ["validate", "--client-account", ""], "--client-account '' is not a UUID"),
    Case("link-import-not-uuid", ["link", "--import", "x", "--flow", U], "--import 'x' is not a UUID"),
    Case("link-flow-not-uuid", ["link", "--import", U, "--flow", "y"], "--flow 'y' is not a UUID"),
    Case(
        "link-unknown-import", ["link", "--import", U, "--flow", str(uuid.uuid4())], f"data import {U} does not exist"
    ),
    Case("undo-not-uuid", ["undo", "notauuid"], "RUN_ID 'notauuid' is not a UUID"),
    Case("undo-unknown-run", ["undo", U], f"no flowfix run with id {U}"),
    # --- sizes and limits ------------------------------------------------------------------
    Case("batch-size-zero", ["backfill", "--batch-size", "0"], "--batch-size"),
    Case("batch-size-huge", ["backfill", "--batch-size", BIG], "--batch-size"),
    Case("batch-size-over-bound", ["backfill", "--batch-size", "1000001"], "--batch-size 1000001 is larger than"),
    Case("batch-size-negative", ["backfill", "--batch-size", "-5"], "--batch-size"),
    Case("batch-size-word", ["backfill", "--batch-size", "abc"], "--batch-size"),
    Case("samples-huge", ["validate", "--samples", BIG], "--samples"),
    Case("samples-over-bound", ["validate", "--samples", "10001"], "--samples 10001 is larger than"),
    Case("samples-negative", ["validate", "--samples", "-1"], "--samples"),
    Case("max-orphans-negative", ["validate", "--max-orphans", "-1"], "--max-orphans"),
    Case("runs-limit-zero", ["runs", "--limit", "0"], "--limit"),
    Case("runs-limit-huge", ["runs", "--limit", BIG], "--limit"),
    Case("demo-size-small", ["demo", "--size", "5"], "--size"),
    # --- output paths ----------------------------------------------------------------------
    Case("output-missing-dir", ["validate", "--output", "/nonexistent-dir/v.xml"], "does not exist"),
    Case("output-is-dir", ["validate", "--output", "{tmp}"], "is a directory"),
    Case("report-missing-dir", ["backfill", "--report", "/nonexistent-dir/r.json"], "does not exist"),
    Case("report-is-dir", ["backfill", "--report", "{tmp}"], "is a directory"),
    # --- formats and choices ---------------------------------------------------------------
    Case(
        "validate-format",
        ["validate", "--format", "yaml"],
        "Invalid value for '--format': 'yaml' is not one of 'text', 'json', 'junit', 'openmetrics'",
    ),
    Case(
        "backfill-format",
        ["backfill", "--format", "xml"],
        "Invalid value for '--format': 'xml' is not one of 'text', 'json'",
    ),
    Case(
        "fail-on",
        ["validate", "--fail-on", "never"],
        "Invalid value for '--fail-on': 'never' is not one of 'error', 'warn'",
    ),
    # --- revisions -------------------------------------------------------------------------
    Case("upgrade-unknown", ["upgrade", "nope"], "Can't locate revision identified by 'nope'"),
    Case("downgrade-unknown", ["downgrade", "nope"], "Can't locate revision identified by 'nope'"),
    Case("downgrade-missing-argument", ["downgrade"], "Missing argument"),
    Case("upgrade-range-online", ["upgrade", "legacy:head"], "Range revision not allowed"),
    # --- commands and options --------------------------------------------------------------
    Case("unknown-command", ["frobnicate"], "No such command 'frobnicate'"),
    Case("unknown-option", ["backfill", "--frobnicate"], "No such option: --frobnicate"),
    Case("link-missing-option", ["link", "--import", U], "Missing option '--flow'"),
    Case("enforce-refused", ["upgrade", "head"], "discovery_flows rows still have master_flow_id NULL", progress=True),
]


@pytest.fixture(scope="module")
def database(pg_server: str, shape_template: Callable[..., str]) -> Iterator[Settings]:
    """One production-shaped database (H) at fix_master_flow_fk, with orphans of each kind."""
    for s in shape_settings(pg_server, shape_template, SHAPES["app_head"]):
        upgrade(s, "fix_master_flow_fk")
        c, e = uuid.uuid4(), uuid.uuid4()
        add_master(s, client=c, engagement=e)
        imp = add_import(s, master=None, client=c, engagement=e)
        add_record(s, data_import=imp, master=None)
        add_discovery_flow(s, flow_id=uuid.uuid4(), master=None, client=c, engagement=e)
        yield s


def test_there_are_at_least_sixty_cases() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_its_exit_code_and_changes_nothing(
    database: Settings, case: Case, tmp_path: Path
) -> None:
    url = plain_url(database)
    values = {
        "url": url,
        "tmp": str(tmp_path),
        "url_no_db": plain_url(Settings(url=database.require_url().set(database="no_such_database"))),
        "url_no_role": plain_url(Settings(url=database.require_url().set(username="no_such_role"))),
    }
    env = {**cli_env(database), **{k: v.format(**values) for k, v in case.env.items()}}
    args = [a.format(**values) for a in case.args]
    before = snapshot.fingerprint(url)
    result = runner.invoke(app, args, env=env)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if case.progress:
        assert not any(line.startswith("flowfix: error") for line in lines[:-1]), result.stderr
        lines = lines[-1:]
    assert result.exit_code == case.code, result.output
    assert len(lines) == 1 and lines[0].startswith("flowfix: error: "), result.stderr
    assert case.expect in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert "pw@" not in result.output  # no password, in any position
    if case.id.startswith("url-"):
        assert "s3" not in result.output  # no piece of the authority either
    assert snapshot.fingerprint(url) == before
