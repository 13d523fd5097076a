"""AI jobs: DataAnalysis and ToolGeneration (PENDING -> RUNNING -> COMPLETED | FAILED, moved by
their own methods, which stamp the times) and AnalysisFile (a File linked to an analysis).

A job's row is its owner's (user_id: the caller unless an admin names another) and admins';
strangers see nothing of it. What the job did (status, result or generated code and output,
error, started and completed times) is written only by the lifecycle methods (start, complete,
fail), through one table of the legal moves (TRANSITIONS) for both resources; the standard Update
changes only a PENDING job. An AnalysisFile is seen and managed as its analysis is, and goes with
it (a foreign key ON DELETE CASCADE, done by engine/cascade.py, each removal audited).

Each job is a stream scope of its own ("data_analyses/<id>", "tool_generations/<id>"): every
write of it appends its new state to the change log in its transaction (engine/events.py), which
is what its Watch reads (service/ai_jobs.py says why)."""
from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message
from nexus.ai.v1 import ai_pb2 as pb
from sqlalchemy import ForeignKey, Index, String, Text, Uuid, case, select, true
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from db import errors
from db.base import Base, ResourceMixin, json_object, one_of, optional_timestamp, utcnow
from db.domains import chat
from db.domains.files import File  # noqa: F401 - the files table the foreign key names
from db.domains.identity import User  # noqa: F401 - the users table the foreign key names
from db.engine import changes, events, reads, rules
from db.engine.call import Call
from db.engine.codecs import enum_maps
from db.engine.resource import REGISTRY, ResourceSpec
from db.engine.rules import Access, Rule, is_caller, mine
from db.engine.writes import check_etag

# ---------------------------------------------------------------- tables

PENDING, RUNNING, COMPLETED, FAILED = "pending", "running", "completed", "failed"
JOB_STATUSES = (PENDING, RUNNING, COMPLETED, FAILED)
FINAL = frozenset({COMPLETED, FAILED})
ROLES = ("input", "output")


class DataAnalysis(ResourceMixin, Base):
    __tablename__ = "data_analyses"
    __table_args__ = (
        one_of("status", JOB_STATUSES),
        Index("ix_data_analyses_create_time_id", "create_time", "id"),
        Index("ix_data_analyses_user_id", "user_id"),
    )

    # Cleared (the analysis left to admins) if the user is deleted for good.
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))
    title: Mapped[str] = mapped_column(String(500), nullable=False)
    analysis_type: Mapped[str] = mapped_column(String(100), nullable=False)
    parameters: Mapped[json_object]
    result: Mapped[json_object]
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=PENDING)
    error: Mapped[str | None] = mapped_column(Text)
    started_time: Mapped[optional_timestamp]
    completed_time: Mapped[optional_timestamp]


class AnalysisFile(ResourceMixin, Base):
    __tablename__ = "analysis_files"
    __table_args__ = (
        one_of("role", ROLES),
        Index("ix_analysis_files_create_time_id", "create_time", "id"),
        Index("ix_analysis_files_analysis_id", "analysis_id"),
        Index("ix_analysis_files_file_id", "file_id"),
    )

    # Removed with its analysis (and with its File, should that be deleted for good).
    analysis_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("data_analyses.id", ondelete="CASCADE"), nullable=False)
    file_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("files.id", ondelete="CASCADE"), nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False, default="input")
    description: Mapped[str | None] = mapped_column(Text)


class ToolGeneration(ResourceMixin, Base):
    __tablename__ = "tool_generations"
    __table_args__ = (
        one_of("status", JOB_STATUSES),
        Index("ix_tool_generations_create_time_id", "create_time", "id"),
        Index("ix_tool_generations_user_id", "user_id"),
    )

    # Cleared (the generation left to admins) if the user is deleted for good.
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    tool_type: Mapped[str] = mapped_column(String(100), nullable=False)
    specification: Mapped[json_object]
    generated_code: Mapped[str | None] = mapped_column(Text)
    output: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=PENDING)
    error: Mapped[str | None] = mapped_column(Text)
    started_time: Mapped[optional_timestamp]
    completed_time: Mapped[optional_timestamp]


