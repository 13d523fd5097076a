"""End-to-end tests of nexus.work.v1.WorkService: projects, members, tasks, dependencies, progress,
deletion and pagination under concurrent writes, over a real channel, on SQLite and PostgreSQL.

Every test makes its own users, projects and tasks and scopes its queries to them (usually with a
`project_id = "..."` filter): the database is shared by the whole session.
"""
from __future__ import annotations

import datetime as dt
import queue
import threading
from collections import Counter
from typing import Any

import grpc
import pytest
from nexus.common.v1 import common_pb2
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.security.v1 import security_pb2 as spb
from nexus.work.v1 import work_pb2 as wpb

from tests.conftest import Client, unique
from tests.support import RichError, expect_error, mask, new_project, new_task, new_user

Code = grpc.StatusCode


# ------------------------------------------------------------------ helpers


def date(value: dt.date | str) -> common_pb2.Date:
    if isinstance(value, str):
        value = dt.date.fromisoformat(value)
    return common_pb2.Date(year=value.year, month=value.month, day=value.day)


def as_date(d: common_pb2.Date) -> dt.date:
    return dt.date(d.year, d.month, d.day)


def money(units: int, nanos: int = 0, currency: str = "EUR") -> common_pb2.Money:
    return common_pb2.Money(currency_code=currency, units=units, nanos=nanos)


def violation_fields(err: RichError) -> list[str]:
    return [v.field for v in err.violations]


def project_request(c: Client, **fields: Any) -> wpb.CreateProjectRequest:
    values: dict[str, Any] = {"name": f"Project {unique()}"}
    if "owner_id" not in fields:
        values["owner_id"] = new_user(c).id
    values.update(fields)
    return wpb.CreateProjectRequest(project=wpb.Project(**values))


def task_request(project: wpb.Project, **fields: Any) -> wpb.CreateTaskRequest:
    values: dict[str, Any] = {"project_id": project.id, "title": f"Task {unique()}"}
    values.update(fields)
    return wpb.CreateTaskRequest(task=wpb.Task(**values))


def get_project(c: Client, project_id: str, **kw: Any) -> wpb.Project:
    return c.work.GetProject(wpb.GetProjectRequest(id=project_id, **kw))


def get_task(c: Client, task_id: str, **kw: Any) -> wpb.Task:
    return c.work.GetTask(wpb.GetTaskRequest(id=task_id, **kw))


def update_task(c: Client, task: wpb.Task, *paths: str) -> wpb.Task:
    return c.work.UpdateTask(wpb.UpdateTaskRequest(task=task, update_mask=mask(*paths)))


def list_all_tasks(c: Client, filter_text: str, order_by: str = "", page_size: int = 1000) -> list[wpb.Task]:
    out: list[wpb.Task] = []
    token = ""
    while True:
        response = c.work.ListTasks(wpb.ListTasksRequest(filter=filter_text, order_by=order_by, page_size=page_size, page_token=token))
        out.extend(response.tasks)
        token = response.next_page_token
        if not token:
            return out


def task_ids(c: Client, filter_text: str, order_by: str = "") -> list[str]:
    return [t.id for t in list_all_tasks(c, filter_text, order_by)]


def add_dependency(c: Client, task: wpb.Task, depends_on: wpb.Task) -> wpb.Task:
    return c.work.AddTaskDependency(wpb.AddTaskDependencyRequest(task_id=task.id, depends_on_task_id=depends_on.id))


def remove_dependency(c: Client, task: wpb.Task, depends_on: wpb.Task) -> wpb.Task:
    return c.work.RemoveTaskDependency(wpb.RemoveTaskDependencyRequest(task_id=task.id, depends_on_task_id=depends_on.id))


def dependencies(c: Client, task: wpb.Task) -> set[str]:
    return set(get_task(c, task.id).dependency_ids)


def deleted_user(c: Client) -> ipb.User:
    """A user id that no longer exists."""
    user = new_user(c)
    c.identity.DeleteUser(ipb.DeleteUserRequest(id=user.id, force=True))
    return user


def deleted_project(c: Client, force: bool) -> wpb.Project:
    project = new_project(c)
    c.work.DeleteProject(wpb.DeleteProjectRequest(id=project.id, force=force))
    return project


TODAY = dt.datetime.now(dt.UTC).date()
PAST = TODAY - dt.timedelta(days=30)
FUTURE = TODAY + dt.timedelta(days=30)


# ------------------------------------------------------------------ CreateProject / UpdateProject


def test_create_project_with_missing_owner_is_not_found(client: Client) -> None:
    err = expect_error(Code.NOT_FOUND, client.work.CreateProject, project_request(client, owner_id=deleted_user(client).id))
    assert err.info.metadata["field"] == "project.owner_id"
    assert err.resource is not None and err.resource.resource_type == "User"


def test_create_project_with_soft_deleted_owner_is_not_found(client: Client) -> None:
    owner = new_user(client)
    client.identity.DeleteUser(ipb.DeleteUserRequest(id=owner.id))
    err = expect_error(Code.NOT_FOUND, client.work.CreateProject, project_request(client, owner_id=owner.id))
    assert err.info.metadata["field"] == "project.owner_id"


