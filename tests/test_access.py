"""Authentication and access control, end to end, on SQLite and on PostgreSQL.

Who may call which RPC (service/policy.py), which rows each role sees and manages (each resource's `access`, db/engine/rules.py,
db/writes.py), the credentials that prove who calls (API keys, JWTs, bootstrap key, --insecure-dev,
TLS and mTLS), request ids in errors and audit entries, the concurrency limit, and a scan of
every response and log line for passwords, hashes and API key secrets.

Tests that check a row rule set owner fields (creator_id, author_id, user_id, owner_id)
explicitly, so they test the rule alone; the `*_defaults_*` tests check that an owner field left
unset becomes the caller.
"""
from __future__ import annotations

import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import logging
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from google.protobuf import timestamp_pb2
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.chat.v1 import chat_pb2_grpc
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.identity.v1 import identity_pb2_grpc
from nexus.security.v1 import security_pb2 as spb
from nexus.security.v1 import security_pb2_grpc
from nexus.work.v1 import work_pb2 as wpb
from nexus.work.v1 import work_pb2_grpc
from sqlalchemy import update

from db.database import Database
from db.domains.identity import ApiKey
from db.engine import events
from tests.conftest import Client, ServerThread, connect, make_config, unique
from tests.databases import fresh_postgres_database
from tests.support import expect_error, mask, new_user, rich_error

Code = grpc.StatusCode
ROOT = Path(__file__).resolve().parent.parent
NEXUS_DATA = Path(sys.executable).parent / "nexus-data"
TIMEOUT = 15.0


def random_id() -> str:
    return str(uuid.uuid4())


def future(days: int = 30) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(days=days))
    return ts


# ------------------------------------------------------------------ callers of other roles


@dataclass
class Actor:
    """A user with its own API key (acting for it, with its role) and a client calling with it."""

    user: ipb.User
    key: ipb.ApiKey
    c: Client

    @property
    def id(self) -> str:
        return self.user.id


@pytest.fixture
def actor(client: Client) -> Iterator[Callable[..., Actor]]:
    """make(role) -> an Actor; every channel is closed after the test."""
    made: list[Client] = []

    def make(role: int = ipb.USER_ROLE_USER, **user_fields: Any) -> Actor:
        user = new_user(client, role=role, **user_fields)
        key = client.identity.CreateApiKey(
            ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=role, user_id=user.id))
        )
        c = connect(client.backend, client.database_url, client.server, secret=key.secret)
        made.append(c)
        return Actor(user, key, c)

    yield make
    for c in made:
        c.channel.close()


@dataclass
class Stubs:
    """Stubs on a channel whose calls carry exactly the given authorization header (or none)."""

    channel: grpc.Channel
    identity: identity_pb2_grpc.IdentityServiceStub
    work: work_pb2_grpc.WorkServiceStub
    chat: chat_pb2_grpc.ChatServiceStub
    security: security_pb2_grpc.SecurityServiceStub

    def close(self) -> None:
        self.channel.close()


class HeaderAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    def __init__(self, header: str) -> None:
        self.header = header

    def _with(self, details: Any) -> Any:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        metadata.append(("authorization", self.header))
        return details._replace(metadata=metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with(details), request)


def stubs(channel: grpc.Channel, header: str | None = None) -> Stubs:
    if header is not None:
        channel = grpc.intercept_channel(channel, HeaderAuth(header))
    return Stubs(
        channel,
        identity_pb2_grpc.IdentityServiceStub(channel),
        work_pb2_grpc.WorkServiceStub(channel),
        chat_pb2_grpc.ChatServiceStub(channel),
        security_pb2_grpc.SecurityServiceStub(channel),
    )


@contextlib.contextmanager
def calling(address: str, header: str | None) -> Iterator[Stubs]:
    s = stubs(grpc.insecure_channel(address), header)
    try:
        yield s
    finally:
        s.close()


@contextlib.contextmanager
def running(config: Any) -> Iterator[ServerThread]:
    server = ServerThread(config).start()
    try:
        yield server
    finally:
        server.stop()


def addr(server: ServerThread) -> str:
    return f"127.0.0.1:{server.port}"


# ------------------------------------------------------------------ data helpers (owners set explicitly)


def project_of(c: Client, owner_id: str, name: str | None = None, **fields: Any) -> wpb.Project:
    project = wpb.Project(name=name or f"Project {unique()}", owner_id=owner_id, **fields)
    return c.work.CreateProject(wpb.CreateProjectRequest(project=project))


def join(c: Client, project_id: str, user_id: str) -> None:
    c.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project_id, user_id=user_id))


def task_in(c: Client, project_id: str, **fields: Any) -> wpb.Task:
    return c.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project_id, title=f"Task {unique()}", **fields)))


def conversation_of(c: Client, user_id: str, title: str | None = None) -> cpb.Conversation:
    return c.chat.CreateConversation(
        cpb.CreateConversationRequest(conversation=cpb.Conversation(user_id=user_id, title=title or f"conversation {unique()}"))
    )


def conversation_message(c: Client, conversation_id: str, content: str) -> cpb.ConversationMessage:
    return c.chat.CreateConversationMessage(
        cpb.CreateConversationMessageRequest(
            conversation_message=cpb.ConversationMessage(conversation_id=conversation_id, sender_type=cpb.SENDER_TYPE_USER, content=content)
        )
    )


def chat_message(c: Client | Stubs, channel_id: str, content: str, author_id: str = "") -> cpb.ChatMessage:
    return c.chat.CreateChatMessage(
        cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel_id, content=content, author_id=author_id))
    )


def update_task(c: Client, task_id: str, title: str) -> wpb.Task:
    return c.work.UpdateTask(wpb.UpdateTaskRequest(task=wpb.Task(id=task_id, title=title), update_mask=mask("title")))


def update_project(c: Client, project_id: str, description: str) -> wpb.Project:
    return c.work.UpdateProject(
        wpb.UpdateProjectRequest(project=wpb.Project(id=project_id, description=description), update_mask=mask("description"))
    )


def denied(fn: Callable[..., Any], *args: Any, reason: str | None = None, **kw: Any) -> Any:
    err = expect_error(Code.PERMISSION_DENIED, fn, *args, **kw)
    if reason is not None:
        assert err.info.reason == reason, f"expected reason {reason}, got {err.info.reason}: {err.message}"
    return err


def unauthenticated(fn: Callable[..., Any], *args: Any, reason: str | set[str] | None = None, **kw: Any) -> Any:
    err = expect_error(Code.UNAUTHENTICATED, fn, *args, **kw)
    if reason is not None:
        allowed = {reason} if isinstance(reason, str) else reason
        assert err.info.reason in allowed, f"expected reason {allowed}, got {err.info.reason}: {err.message}"
    return err


def audit_entries(c: Client, filter_: str) -> list[spb.AuditLogEntry]:
    return list(c.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(filter=filter_, page_size=1000)).audit_log_entries)


# ================================================================== 1. ownership per role
# ------------------------------------------------------------------ guest


def test_guest_may_get_and_list_projects_and_tasks(client: Client, actor: Callable[..., Actor]) -> None:
    guest = actor(ipb.USER_ROLE_GUEST)
    owner = new_user(client)
    project = project_of(client, owner.id)
    task = task_in(client, project.id, creator_id=owner.id)
    assert guest.c.work.GetProject(wpb.GetProjectRequest(id=project.id)).id == project.id
    assert guest.c.work.GetTask(wpb.GetTaskRequest(id=task.id)).title == task.title
    assert [p.id for p in guest.c.work.ListProjects(wpb.ListProjectsRequest(filter=f'id = "{project.id}"')).projects] == [project.id]
    assert [t.id for t in guest.c.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"')).tasks] == [task.id]


def test_guest_may_not_write(client: Client, actor: Callable[..., Actor]) -> None:
    guest = actor(ipb.USER_ROLE_GUEST)
    project = project_of(client, new_user(client).id)
    writes = [
        (guest.c.work.CreateTask, wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="never"))),
        (guest.c.work.UpdateProject, wpb.UpdateProjectRequest(project=wpb.Project(id=project.id, description="never"), update_mask=mask("description"))),
        (guest.c.chat.CreateConversation, cpb.CreateConversationRequest(conversation=cpb.Conversation(user_id=guest.id, title="never"))),
    ]
    for method, request in writes:
        err = denied(method, request, reason="ROLE_FORBIDS_METHOD")
        assert err.info.metadata["role"] == "guest" and err.info.metadata["required_role"] == "user"
    assert client.work.GetProject(wpb.GetProjectRequest(id=project.id)).description == project.description
    assert client.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"')).total_size == 0