# ---------------------------------------------------------------- row rules

OWNED_ANALYSES = mine(DataAnalysis.user_id, "their own")
OWNED_GENERATIONS = mine(ToolGeneration.user_id, "their own")


def _of_own_analyses(user_id: uuid.UUID | None, role: str) -> ColumnElement[bool]:
    return AnalysisFile.analysis_id.in_(select(DataAnalysis.id).where(is_caller(DataAnalysis.user_id, user_id)))


OF_OWN_ANALYSES = Rule(_of_own_analyses, "those of their own analyses")


# ---------------------------------------------------------------- the lifecycle

# The status a job's status name stands for in the API, and back ("running" <-> JOB_STATUS_RUNNING).
_TO_DB, _TO_NUMBER = enum_maps(pb.JobStatus.DESCRIPTOR)
# A job's message: either resource's.
Job = pb.DataAnalysis | pb.ToolGeneration


def status_name(status: str) -> str:
    """The API's name of a stored status: "running" -> "JOB_STATUS_RUNNING"."""
    return pb.JobStatus.Name(pb.JobStatus.ValueType(_TO_NUMBER[status]))


START, COMPLETE, FAIL = "start", "complete", "fail"
# The one graph of both resources: method -> (the statuses it moves from, the status it moves to).
TRANSITIONS: dict[str, tuple[frozenset[str], str]] = {
    START: (frozenset({PENDING}), RUNNING),
    COMPLETE: (frozenset({RUNNING}), COMPLETED),
    FAIL: (frozenset({PENDING, RUNNING}), FAILED),
}


def _not_pending(spec_name: str, row: Any) -> errors.FailedPrecondition:
    return errors.FailedPrecondition(
        f"{spec_name} {row.id} is {status_name(row.status)}: only a PENDING one may change",
        reason="JOB_NOT_PENDING",
        metadata={"resource_type": spec_name, "status": status_name(row.status)},
        resource_type=spec_name,
        resource_name=str(row.id),
    )


def _only_pending_changes(spec_name: str) -> Callable[[Session, Any, set[str], bool, Call], None]:
    """before_write: a new job is PENDING (whatever the request said: the status is output only),
    and an Update changes a PENDING one only."""

    def check(session: Session, row: Any, changed: set[str], creating: bool, call: Call) -> None:
        if creating:
            row.status = PENDING
        elif row.status != PENDING:
            raise _not_pending(spec_name, row)

    return check


JOB_OUTPUT_ONLY = frozenset({"status", "error", "started_time", "completed_time"})

DATA_ANALYSES = REGISTRY.add(
    ResourceSpec(
        name="DataAnalysis",
        plural="DataAnalyses",
        model=DataAnalysis,
        message=pb.DataAnalysis,
        singular_field="data_analysis",
        output_only=JOB_OUTPUT_ONLY | {"result"},
        required=frozenset({"title", "analysis_type"}),
        references={"user_id": "User"},
        orderable=("create_time", "update_time", "title", "started_time", "completed_time"),
        search_fields=(("title", "A"),),
        batch_get=True,
        before_write=_only_pending_changes("DataAnalysis"),
        stream_scope=lambda row: f"data_analyses/{row.id}",
        owner_field="user_id",
        access=Access(read=OWNED_ANALYSES, manage=OWNED_ANALYSES, admin_only=frozenset({"user_id"})),
    )
)

