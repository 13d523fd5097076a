"""Binds the generic standard methods of every declared resource onto a servicer.

A domain servicer subclasses the generated base, lists its resources, and writes only its custom
methods; `StandardMethods.bind` adds Get/List/Create/Update/Delete/Undelete/Search/Batch* for each.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from sqlalchemy.orm import Session

from db.blobs import DEFAULT_BLOB_DIR, BlobStore
from db.database import Database
from db.engine import plans, reads, writes
from db.engine.call import Call, current_call
from db.engine.paging import DEFAULT_PAGE_BYTES
from db.engine.resource import ResourceSpec
from db.unit import READ, TRANSACTION, Plan

T = TypeVar("T")
Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


@dataclass(frozen=True)
class UploadLimits:
    """FileService's uploads: the largest file, how long one may send nothing, and how many one
    caller may have open (service/config.py says why)."""

    max_file_bytes: int = 1024**3
    idle_seconds: float = 60.0
    per_caller: int = 4


class Runner:
    """Runs a unit of work for an RPC: its deadline, its call context, its database."""

    def __init__(
        self, db: Database, page_bytes: int = DEFAULT_PAGE_BYTES, blobs: BlobStore | None = None, uploads: UploadLimits | None = None,
        count_limit: int = reads.DEFAULT_COUNT_LIMIT,
    ) -> None:
        self.db = db
        self.page_bytes = page_bytes  # List and Search responses stay within it (db/engine/paging.fitting)
        self.count_limit = count_limit  # total_size is exact up to it (db/engine/reads.total_of)
        # Files' bytes (FileService) and what an upload may do.
        self.blobs = blobs if blobs is not None else BlobStore(DEFAULT_BLOB_DIR)
        self.uploads = uploads or UploadLimits()

    def call(self, context: grpc.aio.ServicerContext) -> Call:
        """The call the guard set up for this RPC (caller, request id, method)."""
        return current_call() or Call(dialect=self.db.dialect)

    async def __call__(self, context: grpc.aio.ServicerContext, work: Callable[[Session], T], plan: Plan = TRANSACTION, *, resource_type: str = "") -> T:
        """work(unit) on the database as plan says (db/unit.py), within the call's deadline."""
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        return await self.db.run(work, plan, deadline=deadline, resource_type=resource_type)


def _module_of(spec: ResourceSpec) -> Any:
    return sys.modules[spec.message.__module__]


