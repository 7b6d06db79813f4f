"""The one home of SQL quoting, for what cannot be a bind parameter.

Values are always bind parameters. Identifiers read from the catalog (a partition, an
application table that references the master) and the few values inlined into DO blocks
and ``--sql`` output (which take no parameters) are quoted here, and only here, by
PostgreSQL's rules. tests/test_sql_static.py holds every other SQL text to constants.
"""

from __future__ import annotations


def quote_ident(name: str) -> str:
    """An identifier, always double-quoted (``"`` doubled): exactly that name, any case."""
    if "\x00" in name:
        raise ValueError("an identifier cannot hold a NUL character")
    return '"' + name.replace('"', '""') + '"'


def quote_qualified(schema: str, name: str) -> str:
    """``schema.name``, each part quoted."""
    return quote_ident(schema) + "." + quote_ident(name)


def quote_literal(value: str) -> str:
    """A string literal (``'`` doubled; standard_conforming_strings, on since PostgreSQL 9.1,
    keeps backslashes literal), for DO blocks and ``--sql`` output only."""
    if "\x00" in value:
        raise ValueError("a string literal cannot hold a NUL character")
    return "'" + value.replace("'", "''") + "'"
