"""Settings from the environment: database URL, schema, lock policy.

Every other module takes a :class:`Settings`, so tests and the CLI can pass their own.

``DATABASE_URL`` is read the way libpq reads a connection URI: a password may hold an
unencoded ``@`` (the host is what follows the *last* one), and the query string may
carry libpq's parameters (``sslmode``, ``sslrootcert``, ``application_name``,
``connect_timeout``, ``options``, ``password``, ``host`` ...). Parts the URL leaves out
come from the PG* environment variables and ``~/.pgpass``, as with libpq (asyncpg reads
them when connecting). The URL is parsed once, here; it is only ever shown through
:func:`mask_url`, which renders it from its parts with every password left out.
"""

from __future__ import annotations

import os
import re
import shlex
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import URL

from flowfix.errors import ConfigError

#: flowfix's own Alembic version table. The application owning these tables keeps its
#: own ``alembic_version``; flowfix never reads or writes that one.
VERSION_TABLE = "flowfix_alembic_version"

DEFAULT_SCHEMA = "public"
DEFAULT_LOCK_TIMEOUT = "2s"
DEFAULT_LOCK_RETRIES = 5
#: Bounds checked before anything runs (the server would refuse more than ~24 days).
MAX_LOCK_TIMEOUT_MS = 600_000
MAX_LOCK_RETRIES = 100
DEFAULT_CONNECT_TIMEOUT_S = 10
MAX_CONNECT_TIMEOUT_S = 3600

_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$", re.ASCII)
_TIMEOUT_RE = re.compile(r"^([1-9][0-9]{0,8})(ms|s)$", re.ASCII)
_DIGITS_RE = re.compile(r"^[0-9]{1,9}$", re.ASCII)

SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
#: Query parameters passed on to asyncpg, which reads them as libpq does.
DRIVER_PARAMETERS = (
    "host",
    "port",
    "dbname",
    "user",
    "passfile",
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "sslpassword",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "target_session_attrs",
    "service",
)
#: Query parameters flowfix turns into connection arguments itself.
OWN_PARAMETERS = ("password", "application_name", "connect_timeout", "options")
#: Environment variables that describe a connection without DATABASE_URL (as for psql).
PG_CONNECTION_VARIABLES = ("PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE")


def parse_database_url(raw: str) -> URL:
    """Parse a libpq connection URI into a SQLAlchemy URL for the asyncpg driver.

    ``postgresql://``, ``postgres://`` and ``postgresql+asyncpg://`` are accepted; the
    password may come from the userinfo or the ``password`` parameter (which wins, as in
    libpq) and never stays in the query. Raises :class:`ConfigError` with one line that
    never contains the password.
    """
    raw = raw.strip()
    scheme, sep, _ = raw.partition("://")
    if not sep:
        raise ConfigError("DATABASE_URL is not a URL (expected postgresql://user@host:port/database)")
    if scheme not in SCHEMES:
        shown = scheme if len(scheme) <= 40 else scheme[:40] + "..."
        raise ConfigError(f"DATABASE_URL must be a PostgreSQL URL (postgresql://...), not '{shown}://'")
    parts = urllib.parse.urlsplit("postgresql" + raw[len(scheme) :])
    userinfo, at, hostport = parts.netloc.rpartition("@")
    username, colon, password = userinfo.partition(":") if at else ("", "", "")
    host, port = _host_and_port(hostport)
    try:
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
    except ValueError:
        raise ConfigError("DATABASE_URL has a malformed query string (expected ?name=value&name=value)") from None
    params: dict[str, str] = {}
    for name, value in query:
        if name not in DRIVER_PARAMETERS and name not in OWN_PARAMETERS:
            raise ConfigError(
                f"DATABASE_URL parameter '{name[:40]}' is not supported; use one of "
                f"{', '.join(sorted(DRIVER_PARAMETERS + OWN_PARAMETERS))}"
            )
        if name in params:
            raise ConfigError(f"DATABASE_URL parameter '{name}' is given twice")
        params[name] = value
    if "password" in params:
        password, colon = params.pop("password"), ":"
    _check_parameters(params)
    return URL.create(
        "postgresql+asyncpg",
        username=urllib.parse.unquote(username) or None,
        password=urllib.parse.unquote(password) if colon else None,
        host=host,
        port=port,
        database=urllib.parse.unquote(parts.path.lstrip("/")) or None,
        query=params,
    )


