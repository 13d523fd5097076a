"""Live event streams: one ChangeHub per process fans the durable change log out to subscribers.

The change log in the database is the source of truth (db/engine/events.py). The hub learns that a
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

Every open stream is re-authorised (see Grant): each event it delivers passes its caller's
current right to see the event's scope. The right is re-read, for all the streams of one caller
at once, when this process committed a change of credentials, when a Channel event (membership,
privacy) reaches one of the caller's scopes, when another replica says credentials changed
(PostgreSQL NOTIFY), and periodically for the rest; until the answer is known, the caller's
streams hold their next events. A stream whose right ended ends with PERMISSION_DENIED (a scope
it may no longer see, or no assigned role of its caller holds `chat.events.read` any more: a
change of a role or of an assignment is a change of credentials) or UNAUTHENTICATED (a revoked
or expired key, an inactive user).
"""
from __future__ import annotations

import asyncio
import logging
import select
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Any

import psycopg2
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from nexus.chat.v1 import chat_pb2 as pb

from db import errors
from db.database import COMMITTED_EVENTS_KEY, CREDENTIALS_CHANGED_KEY, Database
from db.domains import chat, identity
from db.engine import events
from db.engine.call import Call
from db.engine.resource import REGISTRY
from db.unit import SESSION_READ
from service import policy

log = logging.getLogger("nexus.streams")


class _ClientGone(logging.Filter):
    """grpc.aio logs a failed write of a stream as an ERROR with a traceback unless it has
    already seen the client cancel; a client that goes away while the server waits to write to
    it (flow control) loses that race. For StreamEvents a failed write means the client or its
    connection is gone, which is how streams end: logged as INFO, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.getMessage() == f"ExecuteBatchError raised in core by servicer method [{STREAM_METHOD}]":
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args, record.exc_info, record.exc_text = f"{STREAM_METHOD}: the client went away during a write", None, None, None
        return True


STREAM_METHOD = f"/{pb.DESCRIPTOR.services_by_name['ChatService'].full_name}/StreamEvents"
logging.getLogger("grpc._cython.cygrpc").addFilter(_ClientGone())

EVENT_TYPES = {
    events.CREATED: pb.EVENT_TYPE_CREATED,
    events.UPDATED: pb.EVENT_TYPE_UPDATED,
    events.DELETED: pb.EVENT_TYPE_DELETED,
}
READ_BATCH = 500
# Subscribers an event is put in front of before the event loop turns again: a fan-out to more
# is offered in slices, so the RPCs (a write's answer among them) that wait for the loop
# meanwhile wait for one slice's streams, not for all of them.
FANOUT_SLICE = 64
HEARTBEAT_TICK = 0.25  # seconds between the hub's checks for quiet streams
RECHECK_RETRY_SECONDS = 0.25  # after a re-check the database could not answer (streams hold meanwhile)


@dataclass(frozen=True)
class HubSettings:
    queue_size: int = 1000
    poll_seconds: float = 1.0
    default_heartbeat_seconds: float = 15.0
    # Open streams per caller (API key, JWT subject, or the one insecure-dev caller).
    max_streams_per_caller: int = 100
    # The periodic re-check of every open stream's rights (changes on other replicas).
    recheck_seconds: float = 1.0


@dataclass(frozen=True)
class Caller:
    """Who holds a stream: its rights are re-checked as this principal."""

    actor_type: str  # "api_key", "user" (JWT) or "system"
    actor_id: uuid.UUID | None
    role: str
    user_id: uuid.UUID | None
    # The credential as sent, to authenticate it again; held only while the stream is open.
    authorization: str | None = field(default=None, repr=False)
    # Whose streams it counts with for the per-caller limit, when not its own principal's (a
    # Watch, held by the system for a caller: service/ai_jobs.py).
    counted_as: tuple[str, uuid.UUID | None] | None = None

    @classmethod
    def of(cls, call: Call | None, authorization: str | None) -> Caller:
        if call is None:
            return SYSTEM_CALLER
        return cls(call.actor_type, call.actor_id, call.role, call.actor_user_id, authorization)

    @property
    def quota_key(self) -> tuple[str, uuid.UUID | None]:
        """One caller for the per-caller limit: the key, the JWT's user, or the system."""
        return self.counted_as or (self.actor_type, self.actor_id)


