"""After a burst, memory that stopped growing and that trimming glibc's heaps did not give back
is mostly the database connections' own buffers: the server's MemoryTrimmer then has the
database close its idle connections (Database.release_connections), and the next calls open
new ones. Never while memory is still growing (a burst under way), and calls keep working."""
from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from db.database import SQLITE_SOFT_HEAP_LIMIT, Database, PoolSettings
from db.unit import SESSION_READ
from service.memory import MemoryTrimmer, malloc_trim, resident_bytes
from tests.support import run_async

GROWTH = 16 << 20


def _identity(database: Database) -> Any:
    """What names the connection the engine's pool hands out next: PostgreSQL's backend pid,
    SQLite's DBAPI connection object."""
    with database.engine.connect() as conn:
        if database.is_postgres:
            return conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        return id(conn.connection.dbapi_connection)


def _held(n: int) -> bytearray:
    """n bytes in use (every page written), which no trim can give back."""
    return bytearray(b"\1") * n


@pytest.mark.skipif(malloc_trim() is None or resident_bytes() is None, reason="needs glibc and /proc")
def test_memory_that_stays_high_after_a_trim_renews_the_idle_connections(database_url: str) -> None:
    database = Database(database_url)
    try:
        before = _identity(database)
        assert _identity(database) == before  # the pool hands the same connection back
        trimmer = MemoryTrimmer(1.0, growth=GROWTH, release=database.release_connections)

        async def scenario() -> list[int]:
            releases = []
            held = [_held(2 * GROWTH)]  # grows: a trim at once, no release while growing
            await trimmer.check()
            releases.append(trimmer.releases)
            held.append(_held(2 * GROWTH))  # still growing
            await trimmer.check()
            releases.append(trimmer.releases)
            # Stopped growing, still high: the next due trim gives back little, so the idle
            # connections are closed.
            for _ in range(3):
                await trimmer.check()
                releases.append(trimmer.releases)
            del held
            return releases

        releases = run_async(scenario())
        assert releases[:2] == [0, 0] and releases[-1] >= 1, releases
        assert trimmer.trims >= 3
        after = _identity(database)
        # PostgreSQL: new connections (libpq's buffers went with the old ones); SQLite keeps its own.
        assert (after != before) == database.is_postgres
        # The database answers as before, on new connections.
        assert database.run_sync(lambda s: s.execute(text("SELECT 1")).scalar_one()) == 1
    finally:
        database.dispose()


@pytest.mark.skipif(malloc_trim() is None or resident_bytes() is None, reason="needs glibc and /proc")
def test_memory_left_high_is_trimmed_at_once_when_the_calls_end() -> None:
    """Trims that give nothing back double the wait before the next; the first look that finds no
    call under way, after calls, trims at once whatever the wait (the load that left the memory is
    over), and only that look: the wait goes on after it."""
    calls = [3]
    trim = malloc_trim()
    assert trim is not None
    trim()  # freed memory the process still holds would otherwise take the bytes held below unseen
    trimmer = MemoryTrimmer(1.0, growth=GROWTH, busy=lambda: calls[0])

    async def scenario() -> list[int]:
        held = _held(4 * GROWTH)
        trims = []
        for _ in range(9):  # growing: a trim; then high and level: trims at looks 2, 4 and 8
            await trimmer.check()
            trims.append(trimmer.trims)
        calls[0] = 0
        await trimmer.check()  # the calls ended: a trim, though the wait is 8 looks
        trims.append(trimmer.trims)
        await trimmer.check()  # still no call: the wait again
        trims.append(trimmer.trims)
        del held
        return trims

    trims = run_async(scenario())
    assert trims == [1, 2, 2, 3, 3, 3, 3, 4, 4, 5, 5], trims


