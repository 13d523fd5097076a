"""StreamEvents and the caller's rights: an open stream is re-authorised, limited per caller, and
ends cleanly when the client goes away."""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.chat.v1 import chat_pb2_grpc
from nexus.identity.v1 import identity_pb2 as ipb

from tests.conftest import Client, ServerThread, authed_channel, connect, make_config, unique
from tests.support import mask, new_channel, new_user, rich_error
from tests.test_streams import EventReader, ServerProcess, contents, post, processes, say  # noqa: F401 - a fixture

Code = grpc.StatusCode
BOUND = 2.0  # seconds within which a stream whose right ended must end, on every replica


def key_for(c: Client, role: int, user: ipb.User | None) -> ipb.ApiKey:
    return c.identity.CreateApiKey(
        ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=role, user_id=user.id if user else ""))
    )


@pytest.fixture
def caller(client: Client) -> Iterator[Callable[..., tuple[ipb.User, ipb.ApiKey, Client]]]:
    """make(role) -> (user, its key, a client calling with the key)."""
    made: list[Client] = []

    def make(role: int = ipb.USER_ROLE_USER, user_role: int = ipb.USER_ROLE_USER) -> tuple[ipb.User, ipb.ApiKey, Client]:
        user = new_user(client, role=user_role)
        key = key_for(client, role, user)
        c = connect(client.backend, client.database_url, client.server, secret=key.secret)
        made.append(c)
        return user, key, c

    yield make
    for c in made:
        c.channel.close()


def live(reader: EventReader, c: Client, channel: cpb.Channel | None = None, conversation: cpb.Conversation | None = None) -> None:
    """The stream is open and delivering: one event written now arrives."""
    time.sleep(0.2)
    if channel is not None:
        post(c, channel, "before")
    else:
        assert conversation is not None
        say(c.chat, conversation, "before")
    assert contents(reader.take(1)) == ["before"]


def ends_after_change(
    reader: EventReader, change: Callable[[], Any], write_after: Callable[[], Any], code: grpc.StatusCode, reason: str
) -> None:
    """After `change` the stream ends with `code` within BOUND, and nothing written after the
    change reaches it."""
    started = time.monotonic()
    change()
    write_after()
    assert reader.done.wait(BOUND + 5), "the stream is still open"
    took = time.monotonic() - started
    delivered = []
    while not reader.items.empty():
        item = reader.items.get()
        if item.type != cpb.EVENT_TYPE_HEARTBEAT:
            delivered.append(item)
    assert "after" not in contents(delivered), "an event committed after the change was delivered"
    assert reader.error is not None, "the stream ended without an error"
    err = rich_error(reader.error)
    assert err.code == code, f"expected {code}, got {err.code}: {err.message}"
    assert err.info.reason == reason, err.info.reason
    assert took <= BOUND, f"the stream ended {took:.2f} s after the change"


def test_a_member_removed_from_a_private_channel_loses_the_stream(client: Client, caller: Callable[..., Any]) -> None:
    user, _, c = caller()
    private = new_channel(client, is_private=True)
    public = new_channel(client)
    client.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=private.id, user_id=user.id))
    reader = EventReader(c.chat, cpb.StreamEventsRequest(channel_ids=[private.id]))
    other = EventReader(c.chat, cpb.StreamEventsRequest(channel_ids=[public.id]))
    live(reader, client, private)
    live(other, client, public)
    ends_after_change(
        reader,
        lambda: client.chat.RemoveChannelMember(cpb.RemoveChannelMemberRequest(channel_id=private.id, user_id=user.id)),
        lambda: post(client, private, "after"),
        Code.PERMISSION_DENIED,
        "ROW_ACCESS_DENIED",
    )
    # The same caller's stream of a channel it still sees goes on.
    post(client, public, "still visible")
    assert contents(other.take(1)) == ["still visible"]
    assert other.error is None
    other.cancel()


