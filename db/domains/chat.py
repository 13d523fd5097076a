"""Chat domain: channels, their messages, AI conversations and their messages (all streamed)."""
from __future__ import annotations

import uuid
from typing import Any
from collections.abc import Callable, Iterable

from nexus.chat.v1 import chat_pb2 as pb
from sqlalchemy import (
    Boolean,
    ForeignKey,
    Index,
    String,
    Text,
    Uuid,
    or_,
    select,
)
from sqlalchemy.engine import Row
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship
from sqlalchemy.sql.elements import ColumnElement

from db import errors
from db.base import Base, ResourceMixin, SoftDeleteMixin, json_list, json_object, link_table, one_of, optional_timestamp, short_text, utcnow
from db.domains.identity import ApiKey, User
from db.engine import events, reads, rules, writes, changes
from db.engine.call import Call
from db.engine.codecs import MessageListCodec, OutputCodec
from db.engine.filtering import FieldKind, FilterField
from db.engine.resource import REGISTRY, ListReference, ResourceSpec
from db.engine.rules import Access, Rule, is_caller, mine


# ---------------------------------------------------------------- tables

CONVERSATION_STATUSES = ("active", "archived")


SENDER_TYPES = ("user", "assistant", "system")


channel_members = link_table("channel_members", ("channel_id", "channels.id"), ("user_id", "users.id"))


class Channel(ResourceMixin, SoftDeleteMixin, Base):
    __tablename__ = "channels"
    __table_args__ = (Index("ix_channels_create_time_id", "create_time", "id"),)

    name: Mapped[short_text]
    description: Mapped[str | None] = mapped_column(Text)
    project_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("projects.id", ondelete="SET NULL"), index=True
    )
    is_private: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    creator_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))

    members: Mapped[list[User]] = relationship(secondary=channel_members, lazy="selectin", order_by="User.id")


class ChatMessage(ResourceMixin, SoftDeleteMixin, Base):
    __tablename__ = "chat_messages"
    __table_args__ = (
        Index("ix_chat_messages_create_time_id", "create_time", "id"),
        Index("ix_chat_messages_channel_id_create_time", "channel_id", "create_time"),
    )

    channel_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("channels.id", ondelete="CASCADE"), nullable=False)
    author_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    content: Mapped[str] = mapped_column(Text, nullable=False)
    # Replies keep pointing at a soft-deleted parent; a parent removed for good takes its replies.
    parent_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("chat_messages.id", ondelete="CASCADE"), index=True
    )
    attachments: Mapped[json_list]
    edited_time: Mapped[optional_timestamp]


class Conversation(ResourceMixin, Base):
    __tablename__ = "conversations"
    __table_args__ = (
        one_of("status", CONVERSATION_STATUSES),
        Index("ix_conversations_create_time_id", "create_time", "id"),
        Index("ix_conversations_user_id_status", "user_id", "status"),
    )

    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="active")


class ConversationMessage(ResourceMixin, Base):
    __tablename__ = "conversation_messages"
    __table_args__ = (
        one_of("sender_type", SENDER_TYPES),
        Index("ix_conversation_messages_create_time_id", "create_time", "id"),
        Index("ix_conversation_messages_conversation_id_create_time", "conversation_id", "create_time"),
    )

    conversation_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
    )
    sender_type: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    role_metadata: Mapped[json_object]


# ---------------------------------------------------------------- row rules

def _channel_read(user_id: uuid.UUID | None, role: str) -> ColumnElement[bool]:
    """Public channels, and for a caller with a user those it created or is a member of."""
    if user_id is None:
        return Channel.is_private.is_(False)
    member = select(channel_members.c.channel_id).where(channel_members.c.user_id == user_id)
    return or_(Channel.is_private.is_(False), Channel.creator_id == user_id, Channel.id.in_(member))


def _visible_channels(user_id: uuid.UUID | None) -> Any:
    return select(Channel.id).where(_channel_read(user_id, ""))