def _host_and_port(hostport: str) -> tuple[str | None, int | None]:
    if hostport.startswith("["):  # an IPv6 address
        end = hostport.find("]")
        host, rest = hostport[1:end], hostport[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, _, port_text = hostport.partition(":")
    if port_text == "":
        return urllib.parse.unquote(host) or None, None
    if not _DIGITS_RE.match(port_text) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"DATABASE_URL port '{port_text[:20]}' is not a number from 1 to 65535")
    return urllib.parse.unquote(host) or None, int(port_text)


def _check_parameters(params: dict[str, str]) -> None:
    if "sslmode" in params and params["sslmode"] not in SSLMODES:
        raise ConfigError(f"DATABASE_URL sslmode '{params['sslmode'][:40]}' must be one of {', '.join(SSLMODES)}")
    if "connect_timeout" in params:
        value = params["connect_timeout"]
        if not _DIGITS_RE.match(value) or not 1 <= int(value) <= MAX_CONNECT_TIMEOUT_S:
            raise ConfigError(
                f"DATABASE_URL connect_timeout '{value[:20]}' must be whole seconds from 1 to {MAX_CONNECT_TIMEOUT_S}"
            )
    if "port" in params:
        _host_and_port(":" + params["port"])
    if "options" in params:
        server_options(params["options"])


def server_options(options: str) -> dict[str, str]:
    """libpq's ``options`` (``-c name=value``, ``--name=value``) as server settings."""
    try:
        words = shlex.split(options)
    except ValueError:
        raise ConfigError("DATABASE_URL options is not a valid list of -c name=value settings") from None
    out: dict[str, str] = {}
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            setting, i = words[i + 1], i + 2
        elif (word.startswith("-c") and len(word) > 2) or (word.startswith("--") and "=" in word):
            setting, i = word[2:], i + 1
        else:
            raise ConfigError(f"DATABASE_URL options: '{word[:40]}' is not a -c name=value setting")
        name, eq, value = setting.partition("=")
        if not eq or not re.match(r"^[a-z_][a-z0-9_.]*$", name.replace("-", "_"), re.ASCII):
            raise ConfigError(f"DATABASE_URL options: '{setting[:40]}' is not a name=value setting")
        out[name.replace("-", "_")] = value
    return out


def normalize_url(raw: str | URL) -> URL:
    """A database URL (string or URL) as flowfix uses it: see :func:`parse_database_url`."""
    if isinstance(raw, URL):
        return raw.set(drivername="postgresql+asyncpg")
    return parse_database_url(raw)


def libpq_url(url: URL | str, database: str) -> str:
    """The plain ``postgresql://`` URL (password included, for connecting, never for
    printing) of ``database`` on the server of ``url``: what asyncpg itself accepts."""
    return normalize_url(url).set(drivername="postgresql", database=database).render_as_string(hide_password=False)


def mask_url(url: URL | str | None) -> str:
    """Render a URL for humans, from its parts: the password never appears (it is kept
    out of the query at parsing, and the userinfo one is shown as ``***``)."""
    if url is None:
        return "<no DATABASE_URL>"
    if isinstance(url, str):
        try:
            url = parse_database_url(url)
        except ConfigError:
            return "<unparseable URL>"
    shown = url.set(drivername="postgresql", password="***" if url.password else None)
    if shown.host is None and shown.database is None and not shown.query:
        return "postgresql:// (connection from the PG* environment variables)"
    return shown.render_as_string(hide_password=True)


@dataclass(frozen=True)
class ConnectArgs:
    """What asyncpg.connect() is called with: a libpq DSN (no password in it), the
    password apart and the connect timeout; and the settings flowfix gives each session
    right after connecting (:mod:`flowfix.db`), not as startup parameters: a pooler such
    as PgBouncer refuses those it does not know, or drops them."""

    dsn: str
    password: str | None
    timeout: float
    session_settings: dict[str, str] = field(default_factory=dict)

    def kwargs(self) -> dict[str, Any]:
        return {"dsn": self.dsn, "password": self.password, "timeout": self.timeout}


