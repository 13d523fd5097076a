"""Faults the service meets in production: deadlines around the commit, shutdown under load,
the database going away and coming back."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.identity.v1 import identity_pb2_grpc
from nexus.work.v1 import work_pb2 as wpb
from nexus.work.v1 import work_pb2_grpc
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import Client, authed_channel, unique
from tests.support import expect_error, new_task, new_user, rich_error
from tests.tcp_proxy import TcpProxy
from tests.test_server import NOT_SERVING, SERVING, _free_port, blinking_postgres_server, health_of, serve_process, wait_for


# ------------------------------------------------------------------ deadlines and the commit


class RowLock:
    """A write lock held from a connection of the test's own: on PostgreSQL on one row (SELECT
    ... FOR UPDATE), on SQLite the database's one write lock (BEGIN IMMEDIATE). A write of the
    server that needs it waits."""

    def __init__(self, client: Client, table: str, row_id: str) -> None:
        self.client = client
        self.table = table
        self.row_id = row_id
        self._conn: object = None

    def __enter__(self) -> RowLock:
        if self.client.backend == "postgresql":
            self._engine = create_engine(self.client.database_url)
            conn = self._engine.connect()
            conn.execute(text(f"SELECT id FROM {self.table} WHERE id = :id FOR UPDATE"), {"id": self.row_id})
            self._conn = conn
        else:
            conn = sqlite3.connect(make_url(self.client.database_url).database, isolation_level=None, timeout=5)
            conn.execute("BEGIN IMMEDIATE")
            self._conn = conn
        return self

    def __exit__(self, *_exc: object) -> None:
        self._conn.rollback()  # type: ignore[attr-defined]
        self._conn.close()  # type: ignore[attr-defined]
        if self.client.backend == "postgresql":
            self._engine.dispose()


def _assign(task_id: str, user_id: str) -> wpb.UpdateTaskRequest:
    return wpb.UpdateTaskRequest(task=wpb.Task(id=task_id, assignee_id=user_id), update_mask=field_mask_pb2.FieldMask(paths=["assignee_id"]))


def _rename(task_id: str, title: str) -> wpb.UpdateTaskRequest:
    return wpb.UpdateTaskRequest(task=wpb.Task(id=task_id, title=title), update_mask=field_mask_pb2.FieldMask(paths=["title"]))


@pytest.mark.parametrize("one_statement", [True, False], ids=["one-statement", "transaction"])
def test_a_write_whose_deadline_passes_waiting_for_a_lock_says_nothing_changed(client: Client, one_statement: bool) -> None:
    """A write kept waiting for a lock past its deadline is answered by the server itself, before
    the caller's own deadline: DEADLINE_EXCEEDED whose ErrorInfo says `committed: false`, a
    message saying nothing was changed, and the row as it was. Both ways a write runs: one
    statement (on PostgreSQL in autocommit) and a transaction (a change of a reference: its row is read FOR SHARE)."""
    task = new_task(client)
    request = _rename(task.id, "renamed") if one_statement else _assign(task.id, new_user(client).id)
    with RowLock(client, "tasks", task.id):
        started = time.monotonic()
        err = expect_error(grpc.StatusCode.DEADLINE_EXCEEDED, client.work.UpdateTask, request, timeout=1.0)
        assert time.monotonic() - started < 1.0, "the server answered before the caller's own deadline"
    assert err.info.metadata["committed"] == "false"
    assert "nothing was changed" in err.message
    assert client.work.GetTask(wpb.GetTaskRequest(id=task.id)) == task


def test_a_create_retried_with_its_request_id_after_a_deadline_is_made_once(client: Client) -> None:
    """The safe path: a create that ended DEADLINE_EXCEEDED (here kept waiting for a lock: on
    PostgreSQL its project's row, whose reference it checks) sent again with the same
    request_id makes one resource, however many times it is sent."""
    project_id = new_task(client).project_id
    request_id = unique("req")
    title = unique("title")
    request = wpb.CreateTaskRequest(task=wpb.Task(project_id=project_id, title=title), request_id=request_id)
    with RowLock(client, "projects", project_id):
        expect_error(grpc.StatusCode.DEADLINE_EXCEEDED, client.work.CreateTask, request, timeout=0.5)
    first = client.work.CreateTask(request, timeout=10)
    again = client.work.CreateTask(request, timeout=10)
    assert first == again
    found = client.work.ListTasks(wpb.ListTasksRequest(filter=f'title = "{title}"'))
    assert [t.id for t in found.tasks] == [first.id]


@pytest.fixture
def blinking_postgres() -> Iterator[tuple[Client, TcpProxy]]:
    """(health checked every 30 s, so that only the calls themselves move readiness in a test)"""
    with blinking_postgres_server(health_interval_seconds=30.0) as pair:
        yield pair


def test_a_write_lost_with_its_connection_may_have_been_applied(blinking_postgres: tuple[Client, TcpProxy]) -> None:
    """The case the server cannot know: the connection is lost while the statement that is its
    own commit (a one-statement update, in autocommit) waits for a lock. The answer says the
    change may have been applied (`committed: unknown`), and indeed PostgreSQL applies it once
    the lock goes. The same loss in a transaction, before its COMMIT, is rolled back:
    `committed: false`."""
    c, proxy = blinking_postgres
    task = new_task(c)
    assign = _assign(task.id, new_user(c).id)
    for request, committed in ((_rename(task.id, "renamed"), "unknown"), (assign, "false")):
        if committed == "false":  # the second round: the database back, the server reconnected
            proxy.open()
            assert wait_for(lambda: _ok(lambda: c.work.UpdateTask(_rename(task.id, "renamed"))), timeout=10)
        with RowLock(c, "tasks", task.id):
            answer = c.work.UpdateTask.future(request, timeout=20)
            assert wait_for(lambda: _waiting_for_a_lock(c) == 1, timeout=10), "the server's UPDATE waits for the row"
            proxy.close()
            with pytest.raises(grpc.RpcError) as caught:
                answer.result()
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.UNAVAILABLE, err.message
        assert err.info.metadata["committed"] == committed, err.message
        if committed == "unknown":
            assert "may have been applied" in err.message
            engine = create_engine(c.database_url)
            try:
                title = lambda: engine.connect().execute(text("SELECT title FROM tasks WHERE id = :id"), {"id": task.id}).scalar()  # noqa: E731, B023 - called within this iteration
                assert wait_for(lambda: title() == "renamed", timeout=10), "the statement committed after the answer"  # noqa: B023 - called within this iteration
            finally:
                engine.dispose()
        else:
            assert "nothing was changed" in err.message
    proxy.open()
    assert wait_for(lambda: _ok(lambda: c.work.GetTask(wpb.GetTaskRequest(id=task.id))), timeout=10)
    assert c.work.GetTask(wpb.GetTaskRequest(id=task.id)).assignee_id == task.assignee_id


def _waiting_for_a_lock(c: Client) -> int:
    engine = create_engine(c.database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND application_name = 'nexus-data'"
            )).scalar())
    finally:
        engine.dispose()


def _ok(fn: object) -> bool:
    try:
        fn()  # type: ignore[operator]
        return True
    except grpc.RpcError:
        return False


# ------------------------------------------------------------------ readiness follows the calls


def _readiness_becomes(channel: grpc.Channel, status: int) -> bool:
    """Readiness polled for at most 100 ms."""
    return wait_for(lambda: health_of(channel, "readiness") == status, timeout=0.1, interval=0.005)


SERVER_PROCESS = """
import asyncio, sys
from service.server import create_server
from tests.conftest import make_config

async def main():
    app = create_server(make_config(sys.argv[1], port=int(sys.argv[2]), health_interval_seconds=30.0))
    await app.start()
    print(app.bootstrap_secret, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def outage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, grpc.Channel, object, object]]:
    """(backend, an authenticated channel to a server, cut(), restore()) for a database that goes away
    and comes back, the periodic health check far off (30 s): on PostgreSQL the proxy in front
    of it is cut; on SQLite, whose server process has no connection to lose, every write of
    the server's process to a file fails (RLIMIT_FSIZE: disk I/O error) until restored."""
    if request.param == "postgresql":
        with blinking_postgres_server(health_interval_seconds=30.0) as (c, proxy):
            yield request.param, c.channel, proxy.close, proxy.open
        return
    import resource

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_PROCESS, f"sqlite:///{tmp_path / 'outage.db'}", str(port)],
        cwd=Path(__file__).resolve().parent.parent, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        secret = proc.stdout.readline().strip()  # type: ignore[union-attr]
        channel = authed_channel(f"127.0.0.1:{port}", secret)
        grpc.channel_ready_future(channel).result(timeout=30)
        unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
        yield request.param, channel, lambda: resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (1, resource.RLIM_INFINITY)), lambda: resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, unlimited)
        channel.close()
    finally:
        proc.kill()
        proc.wait(10)


