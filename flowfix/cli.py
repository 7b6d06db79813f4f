"""The ``flowfix`` command: parse, call the library, print, exit.

No SQL lives here. :class:`FlowfixGroup` is the one error boundary: whatever a command
raises (flowfix's own errors, driver and server errors, bad values, Ctrl-C, bugs) ends
as one line on stderr and one of the exit codes below, for every command.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import traceback
import uuid
from collections.abc import Callable, Coroutine, Sequence
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer
from typer.core import TyperGroup

from flowfix.errors import FlowfixError, RunInterrupted, UsageProblem, translate
from flowfix.exitcodes import Exit
from flowfix.render import TextOrJson, ValidateFormat
from flowfix.window import parse_window

if TYPE_CHECKING:
    from flowfix.config import Settings

# SQLAlchemy, Alembic and asyncpg are imported by the command that needs them, when it
# runs: `flowfix --help` and usage errors answer without loading them.

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = Exit.OK, Exit.PROBLEMS, Exit.USAGE
#: Largest values the numeric options accept (checked before anything runs).
MAX_BATCH_SIZE = 1_000_000
MAX_SAMPLES = 10_000
MAX_LIMIT = 100_000
MAX_ORPHANS = 2**53
MAX_REPLICA_LAG = 86_400.0
MAX_ARCHIVE_BACKLOG = 1_000_000
MAX_JOBS = 8


def _debug(args: Sequence[str]) -> bool:
    return "--debug" in args or os.environ.get("FLOWFIX_DEBUG", "") not in ("", "0")


def _where() -> str:
    """The masked URL of DATABASE_URL, for connection errors (never its password)."""
    from flowfix.config import Settings

    try:
        return Settings.from_env().masked_url
    except FlowfixError:
        return "the database"


def _session_timeouts() -> str | None:
    """The idle timeouts set for flowfix's role, after a lost connection (flowfix.db)."""
    from flowfix.config import Settings
    from flowfix.db import session_timeouts

    try:
        settings = Settings.from_env()
    except FlowfixError:
        return None
    return session_timeouts(settings) if settings.url is not None else None


def error_line(exc: BaseException) -> tuple[str, Exit]:
    """The one line and the exit code for anything a command raised."""
    if isinstance(exc, typer.TyperException):  # click's usage errors: bad option, missing argument ...
        lines = exc.format_message().strip().replace(": Value error, ", ": ").splitlines()
        return (lines[0] if lines else "usage error"), Exit.USAGE
    if isinstance(exc, (KeyboardInterrupt, typer.Abort)):
        return (
            "interrupted: what was committed stays (backfill and undo resume when run again; a revision"
            " resumes on the next upgrade)"
        ), Exit.INTERRUPTED
    cause = exc.__cause__ if isinstance(exc, RunInterrupted) and exc.__cause__ is not None else exc
    translated = cause if isinstance(cause, FlowfixError) else translate(cause, _where())
    if translated is None:
        message = (
            f"unexpected error ({type(cause).__name__}): this is a bug in flowfix; rerun with --debug for"
            " the traceback and report it"
        )
        code = Exit.BUG
    else:
        message, code = str(translated).removeprefix("flowfix: "), Exit.USAGE
        if message.startswith("lost the connection") and (hint := _session_timeouts()):
            message = f"{message}; {hint}"
    if cause is not exc:
        message = f"{message}; {str(exc).removeprefix('flowfix: ')}"
    return " ".join(message.split()), code


class FlowfixGroup(TyperGroup):
    """Runs the command without click's own error handling (which prints three lines for
    a usage error and tracebacks for the rest) and maps every outcome to an exit code."""

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            result = super().main(
                args=argv, prog_name=prog_name, complete_var=complete_var, standalone_mode=False, **extra
            )
            code = result if isinstance(result, int) else Exit.OK
            if code == Exit.INTERRUPTED:  # typer turns Ctrl-C into a silent exit 130
                typer.echo(f"flowfix: error: {error_line(KeyboardInterrupt())[0]}", err=True)
        except typer.Exit as exc:
            code = exc.exit_code
        except BaseException as exc:
            if isinstance(exc, SystemExit):
                raise
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `flowfix`: the help, as click shows it
                typer.echo(exc.ctx.get_help())  # type: ignore[attr-defined]
                code = Exit.USAGE
            else:
                line, code = error_line(exc)
                if _debug(argv):
                    traceback.print_exception(exc)
                typer.echo(f"flowfix: error: {line}", err=True)
        if not standalone_mode:
            return code
        sys.exit(int(code))


