"""A large fan-out is offered a slice of subscribers per turn of the event loop: RPCs answer
meanwhile, and every subscriber still gets every event once and in order."""
from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict

import grpc
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.chat.v1 import chat_pb2_grpc

from db.base import utcnow
from db.database import COMMITTED_EVENTS_KEY, Database
from db.engine import events
from service.streams import FANOUT_SLICE, ChangeHub, HubSettings, Offered
from tests.conftest import ADMIN_KEYS, Client, ServerThread, connect, make_config
from tests.support import new_channel, run_async

SUBSCRIBERS = 500
WRITERS, WRITES_EACH = 4, 10


def _stored(scope: str, seq: int) -> events.StoredEvent:
    message = cpb.ChatMessage(id=str(uuid.uuid4()), channel_id=scope.split("/")[1], content=f"#{seq}")
    return events.StoredEvent(scope, seq, events.CREATED, "ChatMessage", message.SerializeToString(), utcnow())


def test_the_loop_answers_while_a_large_fanout_is_under_way_and_each_subscriber_gets_all_in_order(client: Client) -> None:
    """A callback queued on the loop after a commit (as a write's answer is) runs before the
    commit's event has reached every subscriber of a large scope; a small scope's subscribers
    get theirs at once, as before. In the end each has every event once, in order."""
    database = Database(client.database_url)
    big, small = f"channels/{uuid.uuid4()}", f"channels/{uuid.uuid4()}"
    many = 4 * FANOUT_SLICE + 1

    async def scenario() -> None:
        hub = ChangeHub(database, HubSettings(max_streams_per_caller=many + 10))
        await hub.start()
        try:
            crowd = [await hub.subscribe({big: 0}) for _ in range(many)]
            few = [await hub.subscribe({small: 0}) for _ in range(3)]
            both = await hub.subscribe({big: 0, small: 0})
            loop = asyncio.get_running_loop()
            when_answered: dict[str, int] = {}

            def answer() -> None:  # stands for the write's answer, queued behind the commit
                when_answered["big"] = sum(1 for sub in [*crowd, both] if not sub.queue.empty())
                when_answered["small"] = sum(1 for sub in few if not sub.queue.empty())

            hub.on_commit({COMMITTED_EVENTS_KEY: [_stored(big, 1), _stored(small, 1)]})
            await asyncio.sleep(0)  # the hub's callback (call_soon_threadsafe) runs first
            loop.call_soon(answer)
            for seq in (2, 3):
                hub.on_commit({COMMITTED_EVENTS_KEY: [_stored(big, seq), _stored(small, seq)]})
            for _ in range(200):
                if all(sub.queue.qsize() == 3 for sub in crowd + few) and both.queue.qsize() == 6:
                    break
                await asyncio.sleep(0.01)
            assert when_answered["big"] < many + 1, "the answer waited for the whole fan-out"
            assert when_answered["small"] == 3, "a small scope is offered at once"
            for sub in crowd + few + [both]:
                got: dict[str, list[int]] = defaultdict(list)
                while not sub.queue.empty():
                    item = sub.queue.get_nowait()
                    assert isinstance(item, Offered)
                    got[item.scope].append(item.sequence)
                assert all(seqs == [1, 2, 3] for seqs in got.values()) and len(got) == len(sub.positions)
            for sub in crowd + few + [both]:
                hub.unsubscribe(sub)
        finally:
            await hub.close()

    try:
        run_async(scenario())
    finally:
        database.dispose()


def test_concurrent_writes_reach_hundreds_of_streams_once_and_in_order(database_url: str) -> None:
    server = ServerThread(make_config(database_url, max_streams_per_caller=SUBSCRIBERS + 10, max_concurrent_rpcs=SUBSCRIBERS + 100)).start()
    backend = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    c = connect(backend, database_url, server)
    try:
        channel = new_channel(c)
        secret = ADMIN_KEYS[database_url]
        run_async(_fan_out_scenario(f"127.0.0.1:{server.port}", secret, channel.id))
    finally:
        c.channel.close()
        server.stop()


async def _fan_out_scenario(address: str, secret: str, channel_id: str) -> None:
    metadata = (("authorization", f"Bearer {secret}"),)
    # 50 streams a connection, as clients multiplex them.
    connections = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(SUBSCRIBERS // 50)]
    writer = grpc.aio.insecure_channel(address)
    total = WRITERS * WRITES_EACH
    received: list[list[cpb.StreamEventsResponse]] = [[] for _ in range(SUBSCRIBERS)]
    opened = [asyncio.Event() for _ in range(SUBSCRIBERS)]

    async def subscribe(j: int) -> None:
        stub = chat_pb2_grpc.ChatServiceStub(connections[j % len(connections)])
        call = stub.StreamEvents(cpb.StreamEventsRequest(channel_ids=[channel_id], heartbeat_seconds=1), metadata=metadata)
        async for event in call:
            if event.type == cpb.EVENT_TYPE_HEARTBEAT:
                opened[j].set()
                continue
            opened[j].set()
            if event.chat_message.content.startswith("w"):
                received[j].append(event)
                if len(received[j]) == total:
                    call.cancel()
                    return

    chat = chat_pb2_grpc.ChatServiceStub(writer)

    async def post(content: str) -> cpb.ChatMessage:
        return await chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel_id, content=content)), metadata=metadata, timeout=60)

    async def write(k: int) -> list[str]:
        return [(await post(f"w{k}.{i}")).id for i in range(WRITES_EACH)]

    tasks = [asyncio.create_task(subscribe(j)) for j in range(SUBSCRIBERS)]
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in opened)), 60)  # each stream's first heartbeat
        written = await asyncio.wait_for(asyncio.gather(*(write(k) for k in range(WRITERS))), 120)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in [*connections, writer]:
            await ch.close()
    ids = {i for per_writer in written for i in per_writer}
    first = received[0]
    for got in received:
        assert [e.chat_message.id for e in got] == [e.chat_message.id for e in first], "every stream sees one order"
        assert {e.chat_message.id for e in got} == ids and len(got) == total, "every message once"
        assert [e.sequence for e in got] == list(range(got[0].sequence, got[0].sequence + total)), "in sequence order"
    for k in range(WRITERS):  # each writer's messages in the order it wrote them
        mine = [e.chat_message.content for e in first if e.chat_message.content.startswith(f"w{k}.")]
        assert mine == [f"w{k}.{i}" for i in range(WRITES_EACH)]
