"""StreamEvents: ordered, resumable, exactly-once delivery, on both databases and across replicas."""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.chat.v1 import chat_pb2_grpc

from db.base import utcnow
from db.database import Database
from db.engine import events
from db.unit import SESSION_READ
from tests.conftest import Client, ServerThread, authed_channel, connect, make_config
from tests.support import expect_error, new_channel, new_conversation, new_user, rich_error, run_async

Code = grpc.StatusCode


class EventReader:
    """Reads a server stream on a thread, so tests can wait for events with a timeout."""

    def __init__(self, stub: chat_pb2_grpc.ChatServiceStub, request: cpb.StreamEventsRequest) -> None:
        self.call = stub.StreamEvents(request)
        self.items: queue.Queue[Any] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for item in self.call:
                self.items.put(item)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.done.set()

    def take(self, n: int, timeout: float = 15.0, skip_heartbeats: bool = True) -> list[cpb.StreamEventsResponse]:
        out: list[cpb.StreamEventsResponse] = []
        end = time.monotonic() + timeout
        while len(out) < n:
            remaining = end - time.monotonic()
            if remaining <= 0:
                break
            try:
                item = self.items.get(timeout=remaining)
            except queue.Empty:
                break
            if skip_heartbeats and item.type == cpb.EVENT_TYPE_HEARTBEAT:
                continue
            out.append(item)
        assert len(out) == n, f"expected {n} events, got {len(out)} (stream error: {self.error and self.error.details()})"
        return out

    def quiet(self, seconds: float) -> list[cpb.StreamEventsResponse]:
        """Events (heartbeats excluded) that arrive within `seconds`: none, when all was delivered."""
        end = time.monotonic() + seconds
        got = []
        while (remaining := end - time.monotonic()) > 0:
            try:
                item = self.items.get(timeout=remaining)
            except queue.Empty:
                break
            if item.type != cpb.EVENT_TYPE_HEARTBEAT:
                got.append(item)
        return got

    def cancel(self) -> None:
        self.call.cancel()
        self.done.wait(5)


def post(c: Client, channel: cpb.Channel, text: str) -> cpb.ChatMessage:
    return c.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel.id, content=text)))


def say(stub: chat_pb2_grpc.ChatServiceStub, conversation: cpb.Conversation, text: str) -> cpb.ConversationMessage:
    return stub.CreateConversationMessage(
        cpb.CreateConversationMessageRequest(
            conversation_message=cpb.ConversationMessage(conversation_id=conversation.id, sender_type=cpb.SENDER_TYPE_USER, content=text)
        )
    )


def contents(items: list[cpb.StreamEventsResponse]) -> list[str]:
    return [i.chat_message.content or i.conversation_message.content for i in items]


def test_events_arrive_in_commit_order_with_their_resources(client: Client) -> None:
    channel = new_channel(client)
    reader = EventReader(client.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
    time.sleep(0.2)
    sent = [post(client, channel, f"m{i}") for i in range(10)]
    edited = client.chat.UpdateChatMessage(
        cpb.UpdateChatMessageRequest(chat_message=cpb.ChatMessage(id=sent[0].id, content="m0 edited"), update_mask={"paths": ["content"]})
    )
    client.chat.DeleteChatMessage(cpb.DeleteChatMessageRequest(id=sent[1].id))
    got = reader.take(12)
    reader.cancel()
    assert [g.sequence for g in got] == list(range(got[0].sequence, got[0].sequence + 12))
    assert [g.type for g in got] == [cpb.EVENT_TYPE_CREATED] * 10 + [cpb.EVENT_TYPE_UPDATED, cpb.EVENT_TYPE_DELETED]
    assert contents(got[:10]) == [f"m{i}" for i in range(10)]
    assert got[10].chat_message == edited
    assert got[11].chat_message.delete_time.seconds > 0
    assert all(g.scope == f"channels/{channel.id}" and g.resume_token for g in got)


def test_one_stream_follows_channels_and_conversations(client: Client) -> None:
    channel, conversation = new_channel(client), new_conversation(client)
    reader = EventReader(client.chat, cpb.StreamEventsRequest(channel_ids=[channel.id], conversation_ids=[conversation.id]))
    time.sleep(0.2)
    post(client, channel, "in channel")
    say(client.chat, conversation, "in conversation")
    client.chat.ArchiveConversation(cpb.ArchiveConversationRequest(id=conversation.id))
    member = new_user(client)
    client.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=channel.id, user_id=member.id))
    got = reader.take(4)
    reader.cancel()
    by_scope: dict[str, list[cpb.StreamEventsResponse]] = {}
    for g in got:
        by_scope.setdefault(g.scope, []).append(g)
    conv = by_scope[f"conversations/{conversation.id}"]
    assert conv[0].conversation_message.content == "in conversation"
    assert conv[1].conversation.status == cpb.CONVERSATION_STATUS_ARCHIVED
    chan = by_scope[f"channels/{channel.id}"]
    assert chan[0].chat_message.content == "in channel"
    assert list(chan[1].channel.member_ids) == [member.id]


