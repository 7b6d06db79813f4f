"""Review of issue 18: `flowfix runs RUN` renders counts->'live' from the ledger, a table
the operator role may write; a live state of an unexpected shape (an older or newer
flowfix, a hand edit) must not end the command with "a bug in flowfix" (exit 3)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from flowfix import ledger
from flowfix.cli import app
from flowfix.config import Settings
from tests.helpers import cli_env, sql


@pytest.mark.parametrize(
    "live",
    [{"paused": "yes", "pauses": {"replica_lag": 3}, "blind": "x"}, {"paused": {"since": 1}, "pauses": [1]}],
    ids=["scalars", "lists"],
)
def test_a_live_state_of_another_shape_is_shown_or_refused_not_a_bug(
    shaped_fixed: Settings, live: dict[str, object]
) -> None:
    s = shaped_fixed
    (run,) = sql(s, "INSERT INTO flowfix_runs (command, arguments) VALUES ('backfill', '{}') RETURNING id::text AS id")
    sql(s, ledger.NOTE_LIVE, {"run": run["id"], "live": json.dumps(live)})
    sql(s, "SELECT pg_advisory_lock(hashtext(:k))", {"k": ledger.ADVISORY_LOCK_KEY})
    sql(s, ledger.HOLD_RUN, {"k": ledger.ADVISORY_LOCK_KEY, "run": run["id"]})
    try:
        for args in (["runs", run["id"]], ["runs", run["id"], "--format", "json"], ["status"]):
            shown = CliRunner().invoke(app, args, env=cli_env(s))
            assert shown.exit_code in (0, 1, 2), (args, shown.output)
    finally:
        sql(s, "SELECT pg_advisory_unlock_all()")
