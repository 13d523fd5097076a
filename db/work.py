"""Work domain: projects, members, tasks, dependencies and progress."""
from __future__ import annotations

import datetime as dt

from nexus.work.v1 import work_pb2 as pb
from sqlalchemy import case, func, literal, select
from sqlalchemy.orm import Session

from db import crud, errors, policy
from db.base import utcnow
from db.codecs import MoneyCodec, OutputCodec, enum_maps, parse_uuid
from db.models import Project, Task, task_dependencies
from db.resource import REGISTRY, ResourceSpec

_TASK_STATUS_TO_DB, _TASK_STATUS_NUMBER = enum_maps(pb.TaskStatus.DESCRIPTOR)


def _project_rules(session: Session, row: Project, changed: set[str], creating: bool, call: crud.Call) -> None:
    if row.start_date and row.end_date and row.end_date < row.start_date:
        raise errors.InvalidArgument.field(
            "project.end_date", f"{row.end_date} is before start_date {row.start_date}", reason="END_BEFORE_START"
        )
    if row.budget_amount is not None and row.budget_amount < 0:
        raise errors.InvalidArgument.field("project.budget", "must not be negative")


PROJECTS = REGISTRY.add(
    ResourceSpec(
        name="Project",
        plural="Projects",
        model=Project,
        message=pb.Project,
        singular_field="project",
        relation_fields={"members": ("member_ids", lambda u: str(u.id))},
        immutable=frozenset({"owner_id"}),
        required=frozenset({"name", "owner_id"}),
        references={"owner_id": "User"},
        extra_codecs={
            "budget": MoneyCodec("budget", "budget_amount", "budget_currency"),
            "member_ids": OutputCodec("member_ids", lambda r: sorted(str(u.id) for u in r.members), repeated=True),
        },
        orderable=("create_time", "update_time", "name", "start_date", "end_date"),
        search_fields=(("name", "A"), ("description", "B")),
        before_write=_project_rules,
        owner_field="owner_id",
    )
)


def _task_rules(session: Session, row: Task, changed: set[str], creating: bool, call: crud.Call) -> None:
    if creating and call.role != "admin":
        _check_task_project(session, row, call)
    violations = errors.Violations()
    for name in ("estimated_hours", "actual_hours"):
        value = getattr(row, name)
        if value is not None and value < 0:
            violations.add(f"task.{name}", f"must not be negative (got {value})", "NEGATIVE_HOURS")
    violations.raise_if_any()
    # completed_time follows the status: set on reaching done, cleared on leaving it.
    if row.status == "done" and row.completed_time is None:
        row.completed_time = utcnow()
    elif row.status != "done":
        row.completed_time = None


def _check_task_project(session: Session, row: Task, call: crud.Call) -> None:
    """A caller other than an admin creates tasks only in projects it owns or is a member of."""
    if session.scalar(select(literal(True)).where(Project.id == row.project_id, Project.id.in_(policy.projects_of(call.actor_user_id)))) is None:
        raise errors.PermissionDenied(
            f"the caller may create tasks only in projects it owns or is a member of, not in {row.project_id}",
            reason="PROJECT_ACCESS_DENIED",
            metadata={"field": "task.project_id", "resource_type": "Project", "resource_id": str(row.project_id)},
        )


TASKS = REGISTRY.add(
    ResourceSpec(
        name="Task",
        plural="Tasks",
        model=Task,
        message=pb.Task,
        singular_field="task",
        relation_fields={"dependencies": ("dependency_ids", lambda t: str(t.id))},
        output_only=frozenset({"completed_time"}),
        immutable=frozenset({"project_id", "creator_id"}),
        required=frozenset({"project_id", "title"}),
        references={"project_id": "Project", "assignee_id": "User", "creator_id": "User"},
        extra_codecs={
            "dependency_ids": OutputCodec("dependency_ids", lambda r: sorted(str(t.id) for t in r.dependencies), repeated=True),
        },
        orderable=("create_time", "update_time", "due_date", "title", "completed_time"),
        search_fields=(("title", "A"), ("description", "B")),
        batch_create=True,
        batch_get=True,
        before_write=_task_rules,
        owner_field="creator_id",
    )
)


