"""SQLAlchemy models of every table the service owns."""
from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    Float,
    ForeignKey,
    Index,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
    Uuid,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from db.base import (
    Base,
    ExactDecimal,
    ResourceMixin,
    SoftDeleteMixin,
    UTCDateTime,
    json_list,
    json_object,
    optional_timestamp,
    short_text,
    timestamp,
    utcnow,
    uuid7,
)

USER_ROLES = ("admin", "manager", "user", "guest")
PROJECT_STATUSES = ("planning", "active", "on_hold", "completed", "cancelled")
PRIORITIES = ("low", "medium", "high", "critical")
TASK_STATUSES = ("todo", "in_progress", "review", "done", "blocked")


def _one_of(column: str, values: tuple[str, ...]) -> CheckConstraint:
    listed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({listed})", name=f"{column}_valid")


user_roles = Table(
    "user_roles",
    Base.metadata,
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("role_id", Uuid, ForeignKey("roles.id", ondelete="CASCADE"), primary_key=True),
    Column("create_time", UTCDateTime, nullable=False, default=utcnow),
    Index("ix_user_roles_role_id", "role_id"),
)

project_members = Table(
    "project_members",
    Base.metadata,
    Column("project_id", Uuid, ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("create_time", UTCDateTime, nullable=False, default=utcnow),
    Index("ix_project_members_user_id", "user_id"),
)

task_dependencies = Table(
    "task_dependencies",
    Base.metadata,
    Column("task_id", Uuid, ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True),
    Column("depends_on_id", Uuid, ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True),
    Column("create_time", UTCDateTime, nullable=False, default=utcnow),
    Index("ix_task_dependencies_depends_on_id", "depends_on_id"),
    CheckConstraint("task_id <> depends_on_id", name="not_self"),
)


class User(ResourceMixin, SoftDeleteMixin, Base):
    __tablename__ = "users"
    __table_args__ = (
        _one_of("role", USER_ROLES),
        Index("ix_users_create_time_id", "create_time", "id"),
    )

    username: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    email: Mapped[str] = mapped_column(String(320), nullable=False, unique=True)
    external_id: Mapped[str | None] = mapped_column(String(255), nullable=True, unique=True)
    full_name: Mapped[str | None] = mapped_column(String(255))
    avatar_url: Mapped[str | None] = mapped_column(String(2048))
    role: Mapped[str] = mapped_column(String(16), nullable=False, default="user", index=True)
    is_active: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True)
    is_verified: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    preferences: Mapped[json_object]
    password_hash: Mapped[str | None] = mapped_column(String(255))
    last_login_time: Mapped[optional_timestamp]

    roles: Mapped[list[Role]] = relationship(secondary=user_roles, lazy="selectin", order_by="Role.name")


class Role(ResourceMixin, Base):
    __tablename__ = "roles"
    __table_args__ = (Index("ix_roles_create_time_id", "create_time", "id"),)

    name: Mapped[str] = mapped_column(String(64), nullable=False, unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    permissions: Mapped[json_list]


class ApiKey(ResourceMixin, Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        _one_of("role", USER_ROLES),
        Index("ix_api_keys_create_time_id", "create_time", "id"),
        # A name is unique among its user's keys (and among the keys of no user): a user who
        # sees only its own keys learns nothing of other names from ALREADY_EXISTS.
        Index("uq_api_keys_user_id_name", "user_id", "name", unique=True,
              postgresql_where=text("user_id IS NOT NULL"), sqlite_where=text("user_id IS NOT NULL")),
        Index("uq_api_keys_name_without_user", "name", unique=True,
              postgresql_where=text("user_id IS NULL"), sqlite_where=text("user_id IS NULL")),
    )

    name: Mapped[str] = mapped_column(String(128), nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False, default="user")
    user_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    key_prefix: Mapped[str] = mapped_column(String(16), nullable=False, unique=True)
    secret_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    expire_time: Mapped[optional_timestamp]
    revoke_time: Mapped[optional_timestamp]
    last_used_time: Mapped[optional_timestamp]


class Project(ResourceMixin, SoftDeleteMixin, Base):
    __tablename__ = "projects"
    __table_args__ = (
        _one_of("status", PROJECT_STATUSES),
        _one_of("priority", PRIORITIES),
        CheckConstraint("end_date IS NULL OR start_date IS NULL OR end_date >= start_date", name="dates_ordered"),
        Index("ix_projects_create_time_id", "create_time", "id"),
        Index("ix_projects_owner_id_status", "owner_id", "status"),
    )

    name: Mapped[short_text]
    description: Mapped[str | None] = mapped_column(Text)
    owner_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="RESTRICT"), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="planning", index=True)
    priority: Mapped[str] = mapped_column(String(16), nullable=False, default="medium", index=True)
    start_date: Mapped[dt.date | None] = mapped_column(Date)
    end_date: Mapped[dt.date | None] = mapped_column(Date)
    # Money as exact decimal plus its currency, never a float.
    budget_amount: Mapped[Decimal | None] = mapped_column(ExactDecimal())
    budget_currency: Mapped[str | None] = mapped_column(String(3))
    archived: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)

    members: Mapped[list[User]] = relationship(secondary=project_members, lazy="selectin", order_by="User.id")


