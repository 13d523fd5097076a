"""The durable change log: events written in the writer's transaction, read back in order.

Ordering trap: a sequence number handed out before commit can become visible after a larger one
(two writers, the later one commits first), and a reader that remembers "the largest seen" skips
the late one for good. Here every scope (a channel or a conversation) has its own counter row in
stream_scopes; a writer bumps it with an UPSERT ... RETURNING, which holds the row lock until the
writer commits. So within a scope the numbers are gap-free and commit in order: a reader that
has seen n knows the next event is n + 1, and a gap means "not committed yet" or "fetch again",
never "skipped".
"""
from __future__ import annotations

import base64
import datetime as dt
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from google.protobuf.message import Message
from sqlalchemy import CursorResult, Engine, delete, func, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db import errors
from db.base import utcnow
from db.database import COMMITTED_EVENTS_KEY
from db.engine.tables import ChangeEvent, StreamScope

if TYPE_CHECKING:
    from db.engine.resource import ResourceSpec

# The message publish and publish_deleted are given, returned as it is.
_M = TypeVar("_M", bound=Message)

CREATED, UPDATED, DELETED = "created", "updated", "deleted"
NOTIFY_CHANNEL = "nexus_events"
# The payload of a notification that says "credentials changed" (not a scope: no "/" in it).
ACCESS_NOTE = "access"


@dataclass(frozen=True)
class StoredEvent:
    scope: str
    seq: int
    event_type: str
    resource_type: str
    payload: bytes
    create_time: dt.datetime


def _upsert(dialect: str) -> Any:
    return postgresql.insert if dialect == "postgresql" else sqlite.insert


def emit(session: Session, scope: str, event_type: str, resource_type: str, resource_id: uuid.UUID, resource: Message) -> int:
    """Append an event to `scope` in the current transaction; returns its sequence number."""
    dialect = session.get_bind().dialect.name
    insert = _upsert(dialect)(StreamScope).values(scope=scope, last_seq=1, purged_seq=0)
    bump = insert.on_conflict_do_update(
        index_elements=[StreamScope.scope], set_={"last_seq": StreamScope.last_seq + 1}
    ).returning(StreamScope.last_seq)
    seq = int(session.execute(bump).scalar_one())
    stored = StoredEvent(scope, seq, event_type, resource_type, resource.SerializeToString(), utcnow())
    session.execute(
        ChangeEvent.__table__.insert().values(
            scope=scope,
            seq=seq,
            event_type=event_type,
            resource_type=resource_type,
            resource_id=resource_id,
            payload=stored.payload,
            create_time=stored.create_time,
        )
    )
    if dialect == "postgresql":
        # Delivered to listeners of every replica when (and only if) this transaction commits.
        session.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": NOTIFY_CHANNEL, "payload": f"{scope} {seq}"})
    # The event as read_after would read it back: the commit listeners get it whole.
    session.info.setdefault(COMMITTED_EVENTS_KEY, []).append(stored)
    return seq


def redact(session: Session, resource_type: str, resource_id: uuid.UUID, resource: Message) -> None:
    """Replace the payload of every event of a resource still in the log with `resource` (what
    is left of it once deleted): a resume from before its deletion brings back no content."""
    session.execute(
        ChangeEvent.__table__.update()
        .where(ChangeEvent.resource_id == resource_id, ChangeEvent.resource_type == resource_type)
        .values(payload=resource.SerializeToString())
    )


def notify_access(engine: Engine) -> None:
    """Tell every replica (PostgreSQL NOTIFY, on a connection of its own in autocommit) that
    credentials changed: their open streams re-check their callers' rights at once instead of
    at their next periodic check."""
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_notify(:channel, :payload)"), {"channel": NOTIFY_CHANNEL, "payload": ACCESS_NOTE})
        conn.commit()


def last_sequences(session: Session, scopes: Iterable[str]) -> dict[str, tuple[int, int]]:
    """scope -> (last_seq, purged_seq); scopes without events are (0, 0)."""
    wanted = list(scopes)
    found = {
        row.scope: (int(row.last_seq), int(row.purged_seq))
        for row in session.execute(select(StreamScope).where(StreamScope.scope.in_(wanted))).scalars()
    }
    return {s: found.get(s, (0, 0)) for s in wanted}