def test_guest_may_not_read_the_audit_log(actor: Callable[..., Actor]) -> None:
    guest = actor(ipb.USER_ROLE_GUEST)
    denied(guest.c.security.ListAuditLogEntries, spb.ListAuditLogEntriesRequest(), reason="ROLE_FORBIDS_METHOD")
    denied(guest.c.security.GetAuditLogEntry, spb.GetAuditLogEntryRequest(id=random_id()), reason="ROLE_FORBIDS_METHOD")


def test_security_service_is_admin_only_even_for_managers(actor: Callable[..., Actor]) -> None:
    for role in (ipb.USER_ROLE_USER, ipb.USER_ROLE_MANAGER):
        a = actor(role)
        err = denied(a.c.security.ListAuditLogEntries, spb.ListAuditLogEntriesRequest(), reason="ROLE_FORBIDS_METHOD")
        assert err.info.metadata["required_role"] == "admin"


# ------------------------------------------------------------------ user: conversations


def test_user_conversation_defaults_owner_to_caller(actor: Callable[..., Actor]) -> None:
    me = actor()
    created = me.c.chat.CreateConversation(cpb.CreateConversationRequest(conversation=cpb.Conversation(title=f"mine {unique()}")))
    assert created.user_id == me.id
    assert me.c.chat.GetConversation(cpb.GetConversationRequest(id=created.id)).user_id == me.id


def test_user_may_not_get_another_users_conversation_nor_probe_ids(client: Client, actor: Callable[..., Actor]) -> None:
    a, b = actor(), actor()
    theirs = conversation_of(a.c, a.id)
    assert a.c.chat.GetConversation(cpb.GetConversationRequest(id=theirs.id)).id == theirs.id
    err = denied(b.c.chat.GetConversation, cpb.GetConversationRequest(id=theirs.id), reason="ROW_ACCESS_DENIED")
    assert err.info.metadata["resource_id"] == theirs.id
    # An id that does not exist looks exactly the same: NOT_FOUND would tell B which ids exist.
    denied(b.c.chat.GetConversation, cpb.GetConversationRequest(id=random_id()), reason="ROW_ACCESS_DENIED")
    # ... and neither may B change, archive or delete it, nor add messages to it.
    denied(b.c.chat.UpdateConversation, cpb.UpdateConversationRequest(conversation=cpb.Conversation(id=theirs.id, title="x"), update_mask=mask("title")))
    denied(b.c.chat.ArchiveConversation, cpb.ArchiveConversationRequest(id=theirs.id))
    denied(b.c.chat.DeleteConversation, cpb.DeleteConversationRequest(id=theirs.id))
    denied(conversation_message, b.c, theirs.id, "intruder")
    assert client.chat.GetConversation(cpb.GetConversationRequest(id=theirs.id)).title == theirs.title


def test_user_lists_and_searches_only_own_conversations_and_their_messages(client: Client, actor: Callable[..., Actor]) -> None:
    a, b = actor(), actor()
    word = unique("w")
    mine = conversation_of(a.c, a.id, title=f"{word} mine")
    theirs = conversation_of(client, b.id, title=f"{word} theirs")
    mine_msg = conversation_message(a.c, mine.id, f"{word} question")
    conversation_message(client, theirs.id, f"{word} question")

    # Sanity: the admin sees both, so the filters below do match both.
    assert client.chat.ListConversations(cpb.ListConversationsRequest(filter=f'title:"{word}"')).total_size == 2

    listed = a.c.chat.ListConversations(cpb.ListConversationsRequest(filter=f'title:"{word}"'))
    assert [c.id for c in listed.conversations] == [mine.id] and listed.total_size == 1
    everything = a.c.chat.ListConversations(cpb.ListConversationsRequest(page_size=1000))
    assert {c.user_id for c in everything.conversations} == {a.id}
    found = a.c.chat.SearchConversations(cpb.SearchConversationsRequest(query=word))
    assert [r.conversation.id for r in found.results] == [mine.id] and found.total_size == 1

    msgs = a.c.chat.ListConversationMessages(cpb.ListConversationMessagesRequest(filter=f'content:"{word}"'))
    assert [m.id for m in msgs.conversation_messages] == [mine_msg.id] and msgs.total_size == 1
    hits = a.c.chat.SearchConversationMessages(cpb.SearchConversationMessagesRequest(query=word))
    assert [r.conversation_message.id for r in hits.results] == [mine_msg.id]
    by_id = a.c.chat.ListConversationMessages(cpb.ListConversationMessagesRequest(filter=f'conversation_id = "{theirs.id}"'))
    assert list(by_id.conversation_messages) == [] and by_id.total_size == 0


# ------------------------------------------------------------------ user: tasks and projects


def test_user_task_creator_defaults_to_caller_and_user_may_update_it(client: Client, actor: Callable[..., Actor]) -> None:
    me = actor()
    project = project_of(client, new_user(client).id)
    join(client, project.id, me.id)
    task = me.c.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"mine {unique()}")))
    assert task.creator_id == me.id
    assert update_task(me.c, task.id, "renamed").title == "renamed"


def test_user_may_update_own_task(client: Client, actor: Callable[..., Actor]) -> None:
    me = actor()
    project = project_of(client, new_user(client).id)
    join(client, project.id, me.id)
    task = task_in(me.c, project.id, creator_id=me.id)
    assert update_task(me.c, task.id, "renamed by creator").title == "renamed by creator"


def test_user_may_update_task_assigned_to_it(client: Client, actor: Callable[..., Actor]) -> None:
    me = actor()
    other = new_user(client)
    project = project_of(client, other.id)
    task = task_in(client, project.id, creator_id=other.id, assignee_id=me.id)
    assert update_task(me.c, task.id, "done by assignee").title == "done by assignee"


def test_user_may_not_update_someone_elses_task(client: Client, actor: Callable[..., Actor]) -> None:
    me = actor()
    other = new_user(client)
    project = project_of(client, other.id)
    task = task_in(client, project.id, creator_id=other.id, assignee_id=other.id)
    err = denied(update_task, me.c, task.id, "hijacked", reason="ROW_ACCESS_DENIED")
    assert err.info.metadata["resource_id"] == task.id
    denied(me.c.work.DeleteTask, wpb.DeleteTaskRequest(id=task.id), reason="ROW_ACCESS_DENIED")
    # ... nor reach it by creating it for someone else, nor make it its own by reassigning.
    denied(task_in, me.c, project.id, creator_id=other.id)
    assert client.work.GetTask(wpb.GetTaskRequest(id=task.id)).title == task.title


def test_user_may_not_take_a_task_out_of_its_reach(client: Client, actor: Callable[..., Actor]) -> None:
    """The manage rule holds after the change too: reassigning its own task away is refused."""
    me = actor()
    other = new_user(client)
    project = project_of(client, other.id)
    task = task_in(client, project.id, creator_id=other.id, assignee_id=me.id)
    denied(me.c.work.UpdateTask, wpb.UpdateTaskRequest(task=wpb.Task(id=task.id, assignee_id=other.id), update_mask=mask("assignee_id")))
    assert client.work.GetTask(wpb.GetTaskRequest(id=task.id)).assignee_id == me.id


def test_user_may_not_create_a_project(client: Client, actor: Callable[..., Actor]) -> None:
    me = actor()
    name = f"Project {unique()}"
    denied(me.c.work.CreateProject, wpb.CreateProjectRequest(project=wpb.Project(name=name, owner_id=me.id)))
    assert client.work.ListProjects(wpb.ListProjectsRequest(filter=f'name = "{name}"')).total_size == 0


# ------------------------------------------------------------------ user: itself, other users, API keys


def test_user_may_update_own_full_name_but_not_role_or_is_active(client: Client, actor: Callable[..., Actor]) -> None:
    me = actor()
    updated = me.c.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=me.id, full_name="New Name"), update_mask=mask("full_name")))
    assert updated.full_name == "New Name"
    err = denied(
        me.c.identity.UpdateUser,
        ipb.UpdateUserRequest(user=ipb.User(id=me.id, role=ipb.USER_ROLE_ADMIN), update_mask=mask("role")),
        reason="FIELD_ACCESS_DENIED",
    )
    assert err.info.metadata["field"] == "user.role"
    err = denied(
        me.c.identity.UpdateUser,
        ipb.UpdateUserRequest(user=ipb.User(id=me.id, is_active=False), update_mask=mask("is_active")),
        reason="FIELD_ACCESS_DENIED",
    )
    assert err.info.metadata["field"] == "user.is_active"
    # Without a mask, the set fields count: smuggling the role next to a harmless change fails too.
    denied(me.c.identity.UpdateUser, ipb.UpdateUserRequest(user=ipb.User(id=me.id, full_name="x", role=ipb.USER_ROLE_ADMIN)), reason="FIELD_ACCESS_DENIED")
    denied(me.c.identity.UpdateUser, ipb.UpdateUserRequest(user=ipb.User(id=me.id), update_mask=mask("*")), reason="FIELD_ACCESS_DENIED")
    after = client.identity.GetUser(ipb.GetUserRequest(id=me.id))
    assert after.role == ipb.USER_ROLE_USER and after.is_active and after.full_name == "New Name"


