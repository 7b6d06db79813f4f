"""Review of issue 18: a reading of `flowfix runs RUN` taken while the run finishes. The
reading's statements each see the database as it is when they start (READ COMMITTED), so
reading the run's row before asking pg_locks whether a process holds it can see the run
still marked running and then no lock: an interrupted run, for a run that finished
cleanly; `--watch` then stops there and exits 1. The run process commits its end before
it lets go of the lock, so asking for the lock first cannot meet that."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from flowfix import ledger
from flowfix.config import Settings
from flowfix.exitcodes import Exit
from flowfix.watch import outcome, watch
from tests.helpers import sql


@pytest.fixture
def settings(shaped_fixed: Settings) -> Settings:
    return shaped_fixed


@pytest.mark.asyncio
async def test_a_run_finishing_during_a_reading_is_never_shown_interrupted(
    settings: Settings, engine: AsyncEngine
) -> None:
    s = settings
    (row,) = sql(s, "INSERT INTO flowfix_runs (command, arguments) VALUES ('backfill', '{}') RETURNING id::text AS id")
    run_id = uuid.UUID(row["id"])
    # the helpers' connection stays open between statements: it holds the locks as a run would
    sql(s, "SELECT pg_advisory_lock(hashtext(:k))", {"k": ledger.ADVISORY_LOCK_KEY})
    sql(s, ledger.HOLD_RUN, {"k": ledger.ADVISORY_LOCK_KEY, "run": row["id"]})
    finished = False

    def finish_meanwhile(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        """The run ends (as backfill does: its end committed, then the lock let go) right
        after the reading has read the run's row."""
        nonlocal finished
        if not finished and "SELECT id, command, status, arguments, counts" in statement:
            finished = True
            sql(s, "UPDATE flowfix_runs SET status = 'finished', finished_at = now() WHERE id = :id", {"id": run_id})
            sql(s, "SELECT pg_advisory_unlock_all()")

    event.listen(engine.sync_engine, "after_cursor_execute", finish_meanwhile)
    try:
        seen = await watch(engine, run_id, lambda _: None, interval=0.2, once=True)
    finally:
        event.remove(engine.sync_engine, "after_cursor_execute", finish_meanwhile)
        sql(s, "SELECT pg_advisory_unlock_all()")
    assert finished
    assert seen.active or seen.run.status == "finished", (seen.active, seen.run.status)
    assert seen.active or outcome(seen) == Exit.OK
