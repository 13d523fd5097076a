"""KnowledgeService under attack and under load: concurrent ingesters and writers, an operator's
commands, callers that should not get what they ask. Each test states the behaviour the service
promises (README, the protos, db/engine/upserts.py) and runs on SQLite and PostgreSQL."""
from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc
from google.protobuf import struct_pb2
from nexus.knowledge.v1 import knowledge_pb2 as kpb
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.conftest import Client, unique
from tests.support import expect_error
from tests.test_access import Actor, actor  # noqa: F401 - the fixture
from tests.test_migrations import empty_url  # noqa: F401 - the fixture

Code = grpc.StatusCode


def _batch(source: str, keys: list[str], content: str = "text") -> kpb.BatchUpsertKnowledgeChunksRequest:
    return kpb.BatchUpsertKnowledgeChunksRequest(
        requests=[kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=kpb.KnowledgeChunk(source=source, external_id=k, content=content)) for k in keys],
        read_mask={"paths": ["id"]},
    )


def _code(fn: Callable[[], object]) -> Code:
    try:
        fn()
        return Code.OK
    except grpc.RpcError as exc:
        return exc.code()


@contextmanager
def _write_lock_held(c: Client) -> Iterator[None]:
    """Another writer at work: on SQLite the database's write lock (BEGIN IMMEDIATE), as a
    large BatchUpsertKnowledgeChunks holds it; on PostgreSQL an open transaction that wrote a chunk."""
    if c.backend == "sqlite":
        conn = sqlite3.connect(make_url(c.database_url).database, isolation_level=None, timeout=5)
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            conn.rollback()
            conn.close()
    else:
        engine = create_engine(c.database_url)
        try:
            with engine.connect() as conn:
                conn.execute(text(
                    "INSERT INTO knowledge_chunks (id, source, external_id, content, create_time, update_time, revision) "
                    "VALUES (gen_random_uuid(), :s, 'x', 'x', now(), now(), 1)"
                ), {"s": unique("held")})
                yield
                conn.rollback()
        finally:
            engine.dispose()


def test_concurrent_batch_upserts_of_overlapping_keys_in_different_orders_all_succeed(client: Client) -> None:
    """Eight ingesters upserting overlapping samples of one source's keys (half of them there
    before), in different orders, are all answered OK: each upsert is idempotent and none
    conflicts with another's intent. (On PostgreSQL they take turns by source, engine/upserts
    _take_turns: without, a concurrent upsert's new rows were outside the read's snapshot, and
    about half the calls ended ABORTED after their restarts.)"""
    codes: Counter[Code] = Counter()
    for round_no in range(3):
        source = unique("ingest")
        client.knowledge.BatchUpsertKnowledgeChunks(_batch(source, [f"k{i}" for i in range(0, 300, 2)]))

        acknowledged: set[str] = {f"k{i}" for i in range(0, 300, 2)}

        def ingest(n: int, source: str = source, round_no: int = round_no, acknowledged: set[str] = acknowledged) -> None:
            keys = random.Random(n * 100 + round_no).sample([f"k{i}" for i in range(300)], 200)
            code = _code(lambda: client.knowledge.BatchUpsertKnowledgeChunks(_batch(source, keys, content=f"v{n}"), timeout=60))
            codes[code] += 1
            if code == Code.OK:
                acknowledged.update(keys)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(ingest, range(8)))
        listed = client.knowledge.ListKnowledgeChunks(kpb.ListKnowledgeChunksRequest(filter=f'source = "{source}"', page_size=1000))
        assert {c.external_id for c in listed.knowledge_chunks} == acknowledged, "every acknowledged key is there, and no other"
    assert codes == {Code.OK: 24}, dict(codes)


