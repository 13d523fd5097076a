"""Size limits: every writable field of every resource has a maximum size, List and Search pages
stay within the response budget, audit entries of large values stay bounded.

The field tests iterate the registry and each field's declared limit (ResourceSpec.codecs: the
codec's `limit`), so a resource or a field added later is covered without new test code.
"""
from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.security.v1 import security_pb2 as spb
from nexus.work.v1 import work_pb2 as wpb

import db.domains  # noqa: F401 - every resource in the registry
from db.engine.codecs import DEFAULT_LIMITS, FieldCodec, MessageListCodec, SizeLimit, StringListCodec, StructCodec
from db.engine.resource import REGISTRY, ResourceSpec
from tests.conftest import Client, ServerThread, connect, make_config, unique
from tests.support import MADE, MADE_BY_CREATE, UPDATED, expect_error, mask, new_channel, new_file, new_project, new_task, new_user
from tests.test_standard_methods import Api as StandardApi

Code = grpc.StatusCode
# Every writable resource, its rows made by make_row (a File's by an upload); the limits of
# Create and BatchCreate themselves are walked for those made by Create.
SPECS = MADE
CREATE_SPECS = MADE_BY_CREATE
# Text fields whose domain rules want a shape: (prefix, suffix) around the padding.
SHAPES = {
    "email": ("", "@example.com"), "avatar_url": ("https://files.example.com/", ""),
    # a User's ready password hash: an argon2id hash whose hash part takes the padding
    "password_hash": ("$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$", ""),
} | {
    name: ("", "@example.com") for name in ("to", "cc", "bcc")  # an email's recipients: addresses
}
# Fields set instead of another (never both): the sample's other one is left out.
INSTEAD_OF = {"password_hash": "password"}
# Repeated fields whose items come from a closed set (an API key's scopes, a Role's permissions): no value at the
# limit is valid, so only the refusal past it is checked.
CLOSED_ITEMS = {"scopes", "permissions"}
# Repeated fields whose items are ids (UUIDs: 36 characters, their limit) of rows that must
# exist (and are told apart: a list keeps one of equal items), made by Ids.
ID_ITEMS = {"to_user_ids": "User", "cc_user_ids": "User", "bcc_user_ids": "User", "attachments": "File"}


class Ids:
    """Rows of the resources ID_ITEMS name, made by the client as they are first asked for."""

    def __init__(self, c: Client) -> None:
        self.c = c
        self.made: dict[str, list[str]] = {"User": [], "File": []}

    def __call__(self, name: str, i: int = 0) -> str:
        made = self.made[ID_ITEMS[name]]
        while len(made) <= i:
            made.append((new_user(self.c) if ID_ITEMS[name] == "User" else new_file(self.c, os.urandom(8))).id)
        return made[i]


def compact_json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def sized(spec: ResourceSpec) -> list[tuple[str, FieldCodec]]:
    """The writable fields of spec that have a size limit."""
    return [(name, spec.codecs[name]) for name in spec.creatable if spec.codecs[name].limit is not None]


def text_of(name: str, length: int, ids: Ids) -> str:
    """A valid value of a text field (unique, but for the ids of ID_ITEMS), exactly `length` characters long."""
    if name in ID_ITEMS and length == 36:
        return ids(name)
    prefix, suffix = SHAPES.get(name, ("", ""))
    token = unique("L")
    pad = length - len(prefix) - len(token) - len(suffix)
    assert pad >= 0
    return prefix + token + "x" * pad + suffix


def values_at(name: str, codec: FieldCodec, over: bool, ids: Ids) -> list[tuple[str, Any]]:
    """(the violation's field path below the resource, value) of each measure of the field's
    limit: at the limit when not over, one past it when over."""
    limit = codec.limit
    assert limit is not None
    extra = 1 if over else 0
    out: list[tuple[str, Any]] = []
    if isinstance(codec, StructCodec):
        out.append((name, struct_pb2.Struct(fields={"k": struct_pb2.Value(string_value="x" * (limit.json_bytes - 8 + extra))})))
        assert compact_json_size({"k": "x" * (limit.json_bytes - 8)}) == limit.json_bytes
    elif isinstance(codec, MessageListCodec):
        item = codec.message_type
        out.append((name, [item(name="x" * (limit.json_bytes - 13 + extra))]))
        assert compact_json_size([{"name": "x" * (limit.json_bytes - 13)}]) == limit.json_bytes
        out.append((name, [item(name=f"a{i}") for i in range(limit.items + extra)]))
    elif isinstance(codec, StringListCodec):
        prefix, suffix = SHAPES.get(name, ("", ""))
        items = [ids(name, i) if name in ID_ITEMS else f"{prefix}t{i}{suffix}" for i in range(limit.items + extra)]
        out.append((name, items))
        out.append((f"{name}[0]", [text_of(name, limit.chars + extra, ids)]))
    else:
        out.append((name, text_of(name, limit.chars + extra, ids)))
    return out


