"""nexus.knowledge.v1.KnowledgeService: knowledge chunks for retrieval."""
from __future__ import annotations

from typing import Any

import grpc
from nexus.knowledge.v1 import knowledge_pb2 as pb
from nexus.knowledge.v1 import knowledge_pb2_grpc

from db.domains import knowledge
from service.rpc import DomainServicer


class KnowledgeService(DomainServicer, knowledge_pb2_grpc.KnowledgeServiceServicer):
    resources = (knowledge.KNOWLEDGE_CHUNKS,)
    service_descriptor = pb.DESCRIPTOR.services_by_name["KnowledgeService"]

    async def UpsertKnowledgeChunk(self, request: pb.UpsertKnowledgeChunkRequest, context: grpc.aio.ServicerContext) -> Any:
        call = self.run.call(context)
        return await self.run(context, lambda s: knowledge.upsert_knowledge_chunk(s, request, call), resource_type="KnowledgeChunk")

    async def BatchUpsertKnowledgeChunks(self, request: pb.BatchUpsertKnowledgeChunksRequest, context: grpc.aio.ServicerContext) -> Any:
        call = self.run.call(context)
        page_bytes = self.run.page_bytes
        return await self.run(context, lambda s: knowledge.batch_upsert_knowledge_chunks(s, request, call, page_bytes), resource_type="KnowledgeChunk")

    async def DeleteKnowledgeChunksBySource(self, request: pb.DeleteKnowledgeChunksBySourceRequest, context: grpc.aio.ServicerContext) -> Any:
        call = self.run.call(context)
        return await self.run(context, lambda s: knowledge.delete_knowledge_chunks_by_source(s, request, call), resource_type="KnowledgeChunk")
