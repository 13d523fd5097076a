"""The tables the engine itself writes: request ids (AIP-155), the change log of streamed
resources, and the audit trail. Each domain's tables are in its module (db/domains/)."""
from __future__ import annotations

import datetime as dt
import uuid

from sqlalchemy import BigInteger, Index, LargeBinary, String, Text, UniqueConstraint, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from db.base import Base, json_list, one_of, timestamp, utcnow, uuid7


class RequestRecord(Base):
    """Remembers the resource a Create with a request_id made, so a retry returns it (AIP-155).

    A request id is the caller's own: `principal` (engine/call.request_principal) is part of the key."""

    __tablename__ = "request_records"
    __table_args__ = (UniqueConstraint("resource_type", "principal", "request_id"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    resource_type: Mapped[str] = mapped_column(String(64), nullable=False)
    principal: Mapped[str] = mapped_column(String(64), nullable=False, server_default="")
    request_id: Mapped[str] = mapped_column(String(128), nullable=False)
    resource_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    create_time: Mapped[timestamp] = mapped_column(default=utcnow, index=True)


class StreamScope(Base):
    """One row per channel or conversation that has events: its last sequence number.

    Writers bump last_seq with an UPSERT ... RETURNING, which holds the row lock until commit, so
    within a scope sequence numbers are gap-free and become visible in commit order.
    """

    __tablename__ = "stream_scopes"

    scope: Mapped[str] = mapped_column(String(64), primary_key=True)  # "channels/<id>"
    last_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    # Events up to this sequence were purged by retention; a token older than it must reload.
    purged_seq: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)


class ChangeEvent(Base):
    """A change to a streamed resource, written in the same transaction as the change."""

    __tablename__ = "change_events"
    __table_args__ = (
        Index("ix_change_events_create_time", "create_time"),
        Index("ix_change_events_resource_id", "resource_id"),  # a deleted resource's events, to redact
    )

    scope: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    event_type: Mapped[str] = mapped_column(String(16), nullable=False)
    resource_type: Mapped[str] = mapped_column(String(64), nullable=False)
    resource_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    # The resource's proto, serialized: replayed as is, unless the row is deleted (events.redact).
    payload: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    create_time: Mapped[timestamp] = mapped_column(default=utcnow)


ACTOR_TYPES = ("user", "api_key", "system")


AUDIT_ACTIONS = ("create", "update", "delete", "undelete")


class AuditLogEntry(Base):
    """A change to a resource, written by the service in the same transaction as the change."""

    __tablename__ = "audit_log_entries"
    __table_args__ = (
        one_of("actor_type", ACTOR_TYPES),
        one_of("action", AUDIT_ACTIONS),
        Index("ix_audit_log_entries_create_time_id", "create_time", "id"),
        Index("ix_audit_log_entries_resource_type_resource_id", "resource_type", "resource_id"),
        Index("ix_audit_log_entries_actor_id_create_time", "actor_id", "create_time"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid7)
    actor_type: Mapped[str] = mapped_column(String(16), nullable=False)
    actor_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    action: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    resource_type: Mapped[str] = mapped_column(String(64), nullable=False)
    resource_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    # [{"field": ..., "old_value": ..., "new_value": ...}], secrets masked.
    changes: Mapped[json_list]
    request_id: Mapped[str | None] = mapped_column(String(128), index=True)
    method: Mapped[str | None] = mapped_column(String(255))
    # Words for full-text search: action, resource type, changed field names.
    summary: Mapped[str] = mapped_column(Text, nullable=False, default="")
    create_time: Mapped[timestamp] = mapped_column(default=utcnow)

    @property
    def update_time(self) -> dt.datetime:
        return self.create_time

    revision = 1
