"""Settings from the environment: database URL, schema, lock policy.

Every other module takes a :class:`Settings`, so tests and the CLI can pass their own.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from flowfix.errors import ConfigError

#: flowfix's own Alembic version table. The application owning these tables keeps its
#: own ``alembic_version``; flowfix never reads or writes that one.
VERSION_TABLE = "flowfix_alembic_version"

DEFAULT_SCHEMA = "public"
DEFAULT_LOCK_TIMEOUT = "2s"
DEFAULT_LOCK_RETRIES = 5

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TIMEOUT_RE = re.compile(r"^[1-9][0-9]*(ms|s)$")


def normalize_url(raw: str) -> URL:
    """Parse a database URL and make it use the asyncpg driver.

    ``postgresql://`` and ``postgres://`` (as libpq and Heroku write them) become
    ``postgresql+asyncpg://``; any other driver is rejected rather than guessed at.
    """
    raw = raw.strip()
    if raw.startswith("postgres://"):
        raw = "postgresql://" + raw[len("postgres://"):]
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigError("DATABASE_URL is not a valid URL (expected postgresql://user:pass@host/db)") from None
    if url.get_backend_name() != "postgresql":
        raise ConfigError(f"DATABASE_URL must be a PostgreSQL URL, got '{url.get_backend_name()}'")
    if url.drivername in ("postgresql", "postgresql+asyncpg"):
        return url.set(drivername="postgresql+asyncpg")
    raise ConfigError(f"unsupported driver '{url.drivername}': flowfix uses postgresql+asyncpg")


def libpq_url(url: URL | str, database: str) -> str:
    """The plain ``postgresql://`` URL (password included, for connecting, never for
    printing) of ``database`` on the server of ``url``: what asyncpg itself accepts."""
    return normalize_url(str(url) if isinstance(url, str) else url.render_as_string(hide_password=False)).set(
        drivername="postgresql", database=database).render_as_string(hide_password=False)


def mask_url(url: URL | str) -> str:
    """Render a URL for humans: the password is always replaced by ``***``."""
    if isinstance(url, str):
        try:
            url = make_url(url)
        except ArgumentError:
            return "<unparseable URL>"
    return url.render_as_string(hide_password=True)


def validate_schema(name: str) -> str:
    """Accept only plain lower-case identifiers: the schema name ends up in DDL and in
    ``search_path``, so anything needing quotes is refused instead of escaped. PostgreSQL's
    own schemas (``pg_*``, ``information_schema``) never hold application tables."""
    if not _SCHEMA_RE.match(name):
        raise ConfigError(
            f"FLOWFIX_SCHEMA '{name}' is not a plain identifier (lower-case letters, digits, _)"
        )
    if name.startswith("pg_") or name == "information_schema":
        raise ConfigError(f"FLOWFIX_SCHEMA '{name}' is a PostgreSQL system schema; name the application's schema")
    return name


def validate_lock_timeout(value: str) -> str:
    if not _TIMEOUT_RE.match(value):
        raise ConfigError(f"FLOWFIX_LOCK_TIMEOUT '{value}' must look like 500ms or 2s")
    return value


@dataclass(frozen=True)
class Settings:
    """Where the tables live and how DDL waits for locks."""

    url: URL | None
    schema: str = DEFAULT_SCHEMA
    lock_timeout: str = DEFAULT_LOCK_TIMEOUT
    lock_retries: int = DEFAULT_LOCK_RETRIES
    #: let revision ``legacy`` create the four tables in an empty schema (a new database);
    #: without it an empty schema is refused, since it usually means a wrong FLOWFIX_SCHEMA
    create_tables: bool = False

    @property
    def masked_url(self) -> str:
        return mask_url(self.url) if self.url is not None else "<no DATABASE_URL>"

    def require_url(self) -> URL:
        if self.url is None:
            raise ConfigError("DATABASE_URL is not set")
        return self.url

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, *, url: str | None = None) -> "Settings":
        env = dict(os.environ if env is None else env)
        raw = url if url is not None else env.get("DATABASE_URL")
        retries_raw = env.get("FLOWFIX_LOCK_RETRIES", str(DEFAULT_LOCK_RETRIES))
        if not retries_raw.isdigit():
            raise ConfigError(f"FLOWFIX_LOCK_RETRIES '{retries_raw}' must be a whole number")
        return cls(
            url=normalize_url(raw) if raw else None,
            schema=validate_schema(env.get("FLOWFIX_SCHEMA", DEFAULT_SCHEMA)),
            lock_timeout=validate_lock_timeout(env.get("FLOWFIX_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT)),
            lock_retries=int(retries_raw),
        )