def connect_args(url: URL, schema: str, lock_timeout: str | None = None) -> ConnectArgs:
    """Turn a parsed URL into asyncpg's arguments; ``search_path`` is pinned to ``schema``
    (an ``options`` setting of search_path is overridden: the schema is FLOWFIX_SCHEMA),
    and every statement waits for a lock at most ``lock_timeout`` (FLOWFIX_LOCK_TIMEOUT)."""
    query = dict(url.query)
    settings = {"application_name": "flowfix"}
    if "application_name" in query:
        settings["application_name"] = str(query.pop("application_name"))
    if "options" in query:
        settings.update(server_options(str(query.pop("options"))))
    settings["search_path"] = schema
    if lock_timeout is not None:
        settings["lock_timeout"] = lock_timeout
    timeout = float(query.pop("connect_timeout", DEFAULT_CONNECT_TIMEOUT_S))  # type: ignore[arg-type]
    dsn = url.set(drivername="postgresql", password=None, query=query).render_as_string(hide_password=False)
    return ConnectArgs(dsn=dsn, password=url.password, timeout=timeout, session_settings=settings)


def validate_schema(name: str) -> str:
    """Accept only plain lower-case identifiers: the schema name ends up in DDL and in
    ``search_path``, so anything needing quotes is refused instead of escaped. PostgreSQL's
    own schemas (``pg_*``, ``information_schema``) never hold application tables."""
    if not _SCHEMA_RE.match(name):
        shown = name if len(name) <= 70 else name[:70] + "..."
        raise ConfigError(f"FLOWFIX_SCHEMA '{shown}' is not a plain identifier (lower-case letters, digits, _)")
    if name.startswith("pg_") or name == "information_schema":
        raise ConfigError(f"FLOWFIX_SCHEMA '{name}' is a PostgreSQL system schema; name the application's schema")
    return name


def validate_lock_timeout(value: str) -> str:
    match = _TIMEOUT_RE.match(value)
    ms = int(match.group(1)) * (1 if match.group(2) == "ms" else 1000) if match else 0
    if not match or ms > MAX_LOCK_TIMEOUT_MS:
        shown = value if len(value) <= 20 else value[:20] + "..."
        raise ConfigError(
            f"FLOWFIX_LOCK_TIMEOUT '{shown}' must look like 500ms or 2s, at most {MAX_LOCK_TIMEOUT_MS // 1000}s"
        )
    return value


def validate_lock_retries(value: str) -> int:
    if not _DIGITS_RE.match(value) or int(value) > MAX_LOCK_RETRIES:
        shown = value if len(value) <= 20 else value[:20] + "..."
        raise ConfigError(f"FLOWFIX_LOCK_RETRIES '{shown}' must be a whole number from 0 to {MAX_LOCK_RETRIES}")
    return int(value)


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
        return mask_url(self.url)

    def require_url(self) -> URL:
        if self.url is None:
            raise ConfigError("DATABASE_URL is not set (e.g. postgresql://user@host/db)")
        return self.url

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None, *, url: str | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        raw = url if url is not None else env.get("DATABASE_URL")
        parsed: URL | None = None
        if raw:
            parsed = parse_database_url(raw)
        elif any(env.get(name) for name in PG_CONNECTION_VARIABLES):
            parsed = URL.create("postgresql+asyncpg")  # libpq's way: every part from PG* variables
        return cls(
            url=parsed,
            schema=validate_schema(env.get("FLOWFIX_SCHEMA", DEFAULT_SCHEMA)),
            lock_timeout=validate_lock_timeout(env.get("FLOWFIX_LOCK_TIMEOUT", DEFAULT_LOCK_TIMEOUT)),
            lock_retries=validate_lock_retries(env.get("FLOWFIX_LOCK_RETRIES", str(DEFAULT_LOCK_RETRIES))),
        )
