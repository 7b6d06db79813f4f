"""The fault suite (issue 11): each writing command killed with SIGKILL at several points,
then run again, ends exactly where one uninterrupted run ends (every row of the four
tables and the catalog compared with a twin database that ran without interruption);
and a role with idle_in_transaction_session_timeout runs the whole runbook."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flowfix.cli import Exit, app
from flowfix.config import Settings
from tests import snapshot
from tests.conftest import upgrade
from tests.helpers import Gate, add_discovery_flow, add_master, add_record, cli_env, insert, sql
from tests.shapes import RUNBOOK_SHAPES
from tests.test_shapes import target_of

ROOT = Path(__file__).resolve().parent.parent
C, E = uuid.uuid4(), uuid.uuid4()
T0 = datetime(2026, 3, 1, 12, tzinfo=UTC)
runner = CliRunner()


def dataset(s: Settings, n: int = 12) -> None:
    """Imports linked by the master's id (the legacy FK), orphans to backfill by time, a
    discovery flow without master: something for every step of every command."""
    by_id = target_of(s, "data_imports") == "id"
    for k in range(n):
        master_id, flow = add_master(s, client=C, engagement=E, created_at=T0 + timedelta(hours=k))
        imp = uuid.uuid4()
        link = None if k % 4 else (master_id if by_id else flow)
        insert(
            s,
            "data_imports",
            {
                "id": imp,
                "master_flow_id": link,
                "client_account_id": C,
                "engagement_id": E,
                "created_at": T0 + timedelta(hours=k, minutes=1),
            },
        )
        for r in range(3):
            add_record(s, data_import=imp, master=None, row=r)
        add_discovery_flow(s, flow_id=flow, master=flow if k % 3 else None, client=C, engagement=E)


def kill_when(s: Settings, args: list[str], marker: str) -> None:
    """Run ``flowfix *args`` and SIGKILL it as soon as a line of its log contains ``marker``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flowfix", *args],
        env={**os.environ, **cli_env(s)},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    seen = []
    deadline = time.monotonic() + 60
    for line in proc.stderr:
        seen.append(line)
        if marker in line or time.monotonic() > deadline:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert any(marker in line for line in seen), "".join(seen)


def same(a: snapshot.Snapshot, b: snapshot.Snapshot) -> None:
    """Equal snapshots; otherwise a message naming what differs, table by table."""
    for field in dataclasses.fields(a):
        left, right = getattr(a, field.name), getattr(b, field.name)
        if isinstance(left, dict):
            for key in sorted(set(left) | set(right)):
                only_a = sorted(set(map(str, left.get(key, []))) - set(map(str, right.get(key, []))))
                only_b = sorted(set(map(str, right.get(key, []))) - set(map(str, left.get(key, []))))
                assert not only_a and not only_b, f"{field.name} {key}: rerun only {only_a[:3]}; twin only {only_b[:3]}"
        assert left == right, field.name


def ok(s: Settings, *args: str) -> None:
    result = runner.invoke(app, list(args), env=cli_env(s))
    assert result.exit_code in (Exit.OK, Exit.PROBLEMS), result.output


# --- the matrix: kill points x shapes, sized by what differs ---------------------------
#
# Each command is killed at every point where a rerun takes a different path (what the
# revision's bookkeeping says is done, what is half-built) on the shape that takes it
# fully (deployed: every step has work, both FKs move, the unique key is an index to
# adopt), and on another shape only where that shape makes the step itself take another
# path; each pair says why. FLOWFIX_FAULT_MATRIX=full runs every kill point on every
# runbook shape (CI does, on PostgreSQL 18).
FULL_MATRIX = os.environ.get("FLOWFIX_FAULT_MATRIX") == "full"

UPGRADE_KILLS = (
    (
        "deployed",
        "step 3: raw_import_records",
        "one table's FK swapped, the other's not: the rerun swaps only what is left",
    ),
    ("deployed", "step 4: data_imports", "ids half translated to flow_ids: the rerun translates the rest, once"),
    (
        "deployed",
        "step 5: raw_import_records",
        "an index build (CONCURRENTLY) cut off: the rerun rebuilds an invalid one",
    ),
    ("deployed", "step 6: discovery_flows", "FKs NOT VALID, statistics fresh: the rerun only validates"),
    (
        "between",
        "step 3: raw_import_records",
        "one FK already on flow_id before flowfix: recorded as kept, not swapped",
    ),
    ("between", "step 4: data_imports", "only one table holds master ids: translation must leave the other alone"),
    ("friendly", "step 5: raw_import_records", "schema public, ids with defaults, an index flowfix adopts or builds"),
    ("app_head", "step 6: discovery_flows", "nothing to swap or translate: the rerun must not redo what it never did"),
)
DOWNGRADE_KILLS = (
    ("deployed", "drop the FK this revision added", "added FKs half dropped: the rerun drops the rest"),
    ("deployed", "translate values back", "flow_ids half translated back to ids"),
    ("deployed", "re-add the FKs", "old FKs half restored (NOT VALID, then VALIDATE)"),
    ("between", "translate values back", "one table was on flow_id before: only the other goes back"),
    ("app_head", "drop the FK this revision added", "nothing was added: the rerun restores nothing"),
)
HEAD_KILLS = (
    ("deployed", "step 1:", "before the CHECK exists"),
    ("deployed", "step 2:", "CHECK NOT VALID added, not validated: the rerun validates it"),
    ("deployed", "step 3:", "CHECK validated, SET NOT NULL pending"),
    ("app_head", "step 2:", "discovery_flows has its own FK (ON DELETE CASCADE) beside the CHECK"),
)
UNDO_KILLS = (
    ("deployed", "", "created masters have server defaults"),
    ("app_head", "", "created masters took every required column from planning (no id default)"),
)


