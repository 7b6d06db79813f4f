"""Online behaviour of the revisions: lock_timeout with retry, offline SQL, errors."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import threading
import time
import uuid
from collections.abc import Callable

import asyncpg
import pytest
from alembic import command
from alembic.util import CommandError

from flowfix import alembic_runner
from flowfix.config import Settings, normalize_url
from tests.conftest import make_alembic_config, upgrade
from tests.helpers import add_import, add_master, links, revision, sql

C, E = uuid.uuid4(), uuid.uuid4()


def _hold_lock(database_url: str, table: str, seconds: float, started: threading.Event, schema: str = "public") -> None:
    """Another session keeps a lock on ``table`` (as a long application transaction would)."""

    async def run() -> None:
        conn = await asyncpg.connect(database_url, server_settings={"search_path": schema})
        try:
            async with conn.transaction():
                await conn.execute(f"LOCK TABLE {table} IN ROW EXCLUSIVE MODE")
                started.set()
                await asyncio.sleep(seconds)
        finally:
            await conn.close()

    asyncio.run(run())


def _legacy_link_and_lock(
    settings: Settings, database_url: str, table: str, seconds: float
) -> tuple[uuid.UUID, uuid.UUID, threading.Thread]:
    """A legacy database with one import linked by master id, and another session that
    holds a lock on ``table`` for ``seconds`` (already holding it on return)."""
    upgrade(settings, "legacy")
    m, flow = add_master(settings, client=C, engagement=E)
    imp = add_import(settings, master=m, client=C, engagement=E)
    started = threading.Event()
    holder = threading.Thread(target=_hold_lock, args=(database_url, table, seconds, started))
    holder.start()
    started.wait(10)
    return imp, flow, holder


def test_a_blocked_revision_waits_at_most_lock_timeout_per_attempt_then_retries(
    settings: Settings, database_url: str
) -> None:
    imp, flow, holder = _legacy_link_and_lock(settings, database_url, "data_imports", 2.5)
    quick = dataclasses.replace(settings, lock_timeout="300ms", lock_retries=5)
    t0 = time.monotonic()
    upgrade(quick, "fix_master_flow_fk")
    elapsed = time.monotonic() - t0
    holder.join()
    assert revision(settings) == "fix_master_flow_fk"
    assert links(settings, "data_imports") == {imp: flow}
    assert elapsed >= 2.0  # it did wait for the holder (retries), and did not fail


def test_when_retries_run_out_the_error_is_one_line_and_a_rerun_finishes(settings: Settings, database_url: str) -> None:
    imp, flow, holder = _legacy_link_and_lock(settings, database_url, "raw_import_records", 3)
    impatient = dataclasses.replace(settings, lock_timeout="100ms", lock_retries=0)
    with pytest.raises(CommandError) as err:
        upgrade(impatient, "fix_master_flow_fk")
    holder.join()
    assert "gave up waiting for a table lock (1 attempt of 100ms)" in str(err.value) and "\n" not in str(err.value)
    assert revision(settings) == "legacy"
    upgrade(settings, "fix_master_flow_fk")  # resumes: the data_imports step is already done
    assert links(settings, "data_imports") == {imp: flow}


def test_offline_sql_marks_concurrently_steps_and_produces_the_same_schema(settings: Settings) -> None:
    import io

    buf = io.StringIO()
    cfg = make_alembic_config(settings)
    cfg.output_buffer = buf
    command.upgrade(cfg, "head", sql=True)
    text = buf.getvalue()
    assert "password" not in text.lower()
    concurrently = [n for n, line in enumerate(text.splitlines()) if "CONCURRENTLY" in line and "CREATE" in line]
    assert len(concurrently) == 5  # unique flow_id, three master_flow_id indexes, tenant+created_at
    lines = text.splitlines()
    for n in concurrently:  # each one is announced, outside BEGIN/COMMIT
        window = "\n".join(lines[max(0, n - 6) : n])
        assert "-- OUTSIDE A TRANSACTION" in window and "COMMIT;" in window

    async def apply() -> None:
        conn = await asyncpg.connect(
            normalize_url(settings.masked_url).set(drivername="postgresql").render_as_string(hide_password=False)
        )
        try:
            for statement in re.split(r";\n\n", text):
                if statement.strip() and not all(x.startswith("--") for x in statement.strip().splitlines()):
                    await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(apply())
    assert revision(settings) == alembic_runner.head()
    fks = sql(
        settings,
        "SELECT conname, convalidated FROM pg_constraint WHERE contype = 'f'"
        " AND conname LIKE '%master_flow_id' ORDER BY 1",
    )
    assert fks == [
        {"conname": f"fk_{t}_master_flow_id", "convalidated": True}
        for t in ("data_imports", "discovery_flows", "raw_import_records")
    ]


def test_unreachable_database_is_one_line_without_password(tmp_path) -> None:
    bad = Settings(url=normalize_url("postgresql://flowfix:s3cret-pw@127.0.0.1:1/nowhere"))
    with pytest.raises(CommandError) as err:
        command.upgrade(make_alembic_config(bad), "head")
    message = str(err.value)
    assert message.startswith("cannot connect to postgresql://flowfix:***@127.0.0.1:1/nowhere")
    assert "s3cret-pw" not in message and "\n" not in message


def test_missing_schema_is_reported(settings: Settings) -> None:
    with pytest.raises(CommandError, match="schema 'nope' does not exist"):
        upgrade(dataclasses.replace(settings, schema="nope"), "head")


def _hold_lock_in(s: Settings, table: str, seconds: float) -> threading.Thread:
    """Like :func:`_hold_lock`, in the schema of ``s`` (a production shape)."""
    from tests.helpers import plain_url

    started = threading.Event()
    holder = threading.Thread(target=_hold_lock, args=(plain_url(s), table, seconds, started, s.schema))
    holder.start()
    started.wait(10)
    return holder


@pytest.mark.parametrize("name", ["friendly", "deployed"])  # the shapes whose imports' FK references id
def test_an_upgrade_that_gives_up_part_way_says_so_and_status_and_downgrade_know_it(
    make_shape: Callable[..., Settings], name: str
) -> None:
    """fix_master_flow_fk gives up on raw_import_records' lock after repointing
    data_imports: the revision is still legacy, but one FK points at flow_id. The error and
    `flowfix status` name the part-done revision; `flowfix downgrade legacy` takes it back
    to exactly what was there (catalog and rows); the upgrade then runs whole."""
    shaped = make_shape(name)
    from typer.testing import CliRunner

    from flowfix import alembic_runner
    from flowfix.cli import app
    from flowfix.errors import MigrationError
    from tests import snapshot
    from tests.helpers import cli_env

    m, flow = add_master(shaped, client=C, engagement=E)
    imp = add_import(shaped, master=m, client=C, engagement=E)
    before = snapshot.take(shaped)
    holder = _hold_lock_in(shaped, "raw_import_records", 3)
    try:
        with pytest.raises(MigrationError) as err:
            alembic_runner.upgrade(
                dataclasses.replace(shaped, lock_timeout="100ms", lock_retries=0), "fix_master_flow_fk"
            )
    finally:
        holder.join()
    assert "revision fix_master_flow_fk is part-done" in str(err.value) and "data_imports" in str(err.value)
    assert revision(shaped) == "legacy"
    status = CliRunner().invoke(app, ["status"], env=cli_env(shaped))
    assert status.exit_code == 0, status.output
    assert "PART-DONE revision fix_master_flow_fk is part-done" in status.output
    assert "next step: flowfix upgrade fix_master_flow_fk" in status.output

    down = CliRunner().invoke(app, ["downgrade", "legacy"], env=cli_env(shaped))
    assert down.exit_code == 0, down.output
    assert revision(shaped) == "legacy" and alembic_runner.part_done(shaped) is None
    assert snapshot.take(shaped) == before
    assert links(shaped, "data_imports") == {imp: m}  # still the master's id, as before

    alembic_runner.upgrade(shaped, "fix_master_flow_fk")
    assert links(shaped, "data_imports") == {imp: flow}


def test_an_enforce_that_died_after_adding_its_check_is_named_and_taken_back(shaped: Settings) -> None:
    """The session of `upgrade head` lost between adding the NOT NULL CHECK and dropping
    it: the CHECK refuses new discovery flows without a master while the revision says
    fix_master_flow_fk. status names it; `flowfix downgrade fix_master_flow_fk` removes it."""
    from typer.testing import CliRunner

    from flowfix import alembic_runner
    from flowfix.catalog import ENFORCE_CHECK
    from flowfix.cli import app
    from tests import snapshot
    from tests.helpers import cli_env

    upgrade(shaped, "fix_master_flow_fk")
    before = snapshot.take(shaped)
    sql(
        shaped,
        f"ALTER TABLE discovery_flows ADD CONSTRAINT {ENFORCE_CHECK} CHECK (master_flow_id IS NOT NULL) NOT VALID",
    )
    status = CliRunner().invoke(app, ["status"], env=cli_env(shaped))
    assert f"PART-DONE revision enforce_master_flow_not_null is part-done (added {ENFORCE_CHECK}" in status.output
    down = CliRunner().invoke(app, ["downgrade", "fix_master_flow_fk"], env=cli_env(shaped))
    assert down.exit_code == 0, down.output
    assert revision(shaped) == "fix_master_flow_fk" and alembic_runner.part_done(shaped) is None
    assert snapshot.take(shaped) == before


def test_the_sql_printed_for_a_database_builds_the_indexes_its_online_upgrade_builds(shaped: Settings) -> None:
    """`flowfix upgrade --sql` with DATABASE_URL set reads the catalog first: the indexes
    its SQL creates are exactly those the online upgrade of that database creates (on
    shape D the unique index on flow_id exists under another name; on H the constraint)."""
    from typer.testing import CliRunner

    from flowfix.cli import app
    from tests import snapshot
    from tests.helpers import cli_env

    printed = CliRunner().invoke(app, ["upgrade", "legacy:fix_master_flow_fk", "--sql"], env=cli_env(shaped))
    assert printed.exit_code == 0, printed.output
    would_build = set(re.findall(r"CREATE (?:UNIQUE )?INDEX CONCURRENTLY IF NOT EXISTS (\w+)", printed.output))
    assert "generic SQL" not in printed.output
    before = {ix["indexname"] for ix in snapshot.take(shaped, rows=False).indexes}
    upgrade(shaped, "fix_master_flow_fk")
    built = {ix["indexname"] for ix in snapshot.take(shaped, rows=False).indexes} - before
    assert would_build == built


def test_the_sql_printed_without_a_database_says_it_is_generic() -> None:
    from typer.testing import CliRunner

    from flowfix.cli import app

    printed = CliRunner().invoke(app, ["upgrade", "legacy:fix_master_flow_fk", "--sql"], env={"DATABASE_URL": ""})
    assert printed.exit_code == 0, printed.output
    assert printed.output.count("-- generic SQL (no DATABASE_URL)") == 1
