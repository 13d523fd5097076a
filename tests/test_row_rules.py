"""Row rules on every way a row can be reached, on SQLite and on PostgreSQL.

A request id is its caller's own (a replay by another caller is a new request, and a replay by
the same caller passes the read rule of a Get); "mine" is never true for a caller without a
user (rows whose owner is NULL stay hidden from it); force delete, task creation, thread
parents and show_deleted follow the rows' owners.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc
import pytest
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.security.v1 import security_pb2 as spb
from nexus.work.v1 import work_pb2 as wpb
from sqlalchemy.dialects import postgresql, sqlite

from db.engine import rules
from db.engine.resource import REGISTRY
from tests.conftest import Client, connect, unique
from tests.support import MADE_BY_CREATE, SAMPLES, expect_error, new_user
from tests.test_access import Actor, actor, chat_message, conversation_of, first_stream_item, new_key, private_channel  # noqa: F401
from tests.test_standard_methods import SPECS, Api

Code = grpc.StatusCode


def keyless_user(client: Client, role: int) -> Client:
    """A client calling with a key of `role` that acts for no user."""
    key = new_key(client, role=role)
    return connect(client.backend, client.database_url, client.server, secret=key.secret)


def add_member(client: Client, channel_id: str, user_id: str) -> None:
    client.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=channel_id, user_id=user_id))


def create_message(c: Client, channel_id: str, content: str, request_id: str) -> cpb.ChatMessage:
    return c.chat.CreateChatMessage(
        cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel_id, content=content), request_id=request_id)
    )


# ------------------------------------------------------------------ request ids belong to their caller


def test_another_callers_request_id_is_a_new_request_not_a_replay(client: Client, actor: Callable[..., Actor]) -> None:
    alice, mallory = actor(), actor()
    secret = private_channel(alice)
    request_id = str(uuid.uuid4())
    private = create_message(alice.c, secret.id, "the launch code is 0000", request_id)
    # Mallory learns the request id: sent into Alice's channel it is a new request Mallory may not make ...
    err = expect_error(Code.PERMISSION_DENIED, create_message, mallory.c, secret.id, "x", request_id)
    assert "launch code" not in err.message
    # ... and into Mallory's own channel it makes Mallory's message.
    public = mallory.c.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"open {unique()}")))
    own = create_message(mallory.c, public.id, "hello", request_id)
    assert own.id != private.id and own.content == "hello" and own.author_id == mallory.id
    # Alice's retry still answers her first result.
    assert create_message(alice.c, secret.id, "other text", request_id) == private


def test_request_id_replay_of_conversation_messages_and_api_keys_is_per_caller(client: Client, actor: Callable[..., Actor]) -> None:
    alice, mallory = actor(), actor()
    request_id = str(uuid.uuid4())
    theirs = conversation_of(alice.c, alice.id)
    mine = conversation_of(mallory.c, mallory.id)

    def say(c: Client, conversation_id: str, content: str) -> cpb.ConversationMessage:
        message = cpb.ConversationMessage(conversation_id=conversation_id, sender_type=cpb.SENDER_TYPE_USER, content=content)
        return c.chat.CreateConversationMessage(cpb.CreateConversationMessageRequest(conversation_message=message, request_id=request_id))

    secret = say(alice.c, theirs.id, "my diagnosis")
    answer = say(mallory.c, mine.id, "hi")
    assert answer.id != secret.id and answer.content == "hi"
    # An admin's key made with a request id; another caller's CreateApiKey with it makes its own key.
    admin_key = client.identity.CreateApiKey(
        ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("ops"), role=ipb.USER_ROLE_ADMIN), request_id=request_id)
    )
    own_key = mallory.c.identity.CreateApiKey(
        ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("mine")), request_id=request_id)
    )
    assert own_key.id != admin_key.id and own_key.user_id == mallory.id and own_key.secret


def test_replay_by_the_same_caller_passes_the_read_rule(client: Client, actor: Callable[..., Actor]) -> None:
    owner, member = actor(), actor()
    channel = private_channel(owner)
    add_member(client, channel.id, member.id)
    request_id = str(uuid.uuid4())
    first = create_message(member.c, channel.id, "while a member", request_id)
    assert create_message(member.c, channel.id, "while a member", request_id) == first
    client.chat.RemoveChannelMember(cpb.RemoveChannelMemberRequest(channel_id=channel.id, user_id=member.id))
    err = expect_error(Code.PERMISSION_DENIED, create_message, member.c, channel.id, "while a member", request_id)
    assert "while a member" not in err.message


# ------------------------------------------------------------------ a caller without a user owns nothing


@pytest.mark.parametrize("role", ["guest", "user", "manager"])
def test_no_row_rule_matches_null_owners_for_a_caller_without_a_user(role: str) -> None:
    """Every read and manage predicate of the policy table, for a caller without a user, as SQL:
    none compares an owner column with NULL (which would match rows whose owner is unset)."""
    for spec in REGISTRY:
        resource = spec.name
        for make in (rules.read_predicate, rules.manage_predicate):
            predicate = make(spec, role, None)
            if predicate is None:
                continue
            for dialect in (sqlite.dialect(), postgresql.dialect()):
                sql = str(predicate.compile(dialect=dialect, compile_kwargs={"literal_binds": True})).upper()
                assert "IS NULL" not in sql, f"{resource} {make.__name__} for a {role} without a user: {sql}"


def test_private_channel_without_a_creator_is_hidden_from_a_key_without_a_user(client: Client) -> None:
    # The bootstrap admin key acts for no user: its channel's creator is NULL.
    channel = client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"ops {unique()}", is_private=True)))
    assert not channel.creator_id
    message = chat_message(client, channel.id, "rotation schedule")
    for role in (ipb.USER_ROLE_GUEST, ipb.USER_ROLE_USER):
        guest = keyless_user(client, role)
        try:
            listed = guest.chat.ListChannels(cpb.ListChannelsRequest(page_size=1000)).channels
            assert channel.id not in {c.id for c in listed}
            expect_error(Code.PERMISSION_DENIED, guest.chat.GetChannel, cpb.GetChannelRequest(id=channel.id))
            found = guest.chat.SearchChannels(cpb.SearchChannelsRequest(query=channel.name.split()[1])).results
            assert channel.id not in {r.channel.id for r in found}
            messages = guest.chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=f'channel_id = "{channel.id}"')).chat_messages
            assert list(messages) == []
            expect_error(Code.PERMISSION_DENIED, guest.chat.GetChatMessage, cpb.GetChatMessageRequest(id=message.id))
            expect_error(
                Code.PERMISSION_DENIED, first_stream_item, guest.chat, cpb.StreamEventsRequest(channel_ids=[channel.id])
            )
        finally:
            guest.channel.close()


# ------------------------------------------------------------------ force delete, cascades


SOFT = [s.name for s in SPECS if s.soft_delete]


@pytest.mark.parametrize("resource", SOFT)
def test_force_delete_is_for_admins_only(client: Client, actor: Callable[..., Actor], resource: str) -> None:
    admin = Api(client, REGISTRY[resource])
    row = admin.create()
    for role in (ipb.USER_ROLE_USER, ipb.USER_ROLE_MANAGER):
        caller = Api(actor(role).c, REGISTRY[resource])
        err = expect_error(Code.PERMISSION_DENIED, caller.call, "Delete{E}", id=row.id, force=True)
        assert err.info.reason == "FORCE_DELETE_ADMIN_ONLY"
    assert admin.get(row.id) == row


def audit_of(client: Client, resource_id: str) -> list[spb.AuditLogEntry]:
    return list(client.security.ListAuditLogEntries(
        spb.ListAuditLogEntriesRequest(filter=f'resource_id = "{resource_id}"', page_size=100)
    ).audit_log_entries)


def last_change(client: Client, resource_id: str, action: int) -> spb.AuditLogEntry:
    entries = [e for e in audit_of(client, resource_id) if e.action == action]
    assert entries, f"no {spb.AuditAction.Name(action)} entry for {resource_id}"
    return max(entries, key=lambda e: (e.create_time.seconds, e.create_time.nanos))


def test_force_deleting_a_user_audits_every_row_its_cascade_removes_or_changes(client: Client) -> None:
    gone = new_user(client)
    key = new_key(client, user_id=gone.id)
    conversation = conversation_of(client, gone.id)
    said = client.chat.CreateConversationMessage(cpb.CreateConversationMessageRequest(conversation_message=cpb.ConversationMessage(
        conversation_id=conversation.id, sender_type=cpb.SENDER_TYPE_USER, content="hello")))
    made = client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"by {unique()}", creator_id=gone.id)))
    joined = client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"with {unique()}")))
    add_member(client, joined.id, gone.id)
    project = client.work.CreateProject(wpb.CreateProjectRequest(project=wpb.Project(name=f"P {unique()}", owner_id=new_user(client).id)))
    task = client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="t", assignee_id=gone.id)))

    client.identity.DeleteUser(ipb.DeleteUserRequest(id=gone.id, force=True))

    for removed in (key.id, conversation.id, said.id):
        entry = last_change(client, removed, spb.AUDIT_ACTION_DELETE)
        assert entry.request_id and entry.method.endswith("DeleteUser")
    creator = {c.field: c for c in last_change(client, made.id, spb.AUDIT_ACTION_UPDATE).changes}["creator_id"]
    assert (creator.old_value.string_value, creator.new_value.WhichOneof("kind")) == (gone.id, "null_value")
    members = {c.field: c for c in last_change(client, joined.id, spb.AUDIT_ACTION_UPDATE).changes}["member_ids"]
    assert gone.id in [v.string_value for v in members.old_value.list_value.values]
    assert gone.id not in [v.string_value for v in members.new_value.list_value.values]
    assignee = {c.field: c for c in last_change(client, task.id, spb.AUDIT_ACTION_UPDATE).changes}["assignee_id"]
    assert assignee.old_value.string_value == gone.id
    assert client.chat.GetChannel(cpb.GetChannelRequest(id=joined.id)).member_ids == []


def test_a_cascade_blocked_by_a_dependent_changes_nothing(client: Client) -> None:
    owner = new_user(client)
    key = new_key(client, user_id=owner.id)
    client.work.CreateProject(wpb.CreateProjectRequest(project=wpb.Project(name=f"P {unique()}", owner_id=owner.id)))
    before = len(audit_of(client, key.id))
    err = expect_error(Code.FAILED_PRECONDITION, client.identity.DeleteUser, ipb.DeleteUserRequest(id=owner.id, force=True))
    assert (err.info.reason, err.info.metadata["dependents"]) == ("HAS_DEPENDENTS", "1 Project (owner_id)")
    assert client.identity.GetApiKey(ipb.GetApiKeyRequest(id=key.id)).id == key.id
    assert len(audit_of(client, key.id)) == before


def test_a_cascade_of_too_many_rows_is_refused_naming_them(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    from db.engine import cascade

    monkeypatch.setattr(cascade, "MAX_CASCADE_ROWS", 2)
    channel = client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"busy {unique()}")))
    messages = [chat_message(client, channel.id, f"m{i}") for i in range(3)]
    err = expect_error(Code.FAILED_PRECONDITION, client.chat.DeleteChannel, cpb.DeleteChannelRequest(id=channel.id, force=True))
    assert err.info.reason == "TOO_MANY_DEPENDENTS" and "3 ChatMessage" in err.info.metadata["dependents"]
    for m in messages:
        assert client.chat.GetChatMessage(cpb.GetChatMessageRequest(id=m.id)).content == m.content
    monkeypatch.setattr(cascade, "MAX_CASCADE_ROWS", 10)
    client.chat.DeleteChannel(cpb.DeleteChannelRequest(id=channel.id, force=True))
    for m in messages:
        assert [e.action for e in audit_of(client, m.id)] == [spb.AUDIT_ACTION_CREATE, spb.AUDIT_ACTION_DELETE]


# ------------------------------------------------------------------ who creates tasks, and where


def test_a_task_is_created_by_its_caller_in_a_project_it_works_in(client: Client, actor: Callable[..., Actor]) -> None:
    owner, member, stranger, other = actor(ipb.USER_ROLE_MANAGER), actor(), actor(), new_user(client)
    project = client.work.CreateProject(wpb.CreateProjectRequest(project=wpb.Project(name=f"P {unique()}", owner_id=owner.id)))
    client.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=member.id))

    def create(c: Client, **fields: object) -> wpb.Task:
        return c.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"t {unique()}", **fields)))

    assert create(owner.c).creator_id == owner.id
    assert create(member.c).creator_id == member.id
    err = expect_error(Code.PERMISSION_DENIED, create, member.c, creator_id=other.id)
    assert (err.info.reason, err.info.metadata["field"]) == ("FIELD_ACCESS_DENIED", "task.creator_id")
    err = expect_error(Code.PERMISSION_DENIED, create, stranger.c, assignee_id=stranger.id)
    assert err.info.reason == "PROJECT_ACCESS_DENIED"
    batch = wpb.BatchCreateTasksRequest(requests=[wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="b"))])
    assert expect_error(Code.PERMISSION_DENIED, stranger.c.work.BatchCreateTasks, batch).info.reason == "PROJECT_ACCESS_DENIED"
    keyless = keyless_user(client, ipb.USER_ROLE_MANAGER)
    try:
        assert expect_error(Code.PERMISSION_DENIED, create, keyless).info.reason == "PROJECT_ACCESS_DENIED"
    finally:
        keyless.channel.close()
    listed = client.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"')).tasks
    assert sorted(t.creator_id for t in listed) == sorted([owner.id, member.id])
    assert create(client, creator_id=other.id).creator_id == other.id  # an admin records another creator


# ------------------------------------------------------------------ references are no oracle


def test_a_reply_to_a_message_the_caller_may_not_see_is_denied_like_a_missing_one(client: Client, actor: Callable[..., Actor]) -> None:
    alice, mallory = actor(), actor()
    hidden = chat_message(alice.c, private_channel(alice).id, "hidden")
    public = mallory.c.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"open {unique()}")))

    def reply(parent_id: str) -> cpb.ChatMessage:
        return mallory.c.chat.CreateChatMessage(cpb.CreateChatMessageRequest(
            chat_message=cpb.ChatMessage(channel_id=public.id, content="re", parent_id=parent_id)))

    answers = [expect_error(Code.PERMISSION_DENIED, reply, parent) for parent in (hidden.id, str(uuid.uuid4()))]
    assert [(a.info.reason, a.info.metadata["field"]) for a in answers] == [("REFERENCE_ACCESS_DENIED", "chat_message.parent_id")] * 2
    own = chat_message(mallory.c, public.id, "mine")
    assert reply(own.id).parent_id == own.id


# ------------------------------------------------------------------ show_deleted


def test_show_deleted_shows_deleted_rows_only_to_those_who_manage_them(client: Client, actor: Callable[..., Actor]) -> None:
    author, reader = actor(), actor(ipb.USER_ROLE_GUEST)
    channel = author.c.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"open {unique()}")))
    message = chat_message(author.c, channel.id, "regretted")
    author.c.chat.DeleteChatMessage(cpb.DeleteChatMessageRequest(id=message.id))
    in_channel = f'channel_id = "{channel.id}"'

    def listed(c: Client) -> list[str]:
        return [m.id for m in c.chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=in_channel, show_deleted=True)).chat_messages]

    assert listed(author.c) == [message.id] and listed(client) == [message.id]
    assert listed(reader.c) == []
    assert author.c.chat.GetChatMessage(cpb.GetChatMessageRequest(id=message.id, show_deleted=True)).content == "regretted"
    expect_error(Code.PERMISSION_DENIED, reader.c.chat.GetChatMessage, cpb.GetChatMessageRequest(id=message.id, show_deleted=True))
    assert listed(reader.c) == [] and reader.c.chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=in_channel)).total_size == 0


@pytest.mark.parametrize("resource", [s.name for s in MADE_BY_CREATE if s.owner_field])  # an upload has no owner to name
def test_a_caller_other_than_an_admin_owns_what_it_creates(client: Client, actor: Callable[..., Actor], resource: str) -> None:
    """Every resource's owner field (a task's creator, a message's author, a project's owner…):
    naming another user as owner is PERMISSION_DENIED FIELD_ACCESS_DENIED for a non-admin, and
    changes nothing; naming itself is the same as leaving it unset."""
    spec = REGISTRY[resource]
    caller = Api(actor(ipb.USER_ROLE_MANAGER).c, spec)
    fields = SAMPLES[resource].fields(client, unique("own"))
    fields[spec.owner_field] = new_user(client).id
    before = Api(client, spec).call("List{Es}", page_size=1).total_size
    err = expect_error(Code.PERMISSION_DENIED, caller.call, "Create{E}", **{spec.singular_field: spec.message(**fields)})
    assert (err.info.reason, err.info.metadata["field"]) == ("FIELD_ACCESS_DENIED", f"{spec.singular_field}.{spec.owner_field}")
    assert Api(client, spec).call("List{Es}", page_size=1).total_size == before