def test_user_may_not_update_another_user(client: Client, actor: Callable[..., Actor]) -> None:
    me = actor()
    other = new_user(client)
    denied(
        me.c.identity.UpdateUser,
        ipb.UpdateUserRequest(user=ipb.User(id=other.id, full_name="Hijacked"), update_mask=mask("full_name")),
        reason="ROW_ACCESS_DENIED",
    )
    denied(me.c.identity.DeleteUser, ipb.DeleteUserRequest(id=other.id), reason="ROW_ACCESS_DENIED")
    denied(me.c.identity.CreateUser, ipb.CreateUserRequest(user=ipb.User(username=unique("u"), email=f"{unique()}@example.com")))
    assert client.identity.GetUser(ipb.GetUserRequest(id=other.id)).full_name == other.full_name


def test_user_lists_only_own_api_keys(client: Client, actor: Callable[..., Actor]) -> None:
    me, other = actor(), actor()
    second = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_USER, user_id=me.id)))
    ownerless = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_USER)))
    listed = me.c.identity.ListApiKeys(ipb.ListApiKeysRequest(page_size=1000))
    assert {k.id for k in listed.api_keys} == {me.key.id, second.id}
    assert listed.total_size == 2
    assert all(k.secret == "" for k in listed.api_keys)
    denied(me.c.identity.GetApiKey, ipb.GetApiKeyRequest(id=other.key.id), reason="ROW_ACCESS_DENIED")
    denied(me.c.identity.GetApiKey, ipb.GetApiKeyRequest(id=ownerless.id), reason="ROW_ACCESS_DENIED")
    # ... nor revoke or delete someone else's key (it keeps working).
    denied(me.c.identity.RevokeApiKey, ipb.RevokeApiKeyRequest(id=other.key.id), reason="ROW_ACCESS_DENIED")
    denied(me.c.identity.DeleteApiKey, ipb.DeleteApiKeyRequest(id=other.key.id), reason="ROW_ACCESS_DENIED")
    assert other.c.identity.GetUser(ipb.GetUserRequest(id=other.id)).id == other.id


def test_user_may_not_create_api_key_above_its_role_or_for_another_user(client: Client, actor: Callable[..., Actor]) -> None:
    me = actor()
    name = unique("k")
    for role in (ipb.USER_ROLE_ADMIN, ipb.USER_ROLE_MANAGER):
        err = denied(
            me.c.identity.CreateApiKey,
            ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=name, role=role)),
            reason="ROLE_ABOVE_CALLER",
        )
        assert err.info.metadata["field"] == "api_key.role"
    denied(me.c.identity.CreateApiKey, ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=name, user_id=new_user(client).id)), reason="FIELD_ACCESS_DENIED")
    assert client.identity.ListApiKeys(ipb.ListApiKeysRequest(filter=f'name = "{name}"')).total_size == 0


def test_user_api_key_defaults_to_caller(client: Client, actor: Callable[..., Actor]) -> None:
    me = actor()
    key = me.c.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"))))
    assert key.user_id == me.id and key.role == ipb.USER_ROLE_USER and key.secret
    with calling(client.address, f"Bearer {key.secret}") as mine:
        assert mine.identity.GetUser(ipb.GetUserRequest(id=me.id)).id == me.id


# ------------------------------------------------------------------ manager


def test_manager_project_defaults_owner_to_caller(actor: Callable[..., Actor]) -> None:
    boss = actor(ipb.USER_ROLE_MANAGER)
    project = boss.c.work.CreateProject(wpb.CreateProjectRequest(project=wpb.Project(name=f"Project {unique()}")))
    assert project.owner_id == boss.id
    assert update_project(boss.c, project.id, "mine").description == "mine"


def test_manager_may_update_delete_and_add_members_to_own_project(client: Client, actor: Callable[..., Actor]) -> None:
    boss = actor(ipb.USER_ROLE_MANAGER)
    project = project_of(boss.c, boss.id)
    assert project.owner_id == boss.id
    assert update_project(boss.c, project.id, "changed by owner").description == "changed by owner"
    member = new_user(client)
    added = boss.c.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=member.id))
    assert member.id in added.member_ids
    removed = boss.c.work.RemoveProjectMember(wpb.RemoveProjectMemberRequest(project_id=project.id, user_id=member.id))
    assert member.id not in removed.member_ids
    boss.c.work.DeleteProject(wpb.DeleteProjectRequest(id=project.id))
    assert client.work.GetProject(wpb.GetProjectRequest(id=project.id, show_deleted=True)).HasField("delete_time")


def test_manager_may_not_create_a_project_for_someone_else(client: Client, actor: Callable[..., Actor]) -> None:
    boss = actor(ipb.USER_ROLE_MANAGER)
    name = f"Project {unique()}"
    denied(project_of, boss.c, new_user(client).id, name=name)
    assert client.work.ListProjects(wpb.ListProjectsRequest(filter=f'name = "{name}"')).total_size == 0


def test_manager_manages_any_task_of_its_project(client: Client, actor: Callable[..., Actor]) -> None:
    boss = actor(ipb.USER_ROLE_MANAGER)
    worker = new_user(client)
    project = project_of(client, boss.id)
    task = task_in(client, project.id, creator_id=worker.id, assignee_id=worker.id)
    assert update_task(boss.c, task.id, "changed by the project's owner").title == "changed by the project's owner"
    created = task_in(boss.c, project.id, assignee_id=worker.id)  # for someone, in its own project
    assert created.creator_id == boss.id
    boss.c.work.DeleteTask(wpb.DeleteTaskRequest(id=created.id))


def test_manager_may_not_update_another_managers_project_unless_member(client: Client, actor: Callable[..., Actor]) -> None:
    boss, rival = actor(ipb.USER_ROLE_MANAGER), actor(ipb.USER_ROLE_MANAGER)
    project = project_of(client, rival.id)
    task = task_in(client, project.id, creator_id=rival.id)
    err = denied(update_project, boss.c, project.id, "not yours", reason="ROW_ACCESS_DENIED")
    assert err.info.metadata["resource_id"] == project.id
    denied(boss.c.work.AddProjectMember, wpb.AddProjectMemberRequest(project_id=project.id, user_id=boss.id), reason="ROW_ACCESS_DENIED")
    denied(boss.c.work.DeleteProject, wpb.DeleteProjectRequest(id=project.id), reason="ROW_ACCESS_DENIED")
    denied(update_task, boss.c, task.id, "not yours", reason="ROW_ACCESS_DENIED")

    rival.c.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=boss.id))
    assert update_project(boss.c, project.id, "as a member").description == "as a member"
    assert update_task(boss.c, task.id, "as a member").title == "as a member"

    rival.c.work.RemoveProjectMember(wpb.RemoveProjectMemberRequest(project_id=project.id, user_id=boss.id))
    denied(update_project, boss.c, project.id, "not any more", reason="ROW_ACCESS_DENIED")


def test_manager_may_not_manage_tasks_outside_its_projects_unless_assigned_or_creator(client: Client, actor: Callable[..., Actor]) -> None:
    boss = actor(ipb.USER_ROLE_MANAGER)
    stranger = new_user(client)
    project = project_of(client, stranger.id)
    foreign = task_in(client, project.id, creator_id=stranger.id, assignee_id=stranger.id)
    assigned = task_in(client, project.id, creator_id=stranger.id, assignee_id=boss.id)
    created = task_in(client, project.id, creator_id=boss.id)
    denied(update_task, boss.c, foreign.id, "no", reason="ROW_ACCESS_DENIED")
    denied(boss.c.work.DeleteTask, wpb.DeleteTaskRequest(id=foreign.id), reason="ROW_ACCESS_DENIED")
    assert update_task(boss.c, assigned.id, "assigned").title == "assigned"
    assert update_task(boss.c, created.id, "created").title == "created"
    denied(update_project, boss.c, project.id, "no", reason="ROW_ACCESS_DENIED")


