"""The judge: the whole runbook at scale, with the application writing all along, against
the floor measured in the same run at the same size.

Builds the dataset on the production shape (shape H by default, ``FLOWFIX_BENCH_SHAPE``
picks another): ``--records`` records (default 1M; 5M and 10M are manual runs), 50 per
import, every import and record with ``master_flow_id`` NULL. ``--evidence exact``: each
discovery flow names its import; ``--evidence time``: none does, time is the only evidence.
A twin of the database is cloned before anything runs. Then, while the application's
writer (its own process) commits a master, an import and five records per transaction in
a loop, and a sampler polls ``pg_stat_activity`` every ``--sample-ms``, runs and times:

  upgrade fix_master_flow_fk, backfill --window 2h [--jobs N], validate, upgrade head

Then the floor on the twin: fix_master_flow_fk, the imports linked as the backfill linked
them (the state its records step starts from), and one ``UPDATE ... FROM`` linking every
record with flowfix's tenant check and ledger rows (bench.common.FLOOR_WITH_LEDGER).

Prints each step (the revision's steps, planning and each table), records/s, every time
as a ratio to the floor, flowfix's peak RSS per step, the writer's p99 and its five
longest transactions with the wait events sampled during each and what flowfix was
doing, checkpoints (counters, the server log) and pg_stat_io / WAL deltas. On a server
the bench starts, log_lock_waits, log_checkpoints and log_autovacuum_min_duration=1s are
set for the run. ``--json FILE`` writes every figure.

Run: python -m bench.runbook [--records 1000000] [--jobs 1] [--evidence exact|time]
                             [--postgres 15] [--json FILE]
(DATABASE_URL: run on that server; --postgres 15: a throwaway system PostgreSQL 15;
else an embedded PostgreSQL 18.)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from bench import serverstats
from bench.common import SHAPE, bench_server, build_legacy_dataset, connect, fresh_database, ms, run_floor, settings_for
from bench.monitor import Monitor, Recording, Stall, longest_stalls
from flowfix import alembic_runner, backfill, validate
from flowfix.backfill.model import Silent
from flowfix.db import make_engine

T = TypeVar("T")
RECORDS_PER_IMPORT = 50


def rss_mib() -> float:
    """This process's peak resident set so far (Linux: ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timeline(logging.Handler, Silent):
    """What flowfix was doing when: the revisions' steps from their log lines ("step N:
    ..."), the runbook's commands, and the backfill's steps and progress (a Reporter)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self, logging.INFO)
        self.marks: list[tuple[float, str]] = []
        self.rss: list[float] = []  # the peak RSS so far at each mark
        self.progress: list[tuple[float, str, int, int]] = []  # at, step, done, total
        self.totals: dict[str, int] = {}
        self.done: dict[str, int] = {}

    def mark(self, label: str) -> None:
        self.marks.append((time.monotonic(), label))
        self.rss.append(rss_mib())

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("step "):
            step, _, rest = message.partition(":")
            self.mark(f"  {step}:{rest.split(':')[0]}"[:46])

    def start(self, step: str, total: int | None) -> None:
        self.mark(f"  backfill {step}")
        self.totals[step], self.done[step] = total or 0, 0

    def advance(self, step: str, n: int) -> None:
        self.done[step] = self.done.get(step, 0) + n
        self.progress.append((time.monotonic(), step, self.done[step], self.totals.get(step, 0)))

    def at(self, moment: float) -> str:
        """The step running at ``moment``, with the backfill's progress then."""
        label = "before the runbook"
        for when, name in self.marks:
            if when > moment:
                break
            label = name.strip()
        for when, step, done, total in reversed(self.progress):
            if when <= moment and label.endswith(step):
                label += f" ({done:,}/{total:,})" if total else f" ({done:,})"
                break
        return label


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument(
        "--evidence",
        choices=["exact", "time"],
        default="exact",
        help="exact: each discovery flow names its import; time: none does (time is the only evidence)",
    )
    parser.add_argument(
        "--postgres", choices=["", "15"], default="", help="15: a throwaway system PostgreSQL 15 (not DATABASE_URL)"
    )
    parser.add_argument("--sample-ms", type=float, default=10.0, help="the sampler's period")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    parser.add_argument("--server-log", type=Path, help="the server's log file, if readable (DATABASE_URL)")
    args = parser.parse_args()
    imports = max(1, args.records // RECORDS_PER_IMPORT)
    out: dict[str, Any] = {
        "records": imports * RECORDS_PER_IMPORT,
        "imports": imports,
        "jobs": args.jobs,
        "evidence": args.evidence,
        "shape": SHAPE.name,
        "machine": serverstats.machine(),
    }

    with bench_server(args.postgres) as srv:
        log_path = args.server_log or srv.log

        async def server_facts() -> dict[str, Any]:
            conn = await connect(srv.url)
            try:
                if srv.owned:
                    await serverstats.enable_run_logging(conn)
                return await serverstats.describe(conn)
            finally:
                await conn.close()

        pg = asyncio.run(server_facts())
        out["postgres"] = pg
        version = pg["server_version_num"]

        url = fresh_database(srv.url, "bench_runbook")
        t0 = time.perf_counter()
        build_legacy_dataset(url, imports=imports, discovery_names_import=args.evidence == "exact")
        twin = fresh_database(srv.url, "bench_runbook_floor", template="bench_runbook", file_copy=version >= 150000)
        out["build_seconds"] = round(time.perf_counter() - t0, 1)
        print(
            f"runbook: {imports:,} imports, {imports * RECORDS_PER_IMPORT:,} records on shape {SHAPE.name},"
            f" evidence {args.evidence}, --jobs {args.jobs} (built and cloned in {out['build_seconds']:.0f} s)"
        )

        settings = settings_for(url)
        timeline = Timeline()
        logging.getLogger("flowfix").addHandler(timeline)
        logging.getLogger("flowfix").setLevel(logging.INFO)

        async def read_counters() -> serverstats.Counters:
            conn = await connect(url)
            try:
                return await serverstats.counters(conn, version)
            finally:
                await conn.close()

        log_offset = serverstats.log_size(log_path)
        before = asyncio.run(read_counters())
        rss_start = rss_mib()
        monitor = Monitor(url, args.sample_ms / 1000)
        monitor.start()
        steps: list[dict[str, Any]] = []

        def step(name: str, fn: Callable[[], T]) -> T:
            timeline.mark(name)
            first = len(timeline.marks)
            started = time.monotonic()
            result = fn()
            ended = time.monotonic()
            parts = list(itertools.pairwise([*timeline.marks[first:], (ended, "")]))
            peaks = [*timeline.rss[first + 1 :], rss_mib()][: len(parts)]
            steps.append(
                {
                    "step": name,
                    "seconds": round(ended - started, 3),
                    "peak_rss_mib": round(rss_mib(), 1),
                    "parts": [
                        (label.strip(), round(nxt - at, 3), round(peak, 1))
                        for ((at, label), (nxt, _)), peak in zip(parts, peaks, strict=True)
                    ],
                }
            )
            return result

        async def run_backfill() -> backfill.Result:
            engine = make_engine(settings)
            try:
                timeline.mark("  backfill planning")
                opts = backfill.Options(window_seconds=7200, jobs=args.jobs)
                return await backfill.run(engine, settings, opts, timeline)
            finally:
                await engine.dispose()

        async def run_validate() -> validate.Report:
            engine = make_engine(settings)
            try:
                return await validate.validate(engine, settings, validate.Options(samples=0))
            finally:
                await engine.dispose()

        try:
            start = time.monotonic()
            time.sleep(0.5)  # the writer's latencies before anything runs
            step("upgrade fix_master_flow_fk", lambda: alembic_runner.upgrade(settings, "fix_master_flow_fk"))
            result = step("backfill --window 2h", lambda: asyncio.run(run_backfill()))
            report = step("validate", lambda: asyncio.run(run_validate()))
            step("upgrade head", lambda: alembic_runner.upgrade(settings, "head"))
            end = time.monotonic()
            time.sleep(0.5)
        finally:
            recording = monitor.stop()
        after = asyncio.run(read_counters())
        events = serverstats.log_events(log_path, log_offset)
        out["peak_rss_mib"] = {"at_start": round(rss_start, 1), "end": round(rss_mib(), 1)}

        # the floor, on the twin, at the state the records step started from
        assert result.counts is not None
        alembic_runner.upgrade(settings_for(twin), "fix_master_flow_fk")
        links = [(link.id, link.master_flow_id) for link in result.plan.import_links]
        floor_seconds, floor_records = asyncio.run(run_floor(twin, links))

    out.update(summarize(result, report, steps, timeline, recording, start, end, floor_seconds, floor_records, events))
    out["server"] = serverstats.deltas(before, after)
    out["machine"]["loadavg_end"] = [round(x, 2) for x in serverstats.machine()["loadavg"]]
    print_report(out)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"figures written to {args.json}")


