"""The guard every domain RPC passes: request id, authentication, the role gate (the caller's
level, and the permissions of its assigned roles), and the translation of errors into
google.rpc.Status; each outcome goes to service/telemetry.py (the access line, the call's
span). Health and reflection pass untouched."""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from typing import Any

import grpc

from db import errors
from db.engine.call import CURRENT_CALL, Call
from db.translate import settled
from service import metrics
from service.auth import INSECURE_PRINCIPAL, Authenticator, Principal
from service.errors import internal_status, to_status
from service.policy import Action, authorize, permission_for
from service.telemetry import CallRecord, CallTelemetry, principal_of

log = logging.getLogger("nexus.rpc")
MAX_REQUEST_ID = 128
REQUEST_ID = re.compile(rf"[A-Za-z0-9._:-]{{1,{MAX_REQUEST_ID}}}")
Behavior = Callable[[Any, grpc.aio.ServicerContext], Any]


def _request_id(metadata: dict[str, str]) -> str | None:
    """The caller's x-request-id, checked before it is written anywhere (logs, audit entries,
    error details): a bad one is INVALID_ARGUMENT. None: the Call makes one when it is needed."""
    given = metadata.get("x-request-id")
    if not given:
        return None
    if REQUEST_ID.fullmatch(given) is None:
        raise errors.InvalidArgument.field(
            "x-request-id", f"must be 1 to {MAX_REQUEST_ID} letters, digits, '.', '_', ':' or '-' (a UUID is best)", reason="INVALID_REQUEST_ID",
        )
    return given


class Gate:
    """Whether the server still takes calls, and how many of its domain calls are under way.

    On shutdown (service/server.py App.stop) the gate closes: from then on a new call is refused
    with UNAVAILABLE, the code clients retry, instead of being accepted only to be cut when the
    server stops; the server stops once the calls under way have ended (wait_idle)."""

    def __init__(self) -> None:
        self.closed = False
        self.calls = 0
        self._idle: asyncio.Event | None = None

    def close(self) -> None:
        self.closed = True

    def entered(self, context: grpc.aio.ServicerContext) -> None:
        """A call under way until grpc has sent its answer (not merely until its handler
        returned: a large response is still being written then)."""
        self.calls += 1
        # types-grpcio declares the callback's type (_DoneCallback) as a class, not a Protocol
        # or a Callable, so that no function is one.
        context.add_done_callback(self._left)  # type: ignore[arg-type]

    def _left(self, _: Any) -> None:
        self.calls -= 1
        if self._idle is not None and not self.calls:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109 - the answer is whether the calls ended in time, not an exception
        """Wait until no call is under way, at most timeout seconds; whether none is."""
        if self.calls:
            self._idle = asyncio.Event()
            try:
                await asyncio.wait_for(self._idle.wait(), timeout)
            except TimeoutError:
                return False
        return True


def refused() -> grpc.Status:
    return to_status(settled(errors.Unavailable("the server is shutting down; retry the call", reason="SERVER_SHUTTING_DOWN"), maybe_committed=False))