class _OtherWriter:
    """A connection of the test's own that inserts a chunk in an open transaction, then commits
    it and deletes it again in one round trip (PostgreSQL: "COMMIT; DELETE ..." sent together),
    as a concurrent CreateKnowledgeChunk followed at once by a DeleteKnowledgeChunksBySource."""

    def __init__(self, c: Client) -> None:
        self.backend = c.backend
        url = make_url(c.database_url)
        if c.backend == "postgresql":
            import psycopg2

            # The connection arguments SQLAlchemy takes from the URL (a socket directory in its
            # query, as the embedded server's URL has, included).
            args, kwargs = create_engine(c.database_url).dialect.create_connect_args(url)
            self.conn = psycopg2.connect(*args, **kwargs)
            self.conn.autocommit = True
        else:
            self.conn = sqlite3.connect(url.database, isolation_level=None, timeout=10)
        self.cur = self.conn.cursor()

    def insert(self, source: str, key: str) -> None:
        self.cur.execute("BEGIN IMMEDIATE" if self.backend == "sqlite" else "BEGIN")
        now = "now()" if self.backend == "postgresql" else "CURRENT_TIMESTAMP"
        new_id = "gen_random_uuid()" if self.backend == "postgresql" else "lower(hex(randomblob(16)))"
        mark = "%s" if self.backend == "postgresql" else "?"
        self.cur.execute(
            f"INSERT INTO knowledge_chunks (id, source, external_id, content, create_time, update_time, revision) "
            f"VALUES ({new_id}, {mark}, {mark}, 'theirs', {now}, {now}, 1)", (source, key))

    def commit_and_delete(self, source: str, key: str) -> None:
        if self.backend == "postgresql":
            self.cur.execute("COMMIT; DELETE FROM knowledge_chunks WHERE source = %s AND external_id = %s", (source, key))
        else:
            self.cur.execute("COMMIT")
            self.cur.execute("DELETE FROM knowledge_chunks WHERE source = ? AND external_id = ?", (source, key))

    def waiting(self) -> bool:
        """Whether a statement of the server waits for a lock (on SQLite: assumed after a pause)."""
        if self.backend == "sqlite":
            time.sleep(0.3)
            return True
        with self.conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND application_name = 'nexus-data'")
            return bool(cur.fetchone()[0])

    def close(self) -> None:
        self.conn.close()


def test_an_upsert_whose_new_key_was_taken_and_deleted_meanwhile_is_not_already_exists(client: Client) -> None:
    """An upsert never answers ALREADY_EXISTS: whatever a concurrent writer does to its key (here
    a plain insert, committed and deleted again while the upsert waits on it), the key's row is
    made or replaced. (A violation of the key's unique index starts the upsert again, whether or
    not the row that caused it is still there.)"""
    source = unique("taken")
    other = _OtherWriter(client)
    codes: Counter[Code] = Counter()
    try:
        for i in range(20):
            key = f"k{i}"
            other.insert(source, key)
            request = kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=kpb.KnowledgeChunk(source=source, external_id=key, content="mine"))
            answer = client.knowledge.UpsertKnowledgeChunk.future(request, timeout=20)
            started = time.monotonic()
            while not other.waiting() and time.monotonic() - started < 5:
                time.sleep(0.01)
            other.commit_and_delete(source, key)
            codes[_code(answer.result)] += 1
    finally:
        other.close()
    assert codes == {Code.OK: 20}, dict(codes)


def test_a_read_is_answered_while_another_call_writes(client: Client, actor: Callable[..., Actor]) -> None:
    """A read needs no write lock, nor does a key's usage stamp hold a call up: on SQLite, while
    another writer holds the write lock (a large batch upsert), a ListDocuments by a key's first
    call of the minute is answered at once (its last_used_time is written in the background)."""
    reader = actor()
    with _write_lock_held(client):
        started = time.monotonic()
        answer = reader.c.knowledge.ListDocuments(kpb.ListDocumentsRequest(), timeout=3)
        assert time.monotonic() - started < 1.0
    assert answer.total_size == 0