class Api(StandardApi):
    """The standard methods of one resource (tests/test_standard_methods.py), and a new resource's message."""

    @functools.cached_property
    def ids(self) -> Ids:
        return Ids(self.c)

    def resource(self, **changes: Any) -> Any:
        fields = self.sample.fields(self.c, unique("w"))
        for name in changes:
            fields.pop(INSTEAD_OF.get(name, ""), None)
        fields.update(changes)
        return self.spec.message(**fields)

    def count(self) -> int:
        return int(self.call("List{Es}", page_size=1).total_size)


@pytest.fixture(params=[s.name for s in SPECS])
def api(request: pytest.FixtureRequest, client: Client) -> Api:
    return Api(client, REGISTRY[request.param])


@pytest.fixture(params=[s.name for s in CREATE_SPECS])
def create_api(request: pytest.FixtureRequest, client: Client) -> Api:
    return Api(client, REGISTRY[request.param])


@pytest.fixture(params=[s.name for s in UPDATED])
def update_api(request: pytest.FixtureRequest, client: Client) -> Api:
    return Api(client, REGISTRY[request.param])


def test_every_writable_field_is_bounded() -> None:
    """A field either has a size limit or is bounded by its type (ids, enums, numbers, times)."""
    bounded_by_type = {
        "UuidCodec", "EnumCodec", "TimestampCodec", "DateCodec", "MoneyCodec", "MoneyPartsCodec", "DurationCodec",
        "TokenCountCodec", "TotalTokensCodec",  # an AIInteraction's counts of tokens: int64
    }
    for spec in REGISTRY:
        for name in spec.creatable:
            codec = spec.codecs[name]
            if codec.limit is None:
                kind = type(codec).__name__
                numeric = kind == "ScalarCodec" and not codec.is_string  # type: ignore[attr-defined]
                assert kind in bounded_by_type or numeric, f"{spec.name}.{name} ({kind}) has no size limit"
            else:
                assert codec.limit.chars or codec.limit.json_bytes or codec.limit.items


def test_a_column_length_is_the_limit_and_an_override_cannot_pass_it() -> None:
    for spec in REGISTRY:
        for name, codec in sized(spec):
            column = spec.table.c.get(codec.attr or "")
            length = getattr(getattr(column, "type", None), "length", None)
            if length is not None and not isinstance(codec, (StringListCodec, MessageListCodec, StructCodec)):
                assert codec.limit.chars == length, f"{spec.name}.{name}"  # type: ignore[union-attr]
    users = REGISTRY["User"]
    with pytest.raises(TypeError, match="username"):
        _ = ResourceSpec(**{**_spec_args(users), "size_limits": {"username": SizeLimit(chars=65)}}).codecs
    with pytest.raises(TypeError, match="no_such_field"):
        _ = ResourceSpec(**{**_spec_args(users), "size_limits": {"no_such_field": SizeLimit(chars=10)}}).codecs
    tighter = ResourceSpec(**{**_spec_args(users), "size_limits": {"full_name": SizeLimit(chars=10), "preferences": SizeLimit(json_bytes=20)}})
    assert tighter.codecs["full_name"].limit == SizeLimit(chars=10)
    assert tighter.codecs["preferences"].limit == SizeLimit(json_bytes=20)
    assert tighter.codecs["email"].limit == users.codecs["email"].limit


def _spec_args(spec: ResourceSpec) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}


def test_defaults_per_kind() -> None:
    assert DEFAULT_LIMITS["string"].chars == 4096
    assert DEFAULT_LIMITS["text"].chars == 65536
    assert DEFAULT_LIMITS["json"].json_bytes == 65536
    chat = REGISTRY["ChatMessage"].codecs
    assert chat["content"].limit == DEFAULT_LIMITS["text"]
    assert REGISTRY["ConversationMessage"].codecs["role_metadata"].limit == DEFAULT_LIMITS["json"]


