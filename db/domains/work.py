"""Work domain: projects, members, tasks, dependencies and progress."""
from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

from nexus.work.v1 import work_pb2 as pb
from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Date,
    Float,
    ForeignKey,
    Index,
    String,
    Text,
    Uuid,
    case,
    false,
    func,
    literal,
    or_,
    select,
    text,
)
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship
from sqlalchemy.sql.elements import ColumnElement

from db import errors
from db.base import Base, ExactDecimal, ResourceMixin, SoftDeleteMixin, json_list, link_table, one_of, optional_timestamp, short_text, utcnow
from db.domains.identity import User
from db.engine import changes, reads, writes
from db.engine.call import Call
from db.engine.codecs import MoneyCodec, OutputCodec, enum_maps, parse_uuid
from db.engine.filtering import FieldKind, FilterField
from db.engine.resource import REGISTRY, ResourceSpec
from db.engine.rules import Access, CreateRule, Rule, is_caller


# ---------------------------------------------------------------- tables

PROJECT_STATUSES = ("planning", "active", "on_hold", "completed", "cancelled")


PRIORITIES = ("low", "medium", "high", "critical")


TASK_STATUSES = ("todo", "in_progress", "review", "done", "blocked")


project_members = link_table("project_members", ("project_id", "projects.id"), ("user_id", "users.id"))


task_dependencies = link_table("task_dependencies", ("task_id", "tasks.id"), ("depends_on_id", "tasks.id"), CheckConstraint("task_id <> depends_on_id", name="not_self"))


class Project(ResourceMixin, SoftDeleteMixin, Base):
    __tablename__ = "projects"
    __table_args__ = (
        one_of("status", PROJECT_STATUSES),
        one_of("priority", PRIORITIES),
        CheckConstraint("end_date IS NULL OR start_date IS NULL OR end_date >= start_date", name="dates_ordered"),
        Index("ix_projects_create_time_id", "create_time", "id"),
        Index("ix_projects_owner_id_status", "owner_id", "status"),
        # A page in each orderable field's order (migration 0017; tests/test_index_backed.py).
        Index("ix_projects_update_time_id", "update_time", "id"),
        Index("ix_projects_name_id", "name", "id"),
        Index("ix_projects_start_date_id", "start_date", "id"),
        Index("ix_projects_end_date_id", "end_date", "id"),
    )

    name: Mapped[short_text]
    description: Mapped[str | None] = mapped_column(Text)
    owner_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="RESTRICT"), nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="planning", index=True)
    priority: Mapped[str] = mapped_column(String(16), nullable=False, default="medium", index=True)
    start_date: Mapped[dt.date | None] = mapped_column(Date)
    end_date: Mapped[dt.date | None] = mapped_column(Date)
    # Money as exact decimal plus its currency, never a float.
    budget_amount: Mapped[Decimal | None] = mapped_column(ExactDecimal())
    budget_currency: Mapped[str | None] = mapped_column(String(3))
    archived: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)

    members: Mapped[list[User]] = relationship(secondary=project_members, lazy="selectin", order_by="User.id")


class Task(ResourceMixin, SoftDeleteMixin, Base):
    __tablename__ = "tasks"
    __table_args__ = (
        one_of("status", TASK_STATUSES),
        one_of("priority", PRIORITIES),
        CheckConstraint("estimated_hours IS NULL OR estimated_hours >= 0", name="estimated_hours_non_negative"),
        CheckConstraint("actual_hours IS NULL OR actual_hours >= 0", name="actual_hours_non_negative"),
        Index("ix_tasks_create_time_id", "create_time", "id"),
        Index("ix_tasks_project_id_status", "project_id", "status"),
        # A page in each orderable field's order, and cut by completed_time or update_time
        # (migration 0017; tests/test_index_backed.py).
        Index("ix_tasks_update_time_id", "update_time", "id"),
        Index("ix_tasks_title_id", "title", "id"),
        Index("ix_tasks_completed_time_id", "completed_time", "id"),
        # The common task page (migration 0004): live tasks of a project in a status, by creation;
        # with delete_time, SQLite counts the page's matches from the index alone (0019).
        Index(
            "ix_tasks_live_project_status_create_time", "project_id", "status", "create_time", "id", "delete_time",
            postgresql_where=text("delete_time IS NULL"), sqlite_where=text("delete_time IS NULL"),
        ),
        Index("ix_tasks_assignee_id_status", "assignee_id", "status"),
        Index("ix_tasks_due_date", "due_date"),
    )

    project_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("projects.id", ondelete="CASCADE"), nullable=False)
    title: Mapped[short_text]
    description: Mapped[str | None] = mapped_column(Text)
    assignee_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))
    creator_id: Mapped[uuid.UUID | None] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="todo", index=True)
    priority: Mapped[str] = mapped_column(String(16), nullable=False, default="medium", index=True)
    due_date: Mapped[dt.date | None] = mapped_column(Date)
    # 0 is "not set" in proto3 as well as zero hours: stored as 0, never NULL, so filters agree.
    estimated_hours: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    actual_hours: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    tags: Mapped[json_list]
    completed_time: Mapped[optional_timestamp]

    dependencies: Mapped[list[Task]] = relationship(
        secondary=task_dependencies,
        primaryjoin=lambda: Task.id == task_dependencies.c.task_id,
        secondaryjoin=lambda: Task.id == task_dependencies.c.depends_on_id,
        # Self-referential eager loads stop at depth 0 unless told: without join_depth every
        # task of a page lazy-loaded its dependencies with a query of its own (N+1).
        lazy="selectin",
        join_depth=1,
        order_by=lambda: Task.id,
    )