def test_create_project_end_before_start_is_invalid_argument(client: Client) -> None:
    request = project_request(client, start_date=date("2026-05-10"), end_date=date("2026-05-09"))
    err = expect_error(Code.INVALID_ARGUMENT, client.work.CreateProject, request)
    assert "project.end_date" in violation_fields(err)


def test_create_project_end_on_start_is_allowed(client: Client) -> None:
    project = client.work.CreateProject(project_request(client, start_date=date("2026-05-10"), end_date=date("2026-05-10")))
    assert as_date(project.start_date) == as_date(project.end_date) == dt.date(2026, 5, 10)


def test_update_project_start_after_end_is_invalid_argument(client: Client) -> None:
    project = new_project(client, start_date=date("2026-01-01"), end_date=date("2026-03-31"))
    err = expect_error(
        Code.INVALID_ARGUMENT,
        client.work.UpdateProject,
        wpb.UpdateProjectRequest(project=wpb.Project(id=project.id, start_date=date("2026-04-01")), update_mask=mask("start_date")),
    )
    assert "project.end_date" in violation_fields(err)
    assert as_date(get_project(client, project.id).start_date) == dt.date(2026, 1, 1)


def test_update_project_end_before_start_is_invalid_argument(client: Client) -> None:
    project = new_project(client, start_date=date("2026-01-01"), end_date=date("2026-03-31"))
    err = expect_error(
        Code.INVALID_ARGUMENT,
        client.work.UpdateProject,
        wpb.UpdateProjectRequest(project=wpb.Project(id=project.id, end_date=date("2025-12-31")), update_mask=mask("end_date")),
    )
    assert "project.end_date" in violation_fields(err)


@pytest.mark.parametrize(
    "units,nanos,currency",
    [
        (1000, 500_000_000, "EUR"),
        (0, 1, "USD"),
        (19, 990_000_000, "GBP"),
        (1000, 300_000_000, "CHF"),
        (0, 0, "JPY"),
        (999_999_999_999_999, 999_999_999, "USD"),  # the most Numeric(24, 9) holds
        (123_456_789_012, 345_678_901, "EUR"),
    ],
)
def test_project_budget_round_trips_exactly(client: Client, units: int, nanos: int, currency: str) -> None:
    budget = money(units, nanos, currency)
    project = new_project(client, budget=budget)
    assert project.budget == budget
    assert get_project(client, project.id).budget == budget
    listed = client.work.ListProjects(wpb.ListProjectsRequest(filter=f'name = "{project.name}"')).projects
    assert [p.budget for p in listed] == [budget]


@pytest.mark.parametrize(
    "budget,field",
    [
        (money(10, 0, "eur"), "project.budget.currency_code"),
        (money(10, 0, "EURO"), "project.budget.currency_code"),
        (money(10, 0, "E1R"), "project.budget.currency_code"),
        (money(10, 0, ""), "project.budget.currency_code"),
        (money(10, 0, "ÄÖÜ"), "project.budget.currency_code"),  # alphabetic and upper-case, not ISO
        (money(10, 1_000_000_000), "project.budget.nanos"),
        (money(0, -1_000_000_000), "project.budget.nanos"),
        (money(10, -5), "project.budget.nanos"),
        (money(-10, 5), "project.budget.nanos"),
    ],
)
def test_project_bad_budget_is_invalid_argument(client: Client, budget: common_pb2.Money, field: str) -> None:
    request = project_request(client, budget=budget)
    err = expect_error(Code.INVALID_ARGUMENT, client.work.CreateProject, request)
    assert field in violation_fields(err), err.violations
    listed = client.work.ListProjects(wpb.ListProjectsRequest(filter=f'name = "{request.project.name}"'))
    assert list(listed.projects) == []


def test_update_project_bad_budget_is_invalid_argument(client: Client) -> None:
    project = new_project(client, budget=money(5))
    err = expect_error(
        Code.INVALID_ARGUMENT,
        client.work.UpdateProject,
        wpb.UpdateProjectRequest(project=wpb.Project(id=project.id, budget=money(5, -1)), update_mask=mask("budget")),
    )
    assert any(f.startswith("project.budget") for f in violation_fields(err))
    assert get_project(client, project.id).budget == money(5)


def test_create_project_defaults(client: Client) -> None:
    project = new_project(client)
    assert project.status == wpb.PROJECT_STATUS_PLANNING
    assert project.priority == wpb.PRIORITY_MEDIUM
    assert project.archived is False
    assert list(project.member_ids) == []
    assert not project.HasField("budget")


def test_project_owner_id_is_immutable(client: Client) -> None:
    project = new_project(client)
    other = new_user(client)
    err = expect_error(
        Code.INVALID_ARGUMENT,
        client.work.UpdateProject,
        wpb.UpdateProjectRequest(project=wpb.Project(id=project.id, owner_id=other.id), update_mask=mask("owner_id")),
    )
    assert "update_mask" in violation_fields(err)
    assert get_project(client, project.id).owner_id == project.owner_id


# ------------------------------------------------------------------ members