def test_create_refuses_each_field_over_its_limit_and_takes_it_at_the_limit(create_api: Api) -> None:
    api = create_api
    singular = api.spec.singular_field
    for name, codec in sized(api.spec):
        before = api.count()
        for path, value in values_at(name, codec, over=True, ids=api.ids):
            err = expect_error(Code.INVALID_ARGUMENT, api.call, "Create{E}", **{singular: api.resource(**{name: value})})
            assert [v.field for v in err.violations] == [f"{singular}.{path}"], (name, err.message)
            assert err.info.reason == "FIELD_TOO_LARGE"
        assert api.count() == before, f"{name}: nothing created"
        for _, value in values_at(name, codec, over=False, ids=api.ids) if name not in CLOSED_ITEMS else ():
            created = api.call("Create{E}", **{singular: api.resource(**{name: value})})
            assert api.call("Get{E}", id=created.id) is not None


def test_update_refuses_each_field_over_its_limit_and_changes_nothing(update_api: Api) -> None:
    api = update_api
    singular = api.spec.singular_field
    created = api.create()
    for name, codec in sized(api.spec):
        if name in api.spec.immutable:
            continue
        for path, value in values_at(name, codec, over=True, ids=api.ids):
            patch = api.spec.message(id=created.id, **{name: value})
            err = expect_error(Code.INVALID_ARGUMENT, api.call, "Update{E}", **{singular: patch}, update_mask=mask(name))
            assert [v.field for v in err.violations] == [f"{singular}.{path}"], (name, err.message)
            assert api.call("Get{E}", id=created.id).etag == created.etag, f"{name}: nothing changed"
        for _, value in values_at(name, codec, over=False, ids=api.ids) if name not in CLOSED_ITEMS else ():
            patch = api.spec.message(id=created.id, **{name: value})
            updated = api.call("Update{E}", **{singular: patch}, update_mask=mask(name))
            assert updated.etag != created.etag, name
            created = updated


def test_batch_create_refuses_a_field_over_its_limit_in_any_request(client: Client) -> None:
    batched = [s for s in CREATE_SPECS if s.batch_create]
    assert batched
    for spec in batched:
        api = Api(client, spec)
        singular = spec.singular_field
        request_type = getattr(api.pb, f"Create{spec.name}Request")
        for name, codec in sized(spec):
            before = api.count()
            for path, value in values_at(name, codec, over=True, ids=api.ids):
                requests = [request_type(**{singular: api.resource()}), request_type(**{singular: api.resource(**{name: value})})]
                err = expect_error(Code.INVALID_ARGUMENT, api.call, "BatchCreate{Es}", requests=requests)
                assert [v.field for v in err.violations] == [f"requests[1].{singular}.{path}"], (name, err.message)
            assert api.count() == before, f"{name}: nothing of the batch created"
            for _, value in values_at(name, codec, over=False, ids=api.ids):
                made = api.call("BatchCreate{Es}", requests=[request_type(**{singular: api.resource(**{name: value})})])
                assert len(made.ListFields()) == 1


# ------------------------------------------------------------------ pages within the budget


@pytest.fixture
def small_server(client: Client) -> Iterator[Client]:
    """A second server on the same database, whose messages may not pass 64 KiB."""
    server = ServerThread(make_config(client.database_url, max_message_bytes=64 * 1024)).start()
    c = connect(client.backend, client.database_url, server)
    yield c
    c.channel.close()
    server.stop()


def _pages(fetch: Any, items_of: Any, limit: int) -> tuple[list[str], int]:
    seen: list[str] = []
    token, pages = "", 0
    while True:
        page = fetch(token)
        assert page.ByteSize() <= limit
        pages += 1
        seen.extend(items_of(page))
        token = page.next_page_token
        if not token:
            return seen, pages


def test_list_and_search_pages_are_cut_within_the_message_limit(client: Client, small_server: Client) -> None:
    word = unique("big")
    project = new_project(client)
    tasks = [new_task(client, project, title=f"{word} {i}", description="d" * 12_000) for i in range(12)]
    ids = sorted(t.id for t in tasks)
    limit = 64 * 1024
    for order_by in ("", "title desc"):
        def fetch(token: str, order_by: str = order_by) -> Any:
            return small_server.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"', order_by=order_by, page_size=50, page_token=token))

        first = fetch("")
        assert 0 < len(first.tasks) < 12 and first.next_page_token, "cut short, with a token"
        assert first.total_size == 12
        seen, pages = _pages(fetch, lambda p: [t.id for t in p.tasks], limit)
        assert sorted(seen) == ids, "every row exactly once"
        assert pages > 2

    def search(token: str) -> Any:
        return small_server.work.SearchTasks(wpb.SearchTasksRequest(query=word, page_size=50, page_token=token))

    seen, pages = _pages(search, lambda p: [r.task.id for r in p.results], limit)
    assert sorted(seen) == ids and pages > 2


