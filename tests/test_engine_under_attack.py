"""Every change is on the audit trail; failures and the CLI's settings answer as documented."""
from __future__ import annotations

import collections
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.files.v1 import files_pb2 as fpb
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.work.v1 import work_pb2 as wpb

import db.domains  # noqa: F401
from db.engine.resource import REGISTRY
from db.engine.tables import AuditLogEntry
from tests.conftest import Client, unique
from tests.support import MADE, SAMPLES, make_row, mask, new_channel, new_project, new_role, new_task, new_user

ROOT = Path(__file__).resolve().parent.parent
# Every audited writable resource, whether its rows are made by Create or otherwise (a File).
AUDITED = [s for s in MADE if s.audited]
PASSWORD = "correct horse battery"


def _engine(c: Client) -> sa.Engine:
    return sa.create_engine(c.database_url)


def _trail_disagreements(c: Client, ids: set[str]) -> list[str]:
    """For each resource row among ids: its revision counts its changes, so revision - 1 must be
    the number of its entries after the create; a row gone for good has a delete as its last
    entry; a row present has exactly one create entry."""
    engine = _engine(c)
    problems = []
    audit = AuditLogEntry.__table__
    try:
        with engine.connect() as conn:
            entries: dict[str, list[str]] = collections.defaultdict(list)
            for rid, action in conn.execute(sa.select(audit.c.resource_id, audit.c.action).order_by(audit.c.id)):
                entries[str(rid)].append(action)
            present: dict[str, tuple[str, int]] = {}
            for spec in AUDITED:
                for rid, revision in conn.execute(sa.select(spec.table.c.id, spec.table.c.revision)):
                    present[str(rid)] = (spec.name, revision)
    finally:
        engine.dispose()
    for rid in sorted(ids):
        actions = entries.get(rid, [])
        if rid in present:
            name, revision = present[rid]
            if actions.count("create") != 1:
                problems.append(f"{name} {rid}: {actions.count('create')} create entries")
            changes = [a for a in actions if a != "create"]
            if len(changes) != revision - 1:
                problems.append(f"{name} {rid}: revision {revision} but {len(changes)} change entries {changes}")
        elif not actions or actions[-1] != "delete":
            problems.append(f"row {rid} is gone but its trail is {actions}")
    return problems


