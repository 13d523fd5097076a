"""The unit of work: one transaction per call, nothing committed past the caller's deadline."""
from __future__ import annotations

import time
from pathlib import Path
import uuid

import pytest
from sqlalchemy import func, insert, select, text
from sqlalchemy.orm import Session

from db import errors
from db.database import CREDENTIALS_CHANGED_KEY, Database, PoolSettings, WriteThread
from db.domains.identity import Role
from db.engine import plans, reads, writes
from db.engine.call import CURRENT_CALL, Call
from db.timeouts import timeout_step
from db.unit import READ, SESSION_READ, TRANSACTION, Mode, Plan
from tests.conftest import Client
from tests.support import run_async

ONE_STATEMENT = Plan(Mode.ONE_STATEMENT, "the test's")


def _count(database: Database, name: str) -> int:
    return int(database.run_sync(lambda s: s.scalar(select(func.count()).select_from(Role).where(Role.name == name)), SESSION_READ))


def test_nothing_commits_after_the_deadline(client: Client) -> None:
    database = Database(client.database_url)
    name = f"late{uuid.uuid4().hex[:8]}"
    try:
        def slow_write(session: object) -> None:
            session.execute(insert(Role).values(id=uuid.uuid4(), name=name, permissions=[]))  # type: ignore[attr-defined]
            time.sleep(0.3)

        with pytest.raises(errors.DeadlineExceeded):
            database.run_sync(slow_write, deadline=time.monotonic() + 0.1)
        assert _count(database, name) == 0
        database.run_sync(slow_write, deadline=time.monotonic() + 30)
        assert _count(database, name) == 1
    finally:
        database.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)  # statement_timeout is PostgreSQL's
def test_statement_timeout_follows_the_deadline_on_a_reused_connection(database_url: str) -> None:
    """A statement outliving the call's deadline is cut; the next call on the same connection is not."""
    database = Database(database_url, PoolSettings(size=1, max_overflow=0))
    try:
        sleep = lambda seconds: lambda s: s.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})  # noqa: E731
        started = time.monotonic()
        with pytest.raises(errors.DeadlineExceeded):
            database.run_sync(sleep(5), SESSION_READ, deadline=time.monotonic() + 0.3)
        assert time.monotonic() - started < 3
        # Same (only) connection, a longer deadline and then none: both run past 0.3 s.
        database.run_sync(sleep(0.5), SESSION_READ, deadline=time.monotonic() + 30)
        database.run_sync(sleep(0.5), SESSION_READ)
        shown = database.run_sync(lambda s: s.scalar(text("SHOW statement_timeout")), SESSION_READ)
        assert shown == "0"
        # A rolled-back transaction undoes its SET; the connection's known value must follow.
        def failing(session: object) -> None:
            raise errors.InvalidArgument("stop")

        with pytest.raises(errors.InvalidArgument):
            database.run_sync(failing, SESSION_READ, deadline=time.monotonic() + 2)
        with pytest.raises(errors.DeadlineExceeded):
            database.run_sync(sleep(5), SESSION_READ, deadline=time.monotonic() + 0.3)
    finally:
        database.dispose()


def test_timeout_steps_round_down_by_at_most_a_fifth() -> None:
    for ms in (1, 999, 1000, 1024, 1300, 9_950, 10_000, 30_000, 3_600_000):
        step = timeout_step(ms)
        assert step <= ms and step >= ms * 0.8 - 1, (ms, step)
    assert timeout_step(10_000) == timeout_step(9_990)  # steady deadlines map to one value


def test_sqlite_writers_queue_for_the_one_write_connection(tmp_path: Path) -> None:
    """Writes take turns on one connection; one that waits past the pool timeout is UNAVAILABLE
    (DATABASE_BUSY) and changes nothing, while reads go on meanwhile."""
    import threading

    database = Database(f"sqlite:///{tmp_path / 'writers.db'}", PoolSettings(size=4, max_overflow=0, timeout=0.5))
    try:
        from db.base import Base

        Base.metadata.create_all(database.engine)
        holding, release = threading.Event(), threading.Event()

        def long_write(session: object) -> None:
            session.execute(insert(Role).values(id=uuid.uuid4(), name="first", permissions=[]))  # type: ignore[attr-defined]
            holding.set()
            release.wait(5)

        writer = threading.Thread(target=lambda: database.run_sync(long_write))
        writer.start()
        assert holding.wait(5)
        assert _count(database, "first") == 0  # a read does not wait for the writer
        started = time.monotonic()
        with pytest.raises(errors.Unavailable) as busy:
            database.run_sync(lambda s: s.execute(insert(Role).values(id=uuid.uuid4(), name="second", permissions=[])))
        assert busy.value.reason == "DATABASE_BUSY" and 0.4 < time.monotonic() - started < 3
        release.set()
        writer.join(5)
        assert (_count(database, "first"), _count(database, "second")) == (1, 0)
        database.run_sync(lambda s: s.execute(insert(Role).values(id=uuid.uuid4(), name="second", permissions=[])))
        assert _count(database, "second") == 1
    finally:
        database.dispose()


