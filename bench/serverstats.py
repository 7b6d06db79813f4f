"""What the server says about a run: its version and settings, cumulative counters
(checkpoints, WAL, ``pg_stat_io``) before and after, and the events of its log.

Counters differ by version: ``pg_stat_checkpointer`` from PostgreSQL 17 (before, the
checkpoint counters are in ``pg_stat_bgwriter``); ``pg_stat_io`` from 16; ``pg_stat_wal``
from 14.
"""

from __future__ import annotations

import itertools
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

#: Set for the run on a server the bench started (ALTER SYSTEM + reload): lock waits over
#: deadlock_timeout (1 s), every checkpoint, autovacuum runs over a second.
RUN_SETTINGS = {"log_lock_waits": "on", "log_checkpoints": "on", "log_autovacuum_min_duration": "1s"}

SHOWN = ("shared_buffers", "max_wal_size", "checkpoint_timeout", "fsync", "synchronous_commit", "deadlock_timeout")


async def describe(conn: asyncpg.Connection) -> dict[str, Any]:
    """The server's version and the settings that matter for these figures."""
    out: dict[str, Any] = {"server_version_num": int(await conn.fetchval("SHOW server_version_num"))}
    out["server_version"] = await conn.fetchval("SHOW server_version")
    for name in (*SHOWN, *RUN_SETTINGS):
        out[name] = await conn.fetchval(f"SHOW {name}")
    return out


async def enable_run_logging(conn: asyncpg.Connection) -> None:
    for name, value in RUN_SETTINGS.items():
        await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
    await conn.execute("SELECT pg_reload_conf()")


def machine() -> dict[str, Any]:
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) // 1024
    except OSError:
        pass
    return {
        "machine": platform.machine(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory_mib": mem,
        "python": sys.version.split()[0],
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


@dataclass
class Counters:
    at: float
    #: timed, requested, write_ms, sync_ms, buffers
    checkpoints: dict[str, float]
    wal_bytes: float | None
    #: pg_stat_io rows: "backend_type/object/context" -> reads, writes, extends, fsyncs
    io: dict[str, dict[str, float]] = field(default_factory=dict)


async def counters(conn: asyncpg.Connection, version: int) -> Counters:
    if version >= 170000:
        sql = (
            "SELECT num_timed AS timed, num_requested AS requested, write_time AS write_ms, sync_time AS sync_ms,"
            " buffers_written AS buffers FROM pg_stat_checkpointer"
        )
    else:
        sql = (
            "SELECT checkpoints_timed AS timed, checkpoints_req AS requested, checkpoint_write_time AS write_ms,"
            " checkpoint_sync_time AS sync_ms, buffers_checkpoint AS buffers FROM pg_stat_bgwriter"
        )
    checkpoints = {k: float(v) for k, v in dict(await conn.fetchrow(sql)).items()}
    wal = await conn.fetchval("SELECT wal_bytes FROM pg_stat_wal") if version >= 140000 else None
    io: dict[str, dict[str, float]] = {}
    if version >= 160000:
        for row in await conn.fetch(
            "SELECT backend_type || '/' || object || '/' || context AS key, coalesce(reads, 0) AS reads,"
            " coalesce(writes, 0) AS writes, coalesce(extends, 0) AS extends, coalesce(fsyncs, 0) AS fsyncs"
            " FROM pg_stat_io"
        ):
            io[row["key"]] = {k: float(row[k]) for k in ("reads", "writes", "extends", "fsyncs")}
    return Counters(time.monotonic(), checkpoints, float(wal) if wal is not None else None, io)


def deltas(before: Counters, after: Counters) -> dict[str, Any]:
    seconds = max(1e-9, after.at - before.at)
    out: dict[str, Any] = {
        "checkpoints": {k: round(after.checkpoints[k] - before.checkpoints[k], 1) for k in after.checkpoints}
    }
    if after.wal_bytes is not None and before.wal_bytes is not None:
        wal = after.wal_bytes - before.wal_bytes
        out["wal_mib"] = round(wal / 2**20, 1)
        out["wal_mib_per_s"] = round(wal / 2**20 / seconds, 1)
    io = {}
    for key, now in after.io.items():
        was = before.io.get(key, dict.fromkeys(now, 0.0))
        diff = {k: now[k] - was[k] for k in now}
        if any(diff.values()):
            io[key] = {k: int(v) for k, v in diff.items()}
    out["io"] = dict(sorted(io.items(), key=lambda kv: -sum(kv[1].values())))
    return out


@dataclass
class LogEvent:
    start: float  # monotonic
    end: float
    kind: str  # checkpoint, lock wait, autovacuum
    text: str


LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?) (\w+) \[\d+\] \w+:\s+(.*)$")


def log_events(path: Path | None, offset: int) -> list[LogEvent]:
    """Checkpoints (start to end), lock waits logged by log_lock_waits, and autovacuum
    runs, from the server log past ``offset``; times mapped onto ``time.monotonic()``
    (the server runs on this machine, on the same clock)."""
    if path is None or not path.exists():
        return []
    shift = time.time() - time.monotonic()
    with path.open("rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    events: list[LogEvent] = []
    checkpoint_start: float | None = None
    for i, line in enumerate(lines):
        m = LINE.match(line)
        if not m or m.group(2) not in ("UTC", "GMT"):
            continue
        stamp = datetime.fromisoformat(m.group(1)).replace(tzinfo=UTC).timestamp() - shift
        message = m.group(3)
        if message.startswith("checkpoint starting") or message.startswith("restartpoint starting"):
            checkpoint_start = stamp
        elif message.startswith("checkpoint complete"):
            events.append(LogEvent(checkpoint_start or stamp, stamp, "checkpoint", message[:160]))
            checkpoint_start = None
        elif "still waiting for" in message or " acquired " in message:
            events.append(LogEvent(stamp, stamp, "lock wait", message[:160]))
        elif message.startswith("automatic vacuum") or message.startswith("automatic analyze"):
            rest = itertools.takewhile(lambda x: not LINE.match(x), lines[i + 1 :])
            took = re.search(r"elapsed: ([\d.]+) s", " ".join(rest))
            events.append(LogEvent(stamp - float(took.group(1)) if took else stamp, stamp, "autovacuum", message[:100]))
    if checkpoint_start is not None:
        events.append(LogEvent(checkpoint_start, time.monotonic(), "checkpoint", "checkpoint still running"))
    return events


def log_size(path: Path | None) -> int:
    return path.stat().st_size if path is not None and path.exists() else 0