def test_a_channel_change_that_keeps_the_right_keeps_the_stream(client: Client, caller: Callable[..., Any]) -> None:
    """A Channel event makes its followers' rights be re-checked; one that changes nothing for a
    follower (a renamed channel, another member added, the channel deleted) is delivered, and
    the stream goes on."""
    user, _, c = caller()
    private = new_channel(client, is_private=True)
    client.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=private.id, user_id=user.id))
    reader = EventReader(c.chat, cpb.StreamEventsRequest(channel_ids=[private.id]))
    live(reader, client, private)
    client.chat.UpdateChannel(cpb.UpdateChannelRequest(channel=cpb.Channel(id=private.id, description="renamed"), update_mask=mask("description")))
    client.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=private.id, user_id=new_user(client).id))
    post(client, private, "still here")
    client.chat.DeleteChannel(cpb.DeleteChannelRequest(id=private.id))
    got = reader.take(4)
    assert got[0].channel.description == "renamed" and len(got[1].channel.member_ids) == 2
    assert contents(got[2:3]) == ["still here"]
    assert got[3].type == cpb.EVENT_TYPE_DELETED and got[3].channel.id == private.id
    assert reader.quiet(BOUND) == [] and reader.error is None
    reader.cancel()


def test_a_channel_turned_private_ends_the_streams_of_non_members(client: Client, caller: Callable[..., Any]) -> None:
    _, _, c = caller()
    channel = new_channel(client)
    reader = EventReader(c.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
    admin_reader = EventReader(client.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
    live(reader, client, channel)
    admin_reader.take(1)
    ends_after_change(
        reader,
        lambda: client.chat.UpdateChannel(cpb.UpdateChannelRequest(channel=cpb.Channel(id=channel.id, is_private=True), update_mask=mask("is_private"))),
        lambda: post(client, channel, "after"),
        Code.PERMISSION_DENIED,
        "ROW_ACCESS_DENIED",
    )
    # Those who still see the channel get the change and what follows.
    got = admin_reader.take(2)
    assert got[0].channel.is_private and contents(got[1:]) == ["after"]
    admin_reader.cancel()


def test_a_revoked_key_ends_its_stream(client: Client, caller: Callable[..., Any]) -> None:
    _, key, c = caller()
    channel = new_channel(client)
    reader = EventReader(c.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
    live(reader, client, channel)
    ends_after_change(
        reader,
        lambda: client.identity.RevokeApiKey(ipb.RevokeApiKeyRequest(id=key.id)),
        lambda: post(client, channel, "after"),
        Code.UNAUTHENTICATED,
        "INVALID_CREDENTIALS",
    )


def test_a_key_revoked_through_another_replica_ends_its_stream(
    client: Client, caller: Callable[..., Any], processes: list[ServerProcess], tmp_path: Path
) -> None:
    """The stream is served by one server process, the key revoked through another: the change
    does not pass through the change log, and still ends the stream within the bound."""
    _, key, _ = caller()
    a = ServerProcess(client.database_url, tmp_path / "a.log", key.secret)
    b = ServerProcess(client.database_url, tmp_path / "b.log", client.admin_secret)
    processes += [a, b]
    from nexus.identity.v1 import identity_pb2_grpc

    channel = new_channel(client)
    reader = EventReader(a.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
    live(reader, client, channel)
    ends_after_change(
        reader,
        lambda: identity_pb2_grpc.IdentityServiceStub(b.channel).RevokeApiKey(ipb.RevokeApiKeyRequest(id=key.id)),
        lambda: post(client, channel, "after"),
        Code.UNAUTHENTICATED,
        "INVALID_CREDENTIALS",
    )
    assert "Traceback" not in (tmp_path / "a.log").read_text()


def test_an_expiring_key_ends_its_stream(client: Client) -> None:
    import datetime as dt

    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2.5)
    request = ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_USER, user_id=new_user(client).id))
    request.api_key.expire_time.FromDatetime(expires)
    key = client.identity.CreateApiKey(request)
    c = connect(client.backend, client.database_url, client.server, secret=key.secret)
    try:
        channel = new_channel(client)
        reader = EventReader(c.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
        live(reader, client, channel)
        assert reader.done.wait(max(0.0, expires.timestamp() - time.time()) + BOUND), "the stream outlived its key"
        err = rich_error(reader.error)  # type: ignore[arg-type]
        assert err.code == Code.UNAUTHENTICATED and err.info.reason == "EXPIRED_CREDENTIALS", err.message
    finally:
        c.channel.close()


def ends_when_deactivated(reader: Any, client: Client, user: Any, conversation: Any) -> None:
    """The stream ends UNAUTHENTICATED once the conversation's user is deactivated, and never
    delivers a message said after it."""
    ends_after_change(
        reader,
        lambda: client.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=user.id, is_active=False), update_mask=mask("is_active"))),
        lambda: say(client.chat, conversation, "after"),
        Code.UNAUTHENTICATED,
        "INVALID_CREDENTIALS",
    )


