"""The audit trail: one entry per change, in the change's transaction, with the right diff."""
from __future__ import annotations

import sys
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.security.v1 import security_pb2 as spb
from nexus.work.v1 import work_pb2 as wpb

import db.domains  # noqa: F401
from db.engine.resource import REGISTRY
from tests.conftest import Client, unique
from tests.support import MADE, SAMPLES, expect_error, make_row, mask, new_project, new_role, new_task, new_user

Code = grpc.StatusCode
# Every audited writable resource, its rows made by make_row (a File's by an upload).
WRITABLE = [s.name for s in MADE if s.audited]


def entries_for(c: Client, resource_id: str, **kw: Any) -> list[spb.AuditLogEntry]:
    page = c.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(filter=f'resource_id = "{resource_id}"', page_size=100, **kw))
    return list(page.audit_log_entries)


def changes_of(entry: spb.AuditLogEntry) -> dict[str, tuple[Any, Any]]:
    return {
        ch.field: (json_format.MessageToDict(ch.old_value) if ch.HasField("old_value") else None,
                   json_format.MessageToDict(ch.new_value) if ch.HasField("new_value") else None)
        for ch in entry.changes
    }


@pytest.mark.parametrize("name", WRITABLE)
def test_each_standard_write_writes_exactly_one_entry(client: Client, name: str) -> None:
    spec = REGISTRY[name]
    sample = SAMPLES[name]
    pb = sys.modules[spec.message.__module__]
    stub = client.stub_for(sample.service)
    created = make_row(client, spec, sample.fields(client, unique("a")))
    [entry] = entries_for(client, created.id)
    assert entry.action == spb.AUDIT_ACTION_CREATE and entry.resource_type == name
    assert entry.create_time.seconds > 0 and entry.id
    updates = [spb.AUDIT_ACTION_UPDATE] if spec.update_rpc else []  # a record has no Update

    if spec.update_rpc:
        assert sample.change[0] in changes_of(entry)
        field, value = sample.change
        value = unique("c") if value is None else value
        getattr(stub, f"Update{name}")(getattr(pb, f"Update{name}Request")(**{spec.singular_field: spec.message(id=created.id, **{field: value})}, update_mask=mask(field)))
        entries = entries_for(client, created.id)
        assert [e.action for e in entries] == [spb.AUDIT_ACTION_CREATE, spb.AUDIT_ACTION_UPDATE]
        diff = changes_of(entries[1])
        assert field in diff
        assert set(diff) - {field} <= spec.all_output_only, f"only the masked field and what follows from it: {diff}"
        assert diff[field][0] == getattr(created, field) and diff[field][1] == value

    getattr(stub, f"Delete{name}")(getattr(pb, f"Delete{name}Request")(id=created.id))
    actions = [e.action for e in entries_for(client, created.id)]
    if spec.soft_delete:
        getattr(stub, f"Undelete{name}")(getattr(pb, f"Undelete{name}Request")(id=created.id))
        getattr(stub, f"Delete{name}")(getattr(pb, f"Delete{name}Request")(id=created.id, force=True))
        actions = [e.action for e in entries_for(client, created.id)]
        assert actions == [spb.AUDIT_ACTION_CREATE, *updates, spb.AUDIT_ACTION_DELETE,
                           spb.AUDIT_ACTION_UNDELETE, spb.AUDIT_ACTION_DELETE]
    else:
        assert actions == [spb.AUDIT_ACTION_CREATE, *updates, spb.AUDIT_ACTION_DELETE]


def test_failed_calls_write_nothing(client: Client) -> None:
    task = new_task(client)
    before = len(entries_for(client, task.id))
    stale = wpb.Task(id=task.id, title="never", etag='W/"99"')
    expect_error(Code.ABORTED, client.work.UpdateTask, wpb.UpdateTaskRequest(task=stale, update_mask=mask("title")))
    expect_error(Code.INVALID_ARGUMENT, client.work.UpdateTask, wpb.UpdateTaskRequest(task=wpb.Task(id=task.id, estimated_hours=-1), update_mask=mask("estimated_hours")))
    expect_error(Code.FAILED_PRECONDITION, client.work.AddTaskDependency, wpb.AddTaskDependencyRequest(task_id=task.id, depends_on_task_id=task.id))
    assert len(entries_for(client, task.id)) == before
    name = unique("u")
    user = new_user(client, username=name)
    expect_error(Code.ALREADY_EXISTS, client.identity.CreateUser, ipb.CreateUserRequest(user=ipb.User(username=name, email=f"{unique()}@example.com")))
    assert [e.action for e in entries_for(client, user.id)] == [spb.AUDIT_ACTION_CREATE]
    same_name = client.security.SearchAuditLogEntries(spb.SearchAuditLogEntriesRequest(query="create User", filter=f'resource_id = "{user.id}"'))
    assert same_name.total_size == 1, "the refused duplicate left no entry"



