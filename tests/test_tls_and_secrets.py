"""TLS and passwords, for real: a server started by the test with ``ssl=on`` (a certificate
from a CA the test made) and scram password authentication on TCP. Every command runs with
the password in each place libpq reads it from, and no output, report, JUnit file, --sql
output or ledger row may contain it."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from flowfix.cli import Exit, app
from tests.servers import Server, custom_server

#: each of @ # ? / % + and space. Not ':': asyncpg reads ``\:`` in ~/.pgpass as two characters
#: (libpq as a colon), so such a password works from the URL and PGPASSWORD only (see
#: docs/security.md; tests/test_url_grammar.py logs in with one on a real server).
PASSWORD = "S3cret@Pw-7f3a#x?y/z%w+v u"
ENCODED = urllib.parse.quote(PASSWORD, safe="")
#: in the userinfo as an operator would paste it: '@ # ? +' unencoded ('/', '%' and space
#: must be encoded there, for libpq as for flowfix)
USERINFO = PASSWORD.replace("%", "%25").replace("/", "%2F").replace(" ", "%20")
ROLE = "flowfix_ops"
runner = CliRunner()


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path, Path]]:
    """(server, the right root certificate, a wrong one)."""
    import trustme

    from tests.servers import system_bin_dir

    if system_bin_dir() is None:
        pytest.skip(
            "TLS needs a PostgreSQL built with SSL: the embedded wheel's is not, and this machine has no"
            " system PostgreSQL (CI has PostgreSQL 15)"
        )
    ca, stranger = trustme.CA(), trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    tmp = tmp_path_factory.mktemp("tls")
    with custom_server(
        tmp / "server",
        settings={
            "ssl": "on",
            "ssl_cert_file": "server.crt",
            "ssl_key_file": "server.key",
            "password_encryption": "scram-sha-256",
        },
        hba=["hostssl all all 127.0.0.1/32 scram-sha-256", "host all all 127.0.0.1/32 scram-sha-256"],
        files={
            "server.crt": b"".join(p.bytes() for p in cert.cert_chain_pems),
            "server.key": cert.private_key_pem.bytes(),
        },
        system=True,
    ) as server:
        right, wrong = tmp / "ca.pem", tmp / "stranger.pem"
        ca.cert_pem.write_to_path(str(right))
        stranger.cert_pem.write_to_path(str(wrong))
        _admin(server, f"CREATE ROLE {ROLE} LOGIN PASSWORD '{PASSWORD}'")
        yield server, right, wrong


def _admin(server: Server, *statements: str) -> None:
    import asyncpg

    async def go() -> None:
        conn = await asyncpg.connect(server.local_url())
        try:
            for statement in statements:
                await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(go())


def _dump_flowfix_tables(server: Server, database: str) -> str:
    """Every row of flowfix's own tables (ledger, bookkeeping), as text."""
    import asyncpg

    async def go() -> str:
        conn = await asyncpg.connect(server.local_url(database))
        try:
            tables = await conn.fetch("SELECT tablename FROM pg_tables WHERE tablename LIKE 'flowfix%'")
            rows = [str(await conn.fetch(f'SELECT t::text FROM "{t["tablename"]}" t')) for t in tables]
            return "\n".join(rows)
        finally:
            await conn.close()

    return asyncio.run(go())


def _database(server: Server, name: str) -> None:
    _admin(server, f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name} OWNER {ROLE}")


def test_sslmode_require_and_verify_full_work_and_a_wrong_root_certificate_is_one_line(
    tls: tuple[Server, Path, Path],
) -> None:
    server, right, wrong = tls
    _database(server, "tls_app")
    base = f"postgresql://{ROLE}:{ENCODED}@localhost:{server.port}/tls_app"
    made = runner.invoke(app, ["upgrade", "legacy", "--create-tables"], env={"DATABASE_URL": f"{base}?sslmode=require"})
    assert made.exit_code == Exit.OK, made.output

    from sqlalchemy import text

    from flowfix.config import Settings
    from flowfix.db import make_engine

    async def ssl_in_use(url: str) -> bool:
        engine = make_engine(Settings.from_env({"DATABASE_URL": url}))
        try:
            async with engine.connect() as conn:
                return bool(
                    (await conn.execute(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))).scalar_one()
                )
        finally:
            await engine.dispose()

    assert asyncio.run(ssl_in_use(f"{base}?sslmode=require"))
    verified = f"{base}?sslmode=verify-full&sslrootcert={right}"
    assert asyncio.run(ssl_in_use(verified))
    status = runner.invoke(app, ["status"], env={"DATABASE_URL": verified})
    assert status.exit_code == Exit.OK, status.output
    assert asyncio.run(ssl_in_use(f"{base}?sslmode=disable")) is False

    refused = runner.invoke(app, ["status"], env={"DATABASE_URL": f"{base}?sslmode=verify-full&sslrootcert={wrong}"})
    assert refused.exit_code == Exit.USAGE
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"flowfix: error: cannot connect to postgresql://{ROLE}:***@localhost"
    )
    assert "certificate" in lines[0].lower()