def add_member(c: Client, project: wpb.Project, user: ipb.User) -> wpb.Project:
    return c.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=user.id))


def remove_member(c: Client, project: wpb.Project, user: ipb.User) -> wpb.Project:
    return c.work.RemoveProjectMember(wpb.RemoveProjectMemberRequest(project_id=project.id, user_id=user.id))


def test_add_project_member_is_idempotent(client: Client) -> None:
    project = new_project(client)
    alice, bob = new_user(client), new_user(client)
    with_alice = add_member(client, project, alice)
    assert list(with_alice.member_ids) == [alice.id]
    assert with_alice.etag != project.etag
    again = add_member(client, project, alice)
    assert list(again.member_ids) == [alice.id]
    assert again.etag == with_alice.etag
    both = add_member(client, project, bob)
    assert sorted(both.member_ids) == sorted([alice.id, bob.id])
    assert both.etag != again.etag
    assert sorted(get_project(client, project.id).member_ids) == sorted([alice.id, bob.id])


def test_remove_project_member_is_idempotent(client: Client) -> None:
    project = new_project(client)
    alice, bob = new_user(client), new_user(client)
    add_member(client, project, alice)
    full = add_member(client, project, bob)
    removed = remove_member(client, project, alice)
    assert list(removed.member_ids) == [bob.id]
    assert removed.etag != full.etag
    again = remove_member(client, project, alice)
    assert list(again.member_ids) == [bob.id]
    assert again.etag == removed.etag
    assert list(get_project(client, project.id).member_ids) == [bob.id]


def test_add_missing_user_as_member_is_not_found(client: Client) -> None:
    project = new_project(client)
    err = expect_error(Code.NOT_FOUND, add_member, client, project, deleted_user(client))
    assert err.info.metadata["field"] == "user_id"
    assert err.resource is not None and err.resource.resource_type == "User"
    assert list(get_project(client, project.id).member_ids) == []


@pytest.mark.parametrize("force", [False, True], ids=["soft-deleted", "removed"])
@pytest.mark.parametrize("method", ["AddProjectMember", "RemoveProjectMember"])
def test_member_methods_on_missing_project_are_not_found(client: Client, method: str, force: bool) -> None:
    project = deleted_project(client, force=force)
    request = getattr(wpb, f"{method}Request")(project_id=project.id, user_id=new_user(client).id)
    err = expect_error(Code.NOT_FOUND, getattr(client.work, method), request)
    assert err.info.metadata["field"] == "project_id"
    assert err.resource is not None and err.resource.resource_type == "Project"


# ------------------------------------------------------------------ tasks


@pytest.mark.parametrize("field", ["estimated_hours", "actual_hours"])
def test_create_task_with_negative_hours_is_invalid_argument(client: Client, field: str) -> None:
    project = new_project(client)
    err = expect_error(Code.INVALID_ARGUMENT, client.work.CreateTask, task_request(project, **{field: -0.5}))
    assert f"task.{field}" in violation_fields(err)
    assert task_ids(client, f'project_id = "{project.id}"') == []


@pytest.mark.parametrize("field", ["estimated_hours", "actual_hours"])
def test_update_task_with_negative_hours_is_invalid_argument(client: Client, field: str) -> None:
    task = new_task(client, **{field: 2.0})
    err = expect_error(
        Code.INVALID_ARGUMENT, client.work.UpdateTask, wpb.UpdateTaskRequest(task=wpb.Task(id=task.id, **{field: -1.0}), update_mask=mask(field))
    )
    assert f"task.{field}" in violation_fields(err)
    assert getattr(get_task(client, task.id), field) == 2.0


@pytest.mark.parametrize("force", [False, True], ids=["soft-deleted", "removed"])
def test_create_task_in_missing_project_is_not_found(client: Client, force: bool) -> None:
    project = deleted_project(client, force=force)
    err = expect_error(Code.NOT_FOUND, client.work.CreateTask, task_request(project))
    assert err.info.metadata["field"] == "task.project_id"
    assert err.resource is not None and err.resource.resource_type == "Project"


def test_create_task_with_missing_assignee_is_not_found(client: Client) -> None:
    project = new_project(client)
    audited = spb.ListAuditLogEntriesRequest(filter='resource_type = "Task"', page_size=1)
    entries = client.security.ListAuditLogEntries(audited).total_size
    err = expect_error(Code.NOT_FOUND, client.work.CreateTask, task_request(project, assignee_id=deleted_user(client).id))
    assert err.info.metadata["field"] == "task.assignee_id"
    # Nothing of the refused task was written: no row, no audit entry.
    assert client.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"')).total_size == 0
    assert client.security.ListAuditLogEntries(audited).total_size == entries


def test_create_task_defaults(client: Client) -> None:
    task = new_task(client)
    assert task.status == wpb.TASK_STATUS_TODO
    assert task.priority == wpb.PRIORITY_MEDIUM
    assert not task.HasField("completed_time")
    assert list(task.dependency_ids) == [] and list(task.tags) == []


