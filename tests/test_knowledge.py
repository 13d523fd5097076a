"""KnowledgeService: chunks upserted by (source, external_id), searched best first.

The standard methods of KnowledgeChunk are covered by the registry-driven suites
(tests/test_standard_methods.py, test_access_matrix.py, test_write_paths.py, ...) through its sample."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf import field_mask_pb2, struct_pb2
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.knowledge.v1 import knowledge_pb2 as kpb
from nexus.security.v1 import security_pb2 as spb

from tests.conftest import Client, unique
from tests.support import expect_error
from tests.test_access import Actor, actor  # noqa: F401 - the fixture

Code = grpc.StatusCode


def _chunk(source: str, external_id: str, **fields: Any) -> kpb.KnowledgeChunk:
    return kpb.KnowledgeChunk(source=source, external_id=external_id, **{"content": "some text", **fields})


def _upsert(c: Client, chunk: kpb.KnowledgeChunk) -> kpb.UpsertKnowledgeChunkResponse:
    return c.knowledge.UpsertKnowledgeChunk(kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=chunk))


def _entries(c: Client, resource_id: str) -> list[spb.AuditLogEntry]:
    page = c.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(filter=f'resource_id = "{resource_id}"', page_size=100))
    return list(page.audit_log_entries)


def test_upsert_creates_then_replaces_keeping_id_and_create_time(client: Client) -> None:
    source, key = unique("src"), "intro.md#0"
    first = _upsert(client, _chunk(source, key, title="Intro", chunk_metadata=struct_pb2.Struct(fields={"lang": struct_pb2.Value(string_value="en")})))
    assert first.created
    made = first.knowledge_chunk
    second = _upsert(client, _chunk(source, key, content="new text"))
    assert not second.created
    replaced = second.knowledge_chunk
    assert (replaced.id, replaced.create_time) == (made.id, made.create_time)
    assert replaced.etag != made.etag and replaced.content == "new text"
    # A replace sets every writable field: what the request leaves out is cleared.
    assert replaced.title == "" and not replaced.HasField("chunk_metadata")
    assert client.knowledge.GetKnowledgeChunk(kpb.GetKnowledgeChunkRequest(id=made.id)) == replaced
    again = _upsert(client, _chunk(source, key, content="new text"))
    assert not again.created and again.knowledge_chunk == replaced, "the same chunk again changes nothing, not even the etag"
    actions = [e.action for e in _entries(client, made.id)]
    assert actions == [spb.AUDIT_ACTION_CREATE, spb.AUDIT_ACTION_UPDATE]
    listed = client.knowledge.ListKnowledgeChunks(kpb.ListKnowledgeChunksRequest(filter=f'source = "{source}"'))
    assert [c.id for c in listed.knowledge_chunks] == [made.id]


def test_the_key_is_per_source(client: Client) -> None:
    key = "shared.md#1"
    a = _upsert(client, _chunk(unique("a"), key)).knowledge_chunk
    b = _upsert(client, _chunk(unique("b"), key)).knowledge_chunk
    assert a.id != b.id


def test_an_upsert_without_its_key_is_refused_and_writes_nothing(client: Client) -> None:
    source = unique("src")
    err = expect_error(Code.INVALID_ARGUMENT, _upsert, client, kpb.KnowledgeChunk(content="no key"))
    assert {v.field for v in err.violations} == {"knowledge_chunk.source", "knowledge_chunk.external_id"}
    err = expect_error(Code.INVALID_ARGUMENT, _upsert, client, _chunk(source, "x#1", content=""))
    assert [v.field for v in err.violations] == ["knowledge_chunk.content"]
    listed = client.knowledge.ListKnowledgeChunks(kpb.ListKnowledgeChunksRequest(filter=f'source = "{source}"'))
    assert listed.total_size == 0


def test_concurrent_upserts_of_one_new_key_make_one_chunk(client: Client) -> None:
    source, key = unique("src"), "race.md#0"
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: _upsert(client, _chunk(source, key, content=f"version {i}")), range(8)))
    assert sum(a.created for a in answers) == 1
    assert len({a.knowledge_chunk.id for a in answers}) == 1
    listed = client.knowledge.ListKnowledgeChunks(kpb.ListKnowledgeChunksRequest(filter=f'source = "{source}"'))
    assert listed.total_size == 1


def test_search_ranks_a_title_match_above_a_body_mention_and_filters_by_metadata(client: Client) -> None:
    source, word = unique("src"), unique("zephyr")
    en = struct_pb2.Struct(fields={"lang": struct_pb2.Value(string_value="en")})
    de = struct_pb2.Struct(fields={"lang": struct_pb2.Value(string_value="de")})
    mention = _upsert(client, _chunk(source, "b#1", title="Other things", content=f"in passing, {word} is mentioned", chunk_metadata=en))
    titled = _upsert(client, _chunk(source, "a#1", title=f"{word}", content="all about it", chunk_metadata=en))
    german = _upsert(client, _chunk(source, "c#1", title=f"{word}", content="alles darüber", chunk_metadata=de))
    found = client.knowledge.SearchKnowledgeChunks(kpb.SearchKnowledgeChunksRequest(query=word, filter=f'source = "{source}"'))
    ids = [r.knowledge_chunk.id for r in found.results]
    assert set(ids) == {mention.knowledge_chunk.id, titled.knowledge_chunk.id, german.knowledge_chunk.id}
    assert ids.index(titled.knowledge_chunk.id) < ids.index(mention.knowledge_chunk.id)
    scores = [r.score for r in found.results]
    assert scores == sorted(scores, reverse=True)
    english = client.knowledge.SearchKnowledgeChunks(
        kpb.SearchKnowledgeChunksRequest(query=word, filter=f'source = "{source}" AND chunk_metadata.lang = "en"')
    )
    assert [r.knowledge_chunk.id for r in english.results] == [titled.knowledge_chunk.id, mention.knowledge_chunk.id]


def test_only_admins_write_chunks_and_every_role_reads_them(client: Client, actor: Callable[..., Actor]) -> None:
    made = _upsert(client, _chunk(unique("src"), "k#1")).knowledge_chunk
    for role in (ipb.USER_ROLE_GUEST, ipb.USER_ROLE_USER, ipb.USER_ROLE_MANAGER):
        someone = actor(role)
        assert someone.c.knowledge.GetKnowledgeChunk(kpb.GetKnowledgeChunkRequest(id=made.id)) == made
        code = Code.PERMISSION_DENIED
        expect_error(code, _upsert, someone.c, _chunk(made.source, made.external_id, content="theirs"))
        expect_error(code, _upsert, someone.c, _chunk(made.source, unique("new")))
    assert client.knowledge.GetKnowledgeChunk(kpb.GetKnowledgeChunkRequest(id=made.id)) == made


def test_an_upsert_that_loses_the_race_for_a_new_key_replaces_the_winners_chunk(client: Client, monkeypatch: Any) -> None:
    """The interleaving a concurrent upsert makes: the key was free when looked up, taken when
    inserted. The insert fails in its savepoint, and the upsert replaces the winner's chunk."""
    from db.database import Database
    from db.domains import knowledge
    from db.engine import upserts
    from db.engine.call import CURRENT_CALL, Call

    source, key = unique("src"), "raced.md#0"
    winner = _upsert(client, _chunk(source, key, content="the winner's")).knowledge_chunk
    looked_up = upserts._rows_of_keys
    lookups: list[list[Any]] = []

    def racing(session: Any, spec: Any, keys: list[Any], lock: bool) -> Any:
        lookups.append([k[1] for k in keys])
        return {} if len(lookups) == 1 else looked_up(session, spec, keys, lock)  # the first: before the winner committed

    monkeypatch.setattr(upserts, "_rows_of_keys", racing)
    database = Database(client.database_url)
    call = Call(dialect=database.dialect, role="admin", method="/test/UpsertKnowledgeChunk")
    token = CURRENT_CALL.set(call)
    try:
        request = kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=_chunk(source, key, content="the loser's"))
        answer = database.run_sync(lambda s: knowledge.upsert_knowledge_chunk(s, request, call))
    finally:
        CURRENT_CALL.reset(token)
        database.dispose()
    assert lookups == [[key], [key]], "looked up, lost the insert on the key, looked up again"
    assert not answer.created and answer.knowledge_chunk.id == winner.id and answer.knowledge_chunk.content == "the loser's"
    listed = client.knowledge.ListKnowledgeChunks(kpb.ListKnowledgeChunksRequest(filter=f'source = "{source}"'))
    assert listed.total_size == 1


