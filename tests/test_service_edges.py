"""Edges of the engine, the authenticator and the CLI, pushed from outside: upserts taking turns
and racing creates and deletes, JSON columns cleared through every write path and filtered, API
keys' usage stamps while the database is held by another writer, `nexus-data migrate` either
way, callers acting for no user, and a document given to its sharer. Both databases."""
from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import struct_pb2
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.knowledge.v1 import knowledge_pb2 as kpb
from nexus.work.v1 import work_pb2 as wpb
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import Client, connect, unique
from tests.support import expect_error, mask, new_project, new_user
from tests.test_access import Actor, actor  # noqa: F401 - the fixture
from tests.test_knowledge_under_attack import add_json_null_chunk, chunks_matching
from tests.test_migrations import empty_url  # noqa: F401 - the fixture

Code = grpc.StatusCode
BAD = {Code.INTERNAL, Code.UNKNOWN}


def _chunk(source: str, key: str, content: str = "text", **fields: object) -> kpb.KnowledgeChunk:
    return kpb.KnowledgeChunk(source=source, external_id=key, content=content, **fields)  # type: ignore[arg-type]


def _batch(pairs: list[tuple[str, str]], content: str = "text") -> kpb.BatchUpsertKnowledgeChunksRequest:
    return kpb.BatchUpsertKnowledgeChunksRequest(
        requests=[kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=_chunk(s, k, content)) for s, k in pairs],
        read_mask={"paths": ["id"]},
    )


def _code(fn: Callable[[], object]) -> tuple[Code, str]:
    try:
        fn()
        return Code.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def _raw_postgres(c: Client) -> Any:
    """A psycopg2 connection of the test's own, with the arguments SQLAlchemy takes from the URL
    (the embedded server's socket directory included)."""
    import psycopg2

    args, kwargs = create_engine(c.database_url).dialect.create_connect_args(make_url(c.database_url))
    return psycopg2.connect(*args, **kwargs)


