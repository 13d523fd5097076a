"""Chat domain: channels, their messages, AI conversations and their messages (all streamed)."""
from __future__ import annotations

import uuid
from collections.abc import Iterable

from nexus.chat.v1 import chat_pb2 as pb
from sqlalchemy import select
from sqlalchemy.orm import Session

from db import crud, errors, events, policy
from db.base import utcnow
from db.codecs import MessageListCodec, OutputCodec
from db.models import ApiKey, Channel, ChatMessage, Conversation, ConversationMessage, User
from db.resource import REGISTRY, ResourceSpec


def channel_scope(channel_id: object) -> str:
    return f"channels/{channel_id}"


def conversation_scope(conversation_id: object) -> str:
    return f"conversations/{conversation_id}"


CHANNELS = REGISTRY.add(
    ResourceSpec(
        name="Channel",
        plural="Channels",
        model=Channel,
        message=pb.Channel,
        singular_field="channel",
        relation_fields={"members": ("member_ids", lambda u: str(u.id))},
        immutable=frozenset({"creator_id"}),
        required=frozenset({"name"}),
        references={"project_id": "Project", "creator_id": "User"},
        extra_codecs={"member_ids": OutputCodec("member_ids", lambda r: sorted(str(u.id) for u in r.members), repeated=True)},
        orderable=("create_time", "update_time", "name"),
        search_fields=(("name", "A"), ("description", "B")),
        owner_field="creator_id",
        stream_scope=lambda r: channel_scope(r.id),
    )
)


def _chat_message_rules(session: Session, row: ChatMessage, changed: set[str], creating: bool, call: crud.Call) -> None:
    if creating:
        if row.parent_id is not None:
            parent = session.get(ChatMessage, row.parent_id)
            if parent is not None and parent.channel_id != row.channel_id:
                raise errors.FailedPrecondition(
                    "a reply must be in the same channel as its parent", reason="PARENT_IN_OTHER_CHANNEL",
                    metadata={"field": "chat_message.parent_id"},
                )
    elif changed & {"content", "attachments"}:
        row.edited_time = utcnow()


CHAT_MESSAGES = REGISTRY.add(
    ResourceSpec(
        name="ChatMessage",
        plural="ChatMessages",
        model=ChatMessage,
        message=pb.ChatMessage,
        singular_field="chat_message",
        output_only=frozenset({"edited_time"}),
        immutable=frozenset({"channel_id", "author_id", "parent_id"}),
        required=frozenset({"channel_id", "content"}),
        references={"channel_id": "Channel", "author_id": "User", "parent_id": "ChatMessage"},
        extra_codecs={"attachments": MessageListCodec("attachments", "attachments", pb.Attachment)},
        orderable=("create_time", "update_time"),
        search_fields=(("content", "A"),),
        before_write=_chat_message_rules,
        owner_field="author_id",
        stream_scope=lambda r: channel_scope(r.channel_id),
    )
)


CONVERSATIONS = REGISTRY.add(
    ResourceSpec(
        name="Conversation",
        plural="Conversations",
        model=Conversation,
        message=pb.Conversation,
        singular_field="conversation",
        immutable=frozenset({"user_id"}),
        required=frozenset({"user_id"}),
        references={"user_id": "User"},
        orderable=("create_time", "update_time", "title"),
        search_fields=(("title", "A"),),
        owner_field="user_id",
        stream_scope=lambda r: conversation_scope(r.id),
    )
)


def _conversation_message_rules(
    session: Session, row: ConversationMessage, changed: set[str], creating: bool, call: crud.Call
) -> None:
    if not creating:
        return
    # A share lock: a concurrent ArchiveConversation (FOR UPDATE) waits until this message commits.
    conversation = session.get(Conversation, row.conversation_id, with_for_update={"read": True})
    if conversation is not None and conversation.status == "archived":
        raise errors.FailedPrecondition(
            "the conversation is archived; start a new one", reason="CONVERSATION_ARCHIVED",
            metadata={"conversation_id": str(row.conversation_id)},
        )


CONVERSATION_MESSAGES = REGISTRY.add(
    ResourceSpec(
        name="ConversationMessage",
        plural="ConversationMessages",
        model=ConversationMessage,
        message=pb.ConversationMessage,
        singular_field="conversation_message",
        immutable=frozenset({"conversation_id"}),
        required=frozenset({"conversation_id", "sender_type", "content"}),
        references={"conversation_id": "Conversation"},
        orderable=("create_time", "update_time"),
        search_fields=(("content", "A"),),
        before_write=_conversation_message_rules,
        stream_scope=lambda r: conversation_scope(r.conversation_id),
    )
)


# ---------------------------------------------------------------- custom methods


def add_channel_member(session: Session, request: pb.AddChannelMemberRequest) -> pb.Channel:
    return crud.change_membership(session, CHANNELS, request.channel_id, request.user_id, add=True, parent_field="channel_id")


def remove_channel_member(session: Session, request: pb.RemoveChannelMemberRequest) -> pb.Channel:
    return crud.change_membership(session, CHANNELS, request.channel_id, request.user_id, add=False, parent_field="channel_id")


def archive_conversation(session: Session, request: pb.ArchiveConversationRequest) -> pb.Conversation:
    row = crud.fetch(session, CONVERSATIONS, request.id, lock=True)
    if row.status == "archived":
        return CONVERSATIONS.to_proto(row)
    row.status = "archived"
    session.flush()
    return crud.publish(session, CONVERSATIONS, row, events.UPDATED, CONVERSATIONS.to_proto(row))


MAX_STREAM_SCOPES = 1000


def _scope_ids(session: Session, spec: ResourceSpec, raw_ids: list[str], field_name: str, scope_of: object) -> list[str]:
    return [scope_of(crud.visible_id(session, spec, raw, f"{field_name}[{i}]")) for i, raw in enumerate(raw_ids)]  # type: ignore[operator]


