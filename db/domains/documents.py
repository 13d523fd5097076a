"""Documents of KnowledgeService: documents (Word, Excel, PowerPoint, other) with their content
as structured data, the states they had (DocumentVersion, kept by every change of title or
content, never rewritten) and who they are shared with at which level (DocumentShare).

Who may do what is the resources' row rules, evaluated in SQL on every call (so an unshare
holds from the next call on): the owner and admins manage a document and its shares; those it is
shared with see it, its versions and its shares, and edit-sharers change it and restore its
versions; a soft-deleted document and its versions are its owner's and admins' alone."""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from google.protobuf import empty_pb2, field_mask_pb2
from nexus.knowledge.v1 import knowledge_pb2 as pb
from sqlalchemy import ForeignKey, Index, Integer, String, Uuid, and_, false, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from db import errors
from db.base import Base, ResourceMixin, SoftDeleteMixin, json_object, one_of, utcnow, uuid7
from db.domains.identity import User  # noqa: F401 - the users table the foreign keys name
from db.engine import changes, reading, reads, writes
from db.engine.call import Call
from db.engine.codecs import parse_uuid
from db.engine.resource import REGISTRY, ResourceSpec
from db.engine.rules import Access, Rule, mine, predicate
from db.engine.search import JsonText

# ---------------------------------------------------------------- tables

DOCUMENT_KINDS = ("word", "excel", "powerpoint", "other")
SHARE_LEVELS = ("view", "comment", "edit")


class Document(ResourceMixin, SoftDeleteMixin, Base):
    __tablename__ = "documents"
    __table_args__ = (
        one_of("kind", DOCUMENT_KINDS),
        Index("ix_documents_create_time_id", "create_time", "id"),
        Index("ix_documents_owner_id", "owner_id"),
    )

    title: Mapped[str] = mapped_column(String(255), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False, default="other")
    content: Mapped[json_object]
    # Required on create; cleared (the document left to admins) if the owner is deleted for good.
    owner_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))
    version: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    last_editor_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))


class DocumentVersion(ResourceMixin, Base):
    __tablename__ = "document_versions"
    __table_args__ = (
        one_of("kind", DOCUMENT_KINDS),
        Index("uq_document_versions_document_id_version", "document_id", "version", unique=True),
    )

    document_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("documents.id", ondelete="CASCADE"), nullable=False)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    title: Mapped[str] = mapped_column(String(255), nullable=False)
    kind: Mapped[str] = mapped_column(String(16), nullable=False)
    content: Mapped[json_object]
    author_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))


class DocumentShare(ResourceMixin, Base):
    __tablename__ = "document_shares"
    __table_args__ = (
        one_of("level", SHARE_LEVELS),
        # One share per document and user: ShareDocument changes its level.
        Index("uq_document_shares_document_id_user_id", "document_id", "user_id", unique=True),
        Index("ix_document_shares_user_id", "user_id"),
    )

    document_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("documents.id", ondelete="CASCADE"), nullable=False)
    user_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("users.id", ondelete="CASCADE"), nullable=False)
    level: Mapped[str] = mapped_column(String(16), nullable=False)
    shared_by_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))


# ---------------------------------------------------------------- row rules


def _shared_with(user_id: uuid.UUID, levels: tuple[str, ...] = SHARE_LEVELS) -> Any:
    """Ids of the documents shared with the user at one of levels."""
    shares = DocumentShare.__table__.c
    return select(shares.document_id).where(shares.user_id == user_id, shares.level.in_(levels))


def _documents(user_id: uuid.UUID | None, levels: tuple[str, ...]) -> ColumnElement[bool]:
    """The caller's own documents (deleted or not), and live ones shared with them at levels."""
    if user_id is None:
        return false()
    return or_(Document.owner_id == user_id, and_(Document.delete_time.is_(None), Document.id.in_(_shared_with(user_id, levels))))


def _readable(user_id: uuid.UUID | None, role: str) -> ColumnElement[bool]:
    return _documents(user_id, SHARE_LEVELS)


def _editable(user_id: uuid.UUID | None, role: str) -> ColumnElement[bool]:
    return _documents(user_id, ("edit",))


READABLE = Rule(_readable, "their own, and live ones shared with them")
EDITABLE = Rule(_editable, "their own, and live ones shared with them to edit")
OWNED = mine(Document.owner_id, "their own")


def _of(column: Any, rule: Rule, says: str) -> Rule:
    """The rows of `column`'s documents that rule lets through."""

    def build(user_id: uuid.UUID | None, role: str) -> ColumnElement[bool] | None:
        documents = rule(user_id, role)
        return None if documents is None else column.in_(select(Document.id).where(documents))

    return Rule(build, says)


# ---------------------------------------------------------------- resources


def _stamp_editor(session: Session, row: Document, changed: set[str], creating: bool, call: Call) -> None:
    """A new document's first state is its caller's."""
    if creating:
        row.last_editor_id = call.actor_user_id