def _count(c: Client, source: str) -> int:
    engine = create_engine(c.database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT count(*) FROM knowledge_chunks WHERE source = :s"), {"s": source}).scalar_one()
    finally:
        engine.dispose()


# ------------------------------------------------------------------ 1. upserts take turns


def test_upsert_waiting_for_its_turn_past_its_deadline_is_deadline_exceeded_and_writes_nothing(client: Client) -> None:
    source = unique("turn")
    client.knowledge.ListDocuments(kpb.ListDocumentsRequest())  # the admin key's usage stamp, if due, written now
    time.sleep(0.5)
    if client.backend == "postgresql":
        conn = _raw_postgres(client)
        cur = conn.cursor()
        cur.execute("SELECT pg_advisory_xact_lock(5170311, hashtext(%s) & 63)", (f"knowledge_chunks:{source}",))
    else:
        conn = sqlite3.connect(make_url(client.database_url).database, isolation_level=None, timeout=5)
        conn.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        err = expect_error(Code.DEADLINE_EXCEEDED, client.knowledge.BatchUpsertKnowledgeChunks, _batch([(source, "a"), (source, "b")]), timeout=1.5)
        assert time.monotonic() - started < 5, "answered near its deadline"
        assert err.message
    finally:
        conn.rollback()
        conn.close()
    time.sleep(1.0)
    assert _count(client, source) == 0, "nothing written by a call answered DEADLINE_EXCEEDED"


def test_a_batch_of_ten_thousand_sources_and_many_concurrent_multi_source_batches_are_ok(client: Client) -> None:
    tag = unique("many")
    client.knowledge.BatchUpsertKnowledgeChunks(_batch([(f"{tag}-{i}", "k") for i in range(10_000)]), timeout=120)
    codes: Counter[tuple[Code, str]] = Counter()

    def ingest(n: int) -> None:
        rnd = random.Random(n)
        pairs = [(f"{tag}-{rnd.randrange(400)}", f"k{rnd.randrange(5)}") for _ in range(300)]
        pairs = list(dict.fromkeys(pairs))
        code, said = _code(lambda: client.knowledge.BatchUpsertKnowledgeChunks(_batch(pairs, f"v{n}"), timeout=60))
        codes[(code, said[:80] if code != Code.OK else "")] += 1

    with ThreadPoolExecutor(12) as pool:
        list(pool.map(ingest, range(36)))
    assert set(codes) == {(Code.OK, "")}, dict(codes)


def test_upserts_racing_creates_and_delete_by_source_never_answer_internal(client: Client) -> None:
    sources = [unique("race") for _ in range(4)]
    codes: Counter[tuple[str, Code, str]] = Counter()

    def work(n: int) -> None:
        rnd = random.Random(n)
        for _ in range(15):
            source = rnd.choice(sources)
            keys = [f"k{i}" for i in rnd.sample(range(40), 20)]
            kind = rnd.choice(["upsert", "upsert", "create", "batch_create", "delete"])
            k = client.knowledge
            if kind == "upsert":
                call = lambda: k.BatchUpsertKnowledgeChunks(_batch([(source, key) for key in keys], f"v{n}"), timeout=60)  # noqa: E731, B023 - called by _code below, within this iteration
            elif kind == "create":
                call = lambda: k.CreateKnowledgeChunk(kpb.CreateKnowledgeChunkRequest(knowledge_chunk=_chunk(source, keys[0])), timeout=60)  # noqa: E731, B023 - called by _code below, within this iteration
            elif kind == "batch_create":
                call = lambda: k.BatchCreateKnowledgeChunks(kpb.BatchCreateKnowledgeChunksRequest(  # noqa: E731, B023 - called by _code below, within this iteration
                    requests=[kpb.CreateKnowledgeChunkRequest(knowledge_chunk=_chunk(source, key)) for key in keys[:5]]), timeout=60)  # noqa: B023 - called by _code below, within this iteration
            else:
                call = lambda: k.DeleteKnowledgeChunksBySource(kpb.DeleteKnowledgeChunksBySourceRequest(source=source), timeout=60)  # noqa: E731, B023 - called by _code below, within this iteration
            code, said = _code(call)
            codes[(kind, code, said[:100] if code in BAD or (kind == "upsert" and code != Code.OK) else "")] += 1

    with ThreadPoolExecutor(10) as pool:
        list(pool.map(work, range(10)))
    bad = {k: v for k, v in codes.items() if k[1] in BAD or (k[0] == "upsert" and k[1] != Code.OK) or k[1] == Code.DEADLINE_EXCEEDED}
    assert not bad, dict(codes)


# ------------------------------------------------------------------ 2. JSON null is absent


def _struct(**values: object) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def test_user_preferences_cleared_by_a_mask_is_absent_to_filters(client: Client) -> None:
    ident = client.identity
    a = new_user(client, preferences=_struct(theme="dark"))
    b = new_user(client)
    cleared = ident.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=a.id), update_mask=mask("preferences")))
    assert not cleared.HasField("preferences")
    batch = ident.BatchCreateUsers(ipb.BatchCreateUsersRequest(requests=[ipb.CreateUserRequest(user=ipb.User(username=unique("u"), email=f"{unique()}@example.com", full_name="x"))])) \
        if hasattr(ipb, "BatchCreateUsersRequest") else None
    ids = [a.id, b.id] + ([u.id for u in batch.users] if batch is not None else [])
    in_ids = " OR ".join(f'id = "{i}"' for i in ids)
    for condition, expected in (("preferences:*", 0), ("preferences = null", len(ids)), ("preferences != null", 0)):
        listed = ident.ListUsers(ipb.ListUsersRequest(filter=f"({in_ids}) AND {condition}"))
        assert len(listed.users) == expected, (condition, [u.id for u in listed.users])


def test_task_tags_and_chat_attachments_cleared_through_every_path_are_never_sql_null(client: Client) -> None:
    project = new_project(client)
    w = client.work
    task = w.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(title="t", project_id=project.id, tags=["a"])))
    cleared = w.UpdateTask(wpb.UpdateTaskRequest(task=wpb.Task(id=task.id), update_mask=mask("tags")))
    assert list(cleared.tags) == []
    whole = w.GetTask(wpb.GetTaskRequest(id=task.id))
    whole.tags[:] = ["b"]
    whole = w.UpdateTask(wpb.UpdateTaskRequest(task=whole, update_mask=mask("*")))
    del whole.tags[:]
    w.UpdateTask(wpb.UpdateTaskRequest(task=whole, update_mask=mask("*")))
    listed = w.ListTasks(wpb.ListTasksRequest(filter=f'id = "{task.id}" AND tags:*'))
    assert len(listed.tasks) == 0 or list(listed.tasks[0].tags) == []
    channel = client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=unique("ch"))))
    msg = client.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(
        channel_id=channel.id, content="hi", attachments=[cpb.Attachment(name="f", url="https://x/f")])))
    client.chat.UpdateChatMessage(cpb.UpdateChatMessageRequest(chat_message=cpb.ChatMessage(id=msg.id), update_mask=mask("attachments")))
    whole = client.chat.GetChatMessage(cpb.GetChatMessageRequest(id=msg.id))
    whole.content = "x"
    client.chat.UpdateChatMessage(cpb.UpdateChatMessageRequest(chat_message=whole, update_mask=mask("*")))
    for condition in ("attachments:*", "attachments = null", "attachments != null"):
        code, said = _code(lambda: client.chat.ListChatMessages(cpb.ListChatMessagesRequest(parent=channel.id, filter=f'id = "{msg.id}" AND {condition}'))  # noqa: B023 - called within this iteration
                           if "parent" in cpb.ListChatMessagesRequest.DESCRIPTOR.fields_by_name else
                           client.chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=f'id = "{msg.id}" AND {condition}')))  # noqa: B023 - called within this iteration
        assert code not in BAD, (condition, code, said)