#: Every command answers -h as well as --help.
HELP = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    name="flowfix",
    cls=FlowfixGroup,
    help="Repair and guard the master-flow links of the discovery-flow tables.\n\n"
    "Reads DATABASE_URL (postgresql://..., libpq parameters such as sslmode accepted; PG* variables and"
    " ~/.pgpass as with libpq) and FLOWFIX_SCHEMA (default: public). Exit codes: 0 ok, 1 integrity problems,"
    " 2 usage/connection/permission/lock error or refusal, 3 a bug in flowfix (rerun with --debug),"
    " 130 interrupted.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals would include database URLs
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings=HELP,
    epilog="Example:\n\n\b\n  flowfix demo      # the runbook on a throwaway database\n  flowfix status    # where this database stands, what comes next",
)


def example(*lines: str) -> str:
    """A command's epilog: examples, shown as written (``\\b`` keeps click from rewrapping)."""
    return "Example:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


class FailOn(StrEnum):
    """What makes ``flowfix validate`` fail."""

    error = "error"
    warn = "warn"


T = TypeVar("T")


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"flowfix {version('flowfix')}")
        raise typer.Exit(Exit.OK)


@app.callback()
def root(
    debug: Annotated[bool, typer.Option("--debug", help="Show the traceback of an error.")] = False,
    show_version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print flowfix's version.")
    ] = False,
) -> None:
    """Repair and guard the master-flow links of the discovery-flow tables."""
    # --debug is declared here so that click accepts it; FlowfixGroup.main reads it from
    # the argument list itself, since it must work when parsing the command line fails


def fail(message: str) -> NoReturn:
    raise UsageProblem(message)


def load_settings(*, require_url: bool = True) -> Settings:
    from flowfix.config import Settings

    settings = Settings.from_env()
    if require_url:
        settings.require_url()
    return settings


def check_output_path(path: Path | None, option: str) -> None:
    """Refuse an output file that cannot be written, before the database is touched."""
    if path is None:
        return
    if path.is_dir():
        fail(f"{option} {path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        fail(f"{option} {path}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        fail(f"{option} {path} is not writable")


Number = TypeVar("Number", int, float)


def check_bound(value: Number, option: str, maximum: Number) -> Number:
    if value != value or value > maximum:  # NaN compares false to everything
        fail(f"{option} {value} is larger than {maximum:,}")
    return value


@app.command(
    context_settings=HELP,
    epilog=example(
        "flowfix upgrade legacy:fix_master_flow_fk --sql > fix.sql   # review first",
        "flowfix upgrade fix_master_flow_fk",
    ),
)
def upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision: legacy, fix_master_flow_fk or head.")] = "head",
    sql: Annotated[bool, typer.Option("--sql", help="Print the SQL for review instead of running it.")] = False,
    create_tables: Annotated[
        bool,
        typer.Option(
            "--create-tables", help="Let revision legacy create the four tables in an empty schema (a new database)."
        ),
    ] = False,
) -> None:
    """Apply flowfix's revisions (same as `alembic upgrade`), with exit code 2 on refusal."""
    from flowfix import alembic_runner
    from flowfix.config import mask_url

    settings = dataclasses.replace(load_settings(require_url=not sql), create_tables=create_tables)
    alembic_runner.check_revision(revision, sql=sql)
    if not sql:
        typer.echo(f"upgrading {mask_url(settings.require_url())} (schema {settings.schema}) to {revision}", err=True)
    alembic_runner.upgrade(settings, revision, sql=sql, output=sys.stdout, quiet=sql)


@app.command(
    context_settings=HELP,
    epilog=example(
        "flowfix downgrade fix_master_flow_fk   # at head: the column nullable again", "flowfix downgrade legacy"
    ),
)
def downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision: fix_master_flow_fk, legacy or base.")],
    sql: Annotated[bool, typer.Option("--sql", help="Print the SQL for review instead of running it.")] = False,
) -> None:
    """Revert flowfix's revisions, data included (same as `alembic downgrade`)."""
    from flowfix import alembic_runner

    settings = load_settings(require_url=not sql)
    alembic_runner.downgrade(settings, revision, sql=sql, output=sys.stdout, quiet=sql)


def parse_uuid(value: str | None, option: str) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        fail(f"{option} '{value}' is not a UUID")


def run_async(settings: Settings, work: Callable[[Any], Coroutine[Any, Any, T]]) -> T:
    """Run ``work(engine)`` on a fresh engine (errors go to the boundary)."""
    from flowfix.db import run_with_engine

    return run_with_engine(settings, work)


