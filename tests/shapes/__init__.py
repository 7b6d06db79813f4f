"""The database shapes flowfix meets in production, as SQL fixtures of our own.

Facts from ``../shared/PRODUCTION-SHAPES.md``. Each shape is a list of SQL files run in
order on an empty database; ``friendly`` is what flowfix's own ``legacy`` revision
creates. The test suite builds one template database per shape (lazily, once per
session) and clones it for every test (``tests/conftest.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Shape:
    name: str
    #: SQL files, run in order on an empty database; empty: flowfix's legacy revision creates it
    files: tuple[str, ...]
    schema: str = "migration"
    #: the records' position column (the real schemas disagree)
    position_column: str = "record_index"
    #: why fix_master_flow_fk must refuse on this shape, or None when it applies
    refuses: str | None = None

    def sql(self) -> list[str]:
        return [(HERE / f).read_text() for f in self.files]


FRIENDLY = Shape("friendly", (), schema="public", position_column="row_number")
DEPLOYED = Shape("deployed", ("deployed.sql",))
APP_HEAD = Shape("app_head", ("app_head.sql",), position_column="row_number")
BETWEEN = Shape("between", ("deployed.sql", "between.sql"))
VIOLATED = Shape("violated", ("deployed.sql", "violated.sql"))
COMPOSITE = Shape("composite", ("deployed.sql", "composite.sql"), refuses="composite foreign key")
PARTITIONED = Shape("partitioned", ("deployed.sql", "partitioned.sql"))

SHAPES: dict[str, Shape] = {
    s.name: s for s in (FRIENDLY, DEPLOYED, APP_HEAD, BETWEEN, VIOLATED, COMPOSITE, PARTITIONED)
}

#: The shapes every integration test of the runbook (upgrade, backfill, validate, link,
#: undo, enforce, downgrade) runs on. The others have tests of their own in
#: tests/test_shapes.py: ``violated`` brings rows of its own (the ones breaking the FK),
#: which tests asserting on whole tables cannot share; ``composite`` is refused;
#: ``partitioned`` is supported on PostgreSQL 18 and refused before.
RUNBOOK_SHAPES: tuple[str, ...] = ("friendly", "deployed", "app_head", "between")
