"""The one-to-one time matching, against the straightforward model it replaced (which was
cubic when many imports and masters share a timestamp): same links, same ambiguous
imports, on random datasets with many equal distances."""

from __future__ import annotations

import uuid
from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from flowfix.backfill import assign_by_time


def reference(pairs: list[tuple[uuid.UUID, uuid.UUID, float]]) -> tuple[dict, set]:  # type: ignore[type-arg]
    """Pairs by increasing distance; at each distance an import with exactly one free
    master that no other import wants there takes it; everyone else in a tie is ambiguous
    and the tied masters go to nobody farther."""
    by_distance: dict[float, list[tuple[uuid.UUID, uuid.UUID]]] = defaultdict(list)
    for imp, master, distance in pairs:
        by_distance[distance].append((imp, master))
    assigned: dict[uuid.UUID, tuple[uuid.UUID, float]] = {}
    ambiguous: set[uuid.UUID] = set()
    taken: set[uuid.UUID] = set()
    for distance in sorted(by_distance):
        free = [(i, m) for i, m in by_distance[distance] if i not in assigned and i not in ambiguous and m not in taken]
        masters_of: dict[uuid.UUID, set[uuid.UUID]] = defaultdict(set)
        imports_of: dict[uuid.UUID, set[uuid.UUID]] = defaultdict(set)
        for i, m in free:
            masters_of[i].add(m)
            imports_of[m].add(i)
        for i, masters in sorted(masters_of.items()):
            rivals = {j for m in masters for j in imports_of[m]}
            if len(masters) == 1 and rivals == {i}:
                assigned[i] = (next(iter(masters)), distance)
            else:
                ambiguous.add(i)
            taken |= masters
    return assigned, ambiguous


IDS = [uuid.UUID(int=n) for n in range(1, 13)]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.integers(6, 11), st.sampled_from([0.0, 60.0, 120.0])),
        max_size=40,
        unique_by=lambda p: (p[0], p[1]),
    )
)
def test_the_fast_matching_decides_exactly_as_the_model(raw: list[tuple[int, int, float]]) -> None:
    pairs = [(IDS[i], IDS[m], d) for i, m, d in raw]
    assigned, ambiguous = assign_by_time(pairs)
    want_assigned, want_ambiguous = reference(pairs)
    assert assigned == want_assigned
    assert set(ambiguous) == want_ambiguous
    linked = [m for m, _ in assigned.values()]
    assert len(linked) == len(set(linked))  # one master per import


def test_thousands_of_equal_timestamps_are_one_tie_group() -> None:
    imports = [uuid.UUID(int=n) for n in range(1, 301)]
    masters = [uuid.UUID(int=n) for n in range(1001, 1301)]
    assigned, ambiguous = assign_by_time([(i, m, 0.0) for i in imports for m in masters])
    assert assigned == {} and set(ambiguous) == set(imports)
    assert ambiguous[imports[0]] == sorted(masters)
