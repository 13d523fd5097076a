"""Conversations without a user (user_id unset: a system's or an anonymous visitor's).

Only admins make them (a caller with the admin role that acts for no user: leaving user_id
unset otherwise makes the caller's own), and only admins see and change them and their
messages, on every way to a row: Get, List, Search, a replayed request id, StreamEvents (by id
and by resume token, and an open stream once its caller is no longer an admin), and the
conversation's messages with their List and Search. A NULL owner is nobody's, never everyone's.
(Conversations have no BatchGet, and the Watch methods follow AI jobs, not conversations.)
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.identity.v1 import identity_pb2 as ipb

from tests.conftest import Client, connect, unique
from tests.support import expect_error, mask, new_user, rich_error
from tests.test_stream_access import ends_after_change, live
from tests.test_streams import EventReader, contents, say

Code = grpc.StatusCode

# label: (key role, the role of the user it acts for, or None for a key without a user)
OTHERS = {
    "user": (ipb.USER_ROLE_USER, ipb.USER_ROLE_USER),
    "manager": (ipb.USER_ROLE_MANAGER, ipb.USER_ROLE_MANAGER),
    "guest": (ipb.USER_ROLE_GUEST, ipb.USER_ROLE_GUEST),
    "key without a user (user)": (ipb.USER_ROLE_USER, None),
    "key without a user (manager)": (ipb.USER_ROLE_MANAGER, None),
    "key without a user (guest)": (ipb.USER_ROLE_GUEST, None),
}


def key_client(client: Client, role: int, user_role: int | None) -> tuple[ipb.ApiKey, ipb.User | None, Client]:
    user = new_user(client, role=user_role) if user_role is not None else None
    key = client.identity.CreateApiKey(
        ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=role, user_id=user.id if user else ""))
    )
    return key, user, connect(client.backend, client.database_url, client.server, secret=key.secret)


@pytest.fixture(scope="module")
def others(client: Client) -> Iterator[dict[str, Client]]:
    made = {label: key_client(client, role, user_role)[2] for label, (role, user_role) in OTHERS.items()}
    yield made
    for c in made.values():
        c.channel.close()


@pytest.fixture(scope="module")
def ownerless(client: Client) -> tuple[str, cpb.Conversation, cpb.ConversationMessage]:
    """(its word, an ownerless conversation, a message in it), made by the admin key (no user)."""
    word = unique("nobody")
    conversation = client.chat.CreateConversation(cpb.CreateConversationRequest(conversation=cpb.Conversation(title=f"{word} chat")))
    message = say(client.chat, conversation, f"{word} asks")
    return word, conversation, message


def test_an_admin_without_a_user_makes_one_and_finds_it(client: Client, ownerless: Any) -> None:
    word, conversation, message = ownerless
    assert conversation.user_id == "" and conversation.status == cpb.CONVERSATION_STATUS_ACTIVE
    assert client.chat.GetConversation(cpb.GetConversationRequest(id=conversation.id)) == conversation
    found = client.chat.ListConversations(cpb.ListConversationsRequest(filter=f'user_id = null AND title = "{word} chat"'))
    assert [c.id for c in found.conversations] == [conversation.id] and found.total_size == 1
    hits = client.chat.SearchConversations(cpb.SearchConversationsRequest(query=word))
    assert [h.conversation.id for h in hits.results] == [conversation.id]
    listed = client.chat.ListConversationMessages(cpb.ListConversationMessagesRequest(filter=f'conversation_id = "{conversation.id}"'))
    assert [m.id for m in listed.conversation_messages] == [message.id]
    # It stays without a user: user_id is immutable.
    err = expect_error(
        Code.INVALID_ARGUMENT, client.chat.UpdateConversation,
        cpb.UpdateConversationRequest(conversation=cpb.Conversation(id=conversation.id, user_id=new_user(client).id), update_mask=mask("user_id")),
    )
    assert err.violations[0].field == "update_mask" and "user_id" in err.message, err.message


def test_an_admin_acting_for_a_user_makes_its_own_and_sees_the_ownerless_ones(client: Client, ownerless: Any) -> None:
    word, conversation, message = ownerless
    _, user, c = key_client(client, ipb.USER_ROLE_ADMIN, ipb.USER_ROLE_ADMIN)
    try:
        assert user is not None
        made = c.chat.CreateConversation(cpb.CreateConversationRequest(conversation=cpb.Conversation(title=unique("c"))))
        assert made.user_id == user.id  # unset user_id is the caller's own
        assert c.chat.GetConversation(cpb.GetConversationRequest(id=conversation.id)).id == conversation.id
        assert c.chat.GetConversationMessage(cpb.GetConversationMessageRequest(id=message.id)).id == message.id
    finally:
        c.channel.close()


@pytest.mark.parametrize("label", ["user", "manager", "key without a user (user)", "key without a user (manager)"])
def test_nobody_else_makes_one(client: Client, others: dict[str, Client], label: str) -> None:
    c = others[label]
    title = unique("refused")
    if OTHERS[label][1] is not None:
        # A caller with a user owns what it makes: never an ownerless one.
        made = c.chat.CreateConversation(cpb.CreateConversationRequest(conversation=cpb.Conversation(title=title)))
        assert made.user_id != ""
        return
    err = expect_error(Code.PERMISSION_DENIED, c.chat.CreateConversation, cpb.CreateConversationRequest(conversation=cpb.Conversation(title=title)))
    assert err.info.reason == "NO_USER_TO_OWN" and err.info.metadata["field"] == "conversation.user_id", err.message
    left = client.chat.ListConversations(cpb.ListConversationsRequest(filter=f'title = "{title}"'))
    assert left.total_size == 0


def test_a_guest_makes_none(others: dict[str, Client]) -> None:
    for label in ("guest", "key without a user (guest)"):
        err = expect_error(Code.PERMISSION_DENIED, others[label].chat.CreateConversation, cpb.CreateConversationRequest(conversation=cpb.Conversation(title="x")))
        assert err.info.reason == "ROLE_FORBIDS_METHOD", (label, err.message)


@pytest.mark.parametrize("label", list(OTHERS))
def test_nobody_else_sees_or_changes_one_or_its_messages(others: dict[str, Client], ownerless: Any, label: str) -> None:
    word, conversation, message = ownerless
    chat = others[label].chat

    def denied(method: Any, request: Any) -> None:
        err = expect_error(Code.PERMISSION_DENIED, method, request)
        assert err.info.reason in ("ROW_ACCESS_DENIED", "REFERENCE_ACCESS_DENIED", "ROLE_FORBIDS_METHOD"), (label, err.info.reason)

    # The conversation: Get, List (by title, among those without a user, and all), Search.
    denied(chat.GetConversation, cpb.GetConversationRequest(id=conversation.id))
    for flt in (f'title = "{word} chat"', "user_id = null", f'id = "{conversation.id}"', ""):
        page = chat.ListConversations(cpb.ListConversationsRequest(filter=flt, page_size=1000))
        assert conversation.id not in [c.id for c in page.conversations], (label, flt)
        if flt != "":
            assert page.total_size == 0, (label, flt)
    assert chat.SearchConversations(cpb.SearchConversationsRequest(query=word)).total_size == 0
    # Its messages: Get, List (by conversation, and all), Search.
    denied(chat.GetConversationMessage, cpb.GetConversationMessageRequest(id=message.id))
    for flt in (f'conversation_id = "{conversation.id}"', ""):
        page = chat.ListConversationMessages(cpb.ListConversationMessagesRequest(filter=flt, page_size=1000))
        assert message.id not in [m.id for m in page.conversation_messages], (label, flt)
    assert chat.SearchConversationMessages(cpb.SearchConversationMessagesRequest(query=word)).total_size == 0
    # No change of it or of its messages, and no message into it.
    denied(chat.UpdateConversation, cpb.UpdateConversationRequest(conversation=cpb.Conversation(id=conversation.id, title="mine now"), update_mask=mask("title")))
    denied(chat.ArchiveConversation, cpb.ArchiveConversationRequest(id=conversation.id))
    denied(chat.DeleteConversation, cpb.DeleteConversationRequest(id=conversation.id))
    denied(chat.CreateConversationMessage, cpb.CreateConversationMessageRequest(
        conversation_message=cpb.ConversationMessage(conversation_id=conversation.id, sender_type=cpb.SENDER_TYPE_USER, content="hi")))
    denied(chat.UpdateConversationMessage, cpb.UpdateConversationMessageRequest(
        conversation_message=cpb.ConversationMessage(id=message.id, content="changed"), update_mask=mask("content")))
    denied(chat.DeleteConversationMessage, cpb.DeleteConversationMessageRequest(id=message.id))


def _stream_error(c: Client, request: cpb.StreamEventsRequest) -> Any:
    call = c.chat.StreamEvents(request, timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        next(iter(call))
    return rich_error(caught.value)


@pytest.mark.parametrize("label", list(OTHERS))
def test_nobody_else_follows_its_stream(client: Client, others: dict[str, Client], ownerless: Any, label: str) -> None:
    _, conversation, _ = ownerless
    err = _stream_error(others[label], cpb.StreamEventsRequest(conversation_ids=[conversation.id]))
    assert err.code == Code.PERMISSION_DENIED and err.info.reason in ("ROW_ACCESS_DENIED", "ROLE_FORBIDS_METHOD"), (label, err.message)


def test_a_resume_token_of_its_stream_is_refused_to_others(client: Client, others: dict[str, Client], ownerless: Any) -> None:
    """An admin's resume token names the ownerless conversation's scope: presented by anyone
    else, it is checked as the id would be."""
    _, conversation, _ = ownerless
    reader = EventReader(client.chat, cpb.StreamEventsRequest(conversation_ids=[conversation.id]))
    try:
        live(reader, client, conversation=conversation)
        say(client.chat, conversation, "for admins")
        (event,) = reader.take(1)
        assert contents([event]) == ["for admins"] and event.resume_token
    finally:
        reader.cancel()
    for label in ("user", "key without a user (user)", "key without a user (manager)"):
        err = _stream_error(others[label], cpb.StreamEventsRequest(resume_token=event.resume_token))
        assert err.code == Code.PERMISSION_DENIED and err.info.reason == "ROW_ACCESS_DENIED", (label, err.message)


def test_an_open_stream_ends_when_its_caller_is_no_admin_any_more(client: Client) -> None:
    conversation = client.chat.CreateConversation(cpb.CreateConversationRequest(conversation=cpb.Conversation(title=unique("c"))))
    _, user, c = key_client(client, ipb.USER_ROLE_ADMIN, ipb.USER_ROLE_ADMIN)
    try:
        assert user is not None
        reader = EventReader(c.chat, cpb.StreamEventsRequest(conversation_ids=[conversation.id]))
        live(reader, client, conversation=conversation)
        ends_after_change(
            reader,
            lambda: client.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=user.id, role=ipb.USER_ROLE_USER), update_mask=mask("role"))),
            lambda: say(client.chat, conversation, "after"),
            Code.PERMISSION_DENIED,
            "ROW_ACCESS_DENIED",
        )
    finally:
        c.channel.close()


def test_a_replayed_request_id_answers_only_a_caller_that_still_sees_it(client: Client) -> None:
    """A request id is remembered per caller and answered as a Get: the key that made an
    ownerless conversation gets it again while it is an admin, and PERMISSION_DENIED once it is
    not; another caller sending the same id makes a request of its own."""
    key, _, c = key_client(client, ipb.USER_ROLE_ADMIN, None)
    request_id = "5b0c7a52-1f0e-4d7b-9a52-6c1f2f9e8d77"
    request = cpb.CreateConversationRequest(conversation=cpb.Conversation(title=unique("replayed")), request_id=request_id)
    try:
        first = c.chat.CreateConversation(request)
        assert first.user_id == ""
        assert c.chat.CreateConversation(request) == first
        # The same request id from others: never the admin's ownerless row.
        _, _, keyless = key_client(client, ipb.USER_ROLE_USER, None)
        err = expect_error(Code.PERMISSION_DENIED, keyless.chat.CreateConversation, request)
        assert err.info.reason == "NO_USER_TO_OWN"
        keyless.channel.close()
        _, user, owner = key_client(client, ipb.USER_ROLE_USER, ipb.USER_ROLE_USER)
        theirs = owner.chat.CreateConversation(request)
        assert user is not None and theirs.id != first.id and theirs.user_id == user.id
        owner.channel.close()
        # The key is no admin any more: its replay is refused as a Get of the row would be.
        client.identity.UpdateApiKey(ipb.UpdateApiKeyRequest(api_key=ipb.ApiKey(id=key.id, role=ipb.USER_ROLE_USER), update_mask=mask("role")))
        err = expect_error(Code.PERMISSION_DENIED, c.chat.CreateConversation, request)
        assert err.info.reason == "ROW_ACCESS_DENIED", err.message
    finally:
        c.channel.close()


def test_the_policy_table_says_who_sees_them(client: Client) -> None:
    from db.engine import rules
    from db.engine.resource import REGISTRY

    for role in ("guest", "user", "manager"):
        sees, manages = rules.describe(REGISTRY["Conversation"], role)
        assert "without a user: admins only" in sees, (role, sees)
