"""FileService against hostile callers and a bad day of its operator: damaged blob stores, a
blob directory that cannot hold blobs, uploads left open, deleted files other callers must
not reach."""
from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from nexus.files.v1 import files_pb2 as fpb
from nexus.identity.v1 import identity_pb2 as ipb

from db.blobs import BlobStore
from service.files import store_failure
from tests.conftest import Client, ServerThread, connect, make_config, unique
from tests.support import expect_error, new_user
from tests.test_files import MAX_FILE_BYTES, Files, _sweep, download, env, upload  # noqa: F401 - the fixture

Code = grpc.StatusCode


def test_a_truncated_blob_is_data_loss_not_a_short_file(env: Files) -> None:
    _, files = env.user()
    data = os.urandom(200_000)
    made = upload(files, data)
    blob = env.store.path(made.sha256)
    with blob.open("r+b") as f:  # a disk or a restore lost the end of it
        f.truncate(150_000)
    err = expect_error(Code.DATA_LOSS, download, files, made.id)
    assert err.info.reason == "BLOB_TRUNCATED"
    swept = _sweep(env, "--dry-run")
    assert swept.returncode == 1 and f"damaged blob {made.sha256} of file {made.id}: 150000 bytes, the file has 200000" in swept.stdout
    env.admin.files.DeleteFile(fpb.DeleteFileRequest(id=made.id, force=True))  # its blob goes with it
    assert not blob.exists()


def test_a_blob_directory_that_is_a_file_is_refused_at_start(database_url: str, tmp_path: Path) -> None:
    """NEXUS_BLOB_DIR naming a file (a typo, a mount that did not happen): the server must say so
    when it starts, not serve and answer every upload INTERNAL."""
    not_a_dir = tmp_path / "blobs"
    not_a_dir.write_bytes(b"an operator's typo")
    server = ServerThread(make_config(database_url, blob_dir=str(not_a_dir), max_file_bytes=MAX_FILE_BYTES))
    try:
        server.start()
    except Exception as exc:  # the refusal wanted
        assert "blob" in str(exc).lower()
        return
    backend = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    admin = connect(backend, database_url, server)  # (keeps the first start's admin key for the other tests)
    try:
        parts = [fpb.UploadFileRequest(metadata=fpb.UploadFileMetadata(name="x.txt")), fpb.UploadFileRequest(chunk=b"x")]
        with pytest.raises(grpc.RpcError) as caught:
            admin.files.UploadFile(iter(parts))
        pytest.fail(f"the server started on a blob directory that is a file; an upload answers {caught.value.code()}: {caught.value.details()}")
    finally:
        admin.channel.close()
        server.stop()


def _held_upload(name: str, started: threading.Event, release: threading.Event) -> Iterator[fpb.UploadFileRequest]:
    yield fpb.UploadFileRequest(metadata=fpb.UploadFileMetadata(name=name))
    yield fpb.UploadFileRequest(chunk=b"x")
    started.set()
    release.wait(60)


def _user_files(admin: Client, server: ServerThread) -> Client:
    """A client of the server calling as a new ordinary user."""
    user = new_user(admin)
    key = admin.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_USER, user_id=user.id)))
    return connect(admin.backend, admin.database_url, server, secret=key.secret)


def test_one_callers_idle_uploads_do_not_shut_out_other_callers(database_url: str, tmp_path: Path) -> None:
    """Each open upload holds a temporary file and a slot of NEXUS_MAX_CONCURRENT_RPCS; one
    user's stalled uploads (metadata, a byte, then nothing, for as long as they like) must not
    take every slot from the other callers."""
    slots = 8
    server = ServerThread(make_config(database_url, max_file_bytes=MAX_FILE_BYTES, max_concurrent_rpcs=slots)).start()
    backend = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    admin = connect(backend, database_url, server)
    attacker, victim = _user_files(admin, server), _user_files(admin, server)
    release = threading.Event()
    threads: list[threading.Thread] = []
    try:
        made = upload(victim.files, b"mine", name=unique("v") + ".txt")
        for _ in range(slots):
            started = threading.Event()

            def run(started: threading.Event = started) -> None:
                with contextlib.suppress(grpc.RpcError):
                    attacker.files.UploadFile(_held_upload(unique("idle"), started, release))
                started.set()

            t = threading.Thread(target=run, daemon=True)
            t.start()
            threads.append(t)
            assert started.wait(30)
        assert victim.files.GetFile(fpb.GetFileRequest(id=made.id), timeout=10).id == made.id
    finally:
        release.set()
        for t in threads:
            t.join(30)
        for c in (admin, attacker, victim):
            c.channel.close()
        server.stop()


