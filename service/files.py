"""nexus.files.v1.FileService: files' metadata through the engine, their bytes in the blob store.

An upload's bytes go to a temporary file of the blob store as they arrive (hashed on the way,
never held whole in memory), are checked against what the metadata declared, made durable and
renamed into place; only then is the File row written. Anything refused on the way leaves
nothing: no temporary file, no blob, no row."""
from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, BinaryIO

import grpc
from nexus.files.v1 import files_pb2 as pb
from nexus.files.v1 import files_pb2_grpc

from db import errors
from db.blobs import BlobWriter
from db.domains import files
from db.engine.call import Call, request_principal
from db.translate import COMMITTED
from db.unit import SESSION_READ
from service.rpc import DomainServicer

# The bytes of one DownloadFile message.
CHUNK_BYTES = 64 * 1024
# The bytes read from a blob, or written to it, per trip to a thread.
READ_BYTES = WRITE_BYTES = 1024 * 1024
# Blocks of an upload received and waiting for each of its two threads: with the one in each
# thread's hands, at most four MiB of an upload are held, whatever its size (the rest of what it
# holds is gRPC's HTTP/2 window).
WRITE_QUEUE = 2


def store_failure(exc: OSError) -> errors.NexusError:
    """What a client is told of a blob store that failed: RESOURCE_EXHAUSTED when it is full
    (or over quota), UNAVAILABLE otherwise (an I/O error); either way nothing was kept."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return errors.ResourceExhausted("the blob store is full: nothing was kept", reason="BLOB_STORE_FULL")
    return errors.Unavailable(
        f"the blob store failed ({exc.strerror or type(exc).__name__}): nothing was kept", reason="BLOB_STORE_FAILED",
        metadata={COMMITTED: "false"},
    )


def _read_messages(blob: BinaryIO, offset: int, size: int) -> tuple[list[bytes], int]:
    """Up to size bytes of blob from offset (where it stands), as serialized DownloadFileResponse
    messages of CHUNK_BYTES: (the messages, the bytes read)."""
    messages, read = [], 0
    while read < size:
        chunk = blob.read(min(CHUNK_BYTES, size - read))
        if not chunk:
            break
        messages.append(pb.DownloadFileResponse(chunk=chunk, offset=offset + read).SerializeToString())
        read += len(chunk)
    return messages, read


class _Handoff:
    """Blocks handed from the event loop to a thread of their own, where consume(handoff) takes
    them (get) until None: at most `depth` are queued or in its hands, and put waits for room on
    the loop, holding no thread (a thread per waiting upload could take every thread of the
    loop's pool, and the consumers would wait for blocks that never come)."""

    def __init__(self, consume: Callable[[_Handoff], None], depth: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()
        self._room = asyncio.Semaphore(depth)
        self._holds = False
        self.done: asyncio.Future[None] = self._loop.create_future()
        threading.Thread(target=self._run, args=(consume,), name="nexus-upload", daemon=True).start()

    def _run(self, consume: Callable[[_Handoff], None]) -> None:
        failure: BaseException | None = None
        try:
            consume(self)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop
            failure = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._settle, failure)

    def _settle(self, failure: BaseException | None) -> None:
        if self.done.done():
            return
        if failure is None:
            self.done.set_result(None)
        else:
            self.done.set_exception(failure)

    def get(self) -> list[bytes] | None:
        """In the thread: the next block, once the one before is done with (its room freed)."""
        if self._holds:
            self._loop.call_soon_threadsafe(self._room.release)
        self._holds = True
        return self._queue.get()

    async def put(self, block: list[bytes]) -> None:
        await self._room.acquire()
        self._queue.put(block)

    def close(self) -> None:
        """No more blocks: the thread ends once it has taken them all (done)."""
        self._queue.put(None)


class FileService(DomainServicer, files_pb2_grpc.FileServiceServicer):
    resources = (files.FILES,)
    service_descriptor = pb.DESCRIPTOR.services_by_name["FileService"]

    def __init__(self, run: Any, hub: Any = None) -> None:
        super().__init__(run, hub)
        self._uploads: collections.Counter[str] = collections.Counter()  # open uploads by caller

    async def UploadFile(self, request_iterator: AsyncIterator[pb.UploadFileRequest], context: grpc.aio.ServicerContext) -> Any:
        call = self.run.call(context)
        with self._open_upload(request_principal(call)):
            try:
                async with asyncio.timeout(self.run.uploads.idle_seconds) as idle:
                    return await self._upload(aiter(request_iterator), context, call, idle)
            except TimeoutError:  # the idle timeout (not an OSError of the store: _upload maps those)
                raise errors.DeadlineExceeded(
                    f"the upload sent nothing for {self.run.uploads.idle_seconds:g} s: nothing was kept", reason="UPLOAD_IDLE",
                    metadata={"idle_seconds": f"{self.run.uploads.idle_seconds:g}", COMMITTED: "false"},
                ) from None

    @contextlib.contextmanager
    def _open_upload(self, caller: str) -> Iterator[None]:
        """One more upload of caller's open; RESOURCE_EXHAUSTED past uploads.per_caller."""
        limit = self.run.uploads.per_caller
        if self._uploads[caller] >= limit:
            raise errors.ResourceExhausted(
                f"the caller has {limit} uploads open already: finish one first", reason="TOO_MANY_UPLOADS",
                metadata={"max_uploads": str(limit)},
            )
        self._uploads[caller] += 1
        try:
            yield
        finally:
            self._uploads[caller] -= 1
            if not self._uploads[caller]:
                del self._uploads[caller]

    async def _upload(self, messages: AsyncIterator[pb.UploadFileRequest], context: grpc.aio.ServicerContext, call: Call, idle: asyncio.Timeout) -> Any:
        """The upload within its idle timeout (idle: put off at each message it receives)."""
        try:
            first = await anext(messages, None)
            if first is None or first.WhichOneof("part") != "metadata":
                raise errors.InvalidArgument.field("metadata", "the first message of an upload carries the file's metadata", reason="REQUIRED_FIELD")
            metadata = first.metadata
            files.check_metadata(metadata)
            if metadata.size_bytes > self.run.uploads.max_file_bytes:
                raise self._too_large()
            if metadata.request_id:
                earlier = await self.run(context, lambda s: files.earlier_upload(s, metadata, call), SESSION_READ, resource_type="File")
                if earlier is not None:  # a replay: its bytes are stored already
                    return earlier
            writer = await asyncio.to_thread(self.run.blobs.begin)
            try:
                await self._receive(messages, writer, idle)
                idle.reschedule(None)  # all received: what is left is the server's
                stored = await asyncio.to_thread(writer.finish)
                files.check_stored(metadata, stored)
                held = await asyncio.to_thread(self._keep, writer, stored.sha256)
            finally:
                await asyncio.to_thread(writer.discard)
        except OSError as exc:  # the blob store's disk: full, or failing
            raise store_failure(exc) from None
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

    def _too_large(self) -> errors.ResourceExhausted:
        limit = self.run.uploads.max_file_bytes
        return errors.ResourceExhausted(
            f"the file passes the maximum file size ({limit} bytes): nothing was kept",
            reason="FILE_TOO_LARGE", metadata={"max_bytes": str(limit)},
        )

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

    async def _receive(self, messages: AsyncIterator[pb.UploadFileRequest], writer: BlobWriter, idle: asyncio.Timeout) -> None:
        """The upload's chunks written to writer; a second metadata message or bytes past the
        maximum file size refused (counted as they arrive: refused at once).

        Pipelined: the chunks go, in blocks of WRITE_BYTES, to a thread that hashes them and one
        that writes them, while the next ones are received (BlobWriter.hash_from, write_from);
        at most WRITE_QUEUE blocks wait for each, so the loop waits only when they are all taken."""
        limit = self.run.uploads.max_file_bytes
        # Each block goes to a thread that hashes it and to one that writes it.
        pipes = [_Handoff(consume, WRITE_QUEUE) for consume in (writer.hash_from, writer.write_from)]

        async def put(item: list[bytes]) -> None:
            for pipe in pipes:
                await pipe.put(item)

        received, block, block_bytes = 0, [], 0
        try:
            async for message in messages:
                if message.WhichOneof("part") == "metadata":
                    raise errors.InvalidArgument.field("metadata", "only the first message of an upload carries metadata", reason="DUPLICATE_METADATA")
                idle.reschedule(asyncio.get_running_loop().time() + self.run.uploads.idle_seconds)
                chunk = message.chunk  # each read of the field is a copy
                received += len(chunk)
                if received > limit:
                    raise self._too_large()
                block.append(chunk)
                block_bytes += len(chunk)
                if block_bytes >= WRITE_BYTES:
                    await put(block)
                    block, block_bytes = [], 0
            if block:
                await put(block)
        finally:
            # The threads end (the last block hashed and written, or the rest of them dropped
            # after a failure) before the file is kept or discarded.
            for pipe in pipes:
                pipe.close()
            outcomes = await asyncio.gather(*(pipe.done for pipe in pipes), return_exceptions=True)
        for outcome in outcomes:  # a failure of theirs (a full disk), once every chunk is received
            if isinstance(outcome, BaseException):
                raise outcome

    # Yields messages serialized already, which the generated servicer's type leaves out: the
    # stream's serializer passes bytes through (service/interceptors.py, _bytes_or).
    async def DownloadFile(  # type: ignore[override]
        self, request: pb.DownloadFileRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadFileResponse | bytes]:
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
            # Pipelined: the next block of READ_BYTES is read, in CHUNK_BYTES messages serialized
            # there, in a thread while this one is sent (the guard sends bytes as they are).
            reading = asyncio.ensure_future(asyncio.to_thread(_read_messages, blob, offset, min(READ_BYTES, left)))
            while left > 0:
                messages, read = await reading
                if read < min(READ_BYTES, left):  # the blob ends before the file does
                    raise errors.DataLoss(
                        f"the bytes of File {request.id!r} end before its {size} bytes: the blob is damaged", reason="BLOB_TRUNCATED",
                        resource_type="File", resource_name=request.id,
                    )
                left -= read
                offset += read
                reading = asyncio.ensure_future(asyncio.to_thread(_read_messages, blob, offset, min(READ_BYTES, left)))
                for message in messages:
                    yield message
        finally:
            await asyncio.gather(reading, return_exceptions=True)  # the thread done before the file is closed
            blob.close()

    async def RecordFileDownload(self, request: pb.RecordFileDownloadRequest, context: grpc.aio.ServicerContext) -> Any:
        call = self.run.call(context)
        return await self.run(context, lambda s: files.record_file_download(s, request, call), resource_type="File")

    async def DeleteFile(self, request: pb.DeleteFileRequest, context: grpc.aio.ServicerContext) -> pb.File:
        """The standard delete; a removal for good of a blob's last row removes the blob, after
        its commit (a failed removal leaves it for the sweep)."""
        removed: pb.File = await self.standard["DeleteFile"](request, context)
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
