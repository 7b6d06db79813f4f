"""Progress when output is piped: plain lines with the same numbers as the bars (done,
total, percentage, rate, ETA), a final line per step that did something, and nothing
claimed done for a step an error stopped."""

from __future__ import annotations

import io

import pytest

from flowfix.batches import Pause
from flowfix.progress import Lines, reporter


def test_piped_progress_prints_totals_rate_eta_and_a_final_line_per_step() -> None:
    out = io.StringIO()
    lines = Lines(out, every=0)
    lines.start("discovery_flows", 0)  # nothing to do: says nothing
    lines.start("raw_import_records", 200)
    lines.advance("raw_import_records", 50)
    lines.paused(Pause("replica_lag", 12.5, "a streaming replica is 12.5 s behind"))
    lines.resumed()
    lines.advance("raw_import_records", 150)
    lines.close()
    printed = out.getvalue().splitlines()
    assert printed[0].startswith("raw_import_records: 50 / 200 (25%), ") and ", eta " in printed[0]
    assert printed[1] == "paused: a streaming replica is 12.5 s behind"
    assert printed[2] == "resumed"
    assert printed[-1].startswith("raw_import_records: 200 / 200 (100%), ") and "done in" in printed[-1]
    assert not any(line.startswith("discovery_flows") for line in printed)


def test_a_step_stopped_by_an_error_is_not_reported_done() -> None:
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=False)
    with pytest.raises(RuntimeError), reporter(console) as report:
        report.start("data_imports", 10)
        report.advance("data_imports", 3)
        raise RuntimeError("the connection went away")
    assert "done in" not in out.getvalue()
