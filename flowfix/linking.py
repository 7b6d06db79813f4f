"""Linking service: new imports are never orphaned again.

The plan's import handler commits the master flow in one place and the links in another,
logs and swallows failures, and lets two concurrent triggers for one import create two
flows. Here each call is one transaction that locks the import row first: everything is
committed or nothing is, errors propagate as typed exceptions, and a second call for the
same import returns the flow the first one created.

Both functions work on an application's own ``AsyncSession``. If the session is not in a
transaction they open one and commit it; if it is, they run inside it (in a SAVEPOINT,
so a refusal leaves the caller's transaction usable) and the caller commits.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from flowfix import catalog, ledger, privileges
from flowfix.batches import retrying
from flowfix.errors import FlowfixError
from flowfix.evidence import Evidence
from flowfix.ledger import Change
from flowfix.models import MASTER_TABLE
from flowfix.tenancy import known_and_equal, unknown_matches, unknown_matches_sql


@dataclass(frozen=True)
class RequestContext:
    """Who is asking: the tenant (client account and engagement) and the user."""

    client_account_id: uuid.UUID
    engagement_id: uuid.UUID
    user_id: str | None = None


class LinkError(FlowfixError):
    """A link was refused; nothing was changed."""


class ImportNotFound(LinkError):
    pass


class FlowNotFound(LinkError):
    pass


class NotADiscoveryFlow(LinkError):
    pass


class TenantMismatch(LinkError):
    pass


class AlreadyLinked(LinkError):
    pass


class MissingValue(LinkError):
    """The application's schema requires a value the request does not carry."""


@dataclass
class LinkResult:
    data_import_id: uuid.UUID
    flow_id: uuid.UUID
    changes: list[Change] = field(default_factory=list)  # what was written, for the ledger

    @property
    def records_linked(self) -> int:
        return sum(1 for c in self.changes if c.table == "raw_import_records")


@asynccontextmanager
async def _transaction(session: AsyncSession) -> AsyncIterator[None]:
    if session.in_transaction():
        async with session.begin_nested():
            yield
    else:
        async with session.begin():
            yield


async def _lock_import(session: AsyncSession, data_import_id: uuid.UUID):  # type: ignore[no-untyped-def]
    row = (
        await session.execute(
            text(
                "SELECT id, client_account_id, engagement_id, master_flow_id FROM data_imports WHERE id = :id FOR UPDATE"
            ),
            {"id": data_import_id},
        )
    ).one_or_none()
    if row is None:
        raise ImportNotFound(f"data import {data_import_id} does not exist")
    return row


async def _link_records(
    session: AsyncSession,
    data_import_id: uuid.UUID,
    flow_id: uuid.UUID,
    client: uuid.UUID,
    engagement: uuid.UUID,
    replaces: uuid.UUID | None = None,
) -> list[Change]:
    """Point the import's records at ``flow_id``, in one statement: those with no master,
    and those holding ``replaces`` (the import's previous master, when it is relinked with
    --force). A record holding any other master is never overwritten, as in the backfill.
    Refuse (and so roll everything back) if any record carries another tenant."""
    foreign = (
        await session.execute(
            text(
                "SELECT r.id FROM raw_import_records r WHERE r.data_import_id = :i"
                f" AND NOT {unknown_matches_sql('r', 'CAST(:c AS uuid)', 'CAST(:e AS uuid)')} ORDER BY r.id LIMIT 1"
            ),
            {"i": data_import_id, "c": client, "e": engagement},
        )
    ).scalar_one_or_none()
    if foreign is not None:
        raise TenantMismatch(f"record {foreign} of import {data_import_id} belongs to another tenant")
    rows = (
        await session.execute(
            text(
                "UPDATE raw_import_records r SET master_flow_id = :f"
                " FROM raw_import_records old"
                " WHERE r.id = old.id AND r.data_import_id = :i AND r.master_flow_id IS DISTINCT FROM :f"
                "   AND (r.master_flow_id IS NULL OR r.master_flow_id = CAST(:replaces AS uuid))"
                " RETURNING r.id, old.master_flow_id"
            ),
            {"f": flow_id, "i": data_import_id, "replaces": replaces},
        )
    ).all()
    return [
        Change("raw_import_records", r.id, "master_flow_id", r.master_flow_id, flow_id, Evidence.LINK) for r in rows
    ]


