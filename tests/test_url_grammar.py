"""DATABASE_URL is read with libpq's grammar: each URL below is parsed by flowfix and by
libpq itself (psycopg's ``conninfo_to_dict`` calls libpq's ``PQconninfoParse``), and the
two must agree part for part. Passwords hold each of ``@ # ? / % + : space``, in the
userinfo and in ``?password=``. Where libpq refuses a URL flowfix refuses it too, and
where libpq accepts one it can never connect with (a host name holding '@', a port that
is a piece of a password) flowfix refuses it in one line: no error ever shows a piece of
the user name, password, host or port. Finally the password works on a real server with
scram authentication, through flowfix's own connect path."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import URL, text
from typer.testing import CliRunner

from flowfix.cli import Exit, app
from flowfix.config import Settings, connect_args, mask_url, parse_database_url
from flowfix.db import make_engine
from flowfix.errors import ConfigError
from tests.servers import Server, custom_server

SPECIALS = "@#?/%+: "
PASSWORD = "Zq7@a#b?c/d%e+f:g h"  # every special character at once
runner = CliRunner()


def libpq(url: str) -> dict[str, str]:
    """libpq's own reading of ``url``, with its placeholder port list for port-less
    hosts (``h1,h2`` gives ``port=','``) left out."""
    parts = dict(conninfo_to_dict(url))
    if parts.get("port", "x").strip(",") == "":
        del parts["port"]
    return {k: str(v) for k, v in parts.items()}


def flowfix(url: str) -> dict[str, str]:
    """flowfix's reading of ``url``, in libpq's terms."""
    parsed = parse_database_url(url)
    parts = {k: str(v) for k, v in parsed.query.items()}
    for key, value in (
        ("user", parsed.username),
        ("password", parsed.password),
        ("dbname", parsed.database),
        ("host", parsed.host),
        ("port", parsed.port),
    ):
        if value is not None:
            parts[key] = str(value)
    return parts


def libpq_userinfo(password: str) -> str:
    """The password as libpq reads it in the userinfo: '@' '/' '%' and space encoded."""
    return "".join(urllib.parse.quote(c, safe="") if c in "@/% " else c for c in password)


def flowfix_userinfo(password: str) -> str:
    """The same, with '@' left unencoded (flowfix takes the '@' after which the host holds none)."""
    return "".join(urllib.parse.quote(c, safe="") if c in "/% " else c for c in password)


def query_value(password: str) -> str:
    return "".join(urllib.parse.quote(c, safe="") if c in "%& =" else c for c in password)


PASSWORDS = [f"p{c}w" for c in SPECIALS] + [PASSWORD, "+", "a+b", "%2B", "::"]

SAME_AS_LIBPQ = [
    "postgresql://u:pw@host:5432/db",
    "postgres://u@host/db",
    "postgresql://host",
    "postgresql://",
    "postgresql:///db",
    "postgresql://u:pw@/db",
    "postgresql://:5433/db",
    "postgresql://[::1]:5433/db",
    "postgresql://u:pw@[2001:db8::7]/db",
    "postgresql://[::1]/db?sslmode=require",
    "postgresql://h1:5432,h2:5433/db",
    "postgresql://h1,h2,h3/db?target_session_attrs=read-write",
    "postgresql://u@h1:5432,[::1]:5433/db",
    "postgresql:///db?host=/var/run/postgresql",
    "postgresql:///db?host=%2Fvar%2Frun%2Fpostgresql&port=5433",
    "postgresql://%2Fvar%2Frun%2Fpostgresql/db",
    "postgresql://%2Fvar%2Frun%2Fpostgresql:5433/db",
    "postgresql://h:5432/db?host=h2",
    "postgresql://h/db?port=5433",
    "postgresql://h/db?dbname=other&user=someone",
    "postgresql://h/?dbname=x",
    "postgresql://h/db?port=5432,5433&host=a,b",
    "postgresql://u%40corp:pw@h/db",
    "postgresql://h/d%23b",
    "postgresql://h/db#not-a-fragment",
    "postgresql://h/d/e",
    "postgresql://h/%64b",
    "postgresql://h/db?application_name=a%20b+c",
    "postgresql://h/db?application_name=a+b&sslmode=verify-full&sslrootcert=/etc/ca+1.pem",
    "postgresql://u:p%C3%A9@h/db",
    "postgresql://host?user=a@b/d",
    "postgresql://u:pw@h/db?",
    "postgresql://u:pw@h:/db",
    "postgresql://h/db?connect_timeout=5&options=-c%20statement_timeout%3D5s",
]


@pytest.mark.parametrize("url", SAME_AS_LIBPQ)
def test_flowfix_reads_each_url_as_libpq_does(url: str) -> None:
    assert flowfix(url) == libpq(url)


@pytest.mark.parametrize("password", PASSWORDS)
def test_a_password_in_the_userinfo_is_read_as_libpq_reads_it(password: str) -> None:
    url = f"postgresql://ops:{libpq_userinfo(password)}@db.example:5432/app?sslmode=require"
    assert libpq(url)["password"] == password  # the table itself is right
    assert flowfix(url) == libpq(url)
    # and an unencoded '@' in it is read as the same password (libpq would look for a
    # host named after the rest of the password)
    unencoded = f"postgresql://ops:{flowfix_userinfo(password)}@db.example:5432/app?sslmode=require"
    assert flowfix(unencoded) == libpq(url)


@pytest.mark.parametrize("password", PASSWORDS)
def test_a_password_in_the_query_is_read_as_libpq_reads_it(password: str) -> None:
    """``+`` stays a plus (libpq does not read it as a space, unlike HTML forms)."""
    url = f"postgresql://ops@db.example/app?password={query_value(password)}"
    assert libpq(url)["password"] == password
    assert flowfix(url) == libpq(url)


def test_the_password_parameter_wins_over_the_userinfo_as_in_libpq() -> None:
    url = "postgresql://ops:old@h/db?password=a+b"
    assert flowfix(url) == libpq(url) and flowfix(url)["password"] == "a+b"


#: URLs both libpq and flowfix refuse, and URLs libpq reads but could never connect with,
#: which flowfix refuses before connecting. Every one hides "Zq7" in its authority.
REFUSED = [
    ("postgresql://u:Zq7%zz@h/db", "a '%' not followed by two hex digits in its password", True),
    ("postgresql://u:Zq7%0@h/db", "a '%' not followed by two hex digits in its password", True),
    ("postgresql://u:Zq7%00@h/db", "%00 in its password", True),
    ("postgresql://u:Zq7 x@h/db", "unencoded space in its password", True),
    ("postgresql://Zq7 u@h/db", "unencoded space in its user name", True),
    ("postgresql://u@Zq7 h/db", "unencoded space in its host", True),
    ("postgresql://u:Zq7@h/d b", "unencoded space in its database name", True),
    ("postgresql://u@h/db?password=Zq7 x", "unencoded space in its 'password' parameter", True),
    ("postgresql://u:Zq7%E9@h/db", "not UTF-8 in its password", True),
    ("postgresql://u:Zq7@[::1/db", "IPv6 host without its closing ']'", True),
    ("postgresql://u:Zq7@[]/db", "empty IPv6 host", True),
    ("postgresql://u:Zq7@[::1]x/db", "after an IPv6 host's ']'", True),
    ("postgresql://u@h/db?password=Zq7=x", "malformed query string", True),
    ("postgresql://u@h/db?Zq7", "malformed query string", True),
    ("postgresql://u@h/db?&password=Zq7", "malformed query string", True),
    # libpq reads these, then fails to connect (or connects elsewhere) showing a piece of the password
    ("postgresql://u:Zq7/x@h:5432/db", "unencoded '/' before its '@'", False),
    ("postgresql://u:1234/Zq7@h/db", "unencoded '/' before its '@'", False),
    ("postgresql://u:pw@h:Zq7/db", "a port that is not a number from 1 to 65535", False),
    ("postgresql://u:pw@h:5432:7/db", "a port that is not a number from 1 to 65535", False),
    ("postgresql://u:pw@h:99999/db", "a port that is not a number from 1 to 65535", False),
    ("postgresql://u:pw@h:0/db", "a port that is not a number from 1 to 65535", False),
    ("postgresql://u:pw@h/db?port=Zq7", "a port that is not a number from 1 to 65535", False),
    ("postgresql://u:pw@h1:5432,h2/db", "a port for some hosts and not others", False),
    ("postgresql://u:pw@h1,,h2/db", "an empty host in its list of hosts", False),
    ("postgresql://u:pw@h1,h2/db?port=1,2,3", "a different number of hosts and ports", False),
    ("postgresql://u:pw@h/db?ssl=true", "parameter 'ssl' is not supported", False),
]


@pytest.mark.parametrize(("url", "expect", "libpq_refuses"), REFUSED, ids=[r[1] + " " + r[0] for r in REFUSED])
def test_a_bad_url_is_refused_without_showing_any_piece_of_it(url: str, expect: str, libpq_refuses: bool) -> None:
    if libpq_refuses:
        with pytest.raises(Exception):  # noqa: B017 - psycopg.ProgrammingError; only that it refuses
            conninfo_to_dict(url)
    with pytest.raises(ConfigError) as refused:
        parse_database_url(url)
    message = str(refused.value)
    assert expect in message, message
    assert "Zq7" not in message and "1234" not in message and "\n" not in message


def test_the_dsn_handed_to_asyncpg_never_holds_the_password() -> None:
    """The password is passed to asyncpg apart (``URL.set(password=None)`` would have kept it)."""
    url = parse_database_url(f"postgresql://ops:{flowfix_userinfo(PASSWORD)}@h/db")
    args = connect_args(url, "public")
    assert args.password == PASSWORD
    assert "Zq7" not in args.dsn and "Zq7" not in mask_url(url)


def test_a_socket_directory_and_several_hosts_reach_asyncpg_as_libpq_lists() -> None:
    from asyncpg.connect_utils import _parse_hostlist

    sock = connect_args(parse_database_url("postgresql://%2Ftmp%2Fsock:5433/db"), "public").dsn
    assert "host=%2Ftmp%2Fsock" in sock and "port=5433" in sock
    multi = urllib.parse.parse_qs(
        urllib.parse.urlsplit(
            connect_args(parse_database_url("postgresql://h1:5432,[::1]:5433/db"), "public").dsn
        ).query
    )
    hosts, ports = _parse_hostlist(multi["host"][0], [int(p) for p in multi["port"][0].split(",")])
    assert (hosts, ports) == (["h1", "::1"], [5432, 5433])


def test_settings_built_directly_check_their_values() -> None:
    """``Settings`` validates itself (``__post_init__``), not only ``from_env``."""
    with pytest.raises(ConfigError, match="FLOWFIX_SCHEMA"):
        Settings(url=None, schema="public; DROP TABLE x")
    with pytest.raises(ConfigError, match="FLOWFIX_LOCK_TIMEOUT"):
        Settings(url=None, lock_timeout="1s'; DROP TABLE x; --")
    with pytest.raises(ConfigError, match="FLOWFIX_LOCK_RETRIES"):
        Settings(url=None, lock_retries=-1)
    with pytest.raises(ConfigError, match="URL"):
        Settings(url="postgresql://h/db")  # type: ignore[arg-type]
    assert (
        Settings(url=URL.create("postgresql+asyncpg"), schema="migration", lock_timeout="500ms").schema == "migration"
    )


# --- on a real server, with scram authentication ---------------------------------------


@pytest.fixture(scope="module")
def scram(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with custom_server(
        tmp_path_factory.mktemp("scram"),
        settings={"password_encryption": "scram-sha-256"},
        hba=["host all all 127.0.0.1/32 scram-sha-256"],
    ) as server:

        async def setup() -> None:
            import asyncpg

            conn = await asyncpg.connect(server.local_url())
            try:
                await conn.execute(f"CREATE ROLE ops LOGIN PASSWORD '{PASSWORD}'")
                await conn.execute("CREATE DATABASE app OWNER ops")
            finally:
                await conn.close()

        asyncio.run(setup())
        yield server


def _who(url: str) -> str:
    async def go() -> str:
        engine = make_engine(Settings.from_env({}, url=url))
        try:
            async with engine.connect() as conn:
                return str((await conn.execute(text("SELECT current_user || '@' || current_database()"))).scalar_one())
        finally:
            await engine.dispose()

    return asyncio.run(go())


@pytest.mark.parametrize("form", ["libpq-userinfo", "unencoded-at", "query"])
def test_the_password_logs_in_on_a_real_server(scram: Server, form: str) -> None:
    where = f"127.0.0.1:{scram.port}/app"
    url = {
        "libpq-userinfo": f"postgresql://ops:{libpq_userinfo(PASSWORD)}@{where}",
        "unencoded-at": f"postgresql://ops:{flowfix_userinfo(PASSWORD)}@{where}",
        "query": f"postgresql://ops@{where}?password={query_value(PASSWORD)}",
    }[form]
    assert _who(url) == "ops@app"


@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_a_wrong_password_is_one_line_that_shows_none_of_it(scram: Server, form: str, tmp_path: Path) -> None:
    wrong = PASSWORD + "x"
    where = f"127.0.0.1:{scram.port}/app"
    url = (
        f"postgresql://ops:{flowfix_userinfo(wrong)}@{where}"
        if form == "userinfo"
        else f"postgresql://ops@{where}?password={query_value(wrong)}"
    )
    result = runner.invoke(app, ["status"], env={"DATABASE_URL": url, "PGPASSFILE": str(tmp_path / "none")})
    assert result.exit_code == Exit.USAGE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "the server refused the login" in lines[0], result.stderr
    out = result.stdout + result.stderr
    for piece in ("Zq7", flowfix_userinfo(wrong), query_value(wrong), "d%25e", "g%20h", "g h"):
        assert piece not in out
