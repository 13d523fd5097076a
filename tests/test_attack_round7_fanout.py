"""A large fan-out (more than FANOUT_SLICE subscribers, offered a slice per turn of the loop)
and re-authorisation: a member removed from a private channel must not get events committed
after the removal, even while slices of earlier events are pending."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
from nexus.chat.v1 import chat_pb2 as cpb

from service.streams import FANOUT_SLICE
from tests.conftest import Client
from tests.support import new_channel
from tests.test_stream_access import BOUND, caller, live  # noqa: F401 - a fixture
from tests.test_streams import EventReader, contents, post


def test_a_removed_member_among_a_sliced_crowd_gets_nothing_committed_after_the_removal(client: Client, caller: Callable[..., Any]) -> None:
    user, _, c = caller()
    private = new_channel(client, is_private=True)
    client.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=private.id, user_id=user.id))
    crowd = [EventReader(client.chat, cpb.StreamEventsRequest(channel_ids=[private.id])) for _ in range(FANOUT_SLICE + 16)]
    reader = EventReader(c.chat, cpb.StreamEventsRequest(channel_ids=[private.id]))
    try:
        live(reader, client, private)
        for r in crowd:
            assert contents(r.take(1)) == ["before"]
        # A burst before the removal keeps slices pending while the removal commits.
        burst = [threading.Thread(target=post, args=(client, private, f"burst {i}")) for i in range(10)]
        for t in burst:
            t.start()
        client.chat.RemoveChannelMember(cpb.RemoveChannelMemberRequest(channel_id=private.id, user_id=user.id))
        for i in range(5):
            post(client, private, f"after {i}")
        for t in burst:
            t.join(30)
        assert reader.done.wait(BOUND + 5), "the removed member's stream is still open"
        delivered = []
        while not reader.items.empty():
            item = reader.items.get()
            if item.type != cpb.EVENT_TYPE_HEARTBEAT:
                delivered.append(item)
        leaked = [text for text in contents(delivered) if text.startswith("after")]
        assert not leaked, f"committed after the removal, delivered: {leaked}"
        assert reader.error is not None and reader.error.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        for r in [*crowd, reader]:
            r.cancel()
