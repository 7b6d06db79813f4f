"""Typed errors, and the one place where driver and server errors become them.

Library code raises :class:`FlowfixError` subclasses and never decides exit codes; the
CLI's boundary (``flowfix.cli``) and Alembic's ``env.py`` call :func:`translate` on
anything else, so a lost connection, a permission error or a lock timeout reads the same
wherever it happens: one line, saying what to do. What :func:`translate` does not
recognise is a bug in flowfix (the CLI exits 3 and suggests ``--debug``).
"""

from __future__ import annotations

import re
import socket
from typing import Any


class FlowfixError(Exception):
    """Base class for every error flowfix reports to a user."""


class ConfigError(FlowfixError):
    """A setting (URL, schema, option) is malformed."""


class UsageProblem(FlowfixError):
    """A command-line value is wrong (checked before anything runs)."""


class DatabaseUnavailable(FlowfixError):
    """The database could not be reached, refused the login, or went away."""


class MigrationError(FlowfixError):
    """A revision refused to run because the database is not in the state it needs."""


class DatabaseRefused(FlowfixError):
    """The server refused what flowfix asked: permissions, read-only, locks, timeouts."""


class RunInterrupted(FlowfixError):
    """A run stopped after committing some of its work; the message names the run."""

    def __init__(self, message: str, run_id: Any) -> None:
        super().__init__(message)
        self.run_id = run_id


# --- driver and server errors ----------------------------------------------------------

LOCK_NOT_AVAILABLE = "55P03"
DEADLOCK_DETECTED = "40P01"

#: SQLSTATE (or its two-character class) -> what it means for the operator.
SQLSTATE_MESSAGES: dict[str, str] = {
    "28": "the server refused the login ({detail}): check the user and password (DATABASE_URL, PGPASSWORD, ~/.pgpass)",
    "3D000": "{detail}: check the database name in DATABASE_URL",
    "42501": "permission denied: {denied} ({detail}): run flowfix as a role that may do this (the tables' owner"
    " for upgrade and downgrade; docs/roles-and-poolers.md has the grants of each role)",
    "25006": "the database is read-only ({detail}): it is a replica, in recovery, or"
    " default_transaction_read_only is on; run flowfix against the primary",
    LOCK_NOT_AVAILABLE: "gave up waiting for a lock ({detail}): a long transaction holds it (see"
    " pg_stat_activity); run the command again later, or raise FLOWFIX_LOCK_TIMEOUT",
    DEADLOCK_DETECTED: "a deadlock with another session was broken by the server ({detail}): run the command again",
    "40001": "a serialization failure with a concurrent transaction ({detail}): run the command again",
    "57014": "the server cancelled a statement ({detail}): statement_timeout (set for this role or database)"
    " is shorter than the step needs, or someone cancelled it; raise it for flowfix's role"
    " (ALTER ROLE <role> SET statement_timeout = '10min') and rerun: what was committed stays",
    "25P03": "the server ended flowfix's session because a transaction stayed idle ({detail}):"
    " idle_in_transaction_session_timeout (set for this role or database) is shorter than flowfix's pauses"
    " inside a transaction; raise it for flowfix's role (ALTER ROLE <role> SET"
    " idle_in_transaction_session_timeout = '1min') and rerun: what was committed stays and the rerun resumes",
    "57P05": "the server ended flowfix's idle session ({detail}): idle_session_timeout (set for this role or"
    " database) is shorter than flowfix's pauses between transactions; raise it for flowfix's role (ALTER ROLE"
    " <role> SET idle_session_timeout = '10min') and rerun: what was committed stays and the rerun resumes",
    "57P01": "the server ended flowfix's session ({detail}: a restart, a fast shutdown or pg_terminate_backend);"
    " what was committed stays: rerun when the server is back, the rerun resumes",
    "57P02": "the server crashed and ended every session ({detail}); what was committed stays: rerun when it is"
    " back, the rerun resumes",
    "57P03": "the server is not accepting connections yet ({detail}: starting up, shutting down or in recovery);"
    " rerun when it is up",
    "57P04": "the database was dropped while flowfix was connected ({detail}); check DATABASE_URL",
    "53100": "the server's disk is full ({detail}): free space on the server (data or WAL volume), then rerun:"
    " what was committed stays",
    "53200": "the server is out of memory ({detail}): check its log and memory settings, or lower --batch-size,"
    " then rerun: what was committed stays",
    "53300": "the server has too many connections ({detail}): max_connections or the role's connection limit"
    " is reached; close idle sessions or lower --jobs, then rerun",
    "53400": "the server hit a configuration limit ({detail}, e.g. max_locks_per_transaction): raise it on the"
    " server or lower --batch-size, then rerun",
    "53": "the server is out of a resource ({detail}): free it on the server, then rerun: what was committed stays",
    "58030": "the server hit an I/O error ({detail}): check its disk and log before anything else; rerun once"
    " it is healthy",
    "58P01": "a file the server needs is missing ({detail}): check the server's installation and log; rerun"
    " once it is healthy",
    "58": "the server reported a system error ({detail}): check its log; rerun once it is healthy",
    "XX001": "the server found corrupt data ({detail}): stop, and check the database (amcheck, the server log)"
    " before running anything else",
    "XX002": "the server found a corrupt index ({detail}): REINDEX the index its log names, then rerun",
    "XX": "the server reported an internal error ({detail}): a problem of the server, not of flowfix; check"
    " its log, then rerun",
    "08": "the connection to the server failed ({detail}); check that it is up and reachable",
}