def test_document_content_and_role_metadata_cleared_are_absent(client: Client) -> None:
    k = client.knowledge
    owner = new_user(client)
    doc = k.CreateDocument(kpb.CreateDocumentRequest(document=kpb.Document(title="d", owner_id=owner.id, content=_struct(a=1))))
    k.UpdateDocument(kpb.UpdateDocumentRequest(document=kpb.Document(id=doc.id), update_mask=mask("content")))
    plain = k.CreateDocument(kpb.CreateDocumentRequest(document=kpb.Document(title="d", owner_id=owner.id)))
    in_ids = f'(id = "{doc.id}" OR id = "{plain.id}")'
    for condition, expected in (("content:*", 0), ("content = null", 2), ("content != null", 0)):
        listed = k.ListDocuments(kpb.ListDocumentsRequest(filter=f"{in_ids} AND {condition}"))
        assert len(listed.documents) == expected, condition
    versions = k.ListDocumentVersions(kpb.ListDocumentVersionsRequest(parent=doc.id) if "parent" in kpb.ListDocumentVersionsRequest.DESCRIPTOR.fields_by_name
                                      else kpb.ListDocumentVersionsRequest(document_id=doc.id))
    assert len(versions.document_versions) >= 1
    conv = client.chat.CreateConversation(cpb.CreateConversationRequest(conversation=cpb.Conversation(title="c", user_id=owner.id)))
    made = client.chat.CreateConversationMessage(cpb.CreateConversationMessageRequest(conversation_message=cpb.ConversationMessage(
        conversation_id=conv.id, content="x", sender_type=cpb.SENDER_TYPE_USER, role_metadata=_struct(m=1))))
    client.chat.UpdateConversationMessage(cpb.UpdateConversationMessageRequest(
        conversation_message=cpb.ConversationMessage(id=made.id), update_mask=mask("role_metadata")))
    for condition, expected in (("role_metadata:*", 0), ("role_metadata = null", 1), ("role_metadata != null", 0)):
        listed = client.chat.ListConversationMessages(cpb.ListConversationMessagesRequest(filter=f'id = "{made.id}" AND {condition}'))
        assert len(listed.conversation_messages) == expected, condition


def test_chunk_metadata_cleared_by_update_mask_and_empty_struct(client: Client) -> None:
    k = client.knowledge
    source = unique("meta")
    made = k.CreateKnowledgeChunk(kpb.CreateKnowledgeChunkRequest(knowledge_chunk=_chunk(source, "a", chunk_metadata=_struct(x=1))))
    k.UpdateKnowledgeChunk(kpb.UpdateKnowledgeChunkRequest(knowledge_chunk=kpb.KnowledgeChunk(id=made.id), update_mask=mask("chunk_metadata")))
    k.UpsertKnowledgeChunk(kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=_chunk(source, "b", chunk_metadata=struct_pb2.Struct())))
    k.BatchCreateKnowledgeChunks(kpb.BatchCreateKnowledgeChunksRequest(requests=[kpb.CreateKnowledgeChunkRequest(knowledge_chunk=_chunk(source, "c", chunk_metadata=struct_pb2.Struct()))]))
    k.CreateKnowledgeChunk(kpb.CreateKnowledgeChunkRequest(knowledge_chunk=_chunk(source, "d", chunk_metadata=struct_pb2.Struct())))

    def matching(condition: str) -> list[str]:
        listed = k.ListKnowledgeChunks(kpb.ListKnowledgeChunksRequest(filter=f'source = "{source}" AND {condition}'))
        return sorted(c.external_id for c in listed.knowledge_chunks)

    # an empty Struct is whatever it is, but the same whichever path wrote it
    present = matching("chunk_metadata:*")
    assert "a" not in present
    assert present in ([], ["b", "c", "d"]), present


