"""The read path (Core rows, relations loaded per page or joined) answers exactly what the write
path (mapped instances) answered, for every resource with a relation, in every read method."""
from __future__ import annotations

from nexus.chat.v1 import chat_pb2 as cpb
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.work.v1 import work_pb2 as wpb

from tests.conftest import Client, unique
from tests.support import new_channel, new_project, new_role, new_task, new_user


def test_user_roles_read_back_in_name_order(client: Client) -> None:
    tag = unique("rp")
    user = new_user(client, full_name=f"Reader {tag}")
    # Created out of name order: role_names are ordered by name on every path.
    for name in (f"zz{tag}", f"aa{tag}", f"mm{tag}"):
        written = client.identity.AssignRole(ipb.AssignRoleRequest(user_id=user.id, role_id=new_role(client, name=name).id))
    assert list(written.role_names) == [f"aa{tag}", f"mm{tag}", f"zz{tag}"]
    bare = new_user(client, full_name=f"Reader {tag}")

    assert client.identity.GetUser(ipb.GetUserRequest(id=user.id)) == written
    updated = client.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=user.id, full_name=f"Reader {tag}"), update_mask={"paths": ["full_name"]}))
    assert list(updated.role_names) == list(written.role_names)
    written = client.identity.GetUser(ipb.GetUserRequest(id=user.id))
    assert written == updated
    assert list(client.identity.BatchGetUsers(ipb.BatchGetUsersRequest(ids=[bare.id, user.id])).users) == [bare, written]
    listed = client.identity.ListUsers(ipb.ListUsersRequest(filter=f'full_name = "Reader {tag}"', page_size=1))
    assert list(listed.users) == [written] and listed.total_size == 2
    second = client.identity.ListUsers(ipb.ListUsersRequest(filter=f'full_name = "Reader {tag}"', page_size=1, page_token=listed.next_page_token))
    assert list(second.users) == [bare]
    found = client.identity.SearchUsers(ipb.SearchUsersRequest(query=tag))
    assert sorted((r.user for r in found.results), key=lambda u: u.id) == sorted([written, bare], key=lambda u: u.id)


def test_project_members_task_dependencies_and_channel_members_read_back(client: Client) -> None:
    project = new_project(client)
    users = [new_user(client) for _ in range(3)]
    for user in users:
        project = client.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=user.id))
    assert sorted(project.member_ids) == list(project.member_ids) and len(project.member_ids) == 3
    assert client.work.GetProject(wpb.GetProjectRequest(id=project.id)) == project
    assert list(client.work.ListProjects(wpb.ListProjectsRequest(filter=f'id = "{project.id}"')).projects) == [project]

    first, second, waiting, alone = (new_task(client, project) for _ in range(4))
    client.work.AddTaskDependency(wpb.AddTaskDependencyRequest(task_id=waiting.id, depends_on_task_id=second.id))
    waiting = client.work.AddTaskDependency(wpb.AddTaskDependencyRequest(task_id=waiting.id, depends_on_task_id=first.id))
    assert sorted(waiting.dependency_ids) == list(waiting.dependency_ids) == sorted([first.id, second.id])
    assert client.work.GetTask(wpb.GetTaskRequest(id=waiting.id)) == waiting
    page = client.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"', page_size=10))
    by_id = {t.id: t for t in page.tasks}
    assert by_id[waiting.id] == waiting and list(by_id[alone.id].dependency_ids) == []
    assert page.total_size == 4
    # An update answers with the relations it did not touch (read after the write).
    renamed = client.work.UpdateTask(wpb.UpdateTaskRequest(task=wpb.Task(id=waiting.id, title="renamed"), update_mask={"paths": ["title"]}))
    assert list(renamed.dependency_ids) == list(waiting.dependency_ids) and renamed.title == "renamed"
    assert client.work.GetTask(wpb.GetTaskRequest(id=waiting.id)) == renamed
    project = client.work.UpdateProject(wpb.UpdateProjectRequest(project=wpb.Project(id=project.id, name="renamed"), update_mask={"paths": ["name"]}))
    assert len(project.member_ids) == 3 and client.work.GetProject(wpb.GetProjectRequest(id=project.id)) == project

    channel = new_channel(client)
    for user in users:
        channel = client.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=channel.id, user_id=user.id))
    assert len(channel.member_ids) == 3
    assert client.chat.GetChannel(cpb.GetChannelRequest(id=channel.id)) == channel


# ---------------------------------------------------------------- the generated to_proto

import datetime as dt  # noqa: E402
import uuid  # noqa: E402
from decimal import Decimal  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from sqlalchemy import JSON, Boolean, Date, Float, Integer, LargeBinary, Numeric, String, Uuid  # noqa: E402

import db.domains  # noqa: E402,F401 - every resource registered
from db.base import UTCDateTime  # noqa: E402
from db.engine.codecs import EnumCodec, StringListCodec  # noqa: E402
from db.engine.reading import row_class  # noqa: E402
from db.engine.resource import REGISTRY  # noqa: E402