#: Integrity errors a live application can cause while flowfix writes its tables (a master
#: created or deleted between flowfix's check and its write); in flowfix's own tables they
#: are bugs.
RACE_SQLSTATES = ("23505", "23503")
APPLICATION_TABLES = ("crewai_flow_state_extensions", "data_imports", "raw_import_records", "discovery_flows")


def _table(exc: BaseException) -> str | None:
    """The table a server error names (asyncpg keeps the server's table_name field)."""
    for cur in _chain(exc):
        table = getattr(cur, "table_name", None)
        if isinstance(table, str):
            return table
    return None


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error, however deeply the driver wrapped it."""
    for cur in _chain(exc):
        code = getattr(cur, "sqlstate", None) or getattr(cur, "pgcode", None)
        if isinstance(code, str):
            return code
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and all(cur is not s for s in seen) and len(seen) < 10:
        seen.append(cur)
        cur = getattr(cur, "orig", None) or cur.__cause__ or cur.__context__
    return seen


_DENIED_RE = re.compile(r"permission denied for (table|relation|sequence|schema|function|database) (\S+)")
_OWNER_RE = re.compile(r"must be owner of (\w+(?: \w+)?) (\S+)")
_TEMP_RE = re.compile(r"permission denied to create temporary tables in database (\S+)")
_WRITES = (("INSERT", r"INSERT\s+INTO\s+"), ("UPDATE", r"UPDATE\s+"), ("DELETE", r"DELETE\s+FROM\s+"))


def denied(exc: BaseException, detail: str) -> str:
    """What a permission error (42501) denied, as "PRIVILEGE on KIND NAME": the object from
    the server's message, the privilege from the statement (a table the statement writes
    is named with that verb, one it reads with SELECT; a schema needs USAGE)."""
    owner = _OWNER_RE.search(detail)
    if owner:
        return f"only the owner of {owner.group(1)} {owner.group(2)} may do this"
    temp = _TEMP_RE.search(detail)
    if temp:  # the backfill's planner works in temporary tables
        return f"TEMPORARY on database {temp.group(1)}"
    found = _DENIED_RE.search(detail)
    if found is None:
        return "a privilege this role lacks"
    kind, name = found.group(1), found.group(2)
    if kind == "schema":
        return f"USAGE (or CREATE) on schema {name}"
    if kind in ("function", "database"):
        return f"EXECUTE on function {name}" if kind == "function" else f"CONNECT on database {name}"
    statement = next((s for s in (getattr(c, "statement", None) for c in _chain(exc)) if isinstance(s, str)), "")
    bare = re.escape(name.rsplit(".", 1)[-1].strip('"'))
    privilege = "SELECT" + (
        " and UPDATE (a row lock)" if re.search(r"\bFOR (NO KEY )?(UPDATE|SHARE)\b", statement) else ""
    )
    for verb, pattern in _WRITES:
        if re.search(pattern + r'(?:\w+\.)?"?' + bare + r"\b", statement, re.IGNORECASE):
            privilege = verb
            break
    return f"{privilege} on {kind} {name}"


def is_lock_timeout(exc: BaseException) -> bool:
    """A wait for a lock was given up (lock_timeout) or broken (deadlock): worth a retry."""
    return sqlstate(exc) in (LOCK_NOT_AVAILABLE, DEADLOCK_DETECTED)


def lock_backoff(attempt: int) -> float:
    """About 1 s, 2 s, 4 s ... capped at 30 s, with jitter (pgroll's way) so that two
    sessions that gave up together do not come back together."""
    import random

    return float(min(30.0, 2.0**attempt) * random.uniform(0.75, 1.25))


def _detail(exc: BaseException) -> str:
    for cur in _chain(exc):
        if getattr(cur, "sqlstate", None) or isinstance(cur, (OSError, TimeoutError)):
            text = str(cur).strip()
            break
    else:
        text = str(getattr(exc, "orig", None) or exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


def is_connect_failure(exc: BaseException) -> bool:
    """Could not reach or keep a connection to the server (not an error in our SQL)."""
    import asyncpg

    code = sqlstate(exc)
    if code is not None:
        return code[:2] in ("08", "28") or code in ("3D000", "57P01", "57P02", "57P03", "57P05", "25P03")
    return any(
        isinstance(
            cur,
            (
                OSError,
                TimeoutError,
                socket.gaierror,
                asyncpg.InterfaceError,
                asyncpg.ClientConfigurationError,
                ConnectionError,
            ),
        )
        for cur in _chain(exc)
    )


def translate(exc: BaseException, where: str = "") -> FlowfixError | None:
    """The :class:`FlowfixError` an operator should see for ``exc``, or None when ``exc``
    is not something a database or a setting can cause (a bug). ``where`` (a masked URL)
    is named in connection failures."""
    if isinstance(exc, FlowfixError):
        return exc
    import asyncpg

    code = sqlstate(exc)
    detail = _detail(exc)
    template = (SQLSTATE_MESSAGES.get(code) or SQLSTATE_MESSAGES.get(code[:2])) if code is not None else None
    lost = (ConnectionResetError, BrokenPipeError, asyncpg.ConnectionDoesNotExistError)
    was_lost = any(isinstance(cur, lost) or "connection is closed" in str(cur) for cur in _chain(exc))
    if code is not None and template is not None and not (was_lost and code[:2] == "08"):
        # the server said why: that first (a connection that existed and went away is "lost", below)
        message = template.format(detail=detail, denied=denied(exc, detail) if code == "42501" else "")
        if code[:2] in ("08", "28") or code == "3D000":
            return DatabaseUnavailable(f"cannot connect to {where or 'the database'}: {message}")
        if code[:2] in ("57", "53", "58", "XX") or code == "25P03":
            return DatabaseUnavailable(message)
        return DatabaseRefused(message)
    if was_lost:
        return DatabaseUnavailable(
            f"lost the connection to {where or 'the database'} ({detail}); what was"
            " committed stays: rerun when the server is back, the rerun resumes"
        )
    if code is not None:
        if code in RACE_SQLSTATES and (table := _table(exc)) in APPLICATION_TABLES:
            return DatabaseRefused(
                f"the application changed {table} at the same moment as flowfix ({detail}); the statement was"
                " rolled back and what was committed stays: rerun, the rerun plans from the rows as they are now"
            )
        if code[:2] in ("22", "54"):
            return DatabaseRefused(f"the server refused a value ({detail}); check the options given")
        if code[:2] in ("42", "0A", "23", "P0"):
            return None  # an error in flowfix's own SQL, or one its checks should have caught: a bug
    if is_connect_failure(exc):
        return DatabaseUnavailable(f"cannot connect to {where or 'the database'}: {detail}")
    return None
