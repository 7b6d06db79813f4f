"""``EmbeddedServer.url_for`` names the database asked for, whatever form the server's URL
has (the wheel gives a socket URL; a TCP one used to keep ``postgres``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from flowfix.embedded import EmbeddedServer


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@/postgres?host=/tmp/flowfix-sock&port=5432",
        "postgresql://postgres@localhost:5432/postgres",
        "postgresql://postgres:pw@127.0.0.1:5433/postgres?sslmode=disable",
        "postgresql://postgres@[::1]:5432/postgres",
    ],
)
def test_url_for_names_the_database_and_keeps_the_rest(url: str) -> None:
    server = EmbeddedServer(url=url, data_dir=Path("/nonexistent"), handle=None, keep=True)
    got = conninfo_to_dict(server.url_for("flowfix_demo"))
    want = conninfo_to_dict(url)
    assert got.pop("dbname") == "flowfix_demo"
    want.pop("dbname")
    assert got == want
