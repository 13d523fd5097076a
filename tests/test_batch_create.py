"""BatchCreateTasks writes its rows together: the same checks as CreateTask, all or nothing."""
from __future__ import annotations

import uuid

import grpc
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.security.v1 import security_pb2 as spb
from nexus.work.v1 import work_pb2 as wpb

from tests.conftest import Client, connect, unique
from tests.support import expect_error, new_project, new_user

Code = grpc.StatusCode


def _requests(project: wpb.Project, word: str, n: int, **fields: object) -> list[wpb.CreateTaskRequest]:
    return [wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} {i}", **fields)) for i in range(n)]


def _count(client: Client, project: wpb.Project) -> int:
    return client.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"')).total_size


def test_a_missing_reference_names_the_first_row_that_has_it_and_writes_nothing(client: Client) -> None:
    project, other = new_project(client), new_project(client)
    requests = _requests(project, unique("w"), 5)
    requests[2].task.assignee_id = str(uuid.uuid4())
    requests[4].task.assignee_id = requests[2].task.assignee_id
    requests[3].task.project_id = other.id  # a second project is fine
    err = expect_error(Code.NOT_FOUND, client.work.BatchCreateTasks, wpb.BatchCreateTasksRequest(requests=requests))
    assert err.info.metadata["field"] == "requests[2].task.assignee_id"
    client.work.DeleteProject(wpb.DeleteProjectRequest(id=other.id))
    requests[2].task.ClearField("assignee_id")
    requests[4].task.ClearField("assignee_id")
    err = expect_error(Code.NOT_FOUND, client.work.BatchCreateTasks, wpb.BatchCreateTasksRequest(requests=requests))
    assert err.info.metadata["field"] == "requests[3].task.project_id", "a deleted project is not a reference target"
    assert _count(client, project) == 0


def test_rows_come_back_in_request_order_with_hooks_applied_and_audited(client: Client) -> None:
    project = new_project(client)
    assignee = new_user(client)
    requests = _requests(project, unique("w"), 4, assignee_id=assignee.id)
    requests[1].task.status = wpb.TASK_STATUS_DONE
    made = client.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=requests)).tasks
    assert [t.title for t in made] == [r.task.title for r in requests]
    assert made[1].HasField("completed_time") and not made[0].HasField("completed_time")
    assert len({t.id for t in made}) == 4
    for task in made:
        assert client.work.GetTask(wpb.GetTaskRequest(id=task.id)) == task
        entries = client.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(filter=f'resource_id = "{task.id}"'))
        assert [e.action for e in entries.audit_log_entries] == [spb.AUDIT_ACTION_CREATE]


def test_a_user_may_batch_create_only_rows_they_may_manage(client: Client) -> None:
    project = new_project(client)
    me, someone = new_user(client, role=ipb.USER_ROLE_USER), new_user(client)
    key = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_USER, user_id=me.id)))
    mine = connect(client.backend, client.database_url, client.server, secret=key.secret)
    client.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=me.id))
    try:
        word = unique("w")
        made = mine.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=_requests(project, word, 3))).tasks
        assert {t.creator_id for t in made} == {me.id}, "the creator defaults to the caller"
        foreign = _requests(project, unique("w"), 3)
        foreign[1].task.creator_id = someone.id  # the creator is the caller: only an admin may set another
        err = expect_error(Code.PERMISSION_DENIED, mine.work.BatchCreateTasks, wpb.BatchCreateTasksRequest(requests=foreign))
        assert err.info.reason == "FIELD_ACCESS_DENIED"
        assert _count(client, project) == 3
    finally:
        mine.channel.close()


def test_request_ids_make_a_retried_batch_return_the_same_rows(client: Client) -> None:
    project = new_project(client)
    requests = _requests(project, unique("w"), 3)
    for r in requests:
        r.request_id = str(uuid.uuid4())
    first = client.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=requests)).tasks
    again = client.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=requests)).tasks
    assert list(first) == list(again)
    assert _count(client, project) == 3


def test_batch_audit_entries_match_those_of_create(client: Client) -> None:
    project, assignee = new_project(client), new_user(client)
    full = dict(project_id=project.id, title="same", description="words", assignee_id=assignee.id,
                status=wpb.TASK_STATUS_DONE, tags=["a", "b"], estimated_hours=2.5)
    minimal = dict(project_id=project.id, title="bare")  # defaults (status, tags, hours) left to the server

    def entry(task_id: str) -> spb.AuditLogEntry:
        (only,) = client.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(filter=f'resource_id = "{task_id}"')).audit_log_entries
        return only

    for fields in (full, minimal):
        single = client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(**fields)))
        batched = client.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=[wpb.CreateTaskRequest(task=wpb.Task(**fields))])).tasks[0]
        assert [(k, v) for k, v in single.ListFields() if k.name not in {"id", "create_time", "update_time", "completed_time"}] == \
            [(k, v) for k, v in batched.ListFields() if k.name not in {"id", "create_time", "update_time", "completed_time"}]
        one, many = entry(single.id), entry(batched.id)
        assert [c.field for c in one.changes] == [c.field for c in many.changes]
        varying = {"id", "create_time", "completed_time"}
        assert [c for c in one.changes if c.field not in varying] == [c for c in many.changes if c.field not in varying]
        assert (one.actor_type, one.actor_id, one.action, one.method.rsplit("/", 1)[0]) == \
            (many.actor_type, many.actor_id, many.action, many.method.rsplit("/", 1)[0])
