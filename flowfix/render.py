"""Every result, rendered: text for people, JSON and JUnit for machines, the demo's
narration. Results carry data (ids as UUIDs, counts as dataclasses); this is the one
place that turns them into strings."""

from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # rendering never needs the database modules loaded
    from rich.console import Console

    from flowfix.backfill import Result
    from flowfix.estimate import Estimate
    from flowfix.ledger import RunInfo, RunProgress, StepProgress, UndoReport
    from flowfix.validate import Report


class ValidateFormat(StrEnum):
    """What ``flowfix validate --format`` can print."""

    text = "text"
    json = "json"
    junit = "junit"
    openmetrics = "openmetrics"


class TextOrJson(StrEnum):
    """What ``flowfix backfill --format`` and ``flowfix runs --format`` can print."""

    text = "text"
    json = "json"


def to_json(data: Any, indent: int | None = 2) -> str:
    """JSON as flowfix prints it (``indent=None``: one line, as ``--watch`` streams it)."""
    return json.dumps(data, indent=indent, default=str)


# --- validate ------------------------------------------------------------------------------


def validate_dict(report: Report) -> dict[str, object]:
    return {"ok": report.ok, "revision": report.revision, "checks": [asdict(c) for c in report.checks]}


def validate_text(report: Report) -> str:
    width = max(len(c.name) for c in report.checks)
    lines = [f"flowfix validate: revision {report.revision or '(none)'}"]
    for c in report.checks:
        sample = f"  e.g. {', '.join(c.samples)}" if c.samples else ""
        lines.append(f"  {c.status.upper():<4}  {c.name:<{width}}  {c.count:>9,}  {c.message}{sample}")
    lines.append("OK" if report.ok else "FAILED")
    return "\n".join(lines)


def validate_junit(report: Report) -> str:
    """One testcase per check; fail (and warn, with --fail-on warn) as <failure>."""
    suite = ET.Element("testsuite", name="flowfix.validate", tests=str(len(report.checks)))
    failures = 0
    for c in report.checks:
        case = ET.SubElement(suite, "testcase", classname="flowfix.validate", name=c.name)
        if c.status == "fail" or (c.status == "warn" and report.fail_on == "warn"):
            failures += 1
            failure = ET.SubElement(case, "failure", message=c.message, type=c.status)
            failure.text = f"count: {c.count}\nsamples: {', '.join(c.samples) or '-'}"
        elif c.status == "warn":
            ET.SubElement(case, "system-out").text = f"warning: {c.message}"
    suite.set("failures", str(failures))
    return ET.tostring(suite, encoding="unicode", xml_declaration=True)


#: a check's status as a gauge value
STATUS_VALUE = {"pass": 0, "warn": 1, "fail": 2}


