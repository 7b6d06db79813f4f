"""The tenant rule, table-driven: each policy's Python function and its SQL twin give the
same answer on every case, evaluated by PostgreSQL itself."""

from __future__ import annotations

import uuid

import pytest

from flowfix.config import Settings
from flowfix.tenancy import known_and_equal, known_and_equal_sql, unknown_matches, unknown_matches_sql
from tests.helpers import sql

C, E, OTHER = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

#: (row client, row engagement) against the master's (C, E):
#: what "unknown matches" says, what "known and equal" says
CASES = [
    ((C, E), True, True),
    ((None, E), True, False),
    ((C, None), True, False),
    ((None, None), True, False),
    ((OTHER, E), False, False),
    ((C, OTHER), False, False),
    ((OTHER, None), False, False),
    ((None, OTHER), False, False),
    ((OTHER, OTHER), False, False),
]


@pytest.mark.parametrize("row, matches, equal", CASES)
def test_each_policy_in_python_and_in_sql(settings: Settings, row: tuple, matches: bool, equal: bool) -> None:  # type: ignore[type-arg]
    assert unknown_matches(*row, C, E) is matches
    assert known_and_equal(*row, C, E) is equal
    relation = (
        "(SELECT CAST(:rc AS uuid) AS client_account_id, CAST(:re AS uuid) AS engagement_id) r,"
        " (SELECT CAST(:mc AS uuid) AS client_account_id, CAST(:me AS uuid) AS engagement_id) m"
    )
    params = {"rc": row[0], "re": row[1], "mc": C, "me": E}
    got = sql(
        settings,
        f"SELECT {unknown_matches_sql('r', 'm')} AS matches,"
        f" COALESCE({known_and_equal_sql('r', 'm')}, false) AS equal FROM {relation}",
        params,
    )
    assert got == [{"matches": matches, "equal": equal}]


def test_the_ledger_stores_evidence_by_the_vocabulary_names() -> None:
    """Every evidence name the code binds into SQL is a member of the one vocabulary."""
    from flowfix.evidence import Evidence

    params = Evidence.params()
    assert set(params.values()) == {e.value for e in Evidence}
    assert params["ev_time_window"] == "time_window" and params["ev_via_import"] == "via_import"
