"""Mail domain: emails. A draft is its sender's alone, changed at will; SendEmail makes it SENT
(stamped, then never changed); RECEIVED emails come from outside, written by admins and the
system. Once no draft, an email is seen by the users it names as recipients (to, cc or bcc, by
user id); its bcc lists stay its sender's (and admins') alone (ResourceSpec.private_fields)."""
from __future__ import annotations

import uuid

from nexus.mail.v1 import mail_pb2 as pb
from sqlalchemy import ForeignKey, Index, String, Text, Uuid, and_, cast, false, or_
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from db import errors
from db.base import Base, ResourceMixin, SoftDeleteMixin, json_list, one_of, optional_timestamp, utcnow, uuid7
from db.domains.identity import User  # noqa: F401 - the users table the foreign key names
from db.engine import changes, reads
from db.engine.call import Call
from db.engine.codecs import SizeLimit
from db.engine.resource import REGISTRY, ListReference, ResourceSpec
from db.engine.rules import Access, Rule, mine
from db.engine.writes import check_etag

# ---------------------------------------------------------------- tables

EMAIL_STATUSES = ("draft", "sent", "received")
RECIPIENT_FIELDS = ("to", "cc", "bcc")
USER_ID_FIELDS = ("to_user_ids", "cc_user_ids", "bcc_user_ids")
# RFC 5321's longest usable address.
ADDRESS_CHARS = 254


class Email(ResourceMixin, SoftDeleteMixin, Base):
    __tablename__ = "emails"
    __table_args__ = (
        one_of("status", EMAIL_STATUSES),
        Index("ix_emails_create_time_id", "create_time", "id"),
        Index("ix_emails_sender_id", "sender_id"),
        Index("ix_emails_thread_id", "thread_id"),
    )

    # Cleared (the email left to admins) if the sender is deleted for good.
    sender_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))
    to: Mapped[json_list]
    cc: Mapped[json_list]
    bcc: Mapped[json_list]
    to_user_ids: Mapped[json_list]
    cc_user_ids: Mapped[json_list]
    bcc_user_ids: Mapped[json_list]
    subject: Mapped[str | None] = mapped_column(String(998))  # RFC 5322's longest line
    body: Mapped[str | None] = mapped_column(Text)
    thread_id: Mapped[uuid.UUID] = mapped_column(Uuid, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="draft")
    # Ids of Files its sender may see (checked by the engine: ListReference).
    attachments: Mapped[json_list]
    sent_time: Mapped[optional_timestamp]


# ---------------------------------------------------------------- row rules

def _addressed_to(user_id: uuid.UUID) -> ColumnElement[bool]:
    """The email names the user among its recipients (to, cc or bcc, by user id). The lists hold
    canonical UUID strings (the engine keeps list references so: writes.named_references), so the quoted id in the JSON text is an exact match of
    one item, in the same SQL on both databases (a rule is built without knowing the dialect)."""
    needle = f'"{user_id}"'
    return or_(*(cast(Email.__table__.c[name], Text).contains(needle) for name in USER_ID_FIELDS))


def _readable(user_id: uuid.UUID | None, role: str) -> ColumnElement[bool]:
    if user_id is None:
        return false()
    return or_(Email.sender_id == user_id, and_(Email.status != "draft", Email.delete_time.is_(None), _addressed_to(user_id)))


READABLE = Rule(_readable, "those they send, and live ones sent or received to them")
SENT_BY_THEM = mine(Email.sender_id, "those they send")


# ---------------------------------------------------------------- resources


def _check_email(session: Session, row: Email, changed: set[str], creating: bool, call: Call) -> None:
    """A draft's checks: only drafts change; only admins make received emails and none is made
    sent (SendEmail sends); a new email starts a thread unless it names one; addresses look like
    addresses (user and file ids are the engine's: list_references)."""
    if not creating and row.status != "draft":
        raise errors.FailedPrecondition(
            f"email {row.id} is {row.status}: only a draft may change",
            reason="EMAIL_NOT_DRAFT",
            metadata={"status": row.status},
            resource_type="Email",
            resource_name=str(row.id),
        )
    if creating:
        if row.status is None:
            row.status = "draft"
        if row.status == "sent":
            raise errors.InvalidArgument.field("email.status", "must be DRAFT or RECEIVED: SendEmail sends a draft")
        if row.status == "received" and call.role != "admin":
            raise errors.PermissionDenied(
                "only admins and the system create received emails",
                reason="RECEIVED_EMAIL_ADMIN_ONLY",
                metadata={"field": "email.status"},
            )
        if row.thread_id is None:
            row.thread_id = uuid7()
    for name in RECIPIENT_FIELDS:
        for i, address in enumerate(getattr(row, name) or ()):
            if "@" not in address.strip("@") or any(c.isspace() for c in address):
                raise errors.InvalidArgument.field(f"email.{name}[{i}]", "must be an email address (local@domain)")


EMAILS = REGISTRY.add(
    ResourceSpec(
        name="Email",
        plural="Emails",
        model=Email,
        message=pb.Email,
        singular_field="email",
        output_only=frozenset({"sent_time"}),
        required=frozenset({"subject"}),
        immutable=frozenset({"thread_id", "status"}),
        references={"sender_id": "User"},
        # Each checked by the engine: ids of users that exist, of files the sender sees.
        list_references={
            **{name: ListReference("User") for name in USER_ID_FIELDS},
            "attachments": ListReference("File"),
        },
        orderable=("create_time", "update_time", "sent_time", "subject"),
        search_fields=(("subject", "A"), ("body", "B")),
        batch_get=True,
        before_write=_check_email,
        owner_field="sender_id",
        private_fields=frozenset({"bcc", "bcc_user_ids"}),
        size_limits={
            **{name: SizeLimit(items=100, chars=ADDRESS_CHARS) for name in RECIPIENT_FIELDS},
            **{name: SizeLimit(items=100, chars=36) for name in (*USER_ID_FIELDS, "attachments")},
        },
        access=Access(read=READABLE, manage=SENT_BY_THEM, admin_only=frozenset({"sender_id"})),
    )
)


# ---------------------------------------------------------------- custom methods


def send_email(session: Session, request: pb.SendEmailRequest, call: Call) -> pb.Email:
    """The draft becomes SENT, stamped with its sent_time; it is never changed again. Only its
    sender (and admins) send it; it must name a recipient."""
    email: Email = reads.fetch(session, EMAILS, request.id, lock=True)
    check_etag(email, request.etag, "etag")
    if email.status != "draft":
        raise errors.FailedPrecondition(
            f"email {request.id} is {email.status}: only a draft is sent",
            reason="EMAIL_NOT_DRAFT",
            metadata={"status": email.status},
            resource_type="Email",
            resource_name=request.id,
        )
    if not any(getattr(email, name) for name in (*RECIPIENT_FIELDS, *USER_ID_FIELDS)):
        raise errors.FailedPrecondition(
            f"email {request.id} has no recipient: set to (or cc, bcc) first",
            reason="EMAIL_WITHOUT_RECIPIENT",
            metadata={"field": "to"},
            resource_type="Email",
            resource_name=request.id,
        )
    email.status, email.sent_time = "sent", utcnow()
    changes.flush(session)
    return EMAILS.to_proto(email)


