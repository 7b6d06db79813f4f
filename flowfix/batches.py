"""Short transactions for work on live tables: sizing, retrying, throttling.

Shared by every batched writer (the backfill's steps, undo). Learned from GitLab's
batched background migrations (a batch optimizer on smoothed durations, bounded steps,
floor and ceiling; health checks before each batch) and pgroll (each transaction retried
with jittered backoff when it gives up waiting for a lock, holding nothing in between).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from flowfix.errors import is_lock_timeout, lock_backoff

T = TypeVar("T")

#: Each batch aims at this many seconds, and is sized to stay under LIMIT_SECONDS.
TARGET_SECONDS = 0.5
LIMIT_SECONDS = 1.0
#: weight of the newest measurement in the smoothed cost per unit
SMOOTHING = 0.4


class BatchSizer:
    """How many units (rows, pages, ledger entries) the next batch takes.

    The cost of one unit is smoothed over recent batches; the next size aims at
    :data:`TARGET_SECONDS`, moves at most x2 up or /2 down per batch (a slow batch that
    overshoots :data:`LIMIT_SECONDS` is re-measured at once, not smoothed), and stays
    within [floor, ceiling]. Workers share one sizer: their batches are alike."""

    def __init__(self, ceiling: int, *, start: int | None = None, floor: int = 1) -> None:
        self.ceiling = max(1, ceiling)
        self.floor = max(1, min(floor, self.ceiling))
        self.size = max(self.floor, min(start or self.ceiling, self.ceiling))
        self.cost: float | None = None  # seconds per unit, smoothed
        self.longest = 0.0

    def done(self, seconds: float, units: int) -> None:
        self.longest = max(self.longest, seconds)
        if units <= 0:
            return
        cost = seconds / units
        if self.cost is None or seconds > LIMIT_SECONDS:
            self.cost = cost
        else:
            self.cost = SMOOTHING * cost + (1 - SMOOTHING) * self.cost
        ideal = TARGET_SECONDS / self.cost if self.cost > 0 else self.ceiling
        bounded = min(max(ideal, self.size / 2), self.size * 2)
        self.size = int(max(self.floor, min(bounded, self.ceiling)))


async def retrying(retries: int, attempt: Callable[[], Awaitable[T]]) -> T:
    """Call ``attempt`` (one whole transaction) until it does not give up on a lock: every
    flowfix session has a lock_timeout (:func:`flowfix.config.connect_args`), and a
    transaction that hit it has been rolled back, holding nothing; the next try comes
    after a jittered backoff, at most ``retries`` times."""
    for number in range(retries + 1):
        try:
            return await attempt()
        except DBAPIError as exc:
            if not is_lock_timeout(exc) or number == retries:
                raise
            await asyncio.sleep(lock_backoff(number))
    raise AssertionError("unreachable")


async def transaction(conn: AsyncConnection, retries: int, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """Run ``work`` in one transaction, retried after a lock timeout (:func:`retrying`)."""

    async def attempt() -> T:
        async with conn.begin():
            return await work(conn)

    return await retrying(retries, attempt)


async def timed(
    conn: AsyncConnection, sizer: BatchSizer, retries: int, work: Callable[[AsyncConnection], Awaitable[T]], units: int
) -> T:
    """:func:`transaction`, timed into ``sizer`` as ``units`` units of work. Each batch
    commits with synchronous_commit off (it carries its own ledger rows, so a batch lost
    in a crash is simply redone); the run's last transaction commits synchronously, which
    makes every batch before it durable too."""

    async def batch(c: AsyncConnection) -> T:
        await c.execute(text("SET LOCAL synchronous_commit = off"))
        return await work(c)

    started = time.perf_counter()
    out = await transaction(conn, retries, batch)
    sizer.done(time.perf_counter() - started, units)
    return out


#: The largest replay lag of the streaming replicas, in seconds (NULL: none, or none this
#: role may see: pg_stat_replication shows lag to superusers and pg_monitor members). A
#: replica whose replay is stuck shows a growing replay_lag (the primary interpolates it
#: between the samples the replica has not reached).
REPLICA_LAG = "SELECT max(extract(epoch FROM replay_lag)) FROM pg_stat_replication WHERE state = 'streaming'"


class ReplicaThrottle:
    """Before each batch: wait while a streaming replica replays more than ``max_lag``
    seconds behind (0: never wait). ``on_pause(lag)`` is called at each poll of a pause,
    ``on_resume()`` when it ends."""

    POLL_SECONDS = 1.0

    def __init__(
        self,
        max_lag: float,
        on_pause: Callable[[float], None] | None = None,
        on_resume: Callable[[], None] | None = None,
    ) -> None:
        self.max_lag = max_lag
        self.on_pause = on_pause or (lambda lag: None)
        self.on_resume = on_resume or (lambda: None)
        self.pauses = 0
        self.paused_seconds = 0.0

    async def lag(self, conn: AsyncConnection) -> float | None:
        async with conn.begin():
            value = (await conn.execute(text(REPLICA_LAG))).scalar_one()
        return None if value is None else float(value)

    async def wait(self, conn: AsyncConnection) -> None:
        if self.max_lag <= 0:
            return
        started: float | None = None
        while True:
            lag = await self.lag(conn)
            if lag is None or lag <= self.max_lag:
                break
            if started is None:
                started = time.perf_counter()
                self.pauses += 1
            self.on_pause(lag)
            await asyncio.sleep(self.POLL_SECONDS)
        if started is not None:
            self.paused_seconds += time.perf_counter() - started
            self.on_resume()
