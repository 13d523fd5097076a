"""The write paths agree: a write answers and audits alike whichever way it runs.

A standard Create or Update runs as one statement (plans.ONE_STATEMENT_*: on PostgreSQL one
INSERT or UPDATE with its audit entry as a data-modifying CTE, in autocommit) or in a
transaction (a Session), and the custom methods, deletes and memberships change mapped objects
audited from the ORM's attribute history (audit.pending via changes.flush). Every writable
resource of the registry is walked: the same Create and the same Update under both plans give
equal answers and equal audit entries; the ORM's diff of a change is the Core diff of the same
change; a row created through the ORM is audited as the Core create audits it. A resource whose
write cannot be one statement (it appends a change event, which needs a Session) is shown
failing under that plan, and plans.py is shown never to choose it for that resource.
"""
from __future__ import annotations

import contextlib
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

import db.domains  # noqa: F401 - every resource in the registry
from db.database import Database
from db.engine import audit, changes, plans, writes
from db.engine.call import CURRENT_CALL, Call
from db.engine.resource import REGISTRY, ResourceSpec
from db.engine.tables import AuditLogEntry
from db.unit import TRANSACTION, Mode, Plan
from tests.conftest import Client, unique
from tests.support import MADE, MADE_BY_CREATE, SAMPLES, UPDATED, engine_create, mask

# Every writable resource, its rows written as make_row makes them (tests/support.engine_create:
# a File's as its upload writes it); the plans of Create itself are walked for those made by Create.
SPECS = MADE
CREATE_SPECS = MADE_BY_CREATE
ENTRIES = AuditLogEntry.__table__
# What an audit entry says, its own id and time aside.
ENTRY_COLUMNS = ("action", "actor_type", "actor_id", "method", "request_id", "resource_type", "changes", "summary")
# What each new row draws for itself, whichever way it is written: its id and times (its etag
# follows its revision); and the credential an API key's hook draws for every key (its secret,
# and the prefix that finds it).
DRAWN = frozenset({"id", "create_time", "update_time", "etag"})
DRAWN_BY_RESOURCE = {
    "ApiKey": frozenset({"key_prefix", "secret"}),
    "Email": frozenset({"thread_id"}),
    "AIInteraction": frozenset({"request_time"}),  # its creation time, unless the writer says
}


def test_every_writable_resource_is_walked() -> None:
    assert sorted(SAMPLES) == [s.name for s in SPECS]
    assert sorted(n for n, sample in SAMPLES.items() if not sample.without_create) == [s.name for s in CREATE_SPECS]


@pytest.fixture(params=[s.name for s in SPECS])
def spec(request: pytest.FixtureRequest) -> ResourceSpec:
    return REGISTRY[request.param]


@pytest.fixture(params=[s.name for s in CREATE_SPECS])
def create_spec(request: pytest.FixtureRequest) -> ResourceSpec:
    return REGISTRY[request.param]


@pytest.fixture(params=[s.name for s in UPDATED])
def update_spec(request: pytest.FixtureRequest) -> ResourceSpec:
    """A resource with an Update RPC (a record, an AIInteraction, has none)."""
    return REGISTRY[request.param]


@pytest.fixture
def database(client: Client) -> Iterator[Database]:
    database = Database(client.database_url)
    try:
        yield database
    finally:
        database.dispose()


def _call(client: Client, spec: ResourceSpec, method: str) -> Call:
    """An admin's call (an API key), with a request id of its own for its audit entries."""
    return Call(
        request_id=unique("req"), method=f"/test/{method}{spec.name}", dialect=client.backend,
        actor_type="api_key", actor_id=uuid.uuid4(), role="admin",
    )


@contextlib.contextmanager
def _as(call: Call) -> Iterator[Call]:
    token = CURRENT_CALL.set(call)
    try:
        yield call
    finally:
        CURRENT_CALL.reset(token)


def _module(spec: ResourceSpec) -> Any:
    return sys.modules[spec.message.__module__]


def _create_request(client: Client, spec: ResourceSpec) -> Any:
    """A valid Create of spec from its sample (its parent rows made through the server)."""
    fields = SAMPLES[spec.name].fields(client, unique("w"))
    return getattr(_module(spec), f"Create{spec.name}Request")(**{spec.singular_field: spec.message(**fields)})


def _new_row(client: Client, spec: ResourceSpec) -> tuple[Message, Any]:
    """(the message of a valid new row of spec from its sample, the engine write (session, call)
    that makes it as make_row would: a Create, or a File's upload)."""
    sent = spec.message(**SAMPLES[spec.name].fields(client, unique("w")))
    return sent, engine_create(client, spec, sent)