def test_sqlite_writes_queue_on_one_thread_and_a_long_wait_is_busy(tmp_path: Path) -> None:
    """Database.run gives SQLite writes a thread of their own: a write waits in its queue while
    another holds the write connection, reads go on meanwhile, and one that waited past the
    pool timeout is UNAVAILABLE (DATABASE_BUSY) and changes nothing; so is a write queued past
    its call's deadline (DEADLINE_EXCEEDED)."""
    import asyncio
    import threading

    database = Database(f"sqlite:///{tmp_path / 'queue.db'}", PoolSettings(size=4, max_overflow=0, timeout=0.5))
    try:
        from db.base import Base

        Base.metadata.create_all(database.engine)
        assert isinstance(database.write_executor, WriteThread)
        holding, release = threading.Event(), threading.Event()

        def long_write(session: object) -> None:
            session.execute(insert(Role).values(id=uuid.uuid4(), name="first", permissions=[]))  # type: ignore[attr-defined]
            holding.set()
            release.wait(5)

        def write(name: str) -> object:
            return lambda s: s.execute(insert(Role).values(id=uuid.uuid4(), name=name, permissions=[]))

        async def scenario() -> None:
            first = asyncio.ensure_future(database.run(long_write))
            assert await asyncio.to_thread(holding.wait, 5)
            busy = asyncio.ensure_future(database.run(write("busy")))
            late = asyncio.ensure_future(database.run(write("late"), deadline=time.monotonic() + 0.2))
            await asyncio.sleep(0.7)
            count = select(func.count()).select_from(Role).where(Role.name == "first")
            assert await database.run(lambda s: s.scalar(count), SESSION_READ) == 0  # reads do not queue
            release.set()
            await first
            with pytest.raises(errors.Unavailable) as waited:
                await busy
            assert waited.value.reason == "DATABASE_BUSY"
            with pytest.raises(errors.DeadlineExceeded):
                await late
            await database.run(write("after"))

        run_async(scenario())
        assert [_count(database, n) for n in ("first", "busy", "late", "after")] == [1, 0, 0, 1]
    finally:
        database.dispose()


