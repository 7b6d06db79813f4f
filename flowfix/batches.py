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
from dataclasses import dataclass
from datetime import UTC, datetime
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


@dataclass(frozen=True)
class Pause:
    """Why the run waits: which health signal, and what it read."""

    signal: str  # one of SIGNALS
    value: float
    detail: str

    def __str__(self) -> str:
        return self.detail


#: The health signals, as GitLab's batched background migrations check them before each
#: batch, where they apply here.
REPLICA_LAG, WRAPAROUND_VACUUM, WAL_ARCHIVE = "replica_lag", "wraparound_vacuum", "wal_archive"
SIGNALS = (REPLICA_LAG, WRAPAROUND_VACUUM, WAL_ARCHIVE)

#: What the role may see, read once at start. pg_stat_replication shows replay_lag (and
#: pg_stat_activity an autovacuum worker's query) only
#: to superusers and pg_read_all_stats members (pg_monitor includes it); other roles get
#: NULLs and would never pause. pg_ls_archive_statusdir() is granted to pg_monitor.
PROBE = """
SELECT current_user AS role,
       pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') AS stats,
       (SELECT count(*) FROM pg_stat_replication) AS senders,
       (SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming') AS streaming,
       current_setting('archive_mode') <> 'off' AS archiving,
       has_function_privilege('pg_ls_archive_statusdir()', 'EXECUTE') AS archive_dir,
       (SELECT array_agg(DISTINCT x.oid) FROM unnest(CAST(:tables AS text[])) t,
          LATERAL (SELECT to_regclass(t)::oid UNION SELECT relid::oid FROM pg_partition_tree(to_regclass(t))) x(oid)
        WHERE x.oid IS NOT NULL) AS relids
"""

#: The largest replay lag of the streaming replicas, in seconds (NULL: none). A replica
#: whose replay is stuck shows a growing replay_lag (the primary interpolates it between
#: the samples the replica has not reached).
REPLICA_LAG_SQL = "(SELECT max(extract(epoch FROM replay_lag)) FROM pg_stat_replication WHERE state = 'streaming')"
#: The tables (of ours) an autovacuum worker vacuums, or waits to vacuum, to prevent
#: wraparound: it must finish (it is never cancelled), and our batches would compete with
#: it for I/O. Found by its locks, which cover a worker still queued for its lock, where
#: pg_stat_progress_vacuum shows only one that started.
#: pg_locks (which takes every lock partition) is read only while such a worker exists.
WRAPAROUND_SQL = """(CASE WHEN EXISTS (SELECT FROM pg_stat_activity WHERE backend_type = 'autovacuum worker'
    AND query LIKE 'autovacuum:%(to prevent wraparound)')
  THEN (SELECT string_agg(DISTINCT c.relname, ', ') FROM pg_stat_activity a
    JOIN pg_locks l ON l.pid = a.pid JOIN pg_class c ON c.oid = l.relation
    WHERE a.backend_type = 'autovacuum worker' AND a.query LIKE 'autovacuum:%(to prevent wraparound)'
      AND l.relation = ANY(CAST(:relids AS oid[]))) END)"""
#: WAL segments waiting for the archiver (archive_command failing or slow).
ARCHIVE_SQL = "(SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready')"

#: Each signal's read, named as the signal.
SIGNAL_SQL = {
    REPLICA_LAG: f"{REPLICA_LAG_SQL} AS {REPLICA_LAG}",
    WRAPAROUND_VACUUM: f"{WRAPAROUND_SQL} AS {WRAPAROUND_VACUUM}",
    WAL_ARCHIVE: f"{ARCHIVE_SQL} AS {WAL_ARCHIVE}",
}


