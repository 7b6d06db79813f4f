"""The ``flowfix`` command: parse, call the library, print, exit.

Exit codes: 0 ok, 1 integrity problems found, 2 usage or connection error (one line on
stderr, nothing changed). No SQL lives here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Annotated, NoReturn, TypeVar

import typer

from flowfix import schema
from flowfix.config import Settings, mask_url
from flowfix.errors import FlowfixError

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2

app = typer.Typer(
    name="flowfix",
    help="Repair and guard the master-flow links of the discovery-flow tables.\n\n"
    "Reads DATABASE_URL (postgresql://...) and FLOWFIX_SCHEMA (default: public).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # locals would include database URLs
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
) -> None:
    """Apply flowfix's revisions (same as `alembic upgrade`), with exit code 2 on refusal."""
    settings = load_settings(require_url=not sql)
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


def main() -> None:
    app()