# ------------------------------------------------------------------ 3. key stamps


def test_a_key_stamp_changes_neither_etag_update_time_nor_audit(client: Client) -> None:
    user = new_user(client)
    key = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_USER, user_id=user.id)))
    before = client.identity.GetApiKey(ipb.GetApiKeyRequest(id=key.api_key.id if key.HasField("api_key") else key.id)) if hasattr(key, "api_key") else None
    key_id = before.id if before is not None else key.id
    before = client.identity.GetApiKey(ipb.GetApiKeyRequest(id=key_id))
    other = connect(client.backend, client.database_url, client.server, secret=key.secret)
    try:
        other.knowledge.ListDocuments(kpb.ListDocumentsRequest())
    finally:
        other.channel.close()
    time.sleep(1.0)
    after = client.identity.GetApiKey(ipb.GetApiKeyRequest(id=key_id))
    assert after.HasField("last_used_time")
    assert (after.etag, after.update_time) == (before.etag, before.update_time)
    from nexus.security.v1 import security_pb2 as spb

    trail = client.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(filter=f'resource_id = "{key_id}"')).audit_log_entries
    assert [e.action for e in trail] == [spb.AUDIT_ACTION_CREATE]


def test_server_stopped_while_stamps_wait_for_the_write_lock_stops_promptly(client: Client, tmp_path: Path) -> None:
    """A server stopped while a key's stamp waits for the database (SQLite: another writer holds
    the lock) stops at once, without a traceback."""
    script = tmp_path / "stop.py"
    script.write_text(f'''
import logging, sqlite3, sys, time, threading
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
logging.basicConfig(level=logging.WARNING)
from tests.conftest import ServerThread, make_config, connect
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.knowledge.v1 import knowledge_pb2 as kpb
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
url = {client.database_url!r}
server = ServerThread(make_config(url)).start()
admin = connect("x", url, server, secret={client.admin_secret!r})
keys = [admin.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name="k%d-%f" % (i, time.time()), role=ipb.USER_ROLE_ADMIN))) for i in range(4)]
if url.startswith("sqlite"):
    lock = sqlite3.connect(make_url(url).database, isolation_level=None, timeout=5); lock.execute("BEGIN IMMEDIATE")
else:
    eng = create_engine(url); lock = eng.raw_connection(); cur = lock.cursor(); cur.execute("SELECT id FROM api_keys FOR UPDATE")
    threading.Timer(20, lambda: (lock.rollback(), lock.close())).start()
clients = [connect("x", url, server, secret=k.secret) for k in keys]
for c in clients:
    try:
        c.knowledge.ListDocuments(kpb.ListDocumentsRequest(), timeout=2)
    except Exception as e:
        print("", "call:", type(e).__name__, getattr(e, "code", lambda: "")(), getattr(e, "details", lambda: "")(), file=sys.stderr)
t = time.monotonic()
server.stop()
print("stopped in %.2f" % (time.monotonic() - t))
if url.startswith("sqlite"):
    lock.rollback(); lock.close()
''')
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Task was destroyed" not in done.stderr, done.stderr[-2000:]
    took = float(done.stdout.split("stopped in ")[1])
    assert took < 3, (took, done.stderr[-1500:])


# ------------------------------------------------------------------ 4. migrate


def test_migrate_base_current_unknown_and_head(empty_url: str, tmp_path: Path) -> None:  # noqa: F811
    def migrate(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "service.cli", "migrate", "--database-url", empty_url, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])})

    from db.migrate import head_revision

    for revision in ("head", "head", "base", "base", "head", "0008", "0008", "heads", "-1", "+1", "head-1", "0099", "", "ab", "base:head", "0", "000", "head+1", "base-1", "0008+5", "heads@x"):
        done = migrate(revision)
        assert "Traceback" not in done.stderr, (revision, done.stderr[-800:])
        assert done.returncode in (0, 2), (revision, done.returncode, done.stderr[-400:])
        if done.returncode == 2:
            assert len(done.stderr.strip().splitlines()) == 1, (revision, done.stderr)
    assert migrate("head").stdout.strip().splitlines()[-1] == f"schema at {head_revision()}"