ANALYSIS_FILES = REGISTRY.add(
    ResourceSpec(
        name="AnalysisFile",
        plural="AnalysisFiles",
        model=AnalysisFile,
        message=pb.AnalysisFile,
        singular_field="analysis_file",
        required=frozenset({"analysis_id", "file_id"}),
        immutable=frozenset({"analysis_id", "file_id"}),
        # Both checked by the engine, the caller's sight included: an analysis of its own, a
        # File it may see.
        references={"analysis_id": "DataAnalysis", "file_id": "File"},
        batch_get=True,
        access=Access(read=OF_OWN_ANALYSES, manage=OF_OWN_ANALYSES),
    )
)

TOOL_GENERATIONS = REGISTRY.add(
    ResourceSpec(
        name="ToolGeneration",
        plural="ToolGenerations",
        model=ToolGeneration,
        message=pb.ToolGeneration,
        singular_field="tool_generation",
        output_only=JOB_OUTPUT_ONLY | {"generated_code", "output"},
        required=frozenset({"prompt", "tool_type"}),
        references={"user_id": "User"},
        orderable=("create_time", "update_time", "tool_type", "started_time", "completed_time"),
        search_fields=(("prompt", "A"), ("generated_code", "B")),
        batch_get=True,
        before_write=_only_pending_changes("ToolGeneration"),
        stream_scope=lambda row: f"tool_generations/{row.id}",
        owner_field="user_id",
        access=Access(read=OWNED_GENERATIONS, manage=OWNED_GENERATIONS, admin_only=frozenset({"user_id"})),
    )
)

JOBS = (DATA_ANALYSES, TOOL_GENERATIONS)
# The resources of this module, served by service/ai.py.
RESOURCES: tuple[ResourceSpec, ...] = (DATA_ANALYSES, ANALYSIS_FILES, TOOL_GENERATIONS)


# ---------------------------------------------------------------- custom methods


def _outcome_values(spec: ResourceSpec, request: Any, fields: dict[str, str]) -> dict[str, Any]:
    """The columns a completion or failure sets, from the request's fields, each checked by the
    resource's codec of the column (its size limit, its JSON), with the request's field paths."""
    values: dict[str, Any] = {}
    for column, request_field in fields.items():
        message = spec.message()
        source = getattr(request, request_field)
        if spec.codecs[column].present(_with(message, column, source)):
            try:
                values.update(spec.codecs[column].load(message))
            except errors.InvalidArgument as exc:
                violations = errors.Violations()
                for v in exc.violations:
                    violations.add(request_field, v.description, v.reason)
                violations.raise_if_any()
                raise
        else:
            values[column] = None
    return values


def _with(message: Message, name: str, value: Any) -> Message:
    """message with its field `name` set to value (a scalar, or a message copied in)."""
    if isinstance(value, Message):
        getattr(message, name).CopyFrom(value)
    else:
        setattr(message, name, value)
    return message


def transition(session: Session, spec: ResourceSpec, request: Any, method: str, call: Call) -> Message:
    """Move one job along TRANSITIONS by `method` (start, complete, fail): the row locked and
    read under the caller's manage rule, its etag checked, its move checked, its outcome written
    with its time, audited and appended to its stream, in the caller's transaction.

    An illegal move is FAILED_PRECONDITION ILLEGAL_STATUS_TRANSITION naming the current status and
    the one asked for."""
    sources, target = TRANSITIONS[method]
    outcome: dict[str, Any] = {}
    if method == COMPLETE:
        fields = {"result": "result"} if spec is DATA_ANALYSES else {"generated_code": "generated_code", "output": "output"}
        outcome = _outcome_values(spec, request, fields)
    elif method == FAIL:
        if not request.error:
            raise errors.InvalidArgument.field("error", "is required: what went wrong", reason="REQUIRED_FIELD")
        outcome = _outcome_values(spec, request, {"error": "error"})
    row = reads.fetch(session, spec, request.id, lock=True)
    check_etag(row, request.etag, "etag")
    if row.status not in sources:
        raise errors.FailedPrecondition(
            f"{spec.name} {request.id} is {status_name(row.status)}: it cannot become {status_name(target)} "
            f"(only from {' or '.join(status_name(s) for s in JOB_STATUSES if s in sources)})",
            reason="ILLEGAL_STATUS_TRANSITION",
            metadata={"resource_type": spec.name, "current_status": status_name(row.status), "requested_status": status_name(target)},
            resource_type=spec.name,
            resource_name=request.id,
        )
    now = utcnow()
    row.status = target
    if target == RUNNING:
        row.started_time = now
    else:
        row.completed_time = now
    for column, value in outcome.items():
        setattr(row, column, value)
    row.update_time = now
    changes.flush(session)
    return events.publish(session, spec, row, events.UPDATED, spec.to_proto(row))