def test_chat_messages_list_within_the_limit(client: Client, small_server: Client) -> None:
    channel = new_channel(client)
    made = [
        client.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel.id, content=f"{i} " + "m" * 20_000)))
        for i in range(8)
    ]

    def fetch(token: str) -> Any:
        return small_server.chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=f'channel_id = "{channel.id}"', page_token=token))

    seen, _ = _pages(fetch, lambda p: [m.id for m in p.chat_messages], 64 * 1024)
    assert sorted(seen) == sorted(m.id for m in made)


def test_a_row_larger_than_the_limit_alone_is_a_clear_error(client: Client) -> None:
    server = ServerThread(make_config(client.database_url, max_message_bytes=8 * 1024)).start()
    small = connect(client.backend, client.database_url, server)
    try:
        task = new_task(client, description="d" * 20_000)
        err = expect_error(Code.RESOURCE_EXHAUSTED, small.work.ListTasks, wpb.ListTasksRequest(filter=f'id = "{task.id}"'))
        assert err.info.reason == "RESPONSE_TOO_LARGE"
        assert err.info.metadata["resource_id"] == task.id
    finally:
        small.channel.close()
        server.stop()


# ------------------------------------------------------------------ audit entries stay bounded


def _changes(c: Client, resource_id: str) -> list[dict[str, tuple[Any, Any]]]:
    page = c.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(filter=f'resource_id = "{resource_id}"', page_size=100))
    return [
        {ch.field: (json_format.MessageToDict(ch.old_value), json_format.MessageToDict(ch.new_value)) for ch in entry.changes}
        for entry in page.audit_log_entries
    ]


def test_audit_entries_of_large_values_are_truncated_with_a_marker(client: Client) -> None:
    from db.engine.audit import AUDIT_VALUE_CHARS

    big = "a" * 65_536
    task = new_task(client, description=big)
    other = "b" * 65_536
    client.work.UpdateTask(wpb.UpdateTaskRequest(task=wpb.Task(id=task.id, description=other), update_mask=mask("description")))
    created, updated = _changes(client, task.id)
    for value, letter in ((created["description"][1], "a"), (updated["description"][0], "a"), (updated["description"][1], "b")):
        assert isinstance(value, str)
        assert len(value) <= AUDIT_VALUE_CHARS + 64
        assert value.startswith(letter * 100) and value.endswith("[truncated: 65536 characters]")
    small = new_task(client, description="short")
    assert _changes(client, small.id)[0]["description"] == (None, "short"), "small values are kept whole"
    user = new_user(client, preferences=struct_pb2.Struct(fields={"k": struct_pb2.Value(string_value="p" * 60_000)}), password="correct horse battery")
    (entry,) = _changes(client, user.id)
    assert entry["password"] == (None, "***")
    preferences = entry["preferences"][1]
    assert isinstance(preferences, str) and len(preferences) <= AUDIT_VALUE_CHARS + 64
    assert preferences.startswith('{"k":"ppp') and preferences.endswith(" bytes of JSON]")


# ------------------------------------------------------------------ relations stay bounded


def _relation_adders(c: Client) -> dict[str, tuple[Any, Any]]:
    """Resource -> (a new parent, add(parent, i) that adds its i-th related row)."""
    from nexus.identity.v1 import identity_pb2 as ipb

    def add_project_member(p: Any, i: int) -> Any:
        return c.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=p.id, user_id=new_user(c).id))

    def add_channel_member(ch: Any, i: int) -> Any:
        return c.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=ch.id, user_id=new_user(c).id))

    def add_dependency(t: Any, i: int) -> Any:
        other = new_task(c, wpb.Project(id=t.project_id))
        return c.work.AddTaskDependency(wpb.AddTaskDependencyRequest(task_id=t.id, depends_on_task_id=other.id))

    def assign_role(u: Any, i: int) -> Any:
        role = c.identity.CreateRole(ipb.CreateRoleRequest(role=ipb.Role(name=unique("role"))))
        return c.identity.AssignRole(ipb.AssignRoleRequest(user_id=u.id, role_id=role.id))

    return {
        "Project": (lambda: new_project(c), add_project_member),
        "Channel": (lambda: new_channel(c), add_channel_member),
        "Task": (lambda: new_task(c), add_dependency),
        "User": (lambda: new_user(c), assign_role),
    }


