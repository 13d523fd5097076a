"""Live event streams: one ChangeHub per process fans the durable change log out to subscribers.

The change log in the database is the source of truth (db/events.py). The hub learns that a
scope moved on from this process's own commits (which hand it the events they appended: offered
as they are when each is the next of its scope), from PostgreSQL NOTIFY for other replicas'
commits, and from a periodic poll that repairs a lost notification; for those it reads the new
events once. Either way it offers each event to every subscriber of the scope through a bounded
queue.

Each stream keeps its own cursor per scope and takes the next event only if it is exactly
cursor + 1; anything else (a duplicate from the catch-up race, a gap after an overflow or a
missed wake-up) is settled by reading the log again. So a stream never repeats or skips an
event, and a slow stream never slows the hub: when its queue is full it is cut off with its
resume token.
"""
from __future__ import annotations

import asyncio
import logging
import select
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg2
from google.protobuf import timestamp_pb2
from nexus.chat.v1 import chat_pb2 as pb

from db import errors, events
from db.database import COMMITTED_EVENTS_KEY, Database

log = logging.getLogger("nexus.streams")

EVENT_TYPES = {
    events.CREATED: pb.EVENT_TYPE_CREATED,
    events.UPDATED: pb.EVENT_TYPE_UPDATED,
    events.DELETED: pb.EVENT_TYPE_DELETED,
}
RESOURCE_FIELDS = {
    "Channel": ("channel", pb.Channel),
    "ChatMessage": ("chat_message", pb.ChatMessage),
    "Conversation": ("conversation", pb.Conversation),
    "ConversationMessage": ("conversation_message", pb.ConversationMessage),
}
READ_BATCH = 500
HEARTBEAT_TICK = 0.25  # seconds between the hub's checks for quiet streams


@dataclass(frozen=True)
class HubSettings:
    queue_size: int = 1000
    poll_seconds: float = 1.0
    default_heartbeat_seconds: float = 15.0


def to_response(event: events.StoredEvent) -> pb.StreamEventsResponse:
    """A stream message for a stored event, without the per-stream resume token."""
    field_name, message_type = RESOURCE_FIELDS[event.resource_type]
    commit_time = timestamp_pb2.Timestamp()
    commit_time.FromDatetime(event.create_time)
    response = pb.StreamEventsResponse(
        type=EVENT_TYPES[event.event_type], scope=event.scope, sequence=event.seq, commit_time=commit_time
    )
    getattr(response, field_name).MergeFromString(event.payload)
    return response


@dataclass(frozen=True)
class Offered:
    """A live event as the hub offers it to every subscriber of its scope: serialized once.

    A stream sends `data` followed by its own resume_token field: protobuf's wire format
    merges concatenated messages, so the subscriber parses one StreamEventsResponse, and the
    per-subscriber cost is the token, not a copy and a serialization of the whole event.
    """

    scope: str
    sequence: int
    data: bytes
    # data with the token of a stream that follows this scope alone: the same for all of them.
    alone: bytes = b""


def with_token(data: bytes, token: str) -> bytes:
    """A serialized StreamEventsResponse (without resume_token) plus that field."""
    return data + _token_field(token)


def _token_field(token: str) -> bytes:
    return pb.StreamEventsResponse(resume_token=token).SerializeToString()


# Put on a quiet subscription's queue by the hub's heartbeat task.
HEARTBEAT = object()


@dataclass(eq=False)
class Subscription:
    """One open stream: its cursor per scope and its bounded inbox."""

    positions: dict[str, int]
    queue: asyncio.Queue[Any]  # Offered, HEARTBEAT, or None (shutting down)
    heartbeat_seconds: float = 15.0
    last_sent: float = 0.0  # loop time of the last message the stream sent
    overflowed: bool = False
    closing: bool = False
    stale_scopes: set[str] = field(default_factory=set)

    def offer(self, response: Offered) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(response)
        except asyncio.QueueFull:
            self.overflowed = True

    def token(self) -> str:
        return events.encode_token(self.positions)