def test_one_statement_creates_run_in_autocommit_and_only_they_do(client: Client) -> None:
    """A Create that writes with one statement (plans.plan_create) runs on an autocommit
    connection on PostgreSQL (on SQLite in a transaction), without a Session, answers as a
    transactional one does and still reaches the commit listeners; one that needs more
    statements is refused there, not written piecemeal."""
    from nexus.work.v1 import work_pb2 as wpb

    from db.domains.security import AUDIT_LOG_ENTRIES
    from db.engine.resource import REGISTRY
    from tests.support import new_project

    project = new_project(client)
    tasks, messages = REGISTRY["Task"], REGISTRY["ChatMessage"]
    dialect = "postgresql" if client.backend == "postgresql" else "sqlite"
    admin = Call(dialect=dialect, role="admin", method="/test/CreateTask")
    user = Call(dialect=dialect, role="user", actor_user_id=uuid.uuid4())
    request = wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="one statement"))
    token = CURRENT_CALL.set(admin)
    database = Database(client.database_url)
    notes: list[dict[str, object]] = []
    database.add_commit_listener(notes.append)
    try:
        assert plans.plan_create(tasks, request, admin).mode is Mode.ONE_STATEMENT
        assert plans.plan_create(tasks, wpb.CreateTaskRequest(task=request.task, request_id="r1"), admin).mode is Mode.TRANSACTION
        assert plans.plan_create(messages, request, admin).mode is Mode.TRANSACTION, "a change event is a second write"
        CURRENT_CALL.set(user)
        assert plans.plan_create(tasks, request, user).mode is Mode.TRANSACTION, "a row policy is checked after the INSERT"
        CURRENT_CALL.set(admin)

        seen: list[tuple[bool, bool, bool]] = []

        def create(session: object) -> object:
            conn = session.connection()  # type: ignore[attr-defined]
            autocommit = bool(getattr(conn.connection.dbapi_connection, "autocommit", False)) if database.is_postgres else False
            seen.append((autocommit, conn.in_transaction() and not autocommit, isinstance(session, Session)))
            session.info[CREDENTIALS_CHANGED_KEY] = True  # type: ignore[attr-defined]
            return writes.create(session, tasks, request, admin)  # type: ignore[arg-type]

        made = database.run_sync(create, ONE_STATEMENT)
        # PostgreSQL: autocommit; SQLite: its transaction. Never a Session.
        assert seen == [(database.is_postgres, not database.is_postgres, False)]
        assert notes, "commit listeners run after an autocommit write too"
        got = database.run_sync(lambda s: reads.get(s, tasks, wpb.GetTaskRequest(id=made.id)), READ)
        assert got == made
        entries = database.run_sync(
            lambda s: s.execute(select(AUDIT_LOG_ENTRIES.table.c.action).where(AUDIT_LOG_ENTRIES.table.c.resource_id == uuid.UUID(made.id))).scalars().all(),
            SESSION_READ,
        )
        assert entries == ["create"]
        if database.is_postgres:
            batch = wpb.BatchCreateTasksRequest(requests=[request, request])
            with pytest.raises(AssertionError):
                database.run_sync(lambda s: writes.batch_create(s, tasks, batch, admin), ONE_STATEMENT)
            count = select(func.count()).select_from(tasks.table).where(tasks.table.c.project_id == uuid.UUID(project.id))
            assert database.run_sync(lambda s: s.scalar(count), SESSION_READ) == 1, "nothing of the refused batch was written"
    finally:
        CURRENT_CALL.reset(token)
        database.dispose()


