"""Run flowfix's Alembic revisions from Python (the CLI and the tests use this).

The revisions live in the top-level ``alembic/`` folder of the checkout, next to
``alembic.ini``; ``alembic upgrade head`` from the checkout and ``flowfix upgrade head``
run exactly the same code.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import TextIO

from alembic import command
from alembic.config import Config
from alembic.util import CommandError

from flowfix.config import Settings
from flowfix.errors import ConfigError, MigrationError

ROOT = Path(__file__).resolve().parent.parent
HEAD = "enforce_master_flow_not_null"
REVISIONS = ("legacy", "fix_master_flow_fk", "enforce_master_flow_not_null")


def alembic_config(settings: Settings, *, output: TextIO | None = None, quiet: bool = True) -> Config:
    ini = ROOT / "alembic.ini"
    if not ini.exists():
        raise ConfigError(f"alembic.ini not found next to the flowfix package ({ROOT}); install with pip install -e")
    cfg = Config(str(ini), output_buffer=output or io.StringIO())
    cfg.set_main_option("script_location", str(ROOT / "alembic"))
    cfg.attributes["settings"] = settings
    cfg.attributes["skip_logging_config"] = quiet
    return cfg


def _run(fn, *args: object, **kwargs: object) -> None:  # type: ignore[no-untyped-def]
    try:
        fn(*args, **kwargs)
    except CommandError as exc:
        raise MigrationError(str(exc).strip().splitlines()[0]) from None


def upgrade(settings: Settings, revision: str = "head", *, sql: bool = False,
            output: TextIO | None = None, quiet: bool = True) -> None:
    _run(command.upgrade, alembic_config(settings, output=output, quiet=quiet), revision, sql=sql)


def downgrade(settings: Settings, revision: str, *, sql: bool = False,
              output: TextIO | None = None, quiet: bool = True) -> None:
    _run(command.downgrade, alembic_config(settings, output=output, quiet=quiet), revision, sql=sql)