# ------------------------------------------------------------------ 5. NO_USER_TO_OWN


def test_a_userless_key_may_still_create_what_needs_no_owner(client: Client) -> None:
    for role in (ipb.USER_ROLE_USER, ipb.USER_ROLE_ADMIN):
        key = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=role)))
        userless = connect(client.backend, client.database_url, client.server, secret=key.secret)
        try:
            project = new_project(client)
            codes = {}
            codes["channel"] = _code(lambda: userless.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=unique("ch")))))  # noqa: B023 - called within this iteration
            channel = client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=unique("ch"))))
            codes["message"] = _code(lambda: userless.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel.id, content="x"))))  # noqa: B023 - called within this iteration
            codes["task"] = _code(lambda: userless.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(title="t", project_id=project.id))))  # noqa: B023 - called within this iteration
            codes["chunk"] = _code(lambda: userless.knowledge.CreateKnowledgeChunk(kpb.CreateKnowledgeChunkRequest(knowledge_chunk=_chunk(unique("s"), "a"))))  # noqa: B023 - called within this iteration
            if role == ipb.USER_ROLE_ADMIN:
                owner = new_user(client)
                codes["doc"] = _code(lambda: userless.knowledge.CreateDocument(kpb.CreateDocumentRequest(document=kpb.Document(title="d", owner_id=owner.id))))  # noqa: B023 - called within this iteration
            bad = {k: v for k, v in codes.items() if v[0] in BAD}
            assert not bad, (role, codes)
        finally:
            userless.channel.close()


# ------------------------------------------------------------------ 6. owner change ends the new owner's share


def test_owner_change_by_batch_update_or_mask_star_ends_the_share(client: Client, actor: Callable[..., Actor]) -> None:
    owner, heir = actor(), actor()
    k = client.knowledge
    made = k.CreateDocument(kpb.CreateDocumentRequest(document=kpb.Document(title="Estate", owner_id=owner.id)))
    k.ShareDocument(kpb.ShareDocumentRequest(document_id=made.id, user_id=heir.id, level=kpb.DOCUMENT_SHARE_LEVEL_VIEW))
    got = k.GetDocument(kpb.GetDocumentRequest(id=made.id))
    got.owner_id = heir.id
    k.UpdateDocument(kpb.UpdateDocumentRequest(document=got, update_mask=mask("*")))
    shares = k.ListDocumentShares(kpb.ListDocumentSharesRequest(document_id=made.id)).document_shares
    assert heir.id not in [s.user_id for s in shares]
    # back to the first owner, who never had a share: fine; then the heir may re-share and give it again
    k.UpdateDocument(kpb.UpdateDocumentRequest(document=kpb.Document(id=made.id, owner_id=owner.id), update_mask=mask("owner_id")))
    k.ShareDocument(kpb.ShareDocumentRequest(document_id=made.id, user_id=heir.id, level=kpb.DOCUMENT_SHARE_LEVEL_EDIT))
    # the sharer edits (as an editor) the title — no owner change, share stays
    heir.c.knowledge.UpdateDocument(kpb.UpdateDocumentRequest(document=kpb.Document(id=made.id, title="x"), update_mask=mask("title")))
    shares = k.ListDocumentShares(kpb.ListDocumentSharesRequest(document_id=made.id)).document_shares
    assert heir.id in [s.user_id for s in shares]
    # deleted then given
    k.DeleteDocument(kpb.DeleteDocumentRequest(id=made.id))
    code = _code(lambda: k.UpdateDocument(kpb.UpdateDocumentRequest(document=kpb.Document(id=made.id, owner_id=heir.id), update_mask=mask("owner_id"))))
    assert code[0] not in BAD, code