# ---------------------------------------------------------------- BatchUpsertKnowledgeChunks


def _batch(c: Client, chunks: list[kpb.KnowledgeChunk], **fields: Any) -> kpb.BatchUpsertKnowledgeChunksResponse:
    requests = [kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=chunk) for chunk in chunks]
    return c.knowledge.BatchUpsertKnowledgeChunks(kpb.BatchUpsertKnowledgeChunksRequest(requests=requests, **fields))


def _count(c: Client, source: str) -> int:
    return c.knowledge.ListKnowledgeChunks(kpb.ListKnowledgeChunksRequest(filter=f'source = "{source}"', page_size=1)).total_size


def test_a_batch_upsert_makes_replaces_and_leaves_alike_in_request_order(client: Client) -> None:
    source = unique("src")
    kept = _upsert(client, _chunk(source, "kept#0", title="Kept")).knowledge_chunk
    old = _upsert(client, _chunk(source, "old#0", title="Old", content="before")).knowledge_chunk
    answer = _batch(client, [
        _chunk(source, "new#1", title="New one"),
        _chunk(source, "old#0", title="Old", content="after"),
        _chunk(source, "kept#0", title="Kept"),
        _chunk(source, "new#2"),
    ])
    results = answer.results
    assert [r.created for r in results] == [True, False, False, True]
    assert (answer.created_count, answer.replaced_count, answer.unchanged_count) == (2, 1, 1)
    assert [r.knowledge_chunk.external_id for r in results] == ["new#1", "old#0", "kept#0", "new#2"]
    replaced, unchanged = results[1].knowledge_chunk, results[2].knowledge_chunk
    assert (replaced.id, replaced.create_time, replaced.content) == (old.id, old.create_time, "after") and replaced.etag != old.etag
    assert unchanged == kept, "a chunk sent as it is stays as it is, etag and all"
    for r in results:
        assert client.knowledge.GetKnowledgeChunk(kpb.GetKnowledgeChunkRequest(id=r.knowledge_chunk.id)) == r.knowledge_chunk
    assert _count(client, source) == 4
    (update,) = [e for e in _entries(client, old.id) if e.action == spb.AUDIT_ACTION_UPDATE]
    assert [(ch.field, ch.old_value.string_value, ch.new_value.string_value) for ch in update.changes] == [("content", "before", "after")]
    assert [e.action for e in _entries(client, kept.id)] == [spb.AUDIT_ACTION_CREATE], "nothing changed: no entry"
    assert [e.action for e in _entries(client, results[0].knowledge_chunk.id)] == [spb.AUDIT_ACTION_CREATE]


