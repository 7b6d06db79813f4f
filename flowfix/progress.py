"""Progress bars for long runs: rich on a terminal, nothing when output is piped."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import Progress
from sqlalchemy.ext.asyncio import AsyncEngine

from flowfix import backfill
from flowfix.config import Settings


async def backfill_with_progress(
    engine: AsyncEngine, settings: Settings, opts: backfill.Options, console: Console
) -> backfill.Result:
    """Run the backfill, with one bar per table while it links, if ``console`` is a terminal."""
    if not console.is_terminal or opts.dry_run:
        return await backfill.run(engine, settings, opts)
    with Progress(console=console, transient=True) as bar:
        tasks: dict[str, Any] = {}

        def advance(step: str, n: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(f"linking {step}", total=None)
            bar.advance(tasks[step], n)

        return await backfill.run(engine, settings, opts, progress=advance)
