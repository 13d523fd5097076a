"""Every method of every service, found through reflection, refuses callers without the right to it.

Nothing here names a method: a service or resource added later is covered with no change.
"""
from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from nexus.identity.v1 import identity_pb2 as ipb
from sqlalchemy import update

from db.database import Database
from db.domains.identity import ApiKey
from service import policy
from service.server import DOMAIN_SERVICES
from tests.conftest import Client, unique
from tests.support import rich_error

Code = grpc.StatusCode
FREE = {"grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}


def discovered_methods(address: str) -> list[tuple[str, Any]]:
    """("/pkg.Service/Method", method descriptor) for every method reflection lists."""
    channel = grpc.insecure_channel(address)
    try:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)
        out = []
        for service_name in database.get_services():
            if service_name in FREE:
                continue
            service = pool.FindServiceByName(service_name)
            out += [(f"/{service.full_name}/{m.name}", m) for m in service.methods]
        return out
    finally:
        channel.close()


def call_empty(channel: grpc.Channel, path: str, method: Any, metadata: list[tuple[str, str]]) -> tuple[Code, str]:
    """Call with an empty request: the status code it ends with (OK when it succeeds) and its
    ErrorInfo reason (a failure always carries a well-formed google.rpc.Status)."""
    try:
        if method.server_streaming:
            stream = channel.unary_stream(path)(b"", metadata=metadata, timeout=10)
            next(iter(stream), None)
            stream.cancel()
        elif method.client_streaming:
            stream_call = channel.stream_unary(path) if not method.server_streaming else channel.stream_stream(path)
            stream_call(iter([b""]), metadata=metadata, timeout=10)
        else:
            channel.unary_unary(path)(b"", metadata=metadata, timeout=10)
    except grpc.RpcError as exc:
        return exc.code(), rich_error(exc).info.reason
    return Code.OK, ""


def call_raw(channel: grpc.Channel, path: str, method: Any, metadata: list[tuple[str, str]]) -> Code:
    """call_empty's code; a refusal of access always says why."""
    code, reason = call_empty(channel, path, method, metadata)
    if code in (Code.UNAUTHENTICATED, Code.PERMISSION_DENIED):
        assert reason
    return code


@pytest.fixture
def methods(client: Client) -> list[tuple[str, Any]]:
    found = discovered_methods(client.address)
    served = {f"/{full}/{m.name}" for cls, _, full in DOMAIN_SERVICES for m in cls.service_descriptor.methods}
    assert {path for path, _ in found} == served, "reflection lists every served method"
    return found


@pytest.fixture
def keys(client: Client) -> Iterator[dict[str, str]]:
    """Secrets of a guest key, an expired key and a revoked key."""
    made = {}
    for label in ("guest", "expired", "revoked"):
        key = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique(label), role=ipb.USER_ROLE_GUEST)))
        made[label] = key
    database = Database(client.database_url)
    try:
        past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        database.run_sync(lambda s: s.execute(update(ApiKey).where(ApiKey.id == uuid.UUID(made["expired"].id)).values(expire_time=past)))
    finally:
        database.dispose()
    client.identity.RevokeApiKey(ipb.RevokeApiKeyRequest(id=made["revoked"].id))
    yield {label: key.secret for label, key in made.items()}


def test_every_method_refuses_missing_bad_expired_and_revoked_credentials(client: Client, methods: list[tuple[str, Any]], keys: dict[str, str]) -> None:
    channel = grpc.insecure_channel(client.address)
    try:
        cases = {
            "none": [],
            "garbage": [("authorization", "Bearer not-a-key")],
            "wrong secret": [("authorization", f"Bearer {keys['guest'].split('.')[0]}.wrong")],
            "not bearer": [("authorization", f"Basic {keys['guest']}")],
            "expired": [("authorization", f"Bearer {keys['expired']}")],
            "revoked": [("authorization", f"Bearer {keys['revoked']}")],
        }
        for label, metadata in cases.items():
            for path, method in methods:
                assert call_raw(channel, path, method, metadata) == Code.UNAUTHENTICATED, (label, path)
    finally:
        channel.close()


def test_a_guest_may_call_reads_only(client: Client, methods: list[tuple[str, Any]], keys: dict[str, str]) -> None:
    channel = grpc.insecure_channel(client.address)
    guest = [("authorization", f"Bearer {keys['guest']}")]
    writes = reads = 0
    try:
        for path, method in methods:
            code = call_raw(channel, path, method, guest)
            if policy.action_for(path) is policy.Action.READ:
                reads += 1
                assert code not in (Code.UNAUTHENTICATED, Code.PERMISSION_DENIED, Code.INTERNAL, Code.UNKNOWN), (path, code)
            else:
                writes += 1
                assert code == Code.PERMISSION_DENIED, (path, code)
    finally:
        channel.close()
    assert reads and writes
    assert reads + writes == len(methods)


def test_every_served_method_has_an_access_rule(methods: list[tuple[str, Any]]) -> None:
    table = policy.check_all_covered(path for path, _ in methods)
    assert set(table) == {path for path, _ in methods}
    with pytest.raises(KeyError):
        policy.action_for("/nexus.work.v1.WorkService/FrobnicateTask")


def test_health_and_reflection_need_no_credentials(client: Client) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = grpc.insecure_channel(client.address)
    try:
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="readiness")).status == health_pb2.HealthCheckResponse.SERVING
        assert discovered_methods(client.address)
    finally:
        channel.close()


def test_the_request_id_reaches_the_log(client: Client, caplog: pytest.LogCaptureFixture) -> None:
    request_id = f"req-{unique()}"
    caplog.set_level("INFO", logger="nexus.rpc")
    with pytest.raises(grpc.RpcError) as caught:
        client.identity.GetUser(ipb.GetUserRequest(id="not-a-uuid"), metadata=[("x-request-id", request_id)])
    assert rich_error(caught.value).info.metadata["request_id"] == request_id
    assert any(request_id in record.getMessage() for record in caplog.records)