def test_delete_by_source_refuses_a_source_no_chunk_can_have_naming_it(client: Client) -> None:
    """A source no chunk can have (a NUL character, longer than the column's 255) is
    INVALID_ARGUMENT naming `source`, on both databases alike, not OK with nothing deleted."""
    for source in ("a\x00b", "s" * 256):
        for validate_only in (True, False):
            request = kpb.DeleteKnowledgeChunksBySourceRequest(source=source, validate_only=validate_only)
            err = expect_error(Code.INVALID_ARGUMENT, client.knowledge.DeleteKnowledgeChunksBySource, request)
            assert [v.field for v in err.violations] == ["source"], err.message


def test_migrate_moves_to_a_revision_either_way_and_refuses_an_unknown_one_in_a_line(empty_url: str, tmp_path: Path) -> None:  # noqa: F811
    """`nexus-data migrate 0008` on an empty database upgrades to 0008 (it is past the
    database's revision), `migrate 0007` then downgrades, `migrate head` goes up again; a name
    that is no revision is one line on stderr and exit code 2, never a traceback."""

    def migrate(revision: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "service.cli", "migrate", "--database-url", empty_url, revision]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[1])})

    from db.migrate import head_revision

    for revision, said in (("0008", "schema at 0008"), ("0007", "schema at 0007"), ("head", f"schema at {head_revision()}")):
        done = migrate(revision)
        assert (done.returncode, done.stdout.strip().splitlines()[-1]) == (0, said), done.stderr[-600:]
    refused = migrate("0099")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-600:]
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()] and "'0099' is not a revision" in refused.stderr


def test_a_document_given_to_its_sharer_keeps_no_share_of_its_owner(client: Client, actor: Callable[..., Actor]) -> None:
    """"An owner needs no share" (ShareDocument refuses one: SHARE_WITH_OWNER): an admin giving a
    document to its edit-sharer ends that share in the same change, audited, so the owner is not
    listed as a sharer of their own document with a share nobody could change."""
    owner, heir = actor(), actor()
    made = client.knowledge.CreateDocument(kpb.CreateDocumentRequest(document=kpb.Document(title="Estate", owner_id=owner.id)))
    share = client.knowledge.ShareDocument(kpb.ShareDocumentRequest(document_id=made.id, user_id=heir.id, level=kpb.DOCUMENT_SHARE_LEVEL_EDIT))
    client.knowledge.UpdateDocument(kpb.UpdateDocumentRequest(document=kpb.Document(id=made.id, owner_id=heir.id), update_mask={"paths": ["owner_id"]}))
    shares = client.knowledge.ListDocumentShares(kpb.ListDocumentSharesRequest(document_id=made.id)).document_shares
    assert heir.id not in [s.user_id for s in shares], "the new owner is listed as a sharer of their own document"
    from nexus.security.v1 import security_pb2 as spb

    trail = client.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(filter=f'resource_id = "{share.id}"')).audit_log_entries
    assert [e.action for e in trail] == [spb.AUDIT_ACTION_CREATE, spb.AUDIT_ACTION_DELETE], "the share's end is audited"


def test_a_key_without_a_user_is_not_asked_for_a_field_it_may_not_send(client: Client) -> None:
    """A USER key without a user (CreateApiKey without user_id) cannot own a document, and may not
    name an owner (only admins may): it is refused once, as what it is (PERMISSION_DENIED: the key
    acts for no user), not asked for a field it may not send (INVALID_ARGUMENT `owner_id is
    required`, then PERMISSION_DENIED when it sends one)."""
    from nexus.identity.v1 import identity_pb2 as ipb

    from tests.conftest import connect

    key = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_USER)))
    userless = connect(client.backend, client.database_url, client.server, secret=key.secret)
    try:
        err = expect_error(Code.PERMISSION_DENIED, userless.knowledge.CreateDocument, kpb.CreateDocumentRequest(document=kpb.Document(title="Orphan")))
    finally:
        userless.channel.close()
    assert (err.info.reason, err.info.metadata["field"]) == ("NO_USER_TO_OWN", "document.owner_id"), err.message