SYSTEM_CALLER = Caller("system", None, "admin", None)


class TooManyStreams(errors.ResourceExhausted):
    """A caller at its limit of open streams: RESOURCE_EXHAUSTED with QuotaFailure and RetryInfo."""

    def __init__(self, caller: Caller, limit: int) -> None:
        super().__init__(
            f"the caller has {limit} open streams, the most allowed; close one (or follow several scopes in one stream)",
            reason="TOO_MANY_STREAMS",
            metadata={"limit": str(limit)},
        )
        subject = f"{caller.actor_type}:{caller.actor_id}" if caller.actor_id else caller.actor_type
        self.extra_details = [
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject=subject, description=f"open StreamEvents calls per caller (NEXUS_MAX_STREAMS_PER_CALLER = {limit})"
                    )
                ]
            ),
        ]
        self.retry_delay = 1.0


def to_response(event: events.StoredEvent) -> pb.StreamEventsResponse:
    """A stream message for a stored event, without the per-stream resume token. A resource
    StreamEventsResponse has no field for (an AI job, whose scope only its own Watch follows,
    through the hub's wake-ups: service/ai_jobs.py) is left out of it."""
    field_name = REGISTRY[event.resource_type].singular_field
    commit_time = timestamp_pb2.Timestamp()
    commit_time.FromDatetime(event.create_time)
    response = pb.StreamEventsResponse(
        type=EVENT_TYPES[event.event_type], scope=event.scope, sequence=event.seq, commit_time=commit_time
    )
    if field_name in _RESOURCE_FIELDS:
        getattr(response, field_name).MergeFromString(event.payload)
    return response


_RESOURCE_FIELDS = frozenset(pb.StreamEventsResponse.DESCRIPTOR.fields_by_name)


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
# Put on a subscription's queue when its right ended (its `error` says how).
REVOKED = object()


class Grant:
    """The open streams of one caller, and how far their rights are known to hold.

    The hub's clock counts the signals that a right may have changed. `required` is the clock of
    the last signal for this caller's scopes (the hub's `all_required` counts for every caller);
    `verified` is the clock at which the last re-check that passed began. A stream delivers only
    while verified >= both: one comparison per event, no query."""

    __slots__ = ("caller", "subs", "verified", "required", "task", "settled")

    def __init__(self, caller: Caller, verified: int) -> None:
        self.caller = caller
        self.subs: set[Subscription] = set()
        self.verified = verified
        self.required = 0
        self.task: asyncio.Task[None] | None = None
        self.settled = asyncio.Event()  # set (and replaced) after each re-check


@dataclass(eq=False)
class Subscription:
    """One open stream: its cursor per scope and its bounded inbox."""

    positions: dict[str, int]
    queue: asyncio.Queue[Any]  # Offered, HEARTBEAT, REVOKED, or None (shutting down)
    heartbeat_seconds: float = 15.0
    last_sent: float = 0.0  # loop time of the last message the stream sent
    overflowed: bool = False
    closing: bool = False
    stale_scopes: set[str] = field(default_factory=set)
    grant: Grant | None = None
    error: errors.NexusError | None = None  # the right ended: the stream ends with this

    def offer(self, response: Offered) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(response)
        except asyncio.QueueFull:
            self.overflowed = True

    def token(self) -> str:
        return events.encode_token(self.positions)

    def revoke(self, error: errors.NexusError) -> None:
        if self.error is None:
            self.error = error
            try:
                self.queue.put_nowait(REVOKED)
            except asyncio.QueueFull:
                pass  # it is reading already; it sees `error` before its next event


