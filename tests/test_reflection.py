"""Server reflection through raw stubs of both versions of the protocol, v1 and v1alpha, on both
databases: the services listed, files found by name and by symbol (methods included) with every
file they import, and the protos' comments (source_code_info) in the files served."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

from service import reflection
from service.server import DOMAIN_SERVICES
from tests.conftest import Client

VERSIONS = {
    "v1": (reflection.V1, reflection.V1_REQUEST, reflection.V1_RESPONSE),
    "v1alpha": (reflection.V1ALPHA, v1alpha_pb2.ServerReflectionRequest, v1alpha_pb2.ServerReflectionResponse),
}
WORK_FILE = "nexus/work/v1/work.proto"


@pytest.fixture(params=sorted(VERSIONS))
def ask(request: pytest.FixtureRequest, client: Client) -> Iterator[Any]:
    """ask(**request fields) -> the response, over a raw ServerReflectionInfo stream of the
    version, on a channel without credentials (reflection needs none)."""
    service, request_class, response_class = VERSIONS[request.param]
    channel = grpc.insecure_channel(client.address)
    stub = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )

    def call(**fields: Any) -> Any:
        sent = request_class(**fields)
        (response,) = list(stub(iter([sent]), timeout=30))
        assert type(response) is response_class
        assert response.original_request == sent
        return response

    yield call
    channel.close()


def files_of(response: Any) -> list[descriptor_pb2.FileDescriptorProto]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    return [descriptor_pb2.FileDescriptorProto.FromString(b) for b in response.file_descriptor_response.file_descriptor_proto]


def comments(proto: descriptor_pb2.FileDescriptorProto) -> str:
    return "\n".join(loc.leading_comments for loc in proto.source_code_info.location)


def test_list_services(ask: Any) -> None:
    listed = [s.name for s in ask(list_services="").list_services_response.service]
    expected = {full for _, _, full in DOMAIN_SERVICES} | {"grpc.health.v1.Health", reflection.V1, reflection.V1ALPHA}
    assert sorted(listed) == sorted(expected)


@pytest.mark.parametrize(
    "symbol",
    ["nexus.work.v1.WorkService.CreateTask", "nexus.work.v1.WorkService", "nexus.work.v1.Task", "nexus.work.v1.TaskStatus"],
)
def test_file_containing_a_symbol_carries_its_comments(ask: Any, symbol: str) -> None:
    files = files_of(ask(file_containing_symbol=symbol))
    assert files[0].name == WORK_FILE
    assert " Creates a Task.\n" in comments(files[0])
    assert " A unit of work inside a project.\n" in comments(files[0])
    # Each file it imports, directly or not, once.
    names = [f.name for f in files]
    assert len(names) == len(set(names))
    assert {"nexus/common/v1/common.proto", "google/protobuf/timestamp.proto", "google/protobuf/field_mask.proto"} <= set(names)
    for f in files:
        assert set(f.dependency) <= set(names)


def test_file_by_filename(ask: Any) -> None:
    (common,) = files_of(ask(file_by_filename="nexus/common/v1/common.proto"))
    assert common.package == "nexus.common.v1" and comments(common)


@pytest.mark.parametrize("name", ["grpc/reflection/v1/reflection.proto", "grpc_reflection/v1alpha/reflection.proto"])
def test_the_reflection_protos_are_served(ask: Any, name: str) -> None:
    (served,) = files_of(ask(file_by_filename=name))
    assert [s.name for s in served.service] == ["ServerReflection"]
    (method,) = served.service[0].method
    assert method.input_type == f".{served.package}.ServerReflectionRequest"
    assert method.client_streaming and method.server_streaming


def test_the_comments_are_of_the_protos_compiled() -> None:
    """The descriptor set (comments) and the generated modules (the pool) describe the same
    protos: but for the comments and the json_name protoc adds, every file is the same, so each
    comment's path into its file names the element it was written for."""
    pool = descriptor_pool.Default()
    described = reflection.load_descriptor_set()
    assert {pool.FindServiceByName(full).file.name for _, _, full in DOMAIN_SERVICES} <= {f.name for f in described.file}
    for proto in described.file:
        compiled = descriptor_pb2.FileDescriptorProto()
        pool.FindFileByName(proto.name).CopyToProto(compiled)
        assert proto.source_code_info.location, proto.name
        for one in (proto, compiled):
            one.ClearField("source_code_info")
            for message in _messages(one.message_type):
                for field in message.field:
                    field.ClearField("json_name")
        assert proto == compiled, proto.name


def _messages(messages: Any) -> Iterator[Any]:
    for message in messages:
        yield message
        yield from _messages(message.nested_type)


def test_the_files_served_are_the_ones_compiled(ask: Any) -> None:
    """What reflection serves is the pool's file with comments added, nothing else changed."""
    pool = descriptor_pool.Default()
    for name in [pool.FindServiceByName(full).file.name for _, _, full in DOMAIN_SERVICES]:
        for served in files_of(ask(file_by_filename=name)):
            compiled = descriptor_pb2.FileDescriptorProto()
            pool.FindFileByName(served.name).CopyToProto(compiled)
            served.ClearField("source_code_info")
            assert served == compiled, served.name


@pytest.mark.parametrize(
    "fields",
    [
        {"file_containing_symbol": "nexus.work.v1.NoSuchThing"},
        {"file_containing_symbol": "nexus.work.v1.WorkService.NoSuchMethod"},
        {"file_by_filename": "nexus/nope.proto"},
    ],
    ids=["symbol", "method", "file"],
)
def test_unknown_names_are_not_found(ask: Any, fields: dict[str, str]) -> None:
    response = ask(**fields)
    assert response.WhichOneof("message_response") == "error_response"
    assert response.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_a_request_without_a_question_is_invalid(ask: Any) -> None:
    response = ask(host="localhost")
    assert response.error_response.error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