def test_a_declared_size_past_the_maximum_is_refused_before_any_byte(env: Files) -> None:
    """The metadata says the file cannot be kept: RESOURCE_EXHAUSTED at once (FILE_TOO_LARGE),
    not after the client has sent the whole maximum, nor a SIZE_MISMATCH when it stops early."""
    _, files = env.user()
    parts = iter([fpb.UploadFileRequest(metadata=fpb.UploadFileMetadata(name=unique("huge") + ".bin", size_bytes=MAX_FILE_BYTES + 1))])
    err = expect_error(Code.RESOURCE_EXHAUSTED, files.UploadFile, parts)
    assert err.info.reason == "FILE_TOO_LARGE"


def test_an_idle_upload_is_ended_and_leaves_nothing(database_url: str) -> None:
    """An upload that sends nothing for NEXUS_UPLOAD_IDLE_SECONDS is ended with DEADLINE_EXCEEDED
    (UPLOAD_IDLE), its temporary file removed and its slot freed; one that keeps sending is not."""
    server = ServerThread(make_config(database_url, max_file_bytes=MAX_FILE_BYTES, upload_idle_seconds=0.5)).start()
    backend = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    admin = connect(backend, database_url, server)
    user = _user_files(admin, server)
    store = BlobStore(server.config.blob_path)
    release = threading.Event()
    try:
        name = unique("idle") + ".bin"
        err = expect_error(Code.DEADLINE_EXCEEDED, user.files.UploadFile, _held_upload(name, threading.Event(), release), timeout=30)
        assert err.info.reason == "UPLOAD_IDLE" and err.info.metadata["committed"] == "false" and "may have been applied" not in err.message
        assert not any(t.stat().st_size == 1 for t in store.temps()), "its temporary file is gone"
        assert user.files.ListFiles(fpb.ListFilesRequest(filter=f'name = "{name}"')).total_size == 0

        def slow() -> Iterator[fpb.UploadFileRequest]:  # a message every 0.1 s: never idle for 0.5 s
            yield fpb.UploadFileRequest(metadata=fpb.UploadFileMetadata(name=name))
            for _ in range(6):
                time.sleep(0.1)
                yield fpb.UploadFileRequest(chunk=b"x")

        assert user.files.UploadFile(slow(), timeout=30).size_bytes == 6
    finally:
        release.set()
        for c in (admin, user):
            c.channel.close()
        server.stop()


def test_a_caller_has_a_bounded_number_of_uploads_open(database_url: str) -> None:
    server = ServerThread(make_config(database_url, max_file_bytes=MAX_FILE_BYTES, max_uploads_per_caller=2)).start()
    backend = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    admin = connect(backend, database_url, server)
    user, other = _user_files(admin, server), _user_files(admin, server)
    release = threading.Event()
    threads = []
    try:
        for _ in range(2):
            started = threading.Event()
            t = threading.Thread(target=lambda s=started: user.files.UploadFile(_held_upload(unique("open"), s, release)), daemon=True)
            t.start()
            threads.append(t)
            assert started.wait(30)
        time.sleep(0.2)  # both are open on the server
        err = expect_error(Code.RESOURCE_EXHAUSTED, upload, user.files, b"third")
        assert err.info.reason == "TOO_MANY_UPLOADS" and err.info.metadata["max_uploads"] == "2"
        assert download(other.files, upload(other.files, b"another caller's").id) == b"another caller's"
        release.set()
        for t in threads:
            t.join(30)
        assert download(user.files, upload(user.files, b"once they are done").id) == b"once they are done"
    finally:
        release.set()
        for c in (admin, user, other):
            c.channel.close()
        server.stop()


def test_the_sweep_refuses_a_blob_store_that_is_not_there(env: Files, tmp_path: Path) -> None:
    swept = subprocess.run(
        [str(Path(sys.executable).parent / "nexus-data"), "blobs", "sweep", "--dry-run", "--database-url", env.admin.database_url],
        env=dict(os.environ, NEXUS_BLOB_DIR=str(tmp_path / "not-mounted")), capture_output=True, text=True, timeout=120,
    )
    assert swept.returncode == 2 and "not-mounted is not a directory" in swept.stderr, swept.stdout + swept.stderr
    assert "missing blob" not in swept.stdout


def test_a_full_or_failing_blob_store_is_a_status_a_client_can_act_on() -> None:
    """What the disk's errors become (a test cannot fill a real disk): full or over quota,
    RESOURCE_EXHAUSTED; any other I/O error, UNAVAILABLE (retry later)."""
    assert store_failure(OSError(errno.ENOSPC, "No space left on device")).code is Code.RESOURCE_EXHAUSTED
    assert store_failure(OSError(errno.EDQUOT, "Disk quota exceeded")).reason == "BLOB_STORE_FULL"
    failed = store_failure(OSError(errno.EIO, "Input/output error"))
    assert (failed.code, failed.reason) == (Code.UNAVAILABLE, "BLOB_STORE_FAILED")