def _label(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') + '"'


def check_labels(name: str) -> dict[str, str]:
    """``data_imports.orphaned`` -> table data_imports, check orphaned; ``fk.data_imports``
    -> table data_imports, check fk; a check across tables (``tenant_mismatch``) has no table."""
    first, dot, rest = name.partition(".")
    if not dot:
        return {"table": "", "check": name}
    return {"table": rest, "check": "fk"} if first == "fk" else {"table": first, "check": rest}


def validate_openmetrics(report: Report, now: float | None = None) -> str:
    """The report as OpenMetrics text (Prometheus exposition; node_exporter's textfile
    collector reads it): a gauge per check, the revision as an info-style gauge, the scan's
    duration, and when it ran."""
    out: list[str] = []

    def family(name: str, help_: str, samples: list[tuple[dict[str, str], float]], unit: str = "") -> None:
        out.append(f"# TYPE {name} gauge")
        if unit:
            out.append(f"# UNIT {name} {unit}")
        out.append(f"# HELP {name} {help_}")
        for labels, value in samples:
            shown = ",".join(f"{k}={_label(v)}" for k, v in labels.items())
            number = str(int(value)) if isinstance(value, int) else repr(float(value))  # exact, never 1e+07
            out.append(f"{name}{{{shown}}} {number}" if shown else f"{name} {number}")

    family(
        "flowfix_check_status",
        "flowfix validate check status (0 pass, 1 warn, 2 fail).",
        [(check_labels(c.name), STATUS_VALUE[c.status]) for c in report.checks],
    )
    family(
        "flowfix_check_count",
        "Rows (or constraints) each flowfix validate check found.",
        [(check_labels(c.name), c.count) for c in report.checks],
    )
    family(
        "flowfix_revision_info",
        "flowfix's revision of the database (label revision; empty: none) and its head.",
        [({"revision": report.revision or "", "head": report.head or ""}, 1)],
    )
    family(
        "flowfix_at_head", "1 when the database is at flowfix's head revision.", [({}, report.revision == report.head)]
    )
    family("flowfix_ok", "1 when flowfix validate passed (exit code 0).", [({}, report.ok)])
    family(
        "flowfix_scan_duration_seconds", "How long flowfix validate's checks took.", [({}, report.seconds)], "seconds"
    )
    family(
        "flowfix_last_run_timestamp_seconds",
        "When this flowfix validate report was made (Unix time).",
        [({}, round(time.time() if now is None else now, 3))],
        "seconds",
    )
    out.append("# EOF")
    return "\n".join(out)


def validate_as(report: Report, fmt: ValidateFormat) -> str:
    if fmt == ValidateFormat.json:
        return to_json(validate_dict(report))
    if fmt == ValidateFormat.openmetrics:
        return validate_openmetrics(report)
    return validate_junit(report) if fmt == ValidateFormat.junit else validate_text(report)


# --- backfill ------------------------------------------------------------------------------


def backfill_dict(result: Result) -> dict[str, Any]:
    plan = result.plan
    links = []
    for link in (*plan.discovery_links, *plan.import_links, *plan.record_links):
        entry = {k: str(v) if k in ("id", "master_flow_id") else v for k, v in asdict(link).items()}
        if entry["rows"] is None:
            del entry["rows"]
        links.append(entry)
    counts: dict[str, Any] = plan.summary()
    if result.counts is not None:
        counts.update(asdict(result.counts))
    if result.left is not None:
        counts.update({f"left_{table}": n for table, n in result.left.items()})
    return {
        "run_id": str(result.run_id) if result.run_id else None,
        "dry_run": result.dry_run,
        "window_seconds": result.window_seconds,
        "counts": counts,
        "links": links,
        "ambiguous": [
            {"table": a.table, "id": str(a.id), "candidates": [str(c) for c in a.candidates], "reason": a.reason}
            for a in plan.ambiguous
        ],
        "unmatched": [{"table": u.table, "id": str(u.id), "reason": u.reason} for u in plan.unmatched],
        **({"estimate": estimate_dict(result.estimate)} if result.estimate is not None else {}),
    }


def estimate_dict(estimate: Estimate) -> dict[str, Any]:
    return {
        "seconds": round(estimate.seconds, 3),
        "steps": [{**asdict(s), "seconds": round(s.seconds, 3)} for s in estimate.steps],
    }


def estimate_lines(estimate: Estimate) -> list[str]:
    lines = [f"  estimate for the real run: about {_duration(estimate.seconds)}"]
    lines += [f"    {s.step:<19} {_duration(s.seconds):>8}  {s.rows:>11,} rows  ({s.basis})" for s in estimate.steps]
    return lines


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s" if seconds >= 1 else "<1 s"
    return f"{seconds / 60:.1f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def backfill_json(result: Result) -> str:
    return to_json(backfill_dict(result))


#: how the report names each health signal (flowfix.batches.SIGNALS) a run paused for
PAUSE_REASONS = {
    "replica_lag": "replica lag",
    "wraparound_vacuum": "an autovacuum to prevent wraparound",
    "wal_archive": "WAL archiving",
}


def backfill_text(result: Result) -> str:
    plan, c = result.plan, result.counts
    head = (
        f"backfill plan (dry run: nothing changed; would resume run {result.run_id}, interrupted)"
        if result.dry_run and result.resumed
        else "backfill plan (dry run: nothing changed)"
        if result.dry_run
        else f"backfill run {result.run_id}{' (resumed an interrupted run)' if result.resumed else ''}"
    )
    lines = [head, f"  window: {result.window_seconds:g} s"]
    if c is None:
        lines.append(
            f"  would link: {len(plan.discovery_links):,} discovery flows ({len(plan.masters_to_create):,} with a new"
            f" master), {len(plan.import_links):,} imports, {plan.records_to_link:,} records"
        )
    else:
        lines.append(
            f"  linked: {c.discovery_flows:,} discovery flows ({c.masters_created:,} masters created),"
            f" {c.data_imports:,} imports, {c.raw_import_records:,} records in {c.batches} batches"
            f" (longest {c.longest_batch_ms} ms; records walked by {c.records_walk} on {c.jobs} connection"
            f"{'s' if c.jobs > 1 else ''})"
        )
        if c.records_final_pass:
            lines.append(f"  of those, {c.records_final_pass:,} records by the closing pass (moved or added mid-walk)")
        if c.skipped:
            lines.append(f"  skipped {c.skipped} planned links: the rows changed since planning")
        for signal, paused in c.pauses.items():
            why = PAUSE_REASONS.get(signal, signal)
            lines.append(f"  paused {int(paused['pauses'])} times ({paused['seconds']:.1f} s) for {why}")
        lines += [f"  blind: {blind}" for blind in c.blind]
    evidence = plan.import_evidence()
    if evidence:
        lines.append("  imports by evidence: " + ", ".join(f"{k} {v:,}" for k, v in sorted(evidence.items())))
    if result.left is not None:
        lines.append(
            "  left NULL (read back after the run): " + ", ".join(f"{n:,} {table}" for table, n in result.left.items())
        )
    lines.append(f"  ambiguous: {len(plan.ambiguous):,}   unmatched: {len(plan.unmatched):,}")
    for a in plan.ambiguous[:10]:
        lines.append(f"    ambiguous {a.table} {a.id}: {a.reason} ({', '.join(str(x) for x in a.candidates)})")
    for u in plan.unmatched[:10]:
        lines.append(f"    unmatched {u.table} {u.id}: {u.reason}")
    more = len(plan.ambiguous) + len(plan.unmatched) - 20
    if more > 0:
        lines.append(f"    ... and {more} more (--format json or --report FILE lists them all)")
    if result.estimate is not None:
        lines += estimate_lines(result.estimate)
    if not result.dry_run and result.run_id:
        lines.append(f"  undo with: flowfix undo {result.run_id}")
    return "\n".join(lines)


def plan_reasons(result: Result) -> dict[str, int]:
    """How many rows are left for a human, per table and reason."""
    reasons: dict[str, int] = {}
    for table, reason in [(a.table, a.reason) for a in result.plan.ambiguous] + [
        (u.table, u.reason) for u in result.plan.unmatched
    ]:
        reasons[f"{table}: {reason}"] = reasons.get(f"{table}: {reason}", 0) + 1
    return dict(sorted(reasons.items()))


# --- ledger --------------------------------------------------------------------------------


def undo_text(report: UndoReport) -> str:
    if report.already_undone:
        return f"run {report.run_id} was already undone: nothing to do"
    lines = [
        f"undid run {report.run_id}: {report.reverted} values reverted, {len(report.skipped)} left alone "
        f"(changed since), {report.deleted_masters} created masters deleted; recorded as run {report.undo_run_id}"
    ]
    lines += [f"  kept {s['table']} {s['id']}: {s['reason']}" for s in report.skipped]
    return "\n".join(lines)


def run_line(run: RunInfo) -> str:
    finished = run.finished_at.isoformat(timespec="seconds") if run.finished_at else "-"
    counts = {k: v for k, v in run.counts.items() if k not in ("walk", "blind", "live")}
    return (
        f"{run.id}  {run.command:<8} {run.status:<9} {run.started_at.isoformat(timespec='seconds')}"
        f"  {finished}  {json.dumps(counts, sort_keys=True)}"
    )


def run_dict(run: RunInfo) -> dict[str, Any]:
    return {**asdict(run), "counts": {k: v for k, v in run.counts.items() if k != "walk"}}


def step_dict(step: StepProgress, now: datetime | None, active: bool = True) -> dict[str, Any]:
    """A step's progress rows summed, with what follows from them at ``now``: the share
    done, the rate (rows per second of wall time since the step began) and the ETA. Of a
    run no process works on (``active`` False), no worker is on a range it left claimed,
    and no ETA is promised for what is not finished."""
    out = {**asdict(step), "fraction": step.fraction, "finished": step.finished}
    if not active:
        out["workers"] = 0
    if now is not None:
        rate, eta = step.rate(now), step.eta_seconds(now) if active or step.finished else None
        out["rows_per_second"] = None if rate is None else round(rate, 1)
        out["eta_seconds"] = None if eta is None else round(eta, 1)
        out["eta_at"] = None if eta is None else now + timedelta(seconds=eta)
    return out


def run_progress_dict(progress: RunProgress) -> dict[str, Any]:
    """``flowfix runs RUN --format json``: the run; whether a process works on it now
    (``active``: it holds the run lock); per step its progress rows summed with rate and
    ETA; the pause it is in, pauses so far and throttle blind spots (``live``)."""
    live = progress.live
    # the ledger is a table other roles may write (and other flowfix versions): shapes checked
    paused = live.get("paused")
    pauses = live.get("pauses") or progress.run.counts.get("pauses") or {}
    blind = live.get("blind") or progress.run.counts.get("blind") or []
    return {
        "run": run_dict(progress.run),
        "active": progress.active,
        "now": progress.now,
        "workers": sum(step.workers for step in progress.steps) if progress.active else 0,
        "paused": paused if progress.active and isinstance(paused, dict) else None,
        "pauses": {k: v for k, v in pauses.items() if isinstance(v, dict)} if isinstance(pauses, dict) else {},
        "blind": [str(b) for b in blind] if isinstance(blind, list) else [],
        "steps": [step_dict(step, progress.now, progress.active) for step in progress.steps],
    }


def run_progress_json(progress: RunProgress) -> str:
    return to_json(run_progress_dict(progress))


def _number(value: Any) -> float:
    """A count from the ledger's live state, 0 where it is not a number."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def run_progress_text(progress: RunProgress) -> str:
    """What another shell shows of a run: a line for the run, then one per step (done,
    rate, ETA, workers, attempts, last error), then the pause it is in and why."""
    view = run_progress_dict(progress)
    state = (
        "ACTIVE"
        if progress.active
        else (
            "INTERRUPTED (no process holds the run lock)" if progress.run.status == "running" else progress.run.status
        )
    )
    lines = [run_line(progress.run), f"  state: {state}"]
    if not progress.steps:
        lines.append("  no progress rows for this run")
    for step, shown in zip(progress.steps, view["steps"], strict=True):
        unit = {"ctid": "pages", "key": "key space", "plan": "planned links"}.get(step.walk, "closing pass only")
        fraction = shown["fraction"]
        share = "-" if fraction is None else f"{fraction:.0%}"
        line = f"  {step.step}: {share} of {unit}"
        if step.walk in ("ctid", "key"):
            line += f" ({step.done}/{step.ranges} ranges)"
        elif step.walk == "plan":
            line += f" ({step.done:,}/{step.ranges:,})"
        line += f", {step.rows_changed:,} rows changed"
        if step.walk != "plan":
            line += f" ({step.closing_rows:,} by the closing pass), {step.batches:,} batches, {step.attempts} attempts"
        if progress.active and not step.finished:
            if shown.get("rows_per_second") is not None:
                line += f", {shown['rows_per_second']:,.0f} rows/s"
            if shown.get("eta_at") is not None:
                line += f", ETA {shown['eta_at'].strftime('%H:%M:%S %Z')} (in {_duration(shown['eta_seconds'])})"
            if step.workers:
                line += f", {step.workers} worker{'s' if step.workers != 1 else ''}"
        elif step.finished:
            line += ", done"
        if step.last_error:
            line += f"; last error: {step.last_error}"
        lines.append(line)
    if view["paused"]:
        p = view["paused"]
        lines.append(f"  PAUSED since {p.get('since')}: {p.get('why')} ({p.get('signal')})")
    for signal, n in (view["pauses"] or {}).items():
        lines.append(f"  pauses for {signal}: {int(_number(n.get('pauses')))}, {_number(n.get('seconds')):.1f} s")
    for blind in view["blind"]:
        lines.append(f"  throttle blind: {blind}")
    return "\n".join(lines)


# --- the demo's narration -------------------------------------------------------------------


class Narrator:
    """Rich tables on a terminal, plain lines when piped."""

    def __init__(self, console: Console | None = None) -> None:
        from rich.console import Console

        self.console = console or Console(highlight=False, soft_wrap=True)
        self.step = 0
        self.started = time.perf_counter()

    def title(self, text_: str) -> None:
        self.step += 1
        elapsed = time.perf_counter() - self.started
        self.console.print(
            f"\n[bold]{self.step}. {text_}[/bold]  ({elapsed:.1f} s)"
            if self.console.is_terminal
            else f"\n{self.step}. {text_}  ({elapsed:.1f} s)"
        )

    def say(self, text_: str) -> None:
        self.console.print(f"   {text_}", markup=False)

    def report(self, report: Report) -> None:
        from rich.table import Table

        shown = [c for c in report.checks if c.status != "pass"]
        if self.console.is_terminal:
            table = Table("status", "check", "count", "message", box=None, padding=(0, 1))
            for c in shown:
                color = {"fail": "red", "warn": "yellow"}[c.status]
                table.add_row(f"[{color}]{c.status.upper()}[/{color}]", c.name, f"{c.count:,}", c.message)
            self.console.print(table)
        else:
            for c in shown:
                self.say(f"{c.status.upper():<4} {c.name:<28} {c.count:>6,}  {c.message}")
        passed = sum(c.status == "pass" for c in report.checks)
        self.say(f"{passed} of {len(report.checks)} checks pass -> {'OK (exit 0)' if report.ok else 'FAILED (exit 1)'}")

    def plan(self, result: Result) -> None:
        p = result.plan
        evidence = ", ".join(f"{k} {v}" for k, v in p.import_evidence().items())
        self.say(
            f"would link {len(p.discovery_links)} discovery flows ({len(p.masters_to_create)} new masters),"
            f" {len(p.import_links)} imports ({evidence}), {p.records_to_link:,} records"
        )
        for reason, count in plan_reasons(result).items():
            self.say(f"{count:>4} x {reason}")