def _changed(fd: FieldDescriptor, value: Any) -> Any:
    """Another valid value of a field, of its kind: the resource's validation takes it."""
    if fd.is_repeated:
        return list(value)[:-1]
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return next(v.number for v in fd.enum_type.values if v.number not in (0, value))
    if fd.type == FieldDescriptor.TYPE_BOOL:
        return not value
    if fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64):
        return value + 1
    if fd.type == FieldDescriptor.TYPE_STRING:
        return f"{value} changed"
    changed = type(value)()
    changed.CopyFrom(value)
    name = fd.message_type.full_name
    if name == "google.protobuf.Struct":
        changed.fields["changed"].CopyFrom(struct_pb2.Value(bool_value=True))
    elif name == "google.protobuf.Timestamp":
        changed.seconds += 86400
    elif name == "nexus.common.v1.Date":
        changed.day = changed.day % 28 + 1
    elif name == "nexus.common.v1.Money":
        changed.units += 1
    else:
        raise AssertionError(f"{fd.full_name}: no other value known for a {name}")
    return changed


def _update_request(client: Client, spec: ResourceSpec, created: Message, sent: Message) -> Any:
    """An Update changing every updatable field the sample sets: to a second sample's value where
    that differs, else to another value of the field's kind (_changed)."""
    other = spec.message(**SAMPLES[spec.name].fields(client, unique("w")))
    msg = spec.message(id=created.id)
    paths = []
    for name in spec.updatable:
        fd = spec.message.DESCRIPTOR.fields_by_name[name]
        if not spec.codecs[name].present(sent):
            continue
        value = getattr(other, name) if getattr(other, name) != getattr(sent, name) else _changed(fd, getattr(sent, name))
        if fd.is_repeated:
            getattr(msg, name).extend(value)
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(msg, name).CopyFrom(value)
        else:
            setattr(msg, name, value)
        paths.append(name)
    assert paths, f"the sample of {spec.name} sets no updatable field"
    return getattr(_module(spec), f"Update{spec.name}Request")(**{spec.singular_field: msg}, update_mask=mask(*paths))


def _normalised(spec: ResourceSpec, msg: Message) -> Message:
    copy = type(msg)()
    copy.CopyFrom(msg)
    for name in DRAWN | DRAWN_BY_RESOURCE.get(spec.name, frozenset()):
        if name in spec.message.DESCRIPTOR.fields_by_name:
            copy.ClearField(name)
    return copy