def test_relations_are_bounded_whichever_method_adds_to_them(client: Client) -> None:
    adders = _relation_adders(client)
    related = sorted(s.name for s in REGISTRY if s.relation_fields)
    assert related == sorted(adders), "every resource with a relation is covered"
    for name, (make, add) in adders.items():
        spec = REGISTRY[name]
        ((key, (field_name, _)),) = spec.relation_fields.items()
        assert spec.relation_limit(key) == DEFAULT_LIMITS["relation"].items
        spec.size_limits[field_name] = SizeLimit(items=2)  # a small limit to reach, on the running server
        try:
            parent = make()
            for i in range(2):
                parent = add(parent, i)
            err = expect_error(Code.RESOURCE_EXHAUSTED, add, parent, 2)
            assert err.info.reason == "TOO_MANY_RELATED" and err.info.metadata["field"] == field_name
            now = Api(client, spec).call("Get{E}", id=parent.id)
            assert len(getattr(now, field_name)) == 2 and now.etag == parent.etag, f"{name}: nothing changed"
        finally:
            del spec.size_limits[field_name]


def test_no_resource_message_can_pass_1_mib() -> None:
    """Every bounded field at its limit, in the encoding that makes the message largest: 4-byte
    characters, a Struct of a long list of zeros (11 bytes each as protobuf, 2 as JSON), every
    relation full. A change event carries one such message: far below a client's default 4 MiB."""
    wide = "\U0001F600"  # 4 bytes in UTF-8
    for spec in SPECS:
        msg = spec.message()
        for name, codec in sized(spec):
            limit = codec.limit
            assert limit is not None
            if isinstance(codec, StructCodec):
                getattr(msg, name).update({"k": [0] * ((limit.json_bytes - 6) // 2)})  # type: ignore[operator]
            elif isinstance(codec, MessageListCodec):
                getattr(msg, name).add(name=wide * ((limit.json_bytes - 13) // 4))  # type: ignore[operator]
            elif isinstance(codec, StringListCodec):
                getattr(msg, name).extend([wide * limit.chars] * limit.items)  # type: ignore[operator]
            elif name != "password":  # write-only
                setattr(msg, name, wide * limit.chars)  # type: ignore[operator]
        for key, (field_name, _) in spec.relation_fields.items():
            (column,) = spec.relation_columns.get(key, ("id",))
            target = REGISTRY.by_model(spec.model.__mapper__.relationships[key].mapper.class_)
            label = "x" * 36 if column == "id" else wide * target.codecs[column].limit.chars  # type: ignore[union-attr]
            getattr(msg, field_name).extend([label] * spec.relation_limit(key))
        assert msg.ByteSize() < 1 << 20, f"{spec.name}: {msg.ByteSize()} bytes"


# ------------------------------------------------------------------ memory after large requests


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_server_memory_returns_after_large_requests(client: Client, tmp_path: Any) -> None:
    """A `nexus-data serve` process on the test database takes a burst of maximum-size writes
    and 4 MiB pages from 8 threads; a few seconds later its resident size is back within 64 MiB
    of where it was (without giving freed heaps back it stayed 150-300 MiB above)."""
    import socket
    import subprocess
    import time
    from concurrent.futures import ThreadPoolExecutor

    from tests.conftest import authed_channel
    from nexus.chat.v1 import chat_pb2_grpc
    from nexus.work.v1 import work_pb2_grpc

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, DATABASE_URL=client.database_url, NEXUS_PORT=str(port), NEXUS_HOST="127.0.0.1",
               NEXUS_DRAIN_SECONDS="0", NEXUS_GRACE_SECONDS="1", NEXUS_MEMORY_TRIM_SECONDS="0.5")
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "nexus-data"), "serve", "--no-migrate"], env=env, stdout=log, stderr=subprocess.STDOUT)
    big = 64 << 20
    channel = authed_channel(f"127.0.0.1:{port}", client.admin_secret, options=[("grpc.max_receive_message_length", big), ("grpc.max_send_message_length", big)])
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        chat, work = chat_pb2_grpc.ChatServiceStub(channel), work_pb2_grpc.WorkServiceStub(channel)
        channel_id = chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=unique("rss")))).id
        project_id = work.CreateProject(wpb.CreateProjectRequest(project=wpb.Project(name=unique("rss"), owner_id=new_user(client).id))).id
        text = REGISTRY["ChatMessage"].codecs["content"].limit.chars  # type: ignore[union-attr]

        def burst(i: int) -> None:
            for k in range(4):
                chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel_id, content=f"{i} {k} ".ljust(text, "c"))), timeout=60)
            tasks = [wpb.CreateTaskRequest(task=wpb.Task(project_id=project_id, title=f"{i}.{k}", description="d" * text)) for k in range(40)]
            work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=tasks), timeout=60)
            chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=f'channel_id = "{channel_id}"', page_size=1000), timeout=60)
            work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project_id}"', page_size=1000), timeout=60)

        burst(-1)
        time.sleep(1.5)
        before = _rss(proc.pid)
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(burst, range(24)))
        time.sleep(3)
        after = _rss(proc.pid)
        assert after - before < 64 << 20, f"resident {before >> 20} MiB before, {after >> 20} MiB after"
    finally:
        channel.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_batch_get_larger_than_the_limit_is_a_clear_error(client: Client, small_server: Client) -> None:
    project = new_project(client)
    tasks = [new_task(client, project, description="d" * 12_000) for _ in range(8)]
    ids = [t.id for t in tasks]
    err = expect_error(Code.RESOURCE_EXHAUSTED, small_server.work.BatchGetTasks, wpb.BatchGetTasksRequest(ids=ids))
    assert err.info.reason == "RESPONSE_TOO_LARGE" and err.info.metadata["field"] == "ids"
    got = small_server.work.BatchGetTasks(wpb.BatchGetTasksRequest(ids=ids[:3]))
    assert [t.id for t in got.tasks] == ids[:3]


