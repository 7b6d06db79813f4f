"""Settings from the environment: database URL, schema, lock policy.

Every other module takes a :class:`Settings`, so tests and the CLI can pass their own.

``DATABASE_URL`` is read the way libpq reads a connection URI (see
:func:`parse_database_url` and docs/security.md): a password may hold an unencoded ``@``,
``#``, ``?``, ``+`` or ``:``, and the query string may carry libpq's parameters (``sslmode``, ``sslrootcert``, ``application_name``,
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

    The grammar is libpq's (``conninfo_uri_parse_options``), read the same way: the
    authority runs to the first ``/``; the user name and password may hold ``#``, ``?``,
    ``+`` and ``:`` unencoded; ``%XX`` is decoded (never ``+`` as a space) in every part,
    query values included; an unencoded space, a bad ``%`` token or ``%00`` is refused;
    IPv6 hosts go in brackets; a host starting with ``/`` (or ``?host=/dir``) is a socket
    directory; several hosts (``h1:5432,h2:5433``) are kept as libpq's host and port lists;
    ``host``, ``port``, ``dbname``, ``user`` and ``password`` parameters override the
    authority's, as in libpq. One difference, on purpose: when the part before the first
    ``/`` holds several ``@``, libpq splits at the first and tries to resolve a host name
    containing ``@`` (which never works); flowfix splits at the first ``@`` after which
    come hosts (no ``@`` in them) and, optionally, a well-formed query, so an unencoded
    ``@`` in a password works (see :func:`_userinfo_end`). Raises
    :class:`ConfigError` with one line that never contains any piece of the user name,
    password, host or port.
    """
    raw = raw.strip()
    scheme, sep, rest = raw.partition("://")
    if not sep:
        raise ConfigError("DATABASE_URL is not a URL (expected postgresql://user@host:port/database)")
    if scheme not in SCHEMES:
        shown = scheme if len(scheme) <= 40 and "@" not in scheme and ":" not in scheme else "..."
        raise ConfigError(f"DATABASE_URL must be a PostgreSQL URL (postgresql://...), not '{shown}://'")
    username = password = None
    at = _userinfo_end(rest)
    if at >= 0:
        userinfo, rest = rest[:at], rest[at + 1 :]
        user_text, colon, password_text = userinfo.partition(":")
        username = _decode(user_text, "user name") or None
        password = _decode(password_text, "password") if colon else None
    hosts, ports, rest = _netlocs(rest)
    database: str | None = None
    query_text = ""
    if rest.startswith("/"):
        path, _, query_text = rest[1:].partition("?")
        if at < 0 and "@" in path:
            raise ConfigError(
                "DATABASE_URL has an unencoded '/' before its '@': percent-encode '/' in the user name or password as %2F"
            )
        database = _decode(path, "database name") or None
    elif rest.startswith("?"):
        query_text = rest[1:]
    params = _query(query_text)
    if "password" in params:
        password = params.pop("password")
    if "user" in params:
        username = params.pop("user") or None
    if "dbname" in params:
        database = params.pop("dbname") or None
    if "host" in params:
        hosts = params.pop("host").split(",")
    if "port" in params:
        ports = params.pop("port").split(",")
    _check_parameters(params)
    host, port = _place_hosts(hosts, ports, params)
    return URL.create(
        "postgresql+asyncpg",
        username=username,
        password=password,
        host=host,
        port=port,
        database=database,
        query=params,
    )


def _userinfo_end(rest: str) -> int:
    """Where the user name and password end: libpq's first ``@`` before the first ``/``,
    unless what follows it cannot be the hosts (a host holding ``@``, or a query that is
    not ``name=value`` pairs of known parameters): then the next ``@``. -1 if none."""
    region = rest.split("/", 1)[0]
    ats = [i for i, c in enumerate(region) if c == "@"]
    for at in ats:
        hosts, _, query = region[at + 1 :].partition("?")
        if "@" not in hosts and all(_known_pair(pair) for pair in query.split("&") if query):
            return at
    return ats[-1] if ats else -1


def _known_pair(pair: str) -> bool:
    name, eq, value = pair.partition("=")
    return bool(eq) and "=" not in value and (name in DRIVER_PARAMETERS or name in OWN_PARAMETERS)


def _netlocs(rest: str) -> tuple[list[str], list[str], str]:
    """libpq's host loop: ``host[:port]`` pairs separated by ``,``, a host in brackets
    for IPv6; returns the decoded hosts, the ports as written, and what follows."""
    hosts: list[str] = []
    ports: list[str] = []
    while True:
        if rest.startswith("["):
            end = rest.find("]")
            if end < 0:
                raise ConfigError("DATABASE_URL has an IPv6 host without its closing ']'")
            if end == 1:
                raise ConfigError("DATABASE_URL has an empty IPv6 host '[]'")
            host, rest = rest[1:end], rest[end + 1 :]
            if rest and rest[0] not in ":/?,":
                raise ConfigError(
                    "DATABASE_URL has a character after an IPv6 host's ']' that is not ':', '/', '?' or ','"
                )
        else:
            match = re.match(r"[^:/?,]*", rest)
            host = match.group(0) if match else ""
            rest = rest[len(host) :]
        hosts.append(_decode(host, "host"))
        port = ""
        if rest.startswith(":"):
            match = re.match(r"[^/?,]*", rest[1:])
            port = match.group(0) if match else ""
            rest = rest[1 + len(port) :]
        ports.append(port)
        if not rest.startswith(","):
            return hosts, ports, rest
        rest = rest[1:]