def test_a_write_queued_behind_a_key_stamp_is_answered_with_a_status_at_its_deadline(client: Client) -> None:
    """A key's first call while another writer holds SQLite's write lock: its stamp (background)
    waits for the write connection; the call itself, a write, must still be answered by the
    server with a google.rpc.Status at its deadline (committed: false), not a bare
    DEADLINE_EXCEEDED."""
    key = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_ADMIN)))
    fresh = connect(client.backend, client.database_url, client.server, secret=key.secret)
    if client.backend == "sqlite":
        conn = sqlite3.connect(make_url(client.database_url).database, isolation_level=None, timeout=5)
        conn.execute("BEGIN IMMEDIATE")
    else:
        conn = _raw_postgres(client)
        conn.cursor().execute("LOCK TABLE api_keys, knowledge_chunks IN EXCLUSIVE MODE")
    source = unique("stamped")
    try:
        started = time.monotonic()
        err = expect_error(Code.DEADLINE_EXCEEDED, fresh.knowledge.CreateKnowledgeChunk,
                           kpb.CreateKnowledgeChunkRequest(knowledge_chunk=_chunk(source, "a")), timeout=1.5)
        assert time.monotonic() - started < 1.5
        assert err.info.metadata.get("committed") == "false", err.message
    finally:
        conn.rollback()
        conn.close()
        time.sleep(1)  # the background stamps give up after UsageStamps.STAMP_SECONDS
        fresh.channel.close()
        assert _count(client, source) == 0, "a call answered DEADLINE_EXCEEDED wrote its chunk"


def test_first_calls_of_many_keys_are_answered_while_a_long_write_holds_their_rows(client: Client) -> None:
    """Twenty keys' first calls (reads) while another writer holds the lock their usage stamps
    need (SQLite: the write lock; PostgreSQL: the key rows, as a long transaction over api_keys
    does): every call is answered OK at once; the stamps wait in the background, and must not
    take the connections the calls need."""
    keys = [client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_ADMIN))) for _ in range(20)]
    clients = [connect(client.backend, client.database_url, client.server, secret=k.secret) for k in keys]
    if client.backend == "sqlite":
        conn = sqlite3.connect(make_url(client.database_url).database, isolation_level=None, timeout=5)
        conn.execute("BEGIN IMMEDIATE")
    else:
        conn = _raw_postgres(client)
        conn.cursor().execute("SELECT id FROM api_keys FOR UPDATE")
    codes: Counter[tuple[Code, str]] = Counter()
    try:
        for c in clients:
            codes[_code(lambda: c.knowledge.ListDocuments(kpb.ListDocumentsRequest(), timeout=2))] += 1  # noqa: B023 - called within this iteration
    finally:
        conn.rollback()
        conn.close()
        time.sleep(1)  # the background stamps give up after UsageStamps.STAMP_SECONDS
        for c in clients:
            c.channel.close()
    assert codes == {(Code.OK, ""): 20}, dict(codes)


def test_negated_presence_of_json_columns_matches_rows_without_one(client: Client) -> None:
    """NOT / - of `chunk_metadata:*` and of `chunk_metadata = null` are the complements, a row
    holding JSON null (as rows written before every path wrote SQL NULL do) counted as without metadata."""
    k = client.knowledge
    source = unique("neg")
    k.CreateKnowledgeChunk(kpb.CreateKnowledgeChunkRequest(knowledge_chunk=_chunk(source, "none")))
    k.CreateKnowledgeChunk(kpb.CreateKnowledgeChunkRequest(knowledge_chunk=_chunk(source, "some", chunk_metadata=_struct(lang="en"))))
    add_json_null_chunk(client, source)

    def matching(condition: str) -> list[str]:
        return chunks_matching(client, source, condition)

    got = {cond: matching(cond) for cond in (
        "NOT chunk_metadata:*", "-chunk_metadata:*", "NOT chunk_metadata = null", "NOT chunk_metadata != null",
        "chunk_metadata.lang:*", "NOT chunk_metadata.lang:*", "chunk_metadata.lang = null", "(chunk_metadata:* OR content = \"text\")")}
    assert got == {
        "NOT chunk_metadata:*": ["json-null", "none"], "-chunk_metadata:*": ["json-null", "none"],
        "NOT chunk_metadata = null": ["some"], "NOT chunk_metadata != null": ["json-null", "none"],
        "chunk_metadata.lang:*": ["some"], "NOT chunk_metadata.lang:*": ["json-null", "none"],
        "chunk_metadata.lang = null": ["json-null", "none"], "(chunk_metadata:* OR content = \"text\")": ["json-null", "none", "some"],
    }, got


