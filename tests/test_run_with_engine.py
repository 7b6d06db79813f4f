"""run_with_engine hands the answer over beside the event loop's main task (issue 21): on
Python 3.11 asyncio.run formats the main task's repr, result included, when it restores
the SIGINT handler, and a backfill plan of 200k imports cost about 0.6 s and 200 MB of repr."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine

from flowfix.config import Settings
from flowfix.db import run_with_engine


class Answer:
    reprs = 0

    def __repr__(self) -> str:
        Answer.reprs += 1
        return "Answer()"


def test_the_answer_is_never_formatted(settings: Settings) -> None:
    async def work(engine: AsyncEngine) -> Answer:
        return Answer()

    answer = run_with_engine(settings, work)
    assert isinstance(answer, Answer)
    assert Answer.reprs == 0