async def start_discovery_flow(
    session: AsyncSession, *, data_import_id: uuid.UUID, context: RequestContext, flow_name: str | None = None
) -> uuid.UUID:
    """Create the discovery master flow for an import and link everything to it, atomically.

    Locks the import row; if the import is already linked, returns that flow. Creates the
    master (flow_type 'discovery', configuration naming the import, as the plan's trigger
    does), the ``discovery_flows`` row (flow_id = master_flow_id = the master's flow_id,
    data_import_id set), and sets ``master_flow_id`` on the import and all its records.
    Raises :class:`ImportNotFound` or :class:`TenantMismatch`; never swallows errors.
    """
    async with _transaction(session):
        imp = await _lock_import(session, data_import_id)
        if not known_and_equal(
            imp.client_account_id, imp.engagement_id, context.client_account_id, context.engagement_id
        ):
            raise TenantMismatch(
                f"data import {data_import_id} does not belong to client account "
                f"{context.client_account_id} / engagement {context.engagement_id}"
            )
        if imp.master_flow_id is not None:
            existing: uuid.UUID = imp.master_flow_id
            return existing  # the first caller already did the work
        if context.user_id is None:
            required = await session.run_sync(
                lambda s: {t for t in (MASTER_TABLE, "discovery_flows") if "user_id" in catalog.required_columns(s, t)}
            )
            if required:
                raise MissingValue(
                    f"{' and '.join(sorted(required))}.user_id is NOT NULL on this database:"
                    " the request context must carry a user_id"
                )
        flow_id = uuid.uuid4()
        name = flow_name or f"Discovery Import {data_import_id}"
        # ids are supplied here: the application's own schema has no server default for them
        await session.execute(
            text(
                "INSERT INTO crewai_flow_state_extensions (id, flow_id, client_account_id, engagement_id, user_id,"
                " flow_type, flow_name, flow_status, flow_configuration, flow_persistence_data)"
                " VALUES (:id, :f, :c, :e, :u, 'discovery', :n, 'initialized',"
                " jsonb_build_object('source', 'data_import', 'import_id', CAST(:i AS text)),"
                " jsonb_build_object('data_import_id', CAST(:i AS text)))"
            ),
            {
                "id": uuid.uuid4(),
                "f": flow_id,
                "c": context.client_account_id,
                "e": context.engagement_id,
                "u": context.user_id,
                "n": name,
                "i": str(data_import_id),
            },
        )
        await session.execute(
            text(
                "INSERT INTO discovery_flows (id, flow_id, master_flow_id, data_import_id, client_account_id,"
                " engagement_id, user_id, flow_name) VALUES (:id, :f, :f, :i, :c, :e, :u, :n)"
            ),
            {
                "id": uuid.uuid4(),
                "f": flow_id,
                "i": data_import_id,
                "c": context.client_account_id,
                "e": context.engagement_id,
                "u": context.user_id,
                "n": name,
            },
        )
        await session.execute(
            text("UPDATE data_imports SET master_flow_id = :f, updated_at = now() WHERE id = :i"),
            {"f": flow_id, "i": data_import_id},
        )
        await _link_records(session, data_import_id, flow_id, context.client_account_id, context.engagement_id)
        return flow_id


