"""Round 10 attacks on release_connections (PostgreSQL), the SQLite UTCDateTime fast path and
orjson reads of SQLite JSON columns. Real databases, no mocks."""
from __future__ import annotations

import datetime as dt
import gc
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import text

from db import errors
from db.base import UTCDateTime
from db.database import Database, PoolSettings
from db.unit import READ, SESSION_READ, TRANSACTION
from tests.databases import fresh_postgres_database

PG = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


@pytest.fixture
def own_pg_url() -> Iterator[str]:
    """A PostgreSQL database no server of the session uses: these tests count its backends, and
    one terminates them all; the session's servers would reconnect into the count (and lose their
    connections)."""
    with fresh_postgres_database("nexus_atk10") as url:
        yield url


def _dbname(database: Database) -> str:
    return database.engine.url.database


def _backends(admin: Database, dbname: str, exclude: int | None = None) -> set[int]:
    return set(admin.run_sync(lambda s: s.scalars(text(
        "SELECT pid FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": dbname}).all(), SESSION_READ))


def _table(database: Database) -> str:
    name = "atk10_" + uuid.uuid4().hex[:8]
    database.run_sync(lambda s: s.execute(text(f"CREATE TABLE {name} (id serial PRIMARY KEY, v text)")), TRANSACTION)
    return name


def _mix(database: Database, table: str, stop: threading.Event, failures: list, counts: dict, seed: int, via_executor: bool) -> None:
    class _Via:
        """run_sync on the database's own threads (their kept read connections), as RPCs run it."""
        def run_sync(self, work, plan, **kw):  # type: ignore[no-untyped-def]
            return database.executor.submit(database.run_sync, work, plan, **kw).result(timeout=30)
    db = _Via() if via_executor else database
    i = seed
    while not stop.is_set():
        i += 1
        kind = i % 5
        try:
            if kind == 0:
                assert db.run_sync(lambda s: s.connection().execute(text("SELECT 1")).scalar_one(), READ) == 1
            elif kind == 1:
                assert db.run_sync(lambda s: s.execute(text("SELECT repeat('x', 200000)")).scalar_one(), SESSION_READ) == "x" * 200000
            elif kind == 2:
                def write(s: object) -> int:
                    s.execute(text(f"INSERT INTO {table} (v) VALUES (:v)"), {"v": "y" * 50000})  # type: ignore[attr-defined]
                    return int(s.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())  # type: ignore[attr-defined]
                db.run_sync(write, TRANSACTION)
            elif kind == 3:
                def slow(s: object) -> None:
                    s.execute(text("SELECT pg_sleep(0.02)"))  # type: ignore[attr-defined]
                    s.execute(text(f"INSERT INTO {table} (v) VALUES ('z')"))  # type: ignore[attr-defined]
                db.run_sync(slow, TRANSACTION)
            else:
                try:
                    db.run_sync(lambda s: s.connection().execute(text("SELECT pg_sleep(0.3)")), READ, deadline=time.monotonic() + 0.05)
                    failures.append(("deadline", "no error"))
                except errors.DeadlineExceeded:
                    pass
            counts[kind] = counts.get(kind, 0) + 1
        except Exception as exc:  # noqa: BLE001
            failures.append((kind, repr(exc)[:300]))


def _storm(database: Database, table: str, seconds: float, workers: int = 8, extra=None, via_executor: bool = False) -> tuple[list, dict, int]:
    stop = threading.Event()
    failures: list = []
    counts: dict = {}
    threads = [threading.Thread(target=_mix, args=(database, table, stop, failures, counts, n, via_executor)) for n in range(workers)]
    for t in threads:
        t.start()
    releases = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        database.release_connections()
        releases += 1
        if extra is not None:
            extra(releases)
        time.sleep(0.002)
    stop.set()
    for t in threads:
        t.join(30)
    return failures, counts, releases


@pytest.mark.parametrize("via_executor", [False, True], ids=["borrowed", "kept"])
def test_releases_in_a_tight_loop_under_a_mixed_load_fail_no_call_and_leak_no_connection(own_pg_url: str, via_executor: bool) -> None:
    """Releases every ~2 ms while reads (Core, Session, large), writes, transactions and past-deadline
    calls run: no call fails, and once all is idle a last release leaves no connection open (the
    garbage collector not run: an idle server does not run it)."""
    gc.collect()
    database = Database(own_pg_url, PoolSettings(size=4, max_overflow=4, timeout=5))
    admin = Database(own_pg_url, PoolSettings(size=1, max_overflow=0))
    try:
        table = _table(database)
        dbname = _dbname(database)
        database.release_connections()
        time.sleep(0.2)
        before = _backends(admin, dbname)
        failures, counts, releases = _storm(database, table, 5.0, via_executor=via_executor)
        assert not failures, failures[:10]
        assert all(counts.get(k, 0) > 5 for k in range(5)), counts
        assert releases > 100
        # Everything idle now: one more release must close every connection of the database.
        database.release_connections()
        left = before
        for _ in range(60):
            left = _backends(admin, dbname)
            if len(left) <= len(before):
                break
            time.sleep(0.05)
        assert len(left) <= len(before), (len(before), len(left))
        assert database.read_engine.pool.checkedout() == 0 and database.engine.pool.checkedout() == 0
        # And it answers after.
        assert database.run_sync(lambda s: s.connection().execute(text("SELECT 1")).scalar_one(), READ) == 1
    finally:
        database.dispose()
        admin.dispose()


