"""The ``flowfix`` command: parse, call the library, print, exit.

Exit codes: 0 ok, 1 integrity problems found, 2 usage or connection error (one line on
stderr, nothing changed). No SQL lives here.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from flowfix import backfill as backfilling, ledger, linking, schema, validate as validation
from flowfix.config import Settings, mask_url
from flowfix.db import make_sessionmaker, run_with_engine
from flowfix.errors import FlowfixError
from flowfix.window import parse_window

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2

app = typer.Typer(
    name="flowfix",
    help="Repair and guard the master-flow links of the discovery-flow tables.\n\n"
    "Reads DATABASE_URL (postgresql://...) and FLOWFIX_SCHEMA (default: public).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals would include database URLs
    pretty_exceptions_enable=False,  # a bug's traceback stays plain and short
    rich_markup_mode=None,  # plain click errors: "Error: ..." on one line, no box
)

T = TypeVar("T")


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"flowfix: error: {message}", err=True)
    raise typer.Exit(code)


def guarded(fn: Callable[[], T], settings: Settings | None = None) -> T:
    """Run a library call; typed errors become one line on stderr and exit 2."""
    try:
        return fn()
    except FlowfixError as exc:
        message = str(exc).removeprefix("flowfix: ")
        if settings is not None and settings.url is not None and settings.url.password:
            message = message.replace(settings.url.password, "***")
        fail(message)


def load_settings(*, require_url: bool = True) -> Settings:
    settings = guarded(Settings.from_env)
    if require_url and settings.url is None:
        fail("DATABASE_URL is not set (e.g. postgresql://user@host/db)")
    return settings


@app.command()
def upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision: legacy, fix_master_flow_fk or head.")] = "head",
    sql: Annotated[bool, typer.Option("--sql", help="Print the SQL for review instead of running it.")] = False,
    create_tables: Annotated[bool, typer.Option(
        "--create-tables", help="Let revision legacy create the four tables in an empty schema (a new database)."
    )] = False,
) -> None:
    """Apply flowfix's revisions (same as `alembic upgrade`), with exit code 2 on refusal."""
    settings = dataclasses.replace(load_settings(require_url=not sql), create_tables=create_tables)
    if not sql:
        typer.echo(f"upgrading {mask_url(settings.require_url())} (schema {settings.schema}) to {revision}", err=True)
    guarded(lambda: schema.upgrade(settings, revision, sql=sql, output=sys.stdout, quiet=sql), settings)


@app.command()
def downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision: fix_master_flow_fk, legacy or base.")],
    sql: Annotated[bool, typer.Option("--sql", help="Print the SQL for review instead of running it.")] = False,
) -> None:
    """Revert flowfix's revisions, data included (same as `alembic downgrade`)."""
    settings = load_settings(require_url=not sql)
    guarded(lambda: schema.downgrade(settings, revision, sql=sql, output=sys.stdout, quiet=sql), settings)


def parse_uuid(value: str | None, option: str) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        fail(f"{option} '{value}' is not a UUID")


def parse_choice(value: str, option: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        fail(f"{option} must be one of {', '.join(choices)}, not '{value}'")
    return value


def run_async(settings: Settings, work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """Run ``work(engine)`` on a fresh engine; typed errors become one line and exit 2."""
    return guarded(lambda: run_with_engine(settings, work), settings)


def write_output(content: str, output: Path | None) -> None:
    if output is None:
        typer.echo(content)
        return
    try:
        output.write_text(content + "\n")
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror}")


ClientOpt = Annotated[str | None, typer.Option("--client-account", help="Only rows of this client account (UUID).")]
EngagementOpt = Annotated[str | None, typer.Option("--engagement", help="Only rows of this engagement (UUID).")]


@app.command("validate")
def validate_cmd(
    format: Annotated[str, typer.Option("--format", help="text, json or junit.")] = "text",
    output: Annotated[Path | None, typer.Option("--output", help="Write the report to this file.")] = None,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Example row ids per check.")] = 5,
    fail_on: Annotated[str, typer.Option("--fail-on", help="error: only failed checks fail the run; warn: warnings too.")] = "error",
    max_orphans: Annotated[int, typer.Option("--max-orphans", min=0, help="Accept up to N NULL master_flow_id per table (reported as warn); dangling and cross-tenant rows still fail.")] = 0,
    allow_rls: Annotated[bool, typer.Option("--allow-rls", help="Accept that row-level security may hide rows (warn instead of fail).")] = False,
    client_account: ClientOpt = None,
    engagement: EngagementOpt = None,
) -> None:
    """Check every master-flow link and the schema that guards them (read-only).

    Exit 0 when every check passes, 1 when one fails, 2 on usage or connection errors.
    """
    fmt = parse_choice(format, "--format", ("text", "json", "junit"))
    opts = validation.Options(
        samples=samples, max_orphans=max_orphans, allow_rls=allow_rls,
        fail_on=parse_choice(fail_on, "--fail-on", ("error", "warn")),  # type: ignore[arg-type]
        client_account=parse_uuid(client_account, "--client-account"),
        engagement=parse_uuid(engagement, "--engagement"),
    )
    settings = load_settings()
    report = run_async(settings, lambda engine: validation.validate(engine, settings, opts))
    rendered = {"text": report.to_text, "json": report.to_json, "junit": report.to_junit}[fmt]()
    write_output(rendered, output)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_PROBLEMS)


