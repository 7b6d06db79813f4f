"""Corrected ORM models for the discovery-flow tables, plus flowfix's own bookkeeping.

Every ``master_flow_id`` references ``crewai_flow_state_extensions.flow_id`` (the
business key), not ``.id`` as the deployed schema does. Delete rules are the ones the
replaced FKs had (fix_master_flow_fk keeps each FK's rule; these models describe the
``friendly`` shape: imports cascade, records and discovery flows do not). Tables carry no schema: each
connection's ``search_path`` is pinned to ``FLOWFIX_SCHEMA`` (see :mod:`flowfix.db`).
Constraint and index names follow :data:`NAMING_CONVENTION`, so the revisions, the
validator and the tests can name them without guessing.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}

MASTER_TABLE = "crewai_flow_state_extensions"
#: The tables whose ``master_flow_id`` flowfix repoints, in dependency order.
CHILD_TABLES: tuple[str, ...] = ("data_imports", "raw_import_records", "discovery_flows")

#: SQL predicate for the rows (alias ``t``) in scope of --client-account / --engagement:
#: all when a bound parameter is NULL. Shared by validate and backfill.
TENANT_SCOPE = (
    "(CAST(:client AS uuid) IS NULL OR t.client_account_id = CAST(:client AS uuid))"
    " AND (CAST(:engagement AS uuid) IS NULL OR t.engagement_id = CAST(:engagement AS uuid))"
)


#: The same for records (alias ``t``, their import ``i``): a record without tenant columns
#: is in the scope of its import's tenant.
RECORD_TENANT_SCOPE = (
    "(CAST(:client AS uuid) IS NULL OR COALESCE(t.client_account_id, i.client_account_id) = CAST(:client AS uuid))"
    " AND (CAST(:engagement AS uuid) IS NULL OR COALESCE(t.engagement_id, i.engagement_id) = CAST(:engagement AS uuid))"
)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(Uuid, primary_key=True, server_default=text("gen_random_uuid()"))


def _created_at() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class CrewAIFlowStateExtensions(Base):
    """The master flow. ``id`` is a surrogate key; ``flow_id`` is what everything links to."""

    __tablename__ = MASTER_TABLE

    id: Mapped[uuid.UUID] = _uuid_pk()
    flow_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False, unique=True)
    client_account_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    engagement_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    user_id: Mapped[str | None] = mapped_column(String(255))
    flow_type: Mapped[str] = mapped_column(String(50), nullable=False)
    flow_name: Mapped[str | None] = mapped_column(String(255))
    flow_status: Mapped[str] = mapped_column(String(50), nullable=False, server_default="initialized")
    flow_configuration: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    flow_persistence_data: Mapped[dict[str, Any]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'::jsonb")
    )
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _created_at()

    # Built by fix_master_flow_fk: the backfill's time-window search (same tenant, created
    # near an import) is a range scan on it instead of a comparison of every pair.
    __table_args__ = (
        Index("ix_crewai_flow_state_extensions_tenant_created", "client_account_id", "engagement_id", "created_at"),
    )


class DataImport(Base):
    __tablename__ = "data_imports"

    id: Mapped[uuid.UUID] = _uuid_pk()
    client_account_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    engagement_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    master_flow_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey(f"{MASTER_TABLE}.flow_id", ondelete="CASCADE"), index=True
    )
    import_name: Mapped[str | None] = mapped_column(String(255))
    import_type: Mapped[str | None] = mapped_column(String(50))
    filename: Mapped[str | None] = mapped_column(String(255))
    imported_by: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(50), nullable=False, server_default="pending")
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _created_at()

    master_flow: Mapped[CrewAIFlowStateExtensions | None] = relationship(foreign_keys=[master_flow_id])
    records: Mapped[list[RawImportRecord]] = relationship(
        back_populates="data_import", cascade="all, delete-orphan", passive_deletes=True
    )


class RawImportRecord(Base):
    __tablename__ = "raw_import_records"

    id: Mapped[uuid.UUID] = _uuid_pk()
    data_import_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("data_imports.id", ondelete="CASCADE"), nullable=False, index=True
    )
    client_account_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    engagement_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    master_flow_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey(f"{MASTER_TABLE}.flow_id"), index=True)
    row_number: Mapped[int] = mapped_column(Integer, nullable=False)
    raw_data: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _created_at()

    data_import: Mapped[DataImport] = relationship(back_populates="records")
    master_flow: Mapped[CrewAIFlowStateExtensions | None] = relationship(foreign_keys=[master_flow_id])


class DiscoveryFlow(Base):
    """The discovery flow's own state. In the real system ``flow_id`` equals its master's."""

    __tablename__ = "discovery_flows"

    id: Mapped[uuid.UUID] = _uuid_pk()
    flow_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False, unique=True)
    # Nullable until revision enforce_master_flow_not_null; the model states the goal.
    master_flow_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey(f"{MASTER_TABLE}.flow_id"), nullable=False, index=True
    )
    data_import_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("data_imports.id", ondelete="SET NULL"), index=True
    )
    client_account_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    engagement_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    user_id: Mapped[str | None] = mapped_column(String(255))
    flow_name: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(50), nullable=False, server_default="initialized")
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = _created_at()

    master_flow: Mapped[CrewAIFlowStateExtensions] = relationship(foreign_keys=[master_flow_id])
    data_import: Mapped[DataImport | None] = relationship(foreign_keys=[data_import_id])


# --- flowfix's own tables -----------------------------------------------------------


class SchemaChange(Base):
    """What flowfix's revisions created or replaced, so each downgrade undoes exactly that
    and never drops an object that was there before flowfix."""

    __tablename__ = "flowfix_schema_changes"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    revision: Mapped[str] = mapped_column(Text, nullable=False)
    #: 'table_created', 'index_created', 'constraint_created' or 'foreign_key_replaced'
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    table_name: Mapped[str] = mapped_column(Text, nullable=False)
    object_name: Mapped[str] = mapped_column(Text, nullable=False)
    #: for a replaced foreign key: pg_get_constraintdef() of the original
    definition: Mapped[str | None] = mapped_column(Text)
    validated: Mapped[bool | None] = mapped_column()
    recorded_at: Mapped[datetime] = _created_at()


class Quarantine(Base):
    """``master_flow_id`` values that matched no master: moved aside, never lost."""

    __tablename__ = "flowfix_quarantine"

    table_name: Mapped[str] = mapped_column(Text, primary_key=True)
    row_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    column_name: Mapped[str] = mapped_column(Text, primary_key=True)
    old_value: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    quarantined_at: Mapped[datetime] = _created_at()


class Translation(Base):
    """A ``master_flow_id`` value fix_master_flow_fk rewrote from a master's id to its
    flow_id (or found already holding a flow_id: old = new); the downgrade reads it back."""

    __tablename__ = "flowfix_translations"

    table_name: Mapped[str] = mapped_column(Text, primary_key=True)
    row_id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    column_name: Mapped[str] = mapped_column(Text, primary_key=True)
    old_value: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    new_value: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)


class LedgerRun(Base):
    """One backfill, link or undo run: who asked for what, and how it ended."""

    __tablename__ = "flowfix_runs"

    id: Mapped[uuid.UUID] = _uuid_pk()
    command: Mapped[str] = mapped_column(Text, nullable=False)
    arguments: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default="running")
    counts: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    started_at: Mapped[datetime] = _created_at()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class LedgerChange(Base):
    """One column value a run changed, with the evidence for it: enough to undo it."""

    __tablename__ = "flowfix_changes"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    run_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("flowfix_runs.id", ondelete="CASCADE"), nullable=False, index=True
    )
    table_name: Mapped[str] = mapped_column(Text, nullable=False)
    row_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    column_name: Mapped[str] = mapped_column(Text, nullable=False)
    old_value: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    new_value: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    evidence: Mapped[str] = mapped_column(Text, nullable=False)
    distance_seconds: Mapped[float | None] = mapped_column(Double)
    #: for a change applied to many rows at once (a batch of one import's records):
    #: their ids; ``row_id`` is then the import's id
    row_ids: Mapped[list[uuid.UUID] | None] = mapped_column(ARRAY(Uuid))
    recorded_at: Mapped[datetime] = _created_at()
    #: NULL while the change is only planned (a backfill stores its plan first)
    applied_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    undone_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    #: why a planned change was not applied (the row changed since planning)
    skipped: Mapped[str | None] = mapped_column(Text)
