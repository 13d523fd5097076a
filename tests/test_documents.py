"""KnowledgeService documents: versions kept by every change of title or content, restored as a
new version; shares at view, comment and edit, honoured on every way to a document, its versions
and its shares; soft and forced deletes.

The standard methods of Document are covered by the registry-driven suites
(tests/test_standard_methods.py, test_access_matrix.py, ...) through its sample."""
from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import struct_pb2
from nexus.knowledge.v1 import knowledge_pb2 as kpb
from nexus.security.v1 import security_pb2 as spb

from db.domains.documents import DocumentVersion, _of
from db.engine.rules import EVERY_ROW, NO_ROW
from tests.conftest import Client, unique
from tests.support import expect_error, mask
from tests.test_access import Actor, actor  # noqa: F401 - the fixture

Code = grpc.StatusCode
VIEW, COMMENT, EDIT = kpb.DOCUMENT_SHARE_LEVEL_VIEW, kpb.DOCUMENT_SHARE_LEVEL_COMMENT, kpb.DOCUMENT_SHARE_LEVEL_EDIT


def _content(text: str) -> struct_pb2.Struct:
    return struct_pb2.Struct(fields={"body": struct_pb2.Value(string_value=text)})


def _create(c: Client, title: str, request_id: str = "", **fields: Any) -> kpb.Document:
    document = kpb.Document(title=title, kind=fields.pop("kind", kpb.DOCUMENT_KIND_WORD), content=fields.pop("content", _content("first")), **fields)
    return c.knowledge.CreateDocument(kpb.CreateDocumentRequest(document=document, request_id=request_id))


def _update(c: Client, document_id: str, *paths: str, **fields: Any) -> kpb.Document:
    return c.knowledge.UpdateDocument(kpb.UpdateDocumentRequest(document=kpb.Document(id=document_id, **fields), update_mask=mask(*paths)))


def _get(c: Client, document_id: str, **fields: Any) -> kpb.Document:
    return c.knowledge.GetDocument(kpb.GetDocumentRequest(id=document_id, **fields))


def _versions(c: Client, document_id: str, **fields: Any) -> kpb.ListDocumentVersionsResponse:
    return c.knowledge.ListDocumentVersions(kpb.ListDocumentVersionsRequest(document_id=document_id, **fields))


def _version(c: Client, document_id: str, number: int) -> kpb.DocumentVersion:
    return c.knowledge.GetDocumentVersion(kpb.GetDocumentVersionRequest(document_id=document_id, version=number))


def _restore(c: Client, document_id: str, number: int, etag: str = "") -> kpb.Document:
    return c.knowledge.RestoreDocumentVersion(kpb.RestoreDocumentVersionRequest(document_id=document_id, version=number, etag=etag))


def _share(c: Client, document_id: str, user_id: str, level: int) -> kpb.DocumentShare:
    return c.knowledge.ShareDocument(kpb.ShareDocumentRequest(document_id=document_id, user_id=user_id, level=level))


def _unshare(c: Client, document_id: str, user_id: str) -> Any:
    return c.knowledge.UnshareDocument(kpb.UnshareDocumentRequest(document_id=document_id, user_id=user_id))


def _shares(c: Client, document_id: str, **fields: Any) -> kpb.ListDocumentSharesResponse:
    return c.knowledge.ListDocumentShares(kpb.ListDocumentSharesRequest(document_id=document_id, **fields))


def _entries(c: Client, resource_id: str) -> list[spb.AuditLogEntry]:
    page = c.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(filter=f'resource_id = "{resource_id}"', page_size=100))
    return list(page.audit_log_entries)