@app.command()
def status() -> None:
    """One screen for the operator: revision, FK targets, orphan counts, next step."""
    settings = load_settings()
    report = run_async(settings, lambda engine: validation.validate(engine, settings, validation.Options(samples=0)))
    typer.echo(f"database  {settings.masked_url} (schema {settings.schema})")
    typer.echo(f"revision  {report.revision or '(none)'}")
    for table in ("data_imports", "raw_import_records", "discovery_flows"):
        fk = report.check(f"fk.{table}")
        typer.echo(f"{table:<19} orphaned {report.check(f'{table}.orphaned').count:>9,}"
                   f"  dangling {report.check(f'{table}.dangling').count:>7,}  FK: {fk.message}")
    typer.echo(f"tenant mismatches {report.check('tenant_mismatch').count:,}")
    typer.echo(f"next step: {validation.next_step(report)}")


@app.command()
def backfill(
    window: Annotated[str, typer.Option("--window", help="How far apart an import and its master may have been created: 90s, 30m, 2h, 1d, PT2H.")] = "2h",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Change nothing; print the plan (exit code as the real run would).")] = False,
    create_missing_masters: Annotated[bool, typer.Option("--create-missing-masters", help="Create a master for a discovery flow that has none, from its own columns.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Most rows per batch (each batch is one short transaction; smaller when batches run slow).")] = 5000,
    format: Annotated[str, typer.Option("--format", help="text or json (on stdout).")] = "text",
    report: Annotated[Path | None, typer.Option("--report", help="Also write the JSON report to this file.")] = None,
    client_account: ClientOpt = None,
    engagement: EngagementOpt = None,
) -> None:
    """Link orphaned discovery flows, imports and records to their master flow.

    Evidence first (flow_id, discovery flow, configuration), then time within --window,
    one master per import; never across tenants. Batched, recorded in the ledger
    (`flowfix undo RUN_ID`), resumable. Exit 0: every orphan in scope linked; 1:
    ambiguous or unmatched rows remain; 2: usage, connection or lock error.
    """
    fmt = parse_choice(format, "--format", ("text", "json"))
    opts = backfilling.Options(
        window_seconds=guarded(lambda: parse_window(window)), batch_size=batch_size,
        create_missing_masters=create_missing_masters, dry_run=dry_run,
        client_account=parse_uuid(client_account, "--client-account"),
        engagement=parse_uuid(engagement, "--engagement"),
    )
    settings = load_settings()
    from rich.console import Console

    from flowfix.progress import backfill_with_progress

    # the bar goes to stderr, and only with the human summary on a terminal
    console = Console(stderr=True, force_terminal=None if fmt == "text" else False)
    result = run_async(settings, lambda engine: backfill_with_progress(engine, settings, opts, console))
    if report is not None:
        write_output(result.to_json(), report)
    if fmt == "json":
        typer.echo(result.to_json())
    else:
        typer.echo(backfill_summary(result))
    raise typer.Exit(result.exit_code)


