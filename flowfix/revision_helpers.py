"""Helpers the revisions share: transaction boundaries, batching, notes, errors.

The revisions stay readable top to bottom; this module only holds the mechanics that
are the same for all of them. Online, statements run on Alembic's connection; with
``--sql`` the same statements are printed, with comments marking where a transaction
ends and which steps run outside one (CONCURRENTLY).
"""

from __future__ import annotations

import logging

from alembic import op
from sqlalchemy import Connection, text

from flowfix.catalog import IndexFacts
from flowfix.config import Settings
from flowfix.errors import MigrationError, is_lock_timeout, sqlstate, translate
from flowfix.sql import quote_ident, quote_literal
from flowfix.walk import Walk, walk_sync

log = logging.getLogger("flowfix.revision_helpers")

#: Rows per translation batch; each batch is its own short transaction.
BATCH_ROWS = 10_000


def settings() -> Settings:
    """The settings this run was started with (env.py puts them in the Alembic config)."""
    from alembic import context

    found = context.config.attributes.get("settings")
    if not isinstance(found, Settings):
        raise MigrationError("flowfix: revisions must run through flowfix's alembic/env.py")
    return found


def offline_facts() -> IndexFacts | None:
    """For ``--sql``: the index facts of the database given, read before the run (None
    when there was none: the SQL is then generic, and says so)."""
    from alembic import context

    found = context.config.attributes.get("index_facts")
    if found is None and not context.config.attributes.get("said_generic"):
        context.config.attributes["said_generic"] = True
        op.get_context().impl.static_output(
            "-- generic SQL (no DATABASE_URL): it builds every index; with DATABASE_URL set, --sql prints"
            " exactly what the online upgrade of that database builds"
        )
    return found if isinstance(found, IndexFacts) else None


def sql_literal(value: str) -> str:
    """A string as a SQL literal, for the few names revisions inline into DO blocks
    (which take no bind parameters)."""
    return quote_literal(value)


def warn(message: str) -> None:
    """Something the operator must know that does not stop the revision: a warning line
    online (stderr), a comment in ``--sql`` output."""
    if offline():
        note(f"WARNING: {message}")
    else:
        log.warning(message)


def offline() -> bool:
    """True under ``alembic ... --sql``: nothing can be read, only printed."""
    return bool(op.get_context().as_sql)


def bind() -> Connection:
    return op.get_bind()


def note(message: str) -> None:
    """A step title: a SQL comment in ``--sql`` output, a log line online."""
    if offline():
        for line in message.splitlines():
            op.get_context().impl.static_output(f"-- {line}")
    else:
        log.info(message)


def execute(sql: str, **params: object) -> None:
    """Run (or print) one statement; parameters are bound, never formatted in."""
    stmt = text(sql)
    if params:
        stmt = stmt.bindparams(**params)
    op.execute(stmt)


def commit() -> None:
    """End the current transaction here and start a new one, so that the locks taken so
    far are released before the next step (Alembic's autocommit block, left empty)."""
    with op.get_context().autocommit_block():
        pass


def outside_transaction(title: str, *statements: str) -> None:
    """Run statements that cannot run in a transaction (``CONCURRENTLY``), each on its own."""
    with op.get_context().autocommit_block():
        note(f"OUTSIDE A TRANSACTION: {title}")
        for sql in statements:
            execute(sql)


#: Pages per batch of a physical walk (about 10,000 rows of raw_import_records), at most.
BATCH_PAGES = 250


def walk(title: str, spec: Walk) -> int:
    """Walk ``spec`` (:mod:`flowfix.walk`) outside a transaction, one short transaction
    per batch, then its closing pass: online by :func:`flowfix.walk.walk_sync`, with
    ``--sql`` as the DO block generated from the same statements. Returns the rows
    changed (0 offline). A lock timeout stops the revision; env.py retries it, and the
    batches already done need nothing more (each is idempotent)."""
    with op.get_context().autocommit_block():
        note(f"OUTSIDE A TRANSACTION (one COMMIT per batch, then a closing pass): {title}")
        if offline():
            execute(spec.do_block(pages=BATCH_PAGES, rows=BATCH_ROWS))
            return 0
        return walk_sync(bind(), spec, pages=BATCH_PAGES, rows=BATCH_ROWS)


# --- errors and retries (used by alembic/env.py) ---------------------------------------

#: What a revision's own refusal (``RAISE EXCEPTION ... USING ERRCODE = 'FF000'`` in its
#: DO blocks) carries, so that it is told from other errors by code, not by its text.
REFUSAL_SQLSTATE = "FF000"


def as_command_error(exc: BaseException, settings: Settings | None = None) -> BaseException:
    """One line for the operator, no traceback, no password; a bug is returned as it is."""
    from alembic.util import CommandError

    from flowfix.config import mask_url

    if isinstance(exc, CommandError):
        return exc
    if sqlstate(exc) == REFUSAL_SQLSTATE:
        message = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        return CommandError(message[message.find("flowfix: ") :].removeprefix("flowfix: "))
    if is_lock_timeout(exc) and settings is not None:
        attempts = f"{settings.lock_retries + 1} attempt{'s' if settings.lock_retries else ''}"
        return CommandError(
            f"gave up waiting for a table lock ({attempts} of {settings.lock_timeout}): a long-running transaction"
            " holds it (see pg_stat_activity). Steps finished before are kept; run the same command again later"
            " to finish (see `flowfix status`), or raise FLOWFIX_LOCK_TIMEOUT / FLOWFIX_LOCK_RETRIES."
        )
    translated = translate(exc, mask_url(settings.url) if settings is not None else "")
    if translated is not None:
        return CommandError(str(translated).removeprefix("flowfix: "))
    return exc


def quote(name: str) -> str:
    """Quote an identifier read from the catalog (constraint or index name) for DDL."""
    return quote_ident(name)


def run_or_undo(sql: str, *, undo: str, when_sqlstate: str, message: str) -> None:
    """Run ``sql`` in its own transaction; if it fails for any reason, run ``undo`` (what
    the step before added must not outlive a revision that did not finish), then stop the
    revision: with ``message`` when it failed with ``when_sqlstate``, else with the error
    itself (a lock timeout is then retried by env.py, which redoes both steps). ``sql``
    must be safe to run twice."""
    with op.get_context().autocommit_block():
        lint_ignore("prefer-robust-stmts", "runs on its own, outside a transaction, and is safe to rerun")
        if offline():
            execute(sql)
            return
        try:
            execute(sql)
        except Exception as exc:
            try:
                execute(undo)
            except Exception:  # noqa: BLE001 - the undo failed too (session gone?): say what is left
                raise MigrationError(
                    f"{translate(exc) or exc}; and undoing the step before failed: run the upgrade again, or"
                    " downgrade to the revision before, to remove what it added"
                ) from exc
            if sqlstate(exc) == when_sqlstate:
                raise MigrationError(message) from None
            raise


def lint_ignore(rule: str, reason: str) -> None:
    """Tell squawk (which lints the ``--sql`` output in CI) that the next statement breaks
    ``rule`` on purpose, and say why, right where a reviewer reads it."""
    if offline():
        # Written straight to the output: static_output() would add a blank line, and
        # squawk only applies an ignore comment to the statement on the very next line.
        buffer = op.get_context().impl.output_buffer
        assert buffer is not None  # offline: alembic writes the SQL there
        buffer.write(f"-- {reason}\n-- squawk-ignore {rule}\n")