class Throttle:
    """Before each batch: wait while a health signal says the database is under strain
    (a replica more than ``max_lag`` seconds behind, a wraparound autovacuum on one of
    ``tables``, more than ``max_archive_backlog`` WAL segments waiting to be archived; 0
    turns a limit off). :meth:`probe` says, once, which signals this role cannot see or
    that have nothing to watch (``blind``); a blind signal is skipped, never taken for
    healthy in silence. ``on_pause(pause)`` is called at each poll of a pause,
    ``on_resume()`` when it ends; ``pauses`` counts them per signal. ``on_state(conn,
    state)``, if set, is given :meth:`state` when a pause begins or ends, on the
    connection that waits (idle between batches), so that another shell can see it
    (the backfill keeps it in the ledger: ``flowfix runs RUN``)."""

    POLL_SECONDS = 1.0

    def __init__(
        self,
        max_lag: float,
        max_archive_backlog: int = 0,
        tables: tuple[str, ...] = (),
        on_pause: Callable[[Pause], None] | None = None,
        on_resume: Callable[[], None] | None = None,
    ) -> None:
        self.max_lag, self.max_archive_backlog, self.tables = max_lag, max_archive_backlog, tables
        self.on_pause = on_pause or (lambda pause: None)
        self.on_resume = on_resume or (lambda: None)
        #: signal -> {"pauses": n, "seconds": s}
        self.pauses: dict[str, dict[str, float]] = {}
        self.blind: list[str] = []
        self.signals: list[str] = []  # the signals it reads before each batch (keys of SIGNAL_SQL)
        self.relids: list[int] = []
        self.on_state: Callable[[AsyncConnection, dict[str, object]], Awaitable[None]] | None = None
        self.current: dict[str, object] | None = None

    def state(self) -> dict[str, object]:
        """What the throttle is doing: the pause it is in (signal, why, since), pauses so
        far per signal, and its blind spots."""
        return {"paused": self.current, "pauses": self.pauses, "blind": self.blind}

    async def probe(self, conn: AsyncConnection) -> list[str]:
        """Read what this role can watch; returns the blind spots (also in ``blind``)."""
        async with conn.begin():
            p = (await conn.execute(text(PROBE), {"tables": list(self.tables)})).one()
        grant = f"GRANT pg_monitor TO {p.role}"
        if self.max_lag > 0:
            if not p.stats:
                self.blind.append(
                    f"replica lag: role {p.role} cannot see it (pg_stat_replication shows it only to superusers and"
                    f" pg_monitor members; {p.senders} replication connection{'s' if p.senders != 1 else ''}"
                    f" seen), so --max-replica-lag cannot pause the run: {grant}"
                )
            elif not p.streaming:
                self.blind.append("replica lag: no streaming replica, so --max-replica-lag has nothing to watch")
            else:
                self.signals.append(REPLICA_LAG)
        if self.tables:
            if p.stats:
                self.relids = list(p.relids or [])
                self.signals.append(WRAPAROUND_VACUUM)
            else:
                self.blind.append(
                    f"wraparound autovacuum: role {p.role} cannot see autovacuum workers, so the run cannot wait for"
                    f" one on its tables: {grant}"
                )
        if self.max_archive_backlog > 0 and p.archiving:
            if p.archive_dir:
                self.signals.append(WAL_ARCHIVE)
            else:
                self.blind.append(
                    f"WAL archiving: role {p.role} may not list the archive status directory, so"
                    f" --max-archive-backlog cannot pause the run: {grant}"
                )
        return self.blind

    async def check(self, conn: AsyncConnection) -> Pause | None:
        """The first signal that says wait, or None."""
        if not self.signals:
            return None
        sql = "SELECT " + ", ".join(SIGNAL_SQL[signal] for signal in self.signals)
        async with conn.begin():
            row = (await conn.execute(text(sql), {"relids": self.relids})).mappings().one()
        lag = row.get(REPLICA_LAG)
        if lag is not None and float(lag) > self.max_lag:
            return Pause(REPLICA_LAG, float(lag), f"a streaming replica is {float(lag):.1f} s behind")
        if row.get(WRAPAROUND_VACUUM):
            return Pause(WRAPAROUND_VACUUM, 1, f"autovacuum runs on {row[WRAPAROUND_VACUUM]} to prevent wraparound")
        ready = row.get(WAL_ARCHIVE)
        if ready is not None and ready > self.max_archive_backlog:
            return Pause(WAL_ARCHIVE, float(ready), f"{ready} WAL segments wait to be archived")
        return None

    async def wait(self, conn: AsyncConnection) -> None:
        started: float | None = None
        signal = ""
        while (pause := await self.check(conn)) is not None:
            if started is None or pause.signal != signal:
                if started is not None:
                    self._count(signal, started)
                started, signal = time.perf_counter(), pause.signal
                self.pauses.setdefault(signal, {"pauses": 0, "seconds": 0.0})["pauses"] += 1
                self.current = {"signal": signal, "why": pause.detail, "since": datetime.now(UTC).isoformat()}
                await self._tell(conn)
            self.on_pause(pause)
            await asyncio.sleep(self.POLL_SECONDS)
        if started is not None:
            self._count(signal, started)
            self.current = None
            await self._tell(conn)
            self.on_resume()

    async def _tell(self, conn: AsyncConnection) -> None:
        if self.on_state is not None:
            await self.on_state(conn, self.state())

    def _count(self, signal: str, started: float) -> None:
        entry = self.pauses[signal]
        entry["seconds"] = round(entry["seconds"] + time.perf_counter() - started, 3)
