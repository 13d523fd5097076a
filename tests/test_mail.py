"""MailService emails: drafts sent by SendEmail (then immutable), received emails only from
admins, threads in order, search over subject and body, and the bcc lists shown to the sender
(and admins) alone on every way to an email; strangers see nothing.

The standard methods of Email are covered by the registry-driven suites
(tests/test_standard_methods.py, test_access_matrix.py, ...) through its sample."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from nexus.mail.v1 import mail_pb2 as mpb

from tests.conftest import Client, unique
from tests.support import expect_error, mask
from tests.test_access import Actor, actor  # noqa: F401 - the fixture

Code = grpc.StatusCode
DRAFT, SENT, RECEIVED = mpb.EMAIL_STATUS_DRAFT, mpb.EMAIL_STATUS_SENT, mpb.EMAIL_STATUS_RECEIVED


def _create(c: Client, subject: str, request_id: str = "", **fields: Any) -> mpb.Email:
    return c.mail.CreateEmail(mpb.CreateEmailRequest(email=mpb.Email(subject=subject, **fields), request_id=request_id))


def _send(c: Client, email_id: str) -> mpb.Email:
    return c.mail.SendEmail(mpb.SendEmailRequest(id=email_id))


def _get(c: Client, email_id: str) -> mpb.Email:
    return c.mail.GetEmail(mpb.GetEmailRequest(id=email_id))


def _list(c: Client, filter: str, order_by: str = "") -> list[mpb.Email]:
    return list(c.mail.ListEmails(mpb.ListEmailsRequest(filter=filter, order_by=order_by, page_size=100)).emails)


def _search(c: Client, query: str) -> list[mpb.Email]:
    return [r.email for r in c.mail.SearchEmails(mpb.SearchEmailsRequest(query=query, page_size=100)).results]


def test_send_moves_a_draft_to_sent_with_its_time_and_only_once(actor: Callable[..., Actor]) -> None:
    sender = actor()
    draft = _create(sender.c, "Lunch", to=["ann@example.com"], body="At noon?")
    assert (draft.status, draft.sender_id, draft.HasField("sent_time")) == (DRAFT, sender.id, False)
    sent = _send(sender.c, draft.id)
    assert sent.status == SENT and sent.HasField("sent_time")
    assert sent.sent_time.ToDatetime() >= draft.create_time.ToDatetime()
    err = expect_error(Code.FAILED_PRECONDITION, _send, sender.c, draft.id)
    assert err.info.reason == "EMAIL_NOT_DRAFT"
    assert _get(sender.c, draft.id) == sent, "a refused send changes nothing"


def test_a_draft_without_recipient_is_not_sent(actor: Callable[..., Actor]) -> None:
    sender = actor()
    draft = _create(sender.c, "Nobody")
    err = expect_error(Code.FAILED_PRECONDITION, _send, sender.c, draft.id)
    assert err.info.reason == "EMAIL_WITHOUT_RECIPIENT" and err.info.metadata["field"] == "to"
    assert _get(sender.c, draft.id).status == DRAFT


def test_a_sent_or_received_email_refuses_updates(client: Client, actor: Callable[..., Actor]) -> None:
    sender = actor()
    sent = _send(sender.c, _create(sender.c, "Final", to=["ann@example.com"]).id)
    update = mpb.UpdateEmailRequest(email=mpb.Email(id=sent.id, subject="Changed"), update_mask=mask("subject"))
    err = expect_error(Code.FAILED_PRECONDITION, sender.c.mail.UpdateEmail, update)
    assert err.info.reason == "EMAIL_NOT_DRAFT"
    received = _create(client, "Inbound", status=RECEIVED, to_user_ids=[sender.id])
    err = expect_error(Code.FAILED_PRECONDITION, client.mail.UpdateEmail, update.__class__(email=mpb.Email(id=received.id, subject="x"), update_mask=mask("subject")))
    assert err.info.reason == "EMAIL_NOT_DRAFT"
    assert _get(sender.c, sent.id) == sent
    changed = sender.c.mail.UpdateEmail(mpb.UpdateEmailRequest(email=mpb.Email(id=_create(sender.c, "Draft").id, subject="Still a draft"), update_mask=mask("subject")))
    assert changed.subject == "Still a draft", "a draft changes"


def test_received_emails_are_made_by_admins_only(client: Client, actor: Callable[..., Actor]) -> None:
    user = actor()
    subject = unique("inbound")
    err = expect_error(Code.PERMISSION_DENIED, _create, user.c, subject, status=RECEIVED, to_user_ids=[user.id])
    assert err.info.reason == "RECEIVED_EMAIL_ADMIN_ONLY"
    assert _list(client, f'subject = "{subject}"') == [], "a refused create leaves no row"
    expect_error(Code.INVALID_ARGUMENT, _create, client, subject, status=SENT)
    received = _create(client, subject, status=RECEIVED, to_user_ids=[user.id])
    assert received.status == RECEIVED
    assert _get(user.c, received.id).subject == subject, "its recipient sees it"


def test_a_thread_lists_in_order_and_a_new_email_starts_its_own(actor: Callable[..., Actor]) -> None:
    ann, bob = actor(), actor()
    first = _send(ann.c, _create(ann.c, "Plan", to_user_ids=[bob.id]).id)
    other = _create(ann.c, "Unrelated")
    assert first.thread_id and other.thread_id and first.thread_id != other.thread_id
    reply = _send(bob.c, _create(bob.c, "Re: Plan", thread_id=first.thread_id, to_user_ids=[ann.id]).id)
    again = _send(ann.c, _create(ann.c, "Re: Re: Plan", thread_id=first.thread_id, to_user_ids=[bob.id]).id)
    thread = f'thread_id = "{first.thread_id}"'
    for who in (ann, bob):
        assert [e.id for e in _list(who.c, thread)] == [first.id, reply.id, again.id]
        assert [e.id for e in _list(who.c, thread, "sent_time")] == [first.id, reply.id, again.id]
        assert [e.id for e in _list(who.c, thread, "sent_time desc")] == [again.id, reply.id, first.id]


def test_search_finds_subject_before_body(actor: Callable[..., Actor]) -> None:
    sender = actor()
    word = unique("w")
    in_body = _create(sender.c, "Weekly", body=f"the {word} figures are attached")
    in_subject = _create(sender.c, f"{word} figures", body="see attached")
    _create(sender.c, "Other", body="nothing here")
    assert [e.id for e in _search(sender.c, word)] == [in_subject.id, in_body.id]


def test_bcc_is_the_senders_alone_on_every_way_to_the_email(client: Client, actor: Callable[..., Actor]) -> None:
    sender, to, cc, bcc = actor(), actor(), actor(), actor()
    word = unique("w")
    made = _create(
        sender.c, f"{word} secret plans", request_id=unique("r"), body="for your eyes",
        to=["to@example.com"], cc=["cc@example.com"], bcc=["hidden@example.com"],
        to_user_ids=[to.id], cc_user_ids=[cc.id], bcc_user_ids=[bcc.id],
    )
    assert list(made.bcc) == ["hidden@example.com"] and list(made.bcc_user_ids) == [bcc.id]
    sent = _send(sender.c, made.id)
    by_subject = f'subject = "{word} secret plans"'

    def every_way(c: Client) -> list[mpb.Email]:
        return [
            _get(c, sent.id),
            *_list(c, by_subject),
            *_search(c, word),
            *c.mail.BatchGetEmails(mpb.BatchGetEmailsRequest(ids=[sent.id])).emails,
        ]

    for c in (sender.c, client):
        seen = every_way(c)
        assert len(seen) == 4 and all(list(e.bcc_user_ids) == [bcc.id] and list(e.bcc) == ["hidden@example.com"] for e in seen)
    for who in (to, cc, bcc):
        seen = every_way(who.c)
        assert len(seen) == 4, "every recipient sees the email"
        assert all(not e.bcc and not e.bcc_user_ids and list(e.to) == ["to@example.com"] and list(e.cc_user_ids) == [cc.id] for e in seen)
        masked = who.c.mail.GetEmail(mpb.GetEmailRequest(id=sent.id, read_mask=mask("bcc", "bcc_user_ids", "subject")))
        assert masked.subject and not masked.bcc and not masked.bcc_user_ids, "a read mask does not bring bcc back"
    # A filter on bcc would tell a recipient who else was blind-copied: nobody filters on it.
    for c in (to.c, sender.c):
        for oracle in (f'bcc_user_ids:"{bcc.id}"', 'bcc:"hidden@example.com"'):
            expect_error(Code.INVALID_ARGUMENT, _list, c, f"{by_subject} AND {oracle}")
            expect_error(Code.INVALID_ARGUMENT, c.mail.SearchEmails, mpb.SearchEmailsRequest(query=word, filter=oracle))
        expect_error(Code.INVALID_ARGUMENT, _list, c, by_subject, "bcc")


def test_a_replayed_create_answers_each_caller_as_a_get_would(client: Client, actor: Callable[..., Actor]) -> None:
    sender, bcc = actor(), actor()
    request_id = unique("r")
    made = _create(client, "Replay", request_id=request_id, sender_id=sender.id, bcc=["b@example.com"], bcc_user_ids=[bcc.id], status=RECEIVED)
    again = _create(client, "Replay", request_id=request_id, sender_id=sender.id, bcc=["b@example.com"], bcc_user_ids=[bcc.id], status=RECEIVED)
    assert again == made and list(again.bcc_user_ids) == [bcc.id]
    assert not _get(bcc.c, made.id).bcc_user_ids


def test_strangers_see_nothing_and_drafts_are_the_senders(actor: Callable[..., Actor]) -> None:
    sender, to, stranger = actor(), actor(), actor()
    word = unique("w")
    draft = _create(sender.c, f"{word} draft", to_user_ids=[to.id])
    for who in (to, stranger):
        err = expect_error(Code.PERMISSION_DENIED, _get, who.c, draft.id)
        assert err.resource is not None or err.info.reason
        assert _list(who.c, f'subject = "{word} draft"') == [] and _search(who.c, word) == []
    sent = _send(sender.c, draft.id)
    assert _get(to.c, sent.id).id == sent.id
    expect_error(Code.PERMISSION_DENIED, _get, stranger.c, sent.id)
    expect_error(Code.PERMISSION_DENIED, stranger.c.mail.BatchGetEmails, mpb.BatchGetEmailsRequest(ids=[sent.id]))
    assert _list(stranger.c, f'thread_id = "{sent.thread_id}"') == [] and _search(stranger.c, word) == []
    # A recipient reads, never changes or deletes.
    expect_error(Code.PERMISSION_DENIED, to.c.mail.DeleteEmail, mpb.DeleteEmailRequest(id=sent.id))


def test_recipients_and_attachments_are_checked(actor: Callable[..., Actor]) -> None:
    sender = actor()
    for fields, path in (
        ({"to": ["not an address"]}, "email.to[0]"),
        ({"cc": ["ok@example.com", "nobody"]}, "email.cc[1]"),
        ({"to_user_ids": ["42"]}, "email.to_user_ids[0]"),
        ({"attachments": ["file.pdf"]}, "email.attachments[0]"),
        ({"bcc": [f"a{i}@example.com" for i in range(101)]}, "email.bcc"),
    ):
        err = expect_error(Code.INVALID_ARGUMENT, _create, sender.c, "Checked", **fields)
        assert [v.field for v in err.violations] == [path], fields