def test_one_statement_update_guards_its_revision_and_falls_back_to_a_locked_transaction(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An Update run in autocommit (plans.plan_update) reads without a lock and writes
    only at the revision it read, its audit entry with it. A row changed in between leaves
    nothing of that attempt, and the update runs again in a transaction on the new row."""
    from google.protobuf import field_mask_pb2
    from nexus.work.v1 import work_pb2 as wpb

    from db.domains.security import AUDIT_LOG_ENTRIES
    from db.engine.resource import REGISTRY
    from tests.support import new_project

    project = new_project(client)
    tasks = REGISTRY["Task"]
    dialect = "postgresql" if client.backend == "postgresql" else "sqlite"
    admin = Call(dialect=dialect, role="admin", method="/test/UpdateTask")
    token = CURRENT_CALL.set(admin)
    database = Database(client.database_url)
    try:
        task = client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="before")))
        request = wpb.UpdateTaskRequest(task=wpb.Task(id=task.id, title="ours"), update_mask=field_mask_pb2.FieldMask(paths=["title"]))
        assert plans.plan_update(tasks, request, admin).mode is Mode.ONE_STATEMENT
        moving = wpb.UpdateTaskRequest(task=wpb.Task(id=task.id, assignee_id=str(uuid.uuid4())), update_mask=field_mask_pb2.FieldMask(paths=["assignee_id"]))
        assert writes.update_paths(tasks, moving.task, moving.update_mask.paths) == ["assignee_id"]
        assert plans.plan_update(tasks, moving, admin).mode is Mode.TRANSACTION, "a reference is checked FOR SHARE: a transaction's lock"

        seen: list[bool] = []
        real_check = writes.check_references

        def meanwhile(session: object, *args: object) -> None:
            """Between the read and the UPDATE of the first attempt: another writer commits."""
            dbapi = session.connection().connection.dbapi_connection  # type: ignore[attr-defined]
            seen.append(bool(getattr(dbapi, "autocommit", False)) if database.is_postgres else False)
            if len(seen) == 1 and database.is_postgres:  # (SQLite: one writer, no autocommit path)
                database.run_sync(lambda s: s.execute(
                    text("UPDATE tasks SET description = 'theirs', revision = revision + 1 WHERE id = :id"), {"id": uuid.UUID(task.id)}
                ))
            real_check(session, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(writes, "check_references", meanwhile)
        updated = database.run_sync(lambda s: writes.update(s, tasks, request, admin), ONE_STATEMENT)
        monkeypatch.undo()
        assert seen == ([True, False] if database.is_postgres else [False])
        if database.is_postgres:
            assert (updated.title, updated.description, updated.etag) == ("ours", "theirs", 'W/"3"')
        else:
            assert (updated.title, updated.etag) == ("ours", 'W/"2"')
        assert client.work.GetTask(wpb.GetTaskRequest(id=task.id)) == updated
        column = AUDIT_LOG_ENTRIES.table.c
        entries = database.run_sync(
            lambda s: s.execute(select(column.action).where(column.resource_id == uuid.UUID(task.id)).order_by(column.create_time)).scalars().all(),
            SESSION_READ,
        )
        assert entries == ["create", "update"], "the refused attempt left no entry"
        again = wpb.UpdateTaskRequest(task=wpb.Task(id=task.id, title="again"), update_mask=field_mask_pb2.FieldMask(paths=["title"]))
        assert database.run_sync(lambda s: writes.update(s, tasks, again, admin), ONE_STATEMENT).etag == f'W/"{4 if database.is_postgres else 3}"'
    finally:
        CURRENT_CALL.reset(token)
        database.dispose()


def test_a_one_statement_create_past_its_deadline(client: Client) -> None:
    """run_sync(ONE_STATEMENT) without a Session: on SQLite the work is a transaction, and
    one that finishes past the caller's deadline is rolled back (DEADLINE_EXCEEDED, nothing
    written); on PostgreSQL its statement committed on its own, so the write is acknowledged."""
    from nexus.work.v1 import work_pb2 as wpb

    from db.engine.resource import REGISTRY
    from tests.support import new_project

    project = new_project(client)
    tasks = REGISTRY["Task"]
    admin = Call(dialect=client.backend, role="admin", method="/test/CreateTask")
    token = CURRENT_CALL.set(admin)
    database = Database(client.database_url)
    try:
        request = wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="late"))

        def slow(session: object) -> object:
            made = writes.create(session, tasks, request, admin)  # type: ignore[arg-type]
            time.sleep(0.3)
            return made

        count = select(func.count()).select_from(tasks.table).where(tasks.table.c.project_id == uuid.UUID(project.id))
        if database.is_postgres:
            made = database.run_sync(slow, ONE_STATEMENT, deadline=time.monotonic() + 0.2)
            assert client.work.GetTask(wpb.GetTaskRequest(id=made.id)) == made
            assert database.run_sync(lambda s: s.scalar(count), SESSION_READ) == 1
        else:
            with pytest.raises(errors.DeadlineExceeded):
                database.run_sync(slow, ONE_STATEMENT, deadline=time.monotonic() + 0.2)
            assert database.run_sync(lambda s: s.scalar(count), SESSION_READ) == 0
    finally:
        CURRENT_CALL.reset(token)
        database.dispose()


def _on_threads(database: Database, work: object, calls: int, plan: Plan) -> list[object]:
    """work run `calls` times at once on the database's threads, as RPCs run it."""
    futures = [database.executor.submit(database.run_sync, work, plan) for _ in range(calls)]  # type: ignore[arg-type]
    return [f.result(timeout=30) for f in futures]


def _dbapi(session: object) -> object:
    return session.connection().connection.dbapi_connection  # type: ignore[attr-defined]


def test_database_threads_keep_their_read_connection(database_url: str) -> None:
    """Each database thread reads on one connection of its own, Core and Session reads alike;
    other threads borrow one from the pool and give it back, even with every thread's kept."""
    import threading

    database = Database(database_url, PoolSettings(size=2, max_overflow=0, timeout=2))
    try:
        def core(s: object) -> tuple[int, int]:
            time.sleep(0.05)  # long enough for both threads to take a share
            return threading.get_ident(), id(_dbapi(s))

        seen = _on_threads(database, core, 20, READ)
        seen += _on_threads(database, lambda s: core(s) if isinstance(s, Session) else None, 20, SESSION_READ)
        by_thread: dict[int, set[int]] = {}
        for thread, conn in seen:  # type: ignore[misc]
            by_thread.setdefault(thread, set()).add(conn)
        assert len(by_thread) == 2 and all(len(conns) == 1 for conns in by_thread.values()), by_thread
        kept = set().union(*by_thread.values())
        assert len(kept) == 2
        assert database.read_engine.pool.checkedout() == 2
        # The calling thread is not one of them: it borrows (the pool's overflow) and returns.
        other = id(database.run_sync(_dbapi, READ))
        assert other not in kept
        assert database.read_engine.pool.checkedout() == 2
        assert database.ping()
    finally:
        database.dispose()
    assert database.read_engine.pool.checkedout() == 0


