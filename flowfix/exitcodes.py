"""flowfix's exit codes, one home (README: Exit codes): results name their outcome with
these, the CLI exits with them."""

from __future__ import annotations

from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    PROBLEMS = 1  # integrity problems found (validate), rows left unlinked (backfill)
    USAGE = 2  # bad input, connection, permission or lock error, refusal: one line on stderr
    BUG = 3  # an unexpected error in flowfix itself: rerun with --debug for the traceback
    INTERRUPTED = 130  # Ctrl-C
