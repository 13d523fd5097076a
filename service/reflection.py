"""Server reflection, both versions of the protocol: grpc.reflection.v1 (what current clients ask
first) and grpc.reflection.v1alpha (what older ones, grpcurl 1.8 among them, speak).

The files are the process's descriptor pool's (the generated modules'), which have no comments,
with the comments (source_code_info) of generated/nexus/descriptors.binpb (protos/generate.py)
added to the files it holds: `grpcurl describe` shows them. The set and the generated modules are
written together from the same protos, and CI checks both are fresh; a file the set does not hold
(health, reflection, google.rpc's error details) is served without comments.

grpcio-reflection ships v1alpha only. v1 is the same protocol with the same messages under the
package `grpc.reflection.v1`: its file is made from v1alpha's at import (`_v1_file`), added to the
default pool, and both versions are served by one servicer with each version's message classes.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb2

V1ALPHA = "grpc.reflection.v1alpha.ServerReflection"
V1 = "grpc.reflection.v1.ServerReflection"
SERVICE_NAMES = (V1, V1ALPHA)
V1_FILE = "grpc/reflection/v1/reflection.proto"
DESCRIPTOR_SET = "descriptors.binpb"  # in the generated `nexus` package


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """grpc/reflection/v1/reflection.proto: v1alpha's file with the v1 package and options."""
    proto = descriptor_pb2.FileDescriptorProto.FromString(v1alpha_pb2.DESCRIPTOR.serialized_pb)
    old, new = f".{v1alpha_pb2.DESCRIPTOR.package}.", ".grpc.reflection.v1."
    proto.name, proto.package = V1_FILE, "grpc.reflection.v1"
    proto.options.Clear()
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.java_multiple_files = True
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.java_outer_classname = "ServerReflectionProto"
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old):]
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    return proto


def _v1_messages(pool: Any) -> tuple[type, type]:
    """The v1 request and response classes, the v1 file added to `pool` first if it is not there."""
    try:
        pool.FindFileByName(V1_FILE)
    except KeyError:
        pool.AddSerializedFile(_v1_file().SerializeToString())
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionRequest")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("grpc.reflection.v1.ServerReflectionResponse")),
    )


V1_REQUEST, V1_RESPONSE = _v1_messages(descriptor_pool.Default())


def load_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """The protos with their comments and the files they import, as protos/generate.py wrote them."""
    data = resources.files("nexus").joinpath(DESCRIPTOR_SET).read_bytes()
    return descriptor_pb2.FileDescriptorSet.FromString(data)


class Files:
    """Serialized FileDescriptorProtos by file name, as the pool (the generated modules) has
    them, with the comments of the descriptor set where it holds the file; symbols are found
    through the pool, methods included.

    The pool's file, not the set's, is what is served: the two differ in the `json_name` protoc
    gives every field of the set, which the generated modules do not have. grpcurl prints JSON
    with it, so it would answer `currencyCode` where it answers `currency_code` today."""

    def __init__(self, pool: Any, described: descriptor_pb2.FileDescriptorSet) -> None:
        self._pool = pool
        self._comments = {f.name: f.source_code_info for f in described.file}
        self._files: dict[str, tuple[bytes, tuple[str, ...]]] = {}

    def _file(self, name: str) -> tuple[bytes, tuple[str, ...]]:
        """The file's serialized proto and its direct dependencies; KeyError if unknown."""
        if name not in self._files:
            descriptor = self._pool.FindFileByName(name)
            proto = descriptor_pb2.FileDescriptorProto()
            descriptor.CopyToProto(proto)
            if name in self._comments:
                proto.source_code_info.CopyFrom(self._comments[name])
            self._files[name] = (proto.SerializeToString(), tuple(d.name for d in descriptor.dependencies))
        return self._files[name]

    def with_dependencies(self, name: str) -> list[bytes]:
        """The file first, then every file it imports, directly or not, each once."""
        out, seen, todo = [], set(), [name]
        while todo:
            current = todo.pop(0)
            if current in seen:
                continue
            seen.add(current)
            data, dependencies = self._file(current)
            out.append(data)
            todo.extend(dependencies)
        return out

    def file_containing(self, symbol: str) -> str:
        """The name of the file defining a message, enum, service, method, field or extension.

        The upb pool knows services but not their methods' names (grpcurl's `describe
        pkg.Service.Method` asks for the method): a method is found through its service."""
        try:
            return self._pool.FindFileContainingSymbol(symbol).name
        except KeyError:
            service, _, method = symbol.rpartition(".")
            try:
                self._pool.FindServiceByName(service).methods_by_name[method]
            except KeyError:
                raise KeyError(symbol) from None
            return self._pool.FindFileContainingSymbol(service).name


class ReflectionServicer:
    """ServerReflectionInfo for one version of the protocol (its request and response classes)."""

    def __init__(self, service_names: Iterable[str], files: Files, pool: Any, response_class: type) -> None:
        self._service_names = sorted(service_names)
        self._files = files
        self._pool = pool
        self._response = response_class

    async def ServerReflectionInfo(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:  # noqa: N802
        async for request in requests:
            yield self.answer(request)

    def answer(self, request: Any) -> Any:
        response = self._response()
        response.original_request.CopyFrom(request)
        kind = request.WhichOneof("message_request")
        try:
            if kind == "file_by_filename":
                response.file_descriptor_response.file_descriptor_proto.extend(self._files.with_dependencies(request.file_by_filename))
            elif kind == "file_containing_symbol":
                name = self._files.file_containing(request.file_containing_symbol)
                response.file_descriptor_response.file_descriptor_proto.extend(self._files.with_dependencies(name))
            elif kind == "file_containing_extension":
                wanted = request.file_containing_extension
                extension = self._pool.FindExtensionByNumber(self._pool.FindMessageTypeByName(wanted.containing_type), wanted.extension_number)
                response.file_descriptor_response.file_descriptor_proto.extend(self._files.with_dependencies(extension.file.name))
            elif kind == "all_extension_numbers_of_type":
                message = self._pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                response.all_extension_numbers_response.base_type_name = message.full_name
                response.all_extension_numbers_response.extension_number.extend(
                    sorted(e.number for e in self._pool.FindAllExtensions(message))
                )
            elif kind == "list_services":
                for name in self._service_names:
                    response.list_services_response.service.add(name=name)
            else:
                return self._error(response, grpc.StatusCode.INVALID_ARGUMENT, "no message_request set")
        except KeyError as exc:
            return self._error(response, grpc.StatusCode.NOT_FOUND, f"not found: {exc.args[0] if exc.args else ''}")
        return response

    @staticmethod
    def _error(response: Any, code: grpc.StatusCode, message: str) -> Any:
        response.error_response.error_code = code.value[0]
        response.error_response.error_message = message
        return response


def enable_server_reflection(service_names: Iterable[str], server: Any, pool: Any = None) -> None:
    """Serve both versions of reflection on `server`, listing `service_names` and themselves."""
    pool = pool or descriptor_pool.Default()
    files = Files(pool, load_descriptor_set())
    names = sorted({*service_names, *SERVICE_NAMES})
    versions: list[tuple[str, Any, Any]] = [
        (V1ALPHA, v1alpha_pb2.ServerReflectionRequest, v1alpha_pb2.ServerReflectionResponse),
        (V1, V1_REQUEST, V1_RESPONSE),
    ]
    for service, request_class, response_class in versions:
        servicer = ReflectionServicer(names, files, pool, response_class)
        handler = grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),))
