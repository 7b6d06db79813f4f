"""Helpers the revisions share: transaction boundaries, batching, notes, errors.

The revisions stay readable top to bottom; this module only holds the mechanics that
are the same for all of them. Online, statements run on Alembic's connection; with
``--sql`` the same statements are printed, with comments marking where a transaction
ends and which steps run outside one (CONCURRENTLY).
"""

from __future__ import annotations

import logging
import time

from alembic import op
from sqlalchemy import Connection, text

from flowfix.config import Settings
from flowfix.errors import FlowfixError, MigrationError

log = logging.getLogger("flowfix.migrate")

#: Rows per translation batch; each batch is its own short transaction.
BATCH_ROWS = 10_000


def settings() -> Settings:
    """The settings this run was started with (env.py puts them in the Alembic config)."""
    from alembic import context

    found = context.config.attributes.get("settings")
    if not isinstance(found, Settings):
        raise MigrationError("flowfix: revisions must run through flowfix's alembic/env.py")
    return found


def sql_literal(value: str) -> str:
    """A string as a SQL literal, for the few names revisions inline into DO blocks
    (which take no bind parameters)."""
    return "'" + value.replace("'", "''") + "'"


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


def in_batches(title: str, table: str, template: str, *, rows: int = BATCH_ROWS) -> int:
    """Walk ``table`` in primary-key order, ``rows`` at a time, one transaction per batch.

    ``template`` is a statement over ``{table}`` whose ``batch`` CTE selects
    ``WHERE {after} ORDER BY id LIMIT {limit}`` and whose final
    ``SELECT ... AS last_id, ... AS changed {into}`` returns the batch's highest id (NULL
    when the batch is empty) and the number of rows changed. Online, Python
    drives the loop and logs progress; ``--sql`` prints an equivalent DO block that
    commits after each batch. Returns the number of rows changed (0 offline).
    """
    if offline():
        into = "INTO v_last, v_changed"
        first = template.format(table=table, after="TRUE", limit=rows, into=into)
        later = template.format(table=table, after="id > v_after", limit=rows, into=into)
        with op.get_context().autocommit_block():
            note(f"OUTSIDE A TRANSACTION (one COMMIT per {rows} rows): {title}")
            execute(
                "DO $batches$\nDECLARE v_after uuid; v_last uuid; v_changed bigint;\nBEGIN\n"
                "  LOOP\n"
                "    IF v_after IS NULL THEN\n"
                f"      {first};\n"
                "    ELSE\n"
                f"      {later};\n"
                "    END IF;\n"
                "    EXIT WHEN v_last IS NULL;\n"
                "    v_after := v_last;\n"
                "    COMMIT;\n"
                "  END LOOP;\n"
                "END $batches$"
            )
        return 0

    conn = bind()
    first = text(template.format(table=table, after="TRUE", limit=":limit", into=""))
    later = text(template.format(table=table, after="id > :after", limit=":limit", into=""))
    total = batches = 0
    after = None
    started = time.monotonic()
    with op.get_context().autocommit_block():
        while True:
            stmt, params = (first, {"limit": rows}) if after is None else (later, {"limit": rows, "after": after})
            last_id, changed = conn.execute(stmt, params).one()
            if last_id is None:
                break
            after = last_id
            total += changed
            batches += 1
    log.info("%s: %d rows changed in %d batches, %.1fs", title, total, batches, time.monotonic() - started)
    return total


# --- errors and retries (used by alembic/env.py) ---------------------------------------

LOCK_NOT_AVAILABLE = "55P03"
DEADLOCK_DETECTED = "40P01"


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error, however deeply the driver wrapped it."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        code = getattr(cur, "sqlstate", None) or getattr(cur, "pgcode", None)
        if isinstance(code, str):
            return code
        cur = getattr(cur, "orig", None) or cur.__cause__
    return None


def is_lock_timeout(exc: BaseException) -> bool:
    """A wait for a lock was given up (lock_timeout) or broken (deadlock): worth a retry,
    since every step of a revision is idempotent and nothing was left half-done."""
    return sqlstate(exc) in (LOCK_NOT_AVAILABLE, DEADLOCK_DETECTED)


def lock_backoff(attempt: int) -> float:
    """1 s, 2 s, 4 s ... capped at 30 s: long enough for a blocking transaction to end."""
    return min(30.0, 2.0**attempt)


def is_connect_failure(exc: BaseException) -> bool:
    """Could not reach or log in to the server (not an error in our SQL)."""
    code = sqlstate(exc)
    if code is not None:
        return code[:2] in ("08", "28") or code in ("3D000", "57P03")
    cur: BaseException | None = exc
    for _ in range(5):
        if cur is None:
            break
        if isinstance(cur, (OSError, TimeoutError)):
            return True
        cur = getattr(cur, "orig", None) or cur.__cause__
    return False


def as_command_error(exc: BaseException, settings: Settings | None = None) -> BaseException:
    """One line for the operator, no traceback, no password.

    Messages raised by our own SQL start with ``flowfix:`` and are passed on as they are;
    anything else that is not a connection failure is left alone (it is a bug).
    """
    from alembic.util import CommandError

    from flowfix.db import unavailable

    if isinstance(exc, CommandError):
        return exc
    if isinstance(exc, FlowfixError):
        return CommandError(str(exc))
    if is_lock_timeout(exc):
        timeout = settings.lock_timeout if settings is not None else "lock_timeout"
        retries = settings.lock_retries if settings is not None else 0
        attempts = f"{retries + 1} attempt{'s' if retries else ''}"
        return CommandError(
            f"flowfix: gave up waiting for a table lock ({attempts} of {timeout}): a long-running "
            "transaction holds it. Nothing is half-done; run the upgrade again later "
            "(see pg_stat_activity), or raise FLOWFIX_LOCK_TIMEOUT / FLOWFIX_LOCK_RETRIES.")
    message = str(getattr(exc, "orig", None) or exc)
    if "flowfix:" in message:
        return CommandError(message[message.index("flowfix:"):].splitlines()[0])
    if settings is not None and is_connect_failure(exc):
        return CommandError(str(unavailable(settings, exc)))
    return exc


def quote(name: str) -> str:
    """Quote an identifier read from the catalog (constraint or index name) for DDL."""
    from sqlalchemy.dialects import postgresql

    return postgresql.dialect().identifier_preparer.quote_identifier(name)


def run_or_undo(sql: str, *, undo: str, when_sqlstate: str, message: str) -> None:
    """Run ``sql`` in its own transaction; if it fails with ``when_sqlstate``, run ``undo``
    and stop the revision with ``message`` (the version table is left where it was).
    ``sql`` must be safe to run twice (a retry may repeat it)."""
    with op.get_context().autocommit_block():
        lint_ignore("prefer-robust-stmts", "runs on its own, outside a transaction, and is safe to rerun")
        if offline():
            execute(sql)
            return
        try:
            execute(sql)
        except Exception as exc:
            if sqlstate(exc) != when_sqlstate:
                raise
            execute(undo)
            raise MigrationError(message) from None


def lint_ignore(rule: str, reason: str) -> None:
    """Tell squawk (which lints the ``--sql`` output in CI) that the next statement breaks
    ``rule`` on purpose, and say why, right where a reviewer reads it."""
    if offline():
        # Written straight to the output: static_output() would add a blank line, and
        # squawk only applies an ignore comment to the statement on the very next line.
        op.get_context().impl.output_buffer.write(f"-- {reason}\n-- squawk-ignore {rule}\n")
