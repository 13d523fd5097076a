"""Hard deletes and their dependents, the stream log after deletes and access changes, request
records across migration 0005, key names and e-mail verification: on SQLite and PostgreSQL.
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

from tests.conftest import Client, connect, unique
from tests.support import expect_error, new_user
from tests.test_access import Actor, actor, chat_message, conversation_of, new_key, private_channel  # noqa: F401

Code = grpc.StatusCode


def reply(c: Client, channel_id: str, parent_id: str, content: str = "re") -> cpb.ChatMessage:
    return c.chat.CreateChatMessage(cpb.CreateChatMessageRequest(
        chat_message=cpb.ChatMessage(channel_id=channel_id, content=content, parent_id=parent_id)))


def test_force_delete_of_a_channel_whose_messages_have_a_reply(client: Client) -> None:
    """A channel whose messages have replies is deleted for good, replies before the messages they answer, each audited."""
    channel = client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"thread {unique()}")))
    root = chat_message(client, channel.id, "root")
    r1 = reply(client, channel.id, root.id)
    client.chat.DeleteChannel(cpb.DeleteChannelRequest(id=channel.id, force=True))
    for gone in (root, r1):
        expect_error(Code.NOT_FOUND, client.chat.GetChatMessage, cpb.GetChatMessageRequest(id=gone.id, show_deleted=True))
    entries = client.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(filter=f'resource_id = "{r1.id}"')).audit_log_entries
    assert [e.action for e in entries] == [spb.AUDIT_ACTION_CREATE, spb.AUDIT_ACTION_DELETE]


def test_force_delete_of_a_task_with_dependencies_moves_the_etag_of_tasks_that_depended_on_it(client: Client) -> None:
    """A task deleted for good leaves the tasks that depended on it with a new etag and update_time."""
    owner = new_user(client)
    project = client.work.CreateProject(wpb.CreateProjectRequest(project=wpb.Project(name=f"P {unique()}", owner_id=owner.id)))
    a = client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="a")))
    b = client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="b")))
    client.work.AddTaskDependency(wpb.AddTaskDependencyRequest(task_id=b.id, depends_on_task_id=a.id))
    before = client.work.GetTask(wpb.GetTaskRequest(id=b.id))
    assert list(before.dependency_ids) == [a.id]
    client.work.DeleteTask(wpb.DeleteTaskRequest(id=a.id, force=True))
    after = client.work.GetTask(wpb.GetTaskRequest(id=b.id))
    assert list(after.dependency_ids) == []
    # The cascade changed b (its audit entry says so), so its etag and update_time move (AIP-154),
    # as AddTaskDependency / RemoveTaskDependency move them.
    assert after.etag != before.etag
    assert (after.update_time.seconds, after.update_time.nanos) != (before.update_time.seconds, before.update_time.nanos)


def test_force_deleting_a_member_moves_the_etag_of_its_channels(client: Client) -> None:
    """A user deleted for good leaves the channels it was a member of with a new etag."""
    gone = new_user(client)
    channel = client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"with {unique()}")))
    client.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=channel.id, user_id=gone.id))
    before = client.chat.GetChannel(cpb.GetChannelRequest(id=channel.id))
    client.identity.DeleteUser(ipb.DeleteUserRequest(id=gone.id, force=True))
    after = client.chat.GetChannel(cpb.GetChannelRequest(id=channel.id))
    assert list(after.member_ids) == [] and list(before.member_ids) == [gone.id]
    assert after.etag != before.etag


def test_force_delete_of_the_root_of_a_deep_thread(client: Client, actor: Callable[..., Actor]) -> None:
    """The root of a thread 1,000 replies deep is deleted for good with all of them (no recursion)."""
    troll = actor()
    channel = client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"deep {unique()}")))
    parent = root = chat_message(troll.c, channel.id, "root")
    for i in range(1000):
        parent = reply(troll.c, channel.id, parent.id, f"r{i}")
    client.chat.DeleteChatMessage(cpb.DeleteChatMessageRequest(id=root.id, force=True))
    expect_error(Code.NOT_FOUND, client.chat.GetChatMessage, cpb.GetChatMessageRequest(id=parent.id, show_deleted=True))


# ------------------------------------------------------------------ migration 0005 on real data


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request: pytest.FixtureRequest, tmp_path) -> object:
    from tests.databases import fresh_postgres_database

    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'records.db'}"
    else:
        with fresh_postgres_database("nexus_records") as url:
            yield url


def test_migration_0005_keeps_replays_of_request_ids_made_through_the_api(fresh_url: str) -> None:
    """A request record made through the API before 0005 still answers its caller's retry after it."""
    from db import migrate
    from db.database import Database
    from tests.conftest import ServerThread, make_config

    backend = "postgresql" if fresh_url.startswith("postgresql") else "sqlite"
    request_id = str(uuid.uuid4())
    server = ServerThread(make_config(fresh_url)).start()
    try:
        c = connect(backend, fresh_url, server)
        secret = c.admin_secret
        owner = new_user(c)
        project = c.work.CreateProject(wpb.CreateProjectRequest(project=wpb.Project(name=f"P {unique()}", owner_id=owner.id)))
        first = c.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="once"), request_id=request_id))
        c.channel.close()
    finally:
        server.stop()
    # The database as 0004 left it (records without a principal), then the upgrade an operator runs.
    database = Database(fresh_url)
    try:
        migrate.downgrade(database.engine, "0004")
        migrate.upgrade(database.engine)
    finally:
        database.dispose()
    server = ServerThread(make_config(fresh_url)).start()
    try:
        c = connect(backend, fresh_url, server, secret=secret)
        again = c.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="once"), request_id=request_id))
        listed = c.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"')).tasks
        c.channel.close()
    finally:
        server.stop()
    # The same caller's retry after the upgrade answers the first result; no second task.
    assert again.id == first.id
    assert [t.id for t in listed] == [first.id]