def _on_update(session: Session, old: dict[str, Any], new: dict[str, Any], call: Call) -> None:
    """What a change of a document writes beyond it, in its transaction: the version it leaves
    (_keep_version), and a new owner's share of it, which an owner does not need (ShareDocument
    refuses one), removed (audited)."""
    _keep_version(session, old, new, call)
    if new["owner_id"] != old["owner_id"] and new["owner_id"] is not None:
        share = _share_of(session, old["id"], new["owner_id"])
        if share is not None:
            session.delete(share)
            changes.flush(session)


def _keep_version(session: Session, old: dict[str, Any], new: dict[str, Any], call: Call) -> None:
    """A change of title or content moves the document to its next version, made by the caller,
    and keeps the state it leaves as a DocumentVersion (audited, in the same transaction). Other
    changes (kind alone, the owner) make none."""
    if (new["title"], new["content"]) == (old["title"], old["content"]):
        return
    new["version"] = old["version"] + 1
    new["last_editor_id"] = call.actor_user_id
    kept = reading.row_class(DOCUMENT_VERSIONS)({key: None for key in DOCUMENT_VERSIONS.table.c.keys()})
    kept.__dict__.update(
        id=uuid7(), document_id=old["id"], version=old["version"], title=old["title"], kind=old["kind"],
        content=old["content"], author_id=old["last_editor_id"], create_time=old["update_time"], revision=1,
    )
    writes.insert_rows(session, DOCUMENT_VERSIONS, [kept])


DOCUMENTS = REGISTRY.add(
    ResourceSpec(
        name="Document",
        plural="Documents",
        model=Document,
        message=pb.Document,
        singular_field="document",
        output_only=frozenset({"version", "last_editor_id"}),
        required=frozenset({"title", "owner_id"}),
        references={"owner_id": "User"},
        orderable=("create_time", "update_time", "title", "version"),
        # The content's words are those of its string values (search.JsonText).
        search_fields=(("title", "A"), (JsonText("content"), "B")),
        batch_get=True,
        before_write=_stamp_editor,
        on_update=_on_update,
        owner_field="owner_id",
        access=Access(read=READABLE, manage=EDITABLE, admin_only=frozenset({"owner_id"}), delete=OWNED),
    )
)

DOCUMENT_VERSIONS = REGISTRY.add(
    ResourceSpec(
        name="DocumentVersion",
        plural="DocumentVersions",
        model=DocumentVersion,
        message=pb.DocumentVersion,
        singular_field="document_version",
        references={"document_id": "Document", "author_id": "User"},
        orderable=("create_time", "version"),
        read_only=True,
        # Made by the changes of those who may edit their document (checked as they are written).
        access=Access(
            read=_of(DocumentVersion.document_id, READABLE, "those of documents they see"),
            manage=_of(DocumentVersion.document_id, EDITABLE, "those of documents they may edit"),
        ),
    )
)

DOCUMENT_SHARES = REGISTRY.add(
    ResourceSpec(
        name="DocumentShare",
        plural="DocumentShares",
        model=DocumentShare,
        message=pb.DocumentShare,
        singular_field="document_share",
        references={"document_id": "Document", "user_id": "User", "shared_by_id": "User"},
        orderable=("create_time", "update_time", "user_id"),
        read_only=True,
        access=Access(
            read=_of(DocumentShare.document_id, READABLE, "those of documents they see"),
            manage=_of(DocumentShare.document_id, OWNED, "those of their own documents"),
        ),
    )
)


# ---------------------------------------------------------------- custom methods


@dataclass(frozen=True)
class _Page:
    """A List request of the engine's (reads.list_page) for the rows of one document."""

    filter: str
    order_by: str
    page_size: int
    page_token: str
    count_only: bool = False


def _visible_document(session: Session, raw_id: str) -> Document:
    """The document, if the caller may see it (its owner and admins: even soft-deleted, as its
    versions and shares are theirs to see); PERMISSION_DENIED or NOT_FOUND as a Get answers."""
    return reads.fetch(session, DOCUMENTS, raw_id, show_deleted=True, field_path="document_id")


def _document_rows(
    session: Session, spec: ResourceSpec, request: Any, order_by: str, call: Call, max_bytes: int, count_limit: int
) -> tuple[list[Any], str, int]:
    """One keyset page of a document's versions or shares, under their own read rule; a page
    token is tied to its document."""
    document = _visible_document(session, request.document_id)
    page = _Page(f'document_id = "{document.id}"', order_by, request.page_size, request.page_token, request.count_only)
    return reads.list_page(session, spec, page, call, max_bytes, count_limit)


def list_document_versions(
    session: Session, request: pb.ListDocumentVersionsRequest, call: Call, max_bytes: int, count_limit: int = reads.DEFAULT_COUNT_LIMIT
) -> pb.ListDocumentVersionsResponse:
    """The document's earlier states, oldest first."""
    items, token, total = _document_rows(session, DOCUMENT_VERSIONS, request, "version", call, max_bytes, count_limit)
    return pb.ListDocumentVersionsResponse(document_versions=items, next_page_token=token, total_size=total)