# ---------------------------------------------------------------- custom methods


def add_project_member(session: Session, request: pb.AddProjectMemberRequest) -> pb.Project:
    return crud.change_membership(session, PROJECTS, request.project_id, request.user_id, add=True, parent_field="project_id")


def remove_project_member(session: Session, request: pb.RemoveProjectMemberRequest) -> pb.Project:
    return crud.change_membership(session, PROJECTS, request.project_id, request.user_id, add=False, parent_field="project_id")


def project_progress(session: Session, request: pb.GetProjectProgressRequest) -> pb.ProjectProgress:
    project = crud.fetch(session, PROJECTS, request.project_id, field_path="project_id")
    today = dt.datetime.now(dt.timezone.utc).date()
    live = (Task.project_id == project.id, Task.delete_time.is_(None))
    by_status = dict(session.execute(select(Task.status, func.count()).where(*live).group_by(Task.status)).all())
    sums = session.execute(
        select(
            func.coalesce(func.sum(Task.estimated_hours), 0.0),
            func.coalesce(func.sum(Task.actual_hours), 0.0),
            func.coalesce(func.sum(case((Task.due_date < today, 1), else_=0)).filter(Task.status != "done"), 0),
        ).where(*live)
    ).one()
    total = sum(by_status.values())
    done = by_status.get("done", 0)
    return pb.ProjectProgress(
        project_id=str(project.id),
        total_tasks=total,
        status_counts=[
            pb.TaskStatusCount(status=number, count=by_status.get(name, 0))
            for name, number in _TASK_STATUS_NUMBER.items()
        ],
        completion_percent=round(100.0 * done / total, 2) if total else 0.0,
        estimated_hours=float(sums[0]),
        actual_hours=float(sums[1]),
        overdue_tasks=int(sums[2]),
    )


def _depends_transitively(session: Session, start: object, target: object) -> bool:
    """Whether `start` already depends, directly or not, on `target` (a recursive CTE)."""
    deps = task_dependencies.c
    reach = select(deps.depends_on_id.label("id")).where(deps.task_id == start).cte("reach", recursive=True)
    reach = reach.union(select(deps.depends_on_id).where(deps.task_id == reach.c.id))
    return session.scalar(select(literal(1)).where(reach.c.id == target).limit(1)) is not None


def add_task_dependency(session: Session, request: pb.AddTaskDependencyRequest) -> pb.Task:
    task = crud.fetch(session, TASKS, request.task_id, field_path="task_id", lock=True)
    other = crud.fetch(session, TASKS, request.depends_on_task_id, field_path="depends_on_task_id")
    if task.project_id != other.project_id:
        raise errors.FailedPrecondition(
            "a task can only depend on a task of the same project", reason="CROSS_PROJECT_DEPENDENCY"
        )
    # Serialise dependency changes per project so two concurrent adds cannot close a cycle.
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(Project.id).where(Project.id == task.project_id).with_for_update())
    if other in task.dependencies:
        return TASKS.to_proto(task)
    if task.id == other.id or _depends_transitively(session, other.id, task.id):
        raise errors.FailedPrecondition(
            f"task {request.depends_on_task_id} already depends on task {request.task_id}: the dependency would close a cycle",
            reason="DEPENDENCY_CYCLE",
            metadata={"task_id": request.task_id, "depends_on_task_id": request.depends_on_task_id},
        )
    task.dependencies.append(other)
    task.update_time = utcnow()
    session.flush()
    return TASKS.to_proto(task)


def remove_task_dependency(session: Session, request: pb.RemoveTaskDependencyRequest) -> pb.Task:
    task = crud.fetch(session, TASKS, request.task_id, field_path="task_id", lock=True)
    other_id = parse_uuid(request.depends_on_task_id, "depends_on_task_id")
    kept = [t for t in task.dependencies if t.id != other_id]
    if len(kept) != len(task.dependencies):
        task.dependencies = kept
        task.update_time = utcnow()
        session.flush()
    return TASKS.to_proto(task)