def test_readiness_follows_a_failed_and_a_successful_call_at_once(outage: tuple[str, grpc.Channel, object, object]) -> None:
    """One call that finds the database unreachable makes the server NOT_SERVING at once; one
    call that succeeds makes it SERVING at once (the periodic check is for an idle server).
    The failed create says whether it may have been applied: on SQLite its COMMIT failed, so it
    was not; on PostgreSQL "false" when no connection could be made, "unknown" when its one
    statement, its own commit, met a lost one (here it was not applied: the connection was
    gone before it)."""
    backend, channel, cut, restore = outage
    identity = identity_pb2_grpc.IdentityServiceStub(channel)
    user = identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(username=unique("u"), email=f"{unique()}@example.com")))
    assert health_of(channel, "readiness") == SERVING
    for _ in range(3):
        cut()  # type: ignore[operator]
        name = unique("role")
        err = expect_error(grpc.StatusCode.UNAVAILABLE, identity.CreateRole, ipb.CreateRoleRequest(role=ipb.Role(name=name)))
        assert err.info.reason == "DATABASE_UNAVAILABLE"
        assert err.info.metadata["committed"] in (("false",) if backend == "sqlite" else ("false", "unknown")), err.message
        assert _readiness_becomes(channel, NOT_SERVING), "NOT_SERVING right after the failed call"
        assert health_of(channel, "nexus.identity.v1.IdentityService") == NOT_SERVING
        assert health_of(channel, "liveness") == SERVING
        restore()  # type: ignore[operator]
        assert identity.GetUser(ipb.GetUserRequest(id=user.id)) == user
        assert _readiness_becomes(channel, SERVING), "SERVING right after the successful call"
        assert identity.ListRoles(ipb.ListRolesRequest(filter=f'name = "{name}"')).total_size == 0