def test_an_update_that_changes_nothing_writes_nothing(client: Client) -> None:
    task = new_task(client)
    same = client.work.UpdateTask(wpb.UpdateTaskRequest(task=wpb.Task(id=task.id, title=task.title), update_mask=mask("title")))
    assert same == task, "same etag, same update_time"
    assert [e.action for e in entries_for(client, task.id)] == [spb.AUDIT_ACTION_CREATE]
    done = client.work.UpdateTask(wpb.UpdateTaskRequest(task=wpb.Task(id=task.id, status=wpb.TASK_STATUS_DONE), update_mask=mask("status")))
    assert done.etag != task.etag and done.HasField("completed_time")
    entries = entries_for(client, task.id)
    assert [e.action for e in entries] == [spb.AUDIT_ACTION_CREATE, spb.AUDIT_ACTION_UPDATE]
    assert set(changes_of(entries[1])) == {"status", "completed_time"}, "what the rules changed is recorded too"
    assert client.work.GetTask(wpb.GetTaskRequest(id=task.id)) == done

def test_secrets_are_masked(client: Client) -> None:
    password = "s3cret-" + uuid.uuid4().hex
    user = new_user(client, password=password)
    client.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=user.id, password=password + "2"), update_mask=mask("password")))
    key = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_USER)))
    user_entries = entries_for(client, user.id)
    assert changes_of(user_entries[0])["password"] == (None, "***")
    assert changes_of(user_entries[1]) == {"password": ("***", "***")}
    [key_entry] = entries_for(client, key.id)
    assert changes_of(key_entry)["secret"] == (None, "***")
    blob = b"".join(e.SerializeToString() for e in user_entries + [key_entry])
    for secret in (password.encode(), key.secret.encode(), b"$argon2"):
        assert secret not in blob


def test_custom_methods_record_their_diffs(client: Client) -> None:
    user, role = new_user(client), new_role(client)
    client.identity.AssignRole(ipb.AssignRoleRequest(user_id=user.id, role_id=role.id))
    assert changes_of(entries_for(client, user.id)[-1]) == {"role_names": ([], [role.name])}
    project, member = new_project(client), new_user(client)
    client.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=member.id))
    entry = entries_for(client, project.id)[-1]
    assert entry.action == spb.AUDIT_ACTION_UPDATE
    assert changes_of(entry) == {"member_ids": ([], [member.id])}
    assert entry.method == "/nexus.work.v1.WorkService/AddProjectMember"


def test_audit_entries_are_read_only_and_filterable(client: Client) -> None:
    methods = {m.name for m in spb.DESCRIPTOR.services_by_name["SecurityService"].methods}
    assert methods == {"GetAuditLogEntry", "ListAuditLogEntries", "SearchAuditLogEntries"}
    task = new_task(client)
    [entry] = entries_for(client, task.id)
    assert client.security.GetAuditLogEntry(spb.GetAuditLogEntryRequest(id=entry.id)) == entry
    same = client.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(
        filter=f'resource_type = "Task" AND action = CREATE AND resource_id = "{task.id}" AND create_time <= "{entry.create_time.ToJsonString()}"'))
    assert [e.id for e in same.audit_log_entries] == [entry.id]
    if entry.actor_id:
        by_actor = client.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(filter=f'actor_id = "{entry.actor_id}" AND resource_id = "{task.id}"'))
        assert [e.id for e in by_actor.audit_log_entries] == [entry.id]
    found = client.security.SearchAuditLogEntries(spb.SearchAuditLogEntriesRequest(query="create Task", filter=f'resource_id = "{task.id}"'))
    assert [r.audit_log_entry.id for r in found.results] == [entry.id]


def test_amounts_are_recorded_in_one_form_whichever_path_read_them(client: Client) -> None:
    """An amount read back from the database (PostgreSQL's NUMERIC keeps its scale) and one
    taken from a request are recorded alike: 1000.5 is "1000.5" on every path, not
    "1000.500000000" where the value came from the row."""
    from nexus.common.v1 import common_pb2

    project = new_project(client, budget=common_pb2.Money(currency_code="EUR", units=1000, nanos=500_000_000))
    client.work.UpdateProject(wpb.UpdateProjectRequest(
        project=wpb.Project(id=project.id, budget=common_pb2.Money(currency_code="EUR", units=1001, nanos=500_000_000)), update_mask=mask("budget"),
    ))
    client.work.UpdateProject(wpb.UpdateProjectRequest(
        project=wpb.Project(id=project.id, budget=common_pb2.Money(currency_code="EUR", units=1002)), update_mask=mask("budget"),
    ))
    client.work.DeleteProject(wpb.DeleteProjectRequest(id=project.id, force=True))
    entries = entries_for(client, project.id)
    assert [changes_of(e)["budget"] for e in entries] == [
        (None, "1000.5"), ("1000.5", "1001.5"), ("1001.5", "1002"), ("1002", None),
    ]
