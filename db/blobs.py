"""The blob store: file contents by their SHA-256, in a directory (`<dir>/<sha[:2]>/<sha>`).

Content-addressed, so identical bytes are stored once, and a blob, once in place, never changes.
A put streams to a temporary file in the store's own directory while hashing (never the whole
content in memory), fsyncs it and renames it into place: a blob's path holds either nothing or
its whole content, whatever the process dies of. Temporary files are named `.tmp-*`; the ones a
killed upload left behind are what `sweep` removes (older than an hour, so never a live upload's).
"""
from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

# Beside the default SQLite file (data/nexus.db).
DEFAULT_BLOB_DIR = "data/blobs"
TEMP_PREFIX = ".tmp-"
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# Temporary files older than this belong to no live upload.
STALE_TEMP_SECONDS = 3600.0


class Blocks(Protocol):
    """Where a thread takes the blocks (lists of chunks) of a blob being written: None at the end."""

    def get(self) -> list[bytes] | None: ...


class TooLarge(Exception):
    """The content passed the store's limit; nothing was kept."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class Stored:
    sha256: str
    size: int


class BlobStore:
    """Blobs in a directory; every method is blocking (run it off the event loop)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, sha256: str) -> Path:
        if not SHA256_HEX.match(sha256):
            raise ValueError(f"not a SHA-256 in lowercase hex: {sha256!r}")
        return self.root / sha256[:2] / sha256

    @contextlib.contextmanager
    def lock(self, sha256: str) -> Iterator[None]:
        """Holds the lock of the blob's prefix directory (an flock: across processes and threads).
        Whoever puts a blob in place holds it until the row naming the blob is committed, and
        whoever removes a blob holds it from the check that no row names it to the removal: so a
        blob a new row is about to name is never removed under it."""
        directory = self.path(sha256).parent
        directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def check(self) -> None:
        """The store's directory made if it is not there, and shown to take files (a probe
        written and removed): OSError naming the problem otherwise (a file, a missing mount,
        no write permission). Run before serving, so a bad directory stops the server."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.root.is_dir():
            raise NotADirectoryError(f"{self.root} is not a directory")
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.root)
        os.close(fd)
        os.unlink(name)

    def begin(self) -> BlobWriter:
        """A new blob to write chunk by chunk (BlobWriter.write), then keep or discard."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=self.root)
        return BlobWriter(self, os.fdopen(fd, "wb"), Path(name))

    def put(self, chunks: Iterable[bytes], limit: int | None = None) -> Stored:
        """The chunks stored as one blob (TooLarge past limit, nothing kept)."""
        writer = self.begin()
        try:
            for chunk in chunks:
                writer.write(chunk, limit)
            return writer.keep()
        finally:
            writer.discard()

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def open(self, sha256: str, offset: int = 0) -> BinaryIO:
        """The blob for reading from offset (FileNotFoundError when it is missing)."""
        f = self.path(sha256).open("rb")
        f.seek(offset)
        return f

    def read(self, sha256: str, offset: int = 0, limit: int | None = None, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
        """The blob's bytes from offset, at most limit of them, in chunks."""
        with self.open(sha256, offset) as f:
            left = limit
            while left is None or left > 0:
                chunk = f.read(chunk_size if left is None else min(chunk_size, left))
                if not chunk:
                    return
                if left is not None:
                    left -= len(chunk)
                yield chunk

    def delete(self, sha256: str) -> bool:
        """Removes the blob; whether it was there."""
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        return True

    def list(self) -> Iterator[str]:
        """The SHA-256 of every stored blob."""
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for blob in sorted(sub.iterdir()):
                    if SHA256_HEX.match(blob.name) and blob.name[:2] == sub.name:
                        yield blob.name

    # builtins.list: in the class body below the method `list`, plain `list` names that method.
    def stale_temps(self, older_than: float = STALE_TEMP_SECONDS) -> builtins.list[Path]:
        """Temporary files no upload has touched for older_than seconds."""
        if not self.root.is_dir():
            return []
        cutoff = time.time() - older_than
        return sorted(p for p in self.root.glob(TEMP_PREFIX + "*") if p.stat().st_mtime < cutoff)

    def temps(self) -> builtins.list[Path]:
        """Every temporary file, live uploads' too."""
        return self.stale_temps(older_than=-1e12)


class BlobWriter:
    """One blob being written to its temporary file, hashed as it goes."""

    def __init__(self, store: BlobStore, file: BinaryIO, temp: Path) -> None:
        self.store, self.file, self.temp = store, file, temp
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes, limit: int | None = None) -> None:
        """Appends chunk; TooLarge (and the temporary file removed) once limit is crossed."""
        self.size += len(chunk)
        if limit is not None and self.size > limit:
            self.discard()
            raise TooLarge(limit)
        self.hash.update(chunk)
        self.file.write(chunk)

    def hash_from(self, blocks: Blocks) -> None:
        """Hashes the chunks of each block taken from blocks until None; with write_from on
        the same blocks in another thread, a block is hashed while another is written."""
        _drain(blocks, self.hash.update)

    def write_from(self, blocks: Blocks) -> None:
        """Appends the chunks of each block taken from blocks until None, unhashed (hash_from
        hashes them); their size is the caller's to bound."""

        def append(chunk: bytes) -> None:
            self.size += len(chunk)
            self.file.write(chunk)

        _drain(blocks, append)

    def finish(self) -> Stored:
        """The content written durably to its temporary file: what it is, to check before keep."""
        if not self.file.closed:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        return Stored(self.hash.hexdigest(), self.size)

    def keep(self) -> Stored:
        """The content made durable and renamed into place: its blob (a blob of the same content
        already there is replaced by identical bytes: stored once)."""
        stored = self.finish()
        target = self.store.path(stored.sha256)
        target.parent.mkdir(exist_ok=True)
        os.replace(self.temp, target)
        _fsync_dir(target.parent)
        _fsync_dir(self.store.root)
        return stored

    def discard(self) -> None:
        """The temporary file removed (nothing once kept)."""
        if not self.file.closed:
            self.file.close()
        try:
            self.temp.unlink()
        except FileNotFoundError:
            pass


def _drain(blocks: Blocks, step: Callable[[bytes], object]) -> None:
    """step on each chunk of each block taken from blocks, until None. After a failure (a full
    disk) the remaining blocks are taken and dropped until None, so a producer never waits on a
    queue nobody empties; then it is raised."""
    failure: BaseException | None = None
    while (block := blocks.get()) is not None:
        if failure is None:
            try:
                for chunk in block:
                    step(chunk)
            except BaseException as exc:  # noqa: BLE001 - raised below, once the queue is done
                failure = exc
    if failure is not None:
        raise failure


def _fsync_dir(path: Path) -> None:
    """A rename made durable: the directory entry is synced too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