class ChangeHub:
    """Per-process fan-out of the change log to subscriptions."""

    def __init__(self, db: Database, settings: HubSettings | None = None) -> None:
        self.db = db
        self.settings = settings or HubSettings()
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self._known: dict[str, int] = {}  # scope -> last seq the hub has read and offered
        self._dirty: set[str] = set()
        self._reading: set[str] = set()  # scopes whose log _read_and_offer is reading
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: threading.Thread | None = None
        self._stopping = threading.Event()
        self.closed = False

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.db.add_commit_listener(self.on_commit)
        self._tasks = [asyncio.create_task(self._dispatch()), asyncio.create_task(self._poll()), asyncio.create_task(self._heartbeats())]
        if self.db.is_postgres:
            self._listener = threading.Thread(target=self._listen, name="nexus-listen", daemon=True)
            self._listener.start()

    async def close(self) -> None:
        """Every subscription gets its final event; no new ones are accepted."""
        self.closed = True
        self._stopping.set()
        self.db.remove_commit_listener(self.on_commit)
        for subs in self._subs.values():
            for sub in subs:
                sub.closing = True
                try:
                    sub.queue.put_nowait(None)
                except asyncio.QueueFull:
                    pass  # it is reading already; it sees `closing` after the current event
        for task in self._tasks:
            task.cancel()

    # -------------------------------------------------------------- wake-ups

    def on_commit(self, notes: dict[str, Any]) -> None:
        """Database commit listener: the events the transaction appended, to offer."""
        committed = notes.get(COMMITTED_EVENTS_KEY)
        if committed and self._loop is not None:
            self._loop.call_soon_threadsafe(self._committed, list(committed))

    def _committed(self, committed: list[events.StoredEvent]) -> None:
        """Events this process committed, offered as they are when each is the next of its
        scope: read back from the log they would be the same, a database read and a turn of the
        event loop later (behind the fan-out of the event before). Anything else (a scope
        behind, being read, or with a gap: another process's commit in between) reads the log."""
        subs_of = self._subs
        for event in committed:
            scope, seq = event.scope, event.seq
            subs = subs_of.get(scope)
            if not subs:
                continue
            known = self._known.get(scope, 0)
            if seq <= known:
                continue
            if seq == known + 1 and scope not in self._dirty and scope not in self._reading:
                self._known[scope] = seq
                self._offer(event, list(subs))
            else:
                self._dirty.add(scope)
        if self._dirty:
            self._wakeup.set()

    def notify_threadsafe(self, moved: Iterable[tuple[str, int]]) -> None:
        """Called from any thread with (scope, seq) pairs that moved on elsewhere (another
        replica's NOTIFY): the hub reads those scopes' logs."""
        items = list(moved)
        if self._loop is not None and items:
            self._loop.call_soon_threadsafe(self._mark_dirty, items)

    def _mark_dirty(self, items: list[tuple[str, int]]) -> None:
        for scope, seq in items:
            if scope in self._subs and seq > self._known.get(scope, 0):
                self._dirty.add(scope)
        if self._dirty:
            self._wakeup.set()

    def _listen(self) -> None:
        """LISTEN on a dedicated connection; commits of other replicas wake this hub."""
        # The engine's own connect arguments, but a connection of our own: it is held for good.
        args, kwargs = self.db.engine.dialect.create_connect_args(self.db.engine.url)
        while not self._stopping.is_set():
            conn = None
            try:
                conn = psycopg2.connect(*args, **kwargs)
                conn.autocommit = True
                with conn.cursor() as cur:
                    cur.execute(f"LISTEN {events.NOTIFY_CHANNEL}")
                # Anything committed while we were not listening is found by the poll.
                while not self._stopping.is_set():
                    if select.select([conn], [], [], 0.5) == ([], [], []):
                        continue
                    conn.poll()
                    moved = []
                    while conn.notifies:
                        note = conn.notifies.pop(0)
                        scope, _, seq = note.payload.rpartition(" ")
                        if scope and seq.isdigit():
                            moved.append((scope, int(seq)))
                    self.notify_threadsafe(moved)
            except Exception as exc:  # noqa: BLE001 - the listener reconnects; the poll covers the gap
                if not self._stopping.is_set():
                    log.warning("change listener lost its connection (%s); reconnecting", type(exc).__name__)
                    time.sleep(1.0)
            finally:
                if conn is not None:
                    conn.close()

    async def _poll(self) -> None:
        """The fallback: a lost notification delays an event by at most one poll, never loses it."""
        while True:
            await asyncio.sleep(self.settings.poll_seconds)
            scopes = list(self._subs)
            if not scopes:
                continue
            try:
                latest = await self.db.run(lambda s: events.last_sequences(s, scopes), write=False)
            except errors.NexusError:
                continue
            self._mark_dirty([(scope, last) for scope, (last, _) in latest.items()])

    async def _heartbeats(self) -> None:
        """One timer for all streams (not one per wait): a stream quiet for its heartbeat
        interval gets a HEARTBEAT on its queue, at most HEARTBEAT_TICK late."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HEARTBEAT_TICK)
            now = loop.time()
            for sub in {sub for subs in self._subs.values() for sub in subs}:
                if now - sub.last_sent >= sub.heartbeat_seconds and sub.queue.empty():
                    sub.last_sent = now  # one heartbeat per interval, even before it is sent
                    sub.queue.put_nowait(HEARTBEAT)

    async def _dispatch(self) -> None:
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            dirty, self._dirty = self._dirty, set()
            for scope in dirty:
                await self._read_and_offer(scope)

    async def _read_and_offer(self, scope: str) -> None:
        self._reading.add(scope)
        try:
            while scope in self._subs:
                after = self._known.get(scope, 0)
                try:
                    batch = await self.db.run(lambda s: events.read_after(s, scope, after, READ_BATCH), write=False)
                except errors.NexusError as exc:
                    log.warning("could not read events of %s: %s", scope, exc.message)
                    self._dirty.add(scope)
                    return
                if not batch:
                    return
                self._known[scope] = batch[-1].seq
                subs = list(self._subs.get(scope, ()))
                for event in batch:
                    self._offer(event, subs)
                if len(batch) < READ_BATCH:
                    return
        finally:
            self._reading.discard(scope)

    @staticmethod
    def _offer(event: events.StoredEvent, subs: list[Subscription]) -> None:
        data = to_response(event).SerializeToString()
        offered = Offered(event.scope, event.seq, data, with_token(data, events.encode_token({event.scope: event.seq})))
        for sub in subs:
            sub.offer(offered)

    # -------------------------------------------------------------- subscriptions

    async def subscribe(self, positions: dict[str, int], heartbeat_seconds: float | None = None) -> Subscription:
        if self.closed:
            raise errors.Unavailable("the server is shutting down; reconnect", reason="SERVER_SHUTTING_DOWN")
        sub = Subscription(
            dict(positions),
            asyncio.Queue(self.settings.queue_size),
            heartbeat_seconds or self.settings.default_heartbeat_seconds,
            asyncio.get_running_loop().time(),
        )
        new_scopes = [s for s in positions if s not in self._subs]
        for scope in positions:
            self._subs[scope].add(sub)
        if new_scopes:
            latest = await self.db.run(lambda s: events.last_sequences(s, new_scopes), write=False)
            for scope, (last, _) in latest.items():
                self._known[scope] = max(self._known.get(scope, 0), last)
        return sub

    def known(self, scope: str) -> int:
        """The last sequence of `scope` the hub has seen (read, or found at subscription)."""
        return self._known.get(scope, 0)

    def unsubscribe(self, sub: Subscription) -> None:
        for scope in sub.positions:
            subs = self._subs.get(scope)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[scope]
                    self._known.pop(scope, None)

    @property
    def subscription_count(self) -> int:
        return len({id(s) for subs in self._subs.values() for s in subs})


async def stream(
    hub: ChangeHub,
    db: Database,
    positions: dict[str, int],
    heartbeat_seconds: float,
) -> AsyncIterator[pb.StreamEventsResponse | bytes]:
    """The events of one subscription: catch-up from the log, then live, never a gap or a repeat.

    Live events come out already serialized (bytes of a StreamEventsResponse, see Offered):
    the method's serializer passes bytes through (service/interceptors.py)."""
    sub = await hub.subscribe(positions, heartbeat_seconds)
    loop = asyncio.get_running_loop()
    try:
        # Scopes whose log must be read before live events are trusted: those behind the hub.
        pending = {scope for scope, seq in positions.items() if seq < hub.known(scope)}
        while True:
            while pending:
                scope = pending.pop()
                after = sub.positions[scope]
                batch = await db.run(lambda s: events.read_after(s, scope, after, READ_BATCH), write=False)
                for event in batch:
                    response = to_response(event)
                    sub.positions[scope] = event.seq
                    response.resume_token = sub.token()
                    sub.last_sent = loop.time()
                    yield response
                    if sub.overflowed or sub.closing:
                        break
                if len(batch) == READ_BATCH:
                    pending.add(scope)
            if sub.closing:
                yield pb.StreamEventsResponse(type=pb.EVENT_TYPE_SERVER_SHUTDOWN, resume_token=sub.token())
                return
            if sub.overflowed:
                raise errors.ResourceExhausted(
                    "the stream fell too far behind and was cut off; reconnect with resume_token",
                    reason="SUBSCRIBER_TOO_SLOW",
                    metadata={"resume_token": sub.token()},
                )
            try:
                item = sub.queue.get_nowait()  # the common case (events waiting) does not wait
            except asyncio.QueueEmpty:
                item = await sub.queue.get()
            if item is None:
                continue  # the shutdown sentinel; handled at the top of the loop
            if item is HEARTBEAT:
                yield pb.StreamEventsResponse(type=pb.EVENT_TYPE_HEARTBEAT, resume_token=sub.token())
                continue
            scope, seq = item.scope, item.sequence
            expected = sub.positions.get(scope, 0) + 1
            if seq < expected:
                continue  # already delivered by the catch-up read
            if seq > expected:
                pending.add(scope)  # a gap: read the log, which has everything in order
                continue
            sub.positions[scope] = seq
            sub.last_sent = loop.time()
            yield item.alone if len(sub.positions) == 1 else with_token(item.data, sub.token())
    finally:
        hub.unsubscribe(sub)
