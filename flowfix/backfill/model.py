"""What the backfill reads and returns: options, the plan (pure data), counts, result.

Ids stay :class:`uuid.UUID` until rendering (:mod:`flowfix.render`)."""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

from flowfix.batches import Pause
from flowfix.estimate import Estimate
from flowfix.exitcodes import Exit
from flowfix.models import CHILD_TABLES

#: The records walk never uses more workers than this (each is one database connection).
MAX_JOBS = 8


@dataclass(frozen=True)
class Options:
    window_seconds: float = 7200.0
    #: most rows per batch; the batch sizer keeps each transaction near 0.5 s below that
    batch_size: int = 50_000
    create_missing_masters: bool = False
    client_account: uuid.UUID | None = None
    engagement: uuid.UUID | None = None
    dry_run: bool = False
    #: how often a batch that gave up waiting for a lock is retried (not part of a run's identity)
    lock_retries: int = 5
    #: connections walking disjoint ranges of raw_import_records (not part of a run's identity)
    jobs: int = 1
    #: pause before a batch while a streaming replica replays more than this many seconds
    #: behind; 0 never pauses (not part of a run's identity)
    max_replica_lag: float = 30.0
    #: pause before a batch while more than this many WAL segments wait to be archived; 0
    #: never pauses (not part of a run's identity)
    max_archive_backlog: int = 64
    #: the records walk: "auto" (by physical ranges where the server has TID range scans,
    #: PostgreSQL 14+, else by primary key), or one of "ctid", "key" (tests and benchmarks)
    walk: str = "auto"

    def arguments(self) -> dict[str, Any]:
        """What identifies a run (a resumed run must have been started with the same)."""
        return {
            "window_seconds": self.window_seconds,
            "create_missing_masters": self.create_missing_masters,
            "client_account": str(self.client_account) if self.client_account else None,
            "engagement": str(self.engagement) if self.engagement else None,
        }

    @property
    def scope(self) -> dict[str, uuid.UUID | None]:
        return {"client": self.client_account, "engagement": self.engagement}


@dataclass(slots=True)  # many thousands per plan: no __dict__ each
class Link:
    table: str
    id: uuid.UUID
    master_flow_id: uuid.UUID
    evidence: str
    distance_seconds: float | None = None
    rows: int | None = None  # records: one entry per import, with the number of records


@dataclass(slots=True)  # many thousands per plan: no __dict__ each
class Ambiguous:
    table: str
    id: uuid.UUID
    candidates: list[uuid.UUID]
    reason: str


@dataclass(slots=True)  # many thousands per plan: no __dict__ each
class Unmatched:
    table: str
    id: uuid.UUID
    reason: str


@dataclass(frozen=True)
class NewMaster:
    """A master --create-missing-masters will create, from this discovery flow."""

    discovery_flow_id: uuid.UUID
    flow_id: uuid.UUID
    client_account_id: uuid.UUID | None
    engagement_id: uuid.UUID | None