def test_title_and_content_changes_keep_versions_in_order_and_other_changes_none(client: Client, actor: Callable[..., Actor]) -> None:
    owner, editor = actor(), actor()
    made = _create(owner.c, "Plan")
    assert (made.version, made.owner_id, made.last_editor_id) == (1, owner.id, owner.id)
    _share(owner.c, made.id, editor.id, EDIT)
    retitled = _update(editor.c, made.id, "title", title="Plan B")
    assert (retitled.version, retitled.last_editor_id) == (2, editor.id)
    kind_only = _update(owner.c, made.id, "kind", kind=kpb.DOCUMENT_KIND_EXCEL)
    assert kind_only.version == 2 and kind_only.last_editor_id == editor.id, "a change of kind alone makes no version"
    same = _update(owner.c, made.id, "title", "content", title="Plan B", content=_content("first"))
    assert same == kind_only, "an update that changes nothing writes nothing"
    rewritten = _update(owner.c, made.id, "content", content=_content("second"))
    assert (rewritten.version, rewritten.last_editor_id) == (3, owner.id)

    listed = _versions(owner.c, made.id)
    assert [(v.version, v.title, v.content, v.kind, v.author_id) for v in listed.document_versions] == [
        (1, "Plan", _content("first"), kpb.DOCUMENT_KIND_WORD, owner.id),
        (2, "Plan B", _content("first"), kpb.DOCUMENT_KIND_EXCEL, editor.id),
    ]
    assert listed.total_size == 2 and not listed.next_page_token
    first, second = listed.document_versions
    assert all(v.document_id == made.id for v in listed.document_versions)
    assert first.create_time == made.update_time and second.create_time == kind_only.update_time, "each state is dated when it was made"
    assert _version(owner.c, made.id, 1) == first and _version(owner.c, made.id, 2) == second
    paged = _versions(owner.c, made.id, page_size=1)
    rest = _versions(owner.c, made.id, page_size=1, page_token=paged.next_page_token)
    assert [v.version for v in (*paged.document_versions, *rest.document_versions)] == [1, 2] and not rest.next_page_token
    other = _create(owner.c, "Other")
    expect_error(Code.INVALID_ARGUMENT, _versions, owner.c, other.id, page_token=paged.next_page_token)  # a token is its document's
    assert [e.action for e in _entries(client, first.id)] == [spb.AUDIT_ACTION_CREATE], "each version is audited as it is kept"


def test_restoring_a_version_is_a_new_version_and_history_stays(client: Client, actor: Callable[..., Actor]) -> None:
    owner = actor()
    made = _create(owner.c, "Draft", content=_content("one"))
    _update(owner.c, made.id, "title", "kind", title="Final", kind=kpb.DOCUMENT_KIND_POWERPOINT)
    current = _update(owner.c, made.id, "content", content=_content("three"))
    before = list(_versions(owner.c, made.id).document_versions)
    expect_error(Code.ABORTED, _restore, owner.c, made.id, 1, etag=made.etag)
    assert _get(owner.c, made.id) == current, "a stale etag restores nothing"
    restored = _restore(owner.c, made.id, 1, etag=current.etag)
    assert (restored.title, restored.content, restored.kind, restored.version) == ("Draft", _content("one"), kpb.DOCUMENT_KIND_WORD, 4)
    after = list(_versions(owner.c, made.id).document_versions)
    assert after[:2] == before, "versions never change"
    kept = after[2]
    assert (kept.version, kept.title, kept.content, kept.kind) == (3, "Final", _content("three"), kpb.DOCUMENT_KIND_POWERPOINT)
    # Versions are read-only: the service has no method that changes or removes one.
    methods = {m.name for m in kpb.DESCRIPTOR.services_by_name["KnowledgeService"].methods}
    assert {"GetDocumentVersion", "ListDocumentVersions"} <= methods
    assert not {m for m in methods if "DocumentVersion" in m and m.startswith(("Create", "Update", "Delete", "Batch"))}


