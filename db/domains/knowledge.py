"""Knowledge domain: chunks of text from knowledge sources, for an assistant's retrieval."""
from __future__ import annotations

import uuid

from google.protobuf import field_mask_pb2
from nexus.knowledge.v1 import knowledge_pb2 as pb
from sqlalchemy import Index, String, Text, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from db import errors
from db.base import Base, ResourceMixin, json_object
from db.engine import writes
from db.engine.call import Call
from db.engine.resource import REGISTRY, ResourceSpec

# ---------------------------------------------------------------- tables


class KnowledgeChunk(ResourceMixin, Base):
    __tablename__ = "knowledge_chunks"
    __table_args__ = (
        Index("ix_knowledge_chunks_create_time_id", "create_time", "id"),
        Index("ix_knowledge_chunks_source", "source"),
        # The key of UpsertKnowledgeChunk: an external id is unique within its source.
        Index("uq_knowledge_chunks_source_external_id", "source", "external_id", unique=True,
              postgresql_where=text("external_id IS NOT NULL"), sqlite_where=text("external_id IS NOT NULL")),
    )

    source: Mapped[str] = mapped_column(String(255), nullable=False)
    external_id: Mapped[str | None] = mapped_column(String(512))
    title: Mapped[str | None] = mapped_column(String(1024))
    content: Mapped[str] = mapped_column(Text, nullable=False)
    chunk_metadata: Mapped[json_object]


# ---------------------------------------------------------------- resources

KNOWLEDGE_CHUNKS = REGISTRY.add(
    ResourceSpec(
        name="KnowledgeChunk",
        plural="KnowledgeChunks",
        model=KnowledgeChunk,
        message=pb.KnowledgeChunk,
        singular_field="knowledge_chunk",
        required=frozenset({"source", "content"}),
        orderable=("create_time", "update_time", "source", "external_id", "title"),
        search_fields=(("title", "A"), ("content", "B")),
        batch_create=True,
        batch_get=True,
    )
)


# ---------------------------------------------------------------- custom methods


def _chunk_of(session: Session, source: str, external_id: str) -> uuid.UUID | None:
    """The id of the chunk of (source, external_id), locked for the replace (PostgreSQL)."""
    table = KNOWLEDGE_CHUNKS.table
    stmt = select(table.c.id).where(table.c.source == source, table.c.external_id == external_id)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return session.scalar(stmt)


def upsert_knowledge_chunk(session: Session, request: pb.UpsertKnowledgeChunkRequest, call: Call) -> pb.UpsertKnowledgeChunkResponse:
    """Create the chunk of (source, external_id), or replace every writable field of the one
    there (its id and create_time stay; its etag moves when anything changed). A concurrent
    upsert of the same new key makes one row: the loser replaces what the winner made."""
    chunk = request.knowledge_chunk
    violations = errors.Violations()
    for name in ("source", "external_id"):
        if not getattr(chunk, name):
            violations.add(f"knowledge_chunk.{name}", "is required: (source, external_id) is the chunk's key", "REQUIRED_FIELD")
    violations.raise_if_any()
    existing = _chunk_of(session, chunk.source, chunk.external_id)
    if existing is None:
        fresh = pb.KnowledgeChunk()
        fresh.CopyFrom(chunk)
        fresh.ClearField("id")
        fresh.ClearField("etag")
        try:
            with session.begin_nested():  # a savepoint: a concurrent upsert's row may win the key
                made = writes.create(session, KNOWLEDGE_CHUNKS, pb.CreateKnowledgeChunkRequest(knowledge_chunk=fresh), call)
            return pb.UpsertKnowledgeChunkResponse(knowledge_chunk=made, created=True)
        except IntegrityError:
            existing = _chunk_of(session, chunk.source, chunk.external_id)
            if existing is None:
                raise
    replacing = pb.KnowledgeChunk()
    replacing.CopyFrom(chunk)
    replacing.id = str(existing)
    replacing.ClearField("etag")
    update = pb.UpdateKnowledgeChunkRequest(knowledge_chunk=replacing, update_mask=field_mask_pb2.FieldMask(paths=["*"]))
    return pb.UpsertKnowledgeChunkResponse(knowledge_chunk=writes.update(session, KNOWLEDGE_CHUNKS, update, call), created=False)