class CallGuard:
    """Runs one method's behavior inside the checks; one instance per method, built once."""

    def __init__(
        self, method: str, action: Action, authenticator: Authenticator | None, dialect: str, gate: Gate, telemetry: CallTelemetry,
        grpc_type: str = metrics.UNARY,
    ) -> None:
        self.method = method
        self.action = action
        self.permission = permission_for(method)
        self.authenticator = authenticator
        self.dialect = dialect
        self.gate = gate
        self.telemetry = telemetry
        self.watch = metrics.watch(method, grpc_type)

    async def enter(self, context: grpc.aio.ServicerContext, record: CallRecord) -> tuple[Call, Any]:
        metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        request_id = _request_id(metadata)
        call = record.call = Call(request_id=request_id, method=self.method, dialect=self.dialect)
        token = CURRENT_CALL.set(call)
        principal: Principal = (
            INSECURE_PRINCIPAL if self.authenticator is None else await self.authenticator.authenticate(metadata.get("authorization"), context.peer)
        )
        record.principal = principal_of(principal.actor_type, principal.actor_id)  # who, never a secret
        authorize(principal.role, self.action, self.method, self.permission, principal.held, principal.scopes)
        call.actor_type, call.actor_id, call.role, call.actor_user_id = (
            principal.actor_type, principal.actor_id, principal.role, principal.user_id,
        )
        return call, token

    async def fail(self, context: grpc.aio.ServicerContext, exc: BaseException, record: CallRecord) -> None:
        call = CURRENT_CALL.get(None)
        request_id = call.request_id if call else ""
        if isinstance(exc, errors.NexusError):
            # A DEADLINE_EXCEEDED or UNAVAILABLE that does not say whether the call changed
            # anything (db/database.py says so when it knows) says it may have.
            settled(exc, maybe_committed=True)
            self.telemetry.end(record, exc.code, exc.reason)  # the access line (NEXUS_ACCESS_LOG), the span
            await context.abort_with_status(to_status(exc, request_id))
        log.exception("unhandled error in %s [request %s]", self.method, request_id)
        self.telemetry.end(record, grpc.StatusCode.INTERNAL, "INTERNAL")
        await context.abort_with_status(internal_status(f"internal error in {self.method} (request {request_id}); it has been logged", request_id))

    def unary(self, behavior: Behavior) -> Behavior:
        gate, telemetry, watch = self.gate, self.telemetry, self.watch

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            record = telemetry.begin(self.method, context)
            began = watch.started()
            token = None
            try:
                if gate.closed:
                    telemetry.end(record, grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN")
                    await context.abort_with_status(refused())
                gate.entered(context)
                _, token = await self.enter(context, record)
                response = await behavior(request, context)
                telemetry.end(record, grpc.StatusCode.OK)
                return response
            except (grpc.aio.AbortError, asyncio.CancelledError):
                telemetry.end(record, record.interrupted())  # (nothing after an abort of fail: its outcome is recorded)
                raise
            except Exception as exc:  # noqa: BLE001 - NexusError or a bug: both become a Status
                await self.fail(context, exc, record)
            finally:
                if token is not None:
                    CURRENT_CALL.reset(token)
                watch.handled(context, began)

        return guarded

    def stream(self, behavior: Behavior) -> Behavior:
        gate, telemetry, watch = self.gate, self.telemetry, self.watch

        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            record = telemetry.begin(self.method, context)
            began = watch.started()
            token = None
            try:
                if gate.closed:
                    telemetry.end(record, grpc.StatusCode.UNAVAILABLE, "SERVER_SHUTTING_DOWN")
                    await context.abort_with_status(refused())
                gate.entered(context)
                _, token = await self.enter(context, record)
                async for item in behavior(request, context):
                    yield item
                telemetry.end(record, grpc.StatusCode.OK)
            except (grpc.aio.AbortError, asyncio.CancelledError, GeneratorExit):
                telemetry.end(record, record.interrupted())  # (nothing after an abort of fail: its outcome is recorded)
                raise
            except Exception as exc:  # noqa: BLE001
                await self.fail(context, exc, record)
            finally:
                # A stream the client ended while it waited to write is closed later by the
                # event loop's generator finalizer, in another context: nothing to restore there
                # (each RPC runs in a task, and a context, of its own).
                if token is not None:
                    with contextlib.suppress(ValueError):
                        CURRENT_CALL.reset(token)
                watch.handled(context, began)

        return guarded


def _bytes_or(serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    if serialize is None:  # grpc sends what the handler yields as it is: bytes already
        return None

    def serializer(message: Any) -> bytes:
        return message if type(message) is bytes else serialize(message)

    return serializer


def _aio(behavior: Callable[..., Any]) -> Behavior:
    """A method handler's behaviour as grpc.aio calls it. types-grpcio types RpcMethodHandler's
    behaviours for the sync server (a grpc.ServicerContext, iterators); grpc.aio serves the same
    class with coroutines and async generators that take a grpc.aio.ServicerContext."""
    return behavior


class GuardedRegistration:
    """Stands in for the server while a domain servicer registers (`add_*Servicer_to_server`).

    Each method handler is wrapped once with its CallGuard before it reaches the server, so the
    checks cost one coroutine per call and no grpc.aio interceptor runs at all (an interceptor
    is awaited on every call, before the handler is even looked up). Health and reflection are
    registered on the server directly and pass untouched.
    """

    def __init__(
        self, server: grpc.aio.Server, actions: dict[str, Action], authenticator: Authenticator | None, dialect: str,
        telemetry: CallTelemetry | None = None,
    ) -> None:
        self.server = server
        self.actions = actions
        self.authenticator = authenticator
        self.dialect = dialect
        self.telemetry = telemetry or CallTelemetry()
        self.gate = Gate()
        self.registered: list[str] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """The generated code passes the unwrapped handlers here first: they are replaced by
        the wrapped ones in add_registered_method_handlers, which it calls next."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        wrapped = {name: self._wrap(f"/{service}/{name}", handler) for name, handler in handlers.items()}
        # Served through the generic handler only. grpc.aio keeps one pending request-call future
        # per *registered* method and waits on all of them (asyncio.wait) for every incoming
        # call, so each call cost O(registered methods): with our 80 methods that wait was the
        # largest Python cost of a Get on the event loop. A generic handler is one future for all
        # methods, then a dict lookup per service.
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        self.registered.append(service)

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method not in self.actions:
            raise TypeError(f"{method} has no access rule in service/policy.py")
        guard = CallGuard(method, self.actions[method], self.authenticator, self.dialect, self.gate, self.telemetry, metrics.grpc_type_of(handler))
        kwargs = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
        if handler.unary_unary is not None:
            kwargs = guard.watch.counting(**kwargs)
            return grpc.unary_unary_rpc_method_handler(guard.unary(_aio(handler.unary_unary)), **kwargs)
        if handler.unary_stream is not None:
            # A stream may yield messages serialized already (service/streams.py, Offered).
            kwargs["response_serializer"] = _bytes_or(handler.response_serializer)
            kwargs = guard.watch.counting(**kwargs)
            return grpc.unary_stream_rpc_method_handler(guard.stream(_aio(handler.unary_stream)), **kwargs)
        kwargs = guard.watch.counting(**kwargs)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(guard.unary(_aio(handler.stream_unary)), **kwargs)
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(guard.stream(_aio(handler.stream_stream)), **kwargs)
        raise TypeError(f"{method}: the method handler has no behaviour")
