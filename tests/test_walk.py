"""The one walker (flowfix/walk.py) on the revisions' translation (issue 19, item 4): an
application UPDATE of any column moves a row past the walk's planned end mid-walk; the
closing pass translates it, online and in the ``--sql`` DO block, on every runbook shape.
The move is made deterministic by a statement trigger that fires once, after the walk's
first batch, and moves one row that the walk has not reached yet."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Callable

import pytest
from typer.testing import CliRunner

from flowfix import revision_helpers, walk
from flowfix.cli import app
from flowfix.config import Settings
from tests.conftest import upgrade
from tests.helpers import add_import, add_master, add_record, cli_env, plain_url, position_column, revision, script, sql

C, E = uuid.uuid4(), uuid.uuid4()

#: After the first UPDATE statement on raw_import_records (the walk's first batch), once:
#: an application's UPDATE of a column other than master_flow_id moves the target row
#: (its page is full, so the new version goes where this session last wrote: past the end).
MOVE_ONCE = """
CREATE TABLE walk_test_moved (id uuid, page bigint)

CREATE FUNCTION walk_test_move_once() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM walk_test_moved) THEN
    INSERT INTO walk_test_moved VALUES ('{target}', NULL);
    UPDATE raw_import_records SET {position} = {position} WHERE id = '{target}';
    UPDATE walk_test_moved SET page = (SELECT (ctid::text::point)[0] FROM raw_import_records WHERE id = '{target}');
  END IF;
  RETURN NULL;
END $f$

CREATE TRIGGER walk_test_move_once AFTER UPDATE ON raw_import_records
  FOR EACH STATEMENT EXECUTE FUNCTION walk_test_move_once();