class ChangeHub:
    """Per-process fan-out of the change log to subscriptions."""

    def __init__(self, db: Database, settings: HubSettings | None = None, authenticator: Any = None) -> None:
        self.db = db
        self.settings = settings or HubSettings()
        self.authenticator = authenticator  # service.auth.Authenticator, or None (insecure dev)
        self._grants: dict[Caller, Grant] = {}
        self._streams_of: dict[tuple[str, uuid.UUID | None], int] = {}  # open streams per caller
        # Signals that rights may have changed (see Grant). Bumped from database threads too
        # (a commit listener), under the lock; read without it on the delivery path.
        self.clock = 0
        self.all_required = 0
        self._clock_lock = threading.Lock()
        self._subs: dict[str, set[Subscription]] = defaultdict(set)
        self._known: dict[str, int] = {}  # scope -> last seq the hub has read and offered
        self._dirty: set[str] = set()
        self._reading: set[str] = set()  # scopes whose log _read_and_offer is reading
        self._wakeup = asyncio.Event()
        # Offers too large for one turn of the loop, in the order they were made (see _offer).
        self._fanout: deque[tuple[Offered, list[Subscription]]] = deque()
        self._fanning: dict[str, int] = {}  # scope -> its offers in _fanout or being made
        self._fanout_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: threading.Thread | None = None
        self._stopping = threading.Event()
        self.closed = False
        # Counted as they happen, read by service/metrics.py: events StreamEvents delivered as
        # they were offered (live) and read from the log (catch-up, gaps), streams cut off.
        self.delivered_live = 0
        self.delivered_from_log = 0
        self.cut_offs = 0

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
        if self._fanout_task is not None:
            self._fanout_task.cancel()
        self._fanout.clear()
        self._fanning.clear()
        for grant in self._grants.values():
            if grant.task is not None:
                grant.task.cancel()

    # -------------------------------------------------------------- wake-ups

    def on_commit(self, notes: dict[str, Any]) -> None:
        """Database commit listener: the events the transaction appended, to offer; a change of
        credentials, for every stream to re-check (here and, on PostgreSQL, on every replica)."""
        if notes.get(CREDENTIALS_CHANGED_KEY) and self._loop is not None:
            # Before the RPC that made the change answers: anything committed after it is held.
            self._require_all_threadsafe()
            if self.db.is_postgres:
                try:
                    events.notify_access(self.db.read_engine)
                except Exception as exc:  # noqa: BLE001 - the other replicas' periodic re-check covers it
                    log.warning("could not tell other replicas that credentials changed (%s)", type(exc).__name__)
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
                        if note.payload == events.ACCESS_NOTE:
                            self._require_all_threadsafe()  # before the events notified after it
                            continue
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
        """The fallback: a lost notification delays an event by at most one poll, never loses it.

        Also the periodic re-check of every stream's rights, for changes on other replicas that
        no notification reports (SQLite has none; a lost one on PostgreSQL). It is asked for
        before the log is read, so the events this poll finds wait for its answer."""
        loop = asyncio.get_running_loop()
        tick = min(self.settings.poll_seconds, self.settings.recheck_seconds)
        polled = rechecked = loop.time()
        while True:
            await asyncio.sleep(tick)
            now = loop.time()
            if now - rechecked >= self.settings.recheck_seconds - tick / 2:
                rechecked = now
                if self._grants:
                    self._require_all()
            if now - polled < self.settings.poll_seconds - tick / 2:
                continue
            polled = now
            scopes = list(self._subs)
            if not scopes:
                continue
            try:
                latest = await self.db.run(lambda s: events.last_sequences(s, scopes), SESSION_READ)  # noqa: B023 - run and awaited within this iteration
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
                    batch = await self.db.run(lambda s: events.read_after(s, scope, after, READ_BATCH), SESSION_READ)  # noqa: B023 - run and awaited within this iteration
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

    def _offer(self, event: events.StoredEvent, subs: list[Subscription]) -> None:
        """Put the event on its subscribers' queues: at once when they are few and no earlier
        offer of its scope is still under way; otherwise behind the earlier large offers,
        FANOUT_SLICE subscribers a turn of the loop. Either way a scope's events are offered in
        order, which is all a stream needs (its cursor is per scope)."""
        data = to_response(event).SerializeToString()
        offered = Offered(event.scope, event.seq, data, with_token(data, events.encode_token({event.scope: event.seq})))
        if REGISTRY[event.resource_type].changes_stream_access:
            # Members or privacy may have changed: the event itself waits for the answer.
            self.require({sub.grant for sub in subs if sub.grant is not None})
        if len(subs) <= FANOUT_SLICE and event.scope not in self._fanning:
            for sub in subs:
                sub.offer(offered)
            return
        self._fanning[event.scope] = self._fanning.get(event.scope, 0) + 1
        self._fanout.append((offered, subs))
        if self._fanout_task is None:
            self._fanout_task = asyncio.create_task(self._fan_out())

    async def _fan_out(self) -> None:
        """The queued offers, in order, one slice of subscribers per turn of the event loop."""
        try:
            while self._fanout:
                offered, subs = self._fanout.popleft()
                for start in range(0, len(subs), FANOUT_SLICE):
                    if start:
                        await asyncio.sleep(0)
                    for sub in subs[start : start + FANOUT_SLICE]:
                        sub.offer(offered)
                left = self._fanning[offered.scope] - 1
                if left:
                    self._fanning[offered.scope] = left
                else:
                    del self._fanning[offered.scope]
                await asyncio.sleep(0)
        finally:
            self._fanout_task = None

    # -------------------------------------------------------------- re-authorisation

    def _tick(self) -> int:
        with self._clock_lock:
            self.clock += 1
            return self.clock

    def _require_all_threadsafe(self) -> None:
        """From any thread: every stream holds its next event until its caller is re-checked."""
        self.all_required = self._tick()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_all_checks)

    def _require_all(self) -> None:
        self.all_required = self._tick()
        self._start_all_checks()

    def _start_all_checks(self) -> None:
        self._start_checks(list(self._grants.values()))

    def require(self, grants: Iterable[Grant]) -> None:
        """These callers' streams hold their next event until their rights are re-checked."""
        grants = list(grants)
        if grants:
            now = self._tick()
            for grant in grants:
                grant.required = now
            self._start_checks(grants)

    def _start_checks(self, grants: Iterable[Grant]) -> None:
        for grant in grants:
            if grant.task is None and grant.subs:
                grant.task = asyncio.create_task(self._recheck(grant))

    @staticmethod
    def due(grant: Grant, all_required: int) -> bool:
        return grant.verified < grant.required or grant.verified < all_required

    async def _recheck(self, grant: Grant) -> None:
        """Re-check one caller until its rights are known as of the latest signal."""
        try:
            while grant.subs and self.due(grant, self.all_required):
                began = self.clock
                try:
                    denied = await self._rights(grant)
                except (errors.Unauthenticated, errors.PermissionDenied) as exc:
                    for sub in list(grant.subs):
                        sub.revoke(exc)
                    return
                except errors.NexusError as exc:
                    log.warning("could not re-check the rights of %s's streams (%s); their events wait", grant.caller.actor_type, exc.message)
                    await asyncio.sleep(RECHECK_RETRY_SECONDS)
                    continue
                except Exception:  # noqa: BLE001 - a bug: logged once, the streams end (a reconnect checks afresh)
                    log.exception("the re-check of %s's streams failed", grant.caller.actor_type)
                    failed = errors.Unavailable("the stream's access could not be re-checked; reconnect", reason="ACCESS_RECHECK_FAILED")
                    for sub in list(grant.subs):
                        sub.revoke(failed)
                    return
                for sub in list(grant.subs):
                    lost = next((denied[scope] for scope in sub.positions if scope in denied), None)
                    if lost is not None:
                        sub.revoke(lost)
                grant.verified = max(grant.verified, began)
                settled, grant.settled = grant.settled, asyncio.Event()
                settled.set()
        finally:
            grant.task = None
            settled, grant.settled = grant.settled, asyncio.Event()
            settled.set()

    async def _rights(self, grant: Grant) -> dict[str, errors.NexusError]:
        """The scopes of the caller's streams it may no longer see; raises when its credential
        no longer holds. One unit of work for all of the caller's streams."""
        caller = grant.caller
        if caller.actor_type == "system":
            return {}
        role = caller.role
        if caller.actor_type == "user" and self.authenticator is not None and caller.authorization is not None:
            # A JWT's own rules (its expiry, its role claim): the Authenticator's. An API key's
            # row is read afresh by stream_access, which is all the Authenticator would read.
            role = (await self.authenticator.authenticate(caller.authorization)).role
        scopes = list({scope for sub in grant.subs for scope in sub.positions})

        def read(s: Any) -> tuple[dict[str, errors.NexusError], list[tuple[str, list[str] | None]]]:
            denied = chat.stream_access(s, caller.actor_type, caller.actor_id, caller.user_id, role, scopes)
            return denied, identity.assigned_roles(s, caller.user_id)

        denied, assigned = await self.db.run(read, SESSION_READ)
        # The method itself, as a new call would be checked: its roles may have lost the permission.
        policy.authorize(role, policy.action_for(STREAM_METHOD), STREAM_METHOD, policy.permission_for(STREAM_METHOD), policy.held_permissions(assigned))
        return denied

    async def settle(self, sub: Subscription) -> None:
        """Wait until the stream's caller is re-checked (or the server shuts down); raise the
        error that ends it, if any."""
        grant = sub.grant
        while sub.error is None and not sub.closing and grant is not None and self.due(grant, self.all_required):
            self._start_checks([grant])
            await grant.settled.wait()
        if sub.error is not None:
            raise sub.error

    # -------------------------------------------------------------- subscriptions

    async def subscribe(
        self, positions: dict[str, int], heartbeat_seconds: float | None = None, caller: Caller = SYSTEM_CALLER, checked_at: int | None = None
    ) -> Subscription:
        """A new stream of `caller`, whose scopes were found visible at hub clock `checked_at`
        (db/domains/chat.stream_positions; None: now)."""
        if self.closed:
            raise errors.Unavailable("the server is shutting down; reconnect", reason="SERVER_SHUTTING_DOWN")
        open_now = self._streams_of.get(caller.quota_key, 0)
        if open_now >= self.settings.max_streams_per_caller:
            raise TooManyStreams(caller, self.settings.max_streams_per_caller)
        self._streams_of[caller.quota_key] = open_now + 1
        sub = Subscription(
            dict(positions),
            asyncio.Queue(self.settings.queue_size),
            heartbeat_seconds or self.settings.default_heartbeat_seconds,
            asyncio.get_running_loop().time(),
        )
        checked_at = self.clock if checked_at is None else checked_at
        grant = self._grants.get(caller)
        if grant is None:
            grant = self._grants[caller] = Grant(caller, checked_at)
        sub.grant = grant
        grant.subs.add(sub)
        if checked_at < self.clock:
            self.require([grant])  # a signal came while its scopes were being checked
        new_scopes = [s for s in positions if s not in self._subs]
        for scope in positions:
            self._subs[scope].add(sub)
        if new_scopes:
            try:
                latest = await self.db.run(lambda s: events.last_sequences(s, new_scopes), SESSION_READ)
            except BaseException:
                self.unsubscribe(sub)
                raise
            for scope, (last, _) in latest.items():
                self._known[scope] = max(self._known.get(scope, 0), last)
        return sub

    def known(self, scope: str) -> int:
        """The last sequence of `scope` the hub has seen (read, or found at subscription)."""
        return self._known.get(scope, 0)

    def unsubscribe(self, sub: Subscription) -> None:
        grant = sub.grant
        if grant is not None and sub in grant.subs:
            grant.subs.discard(sub)
            if not grant.subs and self._grants.get(grant.caller) is grant:
                del self._grants[grant.caller]
            key = grant.caller.quota_key
            left = self._streams_of.get(key, 1) - 1
            if left > 0:
                self._streams_of[key] = left
            else:
                self._streams_of.pop(key, None)
        for scope in sub.positions:
            subs = self._subs.get(scope)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subs[scope]
                    self._known.pop(scope, None)

    def load(self) -> tuple[int, int, int]:
        """From any thread: the open streams (StreamEvents and Watch), the events waiting in their
        queues, and the most waiting in one queue. Each set is copied at once (list() holds the
        GIL), so the event loop changing them meanwhile does no harm."""
        streams = queued = deepest = 0
        for grant in list(self._grants.values()):
            for sub in list(grant.subs):
                streams += 1
                depth = sub.queue.qsize()
                queued += depth
                deepest = max(deepest, depth)
        return streams, queued, deepest

    @property
    def subscription_count(self) -> int:
        return len({id(s) for subs in self._subs.values() for s in subs})

    @property
    def caller_count(self) -> int:
        """Callers with at least one open stream."""
        return len(self._streams_of)