def test_custom_methods_memberships_and_cascades_each_leave_one_entry_per_change(client: Client) -> None:
    """Every row a custom method, a membership change or a cascade touches has one audit entry
    per change it underwent: its revision and its trail agree."""
    c = client
    ids: set[str] = set()
    u = new_user(c, password=PASSWORD)
    owner = new_user(c)
    role = new_role(c)
    ids |= {u.id, owner.id, role.id}
    c.identity.AssignRole(ipb.AssignRoleRequest(user_id=u.id, role_id=role.id))
    c.identity.RevokeRole(ipb.RevokeRoleRequest(user_id=u.id, role_id=role.id))
    c.identity.AssignRole(ipb.AssignRoleRequest(user_id=u.id, role_id=role.id))
    c.identity.VerifyUserEmail(ipb.VerifyUserEmailRequest(id=u.id))
    assert c.identity.AuthenticateUser(ipb.AuthenticateUserRequest(login=u.username, password=PASSWORD)).authenticated
    ext = unique("ext")
    ensured = c.identity.EnsureUser(ipb.EnsureUserRequest(user=ipb.User(username=ext, email=f"{ext}@example.com", external_id=ext)))
    assert ensured.created
    assert not c.identity.EnsureUser(ipb.EnsureUserRequest(user=ipb.User(username=ext, email=f"{ext}@example.com", external_id=ext))).created
    ids.add(ensured.user.id)
    key = c.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), user_id=u.id, role=ipb.USER_ROLE_USER)))
    c.identity.RevokeApiKey(ipb.RevokeApiKeyRequest(id=key.id))
    key2 = c.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), user_id=u.id, role=ipb.USER_ROLE_USER)))
    ids |= {key.id, key2.id}
    project = new_project(c, owner=owner)
    c.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=u.id))
    t1 = new_task(c, project, assignee_id=u.id)
    t2 = new_task(c, project)
    c.work.AddTaskDependency(wpb.AddTaskDependencyRequest(task_id=t2.id, depends_on_task_id=t1.id))
    ids |= {project.id, t1.id, t2.id}
    channel = new_channel(c)
    c.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=channel.id, user_id=u.id))
    msg = c.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel.id, author_id=u.id, content="hi")))
    reply = c.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel.id, author_id=owner.id, content="re", parent_id=msg.id)))
    conv = c.chat.CreateConversation(cpb.CreateConversationRequest(conversation=cpb.Conversation(title="c", user_id=u.id)))
    cmsg = c.chat.CreateConversationMessage(cpb.CreateConversationMessageRequest(
        conversation_message=cpb.ConversationMessage(conversation_id=conv.id, sender_type=cpb.SENDER_TYPE_USER, content="q")))
    ids |= {channel.id, msg.id, reply.id, conv.id, cmsg.id}
    # A File of u's, made, changed, counted (a download is no change of it), deleted and back:
    # u's deletion for good clears its owner_id.
    files = REGISTRY["File"]
    file = make_row(c, files, {**SAMPLES["File"].fields(c, unique("f")), "owner_id": u.id})
    c.files.UpdateFile(fpb.UpdateFileRequest(file=fpb.File(id=file.id, mime_type="text/markdown"), update_mask=mask("mime_type")))
    c.files.RecordFileDownload(fpb.RecordFileDownloadRequest(id=file.id))
    c.files.DeleteFile(fpb.DeleteFileRequest(id=file.id))
    c.files.UndeleteFile(fpb.UndeleteFileRequest(id=file.id))
    ids.add(file.id)
    c.identity.DeleteUser(ipb.DeleteUserRequest(id=u.id))
    c.identity.UndeleteUser(ipb.UndeleteUserRequest(id=u.id))
    assert not _trail_disagreements(c, ids), _trail_disagreements(c, ids)
    c.identity.DeleteUser(ipb.DeleteUserRequest(id=u.id, force=True))
    assert not _trail_disagreements(c, ids), _trail_disagreements(c, ids)
    assert not c.files.GetFile(fpb.GetFileRequest(id=file.id)).owner_id
    c.files.DeleteFile(fpb.DeleteFileRequest(id=file.id, force=True))
    c.work.DeleteTask(wpb.DeleteTaskRequest(id=t1.id, force=True))
    c.chat.DeleteChannel(cpb.DeleteChannelRequest(id=channel.id, force=True))
    c.work.DeleteProject(wpb.DeleteProjectRequest(id=project.id, force=True))
    assert not _trail_disagreements(c, ids), _trail_disagreements(c, ids)


def _entries(c: Client, resource_id: str) -> list[Any]:
    from nexus.security.v1 import security_pb2 as spb
    from google.protobuf import json_format

    page = c.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(filter=f'resource_id = "{resource_id}"', page_size=1000))
    out = []
    for e in page.audit_log_entries:
        out.append({ch.field: (json_format.MessageToDict(ch.old_value) if ch.HasField("old_value") else None,
                               json_format.MessageToDict(ch.new_value) if ch.HasField("new_value") else None) for ch in e.changes})
    return out


def test_concurrent_updates_chain_their_audit_entries(client: Client) -> None:
    """Concurrent Updates of one row without an etag: each is one revision and one entry, and
    each entry's old value is the value the entry before it wrote."""
    import concurrent.futures

    c = client
    project = new_project(c)
    values = [f"d{i}" for i in range(24)]

    def change(v: str) -> None:
        c.work.UpdateProject(wpb.UpdateProjectRequest(project=wpb.Project(id=project.id, description=v), update_mask={"paths": ["description"]}))

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(change, values))
    final = c.work.GetProject(wpb.GetProjectRequest(id=project.id))
    entries = _entries(c, project.id)
    updates = [e["description"] for e in entries[1:]]
    assert len(updates) == len(values), updates
    for before, after in zip(updates, updates[1:], strict=False):
        assert before[1] == after[0], updates
    assert updates[-1][1] == final.description
    assert not _trail_disagreements(c, {project.id})


