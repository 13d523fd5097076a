"""FileService: uploads and downloads through the blob store, files' row rules, and what a
refused upload leaves (nothing), on a server of its own with its own blob directory."""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from nexus.files.v1 import files_pb2 as fpb
from nexus.files.v1 import files_pb2_grpc
from nexus.identity.v1 import identity_pb2 as ipb

from db.blobs import BlobStore
from service import files as files_service
from tests.conftest import Client, ServerThread, authed_channel, blob_dir_of, connect, make_config, unique
from tests.support import expect_error, new_user

Code = grpc.StatusCode
MAX_FILE_BYTES = 3 * 1024 * 1024  # above the blocks of service/files.py
CHUNK = 64 * 1024


class Files:
    """A server with its own blob directory, an admin client and user clients of it."""

    def __init__(self, database_url: str, blob_dir: Path) -> None:
        self.blob_dir = blob_dir
        self.store = BlobStore(blob_dir)
        self.server = ServerThread(make_config(database_url, blob_dir=str(blob_dir), max_file_bytes=MAX_FILE_BYTES)).start()
        backend = "postgresql" if database_url.startswith("postgresql") else "sqlite"
        self.admin = connect(backend, database_url, self.server)
        self.clients: list[Client] = [self.admin]

    def user(self) -> tuple[ipb.User, Any]:
        """A new user and the FileService stub of a client calling as them."""
        user = new_user(self.admin)
        key = self.admin.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_USER, user_id=user.id)))
        c = connect(self.admin.backend, self.admin.database_url, self.server, secret=key.secret)
        self.clients.append(c)
        return user, c.files

    def temps(self) -> list[Path]:
        return self.store.temps()

    def close(self) -> None:
        for c in self.clients:
            c.channel.close()
        self.server.stop()


@pytest.fixture(scope="module")
def env(database_url: str) -> Iterator[Files]:
    files = Files(database_url, blob_dir_of(database_url))  # shared with the database's other servers
    yield files
    files.close()


def messages(data: bytes, name: str, chunk: int = CHUNK, **metadata: Any) -> Iterator[fpb.UploadFileRequest]:
    yield fpb.UploadFileRequest(metadata=fpb.UploadFileMetadata(name=name, **metadata))
    for start in range(0, len(data), chunk):
        yield fpb.UploadFileRequest(chunk=data[start : start + chunk])


def upload(stub: Any, data: bytes, name: str | None = None, chunk: int = CHUNK, **metadata: Any) -> fpb.File:
    return stub.UploadFile(messages(data, name or unique("f") + ".bin", chunk=chunk, **metadata))


def download(stub: Any, file_id: str, offset: int = 0, limit: int = 0) -> bytes:
    return b"".join(r.chunk for r in stub.DownloadFile(fpb.DownloadFileRequest(id=file_id, offset=offset, limit=limit)))


def named(stub: Any, name: str) -> int:
    return stub.ListFiles(fpb.ListFilesRequest(filter=f'name = "{name}"')).total_size


