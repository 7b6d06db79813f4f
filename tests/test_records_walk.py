"""The records walk (issue 13): physical ranges without a secondary index, by primary key
where TID Range Scans are missing, on several connections, resumable range by range, and
a closing pass for what the application moves behind it. Every shape of the runbook."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from flowfix import backfill as bf
from flowfix.backfill import steps
from flowfix.config import Settings
from flowfix.db import make_engine, run_with_engine
from flowfix.errors import RunInterrupted
from tests.helpers import add_master, add_record, insert, links, position_column, sql

C, E = uuid.uuid4(), uuid.uuid4()
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def s(shaped_fixed: Settings) -> Settings:
    return shaped_fixed


def dataset(s: Settings, imports: int = 6, records: int = 400) -> dict[uuid.UUID, uuid.UUID]:
    """``imports`` orphan imports, each with a master by time and ``records`` orphan
    records spread over many pages (inserted round-robin, so each import's records are
    scattered over the table as a bulk load of many imports leaves them)."""
    expected: dict[uuid.UUID, uuid.UUID] = {}
    templates = []
    for n in range(imports):
        _, flow = add_master(s, client=C, engagement=E, created_at=T0 + timedelta(hours=n * 5))
        imp = uuid.uuid4()
        insert(
            s,
            "data_imports",
            {
                "id": imp,
                "master_flow_id": None,
                "client_account_id": C,
                "engagement_id": E,
                "created_at": T0 + timedelta(hours=n * 5, minutes=1),
            },
        )
        templates.append(add_record(s, data_import=imp, master=None))
        expected[imp] = flow
    position = position_column(s)
    sql(
        s,
        "INSERT INTO raw_import_records SELECT (jsonb_populate_record(NULL::raw_import_records, to_jsonb(r) || jsonb_build_object("
        f" 'id', gen_random_uuid(), '{position}', g))).*"
        " FROM generate_series(1, :n) g CROSS JOIN LATERAL"
        " (SELECT * FROM raw_import_records WHERE id = (CAST(:t AS uuid[]))[1 + g % cardinality(CAST(:t AS uuid[]))]) r",
        {"n": imports * (records - 1), "t": templates},
    )
    return expected


def record_links(s: Settings) -> dict[uuid.UUID, uuid.UUID | None]:
    return {r["id"]: r["master_flow_id"] for r in sql(s, "SELECT id, master_flow_id FROM raw_import_records")}


def record_ledger(s: Settings) -> list[uuid.UUID]:
    """Every record id the ledger says a backfill linked (one entry per linked record)."""
    rows = sql(
        s,
        "SELECT unnest(row_ids) AS id FROM flowfix_changes c JOIN flowfix_runs r ON r.id = c.run_id"
        " WHERE r.command = 'backfill' AND c.table_name = 'raw_import_records'",
    )
    return [r["id"] for r in rows]


def run(s: Settings, reporter: Any = None, **options: Any) -> bf.Result:
    return run_with_engine(s, lambda engine: bf.run(engine, s, bf.Options(**{"batch_size": 500, **options}), reporter))


def in_another_thread(fn: Any, *args: Any) -> None:
    """Call a synchronous helper (it runs its own event loop) from inside the run's loop."""
    import threading

    worker = threading.Thread(target=fn, args=args)
    worker.start()
    worker.join()


def pages(s: Settings) -> int:
    return int(sql(s, "SELECT pg_relation_size('raw_import_records') / 8192 AS n")[0]["n"])


@pytest.mark.parametrize("walk,jobs", [("ctid", 1), ("ctid", 2), ("key", 1)])
def test_every_walk_links_every_record_once_and_the_ledger_lists_each(s: Settings, walk: str, jobs: int) -> None:
    expected = dataset(s)
    size = pages(s)
    assert size > 20  # many slices, not one
    result = run(s, walk=walk, jobs=jobs, batch_size=100)  # at most 5 pages (or 100 rows) a slice
    assert result.exit_code == 0 and result.counts is not None
    assert result.counts.records_walk == walk and result.counts.jobs == jobs and result.counts.batches >= size / 5
    imports = links(s, "data_imports")
    got = record_links(s)
    by_import = {r["id"]: r["data_import_id"] for r in sql(s, "SELECT id, data_import_id FROM raw_import_records")}
    assert imports == expected
    assert got == {rec: expected[imp] for rec, imp in by_import.items()}
    logged = record_ledger(s)
    assert sorted(logged) == sorted(got) and result.counts.raw_import_records == len(got)


def test_the_physical_walk_reads_a_slice_by_tid_range_not_the_whole_table(s: Settings) -> None:
    """No index on data_import_id is needed: each slice is a TID Range Scan of the records
    joined to their imports by primary key (PostgreSQL 14+)."""
    dataset(s, imports=3, records=200)
    sql(s, "ANALYZE")
    statement = steps.RECORDS_WALK.by_pages("raw_import_records")
    plan = sql(
        s,
        "EXPLAIN " + statement.replace("CAST(:lo AS tid)", "'(2,0)'::tid").replace("CAST(:hi AS tid)", "'(4,0)'::tid"),
        {"run": uuid.uuid4(), "client": None, "engagement": None, "ev_via_import": "via_import"},
    )
    text_plan = "\n".join(r["QUERY PLAN"] for r in plan)
    assert "Tid Range Scan on raw_import_records" in text_plan, text_plan
    assert "Seq Scan on raw_import_records" not in text_plan, text_plan