def test_share_levels_hold_on_every_way_to_a_document(client: Client, actor: Callable[..., Actor]) -> None:
    owner, viewer, commenter, editor, stranger = actor(), actor(), actor(), actor(), actor()
    word = unique("ledger")
    made = _create(owner.c, f"{word} book")
    made = _update(owner.c, made.id, "title", title=f"{word} book 2")
    for who, level in ((viewer, VIEW), (commenter, COMMENT), (editor, EDIT)):
        share = _share(owner.c, made.id, who.id, level)
        assert (share.document_id, share.user_id, share.level, share.shared_by_id) == (made.id, who.id, level, owner.id)

    def sees(who: Actor) -> bool:
        listed = who.c.knowledge.ListDocuments(kpb.ListDocumentsRequest(filter=f'title = "{word} book 2"')).documents
        found = who.c.knowledge.SearchDocuments(kpb.SearchDocumentsRequest(query=word)).results
        in_list, in_search = [d.id for d in listed] == [made.id], [r.document.id for r in found] == [made.id]
        ways = [lambda: _get(who.c, made.id), lambda: who.c.knowledge.BatchGetDocuments(kpb.BatchGetDocumentsRequest(ids=[made.id])),
                lambda: _versions(who.c, made.id), lambda: _version(who.c, made.id, 1), lambda: _shares(who.c, made.id)]
        codes = set()
        for way in ways:
            try:
                way()
                codes.add(Code.OK)
            except grpc.RpcError:
                codes.add(expect_error(Code.PERMISSION_DENIED, way).code)
        assert {in_list, in_search} == {Code.OK in codes} and len(codes) == 1, (who.id, in_list, in_search, codes)
        return in_list

    assert all(sees(who) for who in (owner, viewer, commenter, editor)) and not sees(stranger)
    assert [s.user_id for s in _shares(viewer.c, made.id).document_shares] == sorted([viewer.id, commenter.id, editor.id])

    for reader in (viewer, commenter, stranger):
        expect_error(Code.PERMISSION_DENIED, _update, reader.c, made.id, "title", title="theirs")
        expect_error(Code.PERMISSION_DENIED, _restore, reader.c, made.id, 1)
    edited = _update(editor.c, made.id, "content", "kind", content=_content("edited"), kind=kpb.DOCUMENT_KIND_EXCEL)
    assert (edited.version, edited.last_editor_id) == (3, editor.id)
    restored = _restore(editor.c, made.id, 2)
    assert (restored.version, restored.title, restored.content) == (4, f"{word} book 2", _content("first"))
    # An editor changes the document, never who has it.
    assert expect_error(Code.PERMISSION_DENIED, _update, editor.c, made.id, "owner_id", owner_id=editor.id).info.reason == "FIELD_ACCESS_DENIED"
    for refused in (
        lambda: editor.c.knowledge.DeleteDocument(kpb.DeleteDocumentRequest(id=made.id)),
        lambda: _share(editor.c, made.id, stranger.id, VIEW),
        lambda: _share(editor.c, made.id, viewer.id, EDIT),
        lambda: _unshare(editor.c, made.id, viewer.id),
        lambda: _share(viewer.c, made.id, stranger.id, VIEW),
    ):
        expect_error(Code.PERMISSION_DENIED, refused)
    assert _get(owner.c, made.id) == restored
    assert [(s.user_id, s.level) for s in _shares(owner.c, made.id).document_shares] == sorted(
        [(viewer.id, VIEW), (commenter.id, COMMENT), (editor.id, EDIT)]
    )


def test_a_share_changes_level_in_place_and_an_unshare_holds_from_the_next_call(client: Client, actor: Callable[..., Actor]) -> None:
    owner, reader = actor(), actor()
    made = _create(owner.c, "Minutes")
    first = _share(owner.c, made.id, reader.id, VIEW)
    assert _share(owner.c, made.id, reader.id, VIEW) == first, "the same level again changes nothing"
    raised = _share(owner.c, made.id, reader.id, EDIT)
    assert (raised.id, raised.level) == (first.id, EDIT) and raised.etag != first.etag
    assert _shares(owner.c, made.id).total_size == 1, "one share per document and user"
    assert _update(reader.c, made.id, "title", title="Minutes, edited").version == 2
    _share(owner.c, made.id, reader.id, VIEW)
    expect_error(Code.PERMISSION_DENIED, _update, reader.c, made.id, "title", title="again")
    assert _get(reader.c, made.id).title == "Minutes, edited"
    _unshare(owner.c, made.id, reader.id)
    expect_error(Code.PERMISSION_DENIED, _get, reader.c, made.id)
    expect_error(Code.PERMISSION_DENIED, _versions, reader.c, made.id)
    assert not reader.c.knowledge.ListDocuments(kpb.ListDocumentsRequest(filter='title = "Minutes, edited"')).documents
    _unshare(owner.c, made.id, reader.id)  # idempotent: already done
    actions = [e.action for e in _entries(client, first.id)]
    assert actions == [spb.AUDIT_ACTION_CREATE, spb.AUDIT_ACTION_UPDATE, spb.AUDIT_ACTION_UPDATE, spb.AUDIT_ACTION_DELETE]