def standard_handlers(run: Runner, spec: ResourceSpec) -> dict[str, Handler]:
    """The standard-method handlers of one resource, keyed by RPC name."""
    pb = _module_of(spec)
    E, Es, plural_field = spec.name, spec.plural, _plural_field(spec)
    name = spec.name

    async def get(request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await run(context, lambda s: reads.get(s, spec, request), READ, resource_type=name)

    async def list_(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = run.call(context)
        items, token, total = await run(context, lambda s: reads.list_page(s, spec, request, call, run.page_bytes, run.count_limit), READ, resource_type=name)
        response = getattr(pb, f"List{Es}Response")(next_page_token=token, total_size=total)
        getattr(response, plural_field).extend(items)
        return response

    async def create(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = run.call(context)
        return await run(context, lambda s: writes.create(s, spec, request, call), plans.plan_create(spec, request, call), resource_type=name)

    async def update(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = run.call(context)
        return await run(context, lambda s: writes.update(s, spec, request, call), plans.plan_update(spec, request, call), resource_type=name)

    async def delete(request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = run.call(context)
        return await run(context, lambda s: writes.delete(s, spec, request, call), resource_type=name)

    handlers: dict[str, Handler] = {f"Get{E}": get, f"List{Es}": list_}
    if not spec.read_only:
        handlers[f"Delete{E}"] = delete
        if spec.update_rpc:
            handlers[f"Update{E}"] = update
        if spec.create_rpc:
            handlers[f"Create{E}"] = create

    if spec.soft_delete and not spec.read_only:

        async def undelete(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = run.call(context)
            return await run(context, lambda s: writes.undelete(s, spec, request, call), resource_type=name)

        handlers[f"Undelete{E}"] = undelete

    if spec.searchable:
        result_type = getattr(pb, f"{E}SearchResult")

        async def search(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = run.call(context)
            hits, token, total = await run(context, lambda s: reads.search(s, spec, request, call, run.page_bytes, run.count_limit), READ, resource_type=name)
            results = [result_type(**{spec.singular_field: item, "score": score}) for item, score in hits]
            return getattr(pb, f"Search{Es}Response")(results=results, next_page_token=token, total_size=total)

        handlers[f"Search{Es}"] = search

    if spec.batch_create:

        async def batch_create(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = run.call(context)
            items = await run(context, lambda s: writes.batch_create(s, spec, request, call, run.page_bytes), resource_type=name)
            response = getattr(pb, f"BatchCreate{Es}Response")()
            getattr(response, plural_field).extend(items)
            return response

        handlers[f"BatchCreate{Es}"] = batch_create

    if spec.batch_get:

        async def batch_get(request: Any, context: grpc.aio.ServicerContext) -> Any:
            items = await run(context, lambda s: reads.batch_get(s, spec, request, run.page_bytes), READ, resource_type=name)
            response = getattr(pb, f"BatchGet{Es}Response")()
            getattr(response, plural_field).extend(items)
            return response

        handlers[f"BatchGet{Es}"] = batch_get

    return handlers


def _plural_field(spec: ResourceSpec) -> str:
    """The repeated field of List responses: the snake_case plural ("api_keys")."""
    pb = _module_of(spec)
    response = getattr(pb, f"List{spec.plural}Response")
    for fd in response.DESCRIPTOR.fields:
        if fd.is_repeated and fd.message_type is spec.message.DESCRIPTOR:
            return fd.name
    raise TypeError(f"List{spec.plural}Response has no repeated {spec.name} field")


class DomainServicer:
    """Base of every domain servicer: binds the standard methods of its resources at construction."""

    resources: tuple[ResourceSpec, ...] = ()
    service_descriptor: Any = None  # the generated ServiceDescriptor

    def __init__(self, run: Runner, hub: Any = None) -> None:
        self.run = run
        self.hub = hub  # the process's ChangeHub, for services that stream
        # The standard methods' handlers by RPC name; a servicer's own method of the same name
        # is served instead (and may call its handler here).
        self.standard: dict[str, Handler] = {}
        for spec in self.resources:
            for rpc_name, handler in standard_handlers(run, spec).items():
                self.standard[rpc_name] = handler
                if not self._defines(rpc_name):
                    setattr(self, rpc_name, handler)
        missing = self.unimplemented()
        if missing:
            raise TypeError(f"{type(self).__name__} does not implement {', '.join(missing)}")

    @classmethod
    def _defines(cls, name: str) -> bool:
        """Whether a servicer class (not the generated base, whose methods answer UNIMPLEMENTED)
        defines the method `name`."""
        return any(name in vars(klass) for klass in cls.__mro__ if issubclass(klass, DomainServicer))

    @classmethod
    def registration(cls) -> Callable[[Any, Any], None]:
        """The generated add_<Service>Servicer_to_server of the service, from the generated
        servicer base the class extends."""
        name = f"add_{cls.service_descriptor.name}Servicer_to_server"
        for base in cls.__mro__:
            register = getattr(sys.modules[base.__module__], name, None)
            if register is not None:
                return register
        raise TypeError(f"{cls.__name__} extends no generated {cls.service_descriptor.name}Servicer")

    def unimplemented(self) -> list[str]:
        """RPCs of the service that still resolve to the generated UNIMPLEMENTED stub."""
        out = []
        for method in self.service_descriptor.methods:
            impl = getattr(self, method.name, None)
            if impl is None or getattr(impl, "__qualname__", "").endswith("Servicer." + method.name):
                out.append(method.name)
        return out
