"""nexus.knowledge.v1.KnowledgeService: knowledge chunks for retrieval; documents, their versions and shares."""
from __future__ import annotations

from typing import Any

import grpc
from nexus.knowledge.v1 import knowledge_pb2 as pb
from nexus.knowledge.v1 import knowledge_pb2_grpc

from db.domains import documents, knowledge
from db.unit import SESSION_READ
from service.rpc import DomainServicer


class KnowledgeService(DomainServicer, knowledge_pb2_grpc.KnowledgeServiceServicer):
    resources = (knowledge.KNOWLEDGE_CHUNKS, documents.DOCUMENTS)
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

    async def ListDocumentVersions(self, request: pb.ListDocumentVersionsRequest, context: grpc.aio.ServicerContext) -> Any:
        call = self.run.call(context)
        work = lambda s: documents.list_document_versions(s, request, call, self.run.page_bytes, self.run.count_limit)  # noqa: E731
        return await self.run(context, work, SESSION_READ, resource_type="DocumentVersion")

    async def GetDocumentVersion(self, request: pb.GetDocumentVersionRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self.run(context, lambda s: documents.get_document_version(s, request), SESSION_READ, resource_type="DocumentVersion")

    async def RestoreDocumentVersion(self, request: pb.RestoreDocumentVersionRequest, context: grpc.aio.ServicerContext) -> Any:
        call = self.run.call(context)
        return await self.run(context, lambda s: documents.restore_document_version(s, request, call), resource_type="Document")

    async def ShareDocument(self, request: pb.ShareDocumentRequest, context: grpc.aio.ServicerContext) -> Any:
        call = self.run.call(context)
        return await self.run(context, lambda s: documents.share_document(s, request, call), resource_type="DocumentShare")

    async def UnshareDocument(self, request: pb.UnshareDocumentRequest, context: grpc.aio.ServicerContext) -> Any:
        return await self.run(context, lambda s: documents.unshare_document(s, request), resource_type="DocumentShare")

    async def ListDocumentShares(self, request: pb.ListDocumentSharesRequest, context: grpc.aio.ServicerContext) -> Any:
        call = self.run.call(context)
        work = lambda s: documents.list_document_shares(s, request, call, self.run.page_bytes, self.run.count_limit)  # noqa: E731
        return await self.run(context, work, SESSION_READ, resource_type="DocumentShare")