def test_releases_while_the_backends_are_terminated_recover(own_pg_url: str) -> None:
    """An operator's bad day: every backend of the database terminated, repeatedly, while the
    trimmer releases. Calls may fail UNAVAILABLE while it happens, nothing else; after it, every
    call works, and no connection is left behind."""
    database = Database(own_pg_url, PoolSettings(size=4, max_overflow=4, timeout=5, ping_after=0.05))
    admin = Database(own_pg_url, PoolSettings(size=1, max_overflow=0))
    try:
        table = _table(database)
        dbname = _dbname(database)
        gc.collect()
        before = len(_backends(admin, dbname))

        def kill(n: int) -> None:
            if n % 100 == 0:
                admin.run_sync(lambda s: s.execute(text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": dbname}))

        failures, counts, releases = _storm(database, table, 5.0, extra=kill, via_executor=True)
        unexpected = [f for f in failures if "Unavailable" not in f[1]]
        assert not unexpected, unexpected[:10]
        # After the storm: a burst of every kind of call works, no failure at all.
        failures2, counts2, _ = _storm(database, table, 1.5, via_executor=True)
        assert not failures2, failures2[:10]
        database.release_connections()
        gc.collect()  # the leak of test_releases_in_a_tight_loop... aside: only real leaks here
        left = set()
        for _ in range(60):
            left = _backends(admin, dbname)
            if len(left) <= before:
                break
            time.sleep(0.05)
        assert len(left) <= before, (before, len(left))
    finally:
        database.dispose()
        admin.dispose()


@PG
def test_a_kept_connection_in_use_is_not_closed_by_a_release(database_url: str) -> None:
    """A read that runs across many releases finishes on the connection it began on."""
    database = Database(database_url, PoolSettings(size=2, max_overflow=0, timeout=5))
    try:
        database.run_sync(lambda s: 1, READ)  # keeps its thread's connection
        started = threading.Event()

        def long_read(s: object) -> tuple[int, int]:
            conn = s.connection()  # type: ignore[attr-defined]
            first = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
            started.set()
            for _ in range(20):
                conn.exec_driver_sql("SELECT pg_sleep(0.02)")
            return first, conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()

        future = database.executor.submit(database.run_sync, long_read, SESSION_READ)
        assert started.wait(5)
        while not future.done():
            database.release_connections()
            time.sleep(0.001)
        first, last = future.result()
        assert first == last
    finally:
        database.dispose()


# --- SQLite: UTCDateTime's fast path against the plain parse ---------------------------------

def _outcome(fn, value: str):  # type: ignore[no-untyped-def]
    try:
        got = fn(value)
    except ValueError:
        return "ValueError"
    assert got.tzinfo is dt.UTC, (value, got)
    return got


@pytest.mark.parametrize("value", [
    "2026-12-31 23:59:60",            # a leap second: both refuse it
    "0999-01-02 03:04:05", "0001-01-01 00:00:00", "9999-12-31 23:59:59.999999",
    "2026-12-02T14:46:18", "20261202T144618", "2026-W49-3 10:00",
    "2026-12-02 14:46:18Z", "2026-12-02 14:46:18+00", "2026-12-02 14:46:18+0000", "2026-12-02 14:46:18-00:00",
    "2026-12-02 14:46:18+02:00:00.5", "2026-12-02 14:46:18,5",
    *("2026-12-02 14:46:18." + "7" * n for n in range(1, 10)),
    # Text the plain parse refuses: the fast path must refuse it too, not read a time out of it.
    "2026-12-02 14:46:18 ",           # a trailing space
    "2026-12-02 14:46:18z",           # a lowercase z
    "2026-12-02 14:46:18.",           # a fraction point with no digits
    " 2026-12-02 14:46:18", "2026-12-02 ", "2026-12-02T", "2026-12-02 24:00:00", "2026-12-02 14:46:18+",
])
def test_sqlite_fast_path_reads_every_text_as_the_plain_path_does(value: str) -> None:
    from sqlalchemy.dialects import sqlite

    process = UTCDateTime().result_processor(sqlite.dialect(), None)
    assert _outcome(process, value) == _outcome(process.plain, value), value


def test_sqlite_fast_path_agrees_with_the_plain_path_on_generated_text() -> None:
    from hypothesis import given, settings, strategies as st
    from sqlalchemy.dialects import sqlite

    process = UTCDateTime().result_processor(sqlite.dialect(), None)
    part = st.sampled_from(["", " ", "T", "t", "Z", "z", ".", ",", ":", "+", "-", "00", "05:30", "+00:00", "-05:30", "123456789"])

    @settings(max_examples=3000, deadline=None, database=None)
    @given(st.datetimes(min_value=dt.datetime(1, 1, 1), max_value=dt.datetime(9999, 12, 31)), st.sampled_from([" ", "T"]),
           st.sampled_from(["seconds", "milliseconds", "microseconds", "minutes", "hours"]), part, part)
    def check(when: dt.datetime, sep: str, spec: str, a: str, b: str) -> None:
        for value in (when.isoformat(sep, spec), when.isoformat(sep, spec) + a, when.isoformat(sep, spec) + a + b):
            fast = _outcome(process, value)
            plain = _outcome(process.plain, value)
            # A value the plain path reads must read the same; text it refuses is reported below.
            if plain != "ValueError":
                assert fast == plain, value

    check()


def test_sqlite_datetime_column_reads_stored_text_as_written(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Times the service wrote (SQLAlchemy's text, 6 fraction digits) read back exactly, through a
    real SQLite column of the decorator's type, including years before 1000."""
    from sqlalchemy import Column, Integer, MetaData, Table, insert, select

    database = Database(f"sqlite:///{tmp_path / 'times.db'}")
    try:
        meta = MetaData()
        table = Table("times", meta, Column("id", Integer, primary_key=True), Column("at", UTCDateTime()))
        meta.create_all(database.engine)
        values = [dt.datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=dt.UTC), dt.datetime(1, 1, 1, tzinfo=dt.UTC),
                  dt.datetime(2026, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC), dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
                  dt.datetime(2026, 6, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30)))]
        with database.engine.begin() as conn:
            conn.execute(insert(table), [{"at": v} for v in values])
            # Text another writer could have left (sqlite's own datetime(), an ISO 'T', a zone).
            conn.exec_driver_sql("INSERT INTO times (at) VALUES (datetime(0, 'unixepoch')), ('2026-12-02T14:46:18.5'), ('2026-12-02 14:46:18+02:00')")
        with database.engine.connect() as conn:
            got = conn.execute(select(table.c.at).order_by(table.c.id)).scalars().all()
        assert got[:5] == values
        assert got[5:] == [dt.datetime(1970, 1, 1, tzinfo=dt.UTC), dt.datetime(2026, 12, 2, 14, 46, 18, 500000, tzinfo=dt.UTC),
                           dt.datetime(2026, 12, 2, 12, 46, 18, tzinfo=dt.UTC)]
        assert all(v.tzinfo is dt.UTC for v in got)
    finally:
        database.dispose()


# --- SQLite: JSON columns read by orjson ---------------------------------------------------------



def test_sqlite_json_columns_read_back_what_the_service_stored(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Values a Struct or a list column can hold (finite doubles, int64s, any Unicode text, nesting),
    written through the real engine and read back through orjson, equal what json.loads reads
    from the same stored text, and the value written."""
    import json

    from hypothesis import HealthCheck, given, settings, strategies as st
    from sqlalchemy import Column, Integer, MetaData, Table, insert, select

    from db.base import PortableJSON

    database = Database(f"sqlite:///{tmp_path / 'json.db'}")
    meta = MetaData()
    table = Table("docs", meta, Column("id", Integer, primary_key=True), Column("doc", PortableJSON))
    meta.create_all(database.engine)
    scalar = st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | \
        st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1) | st.text()
    value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4), max_leaves=20)

    @settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(st.dictionaries(st.text(), value, max_size=5))
    def check(doc: dict) -> None:
        with database.engine.begin() as conn:
            row_id = conn.execute(insert(table).values(doc=doc)).inserted_primary_key[0]
        with database.engine.connect() as conn:
            got = conn.execute(select(table.c.doc).where(table.c.id == row_id)).scalar_one()
            stored = conn.exec_driver_sql(f"SELECT doc FROM docs WHERE id = {int(row_id)}").scalar_one()
        assert got == json.loads(stored)
        assert got == doc

    try:
        check()
    finally:
        database.dispose()


def test_sqlite_reads_large_rows_under_the_soft_heap_limit(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The process-wide soft heap limit (8 MiB) is soft: rows far above it still read whole, on
    several connections at once."""
    from concurrent.futures import ThreadPoolExecutor

    database = Database(f"sqlite:///{tmp_path / 'big.db'}", PoolSettings(size=4, max_overflow=0, timeout=10))
    try:
        with database.engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE big (id INTEGER PRIMARY KEY, v TEXT)")
            for i in range(4):
                conn.exec_driver_sql("INSERT INTO big (v) VALUES (?)", (chr(97 + i) * (12 << 20),))

        def read(i: int) -> int:
            with database.engine.connect() as conn:
                v = conn.exec_driver_sql("SELECT v FROM big WHERE id = ?", (i + 1,)).scalar_one()
                assert v == chr(97 + i) * (12 << 20)
                return conn.exec_driver_sql("PRAGMA soft_heap_limit").scalar_one()

        with ThreadPoolExecutor(4) as pool:
            limits = list(pool.map(read, range(4)))
        assert limits == [8 << 20] * 4
    finally:
        database.dispose()