def test_a_deactivated_owner_ends_the_stream_of_its_conversation(client: Client, caller: Callable[..., Any]) -> None:
    """A conversation belongs to its user: a key acting for a deactivated user ends its stream."""
    user, _, c = caller()
    conversation = c.chat.CreateConversation(cpb.CreateConversationRequest(conversation=cpb.Conversation(title=unique("c"))))
    assert conversation.user_id == user.id
    reader = EventReader(c.chat, cpb.StreamEventsRequest(conversation_ids=[conversation.id]))
    live(reader, client, conversation=conversation)
    ends_when_deactivated(reader, client, user, conversation)


def test_a_demoted_key_loses_the_private_channel_only_its_old_role_saw(client: Client, caller: Callable[..., Any]) -> None:
    """An admin key sees every channel; demoted to a user, it no longer sees a private channel
    its user is not a member of."""
    _, key, c = caller(role=ipb.USER_ROLE_ADMIN, user_role=ipb.USER_ROLE_ADMIN)
    private = new_channel(client, is_private=True)
    reader = EventReader(c.chat, cpb.StreamEventsRequest(channel_ids=[private.id]))
    live(reader, client, private)
    ends_after_change(
        reader,
        lambda: client.identity.UpdateApiKey(ipb.UpdateApiKeyRequest(api_key=ipb.ApiKey(id=key.id, role=ipb.USER_ROLE_USER), update_mask=mask("role"))),
        lambda: post(client, private, "after"),
        Code.PERMISSION_DENIED,
        "ROW_ACCESS_DENIED",
    )


def test_a_jwt_stream_ends_when_its_user_is_deactivated_elsewhere_or_the_token_expires(client: Client) -> None:
    """A JWT caller is its user: deactivated through another server (on PostgreSQL the other
    replica is told at once, on SQLite its periodic re-check finds it), or the token's expiry."""
    from tests.test_access import HS_SECRET as JWT_SECRET, JWT_CLAIMS, calling, running, token_for

    with running(make_config(client.database_url, jwt_hs256_secret=JWT_SECRET, **JWT_CLAIMS)) as server:
        address = f"127.0.0.1:{server.port}"
        user = new_user(client, external_id=unique("ext"))
        conversation = client.chat.CreateConversation(cpb.CreateConversationRequest(conversation=cpb.Conversation(title=unique("c"), user_id=user.id)))
        request = cpb.StreamEventsRequest(conversation_ids=[conversation.id])
        with calling(address, f"Bearer {token_for(JWT_SECRET, user.external_id, role='user')}") as me:
            reader = EventReader(me.chat, request)  # type: ignore[arg-type]
            live(reader, client, conversation=conversation)
            ends_when_deactivated(reader, client, user, conversation)
        client.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=user.id, is_active=True), update_mask=mask("is_active")))
        expires = time.time() + 2.5
        with calling(address, f"Bearer {token_for(JWT_SECRET, user.external_id, lifetime=2.5, role='user')}") as me:
            reader = EventReader(me.chat, request)  # type: ignore[arg-type]
            live(reader, client, conversation=conversation)
            assert reader.done.wait(max(0.0, int(expires) - time.time()) + BOUND), "the stream outlived its token"
            assert reader.error is not None and rich_error(reader.error).info.reason == "EXPIRED_CREDENTIALS"


# ---------------------------------------------------------------- streams per caller


