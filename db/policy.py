"""Who may see and change which rows: one declarative table, applied by the generic engine.

Roles rank guest < user < manager < admin. Admin sees and manages everything. For the others each
resource declares two SQL predicates over its table, built for the calling user:

- `read`:   rows the caller may see (List and Search filter by it; Get of any other id is
            PERMISSION_DENIED, checked before existence, so ids of hidden rows do not leak);
- `manage`: rows the caller may create, change or delete (checked on the row before a change
            and on the row after it, so nobody can move a row out of their own reach).

None means "every row". Which RPCs a role may call at all is service/policy.py's table.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import false, or_, select, true
from sqlalchemy.sql.elements import ColumnElement

from db.models import (
    ApiKey,
    Channel,
    ChatMessage,
    Conversation,
    ConversationMessage,
    Project,
    Task,
    User,
    channel_members,
    project_members,
)

ROLE_RANK = {"guest": 0, "user": 1, "manager": 2, "admin": 3}
Predicate = Callable[[uuid.UUID | None, str], ColumnElement[bool] | None]


def _everyone(user_id: uuid.UUID | None, role: str) -> None:
    return None


def _nobody(user_id: uuid.UUID | None, role: str) -> ColumnElement[bool]:
    return false()


def _is_caller(column: Any, user_id: uuid.UUID | None) -> ColumnElement[bool]:
    """column holds the calling user. Never true for a caller without a user (a key made
    without one): `column == None` would render IS NULL and match every row whose owner is
    unset or was hard-deleted."""
    return column == user_id if user_id is not None else false()


def _mine(column: Any) -> Predicate:
    def predicate(user_id: uuid.UUID | None, role: str) -> ColumnElement[bool]:
        return _is_caller(column, user_id)

    return predicate


def projects_of(user_id: uuid.UUID | None) -> Any:
    """Ids of the projects a user owns or is a member of (none for a caller without a user)."""
    owned = select(Project.id).where(_is_caller(Project.owner_id, user_id))
    member = select(project_members.c.project_id).where(_is_caller(project_members.c.user_id, user_id))
    return owned.union(member)


def _channel_read(user_id: uuid.UUID | None, role: str) -> ColumnElement[bool]:
    """Public channels, and for a caller with a user those it created or is a member of."""
    if user_id is None:
        return Channel.is_private.is_(False)
    member = select(channel_members.c.channel_id).where(channel_members.c.user_id == user_id)
    return or_(Channel.is_private.is_(False), Channel.creator_id == user_id, Channel.id.in_(member))


def _visible_channels(user_id: uuid.UUID | None) -> Any:
    return select(Channel.id).where(_channel_read(user_id, ""))


def _project_manage(user_id: uuid.UUID | None, role: str) -> ColumnElement[bool]:
    if role != "manager" or user_id is None:
        return false()
    return Project.id.in_(projects_of(user_id))


def _task_manage(user_id: uuid.UUID | None, role: str) -> ColumnElement[bool]:
    if user_id is None:
        return false()
    own = or_(_is_caller(Task.assignee_id, user_id), _is_caller(Task.creator_id, user_id))
    if role == "manager":
        return or_(own, Task.project_id.in_(projects_of(user_id)))
    return own


def _own_conversations(user_id: uuid.UUID | None) -> Any:
    return select(Conversation.id).where(_is_caller(Conversation.user_id, user_id))


@dataclass(frozen=True)
class Access:
    read: Predicate = _everyone
    manage: Predicate = _nobody


# The policy table. A resource missing here is readable by everyone and managed by admins only.
POLICY: dict[str, Access] = {
    "User": Access(manage=_mine(User.id)),  # change yourself; creating users is for admins
    "Role": Access(),
    "ApiKey": Access(read=_mine(ApiKey.user_id), manage=_mine(ApiKey.user_id)),
    "Project": Access(manage=_project_manage),
    "Task": Access(manage=_task_manage),
    "Channel": Access(read=_channel_read, manage=_mine(Channel.creator_id)),
    "ChatMessage": Access(
        read=lambda u, r: ChatMessage.channel_id.in_(_visible_channels(u)),
        manage=lambda u, r: _is_caller(ChatMessage.author_id, u) & ChatMessage.channel_id.in_(_visible_channels(u)),
    ),
    "Conversation": Access(read=_mine(Conversation.user_id), manage=_mine(Conversation.user_id)),
    "ConversationMessage": Access(
        read=lambda u, r: ConversationMessage.conversation_id.in_(_own_conversations(u)),
        manage=lambda u, r: ConversationMessage.conversation_id.in_(_own_conversations(u)),
    ),
    "AuditLogEntry": Access(read=_nobody),
}

# Fields only an admin may set, whoever may otherwise change the row.
ADMIN_ONLY_FIELDS: dict[str, frozenset[str]] = {
    "User": frozenset({"role", "is_active", "external_id"}),
    "ApiKey": frozenset({"user_id"}),  # its role: at most the caller's (db/identity.py)
}


def read_predicate(resource: str, role: str, user_id: uuid.UUID | None) -> ColumnElement[bool] | None:
    """None when the caller sees every row of the resource."""
    if role == "admin":
        return None
    return POLICY.get(resource, Access()).read(user_id, role)


def manage_predicate(resource: str, role: str, user_id: uuid.UUID | None) -> ColumnElement[bool] | None:
    """None when the caller may change every row of the resource."""
    if role == "admin":
        return None
    if role == "guest":
        return false()
    predicate = POLICY.get(resource, Access()).manage(user_id, role)
    return true() if predicate is None else predicate