class Task(ResourceMixin, SoftDeleteMixin, Base):
    __tablename__ = "tasks"
    __table_args__ = (
        _one_of("status", TASK_STATUSES),
        _one_of("priority", PRIORITIES),
        CheckConstraint("estimated_hours IS NULL OR estimated_hours >= 0", name="estimated_hours_non_negative"),
        CheckConstraint("actual_hours IS NULL OR actual_hours >= 0", name="actual_hours_non_negative"),
        Index("ix_tasks_create_time_id", "create_time", "id"),
        Index("ix_tasks_project_id_status", "project_id", "status"),
        # The common task page (migration 0004): live tasks of a project in a status, by creation.
        Index(
            "ix_tasks_live_project_status_create_time", "project_id", "status", "create_time", "id",
            postgresql_where=text("delete_time IS NULL"), sqlite_where=text("delete_time IS NULL"),
        ),
        Index("ix_tasks_assignee_id_status", "assignee_id", "status"),
        Index("ix_tasks_due_date", "due_date"),
    )

    project_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("projects.id", ondelete="CASCADE"), nullable=False)
    title: Mapped[short_text]
    description: Mapped[str | None] = mapped_column(Text)
    assignee_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))
    creator_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="todo", index=True)
    priority: Mapped[str] = mapped_column(String(16), nullable=False, default="medium", index=True)
    due_date: Mapped[dt.date | None] = mapped_column(Date)
    # 0 is "not set" in proto3 as well as zero hours: stored as 0, never NULL, so filters agree.
    estimated_hours: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    actual_hours: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    tags: Mapped[json_list]
    completed_time: Mapped[optional_timestamp]

    dependencies: Mapped[list[Task]] = relationship(
        secondary=task_dependencies,
        primaryjoin=lambda: Task.id == task_dependencies.c.task_id,
        secondaryjoin=lambda: Task.id == task_dependencies.c.depends_on_id,
        # Self-referential eager loads stop at depth 0 unless told: without join_depth every
        # task of a page lazy-loaded its dependencies with a query of its own (N+1).
        lazy="selectin",
        join_depth=1,
        order_by=lambda: Task.id,
    )


class RequestRecord(Base):
    """Remembers the resource a Create with a request_id made, so a retry returns it (AIP-155).

    A request id is the caller's own: `principal` (crud.request_principal) is part of the key."""

    __tablename__ = "request_records"
    __table_args__ = (UniqueConstraint("resource_type", "principal", "request_id"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    resource_type: Mapped[str] = mapped_column(String(64), nullable=False)
    principal: Mapped[str] = mapped_column(String(64), nullable=False, server_default="")
    request_id: Mapped[str] = mapped_column(String(128), nullable=False)
    resource_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    create_time: Mapped[timestamp] = mapped_column(default=utcnow, index=True)


# ---------------------------------------------------------------- chat and conversations

CONVERSATION_STATUSES = ("active", "archived")
SENDER_TYPES = ("user", "assistant", "system")

channel_members = Table(
    "channel_members",
    Base.metadata,
    Column("channel_id", Uuid, ForeignKey("channels.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", Uuid, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("create_time", UTCDateTime, nullable=False, default=utcnow),
    Index("ix_channel_members_user_id", "user_id"),
)


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
        _one_of("status", CONVERSATION_STATUSES),
        Index("ix_conversations_create_time_id", "create_time", "id"),
        Index("ix_conversations_user_id_status", "user_id", "status"),
    )

    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"))
    title: Mapped[str | None] = mapped_column(String(255))
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="active")


class ConversationMessage(ResourceMixin, Base):
    __tablename__ = "conversation_messages"
    __table_args__ = (
        _one_of("sender_type", SENDER_TYPES),
        Index("ix_conversation_messages_create_time_id", "create_time", "id"),
        Index("ix_conversation_messages_conversation_id_create_time", "conversation_id", "create_time"),
    )

    conversation_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False
    )
    sender_type: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    content: Mapped[str] = mapped_column(Text, nullable=False)
    role_metadata: Mapped[json_object]


# ---------------------------------------------------------------- the durable change log


class StreamScope(Base):
    """One row per channel or conversation that has events: its last sequence number.

    Writers bump last_seq with UPDATE ... RETURNING, which holds the row lock until commit, so
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


# ---------------------------------------------------------------- security

ACTOR_TYPES = ("user", "api_key", "system")
AUDIT_ACTIONS = ("create", "update", "delete", "undelete")


class AuditLogEntry(Base):
    """A change to a resource, written by the service in the same transaction as the change."""

    __tablename__ = "audit_log_entries"
    __table_args__ = (
        _one_of("actor_type", ACTOR_TYPES),
        _one_of("action", AUDIT_ACTIONS),
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