def test_concurrent_creates_with_one_request_id_make_one_row_and_one_entry(client: Client) -> None:
    """The same request_id sent many times at once: one row, one audit entry, one answer."""
    import concurrent.futures
    import uuid

    c = client
    project = new_project(c)
    rid = str(uuid.uuid4())
    title = unique("t")

    def create(_: int) -> str:
        try:
            return c.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=title), request_id=rid)).id
        except grpc.RpcError as exc:
            return f"{exc.code().name}"

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(create, range(16)))
    ids = {a for a in answers if "-" in a}
    assert len(ids) == 1, answers
    listed = c.work.ListTasks(wpb.ListTasksRequest(filter=f'title = "{title}"'))
    assert len(listed.tasks) == 1
    assert len(_entries(c, listed.tasks[0].id)) == 1


def test_concurrent_members_chain_their_audit_entries(client: Client) -> None:
    """Concurrent AddProjectMember calls: each member added shows in one entry, and the entries
    chain (each one's old member_ids is the previous one's new)."""
    import concurrent.futures

    c = client
    project = new_project(c)
    users = [new_user(c) for _ in range(12)]

    def add(u: Any) -> None:
        c.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=u.id))

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        list(pool.map(add, users))
    entries = [e["member_ids"] for e in _entries(c, project.id)[1:]]
    assert len(entries) == len(users)
    for before, after in zip(entries, entries[1:], strict=False):
        assert before[1] == after[0]
    assert sorted(entries[-1][1]) == sorted(u.id for u in users)
    assert not _trail_disagreements(c, {project.id})


def _terminate_all(database_url: str) -> int:
    """Ends every other session on the database, as a PostgreSQL restart would."""
    url = sa.engine.make_url(database_url)
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            return len(conn.execute(sa.text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d AND pid <> pg_backend_pid()"
            ), {"d": url.database}).all())
    finally:
        engine.dispose()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_after_postgresql_drops_every_connection_at_most_one_call_fails(client: Client, database_url: str) -> None:
    """PostgreSQL restarted under load: the service notices on the first call that meets a lost
    connection and gives up the others, so at most one later call fails (reads, one-statement
    writes and transactions alike)."""
    _on_a_database_of_its_own(_restarted_under_load)


def _on_a_database_of_its_own(scenario: Any) -> None:
    """scenario(url, ServerThread, connect, make_config) on a fresh PostgreSQL database: the
    suite's server is not restarted with it."""
    from tests.conftest import ServerThread, connect, make_config
    from tests.databases import fresh_postgres_database

    with fresh_postgres_database() as url:
        scenario(url, ServerThread, connect, make_config)


def _restarted_under_load(database_url: str, ServerThread: Any, connect: Any, make_config: Any) -> None:
    import concurrent.futures

    server = ServerThread(make_config(database_url)).start()
    try:
        c = connect("postgresql", database_url, server)
        project = new_project(c)

        def load(i: int) -> None:
            new_task(c, project)  # one statement
            c.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=new_user(c).id))  # transaction
            c.work.GetProject(wpb.GetProjectRequest(id=project.id))  # read

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(load, range(32)))
        assert _terminate_all(database_url) > 0
        failures = []
        for i in range(30):
            for name, call in (
                ("read", lambda: c.work.GetProject(wpb.GetProjectRequest(id=project.id))),
                ("one statement", lambda: new_task(c, project)),
                ("transaction", lambda: c.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=c.identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(username=unique("u"), email=f"{unique('e')}@example.com"), request_id=unique("r"))).id))),
            ):
                try:
                    call()
                except grpc.RpcError as exc:
                    failures.append(f"{i} {name}: {exc.code().name} {exc.details()[:120]}")
        assert len(failures) <= 1, failures
    finally:
        server.stop()


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_one_statement_update_that_failed_at_its_read_says_nothing_changed(client: Client, database_url: str) -> None:
    """A one-statement Update whose connection was lost reads the row before it writes: losing
    the connection there changed nothing, and UNAVAILABLE says so (committed=false), as the
    same Update in a transaction says."""
    _on_a_database_of_its_own(_update_after_restart)


