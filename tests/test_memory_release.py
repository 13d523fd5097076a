"""After a burst, memory that stopped growing and that trimming glibc's heaps did not give back
is mostly the database connections' own buffers: the server's MemoryTrimmer then has the
database close its idle connections (Database.release_connections), and the next calls open
new ones. Never while memory is still growing (a burst under way), and calls keep working."""
from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text

from db.database import Database
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