def test_a_release_closes_the_connections_idle_threads_keep(database_url: str) -> None:
    """A database thread keeps its read connection between units of work. A release closes the
    kept ones no unit of work is using at once (PostgreSQL): a thread that stays idle after a
    burst does not keep its connection, and libpq's buffers, until its next call. Its next read
    opens a new one. SQLite's are left as they are."""
    database = Database(database_url, pool=PoolSettings(size=4))
    threads = 4  # the database's threads: one per pooled connection

    def identities() -> set[Any]:
        """The connection each database thread keeps: one read on every thread at once (each
        waits for the others, so none takes two)."""
        barrier = threading.Barrier(threads)

        def identity(session: Any) -> Any:
            barrier.wait(10)
            if database.is_postgres:
                return session.execute(text("SELECT pg_backend_pid()")).scalar_one()
            return id(session.connection().connection.dbapi_connection)

        async def reads() -> set[Any]:
            return set(await asyncio.gather(*(database.run(identity, SESSION_READ) for _ in range(threads))))

        return run_async(reads())

    try:
        kept = identities()
        assert len(kept) == threads and identities() == kept  # each thread kept its connection
        database.release_connections()
        if database.is_postgres:
            with database.engine.connect() as conn:  # a new pool's connection: not one of the kept
                alive = set(conn.execute(text("SELECT pid FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                                         {"pids": list(kept)}).scalars())
            assert not alive, f"backends of kept connections still open after the release: {alive}"
        after = identities()
        assert len(after) == threads
        assert after.isdisjoint(kept) if database.is_postgres else after == kept, (kept, after)
    finally:
        database.dispose()


def test_a_connection_in_use_during_a_release_closes_when_it_comes_back(database_url: str) -> None:
    """engine.dispose closes a pool's idle connections; one checked out then (a write under way)
    goes back to the old pool, which would keep it. It closes as it is checked in (PostgreSQL)."""
    database = Database(database_url)
    try:
        if not database.is_postgres:
            with database.engine.connect() as conn:
                before = id(conn.connection.dbapi_connection)
                database.release_connections()
            with database.engine.connect() as conn:  # SQLite's pool is left as it was
                assert id(conn.connection.dbapi_connection) == before
            return
        conn = database.engine.connect()
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()

        def alive() -> bool:
            with database.read_engine.connect() as other:
                return bool(other.execute(text("SELECT count(*) FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}).scalar_one())

        database.release_connections()
        assert alive()  # in use: left to finish its work
        conn.close()
        until = time.monotonic() + 5
        while alive() and time.monotonic() < until:
            time.sleep(0.05)
        assert not alive(), "the connection in use during the release stayed open after it came back"
        with database.engine.connect() as again:  # the pool opens a new one
            assert again.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    finally:
        database.dispose()


def test_reads_under_way_while_releases_run_all_answer(database_url: str) -> None:
    """Releases every few milliseconds while 2,000 reads run on the database's threads: a thread
    never has its connection closed under a read (each claims its own back before using it, and
    a release takes only the ones not claimed), and every read answers."""
    database = Database(database_url, pool=PoolSettings(size=4))
    stop = threading.Event()
    releases = [0]

    def release() -> None:
        while not stop.is_set():
            database.release_connections()
            releases[0] += 1
            stop.wait(0.002)

    def read(session: Any) -> int:
        return int(session.execute(text("SELECT 1")).scalar_one())

    async def reads() -> list[int]:
        return list(await asyncio.gather(*(database.run(read, SESSION_READ) for _ in range(2000))))

    releaser = threading.Thread(target=release)
    releaser.start()
    try:
        answers = run_async(reads())
    finally:
        stop.set()
        releaser.join()
        database.dispose()
    assert answers == [1] * 2000
    assert releases[0] > 10


def test_without_a_release_the_trimmer_only_trims() -> None:
    """The CLI's commands and tests build trimmers without a database: nothing is released."""
    trimmer = MemoryTrimmer(1.0, growth=GROWTH)

    async def scenario() -> None:
        held = _held(2 * GROWTH)
        for _ in range(4):
            await trimmer.check()
        del held

    run_async(scenario())
    assert trimmer.releases == 0


def _sqlite_memory_used() -> int:
    """SQLite's own count of the bytes it has allocated, in this process (sqlite3_memory_used, from
    the library the sqlite3 module uses: its extension's symbols include its dependencies')."""
    import _sqlite3

    used = ctypes.CDLL(_sqlite3.__file__).sqlite3_memory_used
    used.restype = ctypes.c_int64
    return int(used())


def test_sqlite_page_caches_stay_under_the_soft_heap_limit_after_large_reads(tmp_path: Path) -> None:
    """Ten connections each reading 20 MB of rows would keep ~2 MB of pages each (cache_size
    -2000) for as long as they live; under the soft heap limit they reuse their pages instead."""
    database = Database(f"sqlite:///{tmp_path / 'caches.db'}", pool=PoolSettings(size=10))
    try:
        with database.engine.begin() as conn:
            assert conn.exec_driver_sql("PRAGMA soft_heap_limit").scalar_one() == SQLITE_SOFT_HEAP_LIMIT
            conn.exec_driver_sql("CREATE TABLE big (id INTEGER PRIMARY KEY, body TEXT)")
            conn.exec_driver_sql("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 5000) "
                                 "INSERT INTO big (body) SELECT zeroblob(4000) FROM n")
        before = _sqlite_memory_used()
        assert before > 0, "sqlite3_memory_used reads another copy of SQLite than the sqlite3 module's"
        conns = [database.engine.connect() for _ in range(10)]  # ten distinct pooled connections
        try:
            for conn in conns:
                assert conn.exec_driver_sql("SELECT sum(length(body)) FROM big").scalar_one() == 5000 * 4000
            grown = _sqlite_memory_used() - before
        finally:
            for conn in conns:
                conn.close()
        assert grown < 6 << 20, f"SQLite's heap grew by {grown / 2**20:.1f} MiB"
    finally:
        database.dispose()
