"""Matching by time: one master per import, nearest first, ties refused. Pure Python."""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict

_Node = tuple[str, uuid.UUID]  # ("i", import id) or ("m", master flow_id)


def _find(parent: dict[_Node, _Node], node: _Node) -> _Node:
    """Union-find root of ``node``, compressing the path on the way."""
    root = node
    while parent.setdefault(root, root) != root:
        root = parent[root]
    while parent[node] != root:
        parent[node], node = root, parent[node]
    return root


def assign_by_time(
    pairs: list[tuple[uuid.UUID, uuid.UUID, float]],
) -> tuple[dict[uuid.UUID, tuple[uuid.UUID, float]], dict[uuid.UUID, list[uuid.UUID]]]:
    """One-to-one, deterministic: pairs are taken in order of increasing distance, a
    master goes to at most one import. At each distance the free pairs form tie groups
    (connected imports and masters); a group of exactly one import and one master is a
    link, any larger group is a tie: its imports are reported ambiguous, with the group's
    masters as candidates, and those masters go to no farther import either.

    Near-linear (union-find per distance), so a bulk load where thousands of imports and
    masters share one timestamp plans in moments, not hours.

    Returns ({import: (master, distance)}, {ambiguous import: [candidate masters]}).
    """
    by_distance: dict[float, list[tuple[uuid.UUID, uuid.UUID]]] = defaultdict(list)
    for imp, master, distance in pairs:
        by_distance[distance].append((imp, master))
    assigned: dict[uuid.UUID, tuple[uuid.UUID, float]] = {}
    ambiguous: dict[uuid.UUID, list[uuid.UUID]] = {}
    taken: set[uuid.UUID] = set()
    for distance in sorted(by_distance):
        free = [(i, m) for i, m in by_distance[distance] if i not in assigned and i not in ambiguous and m not in taken]
        # the common case first: a pair whose import and master meet nobody else at this
        # distance is a group of its own (one import, one master): a link, no union-find
        imports_seen, masters_seen = Counter(i for i, _ in free), Counter(m for _, m in free)
        tangled = []
        for i, m in free:
            if imports_seen[i] == 1 and masters_seen[m] == 1:
                assigned[i] = (m, distance)
                taken.add(m)
            else:
                tangled.append((i, m))
        free = tangled
        parent: dict[_Node, _Node] = {}
        for i, m in free:
            a, b = _find(parent, ("i", i)), _find(parent, ("m", m))
            if a != b:
                parent[a] = b
        groups: dict[_Node, tuple[set[uuid.UUID], set[uuid.UUID]]] = defaultdict(lambda: (set(), set()))
        for i, m in free:
            imports, masters = groups[_find(parent, ("i", i))]
            imports.add(i)
            masters.add(m)
        for imports, masters in groups.values():
            if len(imports) == 1 and len(masters) == 1:
                (i,), (m,) = imports, masters
                assigned[i] = (m, distance)
            else:
                candidates = sorted(masters)
                for i in imports:
                    ambiguous[i] = candidates
            taken |= masters
    return assigned, ambiguous