def test_resume_after_disconnect_delivers_exactly_the_missed_events(client: Client) -> None:
    channel = new_channel(client)
    reader = EventReader(client.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
    time.sleep(0.2)
    for i in range(5):
        post(client, channel, f"a{i}")
    first = reader.take(5)
    reader.cancel()
    for i in range(5):
        post(client, channel, f"b{i}")
    resumed = EventReader(client.chat, cpb.StreamEventsRequest(resume_token=first[-1].resume_token))
    missed = resumed.take(5)
    assert contents(missed) == [f"b{i}" for i in range(5)]
    assert missed[0].sequence == first[-1].sequence + 1
    post(client, channel, "live")
    assert contents(resumed.take(1)) == ["live"]
    assert resumed.quiet(0.5) == []
    resumed.cancel()


def test_concurrent_writers_reach_one_subscriber_exactly_once(client: Client) -> None:
    conversation = new_conversation(client)
    reader = EventReader(client.chat, cpb.StreamEventsRequest(conversation_ids=[conversation.id]))
    time.sleep(0.2)
    writers, per_writer = 4, 15

    def write(w: int) -> None:
        channel = authed_channel(client.address, client.admin_secret)  # its own connection
        stub = chat_pb2_grpc.ChatServiceStub(channel)
        for i in range(per_writer):
            say(stub, conversation, f"w{w}-{i}")
        channel.close()

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = reader.take(writers * per_writer, timeout=30)
    assert reader.quiet(0.5) == []
    reader.cancel()
    assert sorted(contents(got)) == sorted(f"w{w}-{i}" for w in range(writers) for i in range(per_writer))
    sequences = [g.sequence for g in got]
    assert sequences == list(range(sequences[0], sequences[0] + len(got))), "gap-free, in commit order"
    for w in range(writers):  # each writer's own messages keep their order
        mine = [c for c in contents(got) if c.startswith(f"w{w}-")]
        assert mine == [f"w{w}-{i}" for i in range(per_writer)]


def test_heartbeats_carry_the_latest_token(client: Client) -> None:
    channel = new_channel(client)
    reader = EventReader(client.chat, cpb.StreamEventsRequest(channel_ids=[channel.id], heartbeat_seconds=1))
    time.sleep(0.2)
    post(client, channel, "before the silence")
    got = reader.take(1)
    beat = reader.take(1, timeout=5, skip_heartbeats=False)[0]
    reader.cancel()
    assert beat.type == cpb.EVENT_TYPE_HEARTBEAT
    assert events.decode_token(beat.resume_token) == events.decode_token(got[0].resume_token)


def test_bad_stream_requests(client: Client) -> None:
    def first(request: cpb.StreamEventsRequest) -> None:
        next(iter(client.chat.StreamEvents(request, timeout=10)))

    err = expect_error(Code.NOT_FOUND, first, cpb.StreamEventsRequest(channel_ids=[new_channel(client).id, "00000000-0000-0000-0000-000000000001"]))
    assert err.info.metadata["field"] == "channel_ids[1]"
    expect_error(Code.INVALID_ARGUMENT, first, cpb.StreamEventsRequest())
    err = expect_error(Code.INVALID_ARGUMENT, first, cpb.StreamEventsRequest(resume_token="not a token"))
    assert err.violations[0].field == "resume_token"
    expect_error(Code.INVALID_ARGUMENT, first, cpb.StreamEventsRequest(channel_ids=["nope"]))
    expect_error(Code.INVALID_ARGUMENT, first, cpb.StreamEventsRequest(channel_ids=[new_channel(client).id], heartbeat_seconds=-1))
    ahead = events.encode_token({f"channels/{new_channel(client).id}": 10_000})
    err = expect_error(Code.INVALID_ARGUMENT, first, cpb.StreamEventsRequest(resume_token=ahead))
    assert err.violations[0].field == "resume_token"


def test_token_older_than_retention_is_refused(client: Client) -> None:
    channel = new_channel(client)
    reader = EventReader(client.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
    time.sleep(0.2)
    post(client, channel, "old")
    token = reader.take(1)[0].resume_token
    reader.cancel()
    post(client, channel, "newer")
    database = Database(client.database_url)
    try:
        database.run_sync(lambda s: events.purge(s, utcnow()))
    finally:
        database.dispose()
    err = expect_error(Code.FAILED_PRECONDITION, lambda: next(iter(client.chat.StreamEvents(cpb.StreamEventsRequest(resume_token=token), timeout=10))))
    assert err.info.reason == "RESUME_TOKEN_EXPIRED"
    assert "reload" in err.message


def test_slow_subscriber_is_cut_off_with_its_token_while_a_fast_one_keeps_up(database_url: str) -> None:
    server = ServerThread(make_config(database_url, stream_queue_size=8)).start()
    c = connect("any", database_url, server)
    # The slow client never reads until the end; without BDP probing its flow-control window
    # stays small, so the server's writes to it block and its queue overflows.
    slow_channel = authed_channel(c.address, c.admin_secret, options=[("grpc.http2.bdp_probe", 0)])
    try:
        channel = new_channel(c)
        slow = chat_pb2_grpc.ChatServiceStub(slow_channel).StreamEvents(cpb.StreamEventsRequest(channel_ids=[channel.id]), timeout=120)
        fast = EventReader(c.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
        time.sleep(0.3)
        total = 200
        body = "x" * 8000
        seen: list[cpb.StreamEventsResponse] = []
        for i in range(total):
            post(c, channel, f"{i} {body}")
            # In step with the fast reader (its thread shares the interpreter with the server and
            # this loop: on a loaded machine it could fall eight events behind and be cut off too).
            seen += fast.take(1, timeout=60)
        assert [int(t.split()[0]) for t in contents(seen)] == list(range(total))
        received: list[cpb.StreamEventsResponse] = []
        with pytest.raises(grpc.RpcError) as caught:
            for item in slow:
                received.append(item)
        err = rich_error(caught.value)
        assert err.code == Code.RESOURCE_EXHAUSTED and err.info.reason == "SUBSCRIBER_TOO_SLOW", err.message
        assert len(received) < total
        token = err.info.metadata["resume_token"]
        if received:
            assert events.decode_token(token) == events.decode_token(received[-1].resume_token)
        rest = EventReader(c.chat, cpb.StreamEventsRequest(resume_token=token))
        remaining = rest.take(total - len(received), timeout=60)
        rest.cancel()
        fast.cancel()
        assert [int(t.split()[0]) for t in contents(received + remaining)] == list(range(total)), "no gap, no repeat"
    finally:
        slow_channel.close()
        c.channel.close()
        server.stop()


def test_shutdown_ends_streams_with_a_final_token(database_url: str) -> None:
    server = ServerThread(make_config(database_url)).start()
    c = connect("any", database_url, server)
    channel = new_channel(c)
    reader = EventReader(c.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
    time.sleep(0.2)
    post(c, channel, "last words")
    got = reader.take(1)
    server.stop()
    final = reader.take(1, skip_heartbeats=False)[0]
    assert final.type == cpb.EVENT_TYPE_SERVER_SHUTDOWN
    assert events.decode_token(final.resume_token) == events.decode_token(got[0].resume_token)
    c.channel.close()


# ---------------------------------------------------------------- real server processes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`nexus-data serve` in its own process."""

    def __init__(self, database_url: str, log: Path, secret: str) -> None:
        self.port = _free_port()
        env = dict(os.environ, DATABASE_URL=database_url, NEXUS_PORT=str(self.port), NEXUS_HOST="127.0.0.1",
                   NEXUS_DRAIN_SECONDS="0", NEXUS_GRACE_SECONDS="1", NEXUS_HASH_TIME_COST="1", NEXUS_HASH_MEMORY_KIB="1024")
        self.proc = subprocess.Popen([str(Path(sys.executable).parent / "nexus-data"), "serve"], env=env,
                                     stdout=log.open("a"), stderr=subprocess.STDOUT)
        raw = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        grpc.channel_ready_future(raw).result(timeout=30)
        self.channel = authed_channel(f"127.0.0.1:{self.port}", secret)
        self.chat = chat_pb2_grpc.ChatServiceStub(self.channel)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self.channel.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)
        self.channel.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for p in started:
        p.stop()


def test_resume_after_the_server_is_killed_and_restarted(client: Client, processes: list[ServerProcess], tmp_path: Path) -> None:
    first = ServerProcess(client.database_url, tmp_path / "server.log", client.admin_secret)
    processes.append(first)
    conversation = new_conversation(client)
    reader = EventReader(first.chat, cpb.StreamEventsRequest(conversation_ids=[conversation.id]))
    time.sleep(0.3)
    for i in range(3):
        say(first.chat, conversation, f"seen{i}")
    seen = reader.take(3)
    for i in range(3):
        say(first.chat, conversation, f"acked{i}")  # acknowledged, then the server dies
    first.kill()
    second = ServerProcess(client.database_url, tmp_path / "server.log", client.admin_secret)
    processes.append(second)
    say(second.chat, conversation, "after restart")
    resumed = EventReader(second.chat, cpb.StreamEventsRequest(resume_token=seen[-1].resume_token))
    got = resumed.take(4)
    assert resumed.quiet(0.5) == []
    resumed.cancel()
    assert contents(got) == ["acked0", "acked1", "acked2", "after restart"]


def test_two_replicas_on_one_database(client: Client, processes: list[ServerProcess], tmp_path: Path) -> None:
    """Subscribe on one server process, write through another: every event arrives, in order."""
    a = ServerProcess(client.database_url, tmp_path / "a.log", client.admin_secret)
    b = ServerProcess(client.database_url, tmp_path / "b.log", client.admin_secret)
    processes += [a, b]
    channel = new_channel(client)
    reader = EventReader(a.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
    time.sleep(0.3)
    for i in range(20):
        b.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel.id, content=f"r{i}")))
    got = reader.take(20)
    reader.cancel()
    assert contents(got) == [f"r{i}" for i in range(20)]


def test_an_event_committed_without_a_wakeup_is_still_delivered(client: Client) -> None:
    """A lost notification (here: a writer that sends none) delays an event by a poll, never loses it."""
    import uuid

    from sqlalchemy import update

    from db.engine.tables import ChangeEvent, StreamScope

    channel = new_channel(client)
    reader = EventReader(client.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
    time.sleep(0.2)
    post(client, channel, "normal")
    assert contents(reader.take(1)) == ["normal"]
    scope = f"channels/{channel.id}"
    silent = cpb.ChatMessage(id=str(uuid.uuid4()), channel_id=channel.id, content="silent")

    def append_silently(session: Any) -> None:
        seq = session.execute(
            update(StreamScope).where(StreamScope.scope == scope).values(last_seq=StreamScope.last_seq + 1).returning(StreamScope.last_seq)
        ).scalar_one()
        session.add(ChangeEvent(scope=scope, seq=seq, event_type=events.CREATED, resource_type="ChatMessage",
                                resource_id=uuid.UUID(silent.id), payload=silent.SerializeToString(), create_time=utcnow()))

    database = Database(client.database_url)  # another process's view: no hub listens to its commits
    try:
        database.run_sync(append_silently)
    finally:
        database.dispose()
    got = reader.take(1, timeout=10)
    assert got[0].chat_message == silent
    post(client, channel, "after")
    assert contents(reader.take(1)) == ["after"]
    reader.cancel()


def test_a_live_event_serialized_once_parses_with_each_streams_token() -> None:
    from service.streams import with_token

    event = cpb.StreamEventsResponse(type=cpb.EVENT_TYPE_CREATED, scope="channels/x", sequence=7,
                                     chat_message=cpb.ChatMessage(id="m", content="hello"))
    shared = event.SerializeToString()
    for token in ("a", "b" * 300):  # a one-byte and a two-byte length
        parsed = cpb.StreamEventsResponse.FromString(with_token(shared, token))
        expected = cpb.StreamEventsResponse()
        expected.CopyFrom(event)
        expected.resume_token = token
        assert parsed == expected


def test_the_events_a_commit_hands_over_are_those_of_the_log(client: Client) -> None:
    """The hub offers this process's commits as the commit listener hands them over, without
    reading them back: they must be exactly what the log holds (payload, type, commit time)."""
    import uuid

    from db.database import COMMITTED_EVENTS_KEY

    database = Database(client.database_url)
    handed: list[events.StoredEvent] = []
    database.add_commit_listener(lambda notes: handed.extend(notes.get(COMMITTED_EVENTS_KEY, ())))
    scope = f"channels/{uuid.uuid4()}"
    try:
        for text in ("one", "two"):
            message = cpb.ChatMessage(id=str(uuid.uuid4()), channel_id=scope.split("/")[1], content=text)
            database.run_sync(lambda s: events.emit(s, scope, events.CREATED, "ChatMessage", uuid.UUID(message.id), message))  # noqa: B023 - called within this iteration
        logged = database.run_sync(lambda s: events.read_after(s, scope, 0, 10), SESSION_READ)
    finally:
        database.dispose()
    assert [e.seq for e in handed] == [1, 2] and handed == logged


def test_a_local_commit_is_offered_without_reading_the_log(client: Client) -> None:
    """The next event of a scope is offered as the commit handed it over (an event the log does
    not hold shows that); one after a gap is not: the hub reads the log instead."""
    import asyncio
    import uuid

    from db.database import COMMITTED_EVENTS_KEY
    from service.streams import ChangeHub

    database = Database(client.database_url)
    scope = f"channels/{uuid.uuid4()}"

    def stored(seq: int) -> events.StoredEvent:
        message = cpb.ChatMessage(id=str(uuid.uuid4()), channel_id=scope.split("/")[1], content=f"#{seq}")
        return events.StoredEvent(scope, seq, events.CREATED, "ChatMessage", message.SerializeToString(), utcnow())

    async def scenario() -> None:
        hub = ChangeHub(database)
        await hub.start()
        try:
            sub = await hub.subscribe({scope: 0})
            hub.on_commit({COMMITTED_EVENTS_KEY: [stored(1)]})
            offered = await asyncio.wait_for(sub.queue.get(), 5)
            assert (offered.scope, offered.sequence) == (scope, 1)
            assert cpb.StreamEventsResponse.FromString(offered.data).chat_message.content == "#1"
            hub.on_commit({COMMITTED_EVENTS_KEY: [stored(3)]})  # 2 is missing: read the log, which has neither
            await asyncio.sleep(0.5)
            assert sub.queue.empty() and hub.known(scope) == 1
            hub.unsubscribe(sub)
        finally:
            await hub.close()

    try:
        run_async(scenario())
    finally:
        database.dispose()
