"""Every standard method of every registered resource, over a real channel, on both databases.

The tests iterate the registry: a resource added later is covered here without new test code
(and fails test_every_resource_has_a_sample until it is given a sample). A resource without a
Create RPC (a File, made by an upload) is walked too, its rows made as its sample says
(tests/support.make_row); only the tests of Create and BatchCreate themselves leave it out.
"""
from __future__ import annotations

import sys
import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2

import db.domains  # noqa: F401 - every resource in the registry
from db.engine.resource import REGISTRY, ResourceSpec
from tests.conftest import Client, unique
from tests.support import MADE, MADE_BY_CREATE, SAMPLES, UPDATED, expect_error, make_row, mask

# Every writable resource, its rows made by make_row (a File's by an upload); the tests of Create
# and BatchCreate themselves walk those made by Create.
SPECS = MADE
CREATE_SPECS = MADE_BY_CREATE
READ_ONLY = sorted((s for s in REGISTRY if s.read_only), key=lambda s: s.name)
Code = grpc.StatusCode


def test_every_resource_has_a_sample() -> None:
    writable = [s for s in REGISTRY if not s.read_only]
    assert sorted(SAMPLES) == sorted(s.name for s in writable)
    for spec in writable:
        sample = SAMPLES[spec.name]
        assert bool(sample.without_create) == (not spec.create_rpc), f"{spec.name}: say why it has no Create"
        assert (sample.make is None) == (sample.write is None) == spec.create_rpc, f"{spec.name}: say how its rows are made"
        methods = {m.name for m in sys.modules[spec.message.__module__].DESCRIPTOR.services_by_name[sample.service.rsplit(".", 1)[1]].methods}
        assert (f"Update{spec.name}" in methods) == spec.update_rpc == (sample.change is not None), f"{spec.name}: Update served as the API says"
    assert SPECS == sorted(writable, key=lambda s: s.name), "every writable resource is walked, with Create or without"
    assert READ_ONLY, "the audit trail is read-only"


class Api:
    """Calls the standard methods of one resource by name."""

    def __init__(self, client: Client, spec: ResourceSpec) -> None:
        self.c = client
        self.spec = spec
        self.pb = sys.modules[spec.message.__module__]
        self.sample = SAMPLES[spec.name]
        self.stub = client.stub_for(self.sample.service)

    def call(self, method: str, **fields: Any) -> Any:
        E, Es = self.spec.name, self.spec.plural
        name = method.replace("{E}", E).replace("{Es}", Es)
        request_type = getattr(self.pb, f"{name}Request")
        return getattr(self.stub, name)(request_type(**fields))

    def message(self, **fields: Any) -> Any:
        return self.spec.message(**fields)

    def create(self, word: str | None = None, request_id: str = "") -> Any:
        """A new row of the sample made with `word` (make_row: by Create, or as the sample says)."""
        word = word or unique("w")
        return make_row(self.c, self.spec, self.sample.fields(self.c, word), request_id)

    def get(self, id_: str, **kw: Any) -> Any:
        return self.call("Get{E}", id=id_, **kw)

    def list(self, **kw: Any) -> Any:
        return self.call("List{Es}", **kw)

    def items(self, response: Any) -> list[Any]:
        for fd in response.DESCRIPTOR.fields:
            if fd.is_repeated and fd.message_type is self.spec.message.DESCRIPTOR:
                return list(getattr(response, fd.name))
        raise AssertionError("no items field")


@pytest.fixture(params=[s.name for s in SPECS])
def api(request: pytest.FixtureRequest, client: Client) -> Api:
    return Api(client, REGISTRY[request.param])


@pytest.fixture(params=[s.name for s in CREATE_SPECS])
def create_api(request: pytest.FixtureRequest, client: Client) -> Api:
    return Api(client, REGISTRY[request.param])


@pytest.fixture(params=[s.name for s in UPDATED])
def update_api(request: pytest.FixtureRequest, client: Client) -> Api:
    return Api(client, REGISTRY[request.param])


@pytest.fixture(params=[s.name for s in SPECS if s.searchable])
def searchable_api(request: pytest.FixtureRequest, client: Client) -> Api:
    return Api(client, REGISTRY[request.param])


@pytest.fixture(params=[s.name for s in SPECS if s.batch_get or s.batch_create])
def batch_api(request: pytest.FixtureRequest, client: Client) -> Api:
    return Api(client, REGISTRY[request.param])


def test_a_new_row_has_server_fields_and_get_returns_it(api: Api) -> None:
    created = api.create()
    assert uuid.UUID(created.id)
    assert created.create_time.seconds > 0 and created.update_time.seconds > 0
    assert created.etag
    fetched = api.get(created.id)
    expected = api.spec.message()
    expected.CopyFrom(created)
    if "secret" in api.spec.codecs:  # shown once, at creation
        assert created.secret
        expected.ClearField("secret")
    assert fetched == expected