# ------------------------------------------------------------------ private channels


def private_channel(a: Actor) -> cpb.Channel:
    return a.c.chat.CreateChannel(
        cpb.CreateChannelRequest(channel=cpb.Channel(name=f"secret {unique()}", is_private=True, creator_id=a.id))
    )


def first_stream_item(stub: chat_pb2_grpc.ChatServiceStub, request: cpb.StreamEventsRequest) -> cpb.StreamEventsResponse:
    call = stub.StreamEvents(request, timeout=TIMEOUT)
    try:
        return next(iter(call))
    finally:
        call.cancel()


def test_user_channel_and_message_default_creator_and_author_to_caller(actor: Callable[..., Actor]) -> None:
    a = actor()
    channel = a.c.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"mine {unique()}", is_private=True)))
    assert channel.creator_id == a.id
    message = chat_message(a.c, channel.id, "hello")
    assert message.author_id == a.id


def test_private_channel_is_invisible_to_non_members(client: Client, actor: Callable[..., Actor]) -> None:
    a, b = actor(), actor()
    channel = private_channel(a)
    message = chat_message(a.c, channel.id, f"{unique('w')} for my eyes only", author_id=a.id)
    by_id = f'id = "{channel.id}"'
    in_channel = f'channel_id = "{channel.id}"'
    assert [c.id for c in a.c.chat.ListChannels(cpb.ListChannelsRequest(filter=by_id)).channels] == [channel.id]
    assert [m.id for m in a.c.chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=in_channel)).chat_messages] == [message.id]

    listed = b.c.chat.ListChannels(cpb.ListChannelsRequest(filter=by_id))
    assert list(listed.channels) == [] and listed.total_size == 0
    assert channel.id not in {r.channel.id for r in b.c.chat.SearchChannels(cpb.SearchChannelsRequest(query="secret", page_size=1000)).results}
    denied(b.c.chat.GetChannel, cpb.GetChannelRequest(id=channel.id), reason="ROW_ACCESS_DENIED")
    msgs = b.c.chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=in_channel))
    assert list(msgs.chat_messages) == [] and msgs.total_size == 0
    denied(b.c.chat.GetChatMessage, cpb.GetChatMessageRequest(id=message.id), reason="ROW_ACCESS_DENIED")
    denied(first_stream_item, b.c.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]), reason="ROW_ACCESS_DENIED")
    denied(chat_message, b.c, channel.id, "let me in", b.id)
    denied(b.c.chat.AddChannelMember, cpb.AddChannelMemberRequest(channel_id=channel.id, user_id=b.id))
    assert list(client.chat.GetChannel(cpb.GetChannelRequest(id=channel.id)).member_ids) == []


def test_private_channel_member_sees_it_posts_and_edits_only_own_messages(client: Client, actor: Callable[..., Actor]) -> None:
    a, b = actor(), actor()
    channel = private_channel(a)
    hers = chat_message(a.c, channel.id, "from a", author_id=a.id)
    a.c.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=channel.id, user_id=b.id))

    assert b.c.chat.GetChannel(cpb.GetChannelRequest(id=channel.id)).id == channel.id
    assert [c.id for c in b.c.chat.ListChannels(cpb.ListChannelsRequest(filter=f'id = "{channel.id}"')).channels] == [channel.id]
    first = first_stream_item(b.c.chat, cpb.StreamEventsRequest(channel_ids=[channel.id], heartbeat_seconds=1))
    assert first.type == cpb.EVENT_TYPE_HEARTBEAT
    his = chat_message(b.c, channel.id, "from b", author_id=b.id)
    listed = b.c.chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=f'channel_id = "{channel.id}"', order_by="create_time"))
    assert [m.id for m in listed.chat_messages] == [hers.id, his.id]

    edited = b.c.chat.UpdateChatMessage(cpb.UpdateChatMessageRequest(chat_message=cpb.ChatMessage(id=his.id, content="edited"), update_mask=mask("content")))
    assert edited.content == "edited"
    denied(
        b.c.chat.UpdateChatMessage,
        cpb.UpdateChatMessageRequest(chat_message=cpb.ChatMessage(id=hers.id, content="forged"), update_mask=mask("content")),
        reason="ROW_ACCESS_DENIED",
    )
    denied(b.c.chat.DeleteChatMessage, cpb.DeleteChatMessageRequest(id=hers.id), reason="ROW_ACCESS_DENIED")
    # Posting under someone else's name is refused too.
    denied(chat_message, b.c, channel.id, "impersonation", a.id)
    assert client.chat.GetChatMessage(cpb.GetChatMessageRequest(id=hers.id)).content == "from a"

    a.c.chat.RemoveChannelMember(cpb.RemoveChannelMemberRequest(channel_id=channel.id, user_id=b.id))
    denied(b.c.chat.GetChannel, cpb.GetChannelRequest(id=channel.id), reason="ROW_ACCESS_DENIED")


def test_private_channel_events_are_not_readable_with_a_forged_resume_token(client: Client, actor: Callable[..., Actor]) -> None:
    """A resume token is only checksummed, not signed: its scopes must be checked like channel_ids."""
    a, b = actor(), actor()
    channel = private_channel(a)
    secret_text = f"{unique('w')} private"
    chat_message(a.c, channel.id, secret_text, author_id=a.id)
    forged = events.encode_token({f"channels/{channel.id}": 0})
    call = b.c.chat.StreamEvents(cpb.StreamEventsRequest(resume_token=forged, heartbeat_seconds=1), timeout=TIMEOUT)
    leaked: list[cpb.StreamEventsResponse] = []
    try:
        for item in call:
            if item.type == cpb.EVENT_TYPE_HEARTBEAT:
                break
            leaked.append(item)
    except grpc.RpcError as exc:
        assert exc.code() == Code.PERMISSION_DENIED, f"{exc.code()}: {exc.details()}"
    finally:
        call.cancel()
    assert not leaked, f"a non-member read {len(leaked)} events of a private channel, e.g. {leaked[-1]}"


def test_other_users_conversation_events_are_not_readable_with_a_forged_resume_token(client: Client, actor: Callable[..., Actor]) -> None:
    a, b = actor(), actor()
    conversation = conversation_of(a.c, a.id)
    conversation_message(a.c, conversation.id, "private question")
    denied(first_stream_item, b.c.chat, cpb.StreamEventsRequest(conversation_ids=[conversation.id]), reason="ROW_ACCESS_DENIED")
    forged = events.encode_token({f"conversations/{conversation.id}": 0})
    call = b.c.chat.StreamEvents(cpb.StreamEventsRequest(resume_token=forged, heartbeat_seconds=1), timeout=TIMEOUT)
    leaked: list[cpb.StreamEventsResponse] = []
    try:
        for item in call:
            if item.type == cpb.EVENT_TYPE_HEARTBEAT:
                break
            leaked.append(item)
    except grpc.RpcError as exc:
        assert exc.code() == Code.PERMISSION_DENIED, f"{exc.code()}: {exc.details()}"
    finally:
        call.cancel()
    assert not leaked, f"another user read {len(leaked)} events of a conversation, e.g. {leaked[-1]}"


# ------------------------------------------------------------------ admin


def test_admin_sees_everything_and_gets_not_found_for_unknown_ids(client: Client, actor: Callable[..., Actor]) -> None:
    a = actor()
    channel = private_channel(a)
    conversation = conversation_of(a.c, a.id)
    assert client.chat.GetChannel(cpb.GetChannelRequest(id=channel.id)).id == channel.id
    assert client.chat.GetConversation(cpb.GetConversationRequest(id=conversation.id)).id == conversation.id
    assert client.identity.GetApiKey(ipb.GetApiKeyRequest(id=a.key.id)).id == a.key.id
    for method, request in [
        (client.chat.GetConversation, cpb.GetConversationRequest(id=random_id())),
        (client.chat.GetChannel, cpb.GetChannelRequest(id=random_id())),
        (client.work.GetTask, wpb.GetTaskRequest(id=random_id())),
        (client.identity.GetApiKey, ipb.GetApiKeyRequest(id=random_id())),
    ]:
        err = expect_error(Code.NOT_FOUND, method, request)
        assert err.info.reason == "RESOURCE_NOT_FOUND"


# ================================================================== 2. JWT


# A server accepting JWTs needs an issuer, an audience and (HS256) a secret of 32 bytes or more.
HS_SECRET = "nexus-test-hs256-secret-0123456789abcdef"
JWT_ISSUER = "https://issuer.example.com"
JWT_AUDIENCE = "nexus-data"
JWT_CLAIMS = {"jwt_issuer": JWT_ISSUER, "jwt_audience": JWT_AUDIENCE}


