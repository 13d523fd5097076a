"""What a unit of work runs on, and how: its Plan, decided once before it runs.

A Plan is a Mode and why it was chosen. Database.run executes it with the runner of its mode
(db/database.py) and hands the unit of work its plan with the connection or Session it runs on
(plan_of); the engine's writes read the plan from there and never look at the connection or the
dialect to decide again. The engine decides the plan of its writes in db/engine/plans.py.
"""
from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine


class Mode(enum.Enum):
    # Reads with Core statements on a bare read connection (CoreReads): no Session, no
    # transaction kept (db/engine/reading.py).
    READ = "read"
    # Reads through a Session on the read pool (custom methods that load ORM objects).
    SESSION_READ = "session read"
    # A write in a transaction, on a Session.
    TRANSACTION = "transaction"
    # A write whose one statement is its commit (OneStatement): on PostgreSQL in autocommit,
    # without BEGIN and COMMIT; on SQLite in one IMMEDIATE transaction on a bare connection.
    ONE_STATEMENT = "one statement"


@dataclass(frozen=True)
class Plan:
    mode: Mode
    why: str

    @property
    def writes(self) -> bool:
        return self.mode in (Mode.TRANSACTION, Mode.ONE_STATEMENT)


READ = Plan(Mode.READ, "a read with Core statements")
SESSION_READ = Plan(Mode.SESSION_READ, "a read through the ORM")
TRANSACTION = Plan(Mode.TRANSACTION, "a write")
# What a one-statement write becomes when it finds, before writing, that it needs a transaction.
FALLBACK = Plan(Mode.TRANSACTION, "its one statement found the row changed since it was read: again, the row locked")

# Session.info key under which Database hands a Session's unit of work its plan.
PLAN_KEY = "nexus_plan"


class CoreReads:
    """What the Core read path (db/engine/reading.py) uses of a Session: its connection and its
    bind. Read-only units of work that use nothing else run on one, over a bare read connection,
    without a Session to build, begin, commit and close on every call."""

    __slots__ = ("_conn", "plan")

    def __init__(self, conn: Connection, plan: Plan = READ) -> None:
        self._conn = conn
        self.plan = plan

    def connection(self) -> Connection:
        return self._conn

    def get_bind(self) -> Engine:
        return self._conn.engine


@contextlib.contextmanager
def one_snapshot(unit: Any) -> Iterator[None]:
    """The statements run inside see the database as the first of them does: for a page read in
    more than one statement, so that its total_size and its rows, and a Search's window in each
    statement, are of one moment. PostgreSQL: REPEATABLE READ, READ ONLY; SQLite: a read
    transaction (in WAL mode its snapshot is taken at its first read). Only for a CoreReads of
    plan READ, whose connection holds no transaction of its own (PostgreSQL's is in
    autocommit); any other unit reads as it is."""
    if not (isinstance(unit, CoreReads) and not isinstance(unit, OneStatement) and unit.plan.mode is Mode.READ):
        yield
        return
    conn = unit.connection()
    conn.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY" if conn.dialect.name == "postgresql" else "BEGIN DEFERRED")
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # the error that ended it is the one to report
            conn.exec_driver_sql("ROLLBACK")
        raise
    conn.exec_driver_sql("COMMIT")  # reads only: nothing written, nothing to lose


class OneStatement(CoreReads):
    """What a write of plan ONE_STATEMENT gets instead of a Session: the connection (PostgreSQL:
    in autocommit; SQLite: in its IMMEDIATE transaction), its bind, and `info` for the notes of
    the commit listeners (changed credentials, appended events). engine/plans.py admits only
    writes that use nothing more; anything else of a Session is a bug of that admission,
    reported as one."""

    __slots__ = ("info", "writing")

    def __init__(self, conn: Connection, plan: Plan) -> None:
        super().__init__(conn, plan)
        self.info: dict[str, Any] = {}
        # Whether the write's statement was sent. In autocommit (PostgreSQL) it is the commit:
        # after it a failure may have committed; before it (the reads), nothing was written.
        self.writing = False

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Session.{name} used by a one-statement write: it must run in a transaction (engine/plans.py)")


def writing(unit: Any) -> None:
    """The write's statement is about to be sent: from here, in autocommit, a failure may leave
    it committed (the runner's error then says `committed` is unknown)."""
    if isinstance(unit, OneStatement):
        unit.writing = True


def plan_of(unit: Any) -> Plan:
    """The plan a unit of work runs under: a CoreReads or OneStatement holds it; a Session has it
    in its info (a Session made outside Database.run, as the seed's or a test's: a transaction)."""
    if isinstance(unit, CoreReads):
        return unit.plan
    return unit.info.get(PLAN_KEY, TRANSACTION)