def summarize(
    result: backfill.Result,
    report: validate.Report,
    steps: list[dict[str, Any]],
    timeline: Timeline,
    recording: Recording,
    start: float,
    end: float,
    floor_seconds: float,
    floor_records: int,
    events: list[serverstats.LogEvent],
) -> dict[str, Any]:
    """Every figure of the run, as data (printed, and written by --json)."""
    assert result.counts is not None
    c = result.counts
    records_seconds = c.seconds.get("raw_import_records", 0.0)
    # the writer's transactions while the runbook ran (not its warm-up)
    recording.spans = [(a, b) for a, b in recording.spans if b >= start and a <= end]
    lat = recording.latencies
    stalls = longest_stalls(recording)

    def stall(s: Stall) -> dict[str, Any]:
        overlapping = [e for e in events if e.start <= s.end and e.end >= s.start]
        return {
            "at_seconds": round(s.start - start, 1),
            "ms": round(s.seconds * 1000, 1),
            "flowfix_step": timeline.at(s.start),
            "writer_waits": s.writer,
            "flowfix_sessions": s.flowfix,
            "other_backends": s.others,
            "checkpoint_running_share": round(s.checkpoint_share, 2),
            "samples": s.samples,
            "log_events": [f"{e.kind}: {e.text}" for e in overlapping],
        }

    return {
        "total_seconds": round(end - start, 3),
        "steps": steps,
        "backfill": {
            "seconds": c.seconds,
            "records_linked": c.raw_import_records,
            "records_closing_pass": c.records_final_pass,
            "imports_linked": c.data_imports,
            "discovery_flows_linked": c.discovery_flows,
            "batches": c.batches,
            "longest_batch_ms": c.longest_batch_ms,
            "jobs": c.jobs,
            "records_walk": c.records_walk,
            "import_evidence": {str(getattr(k, "value", k)): n for k, n in result.plan.import_evidence().items()},
            "records_per_s": round(c.raw_import_records / records_seconds) if records_seconds else None,
        },
        "validate_ok": report.ok,
        "floor": {
            "seconds": round(floor_seconds, 3),
            "records": floor_records,
            "records_per_s": round(floor_records / floor_seconds) if floor_seconds else None,
            "records_step_over_floor": round(records_seconds / floor_seconds, 2) if floor_seconds else None,
            "throughput_vs_floor": round((c.raw_import_records / records_seconds) / (floor_records / floor_seconds), 2)
            if records_seconds and floor_seconds and floor_records
            else None,
        },
        "writer": {
            "transactions": len(lat.samples),
            "longest_ms": round(lat.longest * 1000, 1),
            "p99_ms": round(lat.p99 * 1000, 1),
            "samples": len(recording.samples),
            "sample_period_ms": round(
                (recording.samples[-1].at - recording.samples[0].at) / len(recording.samples) * 1000, 1
            )
            if len(recording.samples) > 1
            else None,
            "longest": [stall(s) for s in stalls],
        },
        "log_events": {
            kind: len([e for e in events if e.kind == kind]) for kind in ("checkpoint", "lock wait", "autovacuum")
        },
    }


