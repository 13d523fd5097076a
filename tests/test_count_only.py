"""count_only on every List: total_size alone, the List's own count (its filter, show_deleted and
the caller's row rules), no resources and no next_page_token; page_size 0 keeps its AIP-158
meaning, the default page."""
from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from google.protobuf import struct_pb2
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.knowledge.v1 import knowledge_pb2 as kpb

from db.engine.resource import REGISTRY
from tests.conftest import Client, unique
from tests.support import expect_error, mask
from tests.test_access import Actor, actor  # noqa: F401 - the fixture
from tests.test_standard_methods import SPECS, Api

Code = grpc.StatusCode


@pytest.fixture(params=[s.name for s in SPECS])
def api(request: pytest.FixtureRequest, client: Client) -> Api:
    return Api(client, REGISTRY[request.param])


def _counted(response: object, api: Api | None = None) -> int:
    """total_size of a count_only answer, which holds nothing else."""
    assert response.next_page_token == ""  # type: ignore[attr-defined]
    assert [fd.name for fd, _ in response.ListFields()] in ([], ["total_size"]), response  # type: ignore[attr-defined]
    return int(response.total_size)  # type: ignore[attr-defined]


def test_count_only_is_the_lists_total_size_for_a_filter(api: Api) -> None:
    words = [unique("w") for _ in range(3)]
    for word in words:  # a word each: some samples make it a unique name
        api.create(word)
    filter_text = " OR ".join(f"({api.sample.filter_for(word)})" for word in words)
    page = api.list(filter=filter_text, page_size=1)
    assert page.total_size == 3 and len(api.items(page)) == 1 and page.next_page_token
    assert _counted(api.list(filter=filter_text, count_only=True)) == 3
    # page_size is not read; order_by is checked as a List checks it.
    assert _counted(api.list(filter=filter_text, count_only=True, page_size=1000, order_by="id desc")) == 3
    # Without a filter: every row the caller sees, as the List counts them.
    assert _counted(api.list(count_only=True)) == api.list(page_size=1).total_size


def test_count_only_follows_show_deleted(client: Client) -> None:
    api = Api(client, REGISTRY["Project"])
    words = [unique("w") for _ in range(3)]
    made = [api.create(word) for word in words]
    api.call("Delete{E}", id=made[0].id)
    filter_text = " OR ".join(f"({api.sample.filter_for(word)})" for word in words)
    assert _counted(api.list(filter=filter_text, count_only=True)) == api.list(filter=filter_text).total_size == 2
    assert _counted(api.list(filter=filter_text, count_only=True, show_deleted=True)) == api.list(filter=filter_text, show_deleted=True).total_size == 3


def test_count_only_follows_the_callers_row_rules(client: Client, actor: Callable[..., Actor]) -> None:
    alice, bob = actor(), actor()
    word = unique("rr")
    for who, private in ((alice, True), (alice, False), (bob, True)):
        who.c.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"{word} {unique()}", is_private=private, creator_id=who.id)))
    filter_text = f'name = "{word}*"'
    for caller, sees in ((client, 3), (alice.c, 2), (bob.c, 2)):
        listed = caller.chat.ListChannels(cpb.ListChannelsRequest(filter=filter_text))
        counted = _counted(caller.chat.ListChannels(cpb.ListChannelsRequest(filter=filter_text, count_only=True)))
        assert counted == listed.total_size == len(listed.channels) == sees

    # Documents: their owners see their own (and admins all).
    for who, n in ((alice, 2), (bob, 1)):
        for _ in range(n):
            content = struct_pb2.Struct(fields={"body": struct_pb2.Value(string_value="text")})
            who.c.knowledge.CreateDocument(
                kpb.CreateDocumentRequest(document=kpb.Document(title=f"{word} doc", kind=kpb.DOCUMENT_KIND_WORD, content=content))
            )
    filter_text = f'title = "{word}*"'
    for caller, sees in ((client, 3), (alice.c, 2), (bob.c, 1)):
        listed = caller.knowledge.ListDocuments(kpb.ListDocumentsRequest(filter=filter_text))
        counted = _counted(caller.knowledge.ListDocuments(kpb.ListDocumentsRequest(filter=filter_text, count_only=True)))
        assert counted == listed.total_size == sees


def test_count_only_of_a_documents_versions(client: Client) -> None:
    api = Api(client, REGISTRY["Document"])
    document = api.create()
    for title in ("second", "third"):
        client.knowledge.UpdateDocument(kpb.UpdateDocumentRequest(document=kpb.Document(id=document.id, title=title), update_mask=mask("title")))
    listed = client.knowledge.ListDocumentVersions(kpb.ListDocumentVersionsRequest(document_id=document.id, page_size=1))
    assert listed.total_size == 2 and listed.next_page_token
    counted = client.knowledge.ListDocumentVersions(kpb.ListDocumentVersionsRequest(document_id=document.id, count_only=True))
    assert _counted(counted) == 2


def test_count_only_refuses_what_a_list_refuses_and_a_page_token(client: Client) -> None:
    api = Api(client, REGISTRY["Task"])
    word = unique("w")
    api.create(word)
    api.create(word)
    token = api.list(filter=api.sample.filter_for(word), page_size=1).next_page_token
    assert token
    err = expect_error(Code.INVALID_ARGUMENT, api.list, filter=api.sample.filter_for(word), page_token=token, count_only=True)
    assert err.info.reason == "INVALID_PAGE_TOKEN" and err.violations[0].field == "page_token"
    assert expect_error(Code.INVALID_ARGUMENT, api.list, filter="no_such_field = 1", count_only=True).violations
    assert expect_error(Code.INVALID_ARGUMENT, api.list, order_by="no_such_field", count_only=True)
    assert expect_error(Code.INVALID_ARGUMENT, api.list, page_size=-1, count_only=True).violations[0].field == "page_size"


def test_page_size_zero_is_still_the_default_page(client: Client) -> None:
    api = Api(client, REGISTRY["Role"])
    word = unique("w")
    api.create(word)
    page = api.list(filter=api.sample.filter_for(word), page_size=0)
    assert page.total_size == 1 and len(api.items(page)) == 1