def list_document_shares(
    session: Session, request: pb.ListDocumentSharesRequest, call: Call, max_bytes: int, count_limit: int = reads.DEFAULT_COUNT_LIMIT
) -> pb.ListDocumentSharesResponse:
    """The document's shares, by user id."""
    items, token, total = _document_rows(session, DOCUMENT_SHARES, request, "user_id", call, max_bytes, count_limit)
    return pb.ListDocumentSharesResponse(document_shares=items, next_page_token=token, total_size=total)


def _version_row(session: Session, document_id: str, number: int) -> DocumentVersion:
    """The version `number` of a document the caller sees; NOT_FOUND naming it when the document
    never had that version number in its history (the current version is the document itself)."""
    if number <= 0:
        raise errors.InvalidArgument.field("version", "must be a version number, 1 or more", reason="INVALID_FIELD")
    document = _visible_document(session, document_id)
    stmt = select(DocumentVersion).where(DocumentVersion.document_id == document.id, DocumentVersion.version == number)
    allowed = predicate(DOCUMENT_VERSIONS, write=False)
    if allowed is not None:
        stmt = stmt.where(allowed)
    found = session.scalars(stmt).one_or_none()
    if found is None:
        raise errors.NotFound.resource("DocumentVersion", f"{document.id}@{number}", "version")
    return found


def get_document_version(session: Session, request: pb.GetDocumentVersionRequest) -> pb.DocumentVersion:
    return DOCUMENT_VERSIONS.to_proto(_version_row(session, request.document_id, request.version))


def restore_document_version(session: Session, request: pb.RestoreDocumentVersionRequest, call: Call) -> pb.Document:
    """The document takes the title, content and kind of one of its versions, by a standard
    Update (the caller must be allowed to edit it; the etag, when sent, must be current): so the
    state it leaves is kept as a version too and its version number moves on."""
    kept = _version_row(session, request.document_id, request.version)
    document = pb.Document(id=request.document_id, title=kept.title, etag=request.etag)
    DOCUMENTS.codecs["kind"].dump(kept, document)
    DOCUMENTS.codecs["content"].dump(kept, document)
    update = pb.UpdateDocumentRequest(document=document, update_mask=field_mask_pb2.FieldMask(paths=["title", "content", "kind"]))
    return writes.update(session, DOCUMENTS, update, call)


def _shared_document(session: Session, raw_id: str) -> Document:
    """The live document, locked, if the caller may share it: its owner (the documents' delete
    rule) and admins; PERMISSION_DENIED otherwise, also to those it is shared with."""
    return reads.fetch(session, DOCUMENTS, raw_id, field_path="document_id", lock=True, deleting=True)


def _share_of(session: Session, document_id: uuid.UUID, user_id: uuid.UUID) -> DocumentShare | None:
    stmt = select(DocumentShare).where(DocumentShare.document_id == document_id, DocumentShare.user_id == user_id)
    if session.get_bind().dialect.name == "postgresql":
        stmt = stmt.with_for_update()
    return session.scalars(stmt).one_or_none()


def share_document(session: Session, request: pb.ShareDocumentRequest, call: Call) -> pb.DocumentShare:
    """The document shared with the user at the level: a new share, or the level of the one
    there changed (a share of the same level is answered as it is, unchanged)."""
    level = DOCUMENT_SHARES.codecs["level"].load(request)["level"]
    if level is None:
        raise errors.InvalidArgument.field("level", "is required: VIEW, COMMENT or EDIT", reason="REQUIRED_FIELD")
    document = _shared_document(session, request.document_id)
    user = reads.fetch(session, REGISTRY["User"], request.user_id, field_path="user_id")
    if user.id == document.owner_id:
        raise errors.FailedPrecondition(
            f"user {request.user_id!r} owns document {request.document_id!r}: an owner needs no share",
            reason="SHARE_WITH_OWNER",
            metadata={"field": "user_id", "resource_type": "Document", "resource_id": str(document.id)},
        )
    share = _share_of(session, document.id, user.id)
    if share is None:
        share = DocumentShare(id=uuid7(), document_id=document.id, user_id=user.id, level=level, shared_by_id=call.actor_user_id)
        try:
            with session.begin_nested():  # a concurrent share of the same pair wins: change its level
                session.add(share)
                changes.flush(session)
            return DOCUMENT_SHARES.to_proto(share)
        except IntegrityError:
            share = _share_of(session, document.id, user.id)
            if share is None:
                raise
    if share.level != level:
        share.level, share.shared_by_id, share.update_time = level, call.actor_user_id, utcnow()
        changes.flush(session)
    return DOCUMENT_SHARES.to_proto(share)


def unshare_document(session: Session, request: pb.UnshareDocumentRequest) -> empty_pb2.Empty:
    """The user's share of the document ends. Idempotent, as RemoveProjectMember and
    RemoveChannelMember are: a retry after a lost answer succeeds, and a user without a share
    already has what was asked."""
    document = _shared_document(session, request.document_id)
    share = _share_of(session, document.id, parse_uuid(request.user_id, "user_id"))
    if share is not None:
        session.delete(share)
        changes.flush(session)
    return empty_pb2.Empty()