def test_a_batch_upsert_answers_as_single_upserts_do(client: Client) -> None:
    """The same upserts one by one and in one batch leave the same chunks and audit entries."""
    meta = struct_pb2.Struct(fields={"lang": struct_pb2.Value(string_value="en"), "line": struct_pb2.Value(number_value=3)})
    steps = [
        [_chunk("", "a#0", title="A", chunk_metadata=meta), _chunk("", "b#0", content="b")],
        [_chunk("", "a#0", title="A2", content="changed"), _chunk("", "b#0", content="b"), _chunk("", "c#0")],
    ]
    one_by_one, batched = unique("single"), unique("batch")
    for step in steps:
        for chunk in step:
            _upsert(client, _chunk(one_by_one, chunk.external_id, **{f.name: v for f, v in chunk.ListFields() if f.name not in ("source", "external_id")}))
        _batch(client, [_chunk(batched, c.external_id, **{f.name: v for f, v in c.ListFields() if f.name not in ("source", "external_id")}) for c in step])

    def state(source: str) -> list[Any]:
        chunks = client.knowledge.ListKnowledgeChunks(kpb.ListKnowledgeChunksRequest(filter=f'source = "{source}"', order_by="external_id")).knowledge_chunks
        out = []
        for chunk in chunks:
            entries = [(e.action, [(ch.field, ch.old_value, ch.new_value) for ch in e.changes if ch.field not in ("source", "id")]) for e in _entries(client, chunk.id)]
            out.append((chunk.external_id, chunk.title, chunk.content, chunk.chunk_metadata, chunk.etag, entries))
        return out

    assert state(one_by_one) == state(batched)
    assert len(state(batched)) == 3