class Crash:
    """A reporter that kills the run (as a lost connection would) after ``after``
    batches of records, once."""

    def __init__(self, after: int) -> None:
        self.after, self.seen = after, 0

    def start(self, step: str, total: int | None) -> None:
        pass

    def advance(self, step: str, n: int) -> None:
        if step == "raw_import_records":
            self.seen += 1
            if self.seen == self.after:
                raise ConnectionResetError("the connection went away")

    def paused(self, pause: object) -> None:
        pass

    def resumed(self) -> None:
        pass

    def note(self, line: str) -> None:
        pass


@pytest.mark.parametrize("walk,jobs", [("ctid", 2), ("key", 1)])
def test_a_walk_that_dies_part_way_resumes_each_range_where_it_stopped(s: Settings, walk: str, jobs: int) -> None:
    expected = dataset(s)
    with pytest.raises(RunInterrupted):
        run(s, Crash(after=3), walk=walk, jobs=jobs, batch_size=40)  # 2 pages a slice
    half = record_links(s)
    assert 0 < sum(v is not None for v in half.values()) < len(half)
    progress = sql(
        s,
        "SELECT lo_page, next_page, lo_key, next_key, w.status FROM flowfix_walk_ranges w"
        " JOIN flowfix_runs r ON r.id = w.run_id WHERE r.status = 'running' AND w.walk <> 'closing'",
    )
    assert any((p["next_page"] or 0) > (p["lo_page"] or 0) or p["next_key"] != p["lo_key"] for p in progress)
    assert any(p["status"] != "done" for p in progress)

    resumed = run(s, walk=walk, jobs=jobs)
    assert resumed.resumed and resumed.exit_code == 0
    by_import = {r["id"]: r["data_import_id"] for r in sql(s, "SELECT id, data_import_id FROM raw_import_records")}
    assert record_links(s) == {rec: expected[imp] for rec, imp in by_import.items()}
    logged = record_ledger(s)
    assert len(logged) == len(set(logged)) == len(by_import)  # nothing redone, nothing skipped
    assert resumed.counts is not None and resumed.counts.records_final_pass == 0


def test_records_the_application_adds_or_moves_during_the_walk_are_linked_by_the_closing_pass(s: Settings) -> None:
    """A physical walk cannot see a row that an UPDATE moves behind it or an INSERT puts
    past its last page: the closing pass over records still NULL links them."""
    expected = dataset(s, imports=3, records=300)
    first_import = next(iter(expected))
    position = position_column(s)
    added: list[int] = []

    class Writer:
        def start(self, step: str, total: int | None) -> None:
            pass

        def advance(self, step: str, n: int) -> None:
            if step == "raw_import_records" and not added:
                # the application, mid-walk: new records, and a NULL record moved (an
                # UPDATE writes a new version, usually on the last page)
                added.append(1)
                in_another_thread(
                    sql,
                    s,
                    "INSERT INTO raw_import_records SELECT (jsonb_populate_record(NULL::raw_import_records, to_jsonb(r) || jsonb_build_object("
                    f" 'id', gen_random_uuid(), '{position}', 10000 + g))).*"
                    " FROM generate_series(1, 50) g CROSS JOIN LATERAL (SELECT * FROM raw_import_records"
                    " WHERE data_import_id = :i LIMIT 1) r",
                    {"i": first_import},
                )

        def paused(self, pause: object) -> None:
            pass

        def resumed(self) -> None:
            pass

        def note(self, line: str) -> None:
            pass

    result = run(s, Writer(), walk="ctid")
    assert added and result.exit_code == 0 and result.counts is not None
    assert result.counts.records_final_pass >= 50
    assert None not in record_links(s).values()


def test_a_stored_range_the_catalog_contradicts_is_refused_in_one_line_changing_nothing(s: Settings) -> None:
    """The stored ranges name leaf tables; a name the catalog does not list (or bounds out
    of order) never reaches the SQL: the resume refuses, exit 2, naming the row."""
    from flowfix import ledger
    from flowfix.walk import Range

    dataset(s, imports=2, records=100)

    async def start_and_tamper() -> None:
        engine = make_engine(s)
        try:
            async with engine.begin() as conn:
                run_id = await ledger.start_run(conn, "backfill", bf.Options().arguments())
                plan = await bf.make_plan(conn, bf.Options())
                await ledger.store_import_plan(
                    conn, run_id, [(x.id, x.master_flow_id, x.evidence, x.distance_seconds) for x in plan.import_links]
                )
                bad = Range("raw_import_records; DROP TABLE data_imports", "ctid", 0, 5, 0)
                await ledger.store_ranges(conn, run_id, "raw_import_records", [bad])
        finally:
            await engine.dispose()

    asyncio.run(start_and_tamper())
    before = record_links(s)
    with pytest.raises(RunInterrupted) as caught:
        run(s)
    from flowfix.cli import error_line

    line, code = error_line(caught.value)
    assert code == 2 and "flowfix_walk_ranges" in line and "DROP TABLE data_imports" in line, line
    assert "\n" not in line
    assert record_links(s) == before  # the records walk refused before its first batch


def test_options_of_the_walk_do_not_change_the_identity_of_a_run() -> None:
    base = bf.Options()
    assert replace(base, jobs=4, walk="key", max_replica_lag=0, batch_size=10).arguments() == base.arguments()