# ------------------------------------------------------------------ SIGTERM under load


def test_calls_across_sigterm_are_served_or_unavailable(client: Client, tmp_path: Path) -> None:
    """A steady stream of calls from several threads across SIGTERM: each is served (OK) or
    refused with UNAVAILABLE, the code clients retry; none is CANCELLED, none anything else."""
    user = new_user(client)
    task = new_task(client)
    port = _free_port()
    log = (tmp_path / "server.log").open("w+")
    proc = serve_process(client.database_url, port, log, NEXUS_DRAIN_SECONDS="0.5", NEXUS_GRACE_SECONDS="2")
    address = f"127.0.0.1:{port}"
    codes: Counter[str] = Counter()
    odd: list[str] = []
    lock = threading.Lock()
    done = threading.Event()

    def caller(i: int) -> None:
        channel = authed_channel(address, client.admin_secret, options=[("grpc.use_local_subchannel_pool", 1)])
        identity = identity_pb2_grpc.IdentityServiceStub(channel)
        work = work_pb2_grpc.WorkServiceStub(channel)
        n = 0
        try:
            while not done.is_set():
                n += 1
                try:
                    if i % 2:
                        identity.GetUser(ipb.GetUserRequest(id=user.id), timeout=10)
                    else:
                        work.UpdateTask(_rename(task.id, f"t{i}-{n}"), timeout=10)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                    if exc.code() != grpc.StatusCode.UNAVAILABLE:
                        with lock:
                            odd.append(f"{code}: {exc.details()}")
                with lock:
                    codes[code] += 1
        finally:
            channel.close()

    try:
        probe = grpc.insecure_channel(address)
        grpc.channel_ready_future(probe).result(timeout=30)
        assert wait_for(lambda: health_of(probe, "readiness") == SERVING, timeout=30)
        probe.close()
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        served = codes["OK"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        time.sleep(0.3)
        done.set()
        for t in threads:
            t.join(30)
    finally:
        done.set()
        if proc.poll() is None:
            proc.kill()
        log.seek(0)
        output = log.read()
    assert served > 20, codes
    assert odd == [], f"{codes}: {odd[:5]}"
    assert codes["UNAVAILABLE"] > 0, codes
    assert "stopped" in output, output[-2000:]