"""


def planted(s: Settings, records: int = 600) -> tuple[uuid.UUID, uuid.UUID, int]:
    """At legacy: ``records`` records linked the old way (the master's id) over many full
    pages, and the trigger armed on a row of the next-to-last page. Returns the master's
    id and flow_id, and the table's pages when the walk begins."""
    upgrade(s, "legacy")
    master, flow = add_master(s, client=C, engagement=E)
    imp = add_import(s, master=None, client=C, engagement=E)
    add_record(s, data_import=imp, master=master)
    position = position_column(s)
    sql(s, "ALTER TABLE raw_import_records SET (autovacuum_enabled = false)")
    sql(
        s,
        "INSERT INTO raw_import_records SELECT (jsonb_populate_record(NULL::raw_import_records, to_jsonb(r)"
        f" || jsonb_build_object('id', gen_random_uuid(), '{position}', g))).*"
        " FROM generate_series(1, :n) g CROSS JOIN LATERAL (SELECT * FROM raw_import_records LIMIT 1) r",
        {"n": records - 1},
    )
    pages = int(sql(s, "SELECT pg_relation_size('raw_import_records') / 8192 AS n")[0]["n"])
    assert pages >= min(8, records // 60)  # many batches of 2 pages
    target = sql(
        s,
        "SELECT id FROM raw_import_records WHERE (ctid::text::point)[0] = GREATEST(:p, 0) ORDER BY ctid DESC LIMIT 1",
        {"p": pages - 2},
    )[0]["id"]
    script(s, *MOVE_ONCE.format(target=target, position=position).split("\n\n"))
    return master, flow, pages


def assert_moved_past_the_end_and_translated(s: Settings, flow: uuid.UUID, pages: int) -> None:
    moved = sql(s, "SELECT id, page FROM walk_test_moved")
    assert len(moved) == 1 and moved[0]["page"] is not None
    assert moved[0]["page"] >= pages  # the precondition: a page the walk planned never to read
    values = {r["master_flow_id"] for r in sql(s, "SELECT master_flow_id FROM raw_import_records")}
    assert values == {flow}
    logged = sql(
        s,
        "SELECT new_value FROM flowfix_translations WHERE table_name = 'raw_import_records' AND row_id = :id",
        {"id": moved[0]["id"]},
    )
    assert [r["new_value"] for r in logged] == [flow]
    fks = sql(
        s,
        "SELECT convalidated FROM pg_constraint WHERE conrelid = to_regclass('raw_import_records') AND contype = 'f'"
        " AND conname = 'fk_raw_import_records_master_flow_id'",
    )
    assert fks == [{"convalidated": True}]


#: The runbook shapes whose records FK references the master's id at legacy (app_head's
#: references flow_id already: no record there can hold a value to translate).
TRANSLATED_SHAPES = ("friendly", "deployed", "between")


def small_batches_by(monkeypatch: pytest.MonkeyPatch, by: str, s: Settings) -> tuple[uuid.UUID, int]:
    """The revision walks in batches of 2 pages or 50 keys (``by`` "key": as on a server
    without TID Range Scans), over the planted rows; returns (flow, pages)."""
    monkeypatch.setattr(revision_helpers, "BATCH_PAGES", 2)
    monkeypatch.setattr(revision_helpers, "BATCH_ROWS", 50)
    if by == "key":
        monkeypatch.setattr(walk, "TID_RANGE_SCAN_VERSION", 10**9)
    _, flow, pages = planted(s)
    return flow, pages


@pytest.mark.parametrize("shape", TRANSLATED_SHAPES)
@pytest.mark.parametrize("by", ["pages", "key"])
def test_a_row_the_application_moves_mid_walk_is_translated_by_the_closing_pass_online(
    make_shape: Callable[..., Settings], shape: str, by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = make_shape(shape)
    flow, pages = small_batches_by(monkeypatch, by, s)
    upgrade(s, "fix_master_flow_fk")
    assert revision(s) == "fix_master_flow_fk"
    assert_moved_past_the_end_and_translated(s, flow, pages)


@pytest.mark.parametrize("shape", TRANSLATED_SHAPES)
@pytest.mark.parametrize("by", ["pages", "key"])
def test_a_row_the_application_moves_mid_walk_is_translated_by_the_closing_pass_in_the_sql_do_block(
    make_shape: Callable[..., Settings], shape: str, by: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = make_shape(shape)
    flow, pages = small_batches_by(monkeypatch, by, s)
    printed = CliRunner().invoke(app, ["upgrade", "legacy:fix_master_flow_fk", "--sql"], env=cli_env(s))
    assert printed.exit_code == 0, printed.output
    ran = subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", plain_url(s)],
        input=printed.stdout,
        capture_output=True,
        text=True,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    assert revision(s) == "fix_master_flow_fk"
    assert_moved_past_the_end_and_translated(s, flow, pages)


#: After the walks and their closing passes (at step 5's last index build, which commits),
#: once: a session that bypasses the new FK (session_replication_role = replica) writes
#: a value that is no flow_id, which VALIDATE then finds.
BREAK_BEFORE_VALIDATE = [
    "CREATE TABLE walk_test_broken (id uuid)",
    """CREATE FUNCTION walk_test_break() RETURNS event_trigger LANGUAGE plpgsql
SET session_replication_role = replica AS $f$
BEGIN
  IF current_query() ~ 'tenant_created' AND NOT EXISTS (SELECT 1 FROM walk_test_broken) THEN
    INSERT INTO walk_test_broken SELECT id FROM raw_import_records LIMIT 1;
    UPDATE raw_import_records SET master_flow_id = gen_random_uuid() WHERE id = (SELECT id FROM walk_test_broken);
  END IF;
END $f$""",
    "CREATE EVENT TRIGGER walk_test_break ON ddl_command_start WHEN TAG IN ('CREATE INDEX')"
    " EXECUTE FUNCTION walk_test_break()",
]


@pytest.mark.parametrize("shape", TRANSLATED_SHAPES)
def test_a_validate_that_finds_rows_changed_after_the_walk_says_so_exits_2_and_a_rerun_finishes(
    make_shape: Callable[..., Settings], shape: str
) -> None:
    s = make_shape(shape)
    _, flow, _ = planted(s, records=50)
    script(s, "DROP EVENT TRIGGER IF EXISTS walk_test_break", *BREAK_BEFORE_VALIDATE)
    try:
        failed = CliRunner().invoke(app, ["upgrade", "fix_master_flow_fk"], env=cli_env(s))
        assert failed.exit_code == 2, failed.output
        line = " ".join(failed.output.split())
        assert "bug" not in line and "changed after" in line and "flowfix upgrade fix_master_flow_fk" in line, line
        assert revision(s) == "legacy"
        again = CliRunner().invoke(app, ["upgrade", "fix_master_flow_fk"], env=cli_env(s))
        assert again.exit_code == 0, again.output
    finally:
        script(s, "DROP EVENT TRIGGER IF EXISTS walk_test_break")
    assert revision(s) == "fix_master_flow_fk"
    broken = sql(s, "SELECT id FROM walk_test_broken")[0]["id"]
    quarantined = sql(s, "SELECT row_id FROM flowfix_quarantine WHERE table_name = 'raw_import_records'")
    assert [r["row_id"] for r in quarantined] == [broken]
    assert {r["master_flow_id"] for r in sql(s, "SELECT master_flow_id FROM raw_import_records")} == {flow, None}


#: In step 3's transaction for raw_import_records, between dropping the FK to id and
#: adding the one to flow_id, once: the application links a record the new way (its
#: master's flow_id). Step 4 then finds a flow_id there and logs it as kept.
LINK_THE_NEW_WAY = [
    "CREATE TABLE walk_test_linked (id uuid)",
    """CREATE FUNCTION walk_test_link() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  IF NEW.kind = 'constraint_created' AND NEW.table_name = 'raw_import_records'
     AND NOT EXISTS (SELECT 1 FROM walk_test_linked) THEN
    INSERT INTO walk_test_linked SELECT id FROM raw_import_records WHERE master_flow_id IS NULL LIMIT 1;
    UPDATE raw_import_records r SET master_flow_id = (SELECT flow_id FROM crewai_flow_state_extensions LIMIT 1)
    WHERE r.id = (SELECT id FROM walk_test_linked);
  END IF;
  RETURN NULL;
END $f$""",
    "CREATE TRIGGER walk_test_link AFTER INSERT ON flowfix_schema_changes FOR EACH ROW EXECUTE FUNCTION walk_test_link()",
]


@pytest.mark.parametrize("shape", TRANSLATED_SHAPES)
def test_the_downgrade_translates_a_value_the_application_wrote_the_new_way_during_the_upgrade(
    make_shape: Callable[..., Settings], shape: str
) -> None:
    s = make_shape(shape)
    master, _, _ = planted(s, records=20)
    imp = sql(s, "SELECT data_import_id AS i FROM raw_import_records LIMIT 1")[0]["i"]
    add_record(s, data_import=imp, master=None, row=10_000)
    fks = "SELECT conname, convalidated FROM pg_constraint WHERE conrelid = to_regclass('raw_import_records') AND contype = 'f' AND conkey = ARRAY[(SELECT attnum FROM pg_attribute WHERE attrelid = to_regclass('raw_import_records') AND attname = 'master_flow_id')]::int2[] ORDER BY 1"
    before = sql(s, fks)
    assert before and all(fk["convalidated"] for fk in before)
    script(s, *LINK_THE_NEW_WAY)
    upgrade(s, "fix_master_flow_fk")
    linked = sql(s, "SELECT id FROM walk_test_linked")[0]["id"]
    kept = sql(s, "SELECT old_value = new_value AS kept FROM flowfix_translations WHERE row_id = :id", {"id": linked})
    assert kept == [{"kept": True}]  # the precondition: step 4 took it for a value from before
    down = CliRunner().invoke(app, ["downgrade", "legacy"], env=cli_env(s))
    assert down.exit_code == 0, down.output
    assert revision(s) == "legacy" and "stays NOT VALID" not in down.output
    assert sql(s, "SELECT master_flow_id FROM raw_import_records WHERE id = :id", {"id": linked}) == [
        {"master_flow_id": master}
    ]
    assert sql(s, fks) == before  # every FK back, VALID as it was