# ---------------------------------------------------------------- watching a job


@dataclass(frozen=True)
class Watched:
    """What a Watch reads each time: the job's states since its position, in order (each as it
    was written: the change log's payloads), or how the stream ends."""

    states: list[Job]
    position: int
    gone: bool  # the row was deleted (a DELETED event, or no row at all)


def scope_of(spec: ResourceSpec, row_id: uuid.UUID) -> str:
    assert spec.stream_scope is not None
    return spec.stream_scope(type("Key", (), {"id": row_id}))


def watch_start(session: Session, spec: ResourceSpec, raw_id: str) -> tuple[Job, uuid.UUID, int]:
    """(the job as the caller may see it now, its id, the position in its stream that state is at
    least as new as). The position is read first: a change committed in between comes again
    later, and the Watch leaves out what is not newer than what it sent (by revision)."""
    row_id = reads.visible_id(session, spec, raw_id)  # PERMISSION_DENIED as a Get answers it
    scope = scope_of(spec, row_id)
    position = events.last_sequences(session, [scope])[scope][0]
    row = reads.fetch(session, spec, raw_id)
    return spec.to_proto(row), row_id, position


def watch_next(session: Session, spec: ResourceSpec, row_id: uuid.UUID, position: int, call: Call, limit: int = 1) -> Watched:
    """The next states of a watched job after position, each sent only while its caller may see
    the row (read afresh here, with the states): PERMISSION_DENIED once it may not (a job given to
    another user, a role lowered), gone once the row is deleted (its DELETED event)."""
    # The credential still holds, and the role and user it acts with now (a lowered role counts).
    role, user_id = chat.current_credential(session, call.actor_type, call.actor_id, call.actor_user_id, call.role)
    scope = scope_of(spec, row_id)
    batch = events.read_after(session, scope, position, limit)
    if any(event.event_type == events.DELETED for event in batch):
        return Watched([], position, True)
    allowed = rules.read_predicate(spec, role, user_id)
    # Whether the row is there and whether the caller may see it, in one statement (one
    # snapshot): read apart, a delete committed between them made a deleted job look hidden
    # (PERMISSION_DENIED instead of NOT_FOUND).
    seen = select(spec.table.c.id, case((allowed, True), else_=False) if allowed is not None else true())
    found = session.execute(seen.where(spec.table.c.id == row_id)).first()
    if found is None:
        return Watched([], position, True)
    if not found[1]:
        raise rules.denied(spec, str(row_id), False)
    states = []
    for event in batch:
        message = spec.message()
        message.MergeFromString(event.payload)
        # A state is the caller's to see only if the job was theirs then (the rule is the owner's,
        # or any for admins): one written while it was another user's ends the stream, however
        # late the stream reads it.
        if allowed is not None and message.user_id != str(user_id):
            raise rules.denied(spec, str(row_id), False)
        states.append(message)
    return Watched(states, batch[-1].seq if batch else position, False)


def revision_of(message: Job) -> int:
    """The revision behind a message's etag (W/"<revision>")."""
    return int(message.etag.strip('W/"'))


def finished(message: Job) -> bool:
    return message.status in (pb.JOB_STATUS_COMPLETED, pb.JOB_STATUS_FAILED)