def backfill_summary(result: backfilling.Result) -> str:
    c = result.counts
    head = "backfill plan (dry run: nothing changed)" if result.dry_run else (
        f"backfill run {result.run_id}{' (resumed an interrupted run)' if result.resumed else ''}")
    lines = [head, f"  window: {result.window_seconds:g} s"]
    verb = "would link" if result.dry_run else "linked"
    if result.dry_run:
        lines += [f"  {verb}: {c['planned_discovery_flows']:,} discovery flows"
                  f" ({c['planned_masters_created']:,} with a new master), {c['planned_data_imports']:,} imports,"
                  f" {c['planned_raw_import_records']:,} records"]
    else:
        lines += [f"  {verb}: {c.get('discovery_flows', 0):,} discovery flows ({c.get('masters_created', 0):,} masters"
                  f" created), {c.get('data_imports', 0):,} imports, {c.get('raw_import_records', 0):,} records"
                  f" in {c['batches']} batches (longest {c['longest_batch_ms']} ms)"]
        if c.get("skipped"):
            lines.append(f"  skipped {c['skipped']} planned links: the rows changed since planning")
    evidence = result.plan.import_evidence()
    if evidence:
        lines.append("  imports by evidence: " + ", ".join(f"{k} {v:,}" for k, v in sorted(evidence.items())))
    lines.append(f"  ambiguous: {len(result.plan.ambiguous):,}   unmatched: {len(result.plan.unmatched):,}")
    for a in result.plan.ambiguous[:10]:
        lines.append(f"    ambiguous {a.table} {a.id}: {a.reason} ({', '.join(a.candidates)})")
    for u in result.plan.unmatched[:10]:
        lines.append(f"    unmatched {u.table} {u.id}: {u.reason}")
    more = len(result.plan.ambiguous) + len(result.plan.unmatched) - 20
    if more > 0:
        lines.append(f"    ... and {more} more (--format json or --report FILE lists them all)")
    if not result.dry_run and result.run_id:
        lines.append(f"  undo with: flowfix undo {result.run_id}")
    return "\n".join(lines)


@app.command()
def demo(
    size: Annotated[int, typer.Option("--size", min=20, max=100_000, help="Imports in the demo dataset (10 records each).")] = 300,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the embedded server's data directory afterwards.")] = False,
) -> None:
    """Walk the whole runbook on a throwaway embedded PostgreSQL with a broken dataset.

    Needs no DATABASE_URL and never touches one: the server is started in a temporary
    directory and removed afterwards (unless --keep).
    """
    from flowfix.demo import run_demo

    raise typer.Exit(guarded(lambda: run_demo(size=size, keep=keep)))


def require_uuid(value: str, option: str) -> uuid.UUID:
    parsed = parse_uuid(value, option)
    assert parsed is not None
    return parsed


@app.command()
def link(
    data_import: Annotated[str, typer.Option("--import", help="The data import's id (UUID).")],
    flow: Annotated[str, typer.Option("--flow", help="The discovery master flow's flow_id (UUID).")],
    force: Annotated[bool, typer.Option("--force", help="Relink an import already linked to another flow.")] = False,
) -> None:
    """Link one import and its records to a discovery master flow (for the cases the
    backfill reports as ambiguous). Recorded in the ledger: `flowfix undo RUN_ID` reverts it."""
    import_id, flow_id = require_uuid(data_import, "--import"), require_uuid(flow, "--flow")
    settings = load_settings()

    async def work(engine):  # type: ignore[no-untyped-def]
        async with make_sessionmaker(engine)() as session:
            return await linking.link_with_ledger(session, data_import_id=import_id, flow_id=flow_id, force=force)

    run_id, result = run_async(settings, work)
    if run_id is None:
        typer.echo(f"import {import_id} is already linked to {flow_id}: nothing to do")
        return
    typer.echo(f"linked import {import_id} and {result.records_linked} records to flow {flow_id}")
    typer.echo(f"run {run_id} (undo with: flowfix undo {run_id})")


@app.command()
def undo(run_id: Annotated[str, typer.Argument(help="The id of the run to revert (see `flowfix runs`).")]) -> None:
    """Revert a run's changes where rows still hold what it wrote; later edits are kept and listed."""
    target = require_uuid(run_id, "RUN_ID")
    settings = load_settings()

    async def work(engine):  # type: ignore[no-untyped-def]
        async with make_sessionmaker(engine)() as session:
            return await ledger.undo_run(session, target)

    report = run_async(settings, work)
    if report.already_undone:
        typer.echo(f"run {target} was already undone: nothing to do")
        return
    typer.echo(f"undid run {target}: {report.reverted} values reverted, {len(report.skipped)} left alone "
               f"(changed since), {report.deleted_masters} created masters deleted; recorded as run {report.undo_run_id}")
    for skipped in report.skipped:
        typer.echo(f"  kept {skipped['table']} {skipped['id']}: {skipped['reason']}")


@app.command()
def runs(limit: Annotated[int, typer.Option("--limit", min=1, help="How many runs, newest first.")] = 20) -> None:
    """List the ledger's runs (backfill, link, undo), newest first."""
    settings = load_settings()

    async def work(engine):  # type: ignore[no-untyped-def]
        async with engine.connect() as conn:
            return await ledger.list_runs(conn, limit)

    for run in run_async(settings, work):
        finished = run.finished_at.isoformat(timespec="seconds") if run.finished_at else "-"
        typer.echo(f"{run.id}  {run.command:<8} {run.status:<9} {run.started_at.isoformat(timespec='seconds')}"
                   f"  {finished}  {json.dumps(run.counts, sort_keys=True)}")


def main() -> None:
    app()