def read_after(session: Session, scope: str, after: int, limit: int) -> list[StoredEvent]:
    """Events of `scope` with seq > after, oldest first, at most `limit`."""
    rows = session.execute(
        select(ChangeEvent).where(ChangeEvent.scope == scope, ChangeEvent.seq > after).order_by(ChangeEvent.seq).limit(limit)
    ).scalars()
    return [StoredEvent(r.scope, int(r.seq), r.event_type, r.resource_type, r.payload, r.create_time) for r in rows]


def purge(session: Session, older_than: dt.datetime) -> int:
    """Delete events created before `older_than`; remember per scope how far they were purged."""
    horizons = session.execute(
        select(ChangeEvent.scope, func.max(ChangeEvent.seq)).where(ChangeEvent.create_time < older_than).group_by(ChangeEvent.scope)
    ).all()
    removed = 0
    for scope, max_seq in horizons:
        result = session.execute(delete(ChangeEvent).where(ChangeEvent.scope == scope, ChangeEvent.seq <= max_seq))
        assert isinstance(result, CursorResult)  # a DELETE's (Session.execute types every result as a Result)
        removed += result.rowcount or 0
        session.execute(
            update(StreamScope).where(StreamScope.scope == scope, StreamScope.purged_seq < max_seq).values(purged_seq=max_seq)
        )
    return removed


# ---------------------------------------------------------------- resume tokens


def encode_token(positions: dict[str, int]) -> str:
    """Opaque resume token: every followed scope's position, with a checksum against corruption."""
    if len(positions) == 1:  # the common stream follows one scope: it is sent with every event
        ((scope, seq),) = positions.items()
        raw = f"{scope}={seq}".encode()
    else:
        raw = ";".join(f"{scope}={seq}" for scope, seq in sorted(positions.items())).encode()
    return base64.urlsafe_b64encode(zlib.crc32(raw).to_bytes(4, "big") + raw).decode().rstrip("=")


def decode_token(token: str) -> dict[str, int]:
    bad = errors.InvalidArgument.field("resume_token", "is not a resume token this service issued", reason="INVALID_RESUME_TOKEN")
    try:
        blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        check, raw = blob[:4], blob[4:]
        if not raw or zlib.crc32(raw).to_bytes(4, "big") != check:
            raise bad
        positions: dict[str, int] = {}
        for part in raw.decode().split(";"):
            scope, _, seq = part.rpartition("=")
            if not scope or not seq.isdigit() or not (scope.startswith("channels/") or scope.startswith("conversations/")):
                raise bad
            positions[scope] = int(seq)
        return positions
    except errors.InvalidArgument:
        raise
    except Exception:  # noqa: BLE001 - any decoding failure is the same client error
        raise bad from None


def publish(session: Session, spec: ResourceSpec, row: Any, event_type: str, msg: _M) -> _M:
    """Append the change to the resource's stream, in this transaction; returns msg."""
    if spec.stream_scope is not None:
        emit(session, spec.stream_scope(row), event_type, spec.name, row.id, msg)
    return msg


# What a deleted resource's events keep: what names it and places it, not what it said.
KEPT_WHEN_DELETED = frozenset({"id", "create_time", "update_time", "delete_time", "etag"})


def publish_deleted(session: Session, spec: ResourceSpec, row: Any, msg: _M) -> _M:
    """Append a deleted row's event: its message without content (KEPT_WHEN_DELETED and its
    references), and the row's earlier events in the log lose their content too, so that no
    resume from before the delete brings back what a Get no longer shows. Returns msg whole."""
    if spec.stream_scope is None:
        return msg
    left = type(msg)()
    left.CopyFrom(msg)
    for field, _ in msg.ListFields():
        if field.name not in KEPT_WHEN_DELETED and field.name not in spec.references:
            left.ClearField(field.name)
    redact(session, spec.name, row.id, left)
    emit(session, spec.stream_scope(row), DELETED, spec.name, row.id, left)
    return msg
