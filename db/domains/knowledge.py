"""Knowledge domain: chunks of text from knowledge sources, for an assistant's retrieval."""
from __future__ import annotations

from nexus.knowledge.v1 import knowledge_pb2 as pb
from sqlalchemy import Index, String, Text, text
from sqlalchemy.orm import Mapped, Session, mapped_column

from db.base import Base, ResourceMixin, json_object
from db import errors
from db.engine import cascade, paging, reads, upserts
from db.engine.writes import load_fields
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
    """The chunk of (source, external_id), made or replaced (engine/upserts)."""
    chunk, created = upserts.upsert(session, KNOWLEDGE_CHUNKS, request.knowledge_chunk, call)
    return pb.UpsertKnowledgeChunkResponse(knowledge_chunk=chunk, created=created)


def batch_upsert_knowledge_chunks(
    session: Session, request: pb.BatchUpsertKnowledgeChunksRequest, call: Call, max_bytes: int
) -> pb.BatchUpsertKnowledgeChunksResponse:
    """Every request's chunk upserted, all or nothing; refused before it commits when its answer
    would pass max_bytes (a client that cannot read the answer would take a committed batch for
    a refused one: a read_mask of "id,etag" keeps it small)."""
    mask = reads.read_mask_paths(KNOWLEDGE_CHUNKS, request.read_mask.paths)
    done = upserts.batch_upsert(session, KNOWLEDGE_CHUNKS, [r.knowledge_chunk for r in request.requests], call, read_mask=mask)
    answer = pb.BatchUpsertKnowledgeChunksResponse(
        results=[pb.UpsertKnowledgeChunkResponse(knowledge_chunk=d.message, created=d.created) for d in done],
        created_count=sum(d.created for d in done),
        replaced_count=sum(d.changed and not d.created for d in done),
        unchanged_count=sum(not d.changed for d in done),
    )
    paging.refuse_unread_answer(answer.ByteSize(), max_bytes, f"{len(done)} upserts; ask for fewer fields (read_mask) or send fewer per call")
    return answer


def delete_knowledge_chunks_by_source(
    session: Session, request: pb.DeleteKnowledgeChunksBySourceRequest, call: Call
) -> pb.DeleteKnowledgeChunksBySourceResponse:
    """The chunks of request.source (narrowed by request.filter) deleted for good, each audited
    (engine/cascade.delete_matching)."""
    if not request.source:
        raise errors.InvalidArgument.field("source", "is required: the source whose chunks go", reason="REQUIRED_FIELD")
    # As a chunk's source is checked: one no chunk can have is refused, not counted as none.
    source = load_fields(KNOWLEDGE_CHUNKS, request, ["source"], "")["source"]
    conditions = [KnowledgeChunk.source == source]
    narrowed = KNOWLEDGE_CHUNKS.filter_compiler(call.dialect).compile(request.filter)
    if narrowed is not None:
        conditions.append(narrowed)
    count = cascade.delete_matching(session, KNOWLEDGE_CHUNKS, conditions, request.validate_only)
    return pb.DeleteKnowledgeChunksBySourceResponse(deleted_count=count)
