"""The call a unit of work serves: who calls, with which role, through which RPC.

Set per RPC by the service's call guard (CURRENT_CALL); the database threads see it, because
Database.run copies the context into the thread.
"""
from __future__ import annotations

import uuid
from contextvars import ContextVar

from db.base import uuid4


class Call:
    """What the service knows about the RPC a unit of work serves: who calls, and which RPC.

    request_id None: one is made when first read (an audit entry, an error's details, a log
    line); most reads that succeed never need it, and making one costs the event loop more than
    the rest of the call's checks. "" means none (work outside an RPC)."""

    __slots__ = ("_request_id", "method", "dialect", "actor_type", "actor_id", "role", "actor_user_id")

    def __init__(
        self,
        request_id: str | None = "",
        method: str = "",
        dialect: str = "sqlite",
        actor_type: str = "system",  # "user" (JWT), "api_key", or "system" (the service itself, --insecure-dev)
        actor_id: uuid.UUID | None = None,
        role: str = "admin",
        actor_user_id: uuid.UUID | None = None,  # the user the caller acts for, if any
    ) -> None:
        self._request_id = request_id
        self.method = method
        self.dialect = dialect
        self.actor_type = actor_type
        self.actor_id = actor_id
        self.role = role
        self.actor_user_id = actor_user_id

    @property
    def request_id(self) -> str:
        request_id = self._request_id
        if request_id is None:
            request_id = self._request_id = str(uuid4())
        return request_id

    def __repr__(self) -> str:
        return f"Call(method={self.method!r}, actor={self.actor_type}:{self.actor_id}, role={self.role!r})"


# Set per RPC by the call guard (service/interceptors.py); database threads see it (Database.run copies it).
CURRENT_CALL: ContextVar[Call] = ContextVar("nexus_call")


def current_call() -> Call | None:
    return CURRENT_CALL.get(None)


def request_principal(call: Call) -> str:
    """Whose request ids these are: a request id is remembered per caller (the API key, the JWT's
    user, or the service itself), so another caller sending the same id makes a new request."""
    return f"{call.actor_type}:{call.actor_id or ''}"
