"""Knowledge domain: chunks of text from knowledge sources, for an assistant's retrieval."""
from __future__ import annotations

from nexus.knowledge.v1 import knowledge_pb2 as pb
from sqlalchemy import Index, String, Text, text
from sqlalchemy.orm import Mapped, Session, mapped_column

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
        upsert_key=("source", "external_id"),
    )
)


# ---------------------------------------------------------------- custom methods


def upsert_knowledge_chunk(session: Session, request: pb.UpsertKnowledgeChunkRequest, call: Call) -> pb.UpsertKnowledgeChunkResponse:
    """The chunk of (source, external_id), made or replaced (writes.upsert)."""
    chunk, created = writes.upsert(session, KNOWLEDGE_CHUNKS, request.knowledge_chunk, call)
    return pb.UpsertKnowledgeChunkResponse(knowledge_chunk=chunk, created=created)
