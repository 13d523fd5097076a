"""KnowledgeService: chunks upserted by (source, external_id), searched best first.

The standard methods of KnowledgeChunk are covered by the registry-driven suites
(tests/test_standard_methods.py, test_access_matrix.py, test_write_paths.py, ...) through its sample."""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from google.protobuf import struct_pb2
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
    from db.engine import writes
    from db.engine.call import CURRENT_CALL, Call

    source, key = unique("src"), "raced.md#0"
    winner = _upsert(client, _chunk(source, key, content="the winner's")).knowledge_chunk
    looked_up = writes._row_of_key
    lookups: list[str] = []

    def racing(session: Any, spec: Any, key: dict[str, Any]) -> Any:
        lookups.append(key["external_id"])
        return None if len(lookups) == 1 else looked_up(session, spec, key)  # the first: before the winner committed

    monkeypatch.setattr(writes, "_row_of_key", racing)
    database = Database(client.database_url)
    call = Call(dialect=database.dialect, role="admin", method="/test/UpsertKnowledgeChunk")
    token = CURRENT_CALL.set(call)
    try:
        request = kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=_chunk(source, key, content="the loser's"))
        answer = database.run_sync(lambda s: knowledge.upsert_knowledge_chunk(s, request, call))
    finally:
        CURRENT_CALL.reset(token)
        database.dispose()
    assert lookups == [key, key], "looked up, lost the insert, looked up again"
    assert not answer.created and answer.knowledge_chunk.id == winner.id and answer.knowledge_chunk.content == "the loser's"
    listed = client.knowledge.ListKnowledgeChunks(kpb.ListKnowledgeChunksRequest(filter=f'source = "{source}"'))
    assert listed.total_size == 1