@pytest.mark.parametrize("where", ["userinfo", "query", "PGPASSWORD", "pgpass"])
def test_no_command_ever_shows_the_password(tls: tuple[Server, Path, Path], tmp_path: Path, where: str) -> None:
    server, right, _ = tls
    database = f"secret_{where.lower()}"
    _database(server, database)
    hostpart = f"localhost:{server.port}/{database}"
    env: dict[str, str | None] = {"PGPASSWORD": None, "PGPASSFILE": str(tmp_path / "none")}  # None: unset
    if where == "userinfo":  # unencoded '@ # ? +' in the password
        env["DATABASE_URL"] = f"postgresql://{ROLE}:{USERINFO}@{hostpart}?sslmode=verify-full&sslrootcert={right}"
    elif where == "query":
        env["DATABASE_URL"] = f"postgresql://{ROLE}@{hostpart}?password={ENCODED}&sslmode=require"
    elif where == "PGPASSWORD":
        env.update(DATABASE_URL=f"postgresql://{ROLE}@{hostpart}?sslmode=require", PGPASSWORD=PASSWORD)
    else:
        pgpass = tmp_path / "pgpass"
        pgpass.write_text(f"localhost:{server.port}:{database}:{ROLE}:{PASSWORD}\n")
        pgpass.chmod(0o600)
        env.update(DATABASE_URL=f"postgresql://{ROLE}@{hostpart}?sslmode=require", PGPASSFILE=str(pgpass))

    junit, report, plan = tmp_path / "v.xml", tmp_path / "r.json", tmp_path / "p.json"
    commands = [
        ["upgrade", "fix_master_flow_fk", "--create-tables"],
        ["status"],
        ["validate", "--format", "junit", "--output", str(junit)],
        ["validate", "--format", "json"],
        ["backfill", "--dry-run", "--report", str(plan)],
        ["backfill", "--report", str(report)],
        ["runs"],
        ["link", "--import", "00000000-0000-4000-8000-000000000001", "--flow", "00000000-0000-4000-8000-000000000002"],
        ["undo", "00000000-0000-4000-8000-000000000003"],
        ["upgrade", "head", "--sql"],
        ["upgrade", "head"],
        ["downgrade", "legacy"],
        ["downgrade", "legacy", "--sql"],
    ]
    seen = []
    for args in commands:
        result = runner.invoke(app, args, env=env)
        assert result.exit_code in (Exit.OK, Exit.PROBLEMS, Exit.USAGE), (args, result.output)
        assert "Traceback" not in result.output, (args, result.output)
        seen.append(result.stdout + result.stderr)
    assert "flowfix: error: cannot connect" not in "".join(seen)  # the password worked everywhere

    # and a wrong one is refused in one line that does not repeat it either
    url = str(env["DATABASE_URL"])
    wrong = dict(
        env,
        DATABASE_URL=url.replace(USERINFO, USERINFO + "x").replace(ENCODED, ENCODED + "x"),
        PGPASSWORD=env["PGPASSWORD"] and PASSWORD + "x",
    )
    if where == "pgpass":
        (tmp_path / "pgpass").write_text(f"localhost:{server.port}:{database}:{ROLE}:{PASSWORD}x\n")
    refused = runner.invoke(app, ["status"], env=wrong)
    assert refused.exit_code == Exit.USAGE and "the server refused the login" in refused.stderr
    seen.append(refused.stdout + refused.stderr)

    files = "".join(p.read_text() for p in (junit, report, plan) if p.exists())
    everything = "\n".join(seen) + files + _dump_flowfix_tables(server, database)
    for secret in (PASSWORD, ENCODED, USERINFO, "Pw-7f3a", "z%w", "z%25w", "w+v"):
        assert secret not in everything, f"password shown ({where})"
    assert f"{ROLE}:***@" in "".join(seen) or where in ("PGPASSWORD", "pgpass")
