"""nexus.chat.v1.ChatService: standard methods from the engine, membership, archive, live events."""
from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from nexus.chat.v1 import chat_pb2 as pb
from nexus.chat.v1 import chat_pb2_grpc

from db import errors
from db.domains import chat
from db.unit import SESSION_READ
from service import streams
from service.rpc import DomainServicer

MAX_HEARTBEAT_SECONDS = 300


class ChatService(DomainServicer, chat_pb2_grpc.ChatServiceServicer):
    resources = (chat.CHANNELS, chat.CHAT_MESSAGES, chat.CONVERSATIONS, chat.CONVERSATION_MESSAGES)
    service_descriptor = pb.DESCRIPTOR.services_by_name["ChatService"]

    async def AddChannelMember(self, request: pb.AddChannelMemberRequest, context: grpc.aio.ServicerContext) -> pb.Channel:
        return await self.run(context, lambda s: chat.add_channel_member(s, request), resource_type="Channel")

    async def RemoveChannelMember(self, request: pb.RemoveChannelMemberRequest, context: grpc.aio.ServicerContext) -> pb.Channel:
        return await self.run(context, lambda s: chat.remove_channel_member(s, request), resource_type="Channel")

    async def ArchiveConversation(
        self, request: pb.ArchiveConversationRequest, context: grpc.aio.ServicerContext
    ) -> pb.Conversation:
        return await self.run(context, lambda s: chat.archive_conversation(s, request), resource_type="Conversation")

    # Yields messages serialized already (service/streams.py, Offered), which the generated
    # servicer's type leaves out: the stream's serializer passes bytes through
    # (service/interceptors.py, _bytes_or).
    async def StreamEvents(  # type: ignore[override]
        self, request: pb.StreamEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamEventsResponse | bytes]:
        heartbeat = request.heartbeat_seconds
        if heartbeat < 0 or heartbeat > MAX_HEARTBEAT_SECONDS:
            raise errors.InvalidArgument.field("heartbeat_seconds", f"must be 0 (default) to {MAX_HEARTBEAT_SECONDS}")
        assert self.hub is not None
        authorization = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), None)
        caller = streams.Caller.of(self.run.call(context), authorization if isinstance(authorization, str) else None)
        checked_at = self.hub.clock  # a change of rights after this is re-checked before any event
        positions = await self.run(context, lambda s: chat.stream_positions(s, request), SESSION_READ)
        heartbeat_seconds = heartbeat or self.hub.settings.default_heartbeat_seconds
        async for response in streams.stream(self.hub, self.run.db, positions, heartbeat_seconds, caller, checked_at):
            yield response