def token_for(key: Any, sub: str, algorithm: str = "HS256", lifetime: float | None = 300, **claims: Any) -> str:
    payload: dict[str, Any] = {"sub": sub, "iat": int(time.time()), "jti": uuid.uuid4().hex, "iss": JWT_ISSUER, "aud": JWT_AUDIENCE, **claims}
    if lifetime is not None:
        payload["exp"] = int(time.time() + lifetime)
    return jwt.encode(payload, key, algorithm=algorithm)


@pytest.fixture(scope="module")
def hs_server(client: Client) -> Iterator[ServerThread]:
    with running(make_config(client.database_url, jwt_hs256_secret=HS_SECRET, **JWT_CLAIMS)) as server:
        yield server


def jwt_user(client: Client, role: int = ipb.USER_ROLE_USER, **fields: Any) -> ipb.User:
    return new_user(client, role=role, external_id=unique("ext"), **fields)


def test_jwt_hs256_authenticates_the_subject_user(client: Client, hs_server: ServerThread) -> None:
    user = jwt_user(client)
    with calling(addr(hs_server), f"Bearer {token_for(HS_SECRET, user.external_id, role='user')}") as me:
        assert me.identity.GetUser(ipb.GetUserRequest(id=user.id)).id == user.id
        me.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=user.id, full_name="Via JWT"), update_mask=mask("full_name")))
        # Row rules see the JWT's user: another user is out of reach.
        denied(me.identity.UpdateUser, ipb.UpdateUserRequest(user=ipb.User(id=new_user(client).id, full_name="x"), update_mask=mask("full_name")))
    [entry] = [e for e in audit_entries(client, f'resource_id = "{user.id}"') if e.action == spb.AUDIT_ACTION_UPDATE]
    assert entry.actor_type == spb.ACTOR_TYPE_USER and entry.actor_id == user.id


def test_jwt_role_claim_decides_the_role(client: Client, hs_server: ServerThread) -> None:
    user = jwt_user(client, role=ipb.USER_ROLE_USER)
    project = project_of(client, new_user(client).id)
    with calling(addr(hs_server), f"Bearer {token_for(HS_SECRET, user.external_id, role='guest')}") as guest:
        assert guest.work.GetProject(wpb.GetProjectRequest(id=project.id)).id == project.id
        err = denied(guest.work.CreateTask, wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="x", creator_id=user.id)), reason="ROLE_FORBIDS_METHOD")
        assert err.info.metadata["role"] == "guest"
        denied(guest.identity.UpdateUser, ipb.UpdateUserRequest(user=ipb.User(id=user.id, full_name="x"), update_mask=mask("full_name")), reason="ROLE_FORBIDS_METHOD")
    # A claim at the stored role (here a manager's) acts with it; a higher one never raises it.
    manager = jwt_user(client, role=ipb.USER_ROLE_MANAGER)
    with calling(addr(hs_server), f"Bearer {token_for(HS_SECRET, manager.external_id, role='manager')}") as boss:
        created = project_of(boss, manager.id)  # type: ignore[arg-type]
        assert created.owner_id == manager.id
    # No (or an unknown) role claim: the user's own role.
    with calling(addr(hs_server), f"Bearer {token_for(HS_SECRET, user.external_id)}") as plain:
        denied(plain.work.CreateProject, wpb.CreateProjectRequest(project=wpb.Project(name=f"P {unique()}", owner_id=user.id)))
        join(client, project.id, user.id)
        assert task_in(plain, project.id, creator_id=user.id).creator_id == user.id  # type: ignore[arg-type]


@pytest.mark.parametrize("case", ["expired", "wrong_signature", "no_exp", "unknown_sub", "no_sub", "alg_none"])
def test_jwt_bad_tokens_are_unauthenticated(client: Client, hs_server: ServerThread, case: str) -> None:
    user = jwt_user(client)
    token = {
        "expired": lambda: token_for(HS_SECRET, user.external_id, lifetime=-60),
        "wrong_signature": lambda: token_for("not-the-secret-but-as-long-as-the-real-one", user.external_id),
        "no_exp": lambda: token_for(HS_SECRET, user.external_id, lifetime=None),
        "unknown_sub": lambda: token_for(HS_SECRET, unique("nobody")),
        "no_sub": lambda: jwt.encode({"exp": int(time.time()) + 300, "iat": int(time.time()), "iss": JWT_ISSUER, "aud": JWT_AUDIENCE}, HS_SECRET, algorithm="HS256"),
        "alg_none": lambda: jwt.encode({"sub": user.external_id, "exp": int(time.time()) + 300, "role": "admin"}, None, algorithm="none"),
    }[case]()
    reasons = {"INVALID_CREDENTIALS", "EXPIRED_CREDENTIALS"} if case == "expired" else "INVALID_CREDENTIALS"
    with calling(addr(hs_server), f"Bearer {token}") as s:
        unauthenticated(s.work.ListProjects, wpb.ListProjectsRequest(), reason=reasons)


def test_jwt_of_a_deactivated_user_is_unauthenticated(client: Client, hs_server: ServerThread) -> None:
    inactive = jwt_user(client, is_active=False)
    with calling(addr(hs_server), f"Bearer {token_for(HS_SECRET, inactive.external_id)}") as s:
        unauthenticated(s.work.ListProjects, wpb.ListProjectsRequest(), reason="INVALID_CREDENTIALS")
    # A user deactivated (through this server) while its token is cached: refused at once.
    user = jwt_user(client)
    with calling(addr(hs_server), f"Bearer {token_for(HS_SECRET, user.external_id)}") as s, calling(addr(hs_server), f"Bearer {client.admin_secret}") as admin:
        s.work.ListProjects(wpb.ListProjectsRequest(page_size=1))
        admin.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=user.id, is_active=False), update_mask=mask("is_active")))
        unauthenticated(s.work.ListProjects, wpb.ListProjectsRequest(page_size=1), reason="INVALID_CREDENTIALS")


def test_jwt_is_refused_by_a_server_without_jwt_settings(client: Client) -> None:
    user = jwt_user(client)
    with calling(client.address, f"Bearer {token_for(HS_SECRET, user.external_id)}") as s:
        unauthenticated(s.work.ListProjects, wpb.ListProjectsRequest(), reason="INVALID_CREDENTIALS")


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_private(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def test_jwt_rs256(client: Client, tmp_path: Path) -> None:
    issuer, impostor = _rsa_key(), _rsa_key()
    public_file = tmp_path / "issuer.pub.pem"
    public_file.write_bytes(_pem_public(issuer))
    user = jwt_user(client)
    with running(make_config(client.database_url, jwt_rs256_public_key_file=str(public_file), **JWT_CLAIMS)) as server:
        good = token_for(_pem_private(issuer), user.external_id, algorithm="RS256", role="user")
        with calling(addr(server), f"Bearer {good}") as s:
            assert s.identity.GetUser(ipb.GetUserRequest(id=user.id)).id == user.id
        forged = token_for(_pem_private(impostor), user.external_id, algorithm="RS256", role="admin")
        with calling(addr(server), f"Bearer {forged}") as s:
            unauthenticated(s.identity.GetUser, ipb.GetUserRequest(id=user.id), reason="INVALID_CREDENTIALS")
        # Algorithm confusion: HS256 keyed with the (public) PEM must not pass for RS256.
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        body = _b64(json.dumps({"sub": user.external_id, "exp": int(time.time()) + 300, "role": "admin"}).encode())
        signature = _b64(hmac.new(_pem_public(issuer), f"{header}.{body}".encode(), hashlib.sha256).digest())
        with calling(addr(server), f"Bearer {header}.{body}.{signature}") as s:
            unauthenticated(s.identity.GetUser, ipb.GetUserRequest(id=user.id), reason="INVALID_CREDENTIALS")
        # An HS256 token is no good on an RS256-only server, whatever its secret.
        with calling(addr(server), f"Bearer {token_for(HS_SECRET, user.external_id)}") as s:
            unauthenticated(s.identity.GetUser, ipb.GetUserRequest(id=user.id), reason="INVALID_CREDENTIALS")


# ================================================================== 3. API keys


def new_key(client: Client, role: int = ipb.USER_ROLE_USER, **fields: Any) -> ipb.ApiKey:
    return client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=role, **fields)))