async def stream(
    hub: ChangeHub,
    db: Database,
    positions: dict[str, int],
    heartbeat_seconds: float,
    caller: Caller = SYSTEM_CALLER,
    checked_at: int | None = None,
) -> AsyncIterator[pb.StreamEventsResponse | bytes]:
    """The events of one subscription: catch-up from the log, then live, never a gap or a repeat,
    each only while the caller may still see its scope (checked_at: the hub's clock when the
    scopes were found visible).

    Live events come out already serialized (bytes of a StreamEventsResponse, see Offered):
    the method's serializer passes bytes through (service/interceptors.py)."""
    sub = await hub.subscribe(positions, heartbeat_seconds, caller, checked_at)
    grant = sub.grant
    assert grant is not None
    loop = asyncio.get_running_loop()
    try:
        # Scopes whose log must be read before live events are trusted: those behind the hub.
        pending = {scope for scope, seq in positions.items() if seq < hub.known(scope)}
        while True:
            while pending:
                scope = pending.pop()
                after = sub.positions[scope]
                batch = await db.run(lambda s: events.read_after(s, scope, after, READ_BATCH), SESSION_READ)  # noqa: B023 - run and awaited within this iteration
                for event in batch:
                    if REGISTRY[event.resource_type].changes_stream_access:
                        hub.require([grant])
                    if sub.error is not None or hub.due(grant, hub.all_required):
                        await hub.settle(sub)
                        if sub.closing:
                            break
                    response = to_response(event)
                    sub.positions[scope] = event.seq
                    response.resume_token = sub.token()
                    sub.last_sent = loop.time()
                    hub.delivered_from_log += 1
                    yield response
                    if sub.overflowed or sub.closing:
                        break
                if len(batch) == READ_BATCH:
                    pending.add(scope)
            if sub.closing:
                yield pb.StreamEventsResponse(type=pb.EVENT_TYPE_SERVER_SHUTDOWN, resume_token=sub.token())
                return
            if sub.overflowed:
                hub.cut_offs += 1
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
            if item is HEARTBEAT and sub.error is None:  # no data: not held while a re-check runs
                yield pb.StreamEventsResponse(type=pb.EVENT_TYPE_HEARTBEAT, resume_token=sub.token())
                continue
            if sub.error is not None or grant.verified < grant.required or grant.verified < hub.all_required:
                await hub.settle(sub)  # raises when the caller's right ended (REVOKED is only a wake-up)
            if item is REVOKED or item is HEARTBEAT or sub.closing:
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
            hub.delivered_live += 1
            yield item.alone if len(sub.positions) == 1 else with_token(item.data, sub.token())
    finally:
        hub.unsubscribe(sub)