def print_report(out: dict[str, Any]) -> None:
    floor = out["floor"]["seconds"] or float("nan")

    def line(name: str, seconds: float, extra: str = "") -> None:
        print(f"  {name:<46} {seconds:>8.1f} s {seconds / floor:>6.2f}x floor{extra}")

    b = out["backfill"]
    for s in out["steps"]:
        line(s["step"], s["seconds"], f"   peak RSS {s['peak_rss_mib']:,.0f} MiB")
        if s["step"].startswith("upgrade"):
            for label, seconds, _ in s["parts"]:
                line(f"    {label}", seconds)
        if s["step"].startswith("backfill"):
            peaks = {label.removeprefix("backfill "): peak for label, _, peak in s["parts"]}
            for name, seconds in b["seconds"].items():
                name = "planning" if name == "plan" else name
                line(f"    {name}", seconds, f"   peak RSS {peaks.get(name, 0):,.0f} MiB")
            print(
                f"      {b['records_linked']:,} records ({b['records_closing_pass']:,} in the closing pass,"
                f" walk {b['records_walk']}, {b['jobs']} job(s)) at {b['records_per_s'] or 0:,} records/s;"
                f" {b['imports_linked']:,} imports {b['import_evidence']}; {b['batches']:,} batches,"
                f" longest {b['longest_batch_ms']:,.0f} ms"
            )
    print(f"  {'total':<46} {out['total_seconds']:>8.1f} s {out['total_seconds'] / floor:>6.2f}x floor")
    f = out["floor"]
    print(
        f"  floor (one UPDATE ... FROM, tenant check, ledger) {f['seconds']:.1f} s for {f['records']:,} records"
        f" ({f['records_per_s'] or 0:,}/s): records step / floor {f['records_step_over_floor']}x,"
        f" throughput {f['throughput_vs_floor']} of the floor's (target >= 0.9)"
    )
    print(f"  validate ok: {out['validate_ok']} (the writer's own new imports and records have no master, by design)")
    rss = out["peak_rss_mib"]
    print(
        f"  flowfix peak RSS {rss['end']:,.0f} MiB (the bench process; {rss['at_start']:,.0f} MiB before the runbook)"
    )
    w = out["writer"]
    print(
        f"  application writer: {w['transactions']:,} transactions, longest {ms(w['longest_ms'] / 1000)},"
        f" p99 {ms(w['p99_ms'] / 1000)} (targets: 1 s, 50 ms); {w['samples']:,} samples every"
        f" {w['sample_period_ms']} ms"
    )
    for s in w["longest"]:
        waits = ", ".join(f"{k} x{n}" for k, n in s["writer_waits"]) or "no sample"
        print(f"    {s['ms']:>8,.0f} ms at +{s['at_seconds']:.1f} s during {s['flowfix_step']}")
        print(f"        writer: {waits}")
        if s["flowfix_sessions"]:
            print("        flowfix: " + ", ".join(f"{k} x{n}" for k, n in s["flowfix_sessions"]))
        extra = (
            [f"checkpoint running in {s['checkpoint_running_share']:.0%} of samples"]
            if s["checkpoint_running_share"]
            else []
        )
        extra += [f"{k} x{n}" for k, n in s["other_backends"]] + s["log_events"]
        if extra:
            print("        server: " + "; ".join(extra))
    srv = out["server"]
    print(
        f"  checkpoints during the runbook: {srv['checkpoints']} (server log: {out['log_events']});"
        f" WAL {srv.get('wal_mib', '?')} MiB ({srv.get('wal_mib_per_s', '?')} MiB/s)"
    )
    if srv["io"]:
        print("  pg_stat_io deltas (backend/object/context: reads, writes, extends, fsyncs), largest first:")
        for key, v in list(srv["io"].items())[:6]:
            print(f"    {key:<44} {v['reads']:>9,} {v['writes']:>9,} {v['extends']:>9,} {v['fsyncs']:>7,}")
    m, pg = out["machine"], out["postgres"]
    print(
        f"  machine: {m['cpus']} CPUs {m['machine']}, {m['memory_mib']:,} MiB, Linux {m['kernel']}, Python {m['python']},"
        f" load {m['loadavg'][0]} -> {m['loadavg_end'][0]}; PostgreSQL {pg['server_version']}"
        f" (shared_buffers {pg['shared_buffers']}, max_wal_size {pg['max_wal_size']}, fsync {pg['fsync']},"
        f" synchronous_commit {pg['synchronous_commit']})"
    )


if __name__ == "__main__":
    main()
