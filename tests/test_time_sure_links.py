"""Time matching in two parts (issue 21): the sure pairs linked in SQL, the tangled rest
by assign_by_time in the client. Together they must decide exactly as assign_by_time over
every pair, on random datasets full of equal distances, evaluated by PostgreSQL itself."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import text

from flowfix.backfill.plan import WORK_TABLES, match_by_time
from flowfix.config import Settings
from flowfix.db import make_engine
from tests.test_assign_by_time import reference

T0 = datetime(2026, 1, 1, tzinfo=UTC)
WINDOW = 120.0
TENANT = (uuid.UUID(int=77), uuid.UUID(int=78))
OTHER = (uuid.UUID(int=77), uuid.UUID(int=79))

#: (tenant index, minute) per import and per master: few minutes, so many equal distances
points = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), max_size=12)


async def _match(s: Settings, imports: list[tuple[int, int]], masters: list[tuple[int, int]]) -> tuple:  # type: ignore[type-arg]
    engine = make_engine(s)
    try:
        async with engine.connect() as conn, conn.begin():
            for statement in WORK_TABLES:
                await conn.execute(text(statement))
            await conn.execute(text("CREATE TEMPORARY TABLE flowfix_plan_exact (import_id uuid) ON COMMIT DROP"))
            await conn.execute(
                text(
                    "CREATE TEMPORARY TABLE flowfix_plan_free (flow_id uuid, client_account_id uuid,"
                    " engagement_id uuid, created_at timestamptz) ON COMMIT DROP"
                )
            )
            for n, (tenant, minute) in enumerate(imports):
                c, e = (TENANT, OTHER)[tenant]
                await conn.execute(
                    text("INSERT INTO flowfix_plan_orphans VALUES (:id, :c, :e, :at)"),
                    {"id": uuid.UUID(int=1000 + n), "c": c, "e": e, "at": T0 + timedelta(minutes=minute)},
                )
            for n, (tenant, minute) in enumerate(masters):
                c, e = (TENANT, OTHER)[tenant]
                await conn.execute(
                    text("INSERT INTO flowfix_plan_free VALUES (:id, :c, :e, :at)"),
                    {"id": uuid.UUID(int=2000 + n), "c": c, "e": e, "at": T0 + timedelta(minutes=minute)},
                )
            assigned, tied = await match_by_time(conn, WINDOW)
            stored = {
                row.id: (row.master, row.distance_seconds)
                for row in await conn.execute(text("SELECT id, master, distance_seconds FROM flowfix_plan_links"))
            }
            await conn.rollback()
            return assigned, tied, stored
    finally:
        await engine.dispose()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(points, points)
def test_sure_links_in_sql_plus_the_rest_decide_as_assign_by_time(
    settings: Settings, imports: list[tuple[int, int]], masters: list[tuple[int, int]]
) -> None:
    assigned, tied, stored = asyncio.run(_match(settings, imports, masters))
    pairs = [
        (uuid.UUID(int=1000 + i), uuid.UUID(int=2000 + m), abs(im - mm) * 60.0)
        for i, (it, im) in enumerate(imports)
        for m, (mt, mm) in enumerate(masters)
        if it == mt and abs(im - mm) * 60.0 <= WINDOW
    ]
    want_assigned, want_ambiguous = reference(pairs)
    assert assigned == want_assigned
    assert set(tied) == want_ambiguous
    assert stored == assigned  # every link is in the links table, once