def _update_after_restart(database_url: str, ServerThread: Any, connect: Any, make_config: Any) -> None:
    server = ServerThread(make_config(database_url)).start()
    try:
        c = connect("postgresql", database_url, server)
        project = new_project(c)
        for _ in range(3):
            c.work.GetProject(wpb.GetProjectRequest(id=project.id))
        assert _terminate_all(database_url) > 0
        try:
            c.work.UpdateProject(wpb.UpdateProjectRequest(project=wpb.Project(id=project.id, description="x"), update_mask={"paths": ["description"]}))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE
            assert c.work.GetProject(wpb.GetProjectRequest(id=project.id)).description != "x"
            assert "may have been applied" not in exc.details(), exc.details()
        else:
            pytest.skip("the update met no lost connection")
    finally:
        server.stop()


def _cli(args: list[str], cwd: Path, env: dict[str, str] | None = None, pythonpath: Path = ROOT) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DB_", "NEXUS_"))}
    full["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{pythonpath / 'generated'}"
    full.update(env or {})
    code = "import sys; from service.cli import main; sys.argv = ['nexus-data', *sys.argv[1:]]; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=full, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["migrate", "check-schema"])
def test_migrate_and_check_schema_refuse_an_unreachable_database_in_one_line(tmp_path: Path, command: str) -> None:
    """An operator who points migrate or check-schema at a PostgreSQL that is not there gets what
    serve says: one line naming the database and the settings, exit status 3 (the database did not
    answer within NEXUS_DB_WAIT_SECONDS, 0 here), no traceback."""
    url = "postgresql+psycopg2://postgres@127.0.0.1:1/nexus"
    unreachable = {"DATABASE_URL": url, "NEXUS_DB_WAIT_SECONDS": "0"}
    serve = _cli(["serve", "--port", "0"], tmp_path, unreachable)
    assert serve.returncode == 3 and "refusing to start" in serve.stderr  # what serve says
    done = _cli([command], tmp_path, unreachable)
    assert "Traceback" not in done.stderr, done.stderr[-400:]
    assert done.returncode == 3
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_a_database_url_of_another_kind_is_refused_in_one_line(tmp_path: Path, command: str) -> None:
    """The service runs on SQLite and PostgreSQL: a URL of another database (MySQL) is a
    setting refused in one line (exit status 2), as an in-memory SQLite URL is."""
    done = _cli([command, *(["--port", "0"] if command == "serve" else [])], tmp_path, {"DATABASE_URL": "mysql://nexus@127.0.0.1/nexus"})
    assert "Traceback" not in done.stderr, done.stderr[-400:]
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1


def test_an_autogenerated_migration_for_a_new_table_runs(tmp_path: Path) -> None:
    """docs/ARCHITECTURE.md, adding a resource, step 5: `alembic revision --autogenerate` against a
    database at head writes a draft which, given the next number, upgrades the database."""
    import shutil

    for name in ("db", "migrations", "service", "generated"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "alembic.ini", tmp_path / "alembic.ini")
    (tmp_path / "db" / "domains" / "labels.py").write_text(
        "from sqlalchemy import String\n"
        "from sqlalchemy.orm import Mapped, mapped_column\n\n"
        "from db.base import Base, ResourceMixin\n\n\n"
        "class Label(ResourceMixin, Base):\n"
        "    __tablename__ = 'labels'\n"
        "    name: Mapped[str] = mapped_column(String(64), nullable=False)\n"
    )
    # (the default database: $XDG_DATA_HOME/nexus-data/nexus.db, under tmp_path for the CLI and alembic alike)
    home = {"XDG_DATA_HOME": str(tmp_path / "data-home")}
    first = _cli(["migrate"], tmp_path, env=home, pythonpath=tmp_path)
    assert first.returncode == 0, first.stderr[-800:]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "DB_", "NEXUS_"))}
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{tmp_path / 'generated'}"
    env.update(home)
    from db import migrate

    following = f"{int(migrate.head_revision()) + 1:04d}"  # the next number, as the steps say
    draft = subprocess.run([sys.executable, "-m", "alembic", "revision", "--autogenerate", "-m", "labels", "--rev-id", following],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert draft.returncode == 0, draft.stderr[-800:]
    [written] = (tmp_path / "migrations" / "versions").glob(f"{following}_*.py")
    assert "create_table('labels'" in written.read_text()
    second = _cli(["migrate"], tmp_path, env=home, pythonpath=tmp_path)
    assert second.returncode == 0, second.stderr[-800:]


@pytest.mark.parametrize("rpc,request_type,field", [
    ("identity.ListUsers", ipb.ListUsersRequest, "password_hash"),
    ("identity.ListUsers", ipb.ListUsersRequest, "password"),
    ("identity.ListApiKeys", ipb.ListApiKeysRequest, "secret_hash"),
    ("identity.ListApiKeys", ipb.ListApiKeysRequest, "secret"),
])
def test_secrets_are_no_filter_or_order(client: Client, rpc: str, request_type: Any, field: str) -> None:
    """A secret column cannot be probed through a filter or an order: INVALID_ARGUMENT."""
    new_user(client, password=PASSWORD)
    service, method = rpc.split(".")
    call = getattr(getattr(client, service), method)
    for kw in ({"filter": f'{field}:"a"'}, {"filter": f'{field} > "$"'}, {"order_by": field}):
        try:
            call(request_type(**kw))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, exc.details()
        else:
            pytest.fail(f"{rpc} accepted {kw}")


def test_concurrent_ensure_user_creates_one_user_with_one_entry(client: Client) -> None:
    """EnsureUser sent many times at once for one external_id: one call says created, all
    answer the same user, and it has one audit entry."""
    import concurrent.futures

    c = client
    ext = unique("ext")

    def ensure(_: int) -> tuple[str, bool]:
        r = c.identity.EnsureUser(ipb.EnsureUserRequest(user=ipb.User(username=ext, email=f"{ext}@example.com", external_id=ext)))
        return r.user.id, r.created

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ensure, range(16)))
    assert len({a[0] for a in answers}) == 1
    assert sum(a[1] for a in answers) == 1
    assert len(_entries(c, answers[0][0])) == 1


