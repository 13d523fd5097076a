"""The connections the database threads keep between units of work.

Checking a connection out of the pool and wrapping it in a Connection, then resetting and
checking it in again, cost more Python than a primary-key read's SQL on SQLite (bench/README.md).
Each thread of Database.executor therefore keeps the read connection it took until something
says it may be stale, and SQLite's one write thread keeps the write connection while writes are
queued.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, Engine

log = logging.getLogger(__name__)


def answers(dbapi_conn: Any) -> bool:
    """Whether a DBAPI connection answers SELECT 1 (any failure means a lost connection)."""
    try:
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute("SELECT 1")
        finally:
            cursor.close()
        return True
    except Exception:  # noqa: BLE001 - any failure means a dead connection
        return False


class _Owned(threading.local):
    """What one database thread keeps between its units of work: its own read connection.

    Checking a connection out of the pool and wrapping it in a Connection, then resetting and
    checking it in again, cost more Python than a primary-key read's SQL on SQLite
    (bench/README.md). Each thread of Database.executor therefore keeps the read connection it
    took until something says it may be stale (Database._read_connection)."""

    owns = False  # set in the executor's threads (Database._own_connections); others use the pool
    conn: Connection | None = None
    writes = False  # set in the SQLite write thread (WriteThread), which keeps its write connection
    write_conn: Connection | None = None
    since = 0.0  # when it was taken from the pool (pool_recycle counts from here)
    idle_since = 0.0  # when its last unit of work ended (the idle ping counts from here)
    generation = 0  # Database._generation when it was taken


class KeptConnections:
    """The read connection of each executor thread (own_reads) and the write connection of the
    SQLite write thread (own_writes); other threads take theirs from the pools each time."""

    def __init__(self, read_engine: Engine, write_engine: Engine, pool: Any, is_postgres: bool) -> None:
        self.read_engine = read_engine
        self.write_engine = write_engine
        self.pool = pool
        self.is_postgres = is_postgres
        self._owned = _Owned()
        self._all: set[Connection] = set()
        # The kept read connections between units of work: release_idle may take them from
        # their threads (a thread claims its own back, under the lock, before each use).
        self._idle: set[Connection] = set()
        self._lock = threading.Lock()
        # Bumped when a unit of work lost its connection (lost()): the connections the threads
        # keep were most likely lost with it, and are given up (invalidated) before their next use.
        self.generation = 0

    def lost(self) -> None:
        """A unit of work lost its connection: every kept one is suspect."""
        self.generation += 1

    @contextlib.contextmanager
    def reading(self) -> Iterator[Connection]:
        """The thread's own read connection (executor threads), else one from the read pool."""
        owned = self._owned.owns
        conn = self.read() if owned else self.read_engine.connect()
        try:
            yield conn
        finally:
            if owned:
                self.read_done(conn)
            else:
                conn.close()

    def own_writes(self) -> None:
        """The SQLite write thread's start: it keeps the write connection between writes."""
        self._owned.writes = True

    def write(self) -> Connection | None:
        """On the SQLite write thread, the write connection it keeps between writes; None on others."""
        own = self._owned
        if not own.writes:
            return None
        conn = own.write_conn
        if conn is not None and (conn.invalidated or conn.closed or conn.in_transaction()):
            self.give_back_write()
            conn = None
        if conn is None:
            conn = own.write_conn = self.write_engine.connect()
        return conn

    def give_back_write(self) -> None:
        """The write thread has nothing more queued (or is ending): the connection goes back to
        the pool, for writes of other threads."""
        conn, self._owned.write_conn = self._owned.write_conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - a connection that fails to close is dropped by the pool
                log.debug("the kept write connection failed to close", exc_info=True)

    def own_reads(self) -> None:
        """The executor's thread initializer: this thread keeps its read connection (_Owned)."""
        self._owned.owns = True

    def read(self) -> Connection:
        """The calling database thread's own read connection, taken from the read pool when it
        has none or when the one it has may be stale: lost with another thread's (a unit of
        work lost its connection since), past pool_recycle, or idle past ping_after and not
        answering SELECT 1 (the pool's idle pre-ping, for a connection that stays out of it)."""
        own = self._owned
        conn = own.conn
        if conn is not None:
            with self._lock:
                claimed = conn in self._idle
                self._idle.discard(conn)
            if not claimed:  # release_idle took it: it closes it
                own.conn = conn = None
        if conn is not None:
            now = time.monotonic()
            if conn.invalidated or conn.closed or own.generation != self.generation:
                self.give_up(conn, invalidate=True)
            elif now - own.since > self.pool.recycle:
                self.give_up(conn)
            elif self.is_postgres and self.pool.pre_ping and now - own.idle_since > self.pool.ping_after and not answers(conn.connection.dbapi_connection):
                self.give_up(conn, invalidate=True)
            else:
                return conn
        generation = self.generation
        conn = self.read_engine.connect()
        own.conn, own.since, own.generation = conn, time.monotonic(), generation
        with self._lock:
            self._all.add(conn)
        return conn

    def read_done(self, conn: Connection) -> None:
        """After a unit of work on the thread's own connection: end what SQLAlchemy began on it
        (nothing is left open between units of work), note when it went idle."""
        if conn.in_transaction():
            try:
                conn.rollback()
            except Exception:  # noqa: BLE001 - a connection that cannot roll back is given up
                self.give_up(conn, invalidate=True)
                return
        self._owned.idle_since = time.monotonic()
        with self._lock:
            if conn in self._all:
                self._idle.add(conn)

    def give_up(self, conn: Connection, invalidate: bool = False) -> None:
        """Stop keeping conn: back to the pool, or closed for good when it may be lost."""
        if self._owned.conn is conn:
            self._owned.conn = None
        with self._lock:
            self._all.discard(conn)
            self._idle.discard(conn)
        try:
            if invalidate and not conn.invalidated and not conn.closed:
                conn.invalidate()
            conn.close()
        except Exception:  # noqa: BLE001 - it is being dropped: nothing more to do with it
            log.debug("a kept read connection failed to close", exc_info=True)

    def release_idle(self) -> int:
        """Close the kept read connections no unit of work is using now (their threads open new
        ones at their next use): a thread that sits idle after a burst would otherwise keep its
        connection, and libpq's buffers in it, until then. The number closed."""
        with self._lock:
            taken, self._idle = list(self._idle), set()
            self._all.difference_update(taken)
        for conn in taken:
            try:
                conn.invalidate()  # the DBAPI connection closed now, not checked in to a pool
                conn.close()
            except Exception:  # noqa: BLE001 - it is being dropped: nothing more to do with it
                log.debug("a kept read connection failed to close", exc_info=True)
        return len(taken)

    def close(self) -> None:
        """Close every kept read connection (the threads that kept them have ended)."""
        with self._lock:
            kept, self._all, self._idle = list(self._all), set(), set()
        for conn in kept:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing for good: a lost one has nothing to close
                log.debug("a kept read connection failed to close", exc_info=True)
