"""Database exceptions become service errors here, once, for every resource."""
from __future__ import annotations

import re

import grpc
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import exc as orm_exc

from db import errors

# SQLSTATE classes (PostgreSQL) that a retry of the whole transaction can cure.
RETRYABLE_SQLSTATES = {"40001", "40P01"}
_SQLITE_UNIQUE = re.compile(r"UNIQUE constraint failed: (.+)")
_PG_UNIQUE_DETAIL = re.compile(r"Key \((?P<cols>[^)]*)\)=")
# ErrorInfo reason of a database that does not answer (a lost or refused connection).
UNREACHABLE = "DATABASE_UNAVAILABLE"
# ErrorInfo metadata key of DEADLINE_EXCEEDED and UNAVAILABLE: "false" when the call changed
# nothing (its transaction rolled back, or never began), "unknown" when it may have committed.
COMMITTED = "committed"


class RetryableConflict(Exception):
    """A serialization failure, deadlock or busy SQLite file: retry the transaction."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _sqlstate(exc: sa_exc.DBAPIError) -> str | None:
    return getattr(exc.orig, "pgcode", None)


def unique_fields(exc: sa_exc.IntegrityError) -> list[str]:
    """The columns of the unique index a violation names (empty when it names none)."""
    message = str(exc.orig)
    match = _SQLITE_UNIQUE.search(message)
    if match:
        return [part.strip().split(".")[-1] for part in match.group(1).split(",")]
    diag = getattr(exc.orig, "diag", None)
    detail = getattr(diag, "message_detail", None) or ""
    match = _PG_UNIQUE_DETAIL.search(detail)
    if match:
        return [c.strip() for c in match.group("cols").split(",")]
    return []


def database_busy() -> errors.NexusError:
    """No connection (on SQLite: the one writer) came free within DB_POOL_TIMEOUT."""
    return settled(errors.Unavailable("every database connection stayed busy; retry later", reason="DATABASE_BUSY"), maybe_committed=False)


def settled(error: errors.NexusError, maybe_committed: bool) -> errors.NexusError:
    """Say in a DEADLINE_EXCEEDED or UNAVAILABLE whether the call may have changed anything
    (ErrorInfo metadata `committed`, and the message); an error that says it already is left
    as it is, as are errors of other codes (they changed nothing).

    maybe_committed False: the transaction rolled back before its commit, or never began.
    True: the failure came while the commit was under way (the COMMIT, or the one statement
    that is its own commit), or from where the service cannot tell.
    """
    if error.code not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE) or COMMITTED in error.metadata:
        return error
    if maybe_committed:
        error.metadata[COMMITTED] = "unknown"
        error.message += "; the change may have been applied: read it back, or send the call again with the same request_id"
    else:
        error.metadata[COMMITTED] = "false"
        error.message += "; nothing was changed"
    error.args = (error.message,)
    return error


def translate(exc: Exception, resource_type: str = "") -> Exception:
    """Map a database exception to a NexusError, or to RetryableConflict when a retry may succeed."""
    if isinstance(exc, errors.NexusError):
        return exc
    if isinstance(exc, orm_exc.StaleDataError):
        return errors.Aborted(
            "the resource changed while it was being updated; read it again and retry",
            reason="CONCURRENT_MODIFICATION",
            metadata={"resource_type": resource_type} if resource_type else None,
        )
    if isinstance(exc, ValueError) and "NUL" in str(exc):
        # psycopg2 refuses NUL in text parameters before sending them (a plain ValueError).
        return errors.InvalidArgument.field("request", "text must not contain NUL characters")
    if isinstance(exc, sa_exc.TimeoutError):
        # No pooled connection came free within DB_POOL_TIMEOUT (on SQLite: the one writer).
        return database_busy()
    if not isinstance(exc, sa_exc.DBAPIError):
        return exc
    state = _sqlstate(exc)
    message = str(exc.orig)
    if isinstance(exc, sa_exc.IntegrityError):
        if state == "23505" or "UNIQUE constraint failed" in message:
            fields = unique_fields(exc)
            what = ", ".join(fields) or "a unique field"
            return errors.AlreadyExists(
                f"{resource_type or 'resource'} with the same {what} already exists",
                metadata={"resource_type": resource_type, "fields": ",".join(fields)},
                violations=[errors.FieldViolation(f, "must be unique", "DUPLICATE") for f in fields],
                resource_type=resource_type,
            )
        if state == "23503" or "FOREIGN KEY constraint failed" in message:
            return errors.FailedPrecondition(
                f"{resource_type or 'resource'} is referenced by, or references, a row that blocks this change",
                reason="FOREIGN_KEY_VIOLATION",
                metadata={"resource_type": resource_type},
            )
        if state == "23514" or "CHECK constraint failed" in message:
            return errors.InvalidArgument(
                f"{resource_type or 'resource'} violates a rule of its fields: {message.splitlines()[0]}",
                reason="CHECK_VIOLATION",
            )
        if state == "23502" or "NOT NULL constraint failed" in message:
            return errors.InvalidArgument(f"a required field is missing: {message.splitlines()[0]}", reason="REQUIRED_FIELD")
        return errors.FailedPrecondition(message.splitlines()[0], reason="INTEGRITY_VIOLATION")
    if state in RETRYABLE_SQLSTATES:
        return RetryableConflict(exc)
    if state == "57014":
        return errors.DeadlineExceeded("the statement ran past the call's deadline", reason="STATEMENT_TIMEOUT")
    if "database is locked" in message or "database is busy" in message:
        return RetryableConflict(exc)
    if exc.connection_invalidated or isinstance(exc, sa_exc.OperationalError) and state in (None, "08000", "08003", "08006", "08001", "57P01", "57P02", "57P03"):
        return errors.Unavailable("the database is unreachable; retry later", reason=UNREACHABLE, metadata={"detail": type(exc.orig).__name__})
    if isinstance(exc, sa_exc.DataError):
        return errors.InvalidArgument(f"a value is out of range for its field: {message.splitlines()[0]}", reason="VALUE_OUT_OF_RANGE")
    return exc