def test_expired_api_key_is_unauthenticated(client: Client) -> None:
    key = new_key(client, expire_time=future())
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    database = Database(client.database_url)
    try:
        database.run_sync(lambda s: s.execute(update(ApiKey.__table__).where(ApiKey.__table__.c.id == uuid.UUID(key.id)).values(expire_time=past)))
    finally:
        database.dispose()
    with calling(client.address, f"Bearer {key.secret}") as s:
        err = unauthenticated(s.work.ListProjects, wpb.ListProjectsRequest(), reason="EXPIRED_CREDENTIALS")
        assert key.secret not in err.message


def test_api_key_with_future_expiry_works(client: Client) -> None:
    key = new_key(client, expire_time=future(1))
    with calling(client.address, f"Bearer {key.secret}") as s:
        s.work.ListProjects(wpb.ListProjectsRequest(page_size=1))


def test_revoked_api_key_is_refused_at_once(client: Client) -> None:
    key = new_key(client)
    with calling(client.address, f"Bearer {key.secret}") as s:
        s.work.ListProjects(wpb.ListProjectsRequest(page_size=1))
        revoked = client.identity.RevokeApiKey(ipb.RevokeApiKeyRequest(id=key.id))
        assert revoked.HasField("revoke_time")
        unauthenticated(s.work.ListProjects, wpb.ListProjectsRequest(page_size=1), reason="INVALID_CREDENTIALS")


def test_user_may_revoke_its_own_key_and_it_stops_at_once(client: Client, actor: Callable[..., Actor]) -> None:
    me = actor()
    spare = new_key(client, user_id=me.id)
    with calling(client.address, f"Bearer {spare.secret}") as s:
        s.work.ListProjects(wpb.ListProjectsRequest(page_size=1))
        me.c.identity.RevokeApiKey(ipb.RevokeApiKeyRequest(id=spare.id))
        unauthenticated(s.work.ListProjects, wpb.ListProjectsRequest(page_size=1), reason="INVALID_CREDENTIALS")


def test_deleted_api_key_is_refused_at_once(client: Client) -> None:
    key = new_key(client)
    with calling(client.address, f"Bearer {key.secret}") as s:
        s.work.ListProjects(wpb.ListProjectsRequest(page_size=1))
        client.identity.DeleteApiKey(ipb.DeleteApiKeyRequest(id=key.id))
        unauthenticated(s.work.ListProjects, wpb.ListProjectsRequest(page_size=1), reason="INVALID_CREDENTIALS")


def test_api_key_of_a_deactivated_user_is_refused(client: Client, actor: Callable[..., Actor]) -> None:
    """A key acting for a user stops working when the user may no longer sign in (is_active false)."""
    me = actor()
    me.c.work.ListProjects(wpb.ListProjectsRequest(page_size=1))
    client.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=me.id, is_active=False), update_mask=mask("is_active")))
    unauthenticated(me.c.work.ListProjects, wpb.ListProjectsRequest(page_size=1))


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "MISSING_CREDENTIALS"),
        ("Basic xyz", "MALFORMED_CREDENTIALS"),
        ("Bearer", "MALFORMED_CREDENTIALS"),
        ("xyz", "MALFORMED_CREDENTIALS"),
        ("Bearer garbage", "INVALID_CREDENTIALS"),
        ("Bearer nx_0000000.not-a-secret", "INVALID_CREDENTIALS"),
        ("Bearer a.b.c", "INVALID_CREDENTIALS"),
    ],
)
def test_bad_credentials_are_unauthenticated(client: Client, header: str | None, reason: str) -> None:
    with calling(client.address, header) as s:
        unauthenticated(s.work.ListProjects, wpb.ListProjectsRequest(), reason=reason)
        unauthenticated(s.identity.GetUser, ipb.GetUserRequest(id=random_id()), reason=reason)
        # Streams are guarded the same way.
        unauthenticated(first_stream_item, s.chat, cpb.StreamEventsRequest(channel_ids=[random_id()]), reason=reason)


def test_right_prefix_wrong_secret_is_unauthenticated(client: Client) -> None:
    key = new_key(client)
    with calling(client.address, f"Bearer {key.key_prefix}.{'x' * 43}") as s:
        unauthenticated(s.work.ListProjects, wpb.ListProjectsRequest(), reason="INVALID_CREDENTIALS")
    with calling(client.address, f"Bearer {key.secret}") as s:  # the real key still works after the miss
        s.work.ListProjects(wpb.ListProjectsRequest(page_size=1))


def test_keys_create_command_prints_a_working_secret(client: Client) -> None:
    name = unique("cli")
    done = subprocess.run(
        [str(NEXUS_DATA), "keys", "create", "--name", name, "--role", "guest", "--database-url", client.database_url],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    secret = lines[0].strip()
    assert secret.startswith("nx_") and secret not in done.stderr
    [listed] = client.identity.ListApiKeys(ipb.ListApiKeysRequest(filter=f'name = "{name}"')).api_keys
    assert listed.role == ipb.USER_ROLE_GUEST and secret.startswith(listed.key_prefix)
    with calling(client.address, f"Bearer {secret}") as s:
        s.work.ListProjects(wpb.ListProjectsRequest(page_size=1))
        denied(s.work.CreateProject, wpb.CreateProjectRequest(project=wpb.Project(name="x", owner_id=new_user(client).id)), reason="ROLE_FORBIDS_METHOD")


# ================================================================== 4. bootstrap and insecure mode


@contextlib.contextmanager
def fresh_database(backend: str, tmp_path: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
    else:
        with fresh_postgres_database() as url:
            yield url


def test_bootstrap_admin_key_only_on_a_fresh_database(client: Client, tmp_path: Path) -> None:
    with fresh_database(client.backend, tmp_path) as url, running(make_config(url)) as first:
        assert first.app is not None
        secret = first.app.bootstrap_secret
        assert secret and secret.startswith("nx_")
        with calling(addr(first), f"Bearer {secret}") as admin:
            user = admin.identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(username=unique("u"), email=f"{unique()}@example.com")))
            admin.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(page_size=1))
            [key] = admin.identity.ListApiKeys(ipb.ListApiKeysRequest()).api_keys
            assert key.role == ipb.USER_ROLE_ADMIN and key.secret == ""
        with running(make_config(url)) as second:
            assert second.app is not None and second.app.bootstrap_secret is None
            with calling(addr(second), f"Bearer {secret}") as admin:
                assert admin.identity.GetUser(ipb.GetUserRequest(id=user.id)).id == user.id
                assert admin.identity.ListApiKeys(ipb.ListApiKeysRequest()).total_size == 1
            with calling(addr(second), None) as anonymous:
                unauthenticated(anonymous.work.ListProjects, wpb.ListProjectsRequest(), reason="MISSING_CREDENTIALS")


def test_insecure_dev_needs_no_credentials_and_audits_as_system(client: Client) -> None:
    with running(make_config(client.database_url, insecure_dev=True)) as server:
        assert server.app is not None and server.app.bootstrap_secret is None
        with calling(addr(server), None) as anyone:
            user = anyone.identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(username=unique("u"), email=f"{unique()}@example.com")))
            anyone.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(page_size=1))
    [entry] = audit_entries(client, f'resource_id = "{user.id}"')
    assert entry.actor_type == spb.ACTOR_TYPE_SYSTEM and entry.actor_id == ""
    assert entry.method == "/nexus.identity.v1.IdentityService/CreateUser"


# ================================================================== 5. request ids


def test_request_id_reaches_audit_entries_and_error_info(client: Client, actor: Callable[..., Actor]) -> None:
    rid = str(uuid.uuid4())
    project = project_of(client, new_user(client).id)
    task = client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="traced")), metadata=[("x-request-id", rid)])
    entries = audit_entries(client, f'request_id = "{rid}"')
    assert [(e.resource_type, e.resource_id, e.action) for e in entries] == [("Task", task.id, spb.AUDIT_ACTION_CREATE)]
    assert entries[0].request_id == rid and entries[0].method == "/nexus.work.v1.WorkService/CreateTask"
    assert entries[0].actor_type == spb.ACTOR_TYPE_API_KEY and entries[0].actor_id

    failing = str(uuid.uuid4())
    err = expect_error(Code.NOT_FOUND, client.work.GetTask, wpb.GetTaskRequest(id=random_id()), metadata=[("x-request-id", failing)])
    assert err.info.metadata["request_id"] == failing
    guest = actor(ipb.USER_ROLE_GUEST)
    err = denied(guest.c.work.CreateTask, wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="x")), metadata=[("x-request-id", failing)])
    assert err.info.metadata["request_id"] == failing
    with calling(client.address, "Bearer garbage") as s:
        err = unauthenticated(s.work.ListProjects, wpb.ListProjectsRequest(), metadata=[("x-request-id", failing)])
        assert err.info.metadata["request_id"] == failing
    assert audit_entries(client, f'request_id = "{failing}"') == []