def write_output(content: str, output: Path | None, *, committed: str = "") -> None:
    """Write a report (checked beforehand by :func:`check_output_path`); if it still
    fails, say what was committed, since the database was changed already."""
    if output is None:
        typer.echo(content)
        return
    try:
        output.write_text(content + "\n")
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror}{'; ' + committed if committed else ''}")


ClientOpt = Annotated[str | None, typer.Option("--client-account", help="Only rows of this client account (UUID).")]
EngagementOpt = Annotated[str | None, typer.Option("--engagement", help="Only rows of this engagement (UUID).")]


@app.command(
    "validate",
    context_settings=HELP,
    epilog=example(
        "flowfix validate --format junit --output flowfix.xml",
        "flowfix validate --format openmetrics --output flowfix.prom   # node_exporter textfile collector",
    ),
)
def validate_cmd(
    format: Annotated[
        ValidateFormat,
        typer.Option("--format", help="Report format (openmetrics: Prometheus text, for node_exporter)."),
    ] = ValidateFormat.text,
    output: Annotated[Path | None, typer.Option("--output", help="Write the report to this file.")] = None,
    samples: Annotated[int, typer.Option("--samples", min=0, help="Example row ids per check.")] = 5,
    fail_on: Annotated[
        FailOn, typer.Option("--fail-on", help="error: only failed checks fail the run; warn: warnings too.")
    ] = FailOn.error,
    max_orphans: Annotated[
        int,
        typer.Option(
            "--max-orphans",
            min=0,
            help="Accept up to N NULL master_flow_id per table (reported as warn); dangling and cross-tenant rows still fail.",
        ),
    ] = 0,
    allow_rls: Annotated[
        bool, typer.Option("--allow-rls", help="Accept that row-level security may hide rows (warn instead of fail).")
    ] = False,
    client_account: ClientOpt = None,
    engagement: EngagementOpt = None,
) -> None:
    """Check every master-flow link and the schema that guards them (read-only).

    Exit 0 when every check passes, 1 when one fails, 2 on usage or connection errors.
    """
    check_output_path(output, "--output")
    options = dict(
        samples=check_bound(samples, "--samples", MAX_SAMPLES),
        max_orphans=check_bound(max_orphans, "--max-orphans", MAX_ORPHANS),
        allow_rls=allow_rls,
        fail_on=fail_on.value,
        client_account=parse_uuid(client_account, "--client-account"),
        engagement=parse_uuid(engagement, "--engagement"),
    )
    settings = load_settings()
    from flowfix import render
    from flowfix import validate as validation

    opts = validation.Options(**options)  # type: ignore[arg-type]
    report = run_async(settings, lambda engine: validation.validate(engine, settings, opts))

    write_output(render.validate_as(report, format), output)
    raise typer.Exit(EXIT_OK if report.ok else EXIT_PROBLEMS)


@app.command(context_settings=HELP, epilog=example("flowfix status"))
def status() -> None:
    """One screen for the operator: revision, FK targets, orphan counts, next step."""
    from flowfix import validate as validation

    settings = load_settings()
    report = run_async(settings, lambda engine: validation.validate(engine, settings, validation.Options(samples=0)))
    typer.echo(f"database  {settings.masked_url} (schema {settings.schema})")
    typer.echo(f"revision  {report.revision or '(none)'}")
    from flowfix.alembic_runner import part_done

    unfinished = part_done(settings)
    if unfinished is not None:
        typer.echo(f"PART-DONE {unfinished.message()}")
    for table in ("data_imports", "raw_import_records", "discovery_flows"):
        fk = report.check(f"fk.{table}")
        typer.echo(
            f"{table:<19} orphaned {report.check(f'{table}.orphaned').count:>9,}"
            f"  dangling {report.check(f'{table}.dangling').count:>7,}  FK: {fk.message}"
        )
    typer.echo(f"tenant mismatches {report.check('tenant_mismatch').count:,}")
    from flowfix import render
    from flowfix.watch import active_run

    running = run_async(settings, active_run)
    if running is not None:
        typer.echo("RUNNING   " + render.run_progress_text(running).replace("\n", "\n          "))
    rls = report.check("rls_visibility")
    if rls.status != "pass":
        typer.echo(f"WARNING: {rls.message}: the counts above may be partial")
    typer.echo(f"next step: {validation.next_step(report) if unfinished is None else unfinished.next_step()}")


