"""nexus.files.v1.FileService: files' metadata through the engine, their bytes in the blob store.

An upload's bytes go to a temporary file of the blob store as they arrive (hashed on the way,
never held whole in memory), are checked against what the metadata declared, made durable and
renamed into place; only then is the File row written. Anything refused on the way leaves
nothing: no temporary file, no blob, no row."""
from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from nexus.files.v1 import files_pb2 as pb
from nexus.files.v1 import files_pb2_grpc

from db import errors
from db.blobs import BlobWriter, TooLarge
from db.domains import files
from db.unit import SESSION_READ
from service.rpc import DomainServicer

# The bytes of one DownloadFile message.
CHUNK_BYTES = 64 * 1024


class FileService(DomainServicer, files_pb2_grpc.FileServiceServicer):
    resources = (files.FILES,)
    service_descriptor = pb.DESCRIPTOR.services_by_name["FileService"]

    def __init__(self, run: Any, hub: Any = None) -> None:
        super().__init__(run, hub)
        self._delete = self.DeleteFile
        self.DeleteFile = self._delete_file  # type: ignore[method-assign]

    async def UploadFile(self, request_iterator: AsyncIterator[pb.UploadFileRequest], context: grpc.aio.ServicerContext) -> Any:
        call = self.run.call(context)
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("part") != "metadata":
            raise errors.InvalidArgument.field("metadata", "the first message of an upload carries the file's metadata", reason="REQUIRED_FIELD")
        metadata = first.metadata
        files.check_metadata(metadata)
        if metadata.request_id:
            earlier = await self.run(context, lambda s: files.earlier_upload(s, metadata, call), SESSION_READ, resource_type="File")
            if earlier is not None:  # a replay: its bytes are stored already
                return earlier
        writer = await asyncio.to_thread(self.run.blobs.begin)
        try:
            await self._receive(messages, writer)
            stored = await asyncio.to_thread(writer.finish)
            files.check_stored(metadata, stored)
            held = await asyncio.to_thread(self._keep, writer, stored.sha256)
        finally:
            await asyncio.to_thread(writer.discard)
        try:
            made = await self.run(context, lambda s: files.create_file(s, metadata, stored, call), resource_type="File")
            if made.sha256 != stored.sha256:  # a concurrent upload with its request id made the File
                await self._drop_if_unreferenced(context, stored.sha256, held=True)
            return made
        except BaseException:
            await self._drop_if_unreferenced(context, stored.sha256, held=True)
            raise
        finally:
            held.close()

    def _keep(self, writer: BlobWriter, sha256: str) -> contextlib.ExitStack:
        """The blob put in place, its lock held (until the row naming it is committed: released
        by closing the stack, which never waits)."""
        held = contextlib.ExitStack()
        held.enter_context(self.run.blobs.lock(sha256))
        try:
            writer.keep()
        except BaseException:
            held.close()
            raise
        return held

    async def _receive(self, messages: AsyncIterator[pb.UploadFileRequest], writer: BlobWriter) -> None:
        """The upload's chunks written to writer; a second metadata message or bytes past the
        maximum file size refused."""
        limit = self.run.max_file_bytes
        async for message in messages:
            if message.WhichOneof("part") == "metadata":
                raise errors.InvalidArgument.field("metadata", "only the first message of an upload carries metadata", reason="DUPLICATE_METADATA")
            try:
                await asyncio.to_thread(writer.write, message.chunk, limit)
            except TooLarge:
                raise errors.ResourceExhausted(
                    f"the file passes the maximum file size ({limit} bytes): nothing was kept",
                    reason="FILE_TOO_LARGE", metadata={"max_bytes": str(limit)},
                ) from None

    async def DownloadFile(self, request: pb.DownloadFileRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DownloadFileResponse]:
        if request.offset < 0:
            raise errors.InvalidArgument.field("offset", f"{request.offset} is negative")
        if request.limit < 0:
            raise errors.InvalidArgument.field("limit", f"{request.limit} is negative")
        sha256, size = await self.run(context, lambda s: files.readable_blob(s, request.id), SESSION_READ, resource_type="File")
        if request.offset > size:
            raise errors.OutOfRange(
                f"offset {request.offset} is past the end of the file ({size} bytes)", reason="OFFSET_OUT_OF_RANGE",
                metadata={"field": "offset", "size_bytes": str(size)},
            )
        try:
            blob = await asyncio.to_thread(self.run.blobs.open, sha256, request.offset)
        except FileNotFoundError:
            raise errors.DataLoss(f"the bytes of File {request.id!r} are missing from the blob store", reason="BLOB_MISSING",
                                  resource_type="File", resource_name=request.id) from None
        left = size - request.offset if request.limit == 0 else min(request.limit, size - request.offset)
        offset = request.offset
        try:
            while left > 0:
                chunk = await asyncio.to_thread(blob.read, min(CHUNK_BYTES, left))
                if not chunk:
                    return
                yield pb.DownloadFileResponse(chunk=chunk, offset=offset)
                offset += len(chunk)
                left -= len(chunk)
        finally:
            blob.close()

    async def RecordFileDownload(self, request: pb.RecordFileDownloadRequest, context: grpc.aio.ServicerContext) -> Any:
        call = self.run.call(context)
        return await self.run(context, lambda s: files.record_file_download(s, request, call), resource_type="File")

    async def _delete_file(self, request: pb.DeleteFileRequest, context: grpc.aio.ServicerContext) -> Any:
        """The standard delete; a removal for good of a blob's last row removes the blob, after
        its commit (a failed removal leaves it for the sweep)."""
        removed = await self._delete(request, context)
        if request.force:
            await self._drop_if_unreferenced(context, removed.sha256)
        return removed

    async def _drop_if_unreferenced(self, context: grpc.aio.ServicerContext, sha256: str, held: bool = False) -> None:
        """The blob removed when no row names it, checked and removed under its lock (taken here
        unless the caller holds it), so an upload of the same bytes never loses its blob."""
        with contextlib.ExitStack() as stack:
            if not held:
                lock = self.run.blobs.lock(sha256)
                await asyncio.to_thread(lock.__enter__)
                stack.push(lock.__exit__)
            if await self.run(context, lambda s: files.blob_unreferenced(s, sha256), SESSION_READ, resource_type="File"):
                self.run.blobs.delete(sha256)  # an unlink: on the loop, so no thread is waited for under the lock