def test_a_replayed_create_is_read_under_the_rule_of_the_moment(client: Client, actor: Callable[..., Actor]) -> None:
    author, heir = actor(), actor()
    request_id = unique("req")
    made = _create(author.c, "Will", request_id=request_id)
    assert _create(author.c, "Will", request_id=request_id) == made
    _update(client, made.id, "owner_id", owner_id=heir.id)  # an admin gives it away
    expect_error(Code.PERMISSION_DENIED, _create, author.c, "Will", request_id=request_id)
    _share(heir.c, made.id, author.id, VIEW)
    assert _create(author.c, "Will", request_id=request_id).id == made.id


def test_a_soft_deleted_document_and_its_versions_are_its_owners_alone(client: Client, actor: Callable[..., Actor]) -> None:
    owner, editor = actor(), actor()
    made = _create(owner.c, "Archive")
    _update(owner.c, made.id, "title", title="Archive 2")
    _share(owner.c, made.id, editor.id, EDIT)
    assert _versions(editor.c, made.id).total_size == 1
    deleted = owner.c.knowledge.DeleteDocument(kpb.DeleteDocumentRequest(id=made.id))
    assert deleted.HasField("delete_time")
    expect_error(Code.NOT_FOUND, _get, owner.c, made.id)
    assert _get(owner.c, made.id, show_deleted=True).id == made.id
    assert [v.version for v in _versions(owner.c, made.id).document_versions] == [1]
    assert _version(owner.c, made.id, 1).title == "Archive"
    for way in (
        lambda: _get(editor.c, made.id, show_deleted=True),
        lambda: _versions(editor.c, made.id),
        lambda: _version(editor.c, made.id, 1),
        lambda: _shares(editor.c, made.id),
        lambda: editor.c.knowledge.UndeleteDocument(kpb.UndeleteDocumentRequest(id=made.id)),
        lambda: _update(editor.c, made.id, "title", title="mine now"),
    ):
        expect_error(Code.PERMISSION_DENIED, way)
    assert not editor.c.knowledge.ListDocuments(kpb.ListDocumentsRequest(filter='title = "Archive 2"', show_deleted=True)).documents
    owner.c.knowledge.UndeleteDocument(kpb.UndeleteDocumentRequest(id=made.id))
    assert _versions(editor.c, made.id).total_size == 1 and _get(editor.c, made.id).title == "Archive 2"


def test_force_delete_takes_versions_and_shares_and_audits_them(client: Client, actor: Callable[..., Actor]) -> None:
    owner, reader = actor(), actor()
    made = _create(owner.c, "Doomed")
    _update(owner.c, made.id, "title", title="Doomed 2")
    share = _share(owner.c, made.id, reader.id, VIEW)
    (kept,) = _versions(owner.c, made.id).document_versions
    expect_error(Code.PERMISSION_DENIED, lambda: owner.c.knowledge.DeleteDocument(kpb.DeleteDocumentRequest(id=made.id, force=True)))
    client.knowledge.DeleteDocument(kpb.DeleteDocumentRequest(id=made.id, force=True))
    expect_error(Code.NOT_FOUND, _get, client, made.id, show_deleted=True)
    expect_error(Code.NOT_FOUND, _versions, client, made.id)
    expect_error(Code.PERMISSION_DENIED, _get, reader.c, made.id)
    for row_id in (made.id, kept.id, share.id):
        assert [e.action for e in _entries(client, row_id)][-1] == spb.AUDIT_ACTION_DELETE, row_id
    assert {e.resource_type for e in _entries(client, kept.id)} == {"DocumentVersion"}