def test_task_done_sets_completed_time_and_leaving_done_clears_it(client: Client) -> None:
    task = new_task(client, status=wpb.TASK_STATUS_IN_PROGRESS)
    assert not task.HasField("completed_time")
    done = update_task(client, wpb.Task(id=task.id, status=wpb.TASK_STATUS_DONE), "status")
    assert done.HasField("completed_time")
    completed = done.completed_time.ToDatetime(tzinfo=dt.UTC)
    assert abs(completed - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
    assert get_task(client, task.id).completed_time == done.completed_time

    back = update_task(client, wpb.Task(id=task.id, status=wpb.TASK_STATUS_IN_PROGRESS), "status")
    assert not back.HasField("completed_time")
    assert not get_task(client, task.id).HasField("completed_time")


def test_task_created_done_has_completed_time(client: Client) -> None:
    task = new_task(client, status=wpb.TASK_STATUS_DONE)
    assert task.HasField("completed_time")


def test_task_completed_time_is_output_only(client: Client) -> None:
    task = new_task(client)
    request = wpb.UpdateTaskRequest(task=wpb.Task(id=task.id), update_mask=mask("completed_time"))
    request.task.completed_time.GetCurrentTime()
    err = expect_error(Code.INVALID_ARGUMENT, client.work.UpdateTask, request)
    assert "update_mask" in violation_fields(err)


def test_task_tags_are_deduplicated(client: Client) -> None:
    task = new_task(client, tags=["b", "a", "b", "c", "a"])
    assert list(task.tags) == ["b", "a", "c"]
    assert list(get_task(client, task.id).tags) == ["b", "a", "c"]
    updated = update_task(client, wpb.Task(id=task.id, tags=["x", "x"]), "tags")
    assert list(updated.tags) == ["x"]


def test_task_project_id_is_immutable(client: Client) -> None:
    task = new_task(client)
    other = new_project(client)
    err = expect_error(
        Code.INVALID_ARGUMENT, client.work.UpdateTask, wpb.UpdateTaskRequest(task=wpb.Task(id=task.id, project_id=other.id), update_mask=mask("project_id"))
    )
    assert "update_mask" in violation_fields(err)


# ------------------------------------------------------------------ task filters and order


@pytest.fixture
def board(client: Client) -> dict[str, Any]:
    """One project with six tasks of known status, tags, due dates, hours and assignees."""
    project = new_project(client)
    alice, bob = new_user(client), new_user(client)
    tag = unique("tag")
    specs = {
        "t1": dict(status=wpb.TASK_STATUS_DONE, tags=[tag, "backend"], due_date=date("2026-06-15"), estimated_hours=1.0, assignee_id=alice.id),
        "t2": dict(status=wpb.TASK_STATUS_TODO, tags=["backend"], due_date=date("2026-07-01"), estimated_hours=2.0, assignee_id=alice.id),
        "t3": dict(status=wpb.TASK_STATUS_DONE, tags=[tag], due_date=date("2026-08-20"), estimated_hours=5.5, assignee_id=bob.id),
        "t4": dict(status=wpb.TASK_STATUS_IN_PROGRESS, tags=[], due_date=date("2026-01-02"), estimated_hours=0.25),
        "t5": dict(status=wpb.TASK_STATUS_BLOCKED, tags=["frontend", tag]),
        "t6": dict(status=wpb.TASK_STATUS_REVIEW, due_date=date("2026-06-30"), estimated_hours=2.5, assignee_id=bob.id),
    }
    tasks = {key: client.work.CreateTask(task_request(project, title=f"{key} {unique()}", **fields)) for key, fields in specs.items()}
    other = new_task(client, status=wpb.TASK_STATUS_DONE, tags=[tag], estimated_hours=9.0, assignee_id=alice.id)  # another project
    return {"project": project, "tasks": tasks, "tag": tag, "alice": alice, "bob": bob, "other": other}


def keys_of(board: dict[str, Any], ids: list[str]) -> list[str]:
    by_id = {t.id: key for key, t in board["tasks"].items()}
    by_id[board["other"].id] = "other"
    return [by_id[i] for i in ids]


def in_board(board: dict[str, Any], expression: str) -> str:
    return f'project_id = "{board["project"].id}" AND ({expression})'


TASK_FILTERS = [
    ("status = DONE", {"t1", "t3"}),
    ("status = TASK_STATUS_BLOCKED", {"t5"}),
    ("status != DONE", {"t2", "t4", "t5", "t6"}),
    ('tags:"backend"', {"t1", "t2"}),
    ('tags:"{tag}"', {"t1", "t3", "t5"}),
    ('NOT tags:"backend"', {"t3", "t4", "t5", "t6"}),
    ('due_date < "2026-07-01"', {"t1", "t4", "t6"}),
    ('due_date <= "2026-07-01"', {"t1", "t2", "t4", "t6"}),
    ('due_date >= "2026-07-01"', {"t2", "t3"}),
    ("due_date = null", {"t5"}),
    ("estimated_hours >= 2", {"t2", "t3", "t6"}),
    ("estimated_hours > 2", {"t3", "t6"}),
    ("estimated_hours < 1.5", {"t1", "t4", "t5"}),  # t5 has no estimate: 0 hours
    ('assignee_id = "{alice}"', {"t1", "t2"}),
    ('assignee_id = "{bob}" AND status = DONE', {"t3"}),
    ('status = DONE OR tags:"frontend"', {"t1", "t3", "t5"}),
    ('tags:"{tag}" AND estimated_hours >= 2', {"t3"}),
    ("assignee_id = null", {"t4", "t5"}),
]


@pytest.mark.parametrize("expression,expected", TASK_FILTERS, ids=[f[0] for f in TASK_FILTERS])
def test_task_filters(client: Client, board: dict[str, Any], expression: str, expected: set[str]) -> None:
    expression = expression.format(tag=board["tag"], alice=board["alice"].id, bob=board["bob"].id)
    assert set(keys_of(board, task_ids(client, in_board(board, expression)))) == expected


def test_task_filter_by_project_id_alone(client: Client, board: dict[str, Any]) -> None:
    assert set(keys_of(board, task_ids(client, f'project_id = "{board["project"].id}"'))) == set(board["tasks"])


def test_task_filter_by_assignee_across_projects(client: Client, board: dict[str, Any]) -> None:
    assert set(keys_of(board, task_ids(client, f'assignee_id = "{board["alice"].id}"'))) == {"t1", "t2", "other"}


def test_task_filter_on_zero_hours_matches_however_zero_was_written(client: Client) -> None:
    """Clients see estimated_hours 0 on both tasks, so a filter must treat them alike."""
    project = new_project(client)
    created_zero = new_task(client, project, estimated_hours=0.0)
    updated_zero = new_task(client, project, estimated_hours=2.0)
    updated_zero = update_task(client, wpb.Task(id=updated_zero.id, estimated_hours=0.0), "estimated_hours")
    assert created_zero.estimated_hours == updated_zero.estimated_hours == 0.0
    scope = f'project_id = "{project.id}"'
    assert set(task_ids(client, f"{scope} AND estimated_hours < 1")) == {created_zero.id, updated_zero.id}
    assert set(task_ids(client, f"{scope} AND estimated_hours = 0")) == {created_zero.id, updated_zero.id}


def test_task_order_by_due_date_desc_puts_no_due_date_first(client: Client, board: dict[str, Any]) -> None:
    ordered = keys_of(board, task_ids(client, f'project_id = "{board["project"].id}"', order_by="due_date desc"))
    assert ordered == ["t5", "t3", "t2", "t6", "t1", "t4"]


def test_task_order_by_due_date_asc_puts_no_due_date_last(client: Client, board: dict[str, Any]) -> None:
    ordered = keys_of(board, task_ids(client, f'project_id = "{board["project"].id}"', order_by="due_date"))
    assert ordered == ["t4", "t1", "t6", "t2", "t3", "t5"]


def test_task_order_by_due_date_desc_pages_agree_with_one_page(client: Client, board: dict[str, Any]) -> None:
    filter_text = f'project_id = "{board["project"].id}"'
    one_page = [t.id for t in list_all_tasks(client, filter_text, "due_date desc")]
    paged = [t.id for t in list_all_tasks(client, filter_text, "due_date desc", page_size=1)]
    assert paged == one_page


@pytest.mark.parametrize(
    "expression",
    ['estimated_hours = "abc"', "status = FINISHED", 'due_date < "next week"', 'project_id = "not-a-uuid"', "estimated_hours:2", "nonexistent = 1"],
)
def test_task_filter_with_wrong_type_is_invalid_argument(client: Client, expression: str) -> None:
    err = expect_error(Code.INVALID_ARGUMENT, client.work.ListTasks, wpb.ListTasksRequest(filter=expression))
    assert violation_fields(err) == ["filter"]


# ------------------------------------------------------------------ dependencies


def chain(c: Client, n: int, project: wpb.Project | None = None) -> list[wpb.Task]:
    project = project or new_project(c)
    return [new_task(c, project) for _ in range(n)]


def expect_cycle(c: Client, task: wpb.Task, depends_on: wpb.Task) -> RichError:
    before = dependencies(c, task)
    err = expect_error(Code.FAILED_PRECONDITION, add_dependency, c, task, depends_on)
    assert err.info.reason == "DEPENDENCY_CYCLE"
    assert dependencies(c, task) == before
    return err


def test_add_task_dependency_shows_in_dependency_ids(client: Client) -> None:
    a, b, c_ = chain(client, 3)
    after = add_dependency(client, b, a)
    assert list(after.dependency_ids) == [a.id]
    after = add_dependency(client, b, c_)
    assert sorted(after.dependency_ids) == sorted([a.id, c_.id])
    assert dependencies(client, b) == {a.id, c_.id}
    assert dependencies(client, a) == set()


def test_add_task_dependency_twice_is_idempotent(client: Client) -> None:
    a, b = chain(client, 2)
    first = add_dependency(client, b, a)
    second = add_dependency(client, b, a)
    assert list(second.dependency_ids) == [a.id]
    assert second.etag == first.etag


def test_direct_dependency_cycle_is_failed_precondition(client: Client) -> None:
    a, b = chain(client, 2)
    add_dependency(client, b, a)
    expect_cycle(client, a, b)
    assert dependencies(client, b) == {a.id}


def test_long_dependency_cycle_is_failed_precondition(client: Client) -> None:
    a, b, c_, d = chain(client, 4)
    add_dependency(client, a, b)
    add_dependency(client, b, c_)
    add_dependency(client, c_, d)
    expect_cycle(client, d, a)
    expect_cycle(client, d, b)
    expect_cycle(client, c_, a)
    # A shortcut in the direction of the chain is no cycle.
    assert d.id in add_dependency(client, a, d).dependency_ids


def test_self_dependency_is_failed_precondition(client: Client) -> None:
    (a,) = chain(client, 1)
    expect_cycle(client, a, a)


def test_concurrent_opposite_dependencies_cannot_both_win(client: Client) -> None:
    for _ in range(5):
        a, b = chain(client, 2)
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def add(task: wpb.Task, depends_on: wpb.Task) -> None:
            barrier.wait(10)  # noqa: B023 - the threads are joined within this iteration
            try:
                add_dependency(client, task, depends_on)
                outcomes.append("ok")  # noqa: B023 - the threads are joined within this iteration
            except grpc.RpcError as exc:
                outcomes.append(exc.code().name)  # noqa: B023 - the threads are joined within this iteration

        threads = [threading.Thread(target=add, args=(a, b)), threading.Thread(target=add, args=(b, a))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(outcomes) == ["FAILED_PRECONDITION", "ok"], outcomes
        edges = {(a.id, d) for d in dependencies(client, a)} | {(b.id, d) for d in dependencies(client, b)}
        assert len(edges) == 1


def test_dependency_on_task_of_another_project_is_failed_precondition(client: Client) -> None:
    a = new_task(client)
    b = new_task(client)
    err = expect_error(Code.FAILED_PRECONDITION, add_dependency, client, a, b)
    assert err.info.reason != "DEPENDENCY_CYCLE"
    assert dependencies(client, a) == set()


def test_dependency_on_missing_task_is_not_found(client: Client) -> None:
    a, b = chain(client, 2)
    client.work.DeleteTask(wpb.DeleteTaskRequest(id=b.id))
    err = expect_error(Code.NOT_FOUND, add_dependency, client, a, b)
    assert err.info.metadata["field"] == "depends_on_task_id"


def test_remove_task_dependency_allows_the_reverse(client: Client) -> None:
    a, b = chain(client, 2)
    add_dependency(client, b, a)
    removed = remove_dependency(client, b, a)
    assert list(removed.dependency_ids) == []
    assert dependencies(client, b) == set()
    again = remove_dependency(client, b, a)
    assert list(again.dependency_ids) == [] and again.etag == removed.etag
    assert list(add_dependency(client, a, b).dependency_ids) == [b.id]


def test_removing_a_middle_link_breaks_a_long_cycle(client: Client) -> None:
    a, b, c_, d = chain(client, 4)
    add_dependency(client, a, b)
    add_dependency(client, b, c_)
    add_dependency(client, c_, d)
    remove_dependency(client, b, c_)
    assert list(add_dependency(client, d, a).dependency_ids) == [a.id]
    # d -> a -> b already, so b depending on d would close b -> d -> a -> b.
    expect_cycle(client, b, d)


# ------------------------------------------------------------------ progress


def progress(c: Client, project: wpb.Project) -> wpb.ProjectProgress:
    return c.work.GetProjectProgress(wpb.GetProjectProgressRequest(project_id=project.id))


def status_counts(p: wpb.ProjectProgress) -> dict[int, int]:
    counts = {s.status: s.count for s in p.status_counts}
    assert len(p.status_counts) == len(counts) == 5
    return counts


def test_project_progress_counts_hours_and_overdue(client: Client) -> None:
    project = new_project(client)
    make = lambda **f: client.work.CreateTask(task_request(project, **f))  # noqa: E731
    make(status=wpb.TASK_STATUS_TODO, estimated_hours=2.0, due_date=date(PAST))  # overdue
    make(status=wpb.TASK_STATUS_TODO, estimated_hours=1.25)
    make(status=wpb.TASK_STATUS_IN_PROGRESS, estimated_hours=3.0, actual_hours=1.5, due_date=date(FUTURE))
    make(status=wpb.TASK_STATUS_DONE, estimated_hours=1.0, actual_hours=1.25, due_date=date(PAST))  # done: not overdue
    make(status=wpb.TASK_STATUS_DONE, actual_hours=4.0)
    make(status=wpb.TASK_STATUS_BLOCKED, estimated_hours=0.5, due_date=date(PAST))  # overdue
    make(status=wpb.TASK_STATUS_IN_PROGRESS, due_date=date(TODAY))  # due today: not yet overdue
    p = progress(client, project)
    assert p.project_id == project.id
    assert p.total_tasks == 7
    assert status_counts(p) == {
        wpb.TASK_STATUS_TODO: 2,
        wpb.TASK_STATUS_IN_PROGRESS: 2,
        wpb.TASK_STATUS_REVIEW: 0,
        wpb.TASK_STATUS_DONE: 2,
        wpb.TASK_STATUS_BLOCKED: 1,
    }
    assert p.completion_percent == pytest.approx(100.0 * 2 / 7, abs=0.01)
    assert p.estimated_hours == pytest.approx(7.75)
    assert p.actual_hours == pytest.approx(6.75)
    assert p.overdue_tasks == 2


def test_project_progress_excludes_soft_deleted_tasks(client: Client) -> None:
    project = new_project(client)
    new_task(client, project, status=wpb.TASK_STATUS_DONE, estimated_hours=1.0, actual_hours=1.0)
    new_task(client, project, status=wpb.TASK_STATUS_TODO, estimated_hours=2.0, actual_hours=0.5)
    gone = new_task(client, project, status=wpb.TASK_STATUS_TODO, estimated_hours=100.0, actual_hours=50.0, due_date=date(PAST))
    gone_done = new_task(client, project, status=wpb.TASK_STATUS_DONE, estimated_hours=10.0)
    for task in (gone, gone_done):
        client.work.DeleteTask(wpb.DeleteTaskRequest(id=task.id))
    p = progress(client, project)
    assert p.total_tasks == 2
    assert status_counts(p)[wpb.TASK_STATUS_TODO] == 1
    assert status_counts(p)[wpb.TASK_STATUS_DONE] == 1
    assert p.completion_percent == pytest.approx(50.0)
    assert p.estimated_hours == pytest.approx(3.0)
    assert p.actual_hours == pytest.approx(1.5)
    assert p.overdue_tasks == 0


def test_project_progress_follows_status_changes(client: Client) -> None:
    project = new_project(client)
    tasks = [new_task(client, project) for _ in range(4)]
    assert progress(client, project).completion_percent == 0.0
    update_task(client, wpb.Task(id=tasks[0].id, status=wpb.TASK_STATUS_DONE), "status")
    assert progress(client, project).completion_percent == pytest.approx(25.0)


def test_project_progress_of_empty_project(client: Client) -> None:
    project = new_project(client)
    p = progress(client, project)
    assert p.project_id == project.id
    assert p.total_tasks == 0
    assert status_counts(p) == {s: 0 for s in (1, 2, 3, 4, 5)}
    assert p.completion_percent == 0.0
    assert p.estimated_hours == 0.0 and p.actual_hours == 0.0
    assert p.overdue_tasks == 0


def test_project_progress_of_missing_project_is_not_found(client: Client) -> None:
    project = deleted_project(client, force=False)
    err = expect_error(Code.NOT_FOUND, client.work.GetProjectProgress, wpb.GetProjectProgressRequest(project_id=project.id))
    assert err.info.metadata["field"] == "project_id"


# ------------------------------------------------------------------ deletion


def test_soft_deleted_project_keeps_its_tasks_readable(client: Client) -> None:
    project = new_project(client)
    task = new_task(client, project)
    deleted = client.work.DeleteProject(wpb.DeleteProjectRequest(id=project.id))
    assert deleted.HasField("delete_time")
    assert get_task(client, task.id).id == task.id
    expect_error(Code.NOT_FOUND, get_project, client, project.id)
    assert get_project(client, project.id, show_deleted=True).id == project.id
    restored = client.work.UndeleteProject(wpb.UndeleteProjectRequest(id=project.id))
    assert not restored.HasField("delete_time")
    assert task_ids(client, f'project_id = "{project.id}"') == [task.id]


def test_force_deleted_project_removes_its_tasks(client: Client) -> None:
    project = new_project(client)
    a, b = new_task(client, project), new_task(client, project)
    add_dependency(client, b, a)
    client.work.DeleteProject(wpb.DeleteProjectRequest(id=project.id, force=True))
    for task in (a, b):
        err = expect_error(Code.NOT_FOUND, get_task, client, task.id, show_deleted=True)
        assert err.resource is not None and err.resource.resource_type == "Task"
    expect_error(Code.NOT_FOUND, get_project, client, project.id, show_deleted=True)
    response = client.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"', show_deleted=True))
    assert list(response.tasks) == [] and response.total_size == 0


def test_force_deleted_task_leaves_its_dependents(client: Client) -> None:
    a, b = chain(client, 2)
    add_dependency(client, b, a)
    client.work.DeleteTask(wpb.DeleteTaskRequest(id=a.id, force=True))
    assert dependencies(client, b) == set()


def test_force_delete_of_a_project_owner_is_failed_precondition(client: Client) -> None:
    owner = new_user(client)
    project = new_project(client, owner=owner)
    expect_error(Code.FAILED_PRECONDITION, client.identity.DeleteUser, ipb.DeleteUserRequest(id=owner.id, force=True))
    assert get_project(client, project.id).owner_id == owner.id
    assert client.identity.GetUser(ipb.GetUserRequest(id=owner.id)).id == owner.id


def test_force_deleted_member_leaves_member_ids(client: Client) -> None:
    project = new_project(client)
    member, kept = new_user(client), new_user(client)
    add_member(client, project, member)
    add_member(client, project, kept)
    client.identity.DeleteUser(ipb.DeleteUserRequest(id=member.id, force=True))
    assert list(get_project(client, project.id).member_ids) == [kept.id]


def test_force_delete_of_an_assignee_unassigns_the_task(client: Client) -> None:
    assignee = new_user(client)
    task = new_task(client, assignee_id=assignee.id)
    client.identity.DeleteUser(ipb.DeleteUserRequest(id=assignee.id, force=True))
    assert get_task(client, task.id).assignee_id == ""


# ------------------------------------------------------------------ pagination while others write


class Writer:
    """A second thread that creates tasks in a project when asked to, and reports when done."""

    def __init__(self, c: Client, project: wpb.Project, due_dates: list[dt.date | None]) -> None:
        self.c = c
        self.project = project
        self.pending = list(due_dates)
        self.created: list[wpb.Task] = []
        self.errors: list[BaseException] = []
        self._requests: queue.Queue[int | None] = queue.Queue()
        self._done: queue.Queue[None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="task-writer", daemon=True)

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._requests.put(None)
        self._thread.join(30)

    def _run(self) -> None:
        while (count := self._requests.get()) is not None:
            try:
                for _ in range(count):
                    if not self.pending:
                        break
                    due = self.pending.pop(0)
                    fields = {"due_date": date(due)} if due else {}
                    self.created.append(new_task(self.c, self.project, title=f"late {unique()}", **fields))
            except BaseException as exc:  # noqa: BLE001 - reported to the test thread
                self.errors.append(exc)
            self._done.put(None)

    def insert(self, count: int) -> None:
        """Insert `count` tasks on the writer thread and wait until they are committed."""
        self._requests.put(count)
        self._done.get(timeout=30)
        assert not self.errors, self.errors


def page_through_while_writing(
    c: Client, project: wpb.Project, writer: Writer, order_by: str, inserts_per_page: int
) -> tuple[list[wpb.Task], int]:
    seen: list[wpb.Task] = []
    token = ""
    pages = 0
    while True:
        response = c.work.ListTasks(
            wpb.ListTasksRequest(filter=f'project_id = "{project.id}"', order_by=order_by, page_size=7, page_token=token)
        )
        pages += 1
        assert len(response.tasks) <= 7
        seen.extend(response.tasks)
        token = response.next_page_token
        if not token:
            return seen, pages
        writer.insert(inserts_per_page)
        assert pages < 50


def due_key_desc(task: wpb.Task) -> tuple[int, int, str]:
    """Sort key of `due_date desc` (NULLs first), then id desc, as an ascending key."""
    if not task.HasField("due_date"):
        return (0, 0, _invert(task.id))
    return (1, -as_date(task.due_date).toordinal(), _invert(task.id))


def _invert(text: str) -> str:
    return "".join(chr(0x10FFFF - ord(ch)) for ch in text)


def assert_exactly_once(original: list[wpb.Task], seen: list[wpb.Task]) -> None:
    counts = Counter(t.id for t in seen)
    repeated = {i: n for i, n in counts.items() if n > 1}
    assert not repeated, f"ids returned more than once: {repeated}"
    missing = [t.id for t in original if counts[t.id] != 1]
    assert not missing, f"{len(missing)} original tasks never returned"


def test_pagination_in_default_order_while_tasks_are_added(client: Client) -> None:
    project = new_project(client)
    original = [new_task(client, project) for _ in range(30)]
    with Writer(client, project, [None] * 20) as writer:
        seen, pages = page_through_while_writing(client, project, writer, order_by="", inserts_per_page=4)
    assert len(writer.created) == 20
    assert pages >= 5
    assert_exactly_once(original, seen)
    # The order is create_time, id: everything returned is in that order across pages.
    keys = [(t.create_time.ToNanoseconds(), t.id) for t in seen]
    assert keys == sorted(keys)
    assert [t.id for t in seen[:30]] == [t.id for t in original]


def test_pagination_by_due_date_desc_with_nulls_while_tasks_are_added(client: Client) -> None:
    project = new_project(client)
    base = dt.date(2026, 6, 1)
    original_due = [None if i % 3 == 0 else base + dt.timedelta(days=i % 5) for i in range(30)]
    original = [
        new_task(client, project, **({"due_date": date(d)} if d else {})) for d in original_due
    ]
    # Late tasks land before, among and after the originals, NULLs included.
    late_due = [None if i % 4 == 0 else base + dt.timedelta(days=(i % 7) - 1) for i in range(20)]
    with Writer(client, project, late_due) as writer:
        seen, pages = page_through_while_writing(client, project, writer, order_by="due_date desc", inserts_per_page=4)
    assert len(writer.created) == 20
    assert pages >= 5
    assert_exactly_once(original, seen)
    assert [due_key_desc(t) for t in seen] == sorted(due_key_desc(t) for t in seen)
    # Without concurrent writes, one page holds exactly what a full listing holds, in that order.
    everything = list_all_tasks(client, f'project_id = "{project.id}"', "due_date desc")
    assert len(everything) == 50
    assert [due_key_desc(t) for t in everything] == sorted(due_key_desc(t) for t in everything)
