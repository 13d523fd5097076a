"""The one place service errors become google.rpc.Status (AIP-193)."""
from __future__ import annotations

from typing import Any

import grpc
import math

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from db.errors import ERROR_DOMAIN, NexusError


def to_status(error: NexusError, request_id: str = "") -> grpc.Status:
    """google.rpc.Status with exactly one ErrorInfo, plus BadRequest / ResourceInfo when they apply."""
    metadata = dict(error.metadata)
    if request_id:
        metadata["request_id"] = request_id
    details: list[Any] = [error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=metadata)]
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
    retry_delay = getattr(error, "retry_delay", None)
    if retry_delay is not None:  # when to try again (google.rpc.RetryInfo), e.g. after a rate limit
        details.append(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=max(1, math.ceil(retry_delay)))))
    details.extend(getattr(error, "extra_details", ()))  # e.g. QuotaFailure
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = status_pb2.Status(code=error.code.value[0], message=error.message, details=packed)
    return rpc_status.to_status(status)


def internal_status(message: str, request_id: str = "") -> grpc.Status:
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=ERROR_DOMAIN, metadata={"request_id": request_id} if request_id else {}))
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.INTERNAL, message=message, details=[info]))
