"""The throttle says when it is blind, and pauses on the health signals, for real: a
primary whose WAL archiving fails (archive_command 'false') with a streaming replica, a
role without pg_monitor and then with it; an autovacuum to prevent wraparound."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from typer.testing import CliRunner

from flowfix import backfill as bf
from flowfix.cli import app
from flowfix.config import Settings, normalize_url
from flowfix.db import make_engine
from tests.conftest import upgrade
from tests.helpers import add_discovery_flow, add_import, add_master, add_record, links
from tests.servers import custom_server
from tests.test_replica_lag import TRUST, Listener, query, wait_for

ARCHIVING = {"archive_mode": "on", "archive_command": "false", "archive_timeout": "0"}


def orphan(s: Settings) -> uuid.UUID:
    """An import a discovery flow names, with two records: a run links all three."""
    client, engagement = uuid.uuid4(), uuid.uuid4()
    _, flow = add_master(s, client=client, engagement=engagement)
    imp = add_import(s, master=None, client=client, engagement=engagement)
    add_discovery_flow(s, flow_id=flow, master=flow, client=client, engagement=engagement, data_import=imp)
    for n in range(2):
        add_record(s, data_import=imp, master=None, row=n)
    return imp


def test_a_role_without_pg_monitor_is_told_it_is_blind_and_archiving_behind_pauses_the_run(tmp_path: Path) -> None:
    with custom_server(tmp_path / "primary", hba=TRUST, settings=ARCHIVING) as primary:
        query(primary, "CREATE ROLE app LOGIN")
        query(primary, "GRANT CREATE ON SCHEMA public TO app")
        url = f"postgresql://app@/postgres?host={primary.data}&port={primary.port}"
        s = Settings(url=normalize_url(url), schema="public", create_tables=True)
        upgrade(s, "legacy")
        upgrade(s, "fix_master_flow_fk")
        first = orphan(s)

        with custom_server(tmp_path / "replica", replica_of=primary):
            wait_for(
                lambda: query(primary, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") == 1,
                "the replica to stream",
            )
            # the ordinary role: told once at start (stderr) and in the report, and the run goes on
            env = {"DATABASE_URL": url, "FLOWFIX_SCHEMA": "public"}
            result = CliRunner().invoke(app, ["backfill", "--max-replica-lag", "1"], env=env)
            assert result.exit_code == 0, result.output
            assert links(s, "data_imports")[first] is not None
            told = [line for line in result.stderr.splitlines() if line.startswith("throttle blind: ")]
            assert [line.split(":")[1].strip() for line in told] == [
                "replica lag",
                "wraparound autovacuum",
                "WAL archiving",
            ]
            assert "role app cannot see it" in told[0] and "GRANT pg_monitor TO app" in told[0]
            assert "1 replication connection seen" in told[0]
            assert [f"  {line.removeprefix('throttle ')}" for line in told] == [
                line for line in result.stdout.splitlines() if line.startswith("  blind: ")
            ]

            # granted pg_monitor: nothing blind; more WAL waiting to be archived than allowed pauses the run
            query(primary, "GRANT pg_monitor TO app")
            second = orphan(s)
            query(primary, "CREATE TABLE wal_maker (n int)")
            for n in range(3):
                query(primary, f"INSERT INTO wal_maker VALUES ({n})")
                query(primary, "SELECT pg_switch_wal()")
            ready = "SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'"
            wait_for(lambda: query(primary, ready) >= 2, "WAL segments waiting for the archiver")

            listener, outcome = Listener(), {}

            worker = threading.Thread(
                target=lambda: outcome.update(result=run_backfill(s, listener, max_archive_backlog=1))
            )
            worker.start()
            wait_for(lambda: bool(listener.signals), "the backfill to pause")
            time.sleep(1.2)
            assert worker.is_alive() and links(s, "data_imports")[second] is None  # waiting, nothing written
            query(primary, "ALTER SYSTEM SET archive_command = 'true'")
            query(primary, "SELECT pg_reload_conf()")
            worker.join(timeout=90)
            assert not worker.is_alive()
            assert links(s, "data_imports")[second] is not None

    result_: Any = outcome["result"]
    assert result_.exit_code == 0
    assert set(listener.signals) == {"wal_archive"} and listener.resumes >= 1 and max(listener.lags) >= 2
    assert listener.notes == [] and result_.counts.blind == []
    assert result_.counts.pauses["wal_archive"]["pauses"] >= 1 and result_.counts.pauses["wal_archive"]["seconds"] >= 1


def test_an_autovacuum_to_prevent_wraparound_on_a_table_pauses_the_run(tmp_path: Path) -> None:
    """A real anti-wraparound autovacuum (the table's autovacuum_freeze_max_age at its
    minimum, 100,000 transactions burnt), held in its lock queue by a session holding
    SHARE UPDATE EXCLUSIVE (which the backfill's row locks do not conflict with)."""
    with custom_server(tmp_path / "pg", settings={"autovacuum_naptime": "1s", "synchronous_commit": "off"}) as pg:
        s = Settings(url=normalize_url(pg.local_url()), schema="public", create_tables=True)
        upgrade(s, "legacy")
        upgrade(s, "fix_master_flow_fk")
        imp = orphan(s)
        query(pg, "ALTER TABLE data_imports SET (autovacuum_freeze_max_age = 100000)")
        release = hold_lock(pg, "LOCK TABLE data_imports IN SHARE UPDATE EXCLUSIVE MODE")
        try:
            query(pg, "DO $$ BEGIN FOR i IN 1..101000 LOOP PERFORM pg_current_xact_id(); COMMIT; END LOOP; END $$")
            waiting = (
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'"
                " AND query = 'autovacuum: VACUUM public.data_imports (to prevent wraparound)'"
            )
            wait_for(lambda: query(pg, waiting) == 1, "the wraparound autovacuum")
            listener, outcome = Listener(), {}
            worker = threading.Thread(target=lambda: outcome.update(result=run_backfill(s, listener)))
            worker.start()
            wait_for(lambda: bool(listener.signals), "the backfill to pause")
            time.sleep(1.2)
            assert worker.is_alive() and links(s, "data_imports")[imp] is None  # waiting, nothing written
        finally:
            release()
        worker.join(timeout=90)
        assert not worker.is_alive()
        assert links(s, "data_imports")[imp] is not None

    result: Any = outcome["result"]
    assert result.exit_code == 0
    assert set(listener.signals) == {"wraparound_vacuum"} and listener.resumes >= 1
    assert result.counts.pauses["wraparound_vacuum"]["pauses"] >= 1
    assert result.counts.pauses["wraparound_vacuum"]["seconds"] >= 1


def run_backfill(s: Settings, listener: Listener, **options: Any) -> bf.Result:
    async def go() -> bf.Result:
        engine = make_engine(s)
        try:
            return await bf.run(engine, s, bf.Options(**options), listener)
        finally:
            await engine.dispose()

    return asyncio.run(go())


def hold_lock(server: Any, statement: str) -> Any:
    """Another session runs ``statement`` in a transaction and keeps it open until the
    returned ``release()``."""
    started, done = threading.Event(), threading.Event()

    async def hold() -> None:
        conn = await asyncpg.connect(server.local_url())
        try:
            async with conn.transaction():
                await conn.execute(statement)
                started.set()
                while not done.is_set():
                    await asyncio.sleep(0.05)
        finally:
            started.set()
            await conn.close()

    holder = threading.Thread(target=lambda: asyncio.run(hold()))
    holder.start()
    assert started.wait(10)

    def release() -> None:
        done.set()
        holder.join()

    return release