def _own_conversations(user_id: uuid.UUID | None) -> Any:
    return select(Conversation.id).where(is_caller(Conversation.user_id, user_id))


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
        # member_ids:"<user id>": the channels a user is a member of (ix_channel_members_user_id).
        extra_filters={"member_ids": FilterField(
            FieldKind.RELATED_IDS, Channel.__table__.c.id, link=(channel_members.c.channel_id, channel_members.c.user_id),
        )},
        search_fields=(("name", "A"), ("description", "B")),
        owner_field="creator_id",
        stream_scope=lambda r: channel_scope(r.id),
        access=Access(read=Rule(_channel_read, "public ones, and those they created or belong to"), manage=mine(Channel.creator_id, "those they created")),
        stream_kind="channels",
        changes_stream_access=True,
    )
)


def _chat_message_rules(session: Session, row: ChatMessage, changed: set[str], creating: bool, call: Call) -> None:
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
        list_references={"attachments": ListReference("File", key="file_id")},
        extra_codecs={"attachments": MessageListCodec("attachments", "attachments", pb.Attachment)},
        orderable=("create_time", "update_time"),
        search_fields=(("content", "A"),),
        before_write=_chat_message_rules,
        owner_field="author_id",
        stream_scope=lambda r: channel_scope(r.channel_id),
        access=Access(
            read=Rule(lambda u, r: ChatMessage.channel_id.in_(_visible_channels(u)), "those in channels they see"),
            manage=Rule(lambda u, r: is_caller(ChatMessage.author_id, u) & ChatMessage.channel_id.in_(_visible_channels(u)), "their own, in channels they see"),
        ),
    )
)


def _conversation_rules(session: Session, row: Conversation, changed: set[str], creating: bool, call: Call) -> None:
    """A conversation without a user (a system's or an anonymous one) is made by admins only:
    the only callers who see it afterwards (the row rules below never match a NULL owner)."""
    if creating and row.user_id is None and call.role != "admin":
        raise errors.PermissionDenied(
            "the caller acts for no user: only an admin makes a conversation without a user",
            reason="NO_USER_TO_OWN",
            metadata={"field": "conversation.user_id", "resource_type": "Conversation"},
        )


# Conversations of a user are that user's; those without a user (user_id NULL: a system's or
# an anonymous visitor's) are nobody's: only admins see and change them, on every way to them
# and to their messages, because `mine` never matches a NULL owner (rules.is_caller).
CONVERSATIONS = REGISTRY.add(
    ResourceSpec(
        name="Conversation",
        plural="Conversations",
        model=Conversation,
        message=pb.Conversation,
        singular_field="conversation",
        immutable=frozenset({"user_id"}),
        references={"user_id": "User"},
        orderable=("create_time", "update_time", "title"),
        search_fields=(("title", "A"),),
        before_write=_conversation_rules,
        owner_field="user_id",
        stream_scope=lambda r: conversation_scope(r.id),
        access=Access(
            read=mine(Conversation.user_id, "their own (those without a user: admins only)"),
            manage=mine(Conversation.user_id, "their own (those without a user: admins only)"),
        ),
        stream_kind="conversations",
    )
)


def _conversation_message_rules(
    session: Session, row: ConversationMessage, changed: set[str], creating: bool, call: Call
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
        access=Access(
            read=Rule(lambda u, r: ConversationMessage.conversation_id.in_(_own_conversations(u)), "those of their own conversations"),
            manage=Rule(lambda u, r: ConversationMessage.conversation_id.in_(_own_conversations(u)), "those of their own conversations"),
        ),
    )
)


# ---------------------------------------------------------------- custom methods


def add_channel_member(session: Session, request: pb.AddChannelMemberRequest) -> pb.Channel:
    return writes.change_membership(session, CHANNELS, request.channel_id, request.user_id, add=True, parent_field="channel_id")


def remove_channel_member(session: Session, request: pb.RemoveChannelMemberRequest) -> pb.Channel:
    return writes.change_membership(session, CHANNELS, request.channel_id, request.user_id, add=False, parent_field="channel_id")


def archive_conversation(session: Session, request: pb.ArchiveConversationRequest) -> pb.Conversation:
    row = reads.fetch(session, CONVERSATIONS, request.id, lock=True)
    if row.status == "archived":
        return CONVERSATIONS.to_proto(row)
    row.status = "archived"
    changes.flush(session)
    return events.publish(session, CONVERSATIONS, row, events.UPDATED, CONVERSATIONS.to_proto(row))