def test_upload_and_download_round_trip_by_sha256(env: Files) -> None:
    _, files = env.user()
    data = os.urandom(300_000)
    made = upload(files, data, mime_type="application/octet-stream", sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    assert (made.sha256, made.size_bytes) == (hashlib.sha256(data).hexdigest(), len(data))
    assert env.store.exists(made.sha256)
    back = download(files, made.id)
    assert hashlib.sha256(back).hexdigest() == made.sha256
    chunks = list(files.DownloadFile(fpb.DownloadFileRequest(id=made.id)))
    assert max(len(c.chunk) for c in chunks) == CHUNK and [c.offset for c in chunks] == list(range(0, len(data), CHUNK))


def test_a_download_resumes_from_an_offset(env: Files) -> None:
    _, files = env.user()
    data = os.urandom(200_000)
    made = upload(files, data)
    assert download(files, made.id, offset=123_457) == data[123_457:]
    assert download(files, made.id, offset=1000, limit=70_000) == data[1000:71_000]
    assert download(files, made.id, offset=len(data)) == b""
    err = expect_error(Code.OUT_OF_RANGE, download, files, made.id, offset=len(data) + 1)
    assert err.info.metadata["field"] == "offset"
    expect_error(Code.INVALID_ARGUMENT, download, files, made.id, offset=-1)


def test_transfers_across_block_and_message_edges_keep_every_byte_in_place(env: Files) -> None:
    """Uploads are written, and downloads read, in blocks (service/files.py WRITE_BYTES,
    READ_BYTES) pipelined with the stream, downloads sent in CHUNK_BYTES messages: every size and
    range across those edges gives the bytes in order, each message at its offset, as one
    read of the file would."""
    _, files = env.user()
    block, message = files_service.READ_BYTES, files_service.CHUNK_BYTES
    data = os.urandom(2 * block + message + 5)
    for size in (0, 1, message - 1, message, block - 1, block, block + 1, len(data)):
        for chunk in (1000, message, block + 3):  # uploads in messages of odd sizes too
            made = files.UploadFile(messages(data[:size], unique("edge"), chunk=chunk))
            assert (made.size_bytes, made.sha256) == (size, hashlib.sha256(data[:size]).hexdigest()), (size, chunk)
        for offset, limit in ((0, 0), (1, 0), (message - 1, 2), (block - 1, 0), (block, message + 1), (size // 2, block)):
            if offset > size:
                continue
            parts = list(files.DownloadFile(fpb.DownloadFileRequest(id=made.id, offset=offset, limit=limit)))
            expected = data[offset:size] if limit == 0 else data[offset:min(size, offset + limit)]
            assert b"".join(p.chunk for p in parts) == expected, (size, offset, limit)
            assert [p.offset for p in parts] == list(itertools.accumulate((len(p.chunk) for p in parts[:-1]), initial=offset))[: len(parts)]
            assert all(0 < len(p.chunk) <= message for p in parts)
    empty = files.UploadFile(iter([fpb.UploadFileRequest(metadata=fpb.UploadFileMetadata(name=unique("e"))), fpb.UploadFileRequest(chunk=b""),
                                   fpb.UploadFileRequest(chunk=b"ab"), fpb.UploadFileRequest(chunk=b"")]))
    assert download(files, empty.id) == b"ab"


def test_many_concurrent_transfers_all_finish_with_their_bytes(env: Files) -> None:
    """More concurrent uploads than the server's thread pool has threads (each upload's writing
    threads are its own, so none waits for another's), each downloaded while others upload."""
    callers = [env.user()[1] for _ in range(4)]  # each with as many uploads open as one may have
    blobs = [os.urandom(files_service.WRITE_BYTES * 2 + i) for i in range(16)]

    def round_trip(i: int) -> bytes:
        files = callers[i % len(callers)]
        return download(files, upload(files, blobs[i], chunk=64 * 1024).id)

    with ThreadPoolExecutor(len(blobs)) as pool:
        assert list(pool.map(round_trip, range(len(blobs)), timeout=120)) == blobs


def test_the_same_bytes_are_stored_once_and_outlive_one_of_their_files(env: Files) -> None:
    _, files = env.user()
    data = os.urandom(100_000)
    first, second = upload(files, data), upload(files, data)
    assert first.id != second.id and first.sha256 == second.sha256
    assert list(env.store.list()).count(first.sha256) == 1
    files.DeleteFile(fpb.DeleteFileRequest(id=first.id))  # soft: the blob stays
    env.admin.files.DeleteFile(fpb.DeleteFileRequest(id=first.id, force=True))
    assert env.store.exists(first.sha256), "a blob another file holds is kept"
    assert download(files, second.id) == data
    env.admin.files.DeleteFile(fpb.DeleteFileRequest(id=second.id, force=True))
    assert not env.store.exists(first.sha256), "the last file's removal for good removes its blob"


def test_a_checksum_mismatch_leaves_nothing(env: Files) -> None:
    _, files = env.user()
    data, name = os.urandom(150_000), unique("bad") + ".bin"
    wrong = hashlib.sha256(b"something else").hexdigest()
    err = expect_error(Code.INVALID_ARGUMENT, upload, files, data, name, sha256=wrong)
    assert err.info.metadata["field"] == "metadata.sha256" and wrong in err.message
    assert not env.store.exists(hashlib.sha256(data).hexdigest())
    assert env.temps() == [] and named(files, name) == 0
    err = expect_error(Code.INVALID_ARGUMENT, upload, files, data, name, size_bytes=len(data) - 1)
    assert err.info.metadata["field"] == "metadata.size_bytes"
    assert not env.store.exists(hashlib.sha256(data).hexdigest()) and env.temps() == [] and named(files, name) == 0


def test_an_oversize_upload_leaves_nothing(env: Files) -> None:
    _, files = env.user()
    data, name = os.urandom(MAX_FILE_BYTES + 1), unique("big") + ".bin"
    err = expect_error(Code.RESOURCE_EXHAUSTED, upload, files, data, name)
    assert err.info.reason == "FILE_TOO_LARGE"
    assert env.temps() == [] and named(files, name) == 0
    assert not env.store.exists(hashlib.sha256(data).hexdigest())
    assert upload(files, data[:MAX_FILE_BYTES], name).size_bytes == MAX_FILE_BYTES, "the maximum itself is allowed"


def test_an_upload_carries_its_metadata_first_and_once(env: Files) -> None:
    _, files = env.user()
    name = unique("meta") + ".bin"
    only_bytes = iter([fpb.UploadFileRequest(chunk=b"abc")])
    err = expect_error(Code.INVALID_ARGUMENT, files.UploadFile, only_bytes)
    assert err.info.metadata["field"] == "metadata"
    expect_error(Code.INVALID_ARGUMENT, files.UploadFile, iter([]))
    twice = iter([*messages(b"abc", name), fpb.UploadFileRequest(metadata=fpb.UploadFileMetadata(name=name))])
    err = expect_error(Code.INVALID_ARGUMENT, files.UploadFile, twice)
    assert err.info.reason == "DUPLICATE_METADATA"
    err = expect_error(Code.INVALID_ARGUMENT, files.UploadFile, messages(b"abc", ""))
    assert err.info.metadata["field"] == "metadata.name"
    err = expect_error(Code.INVALID_ARGUMENT, files.UploadFile, messages(b"abc", "n" * 256))
    assert err.info.metadata["field"] == "metadata.name" and err.info.reason == "FIELD_TOO_LARGE"
    assert not env.store.exists(hashlib.sha256(b"abc").hexdigest())
    assert env.temps() == [] and named(files, name) == 0


def test_an_upload_with_a_request_id_is_made_once(env: Files) -> None:
    _, files = env.user()
    _, other = env.user()
    name, request_id = unique("once") + ".bin", str(uuid.uuid4())
    first = upload(files, b"first bytes", name, request_id=request_id)
    again = upload(files, b"other bytes, never stored", name, request_id=request_id)
    assert again == first and download(files, again.id) == b"first bytes"
    assert not env.store.exists(hashlib.sha256(b"other bytes, never stored").hexdigest())
    assert named(files, name) == 1
    theirs = upload(other, b"first bytes", name, request_id=request_id)
    assert theirs.id != first.id, "a request id is the caller's own"
    err = expect_error(Code.INVALID_ARGUMENT, upload, files, b"x", name, request_id="\n" * 3)
    assert [v.field for v in err.violations] == ["metadata.request_id"]
    assert named(env.admin.files, name) == 2


def test_private_files_are_hidden_from_strangers(env: Files) -> None:
    _, owner = env.user()
    _, stranger = env.user()
    word = unique("priv")
    private = upload(owner, b"secret plans", f"{word} private.txt")
    public = upload(owner, b"press release", f"{word} public.txt", is_public=True)
    assert not private.is_public and private.owner_id
    for stub, sees in ((owner, 2), (stranger, 1), (env.admin.files, 2)):
        assert stub.ListFiles(fpb.ListFilesRequest(filter=f'name = "{word}*"')).total_size == sees
        assert stub.SearchFiles(fpb.SearchFilesRequest(query=word)).total_size == sees
    expect_error(Code.PERMISSION_DENIED, stranger.GetFile, fpb.GetFileRequest(id=private.id))
    expect_error(Code.PERMISSION_DENIED, download, stranger, private.id)
    expect_error(Code.PERMISSION_DENIED, stranger.RecordFileDownload, fpb.RecordFileDownloadRequest(id=private.id))
    expect_error(Code.PERMISSION_DENIED, stranger.UpdateFile, fpb.UpdateFileRequest(file=fpb.File(id=public.id, name="mine now")))
    assert download(stranger, public.id) == b"press release"
    assert download(owner, private.id) == b"secret plans"


def test_the_standard_methods_of_files(env: Files) -> None:
    _, files = env.user()
    made = upload(files, b"draft", unique("std") + ".txt")
    changed = files.UpdateFile(fpb.UpdateFileRequest(file=fpb.File(id=made.id, name="final.txt", is_public=True), update_mask={"paths": ["name", "is_public"]}))
    assert (changed.name, changed.is_public, changed.sha256) == ("final.txt", True, made.sha256)
    err = expect_error(Code.INVALID_ARGUMENT, files.UpdateFile, fpb.UpdateFileRequest(file=fpb.File(id=made.id, sha256="0" * 64), update_mask={"paths": ["sha256"]}))
    assert "sha256" in err.message
    assert [f.id for f in files.BatchGetFiles(fpb.BatchGetFilesRequest(ids=[made.id])).files] == [made.id]
    deleted = files.DeleteFile(fpb.DeleteFileRequest(id=made.id))
    assert deleted.HasField("delete_time")
    expect_error(Code.NOT_FOUND, files.GetFile, fpb.GetFileRequest(id=made.id))
    expect_error(Code.PERMISSION_DENIED, files.DeleteFile, fpb.DeleteFileRequest(id=made.id, force=True))
    assert not files.UndeleteFile(fpb.UndeleteFileRequest(id=made.id)).HasField("delete_time")
    assert download(files, made.id) == b"draft"


def test_concurrent_downloads_are_all_counted(env: Files) -> None:
    _, files = env.user()
    made = upload(files, b"popular", is_public=True)
    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(lambda _: files.RecordFileDownload(fpb.RecordFileDownloadRequest(id=made.id)), range(100)))
    got = files.GetFile(fpb.GetFileRequest(id=made.id))
    assert got.download_count == 100 and got.etag == made.etag, "counted, and not a change of the file"


# ------------------------------------------------------------------ a server process: sweep, SIGKILL, memory


def _sweep(env: Files, *flags: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "nexus-data"), "blobs", "sweep", "--database-url", env.admin.database_url, *flags]
    return subprocess.run(command, env=dict(os.environ, NEXUS_BLOB_DIR=str(env.blob_dir)), capture_output=True, text=True, timeout=60)


def _age(path: Path, seconds: float = 2 * 3600) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_the_sweep_removes_orphans_and_reports_missing_blobs(env: Files) -> None:
    _, files = env.user()
    orphan = env.store.put([os.urandom(1000)])
    _age(env.store.path(orphan.sha256))
    young = env.store.put([os.urandom(1000)])  # an upload's whose row is not yet written, maybe
    temp = env.blob_dir / ".tmp-killed-upload"
    temp.write_bytes(b"partial")
    _age(temp)
    kept = upload(files, b"kept bytes")
    _age(env.store.path(kept.sha256))
    lost = upload(files, os.urandom(500))
    env.store.delete(lost.sha256)
    try:
        dry = _sweep(env, "--dry-run")
        assert dry.returncode == 1, dry.stderr
        assert f"would remove unreferenced blob {orphan.sha256}" in dry.stdout and str(temp) in dry.stdout
        assert f"missing blob {lost.sha256} of file {lost.id}" in dry.stdout
        assert env.store.exists(orphan.sha256) and temp.exists(), "a dry run removes nothing"
        done = _sweep(env)
        assert done.returncode == 1 and f"removed unreferenced blob {orphan.sha256}" in done.stdout, done.stdout + done.stderr
        assert not env.store.exists(orphan.sha256) and not temp.exists()
        assert env.store.exists(young.sha256) and env.store.exists(kept.sha256), "young and referenced blobs stay"
        assert download(files, kept.id) == b"kept bytes"
    finally:
        env.admin.files.DeleteFile(fpb.DeleteFileRequest(id=lost.id, force=True))
        env.store.delete(young.sha256)
    assert _sweep(env).returncode == 0


@contextlib.contextmanager
def serving(env: Files, log_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Any]]:
    """A `nexus-data serve` process on the test database and blob directory, and its FileService
    stub; with the glibc heaps the image sets (MALLOC_ARENA_MAX=2, Dockerfile): with the default
    eight per core, the threads a transfer's file I/O runs on leave heaps behind worth a few MiB
    each, which is the allocator's measure, not the server's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    variables = dict(os.environ, DATABASE_URL=env.admin.database_url, NEXUS_PORT=str(port), NEXUS_HOST="127.0.0.1",
                     NEXUS_BLOB_DIR=str(env.blob_dir), NEXUS_DRAIN_SECONDS="0", NEXUS_GRACE_SECONDS="1", MALLOC_ARENA_MAX="2")
    log = log_path.open("w+")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "nexus-data"), "serve", "--no-migrate"], env=variables, stdout=log, stderr=subprocess.STDOUT)
    channel = authed_channel(f"127.0.0.1:{port}", env.admin.admin_secret)
    try:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield proc, files_pb2_grpc.FileServiceStub(channel)
    finally:
        channel.close()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_killed_upload_leaves_no_row_and_its_temporary_file_is_swept(env: Files, tmp_path: Path) -> None:
    name = unique("killed") + ".bin"
    sent, release = threading.Event(), threading.Event()

    def stalled() -> Iterator[fpb.UploadFileRequest]:
        yield fpb.UploadFileRequest(metadata=fpb.UploadFileMetadata(name=name))
        for _ in range(4):
            yield fpb.UploadFileRequest(chunk=os.urandom(CHUNK))
        sent.set()
        release.wait(30)

    with serving(env, tmp_path / "server.log") as (proc, stub):
        with ThreadPoolExecutor(1) as pool:
            outcome = pool.submit(stub.UploadFile, stalled(), timeout=60)
            assert sent.wait(30)
            deadline = time.monotonic() + 10
            while not (env.temps() and env.temps()[0].stat().st_size >= 4 * CHUNK) and time.monotonic() < deadline:
                time.sleep(0.05)
            partial = env.temps()
            assert partial, "the upload's bytes are in a temporary file"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
            release.set()
            with pytest.raises(grpc.RpcError):
                outcome.result(timeout=30)
    assert named(env.admin.files, name) == 0
    for temp in partial:
        _age(temp)
    swept = _sweep(env)
    assert swept.returncode == 0 and all(str(t) in swept.stdout for t in partial), swept.stdout + swept.stderr
    assert env.temps() == []


def test_a_100_mb_upload_and_download_in_little_memory(env: Files, tmp_path: Path) -> None:
    """The server streams a 100 MB file to disk and back: its resident size grows by less than a
    quarter of the file (a server that held the file would grow by all of it). Quiet, the growth
    is a few MiB; on a loaded machine gRPC's flow-control windows and the allocator's heaps under
    concurrent threads have taken it to 22 MiB."""
    size, chunk = 100 * 1024 * 1024, 1024 * 1024
    block = os.urandom(chunk)
    digest = hashlib.sha256(block * (size // chunk)).hexdigest()
    with serving(env, tmp_path / "server.log") as (proc, stub):
        # A warm-up transfer of 32 MiB first, as the large one sends it: the threads, flow
        # control windows, buffers and allocator heaps any transfer brings are in "before", so
        # the growth measured is what the file's size brings.
        warm = stub.UploadFile(messages(os.urandom(32 * chunk), unique("warm"), chunk=chunk), timeout=60)
        assert len(download(stub, warm.id)) == 32 * chunk
        before, peak, done = _rss(proc.pid), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss(proc.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            parts = itertools.chain(
                [fpb.UploadFileRequest(metadata=fpb.UploadFileMetadata(name=unique("large"), sha256=digest))],
                (fpb.UploadFileRequest(chunk=block) for _ in range(size // chunk)),
            )
            made = stub.UploadFile(parts, timeout=300)
            got = hashlib.sha256()
            for part in stub.DownloadFile(fpb.DownloadFileRequest(id=made.id), timeout=300):
                got.update(part.chunk)
        finally:
            done.set()
            sampler.join()
    assert made.size_bytes == size and got.hexdigest() == digest
    assert peak[0] - before < size // 4, f"resident {before >> 20} MiB before, {peak[0] >> 20} MiB at most"
    env.admin.files.DeleteFile(fpb.DeleteFileRequest(id=made.id, force=True))


def test_a_removal_for_good_never_takes_the_blob_of_a_concurrent_upload(env: Files) -> None:
    """The last file of some bytes removed for good while the same bytes are uploaded again:
    whichever order they take, the new file keeps its blob."""
    _, files = env.user()
    data = os.urandom(2000)
    with ThreadPoolExecutor(2) as pool:
        for _ in range(30):
            old = upload(files, data)
            removal = pool.submit(env.admin.files.DeleteFile, fpb.DeleteFileRequest(id=old.id, force=True))
            new = pool.submit(upload, files, data)
            removal.result()
            assert download(files, new.result().id) == data
            env.admin.files.DeleteFile(fpb.DeleteFileRequest(id=new.result().id, force=True))