@app.command(
    context_settings=HELP,
    epilog=example(
        "flowfix backfill --window 2h --dry-run --report plan.json",
        "flowfix backfill --window 2h --max-replica-lag 10",
    ),
)
def backfill(
    window: Annotated[
        str,
        typer.Option(
            "--window", help="How far apart an import and its master may have been created: 90s, 30m, 2h, 1d, PT2H."
        ),
    ] = "2h",
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Change nothing; print the plan (exit code as the real run would; with an interrupted run"
            " pending, the plan of its resume).",
        ),
    ] = False,
    create_missing_masters: Annotated[
        bool,
        typer.Option(
            "--create-missing-masters", help="Create a master for a discovery flow that has none, from its own columns."
        ),
    ] = False,
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size",
            min=1,
            help="Most rows per batch. Each batch is one short transaction, sized to take about 0.5 s.",
        ),
    ] = 50_000,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs",
            min=1,
            help="Connections walking raw_import_records side by side (1 leaves a core to the application on a"
            f" 2-core server; at most {MAX_JOBS}).",
        ),
    ] = 1,
    max_replica_lag: Annotated[
        float,
        typer.Option(
            "--max-replica-lag",
            min=0,
            help="Before each batch, wait while a streaming replica replays more than this many seconds behind"
            " (0: never wait). Needs pg_monitor to see the lag; the run says when it cannot.",
        ),
    ] = 30.0,
    max_archive_backlog: Annotated[
        int,
        typer.Option(
            "--max-archive-backlog",
            min=0,
            help="Before each batch, wait while more than this many WAL segments wait to be archived (0: never wait).",
        ),
    ] = 64,
    format: Annotated[TextOrJson, typer.Option("--format", help="Report format (on stdout).")] = TextOrJson.text,
    report: Annotated[Path | None, typer.Option("--report", help="Also write the JSON report to this file.")] = None,
    client_account: ClientOpt = None,
    engagement: EngagementOpt = None,
) -> None:
    """Link orphaned discovery flows, imports and records to their master flow.

    Evidence first (flow_id, discovery flow, configuration), then time within --window,
    one master per import; never across tenants. Batched, recorded in the ledger
    (`flowfix undo RUN_ID`), resumable. Exit 0: nothing in scope left NULL (read back
    from the database after the run); 1: rows left NULL (ambiguous, unmatched, or changed
    by the application since planning) or records disagreeing with their import; 2:
    usage, connection or lock error.
    """
    fmt = format
    check_output_path(report, "--report")
    options = dict(
        window_seconds=parse_window(window),
        batch_size=check_bound(batch_size, "--batch-size", MAX_BATCH_SIZE),
        create_missing_masters=create_missing_masters,
        dry_run=dry_run,
        jobs=check_bound(jobs, "--jobs", MAX_JOBS),
        max_replica_lag=check_bound(max_replica_lag, "--max-replica-lag", MAX_REPLICA_LAG),
        max_archive_backlog=check_bound(max_archive_backlog, "--max-archive-backlog", MAX_ARCHIVE_BACKLOG),
        client_account=parse_uuid(client_account, "--client-account"),
        engagement=parse_uuid(engagement, "--engagement"),
    )
    settings = load_settings()
    from rich.console import Console

    from flowfix import backfill as backfilling
    from flowfix import progress, render

    opts = backfilling.Options(**options, lock_retries=settings.lock_retries)  # type: ignore[arg-type]

    # progress goes to stderr: bars on a terminal, plain lines when piped
    console = Console(stderr=True, force_terminal=None if fmt == "text" else False)

    async def work(engine):  # type: ignore[no-untyped-def]
        with progress.reporter(console) as reporter:
            return await backfilling.run(engine, settings, opts, reporter)

    result = run_async(settings, work)
    if report is not None:
        write_output(
            render.backfill_json(result),
            report,
            committed=""
            if result.dry_run
            else (f"backfill run {result.run_id} was committed (flowfix undo {result.run_id} reverts it)"),
        )
    typer.echo(render.backfill_json(result) if fmt == "json" else render.backfill_text(result))
    raise typer.Exit(result.exit_code)


@app.command(context_settings=HELP, epilog=example("flowfix demo --size 1000"))
def demo(
    size: Annotated[
        int, typer.Option("--size", min=20, max=100_000, help="Imports in the demo dataset (10 records each).")
    ] = 300,
    keep: Annotated[bool, typer.Option("--keep", help="Keep the embedded server's data directory afterwards.")] = False,
) -> None:
    """Walk the whole runbook on a throwaway embedded PostgreSQL with a broken dataset.

    Needs no DATABASE_URL and never touches one: the server is started in a temporary
    directory and removed afterwards (unless --keep).
    """
    from flowfix.demo import run_demo

    raise typer.Exit(run_demo(size=size, keep=keep))


def require_uuid(value: str, option: str) -> uuid.UUID:
    parsed = parse_uuid(value, option)
    assert parsed is not None
    return parsed


