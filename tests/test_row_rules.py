"""Row rules on every way a row can be reached, on SQLite and on PostgreSQL.

A request id is its caller's own (a replay by another caller is a new request, and a replay by
the same caller passes the read rule of a Get); "mine" is never true for a caller without a
user (rows whose owner is NULL stay hidden from it); force delete, task creation, thread
parents and show_deleted follow the rows' owners.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc
import pytest
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.identity.v1 import identity_pb2 as ipb
from sqlalchemy.dialects import postgresql, sqlite

from db import policy
from tests.conftest import Client, connect, unique
from tests.support import expect_error
from tests.test_access import Actor, actor, chat_message, conversation_of, first_stream_item, new_key, private_channel  # noqa: F401

Code = grpc.StatusCode


def keyless_user(client: Client, role: int) -> Client:
    """A client calling with a key of `role` that acts for no user."""
    key = new_key(client, role=role)
    return connect(client.backend, client.database_url, client.server, secret=key.secret)


def add_member(client: Client, channel_id: str, user_id: str) -> None:
    client.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=channel_id, user_id=user_id))


def create_message(c: Client, channel_id: str, content: str, request_id: str) -> cpb.ChatMessage:
    return c.chat.CreateChatMessage(
        cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel_id, content=content), request_id=request_id)
    )


# ------------------------------------------------------------------ request ids belong to their caller


def test_another_callers_request_id_is_a_new_request_not_a_replay(client: Client, actor: Callable[..., Actor]) -> None:
    alice, mallory = actor(), actor()
    secret = private_channel(alice)
    request_id = str(uuid.uuid4())
    private = create_message(alice.c, secret.id, "the launch code is 0000", request_id)
    # Mallory learns the request id: sent into Alice's channel it is a new request Mallory may not make ...
    err = expect_error(Code.PERMISSION_DENIED, create_message, mallory.c, secret.id, "x", request_id)
    assert "launch code" not in err.message
    # ... and into Mallory's own channel it makes Mallory's message.
    public = mallory.c.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"open {unique()}")))
    own = create_message(mallory.c, public.id, "hello", request_id)
    assert own.id != private.id and own.content == "hello" and own.author_id == mallory.id
    # Alice's retry still answers her first result.
    assert create_message(alice.c, secret.id, "other text", request_id) == private


def test_request_id_replay_of_conversation_messages_and_api_keys_is_per_caller(client: Client, actor: Callable[..., Actor]) -> None:
    alice, mallory = actor(), actor()
    request_id = str(uuid.uuid4())
    theirs = conversation_of(alice.c, alice.id)
    mine = conversation_of(mallory.c, mallory.id)

    def say(c: Client, conversation_id: str, content: str) -> cpb.ConversationMessage:
        message = cpb.ConversationMessage(conversation_id=conversation_id, sender_type=cpb.SENDER_TYPE_USER, content=content)
        return c.chat.CreateConversationMessage(cpb.CreateConversationMessageRequest(conversation_message=message, request_id=request_id))

    secret = say(alice.c, theirs.id, "my diagnosis")
    answer = say(mallory.c, mine.id, "hi")
    assert answer.id != secret.id and answer.content == "hi"
    # An admin's key made with a request id; another caller's CreateApiKey with it makes its own key.
    admin_key = client.identity.CreateApiKey(
        ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("ops"), role=ipb.USER_ROLE_ADMIN), request_id=request_id)
    )
    own_key = mallory.c.identity.CreateApiKey(
        ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("mine")), request_id=request_id)
    )
    assert own_key.id != admin_key.id and own_key.user_id == mallory.id and own_key.secret


def test_replay_by_the_same_caller_passes_the_read_rule(client: Client, actor: Callable[..., Actor]) -> None:
    owner, member = actor(), actor()
    channel = private_channel(owner)
    add_member(client, channel.id, member.id)
    request_id = str(uuid.uuid4())
    first = create_message(member.c, channel.id, "while a member", request_id)
    assert create_message(member.c, channel.id, "while a member", request_id) == first
    client.chat.RemoveChannelMember(cpb.RemoveChannelMemberRequest(channel_id=channel.id, user_id=member.id))
    err = expect_error(Code.PERMISSION_DENIED, create_message, member.c, channel.id, "while a member", request_id)
    assert "while a member" not in err.message


# ------------------------------------------------------------------ a caller without a user owns nothing


@pytest.mark.parametrize("role", ["guest", "user", "manager"])
def test_no_row_rule_matches_null_owners_for_a_caller_without_a_user(role: str) -> None:
    """Every read and manage predicate of the policy table, for a caller without a user, as SQL:
    none compares an owner column with NULL (which would match rows whose owner is unset)."""
    for resource in policy.POLICY:
        for make in (policy.read_predicate, policy.manage_predicate):
            predicate = make(resource, role, None)
            if predicate is None:
                continue
            for dialect in (sqlite.dialect(), postgresql.dialect()):
                sql = str(predicate.compile(dialect=dialect, compile_kwargs={"literal_binds": True})).upper()
                assert "IS NULL" not in sql, f"{resource} {make.__name__} for a {role} without a user: {sql}"


def test_private_channel_without_a_creator_is_hidden_from_a_key_without_a_user(client: Client) -> None:
    # The bootstrap admin key acts for no user: its channel's creator is NULL.
    channel = client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"ops {unique()}", is_private=True)))
    assert not channel.creator_id
    message = chat_message(client, channel.id, "rotation schedule")
    for role in (ipb.USER_ROLE_GUEST, ipb.USER_ROLE_USER):
        guest = keyless_user(client, role)
        try:
            listed = guest.chat.ListChannels(cpb.ListChannelsRequest(page_size=1000)).channels
            assert channel.id not in {c.id for c in listed}
            expect_error(Code.PERMISSION_DENIED, guest.chat.GetChannel, cpb.GetChannelRequest(id=channel.id))
            found = guest.chat.SearchChannels(cpb.SearchChannelsRequest(query=channel.name.split()[1])).results
            assert channel.id not in {r.channel.id for r in found}
            messages = guest.chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=f'channel_id = "{channel.id}"')).chat_messages
            assert list(messages) == []
            expect_error(Code.PERMISSION_DENIED, guest.chat.GetChatMessage, cpb.GetChatMessageRequest(id=message.id))
            expect_error(
                Code.PERMISSION_DENIED, first_stream_item, guest.chat, cpb.StreamEventsRequest(channel_ids=[channel.id])
            )
        finally:
            guest.channel.close()