def _resumed_scope(session: Session, scope: str) -> str:
    kind, _, raw_id = scope.partition("/")
    spec = _scope_kinds().get(kind)
    if spec is None:
        raise errors.InvalidArgument.field("resume_token", "is not a resume token this service issued", reason="INVALID_RESUME_TOKEN")
    row_id = crud.visible_id(session, spec, raw_id, "resume_token")
    if f"{kind}/{row_id}" != scope:  # the id as this service writes it, or events never match
        raise errors.InvalidArgument.field("resume_token", "is not a resume token this service issued", reason="INVALID_RESUME_TOKEN")
    return scope


def stream_positions(session: Session, request: pb.StreamEventsRequest) -> dict[str, int]:
    """Where a new stream starts in each scope: after its resume token, or at the current end."""
    from db.events import decode_token, last_sequences

    if len(request.channel_ids) + len(request.conversation_ids) > MAX_STREAM_SCOPES:
        raise errors.InvalidArgument.field("channel_ids", f"at most {MAX_STREAM_SCOPES} channels and conversations per stream")
    scopes = _scope_ids(session, CHANNELS, list(request.channel_ids), "channel_ids", channel_scope)
    scopes += _scope_ids(session, CONVERSATIONS, list(request.conversation_ids), "conversation_ids", conversation_scope)
    resumed = decode_token(request.resume_token) if request.resume_token else {}
    if not scopes:
        # A token is checksummed, not signed: its scopes pass the same checks as named ids.
        if len(resumed) > MAX_STREAM_SCOPES:
            raise errors.InvalidArgument.field("resume_token", f"follows more than {MAX_STREAM_SCOPES} channels and conversations", reason="INVALID_RESUME_TOKEN")
        scopes = [_resumed_scope(session, scope) for scope in resumed]
    if not scopes:
        raise errors.InvalidArgument.field("channel_ids", "name at least one channel or conversation (or a resume_token)", reason="REQUIRED_FIELD")
    current = last_sequences(session, scopes)
    positions: dict[str, int] = {}
    for scope in dict.fromkeys(scopes):
        last, purged = current[scope]
        if scope not in resumed:
            positions[scope] = last
            continue
        position = resumed[scope]
        if position > last:
            raise errors.InvalidArgument.field("resume_token", f"is ahead of the log of {scope}: it was issued by another database")
        if position < purged:
            raise errors.FailedPrecondition(
                f"the resume token is older than the event retention of {scope}: reload its state and subscribe again without a token",
                reason="RESUME_TOKEN_EXPIRED",
                metadata={"scope": scope, "oldest_available": str(purged + 1)},
            )
        positions[scope] = position
    return positions


def _scope_kinds() -> dict[str, ResourceSpec]:
    return {"channels": CHANNELS, "conversations": CONVERSATIONS}


def stream_access(
    session: Session, actor_type: str, actor_id: uuid.UUID | None, user_id: uuid.UUID | None, role: str, scopes: Iterable[str]
) -> dict[str, errors.NexusError]:
    """An open stream's right to go on, read afresh: the scopes its caller may no longer see,
    each with the error that ends a stream of it (empty: all still visible).

    The credential is re-read too (an API key's row and role, the user it acts for): a revoked
    or expired key or an inactive user raises UNAUTHENTICATED, as a new call would get. `role`
    is the caller's role as authenticated (a JWT's); an API key's own role replaces it. One
    query for the credential (with its user) and one per kind of scope, whatever their number."""
    if actor_type == "system":
        return {}
    owner = select(User.is_active, User.delete_time, User.role.label("user_role"))
    if actor_type == "api_key":  # the key and the user it acts for, in one query
        key = session.execute(
            owner.add_columns(ApiKey.revoke_time, ApiKey.expire_time, ApiKey.role, ApiKey.user_id)
            .select_from(ApiKey)
            .outerjoin(User, User.id == ApiKey.user_id)
            .where(ApiKey.id == actor_id)
        ).one_or_none()
        if key is None or key.revoke_time is not None:
            raise errors.Unauthenticated("the API key was revoked", reason="INVALID_CREDENTIALS")
        if key.expire_time is not None and key.expire_time <= utcnow():
            raise errors.Unauthenticated("the credentials have expired", reason="EXPIRED_CREDENTIALS")
        role, user_id, acting = key.role, key.user_id, key
    else:
        acting = session.execute(owner.where(User.id == user_id)).one_or_none() if user_id is not None else None
    if user_id is not None and (acting is None or not acting.is_active or acting.delete_time is not None):
        raise errors.Unauthenticated("the credentials act for a user who is not active", reason="INVALID_CREDENTIALS")
    if user_id is not None and policy.ROLE_RANK[acting.user_role] < policy.ROLE_RANK[role]:
        role = acting.user_role  # a credential acts with at most its user's current role
    by_kind: dict[str, dict[uuid.UUID, str]] = {}
    for scope in scopes:
        kind, _, raw_id = scope.partition("/")
        by_kind.setdefault(kind, {})[uuid.UUID(raw_id)] = scope
    denied: dict[str, errors.NexusError] = {}
    for kind, ids in by_kind.items():
        spec = _scope_kinds()[kind]
        allowed = policy.read_predicate(spec.name, role, user_id)
        if allowed is None:
            continue
        # Only rows that are there and hidden end a stream: a deleted one (soft or for good)
        # has its last event, the deletion, delivered.
        rows = session.execute(select(spec.table.c.id, allowed).where(spec.table.c.id.in_(list(ids)))).all()
        denied.update({ids[row_id]: crud.denied(spec, str(row_id), False) for row_id, visible in rows if not visible})
    return denied
