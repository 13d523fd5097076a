"""The one place service errors become google.rpc.Status (AIP-193)."""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from db.errors import ERROR_DOMAIN, NexusError

log = logging.getLogger(__name__)


def to_status(error: NexusError) -> grpc.Status:
    """google.rpc.Status with exactly one ErrorInfo, plus BadRequest / ResourceInfo when they apply."""
    details: list[Any] = [
        error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    ]
    if error.violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description, reason=v.reason)
                    for v in error.violations
                ]
            )
        )
    if error.resource_type:
        details.append(
            error_details_pb2.ResourceInfo(
                resource_type=error.resource_type,
                resource_name=error.resource_name,
                description=error.message,
            )
        )
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=packed)
    return rpc_status.to_status(status)


def internal_status(message: str) -> grpc.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN))
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.INTERNAL, message=message, details=[info]))


Behavior = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


def _guard_unary(behavior: Behavior, method: str) -> Behavior:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except NexusError as exc:
            await context.abort_with_status(to_status(exc))
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:  # noqa: BLE001 - the last line of defence: a bug, reported as INTERNAL
            log.exception("unhandled error in %s", method)
            await context.abort_with_status(internal_status(f"internal error in {method}; it has been logged"))

    return guarded


def _guard_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            async for item in behavior(request, context):
                yield item
        except NexusError as exc:
            await context.abort_with_status(to_status(exc))
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception:  # noqa: BLE001
            log.exception("unhandled error in %s", method)
            await context.abort_with_status(internal_status(f"internal error in {method}; it has been logged"))

    return guarded


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns NexusError (and any bug) into a rich google.rpc.Status; wraps each method once."""

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith("/nexus."):
            # Health and reflection report their own errors; only our services are wrapped.
            return handler
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        elif handler.unary_stream is not None:
            wrapped = grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        elif handler.stream_unary is not None:
            wrapped = grpc.stream_unary_rpc_method_handler(
                _guard_unary(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        else:
            wrapped = grpc.stream_stream_rpc_method_handler(
                _guard_stream(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        self._wrapped[method] = wrapped
        return wrapped
