"""The access table, walked: every resource and every RPC, as every kind of caller.

Nothing here names a resource or a method. Callers: a guest, a user, a manager (each with a key
acting for it) and keys that act for no user (of role user and guest). For every writable
resource of the registry, rows are made by an admin from the resource's sample (tests/support.py)
the way the resource is made (tests/support.make_row: its Create, or a File's upload) as they are, owned by the caller where the resource has an owner field, and given to the caller
by each grant its sample declares (a document shared at view, comment and edit: the rules must
say what the grant promises); the declared row rules (each resource's `access`, db/engine/rules.py, evaluated in the database for that row) say whether the caller sees and
manages each row, and every way to the row must agree: Get, BatchGet, List, Search, Update,
Delete (by the delete rule where one is declared); a caller without a user has no more rights than a stranger of its role. A row the caller makes (by Create, or by a File's upload) either is refused or is one the caller manages. Every
method found through reflection answers the role gate of service/policy.py.
"""
from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from nexus.identity.v1 import identity_pb2 as ipb
from sqlalchemy import create_engine, select

import db.domains  # noqa: F401 - every resource in the registry
from db.engine import rules as row_rules
from db.engine.resource import REGISTRY, ResourceSpec
from service import policy as rpc_policy
from tests.conftest import Client, connect, unique
from tests.support import MADE, SAMPLES, make_row, new_user, rich_error
from tests.test_auth import call_empty, discovered_methods

Code = grpc.StatusCode
# Every writable resource; its rows made by make_row (a File's by an upload of its caller).
SPECS = MADE
ROLE_NAMES = {ipb.USER_ROLE_GUEST: "guest", ipb.USER_ROLE_USER: "user", ipb.USER_ROLE_MANAGER: "manager"}
# label: (role, acts for a user)
CALLERS = {
    "guest": (ipb.USER_ROLE_GUEST, True),
    "user": (ipb.USER_ROLE_USER, True),
    "manager": (ipb.USER_ROLE_MANAGER, True),
    "key without a user (user)": (ipb.USER_ROLE_USER, False),
    "key without a user (guest)": (ipb.USER_ROLE_GUEST, False),
}


@dataclass
class Caller:
    label: str
    role: str
    user_id: str | None
    c: Client
    secret: str


@pytest.fixture(scope="module")
def callers(client: Client) -> Iterator[dict[str, Caller]]:
    made = {}
    for label, (role, with_user) in CALLERS.items():
        user_id = new_user(client, role=role).id if with_user else ""
        key = client.identity.CreateApiKey(
            ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("matrix"), role=role, user_id=user_id))
        )
        c = connect(client.backend, client.database_url, client.server, secret=key.secret)
        made[label] = Caller(label, ROLE_NAMES[role], user_id or None, c, key.secret)
    yield made
    for caller in made.values():
        caller.c.channel.close()


@pytest.fixture(scope="module")
def rules(client: Client) -> Iterator[Any]:
    """rules(spec, row id, caller) -> (sees, manages) by the declared predicates, in the database."""
    engine = create_engine(client.database_url)

    def holds(spec: ResourceSpec, row_id: str, predicate: Any) -> bool:
        stmt = select(spec.table.c.id).where(spec.table.c.id == uuid.UUID(row_id))
        if predicate is not None:
            stmt = stmt.where(predicate)
        with engine.connect() as conn:
            return conn.execute(stmt).first() is not None

    def evaluate(spec: ResourceSpec, row_id: str, caller: Caller, deletes: bool = False) -> tuple[bool, bool]:
        """(sees, manages), or with deletes (sees, may delete)."""
        user = uuid.UUID(caller.user_id) if caller.user_id else None
        writes = row_rules.delete_predicate if deletes else row_rules.manage_predicate
        return (
            holds(spec, row_id, row_rules.read_predicate(spec, caller.role, user)),
            holds(spec, row_id, writes(spec, caller.role, user)),
        )

    yield evaluate
    engine.dispose()


class Calls:
    """The standard methods of one resource by name, on one caller's channel."""

    def __init__(self, c: Client, spec: ResourceSpec) -> None:
        self.spec = spec
        self.pb = sys.modules[spec.message.__module__]
        self.stub = c.stub_for(SAMPLES[spec.name].service)

    def __call__(self, method: str, **fields: Any) -> Any:
        name = method.replace("{E}", self.spec.name).replace("{Es}", self.spec.plural)
        return getattr(self.stub, name)(getattr(self.pb, f"{name}Request")(**fields))

    def code(self, method: str, **fields: Any) -> Code:
        try:
            self(method, **fields)
        except grpc.RpcError as exc:
            err = rich_error(exc)
            assert exc.code() not in (Code.INTERNAL, Code.UNKNOWN), err.message
            return exc.code()
        return Code.OK

    def items(self, response: Any) -> list[Any]:
        for fd in response.DESCRIPTOR.fields:
            if fd.is_repeated and fd.message_type is not None:
                found = list(getattr(response, fd.name))
                # Search results wrap the resource with its score.
                return [getattr(r, self.spec.singular_field) if not isinstance(r, self.spec.message) else r for r in found]
        raise AssertionError("no items field")


