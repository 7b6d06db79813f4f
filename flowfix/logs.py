"""Logging for Alembic and flowfix's revisions (configured from alembic.ini).

A plain ``StreamHandler(sys.stderr)`` keeps the stream that was ``sys.stderr`` when the
configuration was read; a second run in the same process (tests, a library caller, a
captured CLI) would then write to a stream that is gone. This handler looks up
``sys.stderr`` at every record instead.
"""

from __future__ import annotations

import logging
import sys
from typing import TextIO


class StderrHandler(logging.StreamHandler[TextIO]):
    """A StreamHandler that always writes to the current ``sys.stderr``."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: TextIO) -> None:  # the base class assigns it; the property ignores it
        pass
