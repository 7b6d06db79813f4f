"""--max-replica-lag, for real: a primary and a streaming replica (pg_basebackup from the
embedded PostgreSQL wheel), replay paused on the replica, the backfill waits before its
next batch and says so; replay resumed, it finishes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from typer.testing import CliRunner

from flowfix import backfill as bf
from flowfix.batches import Pause
from flowfix.cli import app
from flowfix.config import Settings, normalize_url
from flowfix.db import make_engine
from tests.conftest import upgrade
from tests.helpers import add_master, add_record, cli_env, insert, links, script, sql
from tests.servers import Server, custom_server

TRUST = ["host all all 127.0.0.1/32 trust", "host replication all 127.0.0.1/32 trust"]


def query(server: Server, statement: str) -> Any:
    async def go() -> Any:
        conn = await asyncpg.connect(server.local_url())
        try:
            return await conn.fetchval(statement)
        finally:
            await conn.close()

    return asyncio.run(go())


def wait_for(condition: Any, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


class Listener:
    """A reporter that remembers the pauses it is told of."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self.signals: list[str] = []
        self.notes: list[str] = []
        self.resumes = 0

    def start(self, step: str, total: int | None) -> None:
        pass

    def advance(self, step: str, n: int) -> None:
        pass

    def paused(self, pause: Pause) -> None:
        self.lags.append(pause.value)
        self.signals.append(pause.signal)

    def resumed(self) -> None:
        self.resumes += 1

    def note(self, line: str) -> None:
        self.notes.append(line)


def test_the_backfill_waits_while_a_replica_lags_and_finishes_once_it_catches_up(tmp_path: Path) -> None:
    with custom_server(tmp_path / "primary", hba=TRUST) as primary:
        s = Settings(url=normalize_url(primary.local_url()), schema="public", create_tables=True)
        upgrade(s, "legacy")
        upgrade(s, "fix_master_flow_fk")
        client, engagement = uuid.uuid4(), uuid.uuid4()
        _, flow = add_master(s, client=client, engagement=engagement)
        imp = uuid.uuid4()
        insert(
            s,
            "data_imports",
            {"id": imp, "master_flow_id": None, "client_account_id": client, "engagement_id": engagement},
        )
        insert(
            s,
            "discovery_flows",
            {
                "id": uuid.uuid4(),
                "flow_id": flow,
                "master_flow_id": flow,
                "data_import_id": imp,
                "client_account_id": client,
                "engagement_id": engagement,
            },
        )
        add_record(s, data_import=imp, master=None)

        with custom_server(tmp_path / "replica", replica_of=primary) as replica:
            wait_for(
                lambda: query(primary, "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'") == 1,
                "the replica to stream",
            )
            query(replica, "SELECT pg_wal_replay_pause()")
            script(s, "CREATE TABLE wal_maker (n int)")

            def lag() -> float:
                script(s, "INSERT INTO wal_maker SELECT generate_series(1, 100)")
                value = query(primary, "SELECT extract(epoch FROM max(replay_lag)) FROM pg_stat_replication")
                return float(value or 0)

            wait_for(lambda: lag() > 2, "the replica's replay lag to pass 2 s")

            listener = Listener()
            outcome: dict[str, Any] = {}

            def backfill() -> None:
                async def go() -> bf.Result:
                    engine = make_engine(s)
                    try:
                        return await bf.run(engine, s, bf.Options(max_replica_lag=1.0), listener)
                    finally:
                        await engine.dispose()

                outcome["result"] = asyncio.run(go())

            worker = threading.Thread(target=backfill)
            worker.start()
            wait_for(lambda: bool(listener.lags), "the backfill to pause")
            # another shell sees the pause and why, from the ledger (issue 18)
            (run,) = sql(s, "SELECT id::text AS id FROM flowfix_runs WHERE status = 'running'")
            shown = CliRunner().invoke(app, ["runs", run["id"], "--format", "json"], env=cli_env(s))
            assert shown.exit_code == 0, shown.output
            body = json.loads(shown.stdout)
            assert body["active"] and body["paused"]["signal"] == "replica_lag", body
            assert "behind" in body["paused"]["why"] and body["pauses"]["replica_lag"]["pauses"] == 1
            time.sleep(1.5)
            assert worker.is_alive() and links(s, "data_imports") == {imp: None}  # waiting, nothing written
            query(replica, "SELECT pg_wal_replay_resume()")
            worker.join(timeout=90)
            assert not worker.is_alive()

    result: bf.Result = outcome["result"]
    assert result.exit_code == 0 and result.counts is not None
    assert result.counts.replica_pauses >= 1 and result.counts.replica_paused_seconds >= 1.5
    assert listener.resumes >= 1 and max(listener.lags) > 1.0 and set(listener.signals) == {"replica_lag"}
    assert result.counts.blind == [] and listener.notes == []  # a superuser sees the lag: nothing blind
