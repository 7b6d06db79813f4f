"""Alembic environment for flowfix, after Alembic's asyncio recipe.

- URL and schema come from flowfix's settings (DATABASE_URL, FLOWFIX_SCHEMA), or from
  ``config.attributes["settings"]``; a connection or (async) engine passed in
  ``config.attributes["connection"]`` is used as is (tests, pytest-alembic, the CLI).
- flowfix's own version table ``flowfix_alembic_version`` lives in the same schema; the
  application's ``alembic_version`` is never touched.
- One transaction per revision; every session starts with a short ``lock_timeout``, and
  a revision that fails on lock_not_available is retried with backoff (each revision's
  steps are idempotent, so a retry resumes where the last attempt stopped).
- Errors the operator must act on come out as one line (Alembic's ``FAILED: ...``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from logging.config import fileConfig

from alembic import context
from sqlalchemy import Connection, pool, text
from sqlalchemy.ext.asyncio import AsyncEngine

from flowfix.config import VERSION_TABLE, Settings
from flowfix.db import make_engine
from flowfix.errors import FlowfixError, is_lock_timeout, lock_backoff
from flowfix.models import Base
from flowfix.revision_helpers import as_command_error

config = context.config
if config.config_file_name is not None and not config.attributes.get("skip_logging_config"):
    fileConfig(config.config_file_name, disable_existing_loggers=False)
log = logging.getLogger("flowfix.env")

target_metadata = Base.metadata


def _settings() -> Settings:
    """flowfix's settings: handed in by flowfix, or (plain ``alembic``) from the
    environment, with ``-x create_tables=true`` for a new database. Stored back in the
    config, where the revisions read them (revision_helpers.settings())."""
    settings = config.attributes.get("settings")
    if settings is None:
        try:
            settings = Settings.from_env()
        except FlowfixError as exc:
            raise as_command_error(exc) from None
        create = context.get_x_argument(as_dictionary=True).get("create_tables", "false")
        settings = dataclasses.replace(settings, create_tables=create.lower() in ("1", "true", "yes"))
        config.attributes["settings"] = settings
    return settings


def _only_our_tables(name: str | None, type_: str, parent_names: object) -> bool:
    """Autogenerate compares flowfix's tables only: the schema is shared with the
    application (its own tables, its own ``alembic_version``)."""
    return type_ != "table" or name in target_metadata.tables


def _configure(**kwargs: object) -> None:
    # No version_table_schema: every session's search_path is the configured schema, so
    # the unqualified version table lands there, and autogenerate recognises it.
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        transaction_per_migration=True,
        compare_type=True,
        include_name=_only_our_tables,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """``--sql``: print the SQL for review. The session settings come first."""
    settings = _settings()
    url = settings.url.render_as_string(hide_password=True) if settings.url else "postgresql+asyncpg://"
    _configure(url=url, literal_binds=True, dialect_opts={"paramstyle": "named"})
    # values as bound literals (rendered escaped by the dialect), never spliced into the text;
    # SET takes a quoted string for search_path as the schema's exact name
    context.execute(text("SET search_path TO :schema").bindparams(schema=settings.schema))
    context.execute(text("SET lock_timeout = :timeout").bindparams(timeout=settings.lock_timeout))
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    settings = _settings()
    # The connection's search_path (pinned by flowfix.db) is authoritative, also for an
    # engine handed in by a test or by pytest-alembic.
    schema = connection.exec_driver_sql("SELECT current_schema()").scalar()
    if schema is None:
        path = connection.exec_driver_sql("SHOW search_path").scalar()
        raise as_command_error(FlowfixError(f"schema '{path}' does not exist: create it, or set FLOWFIX_SCHEMA"))
    # Session-level, so it holds for every transaction and autocommit step that follows.
    connection.execute(text("SELECT set_config('lock_timeout', :timeout, false)"), {"timeout": settings.lock_timeout})
    connection.commit()
    _configure(connection=connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations(engine: AsyncEngine, settings: Settings) -> None:
    """Run pending revisions; on lock_not_available, retry from the current revision."""
    try:
        for attempt in range(settings.lock_retries + 1):
            try:
                async with engine.connect() as connection:
                    await connection.run_sync(do_run_migrations)
                return
            except Exception as exc:  # noqa: BLE001 - translated, or re-raised as it is (a bug)
                if not is_lock_timeout(exc) or attempt == settings.lock_retries:
                    raise as_command_error(exc, settings) from None
                delay = lock_backoff(attempt)
                log.warning(
                    "lock not available (lock_timeout %s); retry %d/%d in %.1fs",
                    settings.lock_timeout,
                    attempt + 1,
                    settings.lock_retries,
                    delay,
                )
                await asyncio.sleep(delay)
    finally:
        if config.attributes.get("connection") is None:
            await engine.dispose()


def run_migrations_online() -> None:
    injected = config.attributes.get("connection")
    if isinstance(injected, Connection):
        do_run_migrations(injected)
        return
    settings = _settings()
    if injected is None:
        try:
            injected_engine = make_engine(settings, poolclass=pool.NullPool)
        except FlowfixError as exc:
            raise as_command_error(exc) from None
    else:
        injected_engine = injected
    asyncio.run(run_async_migrations(injected_engine, settings))


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