def kills(chosen: tuple[tuple[str, str, str], ...]) -> list[Any]:
    markers = dict.fromkeys(marker for _, marker, _ in chosen)
    pairs = [(s, m) for s in RUNBOOK_SHAPES for m in markers] if FULL_MATRIX else [(s, m) for s, m, _ in chosen]
    return [pytest.param(s, m, id=f"{s}-{m}".rstrip("-")) for s, m in pairs]


@pytest.mark.parametrize(("shape_name", "marker"), kills(UPGRADE_KILLS))
def test_upgrade_fix_master_flow_fk_killed_then_rerun_ends_as_one_run(
    make_shape: Callable[..., Settings], copy_database: Callable[[Settings], Settings], shape_name: str, marker: str
) -> None:
    s = make_shape(shape_name)
    dataset(s)
    twin = copy_database(s)
    kill_when(s, ["upgrade", "fix_master_flow_fk"], marker)
    ok(s, "upgrade", "fix_master_flow_fk")
    ok(twin, "upgrade", "fix_master_flow_fk")
    same(snapshot.take(s), snapshot.take(twin))


@pytest.mark.parametrize(("shape_name", "marker"), kills(DOWNGRADE_KILLS))
def test_downgrade_killed_then_rerun_ends_as_one_run(
    make_shape: Callable[..., Settings], copy_database: Callable[[Settings], Settings], shape_name: str, marker: str
) -> None:
    s = make_shape(shape_name)
    dataset(s)
    upgrade(s, "fix_master_flow_fk")
    twin = copy_database(s)
    kill_when(s, ["downgrade", "legacy"], marker)
    ok(s, "downgrade", "legacy")
    ok(twin, "downgrade", "legacy")
    same(snapshot.take(s), snapshot.take(twin))


@pytest.mark.parametrize(("shape_name", "marker"), kills(HEAD_KILLS))
def test_upgrade_head_killed_then_rerun_ends_as_one_run(
    make_shape: Callable[..., Settings], copy_database: Callable[[Settings], Settings], shape_name: str, marker: str
) -> None:
    s = make_shape(shape_name)
    dataset(s)
    upgrade(s, "fix_master_flow_fk")
    ok(s, "backfill", "--create-missing-masters")
    twin = copy_database(s)
    kill_when(s, ["upgrade", "head"], marker)
    ok(s, "upgrade", "head")
    ok(twin, "upgrade", "head")
    same(snapshot.take(s), snapshot.take(twin))


@pytest.mark.parametrize(("shape_name", "marker"), kills(UNDO_KILLS))
def test_undo_killed_part_way_then_rerun_ends_as_one_undo(
    make_shape: Callable[..., Settings], copy_database: Callable[[Settings], Settings], shape_name: str, marker: str
) -> None:
    s = make_shape(shape_name)
    dataset(s, n=20)
    upgrade(s, "fix_master_flow_fk")
    ok(s, "backfill", "--create-missing-masters")
    (run,) = sql(s, "SELECT id::text FROM flowfix_runs")
    twin = copy_database(s)
    # the undo's 2nd statement on the imports waits at a gate: its first batch committed
    with Gate(s, "data_imports", at=2) as gate:
        proc = subprocess.Popen(
            [sys.executable, "-m", "flowfix", "undo", run["id"]],
            env={**os.environ, **cli_env(s)},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        gate.wait()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sql(s, "SELECT count(*) AS n FROM flowfix_changes WHERE undone_at IS NOT NULL")[0]["n"], "no batch undone"
    ok(s, "undo", run["id"])
    ok(twin, "undo", run["id"])
    same(snapshot.take(s), snapshot.take(twin))
    statuses = sql(s, "SELECT command, status FROM flowfix_runs ORDER BY started_at")
    assert [(r["command"], r["status"]) for r in statuses] == [("backfill", "undone"), ("undo", "finished")]


def test_the_runbook_runs_under_a_role_with_idle_in_transaction_session_timeout(shaped: Settings) -> None:
    """flowfix never leaves a transaction idle while it thinks: a role (or database) with
    a short idle_in_transaction_session_timeout runs every writing command to the end."""
    dataset(shaped)
    db = shaped.require_url().database
    # 1 s: far above any statement gap of flowfix's own, and above the scheduling stalls of 4
    # workers on 2 cores (300 ms was seen to trip once under that load)
    sql(shaped, f"ALTER DATABASE {db} SET idle_in_transaction_session_timeout = '1s'")
    try:
        ok(shaped, "upgrade", "fix_master_flow_fk")
        ok(shaped, "backfill", "--create-missing-masters")
        (run,) = sql(shaped, "SELECT id::text FROM flowfix_runs")
        ok(shaped, "undo", run["id"])
        ok(shaped, "backfill", "--create-missing-masters")
        ok(shaped, "validate")
        ok(shaped, "upgrade", "head")
    finally:
        sql(shaped, f"ALTER DATABASE {db} RESET idle_in_transaction_session_timeout")