# ------------------------------------------------------------------ StreamEvents


class Collector:
    """Reads a stream on a thread; items() waits for what arrived."""

    def __init__(self, stub, request: cpb.StreamEventsRequest, timeout: float = 20) -> None:
        import queue
        import threading

        self.call = stub.StreamEvents(request, timeout=timeout)
        self.queue: queue.Queue[object] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for item in self.call:
                self.queue.put(item)
        except grpc.RpcError as exc:
            self.queue.put(exc)
        self.queue.put(None)

    def until(self, done: Callable[[object], bool], seconds: float) -> list[object]:
        """Items until one satisfies done (or the stream ends, or seconds pass)."""
        import queue
        import time

        end = time.monotonic() + seconds
        out: list[object] = []
        while time.monotonic() < end:
            try:
                item = self.queue.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                break
            out.append(item)
            if item is None or done(item):
                break
        return out

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(5)


def is_heartbeat(item: object) -> bool:
    return isinstance(item, cpb.StreamEventsResponse) and item.type == cpb.EVENT_TYPE_HEARTBEAT


def contents(items: list[object]) -> list[str]:
    return [i.chat_message.content for i in items if isinstance(i, cpb.StreamEventsResponse) and i.HasField("chat_message")]


def forged_token(channel_id: str, position: int = 0) -> str:
    from db.engine.events import encode_token

    return encode_token({f"channels/{channel_id}": position})


def test_stream_history_does_not_show_soft_deleted_messages_to_readers_who_do_not_manage_them(
    client: Client, actor: Callable[..., Actor]
) -> None:
    """A resume from before a soft delete does not bring back the deleted message's content."""
    author, reader = actor(), actor(ipb.USER_ROLE_GUEST)
    channel = author.c.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"open {unique()}")))
    message = chat_message(author.c, channel.id, "regretted: my home address")
    author.c.chat.DeleteChatMessage(cpb.DeleteChatMessageRequest(id=message.id))
    # The reader may not see it (show_deleted answers nothing) ...
    listed = reader.c.chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=f'channel_id = "{channel.id}"', show_deleted=True))
    assert list(listed.chat_messages) == []
    # ... but a resume token (checksummed, not signed: anyone can write one) replays the log.
    stream = Collector(reader.c.chat, cpb.StreamEventsRequest(resume_token=forged_token(channel.id), heartbeat_seconds=1))
    try:
        items = stream.until(is_heartbeat, 10)
    finally:
        stream.close()
    assert "regretted: my home address" not in contents(items)


def test_force_deleted_message_is_not_served_from_the_stream_log(client: Client, actor: Callable[..., Actor]) -> None:
    """A resume from before a force delete does not bring back the removed message's content."""
    author, reader = actor(), actor(ipb.USER_ROLE_GUEST)
    channel = author.c.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"open {unique()}")))
    message = chat_message(author.c, channel.id, "leaked: the database password")
    client.chat.DeleteChatMessage(cpb.DeleteChatMessageRequest(id=message.id, force=True))  # the admin erases it
    expect_error(Code.NOT_FOUND, client.chat.GetChatMessage, cpb.GetChatMessageRequest(id=message.id, show_deleted=True))
    stream = Collector(reader.c.chat, cpb.StreamEventsRequest(resume_token=forged_token(channel.id), heartbeat_seconds=1))
    try:
        items = stream.until(is_heartbeat, 10)
    finally:
        stream.close()
    assert "leaked: the database password" not in contents(items)