@app.command(
    context_settings=HELP,
    epilog=example("flowfix link --import 0b6f0c1e-... --flow 7d2a9c44-...   # prints the run id to undo it"),
)
def link(
    data_import: Annotated[str, typer.Option("--import", help="The data import's id (UUID).")],
    flow: Annotated[str, typer.Option("--flow", help="The discovery master flow's flow_id (UUID).")],
    force: Annotated[bool, typer.Option("--force", help="Relink an import already linked to another flow.")] = False,
) -> None:
    """Link one import and its records to a discovery master flow (for the cases the
    backfill reports as ambiguous). Recorded in the ledger: `flowfix undo RUN_ID` reverts it."""
    import_id, flow_id = require_uuid(data_import, "--import"), require_uuid(flow, "--flow")
    settings = load_settings()
    from flowfix import linking
    from flowfix.db import make_sessionmaker

    async def work(engine):  # type: ignore[no-untyped-def]
        async with make_sessionmaker(engine)() as session:
            return await linking.link_with_ledger(
                session, data_import_id=import_id, flow_id=flow_id, force=force, lock_retries=settings.lock_retries
            )

    run_id, result = run_async(settings, work)
    if run_id is None:
        typer.echo(f"import {import_id} is already linked to {flow_id}: nothing to do")
        return
    typer.echo(f"linked import {import_id} and {result.records_linked} records to flow {flow_id}")
    typer.echo(f"run {run_id} (undo with: flowfix undo {run_id})")


@app.command(context_settings=HELP, epilog=example("flowfix undo 5e1c2f3a-...   # a run id from flowfix runs"))
def undo(run_id: Annotated[str, typer.Argument(help="The id of the run to revert (see `flowfix runs`).")]) -> None:
    """Revert a run's changes where rows still hold what it wrote; later edits are kept and listed."""
    target = require_uuid(run_id, "RUN_ID")
    settings = load_settings()
    from flowfix import ledger, render

    report = run_async(
        settings, lambda engine: ledger.undo_run(engine, settings, target, lock_retries=settings.lock_retries)
    )
    typer.echo(render.undo_text(report))


@app.command(
    context_settings=HELP,
    epilog=example("flowfix runs --limit 5", "flowfix runs RUN_ID --watch", "flowfix runs RUN_ID --format json"),
)
def runs(
    run_id: Annotated[
        str | None,
        typer.Argument(help="A run's id: per step done/total, rate, ETA, workers, pauses, attempts, last error."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many runs, newest first.")] = 20,
    format: Annotated[TextOrJson, typer.Option("--format", help="Output format (on stdout).")] = TextOrJson.text,
    watch: Annotated[
        bool,
        typer.Option(
            "--watch",
            help="With RUN_ID: show it again every --interval seconds until no process works on it"
            " (json: one object per line); then exit 0 if it finished leaving no row behind, 1 if it was"
            " interrupted or left rows. Ctrl-C stops watching, not the run.",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.2, max=3600, help="Seconds between readings with --watch.")
    ] = 2.0,
) -> None:
    """List the ledger's runs (backfill, link, undo), newest first; or, given RUN_ID, where
    that run is, read from the ledger's progress rows by any shell while it runs: per
    step done/total, rows changed, rate, ETA, workers, attempts, last error; the pause it
    is in and why; whether a process holds it (ACTIVE) or it was interrupted."""
    check_bound(limit, "--limit", MAX_LIMIT)
    target = parse_uuid(run_id, "RUN_ID")
    if watch and target is None:
        fail("--watch needs RUN_ID (see `flowfix runs` for the ids)")
    settings = load_settings()
    from flowfix import ledger, render
    from flowfix.watch import outcome
    from flowfix.watch import watch as watch_run

    if target is not None:
        clear = watch and format == TextOrJson.text and sys.stdout.isatty()

        def show(progress: ledger.RunProgress) -> None:
            if format == TextOrJson.json:
                body = render.run_progress_dict(progress)
                typer.echo(render.to_json(body, indent=None if watch else 2))
                return
            typer.echo(
                ("\x1b[2J\x1b[H" if clear else "") + render.run_progress_text(progress) + ("\n" if watch else "")
            )

        last = run_async(settings, lambda engine: watch_run(engine, target, show, interval=interval, once=not watch))
        if watch:
            raise typer.Exit(outcome(last))
        return

    async def work(engine):  # type: ignore[no-untyped-def]
        async with engine.connect() as conn:
            return await ledger.list_runs(conn, limit)

    found = run_async(settings, work)
    if format == TextOrJson.json:
        typer.echo(render.to_json([render.run_dict(run) for run in found]))
        return
    for run in found:
        typer.echo(render.run_line(run))


def main() -> None:
    app()