def test_bad_input_is_refused_precisely_and_changes_nothing(client: Client, actor: Callable[..., Actor]) -> None:
    owner, other = actor(), actor()
    made = _create(owner.c, "Careful")
    share = _share(owner.c, made.id, other.id, VIEW)
    missing_user = "0190a0a0-0000-7000-8000-000000000000"
    cases = [
        (Code.NOT_FOUND, "version", lambda: _version(owner.c, made.id, 7)),
        (Code.NOT_FOUND, "version", lambda: _restore(owner.c, made.id, 1)),  # version 1 is the document itself
        (Code.INVALID_ARGUMENT, "version", lambda: _version(owner.c, made.id, 0)),
        (Code.INVALID_ARGUMENT, "document_id", lambda: _versions(owner.c, "nope")),
        (Code.INVALID_ARGUMENT, "level", lambda: _share(owner.c, made.id, other.id, kpb.DOCUMENT_SHARE_LEVEL_UNSPECIFIED)),
        (Code.INVALID_ARGUMENT, "level", lambda: _share(owner.c, made.id, other.id, 99)),
        (Code.INVALID_ARGUMENT, "user_id", lambda: _share(owner.c, made.id, "nope", EDIT)),
        (Code.NOT_FOUND, "user_id", lambda: _share(owner.c, made.id, missing_user, EDIT)),
        (Code.FAILED_PRECONDITION, "user_id", lambda: _share(owner.c, made.id, owner.id, EDIT)),
        (Code.INVALID_ARGUMENT, "document.title", lambda: _update(owner.c, made.id, "title", title="")),
    ]
    for code, field, call in cases:
        err = expect_error(code, call)
        named = {v.field for v in err.violations} | {err.info.metadata.get("field", "")} | {err.resource.description if err.resource else ""}
        assert any(field in name for name in named), (code, field, err.message)
    assert expect_error(Code.FAILED_PRECONDITION, _share, owner.c, made.id, owner.id, EDIT).info.reason == "SHARE_WITH_OWNER"
    assert _get(owner.c, made.id) == made
    assert list(_shares(owner.c, made.id).document_shares) == [share]
    assert _versions(owner.c, made.id).total_size == 0


def test_search_finds_words_of_the_title_first_then_of_the_contents_string_values(client: Client, actor: Callable[..., Actor]) -> None:
    owner = actor()
    word = unique("quokka")
    nested = struct_pb2.Struct()
    nested.update({"slides": [{"notes": f"remember the {word}"}], "count": 3})
    titled = _create(owner.c, f"{word} handbook", content=_content("nothing here"))
    mentioned = _create(owner.c, "Field notes", content=nested)
    keyed = _create(owner.c, "Keys", content=struct_pb2.Struct(fields={word: struct_pb2.Value(string_value="not a value")}))
    found = owner.c.knowledge.SearchDocuments(kpb.SearchDocumentsRequest(query=word)).results
    assert [r.document.id for r in found] == [titled.id, mentioned.id], "a key is not text of the content"
    _update(owner.c, mentioned.id, "content", content=_content("changed"))
    found = owner.c.knowledge.SearchDocuments(kpb.SearchDocumentsRequest(query=word)).results
    assert [r.document.id for r in found] == [titled.id], "the index follows the content"
    assert keyed.id not in [r.document.id for r in found]


def test_a_documents_score_counts_the_word_in_its_contents_string_values_and_never_in_its_keys(client: Client, actor: Callable[..., Actor]) -> None:
    """The content is JSON: its string values are its text. A value holding the word twice scores
    above one holding it once, and a key named as the word adds nothing (SQLite counts the
    word's occurrences in the indexed values, however the stored JSON lays them out)."""
    owner = actor()
    word = unique("wombat")

    def made(content: dict[str, Any]) -> str:
        struct = struct_pb2.Struct()
        struct.update(content)
        return _create(owner.c, "Plain title", content=struct).id

    twice = made({"count": 7, "notes": [f"{word} and again {word}"]})
    once = made({"body": f"a {word} here"})
    keyed_once = made({word: f"the {word} value", "other": "nothing"})
    found = owner.c.knowledge.SearchDocuments(kpb.SearchDocumentsRequest(query=word)).results
    scores = {r.document.id: r.score for r in found}
    assert set(scores) == {twice, once, keyed_once}
    assert found[0].document.id == twice
    assert scores[twice] > scores[once] > 0
    assert scores[keyed_once] == scores[once]


def test_the_rows_of_documents_a_rule_lets_through_are_every_row_when_it_lets_every_document_through() -> None:
    """A rule of versions or shares made from a documents' rule (documents._of) adds no
    condition when that rule adds none (None: every row): `IN (SELECT id ... WHERE NULL)` would
    let no row through instead."""
    user_id = uuid.uuid4()
    assert _of(DocumentVersion.document_id, EVERY_ROW, "all")(user_id, "user") is None
    limited = _of(DocumentVersion.document_id, NO_ROW, "none")(user_id, "user")
    assert limited is not None and "document_versions.document_id IN" in str(limited)
