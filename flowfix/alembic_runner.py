"""Run flowfix's Alembic revisions from Python (the CLI and the tests use this).

The revisions live in the top-level ``alembic/`` folder of the checkout, next to
``alembic.ini``; ``alembic upgrade head`` from the checkout and ``flowfix upgrade head``
run exactly the same code. An installed wheel carries the same folder as
``flowfix/_alembic`` (pyproject.toml maps it), and runs it without an ini file.
"""

from __future__ import annotations

import io
import logging
from functools import cache
from pathlib import Path
from typing import Any, TextIO

from alembic import command
from alembic.config import Config
from alembic.util import CommandError

from flowfix.catalog import IndexFacts, PartDone
from flowfix.config import Settings
from flowfix.errors import ConfigError, MigrationError

ROOT = Path(__file__).resolve().parent.parent
CHECKOUT_INI = ROOT / "alembic.ini"


def script_location() -> Path:
    """The revisions: the checkout's ``alembic/`` (next to alembic.ini), else the copy an
    installed wheel carries."""
    if CHECKOUT_INI.exists() and (ROOT / "alembic" / "env.py").exists():
        return ROOT / "alembic"
    installed = Path(__file__).resolve().parent / "_alembic"
    if not (installed / "env.py").exists():
        raise ConfigError(f"flowfix's revisions are missing (looked in {ROOT / 'alembic'} and {installed})")
    return installed


@cache
def script_directory() -> Any:
    """Alembic's view of the revisions, read once per process."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(script_location()))


def head() -> str:
    """The head revision, from Alembic's ScriptDirectory (not a constant to keep in step)."""
    found: str | None = script_directory().get_current_head()
    assert found is not None
    return found


def alembic_config(settings: Settings, *, output: TextIO | None = None, quiet: bool = True) -> Config:
    location = script_location()
    if location.parent == ROOT:
        cfg = Config(str(CHECKOUT_INI), output_buffer=output or io.StringIO())
    else:  # installed: no ini file; the same logging as alembic.ini sets up
        cfg = Config(output_buffer=output or io.StringIO())
        cfg.set_main_option("path_separator", "os")
        if not quiet:
            from flowfix.logs import StderrHandler

            handler = StderrHandler()
            handler.setFormatter(logging.Formatter("%(levelname)-5.5s [%(name)s] %(message)s"))
            for name in ("alembic", "flowfix"):
                logger = logging.getLogger(name)
                logger.setLevel(logging.INFO)
                if not logger.handlers:
                    logger.addHandler(handler)
    cfg.set_main_option("script_location", str(location))
    cfg.attributes["settings"] = settings
    cfg.attributes["skip_logging_config"] = quiet
    return cfg


def check_revision(revision: str, *, sql: bool) -> None:
    """Refuse an unknown revision (or a range, online) before anything connects or logs."""
    if ":" in revision and not sql:
        raise MigrationError(f"Range revision not allowed: '{revision}' (ranges are for --sql)")
    script = script_directory()
    for part in revision.split(":"):
        if part in ("", "base", "head", "heads") or part.startswith(("+", "-")) or "@" in part:
            continue
        try:
            script.get_revision(part)
        except CommandError as exc:
            raise MigrationError(str(exc).strip().splitlines()[0]) from None


def current_revision(settings: Settings) -> str | None:
    """flowfix's revision in the database (None: flowfix never ran there)."""
    from flowfix import catalog
    from flowfix.db import run_with_engine

    async def read(engine: Any) -> str | None:
        async with engine.connect() as conn:
            return await conn.run_sync(catalog.readable_revision)  # type: ignore[no-any-return]

    return run_with_engine(settings, read)


def _index_facts(settings: Settings) -> IndexFacts | None:
    """What decides fix_master_flow_fk's indexes on this database (for ``--sql``); None
    for a database flowfix has not adopted yet (its tables may not even exist)."""
    from flowfix import catalog
    from flowfix.db import run_with_engine

    async def read(engine: Any) -> IndexFacts | None:
        async with engine.connect() as conn:
            if await conn.run_sync(catalog.readable_revision) is None:
                return None
            return await conn.run_sync(catalog.index_facts)  # type: ignore[no-any-return]

    return run_with_engine(settings, read)


def part_done(settings: Settings) -> PartDone | None:
    """A revision that stopped part-way (:func:`flowfix.catalog.part_done`)."""
    from flowfix import catalog
    from flowfix.db import run_with_engine

    async def read(engine: Any) -> PartDone | None:
        async with engine.connect() as conn:
            return await conn.run_sync(catalog.part_done)  # type: ignore[no-any-return]

    return run_with_engine(settings, read)


def _run(settings: Settings, fn: Any, *args: object, sql: bool = False, **kwargs: object) -> None:
    """Run an Alembic command; a refusal becomes :class:`MigrationError`, saying where the
    database is now when revisions before the refused one were applied (one transaction
    per revision: those stay, and "this revision changed nothing" is about the last one)."""
    check_revision(str(args[1]), sql=sql)
    if sql and settings.url is not None:
        args[0].attributes["index_facts"] = _index_facts(settings)  # type: ignore[attr-defined]
    before = None if sql else current_revision(settings)
    try:
        fn(*args, sql=sql, **kwargs)
    except CommandError as exc:
        message = str(exc).strip().splitlines()[0]
        if not sql:
            try:
                after = current_revision(settings)
            except Exception:  # noqa: BLE001 - the server may be gone: the refusal is what matters
                after = before
            if after != before:
                # the revisions before the refused one were applied (one transaction each) and stay:
                # say so first, so "this revision changed nothing" reads as the last one's
                message = (
                    f"upgrade applied revisions up to {after or '(none)'} (from {before or '(none)'}); the database"
                    f" is now at revision {after or '(none)'}, where they stay. The next revision refused: {message}"
                )
            try:
                unfinished = part_done(settings)
            except Exception:  # noqa: BLE001 - the server may be gone
                unfinished = None
            if unfinished is not None:
                message += f" Now {unfinished.message()}."
        raise MigrationError(message) from None


def upgrade(
    settings: Settings, revision: str = "head", *, sql: bool = False, output: TextIO | None = None, quiet: bool = True
) -> None:
    _run(settings, command.upgrade, alembic_config(settings, output=output, quiet=quiet), revision, sql=sql)


def downgrade(
    settings: Settings, revision: str, *, sql: bool = False, output: TextIO | None = None, quiet: bool = True
) -> None:
    """Alembic's downgrade; a revision that stopped part-way above the current one is
    taken back too: it is stamped as applied first, so that its own downgrade (driven by
    what it recorded in flowfix_schema_changes, step by step) removes what it left."""
    config = alembic_config(settings, output=output, quiet=quiet)
    if not sql:
        check_revision(revision, sql=sql)
        unfinished = part_done(settings)
        if unfinished is not None and revision != unfinished.revision:
            command.stamp(config, unfinished.revision)
    _run(settings, command.downgrade, config, revision, sql=sql)