def test_request_id_is_generated_when_absent(client: Client) -> None:
    first = expect_error(Code.NOT_FOUND, client.work.GetTask, wpb.GetTaskRequest(id=random_id()))
    second = expect_error(Code.NOT_FOUND, client.work.GetTask, wpb.GetTaskRequest(id=random_id()))
    ids = [first.info.metadata.get("request_id", ""), second.info.metadata.get("request_id", "")]
    assert all(ids) and ids[0] != ids[1]
    with calling(client.address, None) as s:
        err = unauthenticated(s.work.ListProjects, wpb.ListProjectsRequest())
        assert err.info.metadata.get("request_id")
    # An unusable id (too long) is refused, never replaced nor written anywhere.
    err = expect_error(Code.INVALID_ARGUMENT, client.work.GetTask, wpb.GetTaskRequest(id=random_id()), metadata=[("x-request-id", "r" * 500)])
    assert [v.field for v in err.violations] == ["x-request-id"] and "r" * 500 not in err.message
    # Writes without one: each audit entry has its own, made for its call.
    project = project_of(client, new_user(client).id)
    tasks = [client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"untraced {i}"))) for i in range(2)]
    client.work.UpdateTask(wpb.UpdateTaskRequest(task=wpb.Task(id=tasks[0].id, title="renamed"), update_mask=mask("title")))
    written = [e.request_id for t in tasks for e in audit_entries(client, f'resource_id = "{t.id}"')]
    assert len(written) == 3 and all(uuid.UUID(r) for r in written) and len(set(written)) == 3, written


# ================================================================== 6. TLS and mTLS


@dataclass
class Pki:
    ca_pem: bytes
    server_cert: Path
    server_key: Path
    ca_file: Path
    client_cert_pem: bytes
    client_key_pem: bytes
    rogue_cert_pem: bytes
    rogue_key_pem: bytes


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str) -> tuple[x509.Certificate, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(ca: x509.Certificate, ca_key: Any, cn: str, server: bool) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn)).issuer_name(ca.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH if server else x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_private(key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key = _ca("nexus test CA")
    rogue_ca, rogue_key = _ca("rogue CA")
    server_cert, server_key = _leaf(ca, ca_key, "localhost", server=True)
    client_cert, client_key = _leaf(ca, ca_key, "client", server=False)
    rogue_cert, rogue_client_key = _leaf(rogue_ca, rogue_key, "client", server=False)
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    (d / "ca.pem").write_bytes(ca_pem)
    (d / "server.pem").write_bytes(server_cert)
    (d / "server.key").write_bytes(server_key)
    return Pki(ca_pem, d / "server.pem", d / "server.key", d / "ca.pem", client_cert, client_key, rogue_cert, rogue_client_key)


TLS_OPTIONS = [("grpc.ssl_target_name_override", "localhost")]


@contextlib.contextmanager
def tls_calling(address: str, secret: str, credentials: grpc.ChannelCredentials) -> Iterator[Stubs]:
    s = stubs(grpc.secure_channel(address, credentials, options=TLS_OPTIONS), f"Bearer {secret}")
    try:
        yield s
    finally:
        s.close()


def test_tls_serves_secure_channels_and_refuses_plaintext(client: Client, pki: Pki) -> None:
    config = make_config(client.database_url, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key))
    with running(config) as server:
        with tls_calling(addr(server), client.admin_secret, grpc.ssl_channel_credentials(root_certificates=pki.ca_pem)) as s:
            s.work.ListProjects(wpb.ListProjectsRequest(page_size=1), timeout=TIMEOUT)
        # TLS does not replace the API key: without it the call is still unauthenticated.
        with contextlib.closing(grpc.secure_channel(addr(server), grpc.ssl_channel_credentials(root_certificates=pki.ca_pem), options=TLS_OPTIONS)) as ch:
            unauthenticated(stubs(ch).work.ListProjects, wpb.ListProjectsRequest(), timeout=TIMEOUT, reason="MISSING_CREDENTIALS")
        with calling(addr(server), f"Bearer {client.admin_secret}") as plain:
            with pytest.raises(grpc.RpcError) as caught:
                plain.work.ListProjects(wpb.ListProjectsRequest(page_size=1), timeout=3)
            assert caught.value.code() == Code.UNAVAILABLE
        # A client that does not trust the server's CA refuses it.
        with tls_calling(addr(server), client.admin_secret, grpc.ssl_channel_credentials(root_certificates=_ca("other")[0].public_bytes(serialization.Encoding.PEM))) as s:
            with pytest.raises(grpc.RpcError) as caught:
                s.work.ListProjects(wpb.ListProjectsRequest(page_size=1), timeout=3)
            assert caught.value.code() == Code.UNAVAILABLE


def test_mtls_requires_a_client_certificate_from_the_client_ca(client: Client, pki: Pki) -> None:
    config = make_config(client.database_url, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key), tls_client_ca=str(pki.ca_file))
    with running(config) as server:
        without = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem)
        with tls_calling(addr(server), client.admin_secret, without) as s:
            with pytest.raises(grpc.RpcError) as caught:
                s.work.ListProjects(wpb.ListProjectsRequest(page_size=1), timeout=3)
            assert caught.value.code() == Code.UNAVAILABLE
        rogue = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem, private_key=pki.rogue_key_pem, certificate_chain=pki.rogue_cert_pem)
        with tls_calling(addr(server), client.admin_secret, rogue) as s:
            with pytest.raises(grpc.RpcError) as caught:
                s.work.ListProjects(wpb.ListProjectsRequest(page_size=1), timeout=3)
            assert caught.value.code() == Code.UNAVAILABLE
        good = grpc.ssl_channel_credentials(root_certificates=pki.ca_pem, private_key=pki.client_key_pem, certificate_chain=pki.client_cert_pem)
        with tls_calling(addr(server), client.admin_secret, good) as s:
            s.work.ListProjects(wpb.ListProjectsRequest(page_size=1), timeout=TIMEOUT)
        # The certificate proves the channel, not the caller: the API key is still required.
        with contextlib.closing(grpc.secure_channel(addr(server), good, options=TLS_OPTIONS)) as ch:
            unauthenticated(stubs(ch).work.ListProjects, wpb.ListProjectsRequest(), timeout=TIMEOUT, reason="MISSING_CREDENTIALS")


# ================================================================== 7. concurrency limit


class HeldStream:
    """A StreamEvents call read on a thread; `started` once its first response arrived."""

    def __init__(self, stub: chat_pb2_grpc.ChatServiceStub, request: cpb.StreamEventsRequest) -> None:
        self.call = stub.StreamEvents(request, timeout=60)
        self.started = threading.Event()
        self.error: grpc.RpcError | None = None
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for _ in self.call:
                self.started.set()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.started.set()

    def cancel(self) -> None:
        self.call.cancel()


def test_concurrency_limit_refuses_the_call_beyond_it(client: Client) -> None:
    channel = client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"busy {unique()}")))
    with running(make_config(client.database_url, max_concurrent_rpcs=2)) as server, calling(addr(server), f"Bearer {client.admin_secret}") as s:
        s.work.ListProjects(wpb.ListProjectsRequest(page_size=1), timeout=TIMEOUT)  # warm: the key is proven
        held = [HeldStream(s.chat, cpb.StreamEventsRequest(channel_ids=[channel.id], heartbeat_seconds=1)) for _ in range(2)]
        try:
            for h in held:
                assert h.started.wait(TIMEOUT) and h.error is None, h.error
            with pytest.raises(grpc.RpcError) as caught:
                s.work.ListProjects(wpb.ListProjectsRequest(page_size=1), timeout=TIMEOUT)
            assert caught.value.code() == Code.RESOURCE_EXHAUSTED, caught.value.details()
        finally:
            for h in held:
                h.cancel()
        deadline = time.monotonic() + TIMEOUT
        while True:  # the slots free up once the streams end
            try:
                s.work.ListProjects(wpb.ListProjectsRequest(page_size=1), timeout=TIMEOUT)
                break
            except grpc.RpcError as exc:
                if exc.code() != Code.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


# ================================================================== 8. secret scan