def _normalised_entries(spec: ResourceSpec, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    drawn = DRAWN | DRAWN_BY_RESOURCE.get(spec.name, frozenset())
    return [
        {**e, "changes": [{**c, "new_value": "<drawn>"} if c["field"] in drawn else c for c in e["changes"]]}
        for e in entries
    ]


def _as_loaded(spec: ResourceSpec, request: Any, row: dict[str, Any]) -> dict[str, Any]:
    """A row's values after an update as the update had them: the request's fields as their
    codecs load them (the database may answer a value in another form of it, as PostgreSQL's
    numeric with its scale) over the row as the update left it (with what its hook set)."""
    msg = getattr(request, spec.singular_field)
    loaded: dict[str, Any] = {}
    for name in request.update_mask.paths:
        loaded.update(spec.codecs[name].load(msg))
    return {**row, **loaded}


def _without(values: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k not in keys}


def _entries(database: Database, resource_id: str | uuid.UUID) -> list[dict[str, Any]]:
    """The audit entries of a row, oldest first."""
    stmt = select(*(ENTRIES.c[k] for k in ENTRY_COLUMNS)).where(ENTRIES.c.resource_id == uuid.UUID(str(resource_id)))
    with database.engine.connect() as conn:
        return [dict(row._mapping) for row in conn.execute(stmt.order_by(ENTRIES.c.create_time, ENTRIES.c.id))]


def _row(database: Database, spec: ResourceSpec, resource_id: str | uuid.UUID) -> dict[str, Any]:
    with database.engine.connect() as conn:
        return dict(conn.execute(select(spec.table).where(spec.table.c.id == uuid.UUID(str(resource_id)))).one()._mapping)


def _restore(database: Database, spec: ResourceSpec, values: dict[str, Any]) -> None:
    """Put a row back as it was (every column), for the next write to start from it."""
    with database.engine.begin() as conn:
        conn.execute(update(spec.table).where(spec.table.c.id == values["id"]).values(**{k: v for k, v in values.items() if k != "id"}))


def _remove(database: Database, spec: ResourceSpec, ids: list[Any]) -> None:
    with database.engine.begin() as conn:
        conn.execute(delete(spec.table).where(spec.table.c.id.in_([uuid.UUID(str(i)) for i in ids])))


def _held(spec: ResourceSpec, request: Any) -> bool:
    """Whether plans.py keeps the write of request from ONE_STATEMENT: every update of spec,
    whatever it changes (or create: a change event), or a write setting a list reference, whose
    ids are read FOR SHARE before it writes."""
    return spec.stream_scope is not None or spec.on_update is not None or bool(_lists_set(spec, request))


def _lists_set(spec: ResourceSpec, request: Any) -> list[str]:
    """The list references a write sets: an update's mask names them, a create's message holds them."""
    if hasattr(request, "update_mask"):
        return [name for name in spec.list_references if name in request.update_mask.paths]
    msg = getattr(request, spec.singular_field)
    return [name for name in spec.list_references if spec.codecs[name].present(msg)]


def _one_statement_cannot_hold(
    database: Database, spec: ResourceSpec, request: Any, plan: Plan, one_statement: Plan, write: Any, doomed: Call
) -> None:
    """A resource plans.py keeps from ONE_STATEMENT: the write run that way anyway fails (it
    needs a Session, or its update writes more rows: on_update); what PostgreSQL committed of
    it on its own (the row with its audit entry, in autocommit) is taken away again (found by
    the call's request id)."""
    assert plan.mode is Mode.TRANSACTION and _held(spec, request), (spec.name, plan)
    lists_set = _lists_set(spec, request)
    if spec.stream_scope is not None:
        assert plan.why == f"{spec.name} appends a change event with each write"
        # The first guard met refuses: the list references' before the change event's.
        refusal = "read FOR SHARE until the commit" if lists_set else "used by a one-statement write"
    elif lists_set:
        assert plan is plans.LIST_REFERENCES or plan.why.startswith("it changes a reference"), plan
        refusal = "read FOR SHARE until the commit"
    else:
        assert plan.why == f"a change of a {spec.name} writes more rows (its on_update)"
        refusal = "cannot hold"
    with _as(doomed), pytest.raises(AssertionError, match=refusal):
        database.run_sync(write, one_statement)
    with database.engine.begin() as conn:
        made = list(conn.execute(select(ENTRIES.c.resource_id, ENTRIES.c.action).where(ENTRIES.c.request_id == doomed.request_id)))
        conn.execute(delete(ENTRIES).where(ENTRIES.c.request_id == doomed.request_id))
    # PostgreSQL: what went in before the failure stays, the row with its entry (unless its
    # hook already needed the Session); SQLite: rolled back.
    assert len(made) <= (1 if database.is_postgres else 0), made
    if made and made[0].action == "create":
        _remove(database, spec, [made[0].resource_id])


def _drafts_of_core_creates(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The column values each Core create audits (audit.created's rows), as it gives them."""
    seen: list[dict[str, Any]] = []
    real = audit.created

    def created(session: Any, spec: ResourceSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        seen.extend(dict(row) for row in rows)
        return real(session, spec, rows)

    monkeypatch.setattr(audit, "created", created)
    return seen


def test_a_create_answers_and_audits_alike_under_both_plans(client: Client, database: Database, create_spec: ResourceSpec) -> None:
    spec = create_spec
    request = _create_request(client, spec)
    call = _call(client, spec, "Create")

    def create(session: Any) -> Message:
        return writes.create(session, spec, request, call)

    with _as(call):
        plan = plans.plan_create(spec, request, call)
    if plan.mode is Mode.TRANSACTION:
        _one_statement_cannot_hold(database, spec, request, plan, plans.ONE_STATEMENT_CREATE, create, _call(client, spec, "Create"))
        return
    assert plan is plans.ONE_STATEMENT_CREATE
    with _as(call):
        one = database.run_sync(create, plan)
    one_entries = _entries(database, one.id)
    _remove(database, spec, [one.id])  # the same request again: its unique fields are free again
    with _as(call):
        two = database.run_sync(create, TRANSACTION)
    two_entries = _entries(database, two.id)
    assert one.id != two.id
    assert _normalised(spec, one) == _normalised(spec, two)
    assert [e["action"] for e in one_entries] == ["create"]
    assert one_entries[0]["request_id"] == call.request_id and one_entries[0]["actor_id"] == call.actor_id
    assert _normalised_entries(spec, one_entries) == _normalised_entries(spec, two_entries)
    assert {"field": "id", "old_value": None, "new_value": one.id} in one_entries[0]["changes"]


def test_an_update_answers_and_audits_alike_under_both_plans(client: Client, database: Database, update_spec: ResourceSpec) -> None:
    spec = update_spec
    sent, create = _new_row(client, spec)
    call = _call(client, spec, "Update")
    with _as(call):
        created = database.run_sync(lambda s: create(s, call), TRANSACTION)
    request = _update_request(client, spec, created, sent)
    start = _row(database, spec, created.id)

    def change(session: Any) -> Message:
        return writes.update(session, spec, request, call)

    with _as(call):
        plan = plans.plan_update(spec, request, call)
    if _held(spec, request):
        _one_statement_cannot_hold(database, spec, request, plan, plans.ONE_STATEMENT_UPDATE, change, _call(client, spec, "Update"))
        _restore(database, spec, start)
    else:
        if plan.mode is Mode.TRANSACTION:
            # Its reference check holds a lock until the commit: plans.py takes a transaction.
            # Run as one statement anyway, it answers as the transaction does.
            assert plan.why.startswith("it changes a reference") and set(request.update_mask.paths) & set(spec.references), plan
        else:
            assert plan is plans.ONE_STATEMENT_UPDATE
        with _as(call):
            one = database.run_sync(change, plans.ONE_STATEMENT_UPDATE)
        one_row = _row(database, spec, created.id)
        _restore(database, spec, start)
    with _as(call):
        two = database.run_sync(change, TRANSACTION)
    two_row = _row(database, spec, created.id)
    entries = _entries(database, created.id)
    assert [e["action"] for e in entries] == ["create", "update"] + ([] if _held(spec, request) else ["update"])
    updated_fields = {c["field"] for c in entries[-1]["changes"]}
    assert updated_fields >= set(request.update_mask.paths), "every field the update names changed (and what its hook sets)"
    if _held(spec, request):
        return
    assert _normalised(spec, one) == _normalised(spec, two)
    assert one.etag == two.etag == f'W/"{start["revision"] + 1}"'
    # (A secret is hashed with a salt of its own each time.)
    assert _without(one_row, "update_time", *spec.secrets) == _without(two_row, "update_time", *spec.secrets)
    assert entries[1] == entries[2]


def test_the_orm_diff_is_the_core_diff(client: Client, database: Database, update_spec: ResourceSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = update_spec
    sent, create = _new_row(client, spec)
    call = _call(client, spec, "Update")
    drafts = _drafts_of_core_creates(monkeypatch)
    with _as(call):
        created = database.run_sync(lambda s: create(s, call), TRANSACTION)
    (draft,) = drafts
    request = _update_request(client, spec, created, sent)
    old = _row(database, spec, created.id)
    with _as(call):
        database.run_sync(lambda s: writes.update(s, spec, request, call), TRANSACTION)
    new = _as_loaded(spec, request, _row(database, spec, created.id))
    create_entry, update_entry = _entries(database, created.id)
    core_create, core_update = audit.changes(spec, None, draft), audit.changes(spec, old, new)
    assert core_create == create_entry["changes"] and core_update == update_entry["changes"], "what the Core writes audited"
    assert core_update, "the update changed something an entry reports"

    _restore(database, spec, old)
    specs = REGISTRY.models()
    with _as(call), Session(database.engine) as session:  # nothing is flushed: rolled back on close
        obj = session.get(spec.model, old["id"])
        for key, value in new.items():
            if value != old[key]:
                setattr(obj, key, value)
        assert audit._orm_update(spec, obj) == core_update
        (entry,) = audit.pending(session, specs)
        assert (entry.action, entry.changes, entry.summary) == ("update", core_update, update_entry["summary"])
        session.expunge(obj)

        fresh = spec.model(**{**draft, "id": uuid.uuid4()})
        session.add(fresh)
        (entry,) = audit.pending(session, specs)
        assert (entry.action, entry.resource_id) == ("create", fresh.id)
        assert entry.changes == audit.changes(spec, None, {**draft, "id": fresh.id})
        assert _normalised_entries(spec, [{"changes": entry.changes}]) == _normalised_entries(spec, [{"changes": core_create}])


def test_an_orm_create_audits_as_the_core_create(client: Client, database: Database, spec: ResourceSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same new row, once inserted by the Core create (audit.created) and once added as a
    mapped object and flushed (changes.flush, as the custom methods write): the same entry."""
    _, create = _new_row(client, spec)
    call = _call(client, spec, "Create")
    drafts = _drafts_of_core_creates(monkeypatch)
    with _as(call):
        created = database.run_sync(lambda s: create(s, call), TRANSACTION)
    (draft,) = drafts
    (core_entry,) = _entries(database, created.id)
    _remove(database, spec, [created.id])  # the same row again, with its id: its unique fields are free again

    def add(session: Session) -> None:
        session.add(spec.model(**draft))
        changes.flush(session)

    with _as(call):
        database.run_sync(add, TRANSACTION)
    orm_entry = _entries(database, created.id)[-1]
    assert orm_entry == core_entry
    assert _row(database, spec, created.id)["id"] == draft["id"]
