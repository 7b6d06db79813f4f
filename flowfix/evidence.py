"""The evidence vocabulary: why a link was made. One StrEnum, stored in the ledger and
bound into SQL as parameters (never spelled as literals there), so a rename cannot leave
the Python and the SQL disagreeing."""

from __future__ import annotations

from enum import StrEnum


class Evidence(StrEnum):
    FLOW_ID = "exact:flow_id"  # a discovery flow's own flow_id names its master
    DISCOVERY_FLOW = "exact:discovery_flow"  # a discovery flow names the import and has a master
    CONFIGURATION = "exact:configuration"  # a discovery master's configuration names the import
    TIME_WINDOW = "time_window"  # nearest discovery master of the same tenant within --window
    VIA_IMPORT = "via_import"  # a record follows its import
    CREATED = "created_by_backfill"  # a master --create-missing-masters created
    LINK = "link"  # an operator's `flowfix link`

    @classmethod
    def params(cls) -> dict[str, str]:
        """Bind parameters ``:ev_<name>`` for the SQL that needs the names."""
        return {f"ev_{member.name.lower()}": member.value for member in cls}


#: Which exact evidence wins when two disagree about an import (lower is stronger).
STRENGTH: dict[str, int] = {Evidence.DISCOVERY_FLOW: 0, Evidence.CONFIGURATION: 1}
