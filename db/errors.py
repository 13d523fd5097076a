"""The one exception hierarchy of the service.

Each error knows its gRPC status code, its ErrorInfo reason and its rich details; the call
guard (service/interceptors.py) is the only place that turns them into google.rpc.Status.
Database exceptions are translated into these once, in db/translate.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import grpc

ERROR_DOMAIN = "nexus"


@dataclass(frozen=True)
class FieldViolation:
    """One offending part of a request (google.rpc.BadRequest.FieldViolation)."""

    field: str
    description: str
    reason: str = ""


class NexusError(Exception):
    """Base of every error the service reports to clients on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    default_reason = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: dict[str, str] | None = None,
        violations: list[FieldViolation] | None = None,
        resource_type: str = "",
        resource_name: str = "",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.violations = list(violations or [])
        self.resource_type = resource_type
        self.resource_name = resource_name


class InvalidArgument(NexusError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    @classmethod
    def field(cls, field_path: str, description: str, reason: str = "INVALID_FIELD") -> InvalidArgument:
        return cls(
            f"invalid {field_path}: {description}",
            reason=reason,
            violations=[FieldViolation(field_path, description, reason)],
            metadata={"field": field_path},
        )


class NotFound(NexusError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "RESOURCE_NOT_FOUND"

    @classmethod
    def resource(cls, resource_type: str, resource_id: str, field_path: str = "") -> NotFound:
        meta = {"resource_type": resource_type, "resource_id": resource_id}
        if field_path:
            meta["field"] = field_path
        return cls(
            f"{resource_type} {resource_id!r} not found",
            metadata=meta,
            resource_type=resource_type,
            resource_name=resource_id,
        )


class AlreadyExists(NexusError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "RESOURCE_ALREADY_EXISTS"


class FailedPrecondition(NexusError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(NexusError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class DeadlineExceeded(NexusError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Unavailable(NexusError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "DATABASE_UNAVAILABLE"


class ResourceExhausted(NexusError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class OutOfRange(NexusError):
    code = grpc.StatusCode.OUT_OF_RANGE
    default_reason = "OUT_OF_RANGE"


class DataLoss(NexusError):
    code = grpc.StatusCode.DATA_LOSS
    default_reason = "DATA_LOSS"


class Unauthenticated(NexusError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class PermissionDenied(NexusError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class NeedsTransaction(Exception):
    """Not an answer: a unit of work run under a ONE_STATEMENT plan (db/unit.py) found,
    before writing anything, that it must run in a transaction after all; run_sync runs it again
    in one."""


@dataclass
class Violations:
    """Collects several field violations and raises them as one InvalidArgument."""

    items: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str, reason: str = "INVALID_FIELD") -> None:
        self.items.append(FieldViolation(field_path, description, reason))

    def raise_if_any(self) -> None:
        if self.items:
            first = self.items[0]
            summary = "; ".join(f"{v.field}: {v.description}" for v in self.items)
            raise InvalidArgument(
                f"invalid request: {summary}",
                reason=first.reason,
                violations=self.items,
                metadata={"field": first.field},
            )