def test_five_thousand_chunks_go_in_together_or_not_at_all(client: Client) -> None:
    source = unique("src")
    chunks = [_chunk(source, f"doc-{i // 10}.md#{i % 10}", title=f"Part {i}", content=f"text of part {i}") for i in range(5000)]
    chunks[4321] = _chunk(source, "bad.md#0", content="")
    err = expect_error(Code.INVALID_ARGUMENT, _batch, client, chunks)
    assert [v.field for v in err.violations] == ["requests[4321].knowledge_chunk.content"]
    assert _count(client, source) == 0, "one bad chunk: none written"
    chunks[4321] = _chunk(source, "fixed.md#0")
    answer = _batch(client, chunks, read_mask=field_mask_pb2.FieldMask(paths=["id", "etag"]))
    assert answer.created_count == 5000 and len(answer.results) == 5000
    first = answer.results[0].knowledge_chunk
    assert first.id and first.etag and not first.content, "only the fields of the read_mask come back"
    assert _count(client, source) == 5000
    again = _batch(client, chunks, read_mask=field_mask_pb2.FieldMask(paths=["id"]))
    assert (again.created_count, again.replaced_count, again.unchanged_count) == (0, 0, 5000)
    assert [r.knowledge_chunk.id for r in again.results] == [r.knowledge_chunk.id for r in answer.results]


def test_a_key_twice_in_one_batch_is_refused_naming_both(client: Client) -> None:
    source = unique("src")
    chunks = [_chunk(source, f"k#{i}") for i in range(5)]
    chunks[3] = _chunk(source, "k#1", content="again")
    err = expect_error(Code.INVALID_ARGUMENT, _batch, client, chunks)
    assert [(v.field, v.reason) for v in err.violations] == [
        ("requests[1].knowledge_chunk.external_id", "DUPLICATE_KEY"), ("requests[3].knowledge_chunk.external_id", "DUPLICATE_KEY"),
    ]
    assert "requests[1]" in err.violations[0].description and "requests[3]" in err.violations[0].description
    assert _count(client, source) == 0


def test_batch_upsert_limits(client: Client) -> None:
    from db.engine.upserts import MAX_UPSERT_BATCH

    source = unique("src")
    err = expect_error(Code.INVALID_ARGUMENT, _batch, client, [])
    assert err.violations[0].field == "requests"
    err = expect_error(Code.INVALID_ARGUMENT, _batch, client, [_chunk(source, f"k#{i}", content="x") for i in range(MAX_UPSERT_BATCH + 1)])
    assert err.info.reason == "BATCH_TOO_LARGE"
    err = expect_error(Code.INVALID_ARGUMENT, _batch, client, [_chunk(source, "k#0")], read_mask=field_mask_pb2.FieldMask(paths=["nope"]))
    assert err.violations[0].field == "read_mask"
    # An answer larger than the response limit (4 MiB) is refused before anything commits.
    big = [_chunk(source, f"big#{i}", content="y" * 1000) for i in range(5000)]
    err = expect_error(Code.RESOURCE_EXHAUSTED, _batch, client, big)
    assert err.info.reason == "RESPONSE_TOO_LARGE"
    assert _count(client, source) == 0
    assert _batch(client, big, read_mask=field_mask_pb2.FieldMask(paths=["id"])).created_count == 5000


def test_only_admins_batch_upsert_and_a_refusal_writes_nothing(client: Client, actor: Callable[..., Actor]) -> None:
    source = unique("src")
    there = _upsert(client, _chunk(source, "there#0")).knowledge_chunk
    someone = actor(ipb.USER_ROLE_MANAGER)
    expect_error(Code.PERMISSION_DENIED, _batch, someone.c, [_chunk(source, "new#0")])
    expect_error(Code.PERMISSION_DENIED, _batch, someone.c, [_chunk(source, "new#0"), _chunk(source, "there#0", content="theirs")])
    assert _count(client, source) == 1
    assert client.knowledge.GetKnowledgeChunk(kpb.GetKnowledgeChunkRequest(id=there.id)) == there


