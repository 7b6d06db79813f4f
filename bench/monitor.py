"""The application's writer and a wait-event sampler, in a process of their own.

The writer commits the application's transaction (:func:`bench.common.app_writes`) in a
loop and records when each began and ended; the sampler, on a second connection, polls
``pg_stat_activity`` every few milliseconds for the writer's backend, flowfix's sessions
(``application_name = 'flowfix'``), the checkpointer, the WAL writer and autovacuum
workers. They run in their own process so that the bench's own Python work (flowfix's
planning holds the GIL) never shows up as the application's wait: a stall measured here
is the server's, or the machine's.

All times are ``time.monotonic()`` (CLOCK_MONOTONIC, one clock for every process on the
machine), so the runbook can line them up with its own step marks.
"""

from __future__ import annotations

import asyncio
import bisect
import multiprocessing
import multiprocessing.connection
import multiprocessing.synchronize
import time
from collections import Counter
from dataclasses import dataclass, field

from bench import common

SAMPLE_SQL = r"""
SELECT pid, backend_type, coalesce(application_name, ''), coalesce(state, ''),
       coalesce(wait_event_type, ''), coalesce(wait_event, ''),
       regexp_replace(left(coalesce(query, ''), 2000), '\s+', ' ', 'g')
FROM pg_stat_activity
WHERE pid <> pg_backend_pid()
  AND (pid = $1 OR application_name = 'flowfix'
       OR backend_type IN ('checkpointer', 'walwriter', 'autovacuum worker'))
"""

#: What a flowfix statement is, from its text (first match wins).
STATEMENTS: tuple[tuple[str, str], ...] = (
    ("r.ctid >=", "records slice"),
    ("ORDER BY s.id LIMIT", "records slice by key"),
    ("r.id = ANY", "records closing pass batch"),
    ("SELECT r.id FROM raw_import_records r", "records closing pass read"),
    ("UPDATE data_imports", "imports batch"),
    ("UPDATE discovery_flows", "discovery flows batch"),
    ("pg_advisory", "run lock"),
    ("flowfix_runs", "ledger (runs)"),
)


def statement(query: str) -> str:
    for needle, label in STATEMENTS:
        if needle in query:
            return label
    return query.strip()[:48]


def wait_label(state: str, wait_type: str, wait: str) -> str:
    """``Type:Event``, or CPU when an active backend waits on nothing; the state when it
    is not active (``idle in transaction``: the server waits for the client)."""
    label = f"{wait_type}:{wait}" if wait else "CPU"
    return label if state == "active" else f"{label} ({state or 'no state'})"


@dataclass
class Sample:
    at: float
    #: the writer's backend (None: not seen)
    writer: str | None
    #: what each flowfix session was doing: "statement: wait"
    flowfix: tuple[str, ...]
    #: the checkpointer was writing or syncing (not waiting for its next checkpoint)
    checkpoint: bool
    #: autovacuum workers and a busy WAL writer
    others: tuple[str, ...]


@dataclass
class Recording:
    pid: int = 0
    #: each writer transaction: (start, end)
    spans: list[tuple[float, float]] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None

    @property
    def latencies(self) -> common.Latencies:
        return common.Latencies([end - start for start, end in self.spans])


@dataclass
class Stall:
    """One of the writer's longest transactions and what the server showed during it."""

    start: float
    end: float
    samples: int
    writer: list[tuple[str, int]]
    flowfix: list[tuple[str, int]]
    others: list[tuple[str, int]]
    checkpoint_share: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def longest_stalls(rec: Recording, top: int = 5) -> list[Stall]:
    """The ``top`` longest writer transactions, with the wait events sampled during each
    (most frequent first)."""
    stalls = []
    times = [s.at for s in rec.samples]
    for start, end in sorted(rec.spans, key=lambda s: s[0] - s[1])[:top]:
        inside = rec.samples[bisect.bisect_left(times, start) : bisect.bisect_right(times, end)]
        writer = Counter(s.writer for s in inside if s.writer)
        flowfix = Counter(f for s in inside for f in s.flowfix)
        others = Counter(o for s in inside for o in s.others)
        share = sum(s.checkpoint for s in inside) / len(inside) if inside else 0.0
        stalls.append(
            Stall(start, end, len(inside), writer.most_common(), flowfix.most_common(6), others.most_common(4), share)
        )
    return stalls


async def _record(
    url: str, period: float, ready: multiprocessing.synchronize.Event, stop: multiprocessing.synchronize.Event
) -> Recording:
    rec = Recording()
    writes = common.app_writes()
    writer = await common.connect(url)
    sampler = await common.connect(url)
    rec.pid = writer.get_server_pid()

    async def write() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            await common.app_transaction(writer, writes)
            rec.spans.append((t0, time.monotonic()))
            if len(rec.spans) == 20:
                ready.set()
            await asyncio.sleep(0.002)

    async def sample() -> None:
        stmt = await sampler.prepare(SAMPLE_SQL)
        while not stop.is_set():
            t0 = time.monotonic()
            rows = await stmt.fetch(rec.pid)
            at = (t0 + time.monotonic()) / 2
            mine, flowfix, others, checkpoint = None, [], [], False
            for pid, backend, app, state, wtype, wait, query in rows:
                if pid == rec.pid:
                    mine = wait_label(state, wtype, wait)
                elif app == "flowfix" and state != "idle":
                    flowfix.append(f"{statement(query)}: {wait_label(state, wtype, wait)}")
                elif backend == "checkpointer":
                    checkpoint = wait != "CheckpointerMain"
                elif backend == "walwriter" and wait != "WalWriterMain":
                    others.append(f"walwriter: {wait_label('active', wtype, wait)}")
                elif backend == "autovacuum worker" and state == "active":
                    others.append(f"{query.removeprefix('autovacuum: ')[:60]}: {wait_label(state, wtype, wait)}")
            rec.samples.append(Sample(at, mine, tuple(flowfix), checkpoint, tuple(others)))
            await asyncio.sleep(max(0.0, period - (time.monotonic() - t0)))

    try:
        await asyncio.gather(write(), sample())
    finally:
        await writer.close()
        await sampler.close()
    return rec


def _child(
    url: str,
    shape: str,
    period: float,
    ready: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
    out: multiprocessing.connection.Connection,
) -> None:
    common.use_shape(shape)
    try:
        rec = asyncio.run(_record(url, period, ready, stop))
    except BaseException as exc:  # noqa: BLE001 - reported by the parent
        rec = Recording(error=f"{type(exc).__name__}: {exc}")
    ready.set()
    out.send(rec)
    out.close()


class Monitor:
    """The writer and the sampler in a child process: :meth:`start`, run, :meth:`stop`."""

    def __init__(self, url: str, period: float = 0.010) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.ready, self.stop_event = ctx.Event(), ctx.Event()
        self.receive, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(
            target=_child,
            args=(url, common.SHAPE.name, period, self.ready, self.stop_event, send),
            daemon=True,
        )

    def start(self) -> None:
        self.process.start()
        if not self.ready.wait(60):
            raise RuntimeError("the writer did not start")

    def stop(self) -> Recording:
        self.stop_event.set()
        rec: Recording = self.receive.recv() if self.receive.poll(60) else Recording(error="no recording")
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
        if rec.error:
            raise RuntimeError(f"the writer or the sampler failed: {rec.error}")
        return rec
