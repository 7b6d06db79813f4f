"""The tenant rule, in one place, in Python and in SQL.

A tenant is the pair (client_account_id, engagement_id). Two policies exist, named for
what they do with a NULL on the row's side (the master's side is never NULL):

- **unknown matches** (:func:`unknown_matches`): a NULL is no evidence either way, so it
  agrees; a known, different value always refuses. Used wherever other evidence decides
  the link (exact evidence, records following their import, write-time re-checks,
  ``flowfix link``, which is how an operator places a tenantless import by hand) and by
  validate, which flags only a known, different tenant as a mismatch.
- **known and equal** (:func:`known_and_equal`): both columns known and equal. Used where
  the tenant *is* the evidence: matching by time (a tenantless import is never matched
  by time), a discovery flow and its master, and the application's own request context.

The SQL twins take SQL expressions (``"t"`` for ``t.client_account_id`` ...; or explicit
expressions such as bind parameters), so every statement spells the rule the same way.
"""

from __future__ import annotations

import uuid

Id = uuid.UUID | None


def unknown_matches(row_client: Id, row_engagement: Id, client: Id, engagement: Id) -> bool:
    """The row's tenant agrees with (``client``, ``engagement``): each column NULL or equal."""
    return (row_client is None or row_client == client) and (row_engagement is None or row_engagement == engagement)


def known_and_equal(row_client: Id, row_engagement: Id, client: Id, engagement: Id) -> bool:
    """Both tenant columns known and equal."""
    return (
        row_client is not None
        and row_engagement is not None
        and (row_client, row_engagement)
        == (
            client,
            engagement,
        )
    )


def _columns(alias_or_client: str, engagement: str | None) -> tuple[str, str]:
    if engagement is None:
        return f"{alias_or_client}.client_account_id", f"{alias_or_client}.engagement_id"
    return alias_or_client, engagement


def unknown_matches_sql(row: str, master: str, master_engagement: str | None = None) -> str:
    """SQL of :func:`unknown_matches`: ``row`` is an alias; ``master`` an alias, or (with
    ``master_engagement``) the client expression."""
    rc, re_ = _columns(row, None)
    mc, me = _columns(master, master_engagement)
    return f"(({rc} IS NULL OR {rc} = {mc}) AND ({re_} IS NULL OR {re_} = {me}))"


def known_and_equal_sql(row: str, master: str, master_engagement: str | None = None) -> str:
    """SQL of :func:`known_and_equal`, for WHERE and JOIN conditions: a NULL column makes
    it NULL, which refuses there (kept free of COALESCE so an index on the tenant columns
    still serves it; never negate it)."""
    rc, re_ = _columns(row, None)
    mc, me = _columns(master, master_engagement)
    return f"({rc} = {mc} AND {re_} = {me})"