MAX_STREAM_SCOPES = 1000


def _scope_ids(session: Session, spec: ResourceSpec, raw_ids: list[str], field_name: str, scope_of: Callable[[uuid.UUID], str]) -> list[str]:
    return [scope_of(reads.visible_id(session, spec, raw, f"{field_name}[{i}]")) for i, raw in enumerate(raw_ids)]


def _resumed_scope(session: Session, scope: str) -> str:
    kind, _, raw_id = scope.partition("/")
    spec = _scope_kinds().get(kind)
    if spec is None:
        raise errors.InvalidArgument.field("resume_token", "is not a resume token this service issued", reason="INVALID_RESUME_TOKEN")
    row_id = reads.visible_id(session, spec, raw_id, "resume_token")
    if f"{kind}/{row_id}" != scope:  # the id as this service writes it, or events never match
        raise errors.InvalidArgument.field("resume_token", "is not a resume token this service issued", reason="INVALID_RESUME_TOKEN")
    return scope


def stream_positions(session: Session, request: pb.StreamEventsRequest) -> dict[str, int]:
    """Where a new stream starts in each scope: after its resume token, or at the current end."""
    from db.engine.events import decode_token, last_sequences

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
    """The resources whose rows are streams, by their kind of scope (ResourceSpec.stream_kind)."""
    return {spec.stream_kind: spec for spec in REGISTRY if spec.stream_kind}


def current_credential(
    session: Session, actor_type: str, actor_id: uuid.UUID | None, user_id: uuid.UUID | None, role: str
) -> tuple[str, uuid.UUID | None]:
    """(the role, the user) an open stream's caller acts with now, read afresh: a revoked or
    expired key or an inactive user raises UNAUTHENTICATED, as a new call would get; an API key's
    own role replaces `role` (the caller's as authenticated, a JWT's), and no credential acts
    above its user's current role."""
    if actor_type == "system":
        return role, user_id
    owner = select(User.is_active, User.delete_time, User.role.label("user_role"))
    acting: Row[*tuple[Any, ...]] | None  # the user's columns (owner's), and the key's for a key
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
    if user_id is not None:
        if acting is None or not acting.is_active or acting.delete_time is not None:
            raise errors.Unauthenticated("the credentials act for a user who is not active", reason="INVALID_CREDENTIALS")
        if rules.ROLE_RANK[acting.user_role] < rules.ROLE_RANK[role]:
            role = acting.user_role  # a credential acts with at most its user's current role
    return role, user_id


def stream_access(
    session: Session, actor_type: str, actor_id: uuid.UUID | None, user_id: uuid.UUID | None, role: str, scopes: Iterable[str]
) -> dict[str, errors.NexusError]:
    """An open stream's right to go on, read afresh: the scopes its caller may no longer see,
    each with the error that ends a stream of it (empty: all still visible).

    The credential is re-read too (an API key's row and role, the user it acts for): a revoked
    or expired key or an inactive user raises UNAUTHENTICATED, as a new call would get. `role`
    is the caller's role as authenticated (a JWT's); an API key's own role replaces it. One
    query for the credential (with its user) and one per kind of scope, whatever their number."""
    role, user_id = current_credential(session, actor_type, actor_id, user_id, role)
    by_kind: dict[str, dict[uuid.UUID, str]] = {}
    for scope in scopes:
        kind, _, raw_id = scope.partition("/")
        by_kind.setdefault(kind, {})[uuid.UUID(raw_id)] = scope
    denied: dict[str, errors.NexusError] = {}
    for kind, ids in by_kind.items():
        spec = _scope_kinds()[kind]
        allowed = rules.read_predicate(spec, role, user_id)
        if allowed is None:
            continue
        # Only rows that are there and hidden end a stream: a deleted one (soft or for good)
        # has its last event, the deletion, delivered.
        rows = session.execute(select(spec.table.c.id, allowed).where(spec.table.c.id.in_(list(ids)))).all()
        denied.update({ids[row_id]: rules.denied(spec, str(row_id), False) for row_id, visible in rows if not visible})
    return denied
