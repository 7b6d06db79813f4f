"""``flowfix backfill``: link orphaned rows to their master flow, evidence first.

Plan, then apply. :func:`make_plan` (:mod:`.plan`) reads the database and proposes links
with their evidence (pure data: the dry run prints it, the tests assert on it). :func:`run`
(:mod:`.apply`) stores the plan of the data imports in the ledger, then applies the steps
(:mod:`.steps`) in short batches, each its own transaction, under the run lock:

1. ``discovery_flows`` with NULL ``master_flow_id`` take the master whose ``flow_id``
   equals their own (same tenant, a discovery master); with ``create_missing_masters``,
   a discovery flow with no such master gets one, created from its own columns.
2. ``data_imports`` with NULL ``master_flow_id``, by the strongest evidence:
   ``exact:discovery_flow`` (a discovery flow names the import and has a master),
   ``exact:configuration`` (a discovery master's configuration names the import), then
   ``time_window`` (a discovery master of the same client account and engagement, not
   deleted, created within the window, not linked to or named by anything else), one
   master per import, nearest first; ties at the nearest distance are ambiguous
   (:mod:`.matching`).
3. ``raw_import_records`` with NULL ``master_flow_id`` take their import's value, walked
   by physical ranges on ``jobs`` connections, then a closing pass over rows still NULL.

Rows of different tenants are never linked.
"""

from flowfix.backfill.apply import run
from flowfix.backfill.matching import assign_by_time
from flowfix.backfill.model import Ambiguous, Counts, Link, NewMaster, Options, Plan, Reporter, Result, Unmatched
from flowfix.backfill.plan import make_plan

__all__ = [
    "Ambiguous",
    "Counts",
    "Link",
    "NewMaster",
    "Options",
    "Plan",
    "Reporter",
    "Result",
    "Unmatched",
    "assign_by_time",
    "make_plan",
    "run",
]
