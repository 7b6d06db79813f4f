"""Progress people can read: a bar per step with totals and an ETA on a terminal, plain
lines with the same numbers when output is piped (at most one every few seconds per
step). Both are :class:`flowfix.backfill.Reporter` implementations."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console

    from flowfix.batches import Pause


class Lines:
    """One line per step every ``every`` seconds, and when it ends."""

    def __init__(self, out: IO[str], every: float = 5.0) -> None:
        self.out, self.every = out, every
        self.steps: dict[str, list[float]] = {}  # step: [done, total, started, last printed]
        self.current: str | None = None

    def start(self, step: str, total: int | None) -> None:
        self._end()
        self.current = step
        now = time.monotonic()
        self.steps[step] = [0, float(total or 0), now, now]

    def advance(self, step: str, n: int) -> None:
        state = self.steps.setdefault(step, [0, 0.0, time.monotonic(), time.monotonic()])
        state[0] += n
        if time.monotonic() - state[3] >= self.every:
            self._print(step)

    def paused(self, pause: Pause) -> None:
        print(f"paused: {pause}", file=self.out, flush=True)

    def resumed(self) -> None:
        print("resumed", file=self.out, flush=True)

    def note(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def close(self) -> None:
        self._end()

    def _end(self) -> None:
        if self.current is not None:
            done, total = self.steps[self.current][:2]
            if done or total:  # a step with nothing to do says nothing
                self._print(self.current, final=True)
            self.current = None

    def _print(self, step: str, *, final: bool = False) -> None:
        done, total, started, _ = self.steps[step]
        now = time.monotonic()
        self.steps[step][3] = now
        elapsed = max(now - started, 1e-9)
        rate = done / elapsed
        line = f"{step}: {int(done):,}"
        if total:
            line += f" / {int(total):,} ({min(done / total, 1):.0%})"
        line += f", {rate:,.0f}/s"
        if final:
            line += f", done in {elapsed:.1f} s"
        elif total and rate > 0 and done < total:
            line += f", eta {(total - done) / rate:.0f} s"
        print(line, file=self.out, flush=True)


class Bars:
    """rich bars: description, bar, done/total, percentage, ETA."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TaskProgressColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.tasks: dict[str, Any] = {}

    def start(self, step: str, total: int | None) -> None:
        self.tasks[step] = self.progress.add_task(f"linking {step}", total=total or None)

    def advance(self, step: str, n: int) -> None:
        if step not in self.tasks:
            self.start(step, None)
        self.progress.advance(self.tasks[step], n)

    def paused(self, pause: Pause) -> None:
        for step, task in self.tasks.items():
            self.progress.update(task, description=f"linking {step} [paused: {pause}]")

    def resumed(self) -> None:
        for step, task in self.tasks.items():
            self.progress.update(task, description=f"linking {step}")

    def note(self, line: str) -> None:
        self.progress.console.print(line, markup=False, highlight=False)


@contextmanager
def reporter(console: Console) -> Iterator[Bars | Lines]:
    """Bars on a terminal, lines otherwise (on the console's stream)."""
    if console.is_terminal:
        bars = Bars(console)
        with bars.progress:
            yield bars
    else:
        lines = Lines(console.file)
        yield lines  # an error propagates: the step it stopped is not reported done
        lines.close()