def _rows(client: Client, spec: ResourceSpec, caller: Caller) -> list[tuple[str, Any, str]]:
    """(word, row, how) made by an admin: the sample as it is, owned by the caller where it can
    be, and given to the caller by each of the sample's grants (a document shared with them at
    each level)."""
    sample = SAMPLES[spec.name]
    out = []
    variants: list[tuple[dict[str, Any], str]] = [({}, "other"), *([(sample.restricted, "other, restricted")] if sample.restricted else [])]
    if spec.owner_field and caller.user_id:
        variants += [({**v, spec.owner_field: caller.user_id}, how.replace("other", "owned")) for v, how in variants]
    for extra, how in variants:
        word = unique("mx")
        fields = {**sample.fields(client, word), **extra}
        out.append((word, make_row(client, spec, fields), how))
    for how, (give, _) in sample.grants.items() if caller.user_id else ():
        word = unique("mx")
        row = make_row(client, spec, sample.fields(client, word))
        give(client, row, caller.user_id)
        out.append((word, row, how))
    return out


def _change(spec: ResourceSpec, row: Any) -> dict[str, Any]:
    field, value = SAMPLES[spec.name].change
    message = spec.message(id=row.id)
    setattr(message, field, value if value is not None else unique("changed"))
    return {spec.singular_field: message, "update_mask": {"paths": [field]}}


@pytest.fixture(params=[(s.name, label) for s in SPECS for label in CALLERS], ids="-".join)
def case(request: pytest.FixtureRequest, callers: dict[str, Caller]) -> tuple[ResourceSpec, Caller, Calls]:
    """A resource, a caller, and the resource's methods on the caller's channel."""
    resource, label = request.param
    return REGISTRY[resource], callers[label], Calls(callers[label].c, REGISTRY[resource])


def test_every_way_to_a_row_agrees_with_the_declared_rules(client: Client, rules: Any, case: tuple[ResourceSpec, Caller, Calls]) -> None:
    spec, caller, calls = case
    resource, label = spec.name, caller.label
    may_write = row_rules.ROLE_RANK[caller.role] >= row_rules.ROLE_RANK["user"]
    for word, row, how in _rows(client, spec, caller):
        sees, manages = rules(spec, row.id, caller)
        where = (resource, label, how)
        if how in SAMPLES[resource].grants and caller.role != "guest":
            # The declared rules say what the grant promises, before every way is held to them.
            _, promised = SAMPLES[resource].grants[how]
            assert (sees, manages, rules(spec, row.id, caller, deletes=True)[1]) == promised, where
        if caller.user_id is None:
            # A caller without a user has no more rights to a row than a stranger of its role:
            # rows whose owner is unset are nobody's.
            stranger = rules(spec, row.id, Caller("stranger", caller.role, str(uuid.uuid4()), caller.c, ""))
            assert (sees <= stranger[0], manages <= stranger[1]) == (True, True), (resource, label)
        assert calls.code("Get{E}", id=row.id) == (Code.OK if sees else Code.PERMISSION_DENIED), where
        if spec.batch_get:
            assert calls.code("BatchGet{Es}", ids=[row.id]) == (Code.OK if sees else Code.PERMISSION_DENIED), where
        listed = calls.items(calls("List{Es}", filter=SAMPLES[resource].filter_for(word), page_size=100))
        assert [r.id for r in listed] == ([row.id] if sees else []), where
        if spec.searchable:
            found = calls.items(calls("Search{Es}", query=word, page_size=100))
            assert (row.id in [r.id for r in found]) == sees, where
        expected_write = Code.OK if may_write and manages else Code.PERMISSION_DENIED
        if spec.update_rpc:
            assert calls.code("Update{E}", **_change(spec, row)) == expected_write, where
        deletes = rules(spec, row.id, caller, deletes=True)[1]
        assert calls.code("Delete{E}", id=row.id) == (Code.OK if may_write and deletes else Code.PERMISSION_DENIED), where


def test_a_create_is_refused_or_leaves_a_row_its_caller_manages(client: Client, rules: Any, case: tuple[ResourceSpec, Caller, Calls]) -> None:
    spec, caller, calls = case
    resource, label = spec.name, caller.label
    fields = SAMPLES[resource].fields(client, unique("mx"))
    fields.pop(spec.owner_field or "", None)  # the caller's own, by default
    try:
        made = make_row(caller.c, spec, fields)
    except grpc.RpcError as exc:
        err = rich_error(exc)
        # A caller without a user has no one to make the owner of a row that needs one.
        ownerless = caller.user_id is None and exc.code() == Code.INVALID_ARGUMENT and f".{spec.owner_field}:" in err.message
        assert exc.code() == Code.PERMISSION_DENIED or ownerless, (resource, label, err.message)
        return
    assert row_rules.ROLE_RANK[caller.role] >= row_rules.ROLE_RANK["user"], (resource, label)
    assert rules(spec, made.id, caller) == (True, True), (resource, label)


@pytest.mark.parametrize("label", list(CALLERS))
def test_every_method_answers_the_role_gate(client: Client, callers: dict[str, Caller], label: str) -> None:
    caller = callers[label]
    channel = grpc.insecure_channel(client.address)
    metadata = [("authorization", f"Bearer {caller.secret}")]
    try:
        for path, method in discovered_methods(client.address):
            allowed = row_rules.ROLE_RANK[caller.role] >= row_rules.ROLE_RANK[rpc_policy.action_for(path).value]
            code, reason = call_empty(channel, path, method, metadata)
            assert code not in (Code.UNAUTHENTICATED, Code.INTERNAL, Code.UNKNOWN), (path, label, code)
            assert (reason == "ROLE_FORBIDS_METHOD") == (not allowed), (path, label, code, reason)
    finally:
        channel.close()