def _backend(s: object) -> int:
    return int(s.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar())  # type: ignore[attr-defined]


def _terminate(database_url: str, pids: set[int]) -> None:
    admin = Database(database_url, PoolSettings(size=1, max_overflow=0))
    try:
        admin.run_sync(lambda s: s.execute(text("SELECT pg_terminate_backend(pid) FROM unnest(CAST(:p AS int[])) AS pid"), {"p": sorted(pids)}))
    finally:
        admin.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_kept_connection_lost_while_idle_is_replaced_before_it_is_used(database_url: str) -> None:
    database = Database(database_url, PoolSettings(size=1, max_overflow=0, ping_after=0.2))
    try:
        (first,) = _on_threads(database, _backend, 1, READ)
        _terminate(database_url, {first})  # type: ignore[arg-type]
        time.sleep(0.5)
        (second,) = _on_threads(database, _backend, 1, READ)  # no error: pinged, then replaced
        assert second != first
    finally:
        database.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_lost_connection_gives_up_every_kept_one(database_url: str) -> None:
    """The database dropped every connection: one call finds out (UNAVAILABLE); the other
    threads then give up theirs unused, so no second call fails."""
    database = Database(database_url, PoolSettings(size=2, max_overflow=0, ping_after=3600))
    try:
        def slow_backend(s: object) -> int:
            time.sleep(0.1)
            return _backend(s)

        pids = set(_on_threads(database, slow_backend, 4, READ))
        assert len(pids) == 2
        _terminate(database_url, pids)  # type: ignore[arg-type]
        time.sleep(0.2)
        with pytest.raises(errors.Unavailable):
            _on_threads(database, _backend, 1, READ)
        after = _on_threads(database, slow_backend, 6, READ)
        assert not pids & set(after)  # type: ignore[arg-type]
    finally:
        database.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_dispose_leaves_no_kept_connection_open(database_url: str) -> None:
    database = Database(database_url, PoolSettings(size=2, max_overflow=0))
    pids = set(_on_threads(database, lambda s: (time.sleep(0.05), _backend(s))[1], 6, READ))
    database.dispose()
    admin = Database(database_url, PoolSettings(size=1, max_overflow=0))
    try:
        alive = pids
        for _ in range(40):
            alive = set(admin.run_sync(lambda s: s.scalars(text("SELECT pid FROM pg_stat_activity WHERE pid = ANY(:p)"), {"p": sorted(pids)}).all(), SESSION_READ))
            if not alive:
                break
            time.sleep(0.05)
        assert pids and not alive
    finally:
        admin.dispose()


def test_sqlite_write_thread_keeps_its_connection_while_writes_wait(tmp_path: Path) -> None:
    """Writes queued behind one another run on one kept connection; once none waits it goes
    back to the pool, so a write of another thread gets it at once."""
    import asyncio

    # A pool timeout well above the burst's queueing on a busy machine (a write queued past it is
    # DATABASE_BUSY); a connection not given back still fails the direct write's 0.4 s below.
    database = Database(f"sqlite:///{tmp_path / 'kept.db'}", PoolSettings(size=2, max_overflow=0, timeout=5.0))
    try:
        from db.base import Base

        Base.metadata.create_all(database.engine)
        used: list[object] = []  # the Connections themselves, alive, so that distinct ones differ

        def write(name: str, one_statement: bool) -> object:
            def work(s: object) -> None:
                time.sleep(0.01)
                used.append(s.connection())  # type: ignore[attr-defined]
                if not one_statement:
                    s.execute(insert(Role).values(id=uuid.uuid4(), name=name, permissions=[]))  # type: ignore[attr-defined]
            return work

        async def burst() -> None:
            await asyncio.gather(*(database.run(write(f"r{i}", i % 2 == 0), ONE_STATEMENT if i % 2 == 0 else TRANSACTION) for i in range(20)))

        run_async(burst())
        assert len(used) == 20 and len({id(c) for c in used}) == 1
        assert database._writer is not None
        for _ in range(100):  # given back on the write thread just after the last answer
            if database._writer.pool.checkedout() == 0:
                break
            time.sleep(0.01)
        assert database._writer.pool.checkedout() == 0
        started = time.monotonic()
        database.run_sync(write("direct", False))
        assert time.monotonic() - started < 0.4 and used[-1] is not used[0]
        assert _count(database, "direct") == 1 and sum(_count(database, f"r{i}") for i in range(20)) == 10
    finally:
        database.dispose()
