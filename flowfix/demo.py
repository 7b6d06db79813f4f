"""``flowfix demo``: the whole runbook on a throwaway embedded PostgreSQL.

Builds the legacy schema with a realistic broken dataset (a few tenants, links stored as
master ``id`` values, orphans of every kind, ties, a cross-tenant trap), then walks the
runbook step by step, printing what each step found and did. Everything goes through the
same library functions the CLI uses.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import replace
from typing import Any

from sqlalchemy import text

from flowfix import alembic_runner, backfill, embedded, ledger, linking, progress, validate
from flowfix.config import Settings, normalize_url
from flowfix.db import admin, make_engine, make_sessionmaker, run_with_engine
from flowfix.render import Narrator

#: The broken dataset, for `size` imports (default 300). Tenants: 3 client accounts with
#: 2 engagements each. Per import, by its number g:
#:   g % 10 in 0..5  a discovery master created within minutes, its discovery flow names
#:                   the import (exact evidence); g % 10 == 0: the import still holds the
#:                   master's *id* (the legacy FK), which the migration translates
#:   g % 10 == 6     a master within the window, no other evidence (time window)
#:   g % 10 == 7     the master's configuration names the import (exact:configuration)
#:   g % 10 == 8     two masters exactly as far before and after (a tie: ambiguous)
#:   g % 10 == 9     no master at all; every 20th import has no tenant
#: plus a master of *another* tenant closer in time to every 6th-kind import (the trap),
#: a discovery flow whose master is missing, and a few dangling values in the records.
DATASET = (
    """INSERT INTO crewai_flow_state_extensions (id, flow_id, client_account_id, engagement_id, user_id, flow_type,
                                                 flow_name, flow_status, flow_configuration, created_at)
       SELECT md5('m-id-' || g)::uuid, md5('m-flow-' || g)::uuid,
              md5('client-' || (g % 3))::uuid, md5('eng-' || (g % 3) || '-' || (g % 2))::uuid,
              'user-' || (g % 7), 'discovery', 'Discovery ' || g, 'running',
              CASE WHEN g % 10 = 7 THEN jsonb_build_object('import_id', md5('imp-' || g)::uuid::text)
                   ELSE '{{}}'::jsonb END,
              timestamptz '2026-06-01' + g * interval '3 hours' + (g % 5) * interval '1 minute'
       FROM generate_series(1, {size}) g WHERE g % 10 <= 7""",
    # the tie: two masters 20 minutes before and after the import
    """INSERT INTO crewai_flow_state_extensions (flow_id, client_account_id, engagement_id, flow_type, created_at)
       SELECT md5('tie-' || g || '-' || s)::uuid, md5('client-' || (g % 3))::uuid,
              md5('eng-' || (g % 3) || '-' || (g % 2))::uuid, 'discovery',
              timestamptz '2026-06-01' + g * interval '3 hours' + interval '2 minutes' + s * interval '20 minutes'
       FROM generate_series(1, {size}) g, (VALUES (-1), (1)) AS v(s) WHERE g % 10 = 8""",
    # the trap: another tenant's master, closer in time than the right one
    """INSERT INTO crewai_flow_state_extensions (flow_id, client_account_id, engagement_id, flow_type, created_at)
       SELECT md5('trap-' || g)::uuid, md5('client-' || ((g + 1) % 3))::uuid,
              md5('eng-' || ((g + 1) % 3) || '-' || (g % 2))::uuid, 'discovery',
              timestamptz '2026-06-01' + g * interval '3 hours' + interval '30 seconds'
       FROM generate_series(1, {size}) g WHERE g % 10 = 6""",
    """INSERT INTO data_imports (id, client_account_id, engagement_id, master_flow_id, import_name, import_type,
                                filename, imported_by, status, created_at)
       SELECT md5('imp-' || g)::uuid,
              CASE WHEN g % 20 = 19 THEN NULL ELSE md5('client-' || (g % 3))::uuid END,
              CASE WHEN g % 20 = 19 THEN NULL ELSE md5('eng-' || (g % 3) || '-' || (g % 2))::uuid END,
              CASE WHEN g % 10 = 0 THEN md5('m-id-' || g)::uuid END,
              'Import ' || g, 'cmdb', 'servers_' || g || '.csv', 'user-' || (g % 7), 'completed',
              timestamptz '2026-06-01' + g * interval '3 hours' + interval '2 minutes'
       FROM generate_series(1, {size}) g""",
    """INSERT INTO raw_import_records (id, data_import_id, client_account_id, engagement_id, master_flow_id,
                                      row_number, raw_data)
       SELECT md5('rec-' || g || '-' || r)::uuid, md5('imp-' || g)::uuid,
              CASE WHEN g % 20 = 19 THEN NULL ELSE md5('client-' || (g % 3))::uuid END,
              CASE WHEN g % 20 = 19 THEN NULL ELSE md5('eng-' || (g % 3) || '-' || (g % 2))::uuid END,
              CASE WHEN g % 10 = 0 THEN md5('m-id-' || g)::uuid END,
              r, jsonb_build_object('hostname', 'srv-' || g || '-' || r, 'os', 'linux')
       FROM generate_series(1, {size}) g, generate_series(1, 10) r""",
    """INSERT INTO discovery_flows (id, flow_id, master_flow_id, data_import_id, client_account_id, engagement_id,
                                   user_id, flow_name, status)
       SELECT md5('df-' || g)::uuid, md5('m-flow-' || g)::uuid, NULL,
              CASE WHEN g % 10 <= 5 THEN md5('imp-' || g)::uuid END,
              md5('client-' || (g % 3))::uuid, md5('eng-' || (g % 3) || '-' || (g % 2))::uuid,
              'user-' || (g % 7), 'Discovery ' || g, 'running'
       FROM generate_series(1, {size}) g WHERE g % 10 <= 7""",
    # a discovery flow whose master was lost
    """INSERT INTO discovery_flows (flow_id, client_account_id, engagement_id, flow_name, status)
       VALUES (md5('lost-master')::uuid, md5('client-0')::uuid, md5('eng-0-0')::uuid, 'Orphaned discovery', 'paused')""",
    # records whose value matches no master at all (the FK to .id was added NOT VALID once)
    "ALTER TABLE raw_import_records DROP CONSTRAINT raw_import_records_master_flow_id_fkey",
    """UPDATE raw_import_records SET master_flow_id = md5('ghost-' || row_number)::uuid
       WHERE data_import_id = md5('imp-10')::uuid AND row_number <= 3""",
    """ALTER TABLE raw_import_records ADD CONSTRAINT raw_import_records_master_flow_id_fkey
       FOREIGN KEY (master_flow_id) REFERENCES crewai_flow_state_extensions (id) NOT VALID""",
    "ANALYZE",
)


async def _sql(settings: Settings, statements: tuple[str, ...], **params: Any) -> None:
    engine = make_engine(settings)
    try:
        async with engine.begin() as conn:
            for statement in statements:
                await conn.execute(text(statement.format(**params)))
    finally:
        await engine.dispose()


def run_demo(*, size: int = 300, keep: bool = False, say: Narrator | None = None) -> int:
    """Walk the runbook on an embedded PostgreSQL; returns the exit code (0 when it ends green)."""
    n = say or Narrator()
    n.title("Starting an embedded PostgreSQL")
    server = embedded.start(keep=keep)
    try:
        url = server.url
        asyncio.run(admin(url, "CREATE DATABASE flowfix_demo"))
        settings = Settings(url=normalize_url(server.url_for("flowfix_demo")), schema="public", create_tables=True)
        n.say(f"{settings.masked_url}  (data in {server.data_dir}{', kept' if keep else ', removed at the end'})")

        n.title(f"Legacy schema and a broken dataset ({size} imports, {size * 10:,} records)")
        alembic_runner.upgrade(settings, "legacy")
        asyncio.run(_sql(settings, DATASET, size=size))
        n.say("links stored as master ids, orphans, ties, a cross-tenant trap, dangling values, a lost master")

        n.title("flowfix validate, before anything")
        n.report(_validate(settings))

        n.title("flowfix upgrade fix_master_flow_fk (online: NOT VALID, CONCURRENTLY, batches)")
        t0 = time.perf_counter()
        alembic_runner.upgrade(settings, "fix_master_flow_fk")
        quarantined = _scalar(settings, "SELECT count(*) FROM flowfix_quarantine")
        translated = _scalar(settings, "SELECT count(*) FROM flowfix_translations WHERE old_value <> new_value")
        n.say(
            f"done in {time.perf_counter() - t0:.1f} s: {translated} links translated from master id to flow_id,"
            f" {quarantined} dangling values moved to flowfix_quarantine"
        )

        opts = backfill.Options(window_seconds=7200, create_missing_masters=True)
        n.title("flowfix backfill --window 2h --create-missing-masters --dry-run")
        dry = run_with_engine(settings, lambda e: backfill.run(e, settings, replace(opts, dry_run=True)))
        n.plan(dry)

        n.title("flowfix backfill --window 2h --create-missing-masters")
        done = run_with_engine(settings, lambda e: _backfill(e, settings, opts, n))
        c = done.counts
        assert c is not None and done.run_id is not None
        n.say(
            f"run {done.run_id}: {c.discovery_flows} discovery flows ({c.masters_created} masters created),"
            f" {c.data_imports} imports, {c.raw_import_records:,} records linked in {c.batches} batches"
            f" (longest {c.longest_batch_ms} ms)"
        )

        n.title(f"flowfix undo {done.run_id}, then backfill again (undo is exact, a rerun is identical)")
        target = done.run_id
        undone = run_with_engine(settings, lambda e: ledger.undo_run(e, settings, target))
        n.say(f"undo: {undone.reverted:,} values reverted, {undone.deleted_masters} created masters deleted")
        again = run_with_engine(settings, lambda e: _backfill(e, settings, opts, n))
        assert again.counts is not None
        n.say(
            f"backfill again: run {again.run_id}, {again.counts.data_imports} imports,"
            f" {again.counts.raw_import_records:,} records linked"
        )

        n.title("flowfix validate")
        n.report(_validate(settings))

        n.title("flowfix link: an operator resolves the ambiguous imports (ties), records included")
        ties = [a for a in again.plan.ambiguous if a.table == "data_imports"]
        for number, item in enumerate(ties):
            chosen = item.candidates[0]
            import_id = item.id

            async def link_one(e: Any, i: uuid.UUID = import_id, f: uuid.UUID = chosen) -> Any:
                return await _link(e, i, f)

            run_id, result = run_with_engine(settings, link_one)
            if number < 3:
                n.say(f"import {item.id} -> flow {chosen} ({result.records_linked} records), run {run_id}")
        if len(ties) > 3:
            n.say(f"... and {len(ties) - 3} more, each its own ledgered run")
        n.title("flowfix upgrade head (discovery_flows.master_flow_id NOT NULL, online)")
        alembic_runner.upgrade(settings, "head")
        n.say("done")

        backlog = _scalar(settings, "SELECT count(*) FROM data_imports WHERE master_flow_id IS NULL")
        records_backlog = _scalar(settings, "SELECT count(*) FROM raw_import_records WHERE master_flow_id IS NULL")
        accepted = max(backlog, records_backlog)
        n.title(f"flowfix validate --max-orphans {accepted} (the imports no evidence can place are a known backlog)")
        final = _validate(settings, max_orphans=accepted)
        n.report(final)
        n.say(f"left for a human: {backlog} imports without any master or tenant; no cross-tenant link was made")
        return 0 if final.ok else 1
    finally:
        server.stop()


def _scalar(settings: Settings, statement: str) -> int:
    async def go(engine):  # type: ignore[no-untyped-def]
        async with engine.connect() as conn:
            return (await conn.execute(text(statement))).scalar_one()

    return int(run_with_engine(settings, go))


def _validate(settings: Settings, **options: Any) -> validate.Report:
    return run_with_engine(settings, lambda e: validate.validate(e, settings, validate.Options(samples=0, **options)))


async def _backfill(engine: Any, settings: Settings, opts: backfill.Options, n: Narrator) -> backfill.Result:
    with progress.reporter(n.console) as reporter:
        return await backfill.run(engine, settings, opts, reporter)


async def _link(engine, import_id: uuid.UUID, flow_id: uuid.UUID):  # type: ignore[no-untyped-def]
    async with make_sessionmaker(engine)() as session:
        return await linking.link_with_ledger(session, data_import_id=import_id, flow_id=flow_id)