def test_short_deadlines_in_every_runner_keep_rows_and_entries_together(client: Client) -> None:
    """Writes under deadlines that expire in the middle of them (one statement, a transaction,
    a membership change, an update): a call that says committed=false changed nothing, one that
    answered made its change, and every row's revision agrees with its audit trail."""
    import random

    from grpc_status import rpc_status

    from tests.support import rich_error

    c = client
    project = new_project(c)
    target = new_task(c, project)
    rng = random.Random(14)
    said_not: list[str] = []
    made: list[str] = []
    ids = {project.id, target.id}
    for i in range(60):
        title = unique("dl")
        timeout = rng.choice([0.001, 0.002, 0.004, 0.008, 0.015, 0.03])
        kind = i % 4
        try:
            if kind == 0:
                made_id = c.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=title)), timeout=timeout).id
            elif kind == 1:
                made_id = c.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=title), request_id=unique("r")), timeout=timeout).id
            elif kind == 2:
                user = new_user(c)
                ids.add(user.id)
                c.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=user.id), timeout=timeout)
                continue
            else:
                c.work.UpdateTask(wpb.UpdateTaskRequest(task=wpb.Task(id=target.id, title=title), update_mask={"paths": ["title"]}), timeout=timeout)
                continue
            made.append(title)
            ids.add(made_id)
        except grpc.RpcError as exc:
            assert exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), exc.details()
            if rpc_status.from_call(exc) is not None and rich_error(exc).info.metadata.get("committed") == "false" and kind in (0, 1):
                said_not.append(title)
    listed = {t.title: t.id for t in c.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"', page_size=1000)).tasks}
    ids |= set(listed.values())
    assert not [t for t in said_not if t in listed], "said committed=false but made"
    assert all(t in listed for t in made)
    assert not _trail_disagreements(c, ids), _trail_disagreements(c, ids)


def _as_user(c: Client, user: Any, role: int = ipb.USER_ROLE_USER) -> Any:
    from nexus.work.v1 import work_pb2_grpc

    from tests.conftest import authed_channel

    key = c.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), user_id=user.id, role=role)))
    return work_pb2_grpc.WorkServiceStub(authed_channel(c.address, key.secret))


