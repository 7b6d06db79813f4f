"""Watching a run from another shell: ``flowfix runs RUN --watch`` and ``flowfix status``.

Everything shown comes from the ledger (:func:`flowfix.ledger.run_progress`: the progress
rows, the stored import plan, the run's live state, whether the run lock is held), never
from the running process, so it works from any machine that can read the database, and
it says the same of a run resumed by another process.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from flowfix import ledger
from flowfix.exitcodes import Exit


async def watch(
    engine: AsyncEngine, run_id: uuid.UUID, show: Callable[[ledger.RunProgress], None], *, interval: float, once: bool
) -> ledger.RunProgress:
    """Show the run's progress (``once``), or every ``interval`` seconds until no process
    works on it (it finished, failed, or its process died); returns the last reading."""
    async with engine.connect() as conn:
        while True:
            async with conn.begin():  # one transaction per reading (READ COMMITTED: see run_progress)
                progress = await ledger.run_progress(conn, run_id)
            show(progress)
            if once or not progress.active:
                return progress
            await asyncio.sleep(interval)


def outcome(progress: ledger.RunProgress) -> Exit:
    """``--watch``'s exit code once no process works on the run, a promise about the
    database as the run's own would be: 0 only for a run that ended and left no row in its
    scope NULL; 1 for one interrupted (still marked running) or that left rows behind."""
    left = any(isinstance(n, int) and n > 0 for k, n in progress.run.counts.items() if k.startswith("left_"))
    return Exit.PROBLEMS if progress.run.status == "running" or left else Exit.OK


#: The newest run marked running (an active one holds the run lock; see run_progress).
NEWEST_RUNNING = "SELECT id FROM flowfix_runs WHERE status = 'running' ORDER BY started_at DESC LIMIT 1"


async def active_run(engine: AsyncEngine) -> ledger.RunProgress | None:
    """The run a process works on now, if any (for ``flowfix status``); None also where
    the ledger does not exist yet."""
    async with engine.connect() as conn:
        if not (await conn.execute(text("SELECT to_regclass('flowfix_runs') IS NOT NULL"))).scalar_one():
            return None
        found = (await conn.execute(text(NEWEST_RUNNING))).scalar_one_or_none()
        if found is None:
            return None
        progress = await ledger.run_progress(conn, found)  # which reads whether it is held
        return progress if progress.active else None
