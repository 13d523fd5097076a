"""Engine, session factory and the unit of work every RPC runs in."""
from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import functools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import orjson
from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db import errors
from db.base import ResourceMixin
from db.connections import KeptConnections, answers
from db.prepared import run_on_cursor
from db.timeouts import STATEMENT_TIMEOUT_KEY, busy_timeout, database_deadline, past_deadline_uncommitted, statement_timeout, too_late
from db.translate import UNREACHABLE, RetryableConflict, database_busy, settled, translate
from db.unit import FALLBACK, PLAN_KEY, TRANSACTION, CoreReads, Mode, OneStatement, Plan

log = logging.getLogger(__name__)
# Session.info key under which engine/events.py lists the events (StoredEvent) a transaction appended.
COMMITTED_EVENTS_KEY = "nexus_events"
# Session.info key set when a transaction changed an API key or a user (cached credentials go stale).
CREDENTIALS_CHANGED_KEY = "nexus_credentials_changed"
T = TypeVar("T")


@dataclass(frozen=True)
class PoolSettings:
    size: int = 10
    # No overflow by default: overflow connections are closed on check-in once the pool is full,
    # so under load they are opened and closed on nearly every call (bench/README.md).
    max_overflow: int = 0
    timeout: float = 10.0
    recycle: int = 1800
    pre_ping: bool = True
    # pre_ping tests a connection only when it sat idle at least this long (seconds).
    ping_after: float = 5.0