def test_a_user_may_create_the_tasks_the_policy_says_they_manage(client: Client) -> None:
    """`nexus-data policy` says a user manages the tasks "assigned to them or created by them",
    and a manage rule is the rows a caller may create, change or delete (db/engine/rules.py):
    so a user may create a task of their own, or the table says where they may not."""
    c = client
    words = _cli(["policy"], ROOT).stdout
    [line] = [ln for ln in words.splitlines() if ln.split()[:2] == ["Task", "user"]]
    user = new_user(c)
    project = new_project(c)  # someone else's, and the user is no member
    work = _as_user(c, user)
    try:
        made = work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="mine")))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "project" in line.lower(), f"refused ({exc.details()}) but the policy says: {line}"
    else:
        assert made.creator_id == user.id


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_an_outage_fails_calls_fast_and_the_service_recovers_when_postgresql_is_back(client: Client, database_url: str) -> None:
    """PostgreSQL unreachable under load: calls fail UNAVAILABLE well within their deadline;
    once it is back, at most one call fails and every kind of call works again."""
    import time

    from tests.conftest import ServerThread, connect, make_config

    from tests.tcp_proxy import proxied

    routed, proxy = proxied(database_url)  # (a TCP or, for an embedded PostgreSQL, a Unix socket)
    proxy.open()
    server = ServerThread(make_config(routed)).start()
    try:
        c = connect("postgresql", database_url, server)
        project = new_project(c)
        calls = {
            "read": lambda: c.work.GetProject(wpb.GetProjectRequest(id=project.id), timeout=10),
            "one statement": lambda: c.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="t")), timeout=10),
            "update": lambda: c.work.UpdateProject(wpb.UpdateProjectRequest(project=wpb.Project(id=project.id, description=unique("d")), update_mask={"paths": ["description"]}), timeout=10),
            "transaction": lambda: c.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="t"), request_id=unique("r")), timeout=10),
        }
        for call in calls.values():
            call()
        proxy.close()
        down = []
        for name, call in calls.items():
            started = time.monotonic()
            try:
                call()
                down.append(f"{name}: answered during the outage")
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() - started > 5:
                    down.append(f"{name}: {exc.code().name} after {time.monotonic() - started:.1f}s")
        proxy.open()
        time.sleep(0.5)
        after = []
        for i in range(5):
            for name, call in calls.items():
                try:
                    call()
                except grpc.RpcError as exc:
                    after.append(f"{i} {name}: {exc.code().name} {exc.details()[:100]}")
        assert not down, down
        assert len(after) <= 1, after
    finally:
        server.stop()
        proxy.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("kind", ["one statement", "transaction"])