def test_get_with_read_mask_returns_only_masked_fields(api: Api) -> None:
    created = api.create()
    fetched = api.get(created.id, read_mask=mask("id", "create_time"))
    assert fetched.id == created.id
    assert fetched.create_time == created.create_time
    assert [fd.name for fd, _ in fetched.ListFields()] == ["id", "create_time"]
    err = expect_error(Code.INVALID_ARGUMENT, api.get, created.id, read_mask=mask("no_such_field"))
    assert err.violations[0].field == "read_mask"


def test_get_missing_and_malformed_ids(api: Api) -> None:
    missing = str(uuid.uuid4())
    err = expect_error(Code.NOT_FOUND, api.get, missing)
    assert err.resource is not None and err.resource.resource_type == api.spec.name
    assert err.resource.resource_name == missing
    err = expect_error(Code.INVALID_ARGUMENT, api.get, "not-a-uuid")
    assert err.violations[0].field == "id"


def test_create_with_request_id_is_idempotent(create_api: Api) -> None:
    api = create_api
    word, request_id = unique("w"), str(uuid.uuid4())
    first = api.create(word, request_id=request_id)
    fields = api.sample.fields(api.c, unique("other"))
    second = api.call("Create{E}", **{api.spec.singular_field: api.message(**fields)}, request_id=request_id)
    assert second.id == first.id
    listed = api.list(filter=api.sample.filter_for(word))
    assert [item.id for item in api.items(listed)] == [first.id]


def test_create_rejects_missing_required_fields(create_api: Api) -> None:
    api = create_api
    if not api.spec.required:
        # Nothing is required (a Conversation: the admin acting for no user makes one without a
        # user): an empty one is made, with its defaults.
        made = api.call("Create{E}", **{api.spec.singular_field: api.message()})
        assert made.id and made.create_time.seconds
        return
    err = expect_error(Code.INVALID_ARGUMENT, api.call, "Create{E}", **{api.spec.singular_field: api.message()})
    fields = {v.field for v in err.violations}
    assert fields, "names the missing fields"
    assert all(f.startswith(api.spec.singular_field + ".") for f in fields)


def _changed_value(api: Api) -> tuple[str, Any]:
    field, value = api.sample.change
    return field, (unique("c") if value is None else value)


def test_update_changes_only_masked_fields_and_moves_the_etag(update_api: Api) -> None:
    api = update_api
    created = api.create()
    field, value = _changed_value(api)
    patch = api.message(id=created.id, **{field: value})
    updated = api.call("Update{E}", **{api.spec.singular_field: patch}, update_mask=mask(field))
    assert getattr(updated, field) == value
    assert updated.etag != created.etag
    assert updated.update_time.ToDatetime() >= created.update_time.ToDatetime()
    for name in api.spec.creatable:  # writable fields; output-only ones may follow the change
        if name != field:
            assert getattr(updated, name) == getattr(created, name), name
    assert updated.id == created.id and updated.create_time == created.create_time


def test_update_with_stale_etag_is_aborted_and_changes_nothing(update_api: Api) -> None:
    api = update_api
    created = api.create()
    field, value = _changed_value(api)
    fresh = api.call("Update{E}", **{api.spec.singular_field: api.message(id=created.id, etag=created.etag, **{field: value})}, update_mask=mask(field))
    _, other = _changed_value(api)
    stale = api.message(id=created.id, etag=created.etag, **{field: other})
    err = expect_error(Code.ABORTED, api.call, "Update{E}", **{api.spec.singular_field: stale}, update_mask=mask(field))
    assert err.info.reason == "ETAG_MISMATCH"
    assert getattr(api.get(created.id), field) == getattr(fresh, field)


def test_update_rejects_bad_masks(update_api: Api) -> None:
    api = update_api
    created = api.create()
    patch = api.message(id=created.id)
    for path in ("no_such_field", *sorted(api.spec.all_output_only)):
        err = expect_error(Code.INVALID_ARGUMENT, api.call, "Update{E}", **{api.spec.singular_field: patch}, update_mask=mask(path))
        assert err.violations[0].field == "update_mask"
        assert path in err.violations[0].description
    for path in sorted(api.spec.immutable):
        err = expect_error(Code.INVALID_ARGUMENT, api.call, "Update{E}", **{api.spec.singular_field: patch}, update_mask=mask(path))
        assert err.info.reason == "IMMUTABLE_FIELD"
    missing = api.message(id=str(uuid.uuid4()))
    expect_error(Code.NOT_FOUND, api.call, "Update{E}", **{api.spec.singular_field: missing}, update_mask=mask(api.sample.change[0]))