def test_force_deleting_a_thread_root_tells_subscribers_about_its_replies(client: Client) -> None:
    """Subscribers hear of every reply a force delete of a thread root removes."""
    channel = client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"thread {unique()}")))
    root = chat_message(client, channel.id, "root")
    answer = reply(client, channel.id, root.id, "answer")
    stream = Collector(client.chat, cpb.StreamEventsRequest(channel_ids=[channel.id], heartbeat_seconds=1))
    try:
        assert any(is_heartbeat(i) for i in stream.until(is_heartbeat, 10))
        client.chat.DeleteChatMessage(cpb.DeleteChatMessageRequest(id=root.id, force=True))
        expect_error(Code.NOT_FOUND, client.chat.GetChatMessage, cpb.GetChatMessageRequest(id=answer.id, show_deleted=True))
        items = stream.until(lambda i: False, 3)
    finally:
        stream.close()
    deleted = {i.chat_message.id for i in items if isinstance(i, cpb.StreamEventsResponse) and i.type == cpb.EVENT_TYPE_DELETED}
    # "every message created, edited or deleted": the reply went too, and a subscriber must learn it.
    assert deleted == {root.id, answer.id}


def test_migration_0005_downgrade_keeps_the_first_record_of_a_request_id(fresh_url: str) -> None:
    """0005's downgrade keeps the first record made of a request id that two callers used."""
    import datetime as dt

    from sqlalchemy import text

    import db.domains  # noqa: F401 - every table on the metadata
    from db import migrate
    from db.base import Base
    from db.database import Database

    database = Database(fresh_url)
    try:
        migrate.upgrade(database.engine)
        uid = Base.metadata.tables["request_records"].c.id.type
        first_row, second_row = uuid.uuid4(), uuid.uuid4()
        early = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
        with database.engine.begin() as conn:
            store = uid.bind_processor(conn.dialect) or (lambda v: v)
            for record_id, who, resource, when in (
                (uuid.UUID("ffffffff-ffff-4fff-bfff-ffffffffffff"), "api_key:alice", first_row, early),
                (uuid.UUID("00000000-0000-4000-8000-000000000000"), "api_key:mallory", second_row, early + dt.timedelta(hours=1)),
            ):
                conn.execute(
                    text("INSERT INTO request_records (id, resource_type, principal, request_id, resource_id, create_time) "
                         "VALUES (:id, 'Task', :who, 'r-1', :res, :at)"),
                    {"id": store(record_id), "who": who, "res": store(resource), "at": when},
                )
        migrate.downgrade(database.engine, "0004")
        with database.engine.connect() as conn:
            kept = [uuid.UUID(str(v)) for v in conn.execute(text("SELECT resource_id FROM request_records WHERE request_id = 'r-1'")).scalars()]
    finally:
        database.dispose()
    assert kept == [first_row]


def test_api_key_names_of_other_users_do_not_leak_through_already_exists(client: Client, actor: Callable[..., Actor]) -> None:
    """Key names are unique per user: another user's key name is not revealed by ALREADY_EXISTS."""
    alice, mallory = actor(), actor()
    name = unique("billing-prod")
    alice.c.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=name)))
    # Mallory may not see Alice's key (List/Get hide it) ...
    assert name not in {k.name for k in mallory.c.identity.ListApiKeys(ipb.ListApiKeysRequest(page_size=1000)).api_keys}
    # ... yet a create with its name answers ALREADY_EXISTS: a name oracle for hidden keys, and squatting.
    mallory.c.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=name)))


# ------------------------------------------------------------------ what a user may change about itself


def test_a_user_may_not_lift_the_expiry_an_admin_gave_its_key(client: Client) -> None:
    """A key's user may not clear or push back the expiry an admin gave it."""
    from google.protobuf import field_mask_pb2

    from tests.test_access import future

    user = new_user(client)
    key = new_key(client, user_id=user.id, expire_time=future(1))
    c = connect(client.backend, client.database_url, client.server, secret=key.secret)
    try:
        for expire_time in (None, future(3650)):
            api_key = ipb.ApiKey(id=key.id) if expire_time is None else ipb.ApiKey(id=key.id, expire_time=expire_time)
            expect_error(
                Code.PERMISSION_DENIED, c.identity.UpdateApiKey,
                ipb.UpdateApiKeyRequest(api_key=api_key, update_mask=field_mask_pb2.FieldMask(paths=["expire_time"])),
            )
    finally:
        c.channel.close()
    assert client.identity.GetApiKey(ipb.GetApiKeyRequest(id=key.id)).expire_time == key.expire_time


def test_a_user_changing_its_email_is_no_longer_verified(client: Client, actor: Callable[..., Actor]) -> None:
    """A user who changes its e-mail is no longer verified."""
    from google.protobuf import field_mask_pb2

    me = actor()
    client.identity.VerifyUserEmail(ipb.VerifyUserEmailRequest(id=me.id))
    changed = me.c.identity.UpdateUser(ipb.UpdateUserRequest(
        user=ipb.User(id=me.id, email=f"{unique()}@someone-else.example"), update_mask=field_mask_pb2.FieldMask(paths=["email"])))
    assert not changed.is_verified