def test_a_sqlite_write_blocked_by_another_process_ends_at_its_deadline(client: Client, database_url: str, kind: str) -> None:
    """Another process holds SQLite's write lock: a write with a 0.5 s deadline answers
    DEADLINE_EXCEEDED (committed=false) at about its deadline, and changed nothing."""
    import sqlite3
    import time

    from grpc_status import rpc_status

    from tests.support import rich_error

    c = client
    project = new_project(c)
    title = unique("blocked")
    path = sa.engine.make_url(database_url).database
    holder = sqlite3.connect(path, isolation_level=None, timeout=5)
    holder.execute("BEGIN IMMEDIATE")
    try:
        request = wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=title), request_id=unique("r") if kind == "transaction" else "")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            c.work.CreateTask(request, timeout=0.5)
        took = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    exc = caught.value
    assert exc.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE), exc.details()
    assert took < 1.5
    assert rpc_status.from_call(exc) is not None, "the server's answer, not the client's timer"
    assert rich_error(exc).info.metadata.get("committed") == "false"
    assert not c.work.ListTasks(wpb.ListTasksRequest(filter=f'title = "{title}"')).tasks


def test_policy_json_gives_the_least_role_of_every_served_method(tmp_path: Path) -> None:
    """README: `nexus-data policy --json` gives the least role of every method and service; an
    operator reads the role a served RPC needs there (SecurityService's Gets: admin), as the
    role gate decides it (service/policy.action_for)."""
    import json

    from service.policy import action_for
    from service.server import DOMAIN_SERVICES

    done = _cli(["policy", "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    by_method = json.loads(done.stdout)["least_role_by_method"]
    wrong = {}
    for cls, _, full_name in DOMAIN_SERVICES:
        for method in cls.service_descriptor.methods:
            name = f"{full_name}/{method.name}"
            if by_method.get(name) != action_for(name).value:
                wrong[name] = (by_method.get(name), action_for(name).value)
    assert not wrong, f"{len(wrong)} methods, e.g. {sorted(wrong.items())[:3]}"


def test_concurrent_updates_with_one_etag_let_exactly_one_through(client: Client) -> None:
    """Many updates sent at once with the etag all of them read: one succeeds, the others are
    ABORTED, and the row has one revision more and one update entry."""
    import concurrent.futures

    c = client
    project = new_project(c)

    def change(i: int) -> str:
        try:
            c.work.UpdateProject(wpb.UpdateProjectRequest(project=wpb.Project(id=project.id, description=f"v{i}", etag=project.etag), update_mask={"paths": ["description"]}))
            return "ok"
        except grpc.RpcError as exc:
            return exc.code().name

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(change, range(16)))
    assert answers.count("ok") == 1, answers
    assert set(answers) <= {"ok", "ABORTED"}, answers
    assert len(_entries(c, project.id)) == 2
    assert not _trail_disagreements(c, {project.id})


def test_a_keys_use_is_a_usage_stamp_not_a_change(client: Client) -> None:
    """Calling with an API key records last_used_time on the key's row, and nothing else: the
    key's update_time and etag stay (an edit made with the etag read before the use still
    goes through), and the audit trail, which records changes callers make, has no entry."""
    import time

    from google.protobuf import field_mask_pb2

    c = client
    user = new_user(c)
    key = c.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), user_id=user.id, role=ipb.USER_ROLE_USER)))
    before = c.identity.GetApiKey(ipb.GetApiKeyRequest(id=key.id))
    assert not before.HasField("last_used_time")
    work = _as_user_key(c, key.secret)
    work.ListProjects(wpb.ListProjectsRequest())
    for _ in range(50):
        after = c.identity.GetApiKey(ipb.GetApiKeyRequest(id=key.id))
        if after.HasField("last_used_time"):
            break
        time.sleep(0.05)
    assert after.HasField("last_used_time")
    assert (after.etag, after.update_time) == (before.etag, before.update_time)
    assert not _trail_disagreements(c, {key.id})
    renamed = c.identity.UpdateApiKey(ipb.UpdateApiKeyRequest(
        api_key=ipb.ApiKey(id=key.id, name=unique("renamed"), etag=before.etag), update_mask=field_mask_pb2.FieldMask(paths=["name"]),
    ))
    assert renamed.etag != before.etag and renamed.last_used_time == after.last_used_time


def _as_user_key(c: Client, secret: str) -> Any:
    from nexus.work.v1 import work_pb2_grpc

    from tests.conftest import authed_channel

    return work_pb2_grpc.WorkServiceStub(authed_channel(c.address, secret))