def test_list_filters_counts_and_pages_without_repeats(api: Api) -> None:
    word = unique("w")
    made = [api.create(word if i == 0 else None) for i in range(5)]
    only = api.list(filter=api.sample.filter_for(word))
    assert [i.id for i in api.items(only)] == [made[0].id]
    assert only.total_size == 1
    ids = {m.id for m in made}
    first_time = min(m.create_time.ToDatetime() for m in made)
    flt = f'create_time >= "{first_time.isoformat()}Z"'
    seen: list[str] = []
    token = ""
    while True:
        page = api.list(page_size=2, page_token=token, filter=flt)
        seen.extend(i.id for i in api.items(page))
        assert len(api.items(page)) <= 2
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)), "no row twice"
    assert ids <= set(seen), "no row skipped"
    assert page.total_size == len(seen)



def test_list_counts_on_a_page_that_came_out_empty(api: Api) -> None:
    # total_size rides on the page's rows; a page with none counts on its own.
    made = [api.create() for _ in range(3)]
    flt = " OR ".join(f'id = "{m.id}"' for m in made)
    first = api.list(filter=flt, page_size=2)
    assert first.total_size == 3 and first.next_page_token
    on_first = {i.id for i in api.items(first)}
    (rest,) = [m for m in made if m.id not in on_first]
    api.call("Delete{E}", id=rest.id)
    second = api.list(filter=flt, page_size=2, page_token=first.next_page_token)
    assert api.items(second) == [] and second.total_size == 2 and not second.next_page_token

def test_list_orders_descending(api: Api) -> None:
    made = [api.create() for _ in range(3)]
    first_time = min(m.create_time.ToDatetime() for m in made)
    page = api.list(filter=f'create_time >= "{first_time.isoformat()}Z"', order_by="create_time desc")
    times = [i.create_time.ToDatetime() for i in api.items(page)]
    assert times == sorted(times, reverse=True)


def test_list_rejects_bad_input(api: Api) -> None:
    cases = [
        ({"filter": "no_such_field = 1"}, "filter"),
        ({"filter": "create_time > "}, "filter"),
        ({"filter": 'id = "not-a-uuid"'}, "filter"),
        ({"page_size": -1}, "page_size"),
        ({"page_token": "garbage!!"}, "page_token"),
        ({"order_by": "no_such_field desc"}, "order_by"),
        ({"order_by": "create_time sideways"}, "order_by"),
    ]
    for kwargs, field in cases:
        err = expect_error(Code.INVALID_ARGUMENT, api.list, **kwargs)
        assert err.violations[0].field == field, kwargs


def test_page_token_is_tied_to_its_query(api: Api) -> None:
    for _ in range(3):
        api.create()
    page = api.list(page_size=1)
    assert page.next_page_token
    err = expect_error(Code.INVALID_ARGUMENT, api.list, page_size=1, page_token=page.next_page_token, order_by="create_time desc")
    assert err.info.reason == "INVALID_PAGE_TOKEN"


def test_delete_semantics(api: Api) -> None:
    created = api.create()
    if not api.spec.soft_delete:
        assert api.call("Delete{E}", id=created.id) == empty_pb2.Empty()
        expect_error(Code.NOT_FOUND, api.get, created.id)
        expect_error(Code.NOT_FOUND, api.call, "Delete{E}", id=created.id)
        return
    err = expect_error(Code.ABORTED, api.call, "Delete{E}", id=created.id, etag='W/"999"')
    assert err.info.reason == "ETAG_MISMATCH"
    deleted = api.call("Delete{E}", id=created.id, etag=created.etag)
    assert deleted.delete_time.seconds > 0
    expect_error(Code.NOT_FOUND, api.get, created.id)
    assert api.get(created.id, show_deleted=True).id == created.id
    word_filter = f'id = "{created.id}"'
    assert api.list(filter=word_filter).total_size == 0
    assert api.list(filter=word_filter, show_deleted=True).total_size == 1
    restored = api.call("Undelete{E}", id=created.id)
    assert not restored.HasField("delete_time")
    assert api.get(created.id).id == created.id
    err = expect_error(Code.FAILED_PRECONDITION, api.call, "Undelete{E}", id=created.id)
    assert err.info.reason == "NOT_DELETED"
    api.call("Delete{E}", id=created.id, force=True)
    expect_error(Code.NOT_FOUND, api.get, created.id, show_deleted=True)