_BEGIN = {mode: f"BEGIN {mode}" for mode in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE")}


def _note_pool(_dbapi_conn: Any, record: Any, proxy: Any) -> None:
    """Pool checkout: the pool the connection belongs to (its proxy's; None where SQLAlchemy has
    no such attribute, and then nothing is closed for it)."""
    record.info["nexus_pool"] = getattr(proxy, "_pool", None)


def _close_if_replaced(engine: Engine, dbapi_conn: Any, record: Any) -> None:
    """Pool checkin: a connection in use when Database.release_connections replaced its engine's
    pool (a burst's write, libpq's buffers at its largest statement) is closed as it comes back,
    to the pool that was replaced, which would otherwise keep it."""
    pool = record.info.get("nexus_pool")
    if dbapi_conn is not None and pool is not None and pool is not engine.pool:
        record.close()

# SQLite's soft heap limit, for the whole process (every connection's page cache, schema and
# statements together). Each connection caches up to 2 MB of pages (cache_size -2000), and a
# server keeps a dozen connections: a burst of large rows left ~20 MiB in their caches for
# good (bench/memory.py). Above this limit a cache reuses its own pages instead of growing;
# the pages are also in the operating system's file cache, which is where SQLite reads them
# from again.
SQLITE_SOFT_HEAP_LIMIT = 8 << 20


def _configure_sqlite(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from pysqlite so BEGIN is ours (see _on_begin).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA soft_heap_limit={SQLITE_SOFT_HEAP_LIMIT}")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A write transaction that starts DEFERRED and upgrades later can fail with SQLITE_BUSY
        # at once, without waiting on busy_timeout; BEGIN IMMEDIATE takes the write lock up front.
        # Reads ("NONE") open no transaction: each statement is its own, as on PostgreSQL's
        # READ COMMITTED, and nothing is left to COMMIT.
        # On the DBAPI cursor (errors wrapped as SQLAlchemy's execution wraps them): the BEGIN of
        # every SQLite write is in the one writer's turn, which bounds every SQLite write's
        # throughput, and SQLAlchemy's execution around it is Python spent in that turn
        # (bench/README.md).
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        if mode != "NONE":
            run_on_cursor(conn, _BEGIN[mode], ())


# Why a database URL naming an in-memory SQLite database is refused (by the settings, and here):
# the database lives and dies with one connection, and the engine, the read pool and the write
# connection would each open their own, empty one.
IN_MEMORY_REFUSED = (
    "names an in-memory SQLite database, which is lost with its connection, and each worker and pool would get its own: "
    "use a file path"
)


def is_in_memory(url: str) -> bool:
    """Whether url names an in-memory SQLite database (sqlite://, :memory:, a mode=memory URI)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return False
    database = parsed.database or ""
    return database in ("", ":memory:") or database.startswith("file::memory:") or parsed.query.get("mode") == "memory"


def json_text(value: Any) -> str:
    """A JSON column's text on SQLite (a Struct, an audit entry's changes): orjson's, compact. The
    standard library's took a twentieth of a batch of 5,000 creates, for two values a row. Keys
    that are not strings are written as text, as json.dumps writes them."""
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def create_db_engine(url: str, pool: PoolSettings, echo: bool = False, autocommit: bool = False) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if is_in_memory(url):
            raise ValueError(f"the database URL {IN_MEMORY_REFUSED}")
        database = parsed.database or ""
        Path(database).parent.mkdir(parents=True, exist_ok=True)
        # No pre-ping: a SQLite "connection" is a file handle, there is no server to lose.
        engine = create_engine(
            url,
            echo=echo,
            hide_parameters=True,  # DB_ECHO must never log a password hash or a key secret
            pool_size=pool.size,
            max_overflow=pool.max_overflow,
            pool_timeout=pool.timeout,
            connect_args={"check_same_thread": False, "timeout": pool.timeout},
            json_serializer=json_text,
            json_deserializer=orjson.loads,  # the stdlib's json.loads took ~7 % of a task page's CPU
        )
        _configure_sqlite(engine, int(pool.timeout * 1000))
        return engine
    engine = create_engine(
        url,
        echo=echo,
        hide_parameters=True,
        pool_size=pool.size,
        max_overflow=pool.max_overflow,
        pool_timeout=pool.timeout,
        pool_recycle=pool.recycle,
        connect_args={"connect_timeout": max(1, int(pool.timeout)), "application_name": "nexus-data"},
        **({"isolation_level": "AUTOCOMMIT"} if autocommit else {}),
    )
    if pool.pre_ping:
        _ping_idle_connections(engine, pool.ping_after)
    event.listen(engine, "do_connect", _cap_connect_timeout)
    event.listen(engine, "connect", _session_settings)
    return engine


def _session_settings(dbapi_conn: Any, _record: Any) -> None:
    """Each new PostgreSQL connection's settings: no synchronized scans. A sequential scan of a
    large table otherwise starts where another one under way is, so the first rows of a
    statement without an order (the window a Search ranks, db/engine/statements.py) could
    differ from one call to the next, and a Search's pages with them."""
    with dbapi_conn.cursor() as cursor:
        cursor.execute("SET synchronize_seqscans = off")
    dbapi_conn.commit()


# While set (Database.wait_until_reachable), the most seconds a new PostgreSQL connection of
# this thread may take to be made: psycopg2's connect_timeout of that attempt, lowered to it.
_CONNECT_TIMEOUT_CAP: contextvars.ContextVar[int | None] = contextvars.ContextVar("nexus_connect_timeout_cap", default=None)


def _cap_connect_timeout(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
    cap = _CONNECT_TIMEOUT_CAP.get()
    if cap is not None:
        cparams["connect_timeout"] = min(int(cparams.get("connect_timeout") or cap), cap)


def _ping_idle_connections(engine: Engine, idle_seconds: float) -> None:
    """Pre-ping a pooled connection only when it sat idle for a while.

    SQLAlchemy's pool_pre_ping costs a round trip on every checkout, i.e. on every RPC. A
    connection returned moments ago is as good as the last query it ran; one that sat idle may
    have been cut by a restart or a firewall. If a busy connection dies anyway, the failing call
    is UNAVAILABLE and SQLAlchemy invalidates the whole pool, so the next calls reconnect.
    """

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_conn: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_conn: Any, record: Any, proxy: Any) -> None:
        if time.monotonic() - record.info.get("idle_since", 0.0) >= idle_seconds and not answers(dbapi_conn):
            raise DisconnectionError()


class DatabaseUnreachable(RuntimeError):
    """The database did not answer within the wait at start: `where` is its host:port."""

    def __init__(self, where: str, waited: float, detail: str) -> None:
        super().__init__(f"the database at {where} did not answer within {waited:g}s: {detail}")
        self.where = where
        self.waited = waited
        self.detail = detail


# What PostgreSQL answers while it cannot take connections yet (or for now): worth waiting for.
# Any other answer (no such database, role or password) is the URL's fault: no wait mends it.
_PASSING_REFUSALS = ("starting up", "shutting down", "in recovery mode", "too many clients", "connection slots are reserved")
# The pauses between attempts double from the first up to the cap.
FIRST_WAIT_SECONDS = 0.25
MAX_WAIT_SECONDS = 5.0


def worth_waiting(exc: BaseException) -> bool:
    """Whether a failure to connect to PostgreSQL may pass: no answer at all (refused, timed
    out, a host name not resolvable yet: a pod starting before its database or its DNS entry),
    or a server that is not taking connections yet."""
    if not isinstance(exc, OperationalError):
        return False
    text = str(exc.orig)
    return "FATAL:" not in text or any(refusal in text for refusal in _PASSING_REFUSALS)


def first_line(exc: BaseException) -> str:
    """The first line of a driver's message, without SQLAlchemy's decorations."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Progress:
    """How far one attempt of a unit of work got: whether it reached its commit."""

    __slots__ = ("committing",)

    def __init__(self) -> None:
        self.committing = False


class WriteThread(Executor):
    """The one thread SQLite writes run on, in the order they came.

    A ThreadPoolExecutor of one worker, but it tells its owner when it has nothing more to do
    (`on_idle`, called on the thread): the write connection is kept from one write to the next
    while writes are waiting, and given back to the pool once none is, so that a write of
    another thread (the CLI, a test) is not kept from it for long."""

    def __init__(self, name: str, on_start: Callable[[], None], on_idle: Callable[[], None]) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._on_start = on_start
        self._on_idle = on_idle
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Writes queued behind the one under way."""
        return self._queue.qsize()

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        future: Future[T] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._queue.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        self._on_start()
        while True:
            item = self._queue.get()
            if item is None:
                break
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller, as ThreadPoolExecutor does
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                del future, fn, args, kwargs, item
            if self._queue.empty():
                self._on_idle()
        self._on_idle()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                if cancel_futures:
                    while True:
                        try:
                            item = self._queue.get_nowait()
                        except queue.Empty:
                            break
                        if item is not None:
                            item[0].cancel()
                self._queue.put(None)
        if wait and self._thread is not threading.current_thread():
            self._thread.join()


class Database:
    """Owns the engine and runs units of work in a bounded thread pool off the event loop."""

    max_attempts = 5

    def __init__(self, url: str, pool: PoolSettings | None = None, echo: bool = False) -> None:
        self.url = url
        self.pool = pool or PoolSettings()
        self.engine = create_db_engine(url, self.pool, echo)
        self.dialect = self.engine.dialect.name
        write_engine = self.engine.execution_options(sqlite_begin="IMMEDIATE")
        self._writer: Engine | None = None
        if not self.is_postgres:
            # SQLite has one writer at a time. With one write connection, writers queue in the
            # pool (woken as soon as it is free) instead of polling the file lock in SQLite's
            # busy handler, which sleeps between tries and made write latency spiky.
            self._writer = create_db_engine(url, dataclasses.replace(self.pool, size=1, max_overflow=0), echo)
            write_engine = self._writer.execution_options(sqlite_begin="IMMEDIATE")
        # One worker per pooled connection: a unit of work never waits for a thread while it
        # holds a connection, and the event loop never blocks on the database.
        workers = max(2, self.pool.size + self.pool.max_overflow)
        # Each worker keeps its own read connection (_Owned), so the read pool has one per worker,
        # and a little overflow for reads of other threads (the CLI, tests, the health check's).
        read_pool = dataclasses.replace(self.pool, size=workers, max_overflow=2)
        if self.is_postgres:
            # Under READ COMMITTED every statement takes its own snapshot, inside a transaction
            # or not: a read-only unit of work loses nothing without one, and saves the BEGIN
            # and COMMIT round trips (half of those of a Get). Its own pool, because switching
            # a pooled connection in and out of autocommit costs more than the round trips.
            self.read_engine = create_db_engine(url, read_pool, echo, autocommit=True)
        else:
            # Its own pool too, so that the connections the workers keep never starve the
            # engine's other users (the health check, migrations).
            self.read_engine = create_db_engine(url, read_pool, echo).execution_options(sqlite_begin="NONE")
        self._read_sessions = sessionmaker(self.read_engine, expire_on_commit=False, autoflush=False)
        self._write_engine = write_engine
        self._write_sessions = sessionmaker(write_engine, expire_on_commit=False, autoflush=False)
        self._commit_listeners: list[Callable[[dict[str, Any]], None]] = []
        # Whether the database answered the last call that reached it (note_reachable).
        self.reachable = True
        self._reachability_listeners: list[Callable[[bool], None]] = []
        # Told (plan, seconds) after each unit of work run() awaited, a failed one too: from its
        # submission to its answer, the wait for a database thread included (service/metrics.py).
        self.timing: Callable[[Plan, float], None] | None = None
        event.listen(self._write_sessions, "after_commit", self._after_commit)
        # A pooled connection checked in to a pool release_connections replaced is closed: the
        # replaced pool would keep it, with libpq's buffers, until the garbage collector's next
        # full pass, which an idle server does not make.
        if self.is_postgres:
            for pooled in (self.engine, self.read_engine):
                event.listen(pooled, "checkout", _note_pool)
                event.listen(pooled, "checkin", functools.partial(_close_if_replaced, pooled))
        self._kept = KeptConnections(self.read_engine, write_engine, self.pool, self.is_postgres)
        self._runners = {
            Mode.READ: self._run_read,
            Mode.SESSION_READ: self._run_read,
            Mode.TRANSACTION: self._run_transaction,
            Mode.ONE_STATEMENT: self._run_one_statement,
        }
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nexus-db", initializer=self._kept.own_reads)
        # SQLite writes get one thread, for the one write connection: they wait in its queue
        # instead of as threads parked on the pool, each wake-up a context switch and a GIL
        # hand-off. One that waited past the pool timeout is DATABASE_BUSY, as on the pool.
        # The thread keeps the connection while writes are queued (WriteThread): a checkout, a
        # Connection and a check-in less in the one writer's turn.
        self.write_executor: Executor = self.executor
        if self._writer is not None:
            self.write_executor = WriteThread("nexus-db-write", self._kept.own_writes, self._kept.give_back_write)

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    def run_sync(self, work: Callable[[Any], T], plan: Plan = TRANSACTION, *, deadline: float | None = None, resource_type: str = "") -> T:
        """Run work(unit) as plan says (db/unit.py), retrying conflicts and translating errors.

        The unit of work gets a CoreReads (plan READ), a Session (SESSION_READ, TRANSACTION) or a
        OneStatement (ONE_STATEMENT); plan_of(unit) is plan. A write commits on success; one
        whose plan was ONE_STATEMENT and that raises errors.NeedsTransaction (before writing)
        runs again in a transaction, under FALLBACK. Commit listeners hear of every commit.
        """
        if deadline is not None and not self.is_postgres and time.monotonic() > deadline:
            # (PostgreSQL checks it with the statement timeout.) A call queued past its deadline.
            raise too_late()
        until = database_deadline(deadline)
        attempt = 0
        while attempt < self.max_attempts:
            attempt += 1
            # Set from where a failure may leave the change committed: the COMMIT, or the one
            # statement that is its own commit (autocommit). Before it, a failure rolls back.
            progress = _Progress()
            try:
                return self._runners[plan.mode](work, plan, until, deadline, progress)
            except errors.NeedsTransaction:
                if plan.mode is not Mode.ONE_STATEMENT:
                    raise
                plan = FALLBACK  # not counted as an attempt
                attempt -= 1
            except Exception as exc:  # noqa: BLE001 - every database error is translated here, once
                time.sleep(self._after_failure(exc, resource_type, attempt, until, progress.committing))
        raise AssertionError("unreachable")

    def _run_read(self, work: Callable[[Any], T], plan: Plan, until: float | None, deadline: float | None, progress: _Progress) -> T:
        """READ and SESSION_READ: on the thread's read connection (PostgreSQL: autocommit, each
        statement its own snapshot; SQLite: no transaction kept)."""
        with self._kept.reading() as conn:
            if self.is_postgres:
                statement_timeout(conn, until, record=True)  # autocommit: in force at once
            if plan.mode is Mode.READ:
                return work(CoreReads(conn, plan))
            with self._read_sessions(bind=conn) as session:
                session.info[PLAN_KEY] = plan
                with session.begin():
                    return work(session)

    def _run_one_statement(self, work: Callable[[Any], T], plan: Plan, until: float | None, deadline: float | None, progress: _Progress) -> T:
        """ONE_STATEMENT: PostgreSQL in autocommit on a read connection (the statement is the
        commit: its answer is the truth, deadline or not); SQLite in one IMMEDIATE transaction
        on the write connection, committed unless the deadline passed."""
        if self.is_postgres:
            with self._kept.reading() as conn:
                statement_timeout(conn, until, record=True)
                unit = OneStatement(conn, plan)
                try:
                    result = work(unit)
                finally:
                    # Its reads failing leave nothing written; its statement failing may not.
                    progress.committing = unit.writing
            self._notify(unit.info)
            return result
        kept = self._kept.write()
        if kept is not None:
            busy_timeout(kept, until, int(self.pool.timeout * 1000))
        conn = kept if kept is not None else self._write_engine.connect()
        try:
            with conn.begin():
                unit = OneStatement(conn, plan)
                result = work(unit)
                self._check_deadline(deadline)
                progress.committing = True
        finally:
            if kept is None:
                conn.close()
        self._notify(unit.info)
        return result

    def _run_transaction(self, work: Callable[[Any], T], plan: Plan, until: float | None, deadline: float | None, progress: _Progress) -> T:
        """TRANSACTION: a Session on the write connection; committed unless the deadline passed
        (the caller has given up: DEADLINE_EXCEEDED, and a retry would write it twice)."""
        kept = self._kept.write()
        if kept is not None:
            busy_timeout(kept, until, int(self.pool.timeout * 1000))
        with self._write_sessions(**({"bind": kept} if kept is not None else {})) as session:
            session.info[PLAN_KEY] = plan
            with session.begin():
                timeout = statement_timeout(session.connection(), until) if self.is_postgres else None
                result = work(session)
                self._check_unflushed(session)
                self._check_deadline(deadline)
                progress.committing = True
            if timeout is not None:
                # Committed, so the SET holds; a rolled-back one left the old value.
                timeout[0][STATEMENT_TIMEOUT_KEY] = timeout[1]
            return result

    @staticmethod
    def _check_unflushed(session: Session) -> None:
        """Sessions do not flush on their own (autoflush is off): a change to a resource's row
        (ResourceMixin) must have gone through engine/changes.flush, which audits it, before the
        COMMIT's own flush, which would write it without its audit entry. A bug if not."""
        left = sorted({type(obj).__name__ for obj in (*session.new, *session.dirty, *session.deleted) if isinstance(obj, ResourceMixin)})
        if left:
            raise AssertionError(f"a unit of work left changes to {', '.join(left)} unflushed: flush them with engine/changes.flush")

    @staticmethod
    def _check_deadline(deadline: float | None) -> None:
        if deadline is not None and time.monotonic() > deadline:
            raise past_deadline_uncommitted()

    def _after_failure(self, exc: Exception, resource_type: str, attempt: int, until: float | None, committing: bool) -> float:
        """What a failed attempt means: the pause before the next one (a conflict that may pass),
        or the translated error, raised."""
        translated = translate(exc, resource_type)
        unreachable = self.is_postgres and isinstance(translated, errors.Unavailable) and translated.reason == UNREACHABLE
        if unreachable or getattr(exc, "connection_invalidated", False):
            # (On PostgreSQL also when connecting failed: the connections kept from before the
            # outage are as lost, if they have not been used since.)
            self._kept.lost()
            if unreachable:
                self._drop_pooled()
        if isinstance(translated, RetryableConflict):
            pause = random.uniform(0.005, 0.02) * attempt
            if until is not None and time.monotonic() + pause >= until:
                # (On SQLite the wait for the write lock is bounded by the deadline too.)
                raise settled(
                    errors.DeadlineExceeded("the transaction kept conflicting with concurrent ones until the call's deadline"),
                    maybe_committed=False,
                ) from exc
            if attempt < self.max_attempts:
                return pause
            raise errors.Aborted("the transaction kept conflicting with concurrent ones; retry the call", reason="TRANSACTION_CONFLICT") from exc
        if isinstance(translated, errors.NexusError):
            # A statement cut by its timeout rolled back, even the one that would have been its
            # own commit; anything else that failed while committing on PostgreSQL may not have
            # (the COMMIT may have gone through and its answer been lost). A SQLite COMMIT that
            # fails has not committed.
            settled(translated, maybe_committed=committing and self.is_postgres and translated.reason != "STATEMENT_TIMEOUT")
        if translated is exc:
            raise exc
        raise translated from exc

    def _drop_pooled(self) -> None:
        """A unit of work lost its connection to PostgreSQL: the pooled ones, opened before, are
        likely lost too; new pools take their place (the checked-out ones go back to the old pools, which
        close them), so that the first calls after the database is back do not fail on them one
        by one (each failure would make the server NOT_SERVING again)."""
        for engine in self.engines:
            engine.dispose(close=False)

    def release_connections(self) -> None:
        """PostgreSQL: close the idle connections (the pools' and the threads' kept ones now, a
        kept one in use before its thread's next use) so that the next calls open new ones:
        libpq's buffers, kept at the size of the largest statement or result a connection
        carried, go with it. Called by the server's MemoryTrimmer after a burst; connections in
        use finish their work first. SQLite: nothing (closing its connections gave back 3 MiB
        after a burst, and new ones opened while writes run met a busy database, UNAVAILABLE,
        under releases every 0.1 s; its page caches are bounded by SQLITE_SOFT_HEAP_LIMIT)."""
        if not self.is_postgres:
            return
        self._kept.lost()
        self._kept.release_idle()
        for engine in self.engines:
            engine.dispose()

    @property
    def engines(self) -> list[Engine]:
        """Every engine of the database, each once: the main one, the reads' and SQLite's writer's."""
        return [self.engine, self.read_engine, *((self._writer,) if self._writer is not None else ())]

    async def run(self, work: Callable[[Any], T], plan: Plan = TRANSACTION, *, deadline: float | None = None, resource_type: str = "") -> T:
        """run_sync on a database thread: writes of SQLite on its one write thread, the rest on the pool's."""
        loop = asyncio.get_running_loop()
        ctx = contextvars.copy_context()
        executor: Executor = self.executor
        if plan.writes and self.write_executor is not self.executor:
            queued = time.monotonic()
            executor = self.write_executor

            def unit() -> T:
                now = time.monotonic()
                if deadline is not None and now > deadline:
                    raise too_late()
                if now - queued > self.pool.timeout:
                    raise database_busy()
                return ctx.run(self.run_sync, work, plan, deadline=deadline, resource_type=resource_type)

        else:

            def unit() -> T:
                return ctx.run(self.run_sync, work, plan, deadline=deadline, resource_type=resource_type)

        began = time.perf_counter()
        try:
            result = await loop.run_in_executor(executor, unit)
        except errors.Unavailable as exc:
            if exc.reason == UNREACHABLE:
                self.note_reachable(False)
            raise
        finally:
            if self.timing is not None:
                self.timing(plan, time.perf_counter() - began)
        if not self.reachable:  # the one cost of this on the way of every call: a flag read
            self.note_reachable(True)
        return result

    def load(self) -> tuple[dict[str, int], dict[str, int]]:
        """How busy the database is, from any thread: the connections checked out of each pool
        ("read", and "write": SQLite's one write connection, or PostgreSQL's transactions'),
        kept ones included; and the units of work waiting: for a database thread ("threads":
        each thread keeps one pooled connection, so this is the wait for a connection) and, on
        SQLite, for the one write connection ("sqlite_write")."""
        in_use = {"read": self.read_engine.pool.checkedout(), "write": (self._writer or self.engine).pool.checkedout()}  # type: ignore[attr-defined]
        waiting = {"threads": self.executor._work_queue.qsize()}  # (ThreadPoolExecutor's queue: no public size)
        if isinstance(self.write_executor, WriteThread):
            waiting["sqlite_write"] = self.write_executor.waiting
        return in_use, waiting

    def note_reachable(self, reachable: bool) -> None:
        """What a call (or the periodic check) just found: the database answers or not. The
        listeners (the server's readiness) hear of changes only. On the event loop's thread."""
        if reachable != self.reachable:
            self.reachable = reachable
            for listener in list(self._reachability_listeners):
                listener(reachable)

    def add_reachability_listener(self, listener: Callable[[bool], None]) -> None:
        """Call listener(reachable) whenever note_reachable() finds the database's state changed."""
        self._reachability_listeners.append(listener)

    def add_commit_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call listener(notes) after every commit that left notes in Session.info.

        The notes are what the transaction reported: engine/events.py lists the events it appended
        under COMMITTED_EVENTS_KEY, engine/audit.py sets CREDENTIALS_CHANGED_KEY.
        """
        self._commit_listeners.append(listener)

    def remove_commit_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        if listener in self._commit_listeners:
            self._commit_listeners.remove(listener)

    def _after_commit(self, session: Session) -> None:
        self._notify(session.info)

    def _notify(self, info: dict[str, Any]) -> None:
        notes = {k: info.pop(k) for k in (COMMITTED_EVENTS_KEY, CREDENTIALS_CHANGED_KEY) if k in info}
        if notes:
            for listener in list(self._commit_listeners):
                listener(notes)

    @property
    def where(self) -> str:
        """host:port of a PostgreSQL database (the socket directory of a Unix socket), or the SQLite file."""
        url = make_url(self.url)
        if not self.is_postgres:
            return url.database or ""
        host = url.host or str(url.query.get("host") or "localhost")
        return f"{host}:{url.port or 5432}"

    def wait_until_reachable(self, seconds: float, sleep: Callable[[float], None] = time.sleep) -> None:
        """Connect to PostgreSQL, retrying with doubling pauses (up to MAX_WAIT_SECONDS) for
        `seconds` while the failure may pass (worth_waiting), each wait logged; then
        DatabaseUnreachable. A failure no wait mends (a wrong password, no such database) is
        raised at once, as is any on SQLite (a file: nothing to wait for).

        Each attempt's connect_timeout is what is left of the wait (at least 1 s; libpq takes
        2 s at the least): a server that accepts connections and never answers does not hold
        the start up past the wait by the driver's own timeout (DB_POOL_TIMEOUT) per attempt."""
        if not self.is_postgres:
            return
        deadline = time.monotonic() + seconds
        pause = FIRST_WAIT_SECONDS
        while True:
            cap = _CONNECT_TIMEOUT_CAP.set(max(1, int(deadline - time.monotonic())))
            try:
                with self.engine.connect() as conn:
                    conn.execute(select(1))
                return
            except Exception as exc:  # noqa: BLE001 - sorted just below
                if not worth_waiting(exc):
                    raise
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DatabaseUnreachable(self.where, seconds, first_line(exc)) from exc
                wait = min(pause, left)
                log.warning(
                    "the database at %s does not answer (%s): trying again in %.2fs, %.2fs left of the wait", self.where, first_line(exc), wait, left
                )
                sleep(wait)
                pause = min(pause * 2, MAX_WAIT_SECONDS)
            finally:
                _CONNECT_TIMEOUT_CAP.reset(cap)

    def ping(self) -> bool:
        """True when a connection answers SELECT 1."""
        try:
            with self.engine.connect() as conn:
                conn.execute(select(1))
            return True
        except Exception:  # noqa: BLE001 - any failure means "not reachable"
            return False

    def dispose(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.write_executor is not self.executor:
            self.write_executor.shutdown(wait=True, cancel_futures=True)
        self._kept.close()  # the threads that kept them have ended
        self.engine.dispose()
        self.read_engine.dispose()
        if self._writer is not None:
            self._writer.dispose()