async def link_import(
    session: AsyncSession,
    *,
    data_import_id: uuid.UUID,
    flow_id: uuid.UUID,
    context: RequestContext | None = None,
    force: bool = False,
) -> LinkResult:
    """Link an existing import (and its records) to an existing discovery master flow.

    The import's tenant must be the master's (and the context's, if given). An import
    already linked to a different flow is refused unless ``force``. Returns what changed
    (empty when the import was already linked to this flow).
    """
    async with _transaction(session):
        imp = await _lock_import(session, data_import_id)
        master = (
            await session.execute(
                text(
                    "SELECT flow_id, flow_type, client_account_id, engagement_id FROM crewai_flow_state_extensions"
                    " WHERE flow_id = :f FOR SHARE"
                ),
                {"f": flow_id},
            )
        ).one_or_none()
        if master is None:
            raise FlowNotFound(f"no master flow with flow_id {flow_id}")
        if master.flow_type != "discovery":
            raise NotADiscoveryFlow(f"master flow {flow_id} is a '{master.flow_type}' flow, not a discovery flow")
        tenant = RequestContext(master.client_account_id, master.engagement_id)
        if context is not None and not known_and_equal(
            context.client_account_id, context.engagement_id, tenant.client_account_id, tenant.engagement_id
        ):
            raise TenantMismatch(f"master flow {flow_id} does not belong to the requesting tenant")
        # a tenantless import may be linked (by an operator: the point of `flowfix link`);
        # one of another tenant never
        if not unknown_matches(
            imp.client_account_id, imp.engagement_id, tenant.client_account_id, tenant.engagement_id
        ):
            raise TenantMismatch(f"data import {data_import_id} and master flow {flow_id} belong to different tenants")
        result = LinkResult(data_import_id, flow_id)
        if imp.master_flow_id is not None and imp.master_flow_id != flow_id and not force:
            raise AlreadyLinked(
                f"data import {data_import_id} is already linked to {imp.master_flow_id}; use --force to relink it"
            )
        if imp.master_flow_id != flow_id:
            await session.execute(
                text("UPDATE data_imports SET master_flow_id = :f, updated_at = now() WHERE id = :i"),
                {"f": flow_id, "i": data_import_id},
            )
            result.changes.append(
                Change("data_imports", data_import_id, "master_flow_id", imp.master_flow_id, flow_id, Evidence.LINK)
            )
        replaces = imp.master_flow_id if imp.master_flow_id != flow_id else None
        result.changes += await _link_records(
            session, data_import_id, flow_id, master.client_account_id, master.engagement_id, replaces
        )
        return result


async def link_with_ledger(
    session: AsyncSession,
    *,
    data_import_id: uuid.UUID,
    flow_id: uuid.UUID,
    force: bool = False,
    lock_retries: int = 5,
) -> tuple[uuid.UUID | None, LinkResult]:
    """``flowfix link``: take the run lock, link, and record a ledger run that
    ``flowfix undo`` can revert, all in one transaction. No run is recorded when nothing
    changed (the import was already linked to this flow). Behind an application's row
    lock the transaction gives up after lock_timeout, holding nothing, and is retried
    with jittered backoff up to ``lock_retries`` times."""
    return await retrying(lock_retries, lambda: _link_with_ledger(session, data_import_id, flow_id, force))


async def _link_with_ledger(
    session: AsyncSession, data_import_id: uuid.UUID, flow_id: uuid.UUID, force: bool
) -> tuple[uuid.UUID | None, LinkResult]:
    async with session.begin():
        await ledger.require_ledger(session)
        await session.run_sync(catalog.require_full_visibility, "flowfix link")
        await privileges.require(session, "link", "write", "link")
        await session.run_sync(catalog.require_not_part_done, "flowfix link")
        await ledger.try_lock(session)
        result = await link_import(session, data_import_id=data_import_id, flow_id=flow_id, force=force)
        if not result.changes:
            return None, result
        run_id = await ledger.start_run(
            session, "link", {"import": str(data_import_id), "flow": str(flow_id), "force": force}
        )
        await ledger.record(session, run_id, result.changes)
        await ledger.finish_run(
            session,
            run_id,
            "finished",
            {"data_imports": len(result.changes) - result.records_linked, "raw_import_records": result.records_linked},
        )
        return run_id, result