# ---------------------------------------------------------------- row rules

def projects_of(user_id: uuid.UUID | None) -> Any:
    """Ids of the projects a user owns or is a member of (none for a caller without a user)."""
    owned = select(Project.id).where(is_caller(Project.owner_id, user_id))
    member = select(project_members.c.project_id).where(is_caller(project_members.c.user_id, user_id))
    return owned.union(member)


def _project_manage(user_id: uuid.UUID | None, role: str) -> ColumnElement[bool]:
    if role != "manager" or user_id is None:
        return false()
    return Project.id.in_(projects_of(user_id))


def _task_manage(user_id: uuid.UUID | None, role: str) -> ColumnElement[bool]:
    if user_id is None:
        return false()
    own = or_(is_caller(Task.assignee_id, user_id), is_caller(Task.creator_id, user_id))
    if role == "manager":
        return or_(own, Task.project_id.in_(projects_of(user_id)))
    return own

_TASK_STATUS_TO_DB, _TASK_STATUS_NUMBER = enum_maps(pb.TaskStatus.DESCRIPTOR)


def _task_manage_says(role: str) -> str:
    if role == "manager":
        return "those assigned to them, created by them, or in projects they own or belong to"
    return "those assigned to them or created by them"


def _project_rules(session: Session, row: Project, changed: set[str], creating: bool, call: Call) -> None:
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
        # member_ids:"<user id>": the projects a user is a member of (ix_project_members_user_id).
        extra_filters={"member_ids": FilterField(
            FieldKind.RELATED_IDS, Project.__table__.c.id, link=(project_members.c.project_id, project_members.c.user_id),
        )},
        search_fields=(("name", "A"), ("description", "B")),
        before_write=_project_rules,
        owner_field="owner_id",
        access=Access(manage=Rule(_project_manage, lambda role: "projects they own or belong to" if role == "manager" else "none")),
    )
)


def _task_rules(session: Session, row: Task, changed: set[str], creating: bool, call: Call) -> None:
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


def _tasks_in_callers_projects(conn: Any, rows: list[Any], call: Call, prefixes: list[str]) -> None:
    """A caller other than an admin creates tasks only in projects it owns or is a member of:
    one query for every project the rows name."""
    wanted = {row.project_id for row in rows}
    allowed = set(conn.execute(select(Project.id).where(Project.id.in_(wanted), Project.id.in_(projects_of(call.actor_user_id)))).scalars())
    for row, prefix in zip(rows, prefixes, strict=True):
        if row.project_id not in allowed:
            raise errors.PermissionDenied(
                f"the caller may create tasks only in projects it owns or is a member of, not in {row.project_id}",
                reason="PROJECT_ACCESS_DENIED",
                metadata={"field": f"{prefix}project_id", "resource_type": "Project", "resource_id": str(row.project_id)},
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
        access=Access(
            manage=Rule(_task_manage, _task_manage_says),
            create=CreateRule("in projects they own or belong to", _tasks_in_callers_projects),
        ),
    )
)


# ---------------------------------------------------------------- custom methods


def add_project_member(session: Session, request: pb.AddProjectMemberRequest) -> pb.Project:
    return writes.change_membership(session, PROJECTS, request.project_id, request.user_id, add=True, parent_field="project_id")


def remove_project_member(session: Session, request: pb.RemoveProjectMemberRequest) -> pb.Project:
    return writes.change_membership(session, PROJECTS, request.project_id, request.user_id, add=False, parent_field="project_id")


def project_progress(session: Session, request: pb.GetProjectProgressRequest) -> pb.ProjectProgress:
    project = reads.fetch(session, PROJECTS, request.project_id, field_path="project_id")
    today = dt.datetime.now(dt.UTC).date()
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
            pb.TaskStatusCount(status=pb.TaskStatus.ValueType(number), count=by_status.get(name, 0))
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
    task = reads.fetch(session, TASKS, request.task_id, field_path="task_id", lock=True)
    other = reads.fetch(session, TASKS, request.depends_on_task_id, field_path="depends_on_task_id")
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
    changes.flush(session)
    return TASKS.to_proto(task)


def remove_task_dependency(session: Session, request: pb.RemoveTaskDependencyRequest) -> pb.Task:
    task = reads.fetch(session, TASKS, request.task_id, field_path="task_id", lock=True)
    other_id = parse_uuid(request.depends_on_task_id, "depends_on_task_id")
    kept = [t for t in task.dependencies if t.id != other_id]
    if len(kept) != len(task.dependencies):
        task.dependencies = kept
        task.update_time = utcnow()
        changes.flush(session)
    return TASKS.to_proto(task)