def _value(spec: Any, column: Any, variant: int) -> Any:
    """A value of the column's type; variant 0 is 'empty' (None / zero), 1 and 2 are not."""
    if variant == 0 and column.nullable:
        return None
    codec = next((c for c in spec.codecs.values() if isinstance(c, EnumCodec) and c.attr == column.key), None)
    if codec is not None:
        return sorted(codec.to_number)[variant % len(codec.to_number)]
    kind = column.type
    if isinstance(kind, UTCDateTime):
        return [dt.datetime(1970, 1, 1, tzinfo=dt.UTC), dt.datetime(2026, 12, 2, 5, 6, 7, 891011, tzinfo=dt.UTC),
                dt.datetime(1961, 4, 12, 6, 7, 0, 1, tzinfo=dt.UTC)][variant]
    kind = getattr(kind, "impl", kind)  # a TypeDecorator: the type it stores as
    if isinstance(kind, Uuid):
        return uuid.UUID(int=variant * 12345678901234567890)
    if isinstance(kind, Boolean):
        return variant == 1
    if isinstance(kind, Numeric):
        return Decimal(["0", "12.34", "-5.5"][variant])
    if isinstance(kind, Integer):
        return variant * 7
    if isinstance(kind, Float):
        return [0.0, 1.5, 1e-9][variant]
    if isinstance(kind, Date):
        return dt.date(2026, 1 + variant, 1 + variant)
    if isinstance(kind, LargeBinary):
        return b"x" * variant
    if isinstance(kind, JSON):
        default = column.default.arg(None) if column.default is not None and column.default.is_callable else None
        if isinstance(default, list):
            strings = any(isinstance(c, StringListCodec) and c.attr == column.key for c in spec.codecs.values())
            return [] if variant == 0 else (["a", "b"] if strings else [{"field": "f", "old_value": None, "new_value": variant}])
        return {} if variant == 0 else {"k": "v", "n": variant}
    if isinstance(kind, String):
        if column.key.endswith("currency"):
            return ["", "EUR", "USD"][variant] or None
        return ["", "text", "more text"][variant]
    raise AssertionError(f"no sample value for {column} ({kind})")


@pytest.mark.parametrize("variant", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(spec.name for spec in REGISTRY))
def test_the_generated_to_proto_equals_the_codecs_one_by_one(name: str, variant: int) -> None:
    spec = REGISTRY[name]
    values = {c.key: _value(spec, c, variant) for c in spec.table.c}
    row = row_class(spec)(values)
    for key in spec.relation_fields:
        related = [row_class(spec)({"id": uuid.UUID(int=i + 1), "name": f"r{i}"}) for i in range(variant)]
        setattr(row, key, related)
    generated = spec.to_proto(row)
    one_by_one = spec.to_proto(row, read_mask=list(spec.codecs))
    assert generated == one_by_one
    assert generated.SerializeToString(deterministic=True) == one_by_one.SerializeToString(deterministic=True)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_reads_leave_secret_columns_in_the_database(dialect: str) -> None:
    """Get, BatchGet, List and Search select every column an output may read, and never a
    column that holds a secret (a password or key hash): no output reads one."""
    from db.engine.reading import columns

    with_secrets = [spec for spec in REGISTRY if spec.secrets]
    assert {spec.name: set(spec.secrets) for spec in with_secrets} == {"User": {"password_hash"}, "ApiKey": {"secret_hash"}}
    for spec in REGISTRY:
        selected = {getattr(c, "key", None) or getattr(c, "name", None) for c in columns(spec, dialect)}
        assert not selected & set(spec.secrets), spec.name
        assert {c.key for c in spec.table.c} - set(spec.secrets) <= selected, spec.name


def test_a_resource_with_an_undeclared_secret_column_is_refused() -> None:
    """A column that looks like a secret (a hash, a token) must be declared in `secrets`, which
    keeps it out of every read and masks it in the audit trail: registering without is refused."""
    import dataclasses

    from db.engine.resource import Registry

    users = REGISTRY["User"]
    with pytest.raises(TypeError, match="password_hash"):
        Registry().add(dataclasses.replace(users, secrets={}))
    assert Registry().add(dataclasses.replace(users)).secrets == {"password_hash": "password"}


@pytest.mark.parametrize("text", [
    "2026-12-02 14:46:18.618202", "2026-12-02 14:46:18", "1970-01-01 00:00:00.000000", "1961-04-12 06:07:00.000001",
    "2026-12-02T14:46:18.618202", "2026-12-02 14:46:18+02:00", "2026-12-02T23:30:00-05:30", "2026-12-02 14:46:18Z",
    "2026-12-02", "2026-12-02 14:46",
])
def test_sqlite_datetime_text_reads_as_the_plain_parse_reads_it(text: str) -> None:
    """UTCDateTime's SQLite result processor parses stored text with the zone appended (the fast
    path) and falls back to parsing it alone: both give the same UTC datetime, for text with a
    zone of its own too."""
    from sqlalchemy.dialects import sqlite

    process = UTCDateTime().result_processor(sqlite.dialect(), None)
    got = process(text)
    assert got == process.plain(text)
    assert got.tzinfo is dt.UTC and got.utcoffset() == dt.timedelta(0)
    assert process(None) is None
