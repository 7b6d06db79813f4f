"""Typed errors. Library code raises these; the CLI turns each into one line and exit 2."""


class FlowfixError(Exception):
    """Base class for every error flowfix reports to a user."""


class ConfigError(FlowfixError):
    """A setting (URL, schema, option) is malformed."""


class DatabaseUnavailable(FlowfixError):
    """The database could not be reached or refused the connection."""


class MigrationError(FlowfixError):
    """A revision refused to run because the database is not in the state it needs."""
