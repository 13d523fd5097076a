"""Files of FileService: the metadata of stored files (File) over the blob store (db/blobs.py),
which holds their bytes by SHA-256, once per content.

A File is made only by an upload: its bytes are made durable in the blob store first, then its
row is written (so a committed row always has its blob); its sha256 and size_bytes are the
service's, never the caller's. Many rows may share one blob; a blob goes when the last row of it
is deleted for good (after that delete commits), and `nexus-data blobs sweep` removes blobs no
row names (a killed upload's, a removal that did not happen).

Public files are seen by every caller; private ones by their owner (and admins); owners manage
theirs."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from nexus.files.v1 import files_pb2 as pb
from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, String, Uuid, or_, select, update
from sqlalchemy.orm import Mapped, Session, mapped_column

from db import errors
from db.base import Base, ResourceMixin, SoftDeleteMixin
from db.blobs import STALE_TEMP_SECONDS, BlobStore, Stored
from db.domains.identity import User  # noqa: F401 - the users table the foreign key names
from db.engine import reads, writes
from db.engine.call import Call
from db.engine.resource import REGISTRY, ResourceSpec
from db.engine.rules import Access, Rule, is_caller, mine

# ---------------------------------------------------------------- tables


class File(ResourceMixin, SoftDeleteMixin, Base):
    __tablename__ = "files"
    __table_args__ = (
        Index("ix_files_create_time_id", "create_time", "id"),
        Index("ix_files_owner_id", "owner_id"),
        # A blob's rows: whether a removal leaves it unreferenced, what the sweep keeps.
        Index("ix_files_sha256", "sha256"),
    )

    name: Mapped[str] = mapped_column(String(255), nullable=False)
    mime_type: Mapped[str | None] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    sha256: Mapped[str] = mapped_column(String(64), nullable=False)
    is_public: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    download_count: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    # The uploader; cleared (the file left to admins) if that user is deleted for good.
    owner_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))


# ---------------------------------------------------------------- row rules


def _readable(user_id: uuid.UUID | None, role: str) -> Any:
    return or_(File.is_public.is_(True), is_caller(File.owner_id, user_id))


READABLE = Rule(_readable, "public ones, and their own")
OWNED = mine(File.owner_id, "their own")

# ---------------------------------------------------------------- resources

FILES = REGISTRY.add(
    ResourceSpec(
        name="File",
        plural="Files",
        model=File,
        message=pb.File,
        singular_field="file",
        output_only=frozenset({"size_bytes", "sha256", "download_count"}),
        required=frozenset({"name"}),
        references={"owner_id": "User"},
        orderable=("create_time", "update_time", "name", "size_bytes", "download_count"),
        search_fields=(("name", "A"),),
        batch_get=True,
        owner_field="owner_id",
        access=Access(read=READABLE, manage=OWNED, admin_only=frozenset({"owner_id"})),
        create_rpc=False,
    )
)


# ---------------------------------------------------------------- custom methods


class _NewFile(NamedTuple):
    """A create request for the engine: the File an upload makes (no CreateFile RPC exists)."""

    file: pb.File
    request_id: str = ""


def check_metadata(metadata: pb.UploadFileMetadata) -> None:
    """An upload's metadata refused before any byte is stored (the row's own checks run again
    when it is written: this only spares a client the upload of a file that cannot be kept)."""
    if not metadata.name:
        raise errors.InvalidArgument.field("metadata.name", "is required", reason="REQUIRED_FIELD")
    # The File's own checks of these fields (sizes, text), with the metadata's field paths.
    writes.load_fields(FILES, _file_of(metadata), ["name", "mime_type"], "metadata.")
    if metadata.sha256 and not _is_sha256(metadata.sha256):
        raise errors.InvalidArgument.field("metadata.sha256", f"{metadata.sha256!r} is not a SHA-256 in hex (64 digits)")
    if metadata.size_bytes < 0:
        raise errors.InvalidArgument.field("metadata.size_bytes", f"{metadata.size_bytes} is negative")


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text)


def check_stored(metadata: pb.UploadFileMetadata, stored: Stored) -> None:
    """INVALID_ARGUMENT when the bytes are not those the metadata declared."""
    if metadata.sha256 and metadata.sha256.lower() != stored.sha256:
        raise errors.InvalidArgument.field(
            "metadata.sha256", f"declared {metadata.sha256.lower()}, but the bytes sent have SHA-256 {stored.sha256}",
            reason="CHECKSUM_MISMATCH",
        )
    if metadata.size_bytes and metadata.size_bytes != stored.size:
        raise errors.InvalidArgument.field(
            "metadata.size_bytes", f"declared {metadata.size_bytes}, but {stored.size} bytes were sent", reason="SIZE_MISMATCH",
        )


def _file_of(metadata: pb.UploadFileMetadata) -> pb.File:
    return pb.File(name=metadata.name, mime_type=metadata.mime_type, is_public=metadata.is_public)


def create_file(session: Session, metadata: pb.UploadFileMetadata, stored: Stored, call: Call) -> pb.File:
    """The File of an upload whose bytes are stored (durably) as `stored` (or, when its request
    id was claimed meanwhile, the File that claim made)."""
    message = _file_of(metadata)
    server_values = {"sha256": stored.sha256, "size_bytes": stored.size}
    request = _NewFile(message, metadata.request_id)
    return writes.create(session, FILES, request, call, server_values=server_values)


def earlier_upload(session: Session, metadata: pb.UploadFileMetadata, call: Call) -> pb.File | None:
    """The File an earlier upload of the caller with this request id made, or None."""
    request_id = writes.validate_request_id(metadata.request_id, "metadata.request_id")
    return writes.earlier_result(session, FILES, request_id, call) if request_id else None


def readable_blob(session: Session, raw_id: str) -> tuple[str, int]:
    """(sha256, size) of a file the caller may read (PERMISSION_DENIED as a Get answers)."""
    row = reads.fetch(session, FILES, raw_id)
    return row.sha256, row.size_bytes


def record_file_download(session: Session, request: pb.RecordFileDownloadRequest, call: Call) -> pb.File:
    """One more download of a file the caller may read: one UPDATE ... SET download_count =
    download_count + 1, so concurrent counts are never lost (no read-modify-write). Not a change
    of the file: neither its etag nor its update_time moves, and it writes no audit entry."""
    row_id = reads.visible_id(session, FILES, raw_id=request.id)
    session.execute(update(File).where(File.id == row_id).values(download_count=File.download_count + 1))
    session.expire_all()
    return FILES.to_proto(reads.fetch(session, FILES, request.id))


def blob_unreferenced(session: Session, sha256: str) -> bool:
    """Whether no row (live or soft-deleted) names the blob."""
    return session.execute(select(File.id).where(File.sha256 == sha256).limit(1)).first() is None


def referenced_blobs(session: Session) -> set[str]:
    """Every blob some row names."""
    return set(session.scalars(select(File.sha256).distinct()))


@dataclass
class Sweep:
    """What `nexus-data blobs sweep` found: blobs no row names, stale temporary files (both
    removed unless a dry run), and the files whose blob is missing or not of the file's size
    (reported: only an operator can bring their bytes back)."""

    unreferenced: list[str] = field(default_factory=list)
    temps: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (file id, sha256)
    damaged: list[tuple[str, str, int, int]] = field(default_factory=list)  # (file id, sha256, blob size, file size)


def _mtime(path: Path) -> float | None:
    """The file's modification time, or None when it is gone (removed since it was listed)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def sweep(session: Session, store: BlobStore, dry_run: bool, older_than: float = STALE_TEMP_SECONDS) -> Sweep:
    """The blob store set against the rows. A blob or temporary file younger than older_than is
    left alone whatever the rows say: it may be an upload's whose row is not committed yet."""
    referenced = referenced_blobs(session)
    cutoff = time.time() - older_than
    found = Sweep()
    sizes: dict[str, int] = {}
    for sha256 in store.list():
        try:
            stat = store.path(sha256).stat()
        except FileNotFoundError:  # removed since it was listed (a removal for good)
            continue
        sizes[sha256] = stat.st_size
        if sha256 not in referenced and stat.st_mtime < cutoff:
            found.unreferenced.append(sha256)
    found.temps = [str(p) for p in store.stale_temps(older_than)]
    rows = session.execute(select(File.id, File.sha256, File.size_bytes).order_by(File.id))
    for file_id, sha256, size_bytes in rows:
        if sha256 not in sizes:
            found.missing.append((str(file_id), sha256))
        elif sizes[sha256] != size_bytes:
            found.damaged.append((str(file_id), sha256, sizes[sha256], size_bytes))
    if not dry_run:
        for sha256 in found.unreferenced:
            with store.lock(sha256):  # an upload of the same bytes may just have named it
                mtime = _mtime(store.path(sha256))
                if mtime is not None and mtime < cutoff and blob_unreferenced(session, sha256):
                    store.delete(sha256)
        for temp in found.temps:
            Path(temp).unlink(missing_ok=True)
    return found