def test_a_page_larger_than_one_read_is_whole_and_in_order(client: Client, small_server: Client) -> None:
    """A page of more rows than its first statement reads (paging.FIRST_READ) is read in several
    statements, each after the last row of the one before: the same rows in the same order as
    small pages give, also ordered by a key that is NULL for some rows."""
    from nexus.common.v1 import common_pb2

    from db.engine.paging import FIRST_READ

    project = new_project(client)
    requests = [
        wpb.CreateTaskRequest(task=wpb.Task(
            project_id=project.id, title=f"t{i % 7}", description="x" * (i % 5) * 300,
            due_date=common_pb2.Date(year=2026, month=1 + i % 12, day=1) if i % 3 else None,
        ))
        for i in range(FIRST_READ + 60)
    ]
    client.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=requests))
    flt = f'project_id = "{project.id}"'
    for order_by in ("", "title desc", "due_date", "due_date desc, title"):
        def page(token: str, size: int, c: Client = client, order_by: str = order_by) -> Any:
            return c.work.ListTasks(wpb.ListTasksRequest(filter=flt, order_by=order_by, page_size=size, page_token=token))

        small, _ = _pages(lambda t: page(t, 25), lambda p: [x.id for x in p.tasks], 16 << 20)
        whole = page("", 1000)
        assert [x.id for x in whole.tasks] == small and not whole.next_page_token and whole.total_size == len(small), order_by
        cut, pages = _pages(lambda t: page(t, 1000, small_server), lambda p: [x.id for x in p.tasks], 64 * 1024)
        assert cut == small and pages > 1, order_by


def test_a_search_page_larger_than_one_read_is_whole_and_in_order(client: Client, small_server: Client) -> None:
    from db.engine.paging import FIRST_READ

    word = unique("many")
    project = new_project(client)
    requests = [wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} {i}", description=" ".join([word] * (i % 9)) + "y" * (i % 4) * 400))
                for i in range(FIRST_READ + 60)]
    client.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=requests))

    def page(token: str, size: int, c: Client = client) -> Any:
        return c.work.SearchTasks(wpb.SearchTasksRequest(query=word, page_size=size, page_token=token))

    small, _ = _pages(lambda t: page(t, 25), lambda p: [r.task.id for r in p.results], 16 << 20)
    whole = page("", 1000)
    assert [r.task.id for r in whole.results] == small and not whole.next_page_token and whole.total_size == len(small) == FIRST_READ + 60
    cut, pages = _pages(lambda t: page(t, 1000, small_server), lambda p: [r.task.id for r in p.results], 64 * 1024)
    assert cut == small and pages > 1
