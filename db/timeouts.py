"""A call's deadline, carried into the database: PostgreSQL's statement_timeout and SQLite's
busy_timeout follow the time the call has left, and a unit of work past it says so."""
from __future__ import annotations

import time
from typing import Any

from sqlalchemy import Connection

from db import errors
from db.prepared import driver_connection
from db.translate import settled

# Connection.info key: the statement_timeout (ms) the pooled connection is known to have.
STATEMENT_TIMEOUT_KEY = "nexus_statement_timeout"
# Connection.info key: the busy_timeout (ms) the SQLite write connection is known to have.
BUSY_TIMEOUT_KEY = "nexus_busy_timeout"
# The database's share of a call's deadline ends this much before it (a tenth of the remaining
# time, at most ANSWER_MARGIN seconds), so that the server's own DEADLINE_EXCEEDED, which says
# whether anything was changed, reaches the caller before the caller's timer fires.
ANSWER_MARGIN = 0.1


def timeout_step(ms: int) -> int:
    """ms rounded down to 1, 1.25, 1.5 or 1.75 times a power of two (at most 20 % less).

    Below one second the value is kept as it is: short deadlines are rare and need precision.
    """
    if ms < 1000:
        return max(1, ms)
    power = 1 << (ms.bit_length() - 1)
    quarter = power // 4
    return power + quarter * ((ms - power) // quarter)


def too_late() -> errors.NexusError:
    return settled(errors.DeadlineExceeded("the call's deadline passed before it reached the database"), maybe_committed=False)


def past_deadline_uncommitted() -> errors.NexusError:
    return settled(errors.DeadlineExceeded("the call's deadline passed before its changes committed"), maybe_committed=False)


def database_deadline(deadline: float | None) -> float | None:
    """When the database's share of a call ending at `deadline` ends (ANSWER_MARGIN)."""
    if deadline is None:
        return None
    return deadline - max(0.0, min((deadline - time.monotonic()) / 10, ANSWER_MARGIN))


def _ms_left(until: float) -> int:
    """Whole ms left until `until`; too_late() when none is."""
    left = int((until - time.monotonic()) * 1000)
    if left <= 0:
        raise too_late()
    return left


def busy_timeout(conn: Connection, until: float | None, most_ms: int) -> None:
    """Bound the wait of SQLite's write connection for the file's write lock (BEGIN
    IMMEDIATE, held by another process) by the call's deadline, as PostgreSQL's statements
    are by the statement timeout: at most DB_POOL_TIMEOUT, in timeout_step() steps, and SET
    only when the connection's current value differs."""
    wanted = most_ms
    if until is not None:
        wanted = min(wanted, timeout_step(_ms_left(until)))
    info = conn.info
    if info.get(BUSY_TIMEOUT_KEY, most_ms) != wanted:
        driver_connection(conn).execute(f"PRAGMA busy_timeout={int(wanted)}")
        info[BUSY_TIMEOUT_KEY] = wanted

def statement_timeout(conn: Connection, until: float | None, record: bool = False) -> tuple[dict[Any, Any], int] | None:
    """Bound this transaction's statements by the call's deadline (PostgreSQL): `until`,
    database_deadline() of it.

    The timeout is a session setting of the pooled connection, rounded down to a step of
    timeout_step(), and SET only when the connection's current step differs: with steady
    deadlines that costs no round trip per call. Returns (connection info, value) to record
    after the commit, or None when the connection already has the value (or record=True:
    recorded at once, for a connection outside a transaction).
    """
    wanted = 0  # no deadline: no limit
    if until is not None:
        wanted = timeout_step(_ms_left(until))
    info = conn.info
    if info.get(STATEMENT_TIMEOUT_KEY) == wanted:
        return None
    conn.exec_driver_sql(f"SET statement_timeout = {int(wanted)}")
    if record:
        info[STATEMENT_TIMEOUT_KEY] = wanted
        return None
    return info, wanted