def quota_details(exc: grpc.RpcError) -> tuple[list[Any], list[Any]]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    quotas, retries = [], []
    for detail in status.details:
        if detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            quotas.append(error_details_pb2.QuotaFailure())
            detail.Unpack(quotas[-1])
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retries.append(error_details_pb2.RetryInfo())
            detail.Unpack(retries[-1])
    return quotas, retries


def test_streams_per_caller_are_limited(database_url: str) -> None:
    limit = 3
    server = ServerThread(make_config(database_url, max_streams_per_caller=limit)).start()
    admin = connect("any", database_url, server)
    clients = [admin]
    try:
        channel = new_channel(admin)
        first = connect("any", database_url, server, secret=key_for(admin, ipb.USER_ROLE_USER, new_user(admin)).secret)
        second = connect("any", database_url, server, secret=key_for(admin, ipb.USER_ROLE_USER, new_user(admin)).secret)
        clients += [first, second]
        request = cpb.StreamEventsRequest(channel_ids=[channel.id])
        readers = [EventReader(first.chat, request) for _ in range(limit)]
        time.sleep(0.3)
        post(admin, channel, "all open")
        for reader in readers:
            assert contents(reader.take(1)) == ["all open"]
        refused = EventReader(first.chat, request)
        assert refused.done.wait(10)
        err = rich_error(refused.error)  # type: ignore[arg-type]
        assert err.code == Code.RESOURCE_EXHAUSTED and err.info.reason == "TOO_MANY_STREAMS", err.message
        assert err.info.metadata["limit"] == str(limit)
        quotas, retries = quota_details(refused.error)  # type: ignore[arg-type]
        assert quotas and quotas[0].violations[0].subject and "NEXUS_MAX_STREAMS_PER_CALLER" in quotas[0].violations[0].description
        assert retries and retries[0].retry_delay.seconds + retries[0].retry_delay.nanos > 0
        other = EventReader(second.chat, request)  # another key is not affected
        time.sleep(0.3)
        post(admin, channel, "other key")
        assert contents(other.take(1)) == ["other key"]
        readers[0].cancel()
        deadline = time.monotonic() + 10
        while True:  # the server notices the closed stream at once, or nearly
            again = EventReader(first.chat, request)
            time.sleep(0.3)
            if not again.done.is_set() or time.monotonic() > deadline:
                break
        assert not again.done.is_set(), again.error and again.error.details()
        post(admin, channel, "reopened")
        assert contents(again.take(1)) == ["reopened"]
        for reader in [*readers[1:], other, again]:
            reader.cancel()
    finally:
        for c in clients:
            c.channel.close()
        server.stop()


# ---------------------------------------------------------------- streams the client ends


def test_streams_cancelled_by_the_client_leave_no_error_and_no_subscription(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """100 streams cancelled while the server waits to write to them (the client reads nothing,
    so flow control stops the writes): each subscription goes, and nothing is logged as an error."""
    server = ServerThread(make_config(database_url)).start()
    admin = connect("any", database_url, server)
    # Without BDP probing the flow-control window stays small: the server's writes block.
    stalled = authed_channel(admin.address, admin.admin_secret, options=[("grpc.http2.bdp_probe", 0)])
    assert server.app is not None
    hub = server.app.hub
    try:
        channel = new_channel(admin)
        with caplog.at_level(logging.INFO):
            calls = [chat_pb2_grpc.ChatServiceStub(stalled).StreamEvents(cpb.StreamEventsRequest(channel_ids=[channel.id])) for _ in range(100)]
            wait_until(lambda: hub.subscription_count == 100)
            body = "x" * 8000
            for i in range(20):
                post(admin, channel, f"{i} {body}")
            time.sleep(0.5)
            for call in calls:
                call.cancel()
            wait_until(lambda: hub.subscription_count == 0)
            assert hub.caller_count == 0
            import gc

            gc.collect()  # an abandoned generator would be finalized (and would log) by now
            time.sleep(0.5)
        errors_logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors_logged, [r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in errors_logged]
    finally:
        stalled.close()
        admin.channel.close()
        server.stop()


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