@dataclass
class Recorder:
    """Calls RPCs and keeps every response's (or error's) bytes for the scan."""

    seen: list[tuple[str, bytes]] = field(default_factory=list)

    def __call__(self, label: str, fn: Callable[..., Any], request: Any, expect: Code | None = None) -> Any:
        try:
            response = fn(request, timeout=TIMEOUT)
        except grpc.RpcError as exc:
            assert expect is not None and exc.code() == expect, f"{label}: {exc.code()} {exc.details()}"
            blob = (exc.details() or "").encode()
            for key, value in exc.trailing_metadata() or ():
                blob += key.encode() + (value if isinstance(value, bytes) else str(value).encode())
            self.seen.append((label, blob))
            rich_error(exc)
            return None
        assert expect is None, f"{label}: expected {expect}, got a response"
        self.seen.append((label, response.SerializeToString()))
        return response


def test_no_password_hash_or_api_key_secret_is_ever_returned_or_logged(
    client: Client, actor: Callable[..., Actor], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rec = Recorder()
    passwords = [f"pw-{uuid.uuid4().hex}" for _ in range(4)]
    secrets_: list[str] = [client.admin_secret]

    # As admin: users with passwords, password changes, keys, authentication, reads, errors.
    u1 = rec("CreateUser", client.identity.CreateUser, ipb.CreateUserRequest(user=ipb.User(username=unique("u"), email=f"{unique()}@example.com", password=passwords[0])))
    u2 = rec("CreateUser", client.identity.CreateUser, ipb.CreateUserRequest(user=ipb.User(username=unique("u"), email=f"{unique()}@example.com", password=passwords[1], external_id=unique("ext"))))
    rec("UpdateUser password", client.identity.UpdateUser, ipb.UpdateUserRequest(user=ipb.User(id=u1.id, password=passwords[2]), update_mask=mask("password")))
    rec("EnsureUser", client.identity.EnsureUser, ipb.EnsureUserRequest(user=ipb.User(username=unique("u"), email=f"{unique()}@example.com", external_id=unique("ext"), password=passwords[3])))
    rec("AuthenticateUser ok", client.identity.AuthenticateUser, ipb.AuthenticateUserRequest(login=u1.username, password=passwords[2]))
    rec("AuthenticateUser old", client.identity.AuthenticateUser, ipb.AuthenticateUserRequest(login=u1.username, password=passwords[0]))
    rec("AuthenticateUser unknown", client.identity.AuthenticateUser, ipb.AuthenticateUserRequest(login=unique("nobody"), password=passwords[1]))
    rec("CreateUser duplicate", client.identity.CreateUser, ipb.CreateUserRequest(user=ipb.User(username=u1.username, email=f"{unique()}@example.com", password=passwords[1])), Code.ALREADY_EXISTS)
    rec("CreateUser weak", client.identity.CreateUser, ipb.CreateUserRequest(user=ipb.User(username=unique("u"), email=f"{unique()}@example.com", password="short")), Code.INVALID_ARGUMENT)

    created_key_responses: list[bytes] = []
    for fields in ({"role": ipb.USER_ROLE_USER, "user_id": u1.id}, {"role": ipb.USER_ROLE_GUEST, "expire_time": future()}):
        key = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), **fields)), timeout=TIMEOUT)
        assert key.secret
        secrets_.append(key.secret)
        created_key_responses.append(key.SerializeToString())  # the one response allowed to carry it: not scanned
        rec("GetApiKey", client.identity.GetApiKey, ipb.GetApiKeyRequest(id=key.id))
        rec("UpdateApiKey", client.identity.UpdateApiKey, ipb.UpdateApiKeyRequest(api_key=ipb.ApiKey(id=key.id, name=unique("k")), update_mask=mask("name")))
    rec("ListApiKeys", client.identity.ListApiKeys, ipb.ListApiKeysRequest(page_size=1000))
    rec("RevokeApiKey", client.identity.RevokeApiKey, ipb.RevokeApiKeyRequest(id=client.identity.ListApiKeys(ipb.ListApiKeysRequest(filter=f'user_id = "{u1.id}"')).api_keys[0].id))
    rec("GetUser", client.identity.GetUser, ipb.GetUserRequest(id=u1.id))
    rec("ListUsers", client.identity.ListUsers, ipb.ListUsersRequest(page_size=1000))
    rec("SearchUsers", client.identity.SearchUsers, ipb.SearchUsersRequest(query=u1.username))
    rec("BatchGetUsers", client.identity.BatchGetUsers, ipb.BatchGetUsersRequest(ids=[u1.id, u2.id]))
    rec("LookupUser", client.identity.LookupUser, ipb.LookupUserRequest(username=u1.username))

    # As a user: its own password and key, its reads, refusals.
    me = actor()
    secrets_.append(me.key.secret)
    rec("user UpdateUser password", me.c.identity.UpdateUser, ipb.UpdateUserRequest(user=ipb.User(id=me.id, password=passwords[0]), update_mask=mask("password")))
    try:
        own = me.c.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"))), timeout=TIMEOUT)
        secrets_.append(own.secret)
        created_key_responses.append(own.SerializeToString())
    except grpc.RpcError as exc:  # the defaulting of user_id is another test's business
        rec.seen.append(("user CreateApiKey", (exc.details() or "").encode()))
    rec("user ListApiKeys", me.c.identity.ListApiKeys, ipb.ListApiKeysRequest(page_size=1000))
    rec("user GetApiKey", me.c.identity.GetApiKey, ipb.GetApiKeyRequest(id=me.key.id))
    rec("user GetUser", me.c.identity.GetUser, ipb.GetUserRequest(id=me.id))
    rec("user SearchUsers", me.c.identity.SearchUsers, ipb.SearchUsersRequest(query=u1.username))
    rec("user ListUsers", me.c.identity.ListUsers, ipb.ListUsersRequest(page_size=1000))
    rec("user UpdateUser other", me.c.identity.UpdateUser, ipb.UpdateUserRequest(user=ipb.User(id=u1.id, password=passwords[1]), update_mask=mask("password")), Code.PERMISSION_DENIED)
    rec("user AuthenticateUser", me.c.identity.AuthenticateUser, ipb.AuthenticateUserRequest(login=u1.username, password=passwords[2]), Code.PERMISSION_DENIED)
    rec("user CreateApiKey role", me.c.identity.CreateApiKey, ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_ADMIN)), Code.PERMISSION_DENIED)

    # Credentials that fail: a revoked key, a wrong secret with a real prefix, a garbage token.
    revoked_secret = secrets_[1]
    wrong = f"{revoked_secret.split('.')[0]}.{uuid.uuid4().hex}"
    secrets_.append(wrong)
    for header in (f"Bearer {revoked_secret}", f"Bearer {wrong}", "Bearer garbage-token", f"Basic {revoked_secret}"):
        with calling(client.address, header) as s:
            rec("bad credentials", s.identity.ListUsers, ipb.ListUsersRequest(), Code.UNAUTHENTICATED)

    # The audit trail of all of it, as admin.
    rec("ListAuditLogEntries", client.security.ListAuditLogEntries, spb.ListAuditLogEntriesRequest(page_size=1000, order_by="create_time desc"))
    rec("ListAuditLogEntries users", client.security.ListAuditLogEntries, spb.ListAuditLogEntriesRequest(page_size=1000, filter='resource_type = "User"', order_by="create_time desc"))
    rec("ListAuditLogEntries keys", client.security.ListAuditLogEntries, spb.ListAuditLogEntriesRequest(page_size=1000, filter='resource_type = "ApiKey"', order_by="create_time desc"))
    rec("SearchAuditLogEntries", client.security.SearchAuditLogEntries, spb.SearchAuditLogEntriesRequest(query="password"))

    needles: list[tuple[str, bytes]] = [("password", p.encode()) for p in passwords]
    for secret in secrets_:
        needles.append(("API key secret", secret.encode()))
        needles.append(("API key secret (random part)", secret.split(".", 1)[1].encode()))
    needles.append(("argon2 hash", b"$argon2"))
    for created in created_key_responses:  # sanity: the needles do find what they look for
        assert any(n in created for _, n in needles)

    logs = "\n".join(
        f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records
    ) + caplog.text
    assert caplog.records, "the server's logging was not captured"
    leaks = [f"{what} in response {label}" for label, blob in rec.seen for what, needle in needles if needle in blob]
    leaks += [f"{what} in the log" for what, needle in needles if needle.decode() in logs]
    offending = [r for r in caplog.records if any(n.decode() in r.getMessage() for _, n in needles)]
    detail = "; ".join(f"{r.name}: {r.getMessage()[:300]}" for r in offending[:3])
    assert not leaks, f"{sorted(set(leaks))}; e.g. {detail}"
