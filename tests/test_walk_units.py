"""flowfix/walk.py without a database: the ranges a walk plans, the choice of walk, and
the SQL every way of walking is made of (one definition, every statement)."""

from __future__ import annotations

import itertools
import uuid

from flowfix import walk
from flowfix.catalog import Leaf

SPEC = walk.Walk(
    "t",
    work="WITH changed AS (UPDATE {table} r SET v = 1 WHERE {slice} RETURNING 1) SELECT count(*) FROM changed",
    needs="r.v IS NULL",
    busy="r.v IS NULL",
)


def test_pages_are_cut_into_ranges_of_at_most_range_pages_and_at_least_jobs() -> None:
    leaves = [Leaf("t_a", walk.RANGE_PAGES * 2 + 1, 40.0), Leaf("t_b", 3, 40.0), Leaf("t_empty", 0, 0.0)]
    ranges = walk.plan_ranges("ctid", "t", leaves, jobs=4)
    by_leaf: dict[str, list[walk.Range]] = {}
    for r in ranges:
        by_leaf.setdefault(r.relation, []).append(r)
    assert set(by_leaf) == {"t_a", "t_b"}  # an empty leaf has no range
    for name, parts in by_leaf.items():
        pages = next(leaf.pages for leaf in leaves if leaf.name == name)
        assert parts[0].lo_page == 0 and parts[-1].hi_page == pages
        assert all(a.hi_page == b.lo_page for a, b in itertools.pairwise(parts))  # contiguous
        assert all(p.next_page == p.lo_page for p in parts)
        assert all((p.hi_page or 0) - (p.lo_page or 0) <= walk.RANGE_PAGES for p in parts)
    assert len(by_leaf["t_a"]) == 4 and len(by_leaf["t_b"]) == 3  # jobs, at most one per page


def test_keys_are_cut_into_jobs_ranges_covering_the_whole_key_space() -> None:
    ranges = walk.plan_ranges("key", "t", [], jobs=3)
    assert len(ranges) == 3 and ranges[0].lo_key == walk.KEY_FIRST and ranges[-1].hi_key == walk.KEY_LAST
    assert all(a.hi_key == b.lo_key for a, b in itertools.pairwise(ranges))
    assert all(isinstance(r.next_key, uuid.UUID) and r.next_key == r.lo_key for r in ranges)


def test_the_walk_is_by_pages_from_postgresql_14_unless_forced() -> None:
    assert walk.choose("auto", 140000) == "ctid" and walk.choose("auto", 130012) == "key"
    assert walk.choose("key", 180000) == "key" and walk.choose("ctid", 130000) == "ctid"


def test_every_statement_is_the_one_definition_with_its_slice() -> None:
    assert walk.PAGES_SLICE in SPEC.by_pages("t_part") and "UPDATE t_part r" in SPEC.by_pages("t_part")
    assert walk.KEYS_SLICE in SPEC.by_keys() and walk.IDS_SLICE in SPEC.by_ids()
    assert SPEC.left() == "SELECT r.id FROM t r WHERE r.v IS NULL ORDER BY r.id"


def test_the_do_block_walks_pages_or_keys_then_always_the_closing_pass() -> None:
    block = SPEC.do_block(pages=7, rows=11)
    assert block.startswith("DO $walk$") and block.endswith("END $walk$")
    assert "v_lo := v_lo + 7" in block and "LIMIT 11" in block
    closing = block.index("the closing pass")
    assert block.index("END IF;\n  -- the closing pass") < closing  # after both walks, not in one branch
    assert "WHERE r.v IS NULL" in block[closing:] and "r.id = ANY(v_ids" in block[closing:]
    assert block.count("COMMIT;") == 3  # one per batch, in each of the three loops
    assert ":" + "lo" not in block and ":after" not in block  # no bind parameter survives