def test_search_ranks_matches_first(searchable_api: Api) -> None:
    api = searchable_api
    word = unique("s")
    made = api.create(word)
    api.create()
    result = api.call("Search{Es}", query=word)
    assert result.total_size == 1
    hit = result.results[0]
    assert getattr(hit, api.spec.singular_field).id == made.id
    assert hit.score > 0
    expect_error(Code.INVALID_ARGUMENT, api.call, "Search{Es}", query="  ")
    filtered = api.call("Search{Es}", query=word, filter=f'id = "{uuid.uuid4()}"')
    assert filtered.total_size == 0


def test_a_hit_scores_by_its_own_row_whatever_the_others_hold(searchable_api: Api) -> None:
    """A hit's score is its own row's: rows added since that hold the same word change neither
    its score nor its place, so pages read at different moments rank alike (SQLite's bm25 weighed
    a word by the number of rows holding it, and each new one moved every score)."""
    api = searchable_api
    word = unique("s")
    made = api.create(word)

    def score() -> float:
        result = api.call("Search{Es}", query=word)
        return {getattr(hit, api.spec.singular_field).id: hit.score for hit in result.results}[made.id]

    first = score()
    assert first > 0
    for i in range(3):  # the word, and another: unique fields (a user's email) stay unique
        api.create(f"{word}_{i}")
    api.create()
    assert api.call("Search{Es}", query=word).total_size == 4
    assert score() == first


def test_batch_methods_are_all_or_nothing(batch_api: Api) -> None:
    api = batch_api
    if api.spec.batch_get:
        made = [api.create() for _ in range(2)]
        got = api.call("BatchGet{Es}", ids=[made[1].id, made[0].id])
        assert [i.id for i in api.items(got)] == [made[1].id, made[0].id]
        err = expect_error(Code.NOT_FOUND, api.call, "BatchGet{Es}", ids=[made[0].id, str(uuid.uuid4())])
        assert err.info.metadata["field"] == "ids[1]"
    if api.spec.batch_create:
        assert api.spec.create_rpc
        create_type = getattr(api.pb, f"Create{api.spec.name}Request")
        word = unique("b")
        good = [create_type(**{api.spec.singular_field: api.message(**api.sample.fields(api.c, word))}) for _ in range(3)]
        bad = create_type(**{api.spec.singular_field: api.message()})
        err = expect_error(Code.INVALID_ARGUMENT, api.call, "BatchCreate{Es}", requests=[*good, bad])
        assert err.violations[0].field.startswith("requests[3].")
        assert api.list(filter=api.sample.filter_for(word)).total_size == 0, "nothing of a failed batch is kept"
        created = api.call("BatchCreate{Es}", requests=good)
        assert len(api.items(created)) == 3
        assert api.list(filter=api.sample.filter_for(word)).total_size == 3


def test_concurrent_creates_with_one_request_id_make_one_resource(create_api: Api) -> None:
    api = create_api
    from concurrent.futures import ThreadPoolExecutor

    word, request_id = unique("w"), str(uuid.uuid4())
    fields = api.sample.fields(api.c, word)

    def attempt(_: int) -> str:
        return api.call("Create{E}", **{api.spec.singular_field: api.message(**fields)}, request_id=request_id).id

    with ThreadPoolExecutor(6) as pool:
        ids = set(pool.map(attempt, range(6)))
    assert len(ids) == 1
    assert api.list(filter=api.sample.filter_for(word)).total_size == 1


def test_hostile_field_values_are_refused_precisely_and_change_nothing(create_api: Api) -> None:
    """NUL in text, non-finite numbers and unknown enum numbers, for every writable field."""
    from google.protobuf.descriptor import FieldDescriptor as FD

    api = create_api
    word = unique("h")
    base = api.sample.fields(api.c, word)
    cases: list[tuple[str, Any]] = []
    for fd in api.spec.message.DESCRIPTOR.fields:
        if fd.name not in api.spec.creatable:
            continue
        if fd.type == FD.TYPE_STRING and not fd.is_repeated and fd.name not in api.spec.references:
            cases.append((fd.name, "bad\x00value"))
        elif fd.type == FD.TYPE_STRING and fd.is_repeated:
            cases.append((fd.name, ["ok", "bad\x00"]))
        elif fd.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
            cases += [(fd.name, float("inf")), (fd.name, float("nan"))]
        elif fd.type == FD.TYPE_ENUM:
            cases.append((fd.name, 99))
    assert cases
    for name, value in cases:
        fields = dict(base, **{name: value})
        err = expect_error(Code.INVALID_ARGUMENT, api.call, "Create{E}", **{api.spec.singular_field: api.message(**fields)})
        assert err.violations[0].field.startswith(f"{api.spec.singular_field}.{name}"), (name, err.violations[0].field)
    assert api.list(filter=api.sample.filter_for(word)).total_size == 0
