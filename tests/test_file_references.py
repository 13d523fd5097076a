"""Files named by other rows: an email's attachments and a chat message's attachment file_id
are checked by the engine (ResourceSpec.list_references) on every write that sets them. The
writer must see each File (a stranger's private file and a missing id answer alike,
PERMISSION_DENIED, so the check is no existence oracle; an admin sees every file, so NOT_FOUND);
a deleted file is NOT_FOUND; the error names the item, and a refused write changes nothing."""
from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.files.v1 import files_pb2 as fpb
from nexus.mail.v1 import mail_pb2 as mpb

from tests.conftest import Client, unique
from tests.support import expect_error, mask, new_channel, new_file
from tests.test_access import Actor, actor  # noqa: F401 - the fixture

Code = grpc.StatusCode


def _email(c: Client, subject: str, attachments: list[str]) -> mpb.Email:
    return c.mail.CreateEmail(mpb.CreateEmailRequest(email=mpb.Email(subject=subject, to=["ann@example.com"], attachments=attachments)))


def _emails(c: Client, subject: str) -> int:
    return len(c.mail.ListEmails(mpb.ListEmailsRequest(filter=f'subject = "{subject}"')).emails)


def test_an_email_attaches_files_its_sender_sees(actor: Callable[..., Actor]) -> None:
    sender, other = actor(), actor()
    own = new_file(sender.c)
    public = new_file(other.c, is_public=True)
    email = _email(sender.c, unique("files"), [own.id.upper(), public.id])
    assert list(email.attachments) == [own.id, public.id], "kept in canonical form"
    assert sender.c.mail.GetEmail(mpb.GetEmailRequest(id=email.id)).attachments == email.attachments


def test_an_email_cannot_attach_a_file_its_sender_does_not_see(client: Client, actor: Callable[..., Actor]) -> None:
    sender, stranger = actor(), actor()
    own, hidden = new_file(sender.c), new_file(stranger.c)
    missing = str(uuid.uuid4())
    for bad in (hidden.id, missing):  # hidden and absent answer alike
        subject = unique("leak")
        err = expect_error(Code.PERMISSION_DENIED, _email, sender.c, subject, [own.id, bad])
        assert err.info.reason == "REFERENCE_ACCESS_DENIED"
        assert (err.info.metadata["field"], err.info.metadata["resource_type"]) == ("email.attachments[1]", "File")
        assert _emails(client, subject) == 0
    subject = unique("admin")
    err = expect_error(Code.NOT_FOUND, _email, client, subject, [hidden.id, missing])
    assert err.resource is not None and (err.resource.resource_type, err.resource.resource_name) == ("File", missing)
    assert err.info.metadata["field"] == "email.attachments[1]"
    assert _emails(client, subject) == 0
    err = expect_error(Code.INVALID_ARGUMENT, _email, sender.c, unique("bad"), [own.id, "not-a-file-id"])
    assert [v.field for v in err.violations] == ["email.attachments[1]"]


def test_a_deleted_file_is_no_attachment(actor: Callable[..., Actor]) -> None:
    sender = actor()
    gone = new_file(sender.c)
    sender.c.files.DeleteFile(fpb.DeleteFileRequest(id=gone.id))
    err = expect_error(Code.NOT_FOUND, _email, sender.c, unique("gone"), [gone.id])
    assert err.info.metadata["field"] == "email.attachments[0]"


def test_an_update_of_the_attachments_is_checked_too(actor: Callable[..., Actor]) -> None:
    sender, stranger = actor(), actor()
    own, hidden = new_file(sender.c), new_file(stranger.c)
    draft = _email(sender.c, unique("draft"), [own.id])
    update = mpb.UpdateEmailRequest(email=mpb.Email(id=draft.id, attachments=[own.id, hidden.id]), update_mask=mask("attachments"))
    err = expect_error(Code.PERMISSION_DENIED, sender.c.mail.UpdateEmail, update)
    assert err.info.metadata["field"] == "email.attachments[1]"
    assert sender.c.mail.GetEmail(mpb.GetEmailRequest(id=draft.id)) == draft
    other = new_file(sender.c)
    update = mpb.UpdateEmailRequest(email=mpb.Email(id=draft.id, attachments=[other.id]), update_mask=mask("attachments"))
    assert list(sender.c.mail.UpdateEmail(update).attachments) == [other.id]


def _message(c: Client, channel: cpb.Channel, *attachments: cpb.Attachment) -> cpb.ChatMessage:
    message = cpb.ChatMessage(channel_id=channel.id, content=unique("with files"), attachments=attachments)
    return c.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=message))


def test_a_chat_attachment_names_a_file_its_author_sees(actor: Callable[..., Actor]) -> None:
    author, stranger = actor(), actor()
    channel = new_channel(author.c)
    own, hidden = new_file(author.c), new_file(stranger.c)
    by_url = cpb.Attachment(name="logo.png", url="https://example.com/logo.png", mime_type="image/png")
    made = _message(author.c, channel, by_url, cpb.Attachment(name=own.name, file_id=own.id.upper(), size_bytes=own.size_bytes))
    assert [a.file_id for a in made.attachments] == ["", own.id]
    err = expect_error(Code.PERMISSION_DENIED, _message, author.c, channel, by_url, cpb.Attachment(name="x", file_id=hidden.id))
    assert (err.info.reason, err.info.metadata["field"]) == ("REFERENCE_ACCESS_DENIED", "chat_message.attachments[1].file_id")
    err = expect_error(Code.INVALID_ARGUMENT, _message, author.c, channel, cpb.Attachment(name="x", file_id="nope"))
    assert [v.field for v in err.violations] == ["chat_message.attachments[0].file_id"]
    listed = author.c.chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=f'channel_id = "{channel.id}"')).chat_messages
    assert [m.id for m in listed] == [made.id], "refused messages were not written"


def test_recipients_by_user_id_are_users_that_exist(actor: Callable[..., Actor]) -> None:
    sender, ann = actor(), actor()
    subject, missing = unique("to users"), str(uuid.uuid4())
    request = mpb.CreateEmailRequest(email=mpb.Email(subject=subject, to_user_ids=[ann.id.upper()], cc_user_ids=[missing]))
    err = expect_error(Code.NOT_FOUND, sender.c.mail.CreateEmail, request)
    assert err.info.metadata["field"] == "email.cc_user_ids[0]"
    assert err.resource is not None and (err.resource.resource_type, err.resource.resource_name) == ("User", missing)
    err = expect_error(Code.INVALID_ARGUMENT, sender.c.mail.CreateEmail, mpb.CreateEmailRequest(email=mpb.Email(subject=subject, bcc_user_ids=["ann"])))
    assert [v.field for v in err.violations] == ["email.bcc_user_ids[0]"]
    assert _emails(sender.c, subject) == 0
    made = sender.c.mail.CreateEmail(mpb.CreateEmailRequest(email=mpb.Email(subject=subject, to_user_ids=[ann.id.upper()])))
    assert list(made.to_user_ids) == [ann.id], "kept in canonical form, which the recipients' read rule matches"
    sender.c.mail.SendEmail(mpb.SendEmailRequest(id=made.id))
    assert ann.c.mail.GetEmail(mpb.GetEmailRequest(id=made.id)).subject == subject