@dataclass
class Plan:
    discovery_links: list[Link] = field(default_factory=list)
    masters_to_create: list[NewMaster] = field(default_factory=list)
    import_links: list[Link] = field(default_factory=list)
    record_links: list[Link] = field(default_factory=list)
    ambiguous: list[Ambiguous] = field(default_factory=list)
    unmatched: list[Unmatched] = field(default_factory=list)
    #: which discovery-flow values a created master needs on this database (CREATE_MASTERS)
    master_needs: dict[str, bool] = field(default_factory=dict)
    #: resuming: imports whose link comes from the interrupted run's stored plan
    stored: set[uuid.UUID] = field(default_factory=set)
    #: resuming: imports whose stored pending link no longer applies (the run marks it
    #: skipped before applying anything; reported unless the import is linked already)
    stale: list[uuid.UUID] = field(default_factory=list)

    @property
    def records_to_link(self) -> int:
        return sum(link.rows or 0 for link in self.record_links)

    def import_evidence(self) -> dict[str, int]:
        """How many import links each kind of evidence supports, by name."""
        counts: dict[str, int] = defaultdict(int)
        for link in self.import_links:
            counts[link.evidence] += 1
        return dict(sorted(counts.items()))

    def totals(self) -> dict[str, int]:
        """What the plan would link, per step: the progress bars' totals."""
        return {
            "discovery_flows": len(self.discovery_links),
            "data_imports": len(self.import_links),
            "raw_import_records": self.records_to_link,
        }

    def summary(self) -> dict[str, int]:
        return {
            "planned_discovery_flows": len(self.discovery_links),
            "planned_masters_created": len(self.masters_to_create),
            "planned_data_imports": len(self.import_links),
            "planned_raw_import_records": self.records_to_link,
            **{f"planned_{k}": v for k, v in self.import_evidence().items()},
            "ambiguous": len(self.ambiguous),
            "unmatched": len(self.unmatched),
        }


@dataclass
class Counts:
    """What a run changed, and how its batches went."""

    discovery_flows: int = 0
    masters_created: int = 0
    data_imports: int = 0
    #: planned import links not applied: the rows changed since planning
    skipped: int = 0
    raw_import_records: int = 0
    #: of those, linked by the closing pass over records still NULL (moved or added mid-walk)
    records_final_pass: int = 0
    batches: int = 0
    longest_batch_ms: float = 0.0
    jobs: int = 1
    #: how the records were walked: "ctid" (physical ranges) or "key" (primary key)
    records_walk: str = ""
    #: pauses for replica lag, and their total length
    replica_pauses: int = 0
    replica_paused_seconds: float = 0.0
    #: every pause, per health signal (flowfix.batches.SIGNALS): {"pauses": n, "seconds": s}
    pauses: dict[str, dict[str, float]] = field(default_factory=dict)
    #: the health signals the run could not watch, and why (said at start, too)
    blind: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def linked(self, table: str) -> int:
        assert table in CHILD_TABLES
        return int(getattr(self, table))


@dataclass
class Result:
    run_id: uuid.UUID | None
    dry_run: bool
    window_seconds: float
    plan: Plan
    counts: Counts | None  # None for a dry run
    #: a run: resumed an interrupted one; a dry run: the real run would resume ``run_id``
    resumed: bool = False
    #: a run: the rows in scope still NULL after it, per table, read back from the database
    left: dict[str, int] | None = None
    #: a dry run's estimate of how long the real run takes, per step
    estimate: Estimate | None = None

    @property
    def exit_code(self) -> Exit:
        """A run: PROBLEMS while the database holds a row in scope still NULL (read back
        after the work, never taken from the plan) or a record disagreeing with its
        import. A dry run: what the plan says the run will leave (ambiguous or unmatched)."""
        if self.left is None:
            return Exit.PROBLEMS if self.plan.ambiguous or self.plan.unmatched else Exit.OK
        disagreeing = any(a.table == "raw_import_records" for a in self.plan.ambiguous)
        return Exit.PROBLEMS if disagreeing or any(self.left.values()) else Exit.OK


class Reporter(Protocol):
    """Where a run tells its progress (flowfix.progress draws it; tests may listen)."""

    def start(self, step: str, total: int | None) -> None: ...

    def advance(self, step: str, n: int) -> None: ...

    def paused(self, pause: Pause) -> None: ...

    def resumed(self) -> None: ...

    def note(self, line: str) -> None:
        """A line the operator must read (a health signal the run cannot watch)."""


class Silent:
    """A :class:`Reporter` that says nothing."""

    def start(self, step: str, total: int | None) -> None:
        pass

    def advance(self, step: str, n: int) -> None:
        pass

    def paused(self, pause: Pause) -> None:
        pass

    def resumed(self) -> None:
        pass

    def note(self, line: str) -> None:
        pass