def test_concurrent_batches_of_overlapping_new_keys_make_one_chunk_per_key(client: Client) -> None:
    source = unique("src")
    keys = [f"k#{i}" for i in range(60)]

    def upsert_in_order(n: int) -> kpb.BatchUpsertKnowledgeChunksResponse:
        order = keys[n % 3::] + keys[:n % 3] if n % 2 else list(reversed(keys))
        return _batch(client, [_chunk(source, key, content=f"from batch {n}") for key in order])

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(upsert_in_order, range(6)))
    assert sum(a.created_count for a in answers) == len(keys)
    assert _count(client, source) == len(keys)
    ids = {r.knowledge_chunk.external_id: r.knowledge_chunk.id for r in answers[0].results}
    for answer in answers[1:]:
        assert {r.knowledge_chunk.external_id: r.knowledge_chunk.id for r in answer.results} == ids


# ---------------------------------------------------------------- DeleteKnowledgeChunksBySource


def _delete_source(c: Client, source: str, **fields: Any) -> int:
    request = kpb.DeleteKnowledgeChunksBySourceRequest(source=source, **fields)
    return c.knowledge.DeleteKnowledgeChunksBySource(request).deleted_count


def test_delete_by_source_removes_that_source_only_and_audits_each_chunk(client: Client) -> None:
    source, other = unique("src"), unique("other")
    made = _batch(client, [_chunk(source, f"k#{i}", title=f"T{i}") for i in range(7)]).results
    _batch(client, [_chunk(other, f"k#{i}") for i in range(3)])
    assert _delete_source(client, source, validate_only=True) == 7
    assert _count(client, source) == 7, "validate_only deletes nothing"
    assert _delete_source(client, source) == 7
    assert (_count(client, source), _count(client, other)) == (0, 3)
    for r in made:
        chunk = r.knowledge_chunk
        expect_error(Code.NOT_FOUND, client.knowledge.GetKnowledgeChunk, kpb.GetKnowledgeChunkRequest(id=chunk.id))
        (gone,) = [e for e in _entries(client, chunk.id) if e.action == spb.AUDIT_ACTION_DELETE]
        last = {ch.field: ch.old_value for ch in gone.changes}
        assert (last["title"].string_value, last["external_id"].string_value) == (chunk.title, chunk.external_id)
    assert _delete_source(client, source) == 0


def test_delete_by_source_with_a_filter_removes_what_a_reingestion_left(client: Client) -> None:
    source = unique("src")
    en = struct_pb2.Struct(fields={"lang": struct_pb2.Value(string_value="en")})
    _batch(client, [_chunk(source, f"k#{i}", chunk_metadata=en) for i in range(6)])
    started = client.knowledge.GetKnowledgeChunk(kpb.GetKnowledgeChunkRequest(
        id=_upsert(client, _chunk(source, "marker#0", content="marks the start")).knowledge_chunk.id)).update_time
    _batch(client, [_chunk(source, f"k#{i}", content="re-ingested", chunk_metadata=en) for i in range(4)])
    stale = f'update_time < "{started.ToJsonString()}"'
    assert _delete_source(client, source, filter=stale) == 2
    left = client.knowledge.ListKnowledgeChunks(kpb.ListKnowledgeChunksRequest(filter=f'source = "{source}"', order_by="external_id"))
    assert [c.external_id for c in left.knowledge_chunks] == ["k#0", "k#1", "k#2", "k#3", "marker#0"]
    assert _delete_source(client, source, filter='chunk_metadata.lang = "en"') == 4
    assert _count(client, source) == 1


def test_delete_by_source_refuses_bad_requests_and_non_admins_changing_nothing(client: Client, actor: Callable[..., Actor]) -> None:
    source = unique("src")
    _batch(client, [_chunk(source, f"k#{i}") for i in range(3)])
    err = expect_error(Code.INVALID_ARGUMENT, _delete_source, client, "")
    assert err.violations[0].field == "source"
    err = expect_error(Code.INVALID_ARGUMENT, _delete_source, client, source, filter="nope = 1")
    assert err.info.reason
    for role in (ipb.USER_ROLE_USER, ipb.USER_ROLE_MANAGER):
        err = expect_error(Code.PERMISSION_DENIED, _delete_source, actor(role).c, source)
    expect_error(Code.PERMISSION_DENIED, _delete_source, actor(ipb.USER_ROLE_GUEST).c, source)
    assert _count(client, source) == 3