def test_readme_shows_the_knowledge_service_with_grpcurl() -> None:
    """A newcomer finds the knowledge service in the README's grpcurl calls: chunks upserted in a
    batch, documents shared."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    calls = [line for line in readme.splitlines() if "nexus.knowledge.v1.KnowledgeService/" in line]
    assert any("BatchUpsertKnowledgeChunks" in line for line in calls), calls
    assert any("ShareDocument" in line for line in calls), calls


def test_a_chunk_without_metadata_is_stored_and_filtered_alike_whichever_method_wrote_it(client: Client) -> None:
    """A chunk sent without chunk_metadata has none: `chunk_metadata:*` (AIP-160 presence) does
    not match it, whether CreateKnowledgeChunk, BatchCreateKnowledgeChunks, UpsertKnowledgeChunk
    or BatchUpsertKnowledgeChunks wrote it, or an upsert replaced metadata with none, nor a row
    that holds JSON null (as the standard creates once wrote on PostgreSQL, where the upserts
    wrote SQL NULL); it matters most to DeleteKnowledgeChunksBySource, whose filter decides
    what goes."""
    k = client.knowledge
    source = unique("meta")

    def chunk(key: str, **fields: object) -> kpb.KnowledgeChunk:
        return kpb.KnowledgeChunk(source=source, external_id=key, content="text", **fields)  # type: ignore[arg-type]

    k.CreateKnowledgeChunk(kpb.CreateKnowledgeChunkRequest(knowledge_chunk=chunk("created")))
    k.BatchCreateKnowledgeChunks(kpb.BatchCreateKnowledgeChunksRequest(requests=[kpb.CreateKnowledgeChunkRequest(knowledge_chunk=chunk("batch-created"))]))
    k.UpsertKnowledgeChunk(kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=chunk("upserted")))
    k.BatchUpsertKnowledgeChunks(kpb.BatchUpsertKnowledgeChunksRequest(requests=[kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=chunk("batch-upserted"))]))
    metadata = struct_pb2.Struct()
    metadata.update({"lang": "en"})
    k.UpsertKnowledgeChunk(kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=chunk("replaced", chunk_metadata=metadata)))
    k.UpsertKnowledgeChunk(kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=chunk("replaced")))
    k.UpsertKnowledgeChunk(kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=chunk("with-metadata", chunk_metadata=metadata)))

    add_json_null_chunk(client, source)

    def matching(condition: str) -> list[str]:
        return chunks_matching(client, source, condition)

    assert matching("chunk_metadata:*") == ["with-metadata"]
    assert matching("chunk_metadata != null") == ["with-metadata"]
    assert len(matching("chunk_metadata = null")) == 6
    deleting = k.DeleteKnowledgeChunksBySource(kpb.DeleteKnowledgeChunksBySourceRequest(source=source, filter="chunk_metadata:*", validate_only=True))
    assert deleting.deleted_count == 1


def add_json_null_chunk(c: Client, source: str) -> None:
    """A chunk 'json-null' of source whose chunk_metadata holds JSON null, as rows written before
    every path wrote SQL NULL do."""
    engine = create_engine(c.database_url)
    try:
        with engine.begin() as conn:
            new_id = "gen_random_uuid()" if c.backend == "postgresql" else "lower(hex(randomblob(16)))"
            conn.execute(text(
                f"INSERT INTO knowledge_chunks (id, source, external_id, content, chunk_metadata, create_time, update_time, revision) "
                f"VALUES ({new_id}, :s, 'json-null', 'text', 'null', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, 1)"
            ), {"s": source})
    finally:
        engine.dispose()


def chunks_matching(c: Client, source: str, condition: str) -> list[str]:
    """The external ids of source's chunks that the filter condition picks, sorted."""
    listed = c.knowledge.ListKnowledgeChunks(kpb.ListKnowledgeChunksRequest(filter=f'source = "{source}" AND {condition}'))
    return sorted(chunk.external_id for chunk in listed.knowledge_chunks)