def _query(text: str) -> dict[str, str]:
    """libpq's query string: ``name=value`` pairs joined by ``&``, each part decoded
    (``+`` stays a plus); a value is never shown in an error (it may be the password)."""
    params: dict[str, str] = {}
    if not text:
        return params
    for pair in text.split("&"):
        name, eq, value = pair.partition("=")
        if not eq or not name or "=" in value:
            raise ConfigError("DATABASE_URL has a malformed query string (expected ?name=value&name=value)")
        name = _decode(name, "query parameter name")
        if name not in DRIVER_PARAMETERS and name not in OWN_PARAMETERS:
            shown = name[:40] if re.match(r"^[A-Za-z0-9_]*$", name, re.ASCII) else "..."
            raise ConfigError(
                f"DATABASE_URL parameter '{shown}' is not supported; use one of "
                f"{', '.join(sorted(DRIVER_PARAMETERS + OWN_PARAMETERS))}"
            )
        if name in params:
            raise ConfigError(f"DATABASE_URL parameter '{name}' is given twice")
        params[name] = _decode(value, f"'{name}' parameter")
    return params


_BAD_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _decode(text: str, what: str) -> str:
    """libpq's percent-decoding of one part, which is named in errors (never shown)."""
    if " " in text:
        raise ConfigError(f"DATABASE_URL has an unencoded space in its {what}: write it as %20")
    if _BAD_PERCENT_RE.search(text):
        raise ConfigError(f"DATABASE_URL has a '%' not followed by two hex digits in its {what}: write '%' as %25")
    if "%00" in text:
        raise ConfigError(f"DATABASE_URL has %00 in its {what}, which libpq forbids")
    try:
        return urllib.parse.unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise ConfigError(f"DATABASE_URL has percent-encoded bytes that are not UTF-8 in its {what}") from None


def _place_hosts(hosts: list[str], ports: list[str], params: dict[str, str]) -> tuple[str | None, int | None]:
    """One TCP host stays in the URL's host and port; a socket directory or several hosts
    go to libpq's ``host``/``port`` parameters (asyncpg reads them the same way).
    Each port must be a number from 1 to 65535; with several hosts, every host has its
    port or none has (libpq would fill the gaps from PGPORT; flowfix asks)."""
    checked = [_port(p) if p else None for p in ports]
    if len(hosts) == 1 and len(checked) == 1:
        host, port = hosts[0] or None, checked[0]
        if host is None or not host.startswith("/"):
            return host, port
        params["host"] = host
        if port is not None:
            params["port"] = str(port)
        return None, None
    if any(not h for h in hosts):
        raise ConfigError("DATABASE_URL has an empty host in its list of hosts")
    if len(checked) == 1 and len(hosts) > 1:
        checked = checked * len(hosts)  # libpq: one port for every host
    if len(checked) != len(hosts):
        raise ConfigError("DATABASE_URL gives a different number of hosts and ports")
    if any(p is None for p in checked) and any(p is not None for p in checked):
        raise ConfigError("DATABASE_URL gives a port for some hosts and not others: give every host its port, or none")
    params["host"] = ",".join(hosts)
    if checked[0] is not None:
        params["port"] = ",".join(str(p) for p in checked)
    return None, None


def _port(text: str) -> int:
    """A port from 1 to 65535; the text is never shown (a misplaced password could be it)."""
    if not _DIGITS_RE.match(text) or not 1 <= int(text) <= 65535:
        raise ConfigError("DATABASE_URL has a port that is not a number from 1 to 65535")
    return int(text)


def _check_parameters(params: dict[str, str]) -> None:
    if "sslmode" in params and params["sslmode"] not in SSLMODES:
        raise ConfigError(f"DATABASE_URL sslmode '{params['sslmode'][:40]}' must be one of {', '.join(SSLMODES)}")
    if "connect_timeout" in params:
        value = params["connect_timeout"]
        if not _DIGITS_RE.match(value) or not 1 <= int(value) <= MAX_CONNECT_TIMEOUT_S:
            raise ConfigError(
                f"DATABASE_URL connect_timeout '{value[:20]}' must be whole seconds from 1 to {MAX_CONNECT_TIMEOUT_S}"
            )
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
    if "host" in query:  # libpq's host list; asyncpg wants an IPv6 address in it in brackets
        query["host"] = ",".join(f"[{h}]" if ":" in h else h for h in str(query["host"]).split(","))
    # URL.set(password=None) would keep the password: None there means "unchanged"
    dsn = url.set(drivername="postgresql", query=query)._replace(password=None).render_as_string(hide_password=False)
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

    def __post_init__(self) -> None:
        """Checked where a Settings is built (tests, the CLI, ``dataclasses.replace``), not
        only in :meth:`from_env`: the schema and lock_timeout reach SQL and ``search_path``."""
        if self.url is not None and not isinstance(self.url, URL):
            raise ConfigError("Settings.url must be a parsed URL (flowfix.config.parse_database_url), not text")
        validate_schema(self.schema)
        validate_lock_timeout(self.lock_timeout)
        if isinstance(self.lock_retries, bool) or not isinstance(self.lock_retries, int):
            raise ConfigError("FLOWFIX_LOCK_RETRIES must be a whole number")
        validate_lock_retries(str(self.lock_retries))

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