def test_a_userless_user_key_refused_a_create_is_told_why_not_a_phantom_id(client: Client, actor: Callable[..., Actor]) -> None:
    """A USER key acting for no user, refused a CreateChannel / CreateChatMessage (owner
    optional) or CreateKnowledgeChunk that a user's USER key may make, is refused as what it is
    (NO_USER_TO_OWN or a denial naming the rule), not 'may not change Channel <an id that was
    never made>'."""
    person = actor()
    key = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_USER)))
    userless = connect(client.backend, client.database_url, client.server, secret=key.secret)
    channel = client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=unique("ch"))))
    calls = {
        "channel": lambda c: c.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=unique("ch")))),
        "message": lambda c: c.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel.id, content="x"))),
        "chunk": lambda c: c.knowledge.CreateKnowledgeChunk(kpb.CreateKnowledgeChunkRequest(knowledge_chunk=_chunk(unique("s"), "a"))),
    }
    try:
        problems = {}
        for name, call in calls.items():
            if _code(lambda: call(person.c))[0] != Code.OK:  # noqa: B023 - called within this iteration
                continue  # a user may not either: nothing to compare
            code, said = _code(lambda: call(userless))  # noqa: B023 - called within this iteration
            if code == Code.OK:
                continue
            err = expect_error(Code.PERMISSION_DENIED, call, userless)
            if "may not change" in err.message:
                problems[name] = (err.info.reason, err.message)
        assert not problems, problems
    finally:
        userless.channel.close()


def test_an_upsert_waiting_on_an_uncommitted_create_of_its_key_past_its_deadline_is_deadline_exceeded(client: Client) -> None:
    """An upsert kept waiting on the key's unique index (another transaction inserted that key and
    has not committed) past its deadline: DEADLINE_EXCEEDED with a google.rpc.Status, nothing
    written when the other rolls back."""
    source = unique("held")
    client.knowledge.ListDocuments(kpb.ListDocumentsRequest())  # the admin key's usage stamp, if due, written now
    time.sleep(0.5)
    url = make_url(client.database_url)
    if client.backend == "postgresql":
        conn = _raw_postgres(client)
        conn.cursor().execute(
            "INSERT INTO knowledge_chunks (id, source, external_id, content, create_time, update_time, revision) "
            "VALUES (gen_random_uuid(), %s, 'a', 'theirs', now(), now(), 1)", (source,))
    else:
        conn = sqlite3.connect(url.database, isolation_level=None, timeout=5)
        conn.execute("BEGIN IMMEDIATE")
    try:
        for call in (lambda: client.knowledge.UpsertKnowledgeChunk(kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=_chunk(source, "a")), timeout=1.5),
                     lambda: client.knowledge.BatchUpsertKnowledgeChunks(_batch([(source, "b"), (source, "a")]), timeout=1.5)):
            err = expect_error(Code.DEADLINE_EXCEEDED, call)
            assert err.info.metadata.get("committed") == "false", err.message
    finally:
        conn.rollback()
        conn.close()
    time.sleep(1)
    assert _count(client, source) == 0


def test_share_racing_a_gift_of_the_document_leaves_the_owner_no_share(client: Client, actor: Callable[..., Actor]) -> None:
    """ShareDocument(heir) racing UpdateDocument(owner_id=heir): whichever wins, the heir ends as
    owner without a share of its own document, and no call is INTERNAL."""
    k = client.knowledge
    owner, heir = actor(), actor()
    codes: Counter[Code] = Counter()
    docs = []
    for _ in range(15):
        made = k.CreateDocument(kpb.CreateDocumentRequest(document=kpb.Document(title="d", owner_id=owner.id)))
        docs.append(made.id)
        share = lambda: k.ShareDocument(kpb.ShareDocumentRequest(document_id=made.id, user_id=heir.id, level=kpb.DOCUMENT_SHARE_LEVEL_EDIT))  # noqa: E731, B023 - run and waited for within this iteration (the pool is closed in it)
        give = lambda: k.UpdateDocument(kpb.UpdateDocumentRequest(document=kpb.Document(id=made.id, owner_id=heir.id), update_mask=mask("owner_id")))  # noqa: E731, B023 - run and waited for within this iteration (the pool is closed in it)
        with ThreadPoolExecutor(2) as pool:
            for code, _ in pool.map(_code, [share, give]):
                codes[code] += 1
    assert not (set(codes) & BAD), dict(codes)
    for doc_id in docs:
        got = k.GetDocument(kpb.GetDocumentRequest(id=doc_id))
        shares = k.ListDocumentShares(kpb.ListDocumentSharesRequest(document_id=doc_id)).document_shares
        assert not [s for s in shares if s.user_id == got.owner_id], (doc_id, dict(codes))
