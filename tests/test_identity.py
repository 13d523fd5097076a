"""End-to-end tests of nexus.identity.v1.IdentityService: users, roles, API keys and the custom
methods, over a real channel, on SQLite and on PostgreSQL.

Every test makes its own data with unique names and scopes its queries to it: the database is
shared by the whole session.
"""
from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from nexus.identity.v1 import identity_pb2 as ipb

from tests.conftest import Client, unique
from tests.support import RichError, expect_error, mask, new_user

Code = grpc.StatusCode
PASSWORD = "correct horse battery staple"


# ------------------------------------------------------------------ helpers


def create_user(c: Client, **fields: Any) -> ipb.User:
    """CreateUser with a fresh unique username and e-mail unless given."""
    return new_user(c, **fields)


def user_request(**fields: Any) -> ipb.CreateUserRequest:
    name = unique("u")
    values: dict[str, Any] = {"username": name, "email": f"{name}@example.com"}
    values.update(fields)
    return ipb.CreateUserRequest(user=ipb.User(**values))


def new_role(c: Client, name: str | None = None) -> ipb.Role:
    return c.identity.CreateRole(ipb.CreateRoleRequest(role=ipb.Role(name=name or unique("role"), permissions=["work.tasks.read"])))


def timestamp(when: dt.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when)
    return ts


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def as_datetime(ts: timestamp_pb2.Timestamp) -> dt.datetime:
    return ts.ToDatetime(tzinfo=dt.UTC)


def names_field(err: RichError, field: str) -> bool:
    """Whether an error names `field` (or `user.field`...) in a violation or its ErrorInfo metadata."""
    named = [v.field for v in err.violations]
    named += err.info.metadata.get("fields", "").split(",")
    named.append(err.info.metadata.get("field", ""))
    return any(n == field or n.endswith("." + field) for n in named)


def violation_fields(err: RichError) -> list[str]:
    return [v.field for v in err.violations]


def assert_no_secret(response: Message, *secret_texts: str) -> None:
    """Neither the parsed users nor the raw bytes of a response carry a password or its hash."""
    raw = response.SerializeToString()
    for text in secret_texts:
        assert text.encode() not in raw, f"{text!r} leaked in {type(response).__name__}"
    assert b"$argon2" not in raw, f"a password hash leaked in {type(response).__name__}"
    for user in users_in(response):
        assert user.password == ""


def users_in(response: Message) -> list[ipb.User]:
    if isinstance(response, ipb.User):
        return [response]
    if isinstance(response, (ipb.ListUsersResponse, ipb.BatchGetUsersResponse)):
        return list(response.users)
    if isinstance(response, ipb.SearchUsersResponse):
        return [r.user for r in response.results]
    if isinstance(response, (ipb.EnsureUserResponse, ipb.AuthenticateUserResponse)):
        return [response.user]
    raise AssertionError(f"no users in {type(response).__name__}")


def usernames(c: Client, filter_text: str) -> set[str]:
    response = c.identity.ListUsers(ipb.ListUsersRequest(filter=filter_text, page_size=1000))
    assert not response.next_page_token
    return {u.username for u in response.users}


def authenticate(c: Client, login: str, password: str) -> ipb.AuthenticateUserResponse:
    return c.identity.AuthenticateUser(ipb.AuthenticateUserRequest(login=login, password=password))


# ------------------------------------------------------------------ CreateUser


def test_create_user_duplicate_username_is_already_exists(client: Client) -> None:
    first = create_user(client)
    err = expect_error(Code.ALREADY_EXISTS, client.identity.CreateUser, user_request(username=first.username))
    assert names_field(err, "username"), err


def test_create_user_duplicate_email_is_already_exists_ignoring_case(client: Client) -> None:
    name = unique("u")
    create_user(client, email=f"{name}@example.com")
    err = expect_error(Code.ALREADY_EXISTS, client.identity.CreateUser, user_request(email=f"{name.upper()}@Example.COM"))
    assert names_field(err, "email"), err


def test_create_user_lower_cases_email(client: Client) -> None:
    name = unique("u")
    user = create_user(client, email=f"  {name.upper()}@Example.COM ")
    assert user.email == f"{name}@example.com"


def test_update_user_email_to_another_users_in_other_case_is_already_exists(client: Client) -> None:
    taken = create_user(client)
    user = create_user(client)
    err = expect_error(
        Code.ALREADY_EXISTS,
        client.identity.UpdateUser,
        ipb.UpdateUserRequest(user=ipb.User(id=user.id, email=taken.email.upper()), update_mask=mask("email")),
    )
    assert names_field(err, "email"), err
    assert client.identity.GetUser(ipb.GetUserRequest(id=user.id)).email == user.email


def test_create_user_duplicate_external_id_is_already_exists(client: Client) -> None:
    external_id = unique("ext")
    create_user(client, external_id=external_id)
    err = expect_error(Code.ALREADY_EXISTS, client.identity.CreateUser, user_request(external_id=external_id))
    assert names_field(err, "external_id"), err


@pytest.mark.parametrize(
    "field,value",
    [
        ("username", "ab"),
        ("username", "has space"),
        ("username", "x" * 65),
        ("email", "not-an-email"),
        ("email", "two@@example.com"),
        ("avatar_url", "ftp://example.com/a.png"),
        ("avatar_url", "javascript:alert(1)"),
        ("password", "short"),
    ],
)
def test_create_user_invalid_field_is_invalid_argument(client: Client, field: str, value: str) -> None:
    err = expect_error(Code.INVALID_ARGUMENT, client.identity.CreateUser, user_request(**{field: value}))
    assert f"user.{field}" in violation_fields(err), err


def test_create_user_invalid_request_creates_nothing(client: Client) -> None:
    request = user_request(password="short")
    expect_error(Code.INVALID_ARGUMENT, client.identity.CreateUser, request)
    assert usernames(client, f'username = "{request.user.username}"') == set()


def test_create_user_defaults(client: Client) -> None:
    user = client.identity.CreateUser(user_request(is_verified=True))  # output only: ignored
    assert user.role == ipb.USER_ROLE_USER
    assert user.HasField("is_active") and user.is_active is True
    assert user.is_verified is False
    assert not user.HasField("last_login_time")
    assert not user.HasField("delete_time")
    assert list(user.role_names) == []


def test_create_user_keeps_explicit_is_active_false(client: Client) -> None:
    user = client.identity.CreateUser(user_request(is_active=False))
    assert user.HasField("is_active") and user.is_active is False
    fetched = client.identity.GetUser(ipb.GetUserRequest(id=user.id))
    assert fetched.HasField("is_active") and fetched.is_active is False


def test_create_user_keeps_explicit_role(client: Client) -> None:
    user = client.identity.CreateUser(user_request(role=ipb.USER_ROLE_GUEST))
    assert user.role == ipb.USER_ROLE_GUEST


# ------------------------------------------------------------------ the password is write-only


def _leak_calls() -> dict[str, Callable[[Client, ipb.User, str], list[Message]]]:
    """Every method that returns users, called on a user whose password is PASSWORD."""

    def create(c: Client, u: ipb.User, p: str) -> list[Message]:
        return [u]

    def get(c: Client, u: ipb.User, p: str) -> list[Message]:
        return [c.identity.GetUser(ipb.GetUserRequest(id=u.id)), c.identity.GetUser(ipb.GetUserRequest(id=u.id, read_mask=mask("password", "username")))]

    def list_(c: Client, u: ipb.User, p: str) -> list[Message]:
        return [c.identity.ListUsers(ipb.ListUsersRequest(filter=f'username = "{u.username}"'))]

    def search(c: Client, u: ipb.User, p: str) -> list[Message]:
        response = c.identity.SearchUsers(ipb.SearchUsersRequest(query=u.username))
        assert u.id in [r.user.id for r in response.results]
        return [response]

    def batch_get(c: Client, u: ipb.User, p: str) -> list[Message]:
        return [c.identity.BatchGetUsers(ipb.BatchGetUsersRequest(ids=[u.id]))]

    def update(c: Client, u: ipb.User, p: str) -> list[Message]:
        return [
            c.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=u.id, full_name="Renamed"), update_mask=mask("full_name"))),
            c.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=u.id, password=p), update_mask=mask("password"))),
        ]

    def lookup(c: Client, u: ipb.User, p: str) -> list[Message]:
        return [c.identity.LookupUser(ipb.LookupUserRequest(email=u.email)), c.identity.LookupUser(ipb.LookupUserRequest(username=u.username))]

    def ensure(c: Client, u: ipb.User, p: str) -> list[Message]:
        ext = unique("ext")
        name = unique("u")
        user = ipb.User(external_id=ext, username=name, email=f"{name}@example.com", password=p)
        first = c.identity.EnsureUser(ipb.EnsureUserRequest(user=user))
        second = c.identity.EnsureUser(ipb.EnsureUserRequest(user=user))
        assert first.created and not second.created
        return [first, second]

    def authenticate_(c: Client, u: ipb.User, p: str) -> list[Message]:
        response = authenticate(c, u.username, p)
        assert response.authenticated
        return [response]

    def verify(c: Client, u: ipb.User, p: str) -> list[Message]:
        return [c.identity.VerifyUserEmail(ipb.VerifyUserEmailRequest(id=u.id))]

    def delete_undelete(c: Client, u: ipb.User, p: str) -> list[Message]:
        return [c.identity.DeleteUser(ipb.DeleteUserRequest(id=u.id)), c.identity.UndeleteUser(ipb.UndeleteUserRequest(id=u.id))]

    return {
        "CreateUser": create,
        "GetUser": get,
        "ListUsers": list_,
        "SearchUsers": search,
        "BatchGetUsers": batch_get,
        "UpdateUser": update,
        "LookupUser": lookup,
        "EnsureUser": ensure,
        "AuthenticateUser": authenticate_,
        "VerifyUserEmail": verify,
        "DeleteUser+UndeleteUser": delete_undelete,
    }


LEAK_CALLS = _leak_calls()


@pytest.mark.parametrize("method", sorted(LEAK_CALLS))
def test_password_never_appears_in_responses(client: Client, method: str) -> None:
    user = create_user(client, password=PASSWORD)
    responses = LEAK_CALLS[method](client, user, PASSWORD)
    assert responses
    for response in responses:
        assert_no_secret(response, PASSWORD)


# ------------------------------------------------------------------ LookupUser


def test_lookup_user_by_email_in_any_case(client: Client) -> None:
    user = create_user(client)
    local, domain = user.email.split("@")
    for email in (user.email, user.email.upper(), f"{local.upper()}@{domain}", f" {user.email} "):
        found = client.identity.LookupUser(ipb.LookupUserRequest(email=email))
        assert found.id == user.id, email


def test_lookup_user_by_username(client: Client) -> None:
    user = create_user(client)
    create_user(client)  # another user, not to be returned
    assert client.identity.LookupUser(ipb.LookupUserRequest(username=user.username)).id == user.id


def test_lookup_user_by_external_id(client: Client) -> None:
    user = create_user(client, external_id=unique("ext"))
    assert client.identity.LookupUser(ipb.LookupUserRequest(external_id=user.external_id)).id == user.id


def test_lookup_user_without_key_is_invalid_argument(client: Client) -> None:
    expect_error(Code.INVALID_ARGUMENT, client.identity.LookupUser, ipb.LookupUserRequest())


@pytest.mark.parametrize("key", ["email", "username", "external_id"])
def test_lookup_unknown_user_is_not_found(client: Client, key: str) -> None:
    value = f"{unique('nobody')}@example.com" if key == "email" else unique("nobody")
    err = expect_error(Code.NOT_FOUND, client.identity.LookupUser, ipb.LookupUserRequest(**{key: value}))
    assert err.resource is not None and err.resource.resource_type == "User"


@pytest.mark.parametrize("key", ["email", "username", "external_id"])
def test_lookup_soft_deleted_user_is_not_found(client: Client, key: str) -> None:
    user = create_user(client, external_id=unique("ext"))
    client.identity.DeleteUser(ipb.DeleteUserRequest(id=user.id))
    err = expect_error(Code.NOT_FOUND, client.identity.LookupUser, ipb.LookupUserRequest(**{key: getattr(user, key)}))
    assert err.resource is not None and err.resource.resource_type == "User"


# ------------------------------------------------------------------ EnsureUser


def test_ensure_user_creates_then_finds(client: Client) -> None:
    ext = unique("ext")
    name = unique("u")
    first = client.identity.EnsureUser(
        ipb.EnsureUserRequest(user=ipb.User(external_id=ext, username=name, email=f"{name}@example.com", full_name="First"))
    )
    assert first.created is True
    assert first.user.id and first.user.external_id == ext and first.user.full_name == "First"

    other = unique("u")
    second = client.identity.EnsureUser(
        ipb.EnsureUserRequest(user=ipb.User(external_id=ext, username=other, email=f"{other}@example.com", full_name="Second"))
    )
    assert second.created is False
    assert second.user.id == first.user.id
    assert second.user.username == name and second.user.full_name == "First"  # found, not changed
    assert usernames(client, f'username = "{other}"') == set()


def test_ensure_user_without_external_id_is_invalid_argument(client: Client) -> None:
    name = unique("u")
    err = expect_error(
        Code.INVALID_ARGUMENT,
        client.identity.EnsureUser,
        ipb.EnsureUserRequest(user=ipb.User(username=name, email=f"{name}@example.com")),
    )
    assert "user.external_id" in violation_fields(err)
    assert usernames(client, f'username = "{name}"') == set()


def test_ensure_user_with_taken_username_is_already_exists(client: Client) -> None:
    """A new external_id whose username is taken cannot be created: that is ALREADY_EXISTS, not a
    transient conflict a client would retry forever."""
    taken = create_user(client)
    err = expect_error(
        Code.ALREADY_EXISTS,
        client.identity.EnsureUser,
        ipb.EnsureUserRequest(user=ipb.User(external_id=unique("ext"), username=taken.username, email=f"{unique('u')}@example.com")),
    )
    assert names_field(err, "username"), err


def test_ensure_soft_deleted_user_is_failed_precondition(client: Client) -> None:
    user = create_user(client, external_id=unique("ext"))
    client.identity.DeleteUser(ipb.DeleteUserRequest(id=user.id))
    err = expect_error(Code.FAILED_PRECONDITION, client.identity.EnsureUser, ipb.EnsureUserRequest(user=ipb.User(external_id=user.external_id)))
    assert err.info.metadata["resource_id"] == user.id


def test_ensure_user_concurrently_creates_exactly_one(client: Client) -> None:
    ext = unique("ext")
    name = unique("u")
    user = ipb.User(external_id=ext, username=name, email=f"{name}@example.com")
    threads = 8
    barrier = threading.Barrier(threads)

    def ensure(_: int) -> ipb.EnsureUserResponse:
        barrier.wait(10)
        return client.identity.EnsureUser(ipb.EnsureUserRequest(user=user), timeout=30)

    with ThreadPoolExecutor(threads) as pool:
        responses = list(pool.map(ensure, range(threads)))

    assert sum(r.created for r in responses) == 1
    assert len({r.user.id for r in responses}) == 1
    assert usernames(client, f'username = "{name}"') == {name}


# ------------------------------------------------------------------ AuthenticateUser


def test_authenticate_with_right_password(client: Client) -> None:
    user = create_user(client, password=PASSWORD)
    before = now() - dt.timedelta(seconds=5)
    response = authenticate(client, user.username, PASSWORD)
    assert response.authenticated is True
    assert response.user.id == user.id
    assert response.user.HasField("last_login_time")
    assert before <= as_datetime(response.user.last_login_time) <= now() + dt.timedelta(seconds=5)
    fetched = client.identity.GetUser(ipb.GetUserRequest(id=user.id))
    assert fetched.last_login_time == response.user.last_login_time


def test_authenticate_by_email_in_any_case(client: Client) -> None:
    user = create_user(client, password=PASSWORD)
    response = authenticate(client, user.email.upper(), PASSWORD)
    assert response.authenticated is True and response.user.id == user.id


def test_authenticate_with_wrong_password(client: Client) -> None:
    user = create_user(client, password=PASSWORD)
    response = authenticate(client, user.username, PASSWORD + "!")
    assert response.authenticated is False
    assert not response.HasField("user")
    assert not client.identity.GetUser(ipb.GetUserRequest(id=user.id)).HasField("last_login_time")


def test_authenticate_unknown_login(client: Client) -> None:
    response = authenticate(client, unique("nobody"), PASSWORD)
    assert response.authenticated is False
    assert not response.HasField("user")


def test_authenticate_inactive_user(client: Client) -> None:
    user = create_user(client, password=PASSWORD, is_active=False)
    response = authenticate(client, user.username, PASSWORD)
    assert response.authenticated is False
    assert not response.HasField("user")


def test_authenticate_user_without_password(client: Client) -> None:
    user = create_user(client)
    response = authenticate(client, user.username, PASSWORD)
    assert response.authenticated is False and not response.HasField("user")


def test_authenticate_soft_deleted_user(client: Client) -> None:
    user = create_user(client, password=PASSWORD)
    client.identity.DeleteUser(ipb.DeleteUserRequest(id=user.id))
    response = authenticate(client, user.username, PASSWORD)
    assert response.authenticated is False and not response.HasField("user")


@pytest.mark.parametrize("field", ["login", "password"])
def test_authenticate_without_login_or_password_is_invalid_argument(client: Client, field: str) -> None:
    request = ipb.AuthenticateUserRequest(login="someone", password=PASSWORD)
    request.ClearField(field)
    err = expect_error(Code.INVALID_ARGUMENT, client.identity.AuthenticateUser, request)
    assert field in violation_fields(err)


def test_update_password_replaces_the_old_one(client: Client) -> None:
    user = create_user(client, password=PASSWORD)
    new_password = "a brand new passphrase"
    updated = client.identity.UpdateUser(
        ipb.UpdateUserRequest(user=ipb.User(id=user.id, password=new_password), update_mask=mask("password"))
    )
    assert_no_secret(updated, new_password, PASSWORD)
    assert authenticate(client, user.username, new_password).authenticated is True
    assert authenticate(client, user.username, PASSWORD).authenticated is False


def test_update_password_too_short_is_invalid_argument(client: Client) -> None:
    user = create_user(client, password=PASSWORD)
    err = expect_error(
        Code.INVALID_ARGUMENT,
        client.identity.UpdateUser,
        ipb.UpdateUserRequest(user=ipb.User(id=user.id, password="short"), update_mask=mask("password")),
    )
    assert "user.password" in violation_fields(err)
    assert authenticate(client, user.username, PASSWORD).authenticated is True


# ------------------------------------------------------------------ VerifyUserEmail


def test_verify_user_email_sets_is_verified_idempotently(client: Client) -> None:
    user = create_user(client)
    first = client.identity.VerifyUserEmail(ipb.VerifyUserEmailRequest(id=user.id))
    assert first.is_verified is True
    second = client.identity.VerifyUserEmail(ipb.VerifyUserEmailRequest(id=user.id))
    assert second.is_verified is True
    assert second.etag == first.etag  # nothing changed the second time
    assert client.identity.GetUser(ipb.GetUserRequest(id=user.id)).is_verified is True


def test_verify_unknown_user_is_not_found(client: Client) -> None:
    user = create_user(client)
    client.identity.DeleteUser(ipb.DeleteUserRequest(id=user.id, force=True))
    err = expect_error(Code.NOT_FOUND, client.identity.VerifyUserEmail, ipb.VerifyUserEmailRequest(id=user.id))
    assert err.resource is not None and err.resource.resource_type == "User"


def test_is_verified_is_output_only(client: Client) -> None:
    user = create_user(client)
    err = expect_error(
        Code.INVALID_ARGUMENT,
        client.identity.UpdateUser,
        ipb.UpdateUserRequest(user=ipb.User(id=user.id, is_verified=True), update_mask=mask("is_verified")),
    )
    assert "update_mask" in violation_fields(err)
    assert client.identity.GetUser(ipb.GetUserRequest(id=user.id)).is_verified is False


# ------------------------------------------------------------------ roles


def test_assign_role_adds_role_name_once(client: Client) -> None:
    user = create_user(client)
    role = new_role(client)
    assigned = client.identity.AssignRole(ipb.AssignRoleRequest(user_id=user.id, role_id=role.id))
    assert list(assigned.role_names) == [role.name]
    again = client.identity.AssignRole(ipb.AssignRoleRequest(user_id=user.id, role_id=role.id))
    assert list(again.role_names) == [role.name]
    assert list(client.identity.GetUser(ipb.GetUserRequest(id=user.id)).role_names) == [role.name]


def test_assign_two_roles_lists_both(client: Client) -> None:
    user = create_user(client)
    a, b = new_role(client), new_role(client)
    client.identity.AssignRole(ipb.AssignRoleRequest(user_id=user.id, role_id=a.id))
    both = client.identity.AssignRole(ipb.AssignRoleRequest(user_id=user.id, role_id=b.id))
    assert sorted(both.role_names) == sorted([a.name, b.name])


def test_revoke_role_removes_it(client: Client) -> None:
    user = create_user(client)
    kept, revoked = new_role(client), new_role(client)
    client.identity.AssignRole(ipb.AssignRoleRequest(user_id=user.id, role_id=kept.id))
    client.identity.AssignRole(ipb.AssignRoleRequest(user_id=user.id, role_id=revoked.id))
    after = client.identity.RevokeRole(ipb.RevokeRoleRequest(user_id=user.id, role_id=revoked.id))
    assert list(after.role_names) == [kept.name]
    again = client.identity.RevokeRole(ipb.RevokeRoleRequest(user_id=user.id, role_id=revoked.id))
    assert list(again.role_names) == [kept.name]
    assert list(client.identity.GetUser(ipb.GetUserRequest(id=user.id)).role_names) == [kept.name]


@pytest.mark.parametrize("method", ["AssignRole", "RevokeRole"])
def test_role_methods_with_unknown_user_are_not_found(client: Client, method: str) -> None:
    role = new_role(client)
    gone = create_user(client)
    client.identity.DeleteUser(ipb.DeleteUserRequest(id=gone.id, force=True))
    request = getattr(ipb, f"{method}Request")(user_id=gone.id, role_id=role.id)
    err = expect_error(Code.NOT_FOUND, getattr(client.identity, method), request)
    assert err.info.metadata["field"] == "user_id"
    assert err.resource is not None and err.resource.resource_type == "User"


@pytest.mark.parametrize("method", ["AssignRole", "RevokeRole"])
def test_role_methods_with_unknown_role_are_not_found(client: Client, method: str) -> None:
    user = create_user(client)
    gone = new_role(client)
    client.identity.DeleteRole(ipb.DeleteRoleRequest(id=gone.id))
    request = getattr(ipb, f"{method}Request")(user_id=user.id, role_id=gone.id)
    err = expect_error(Code.NOT_FOUND, getattr(client.identity, method), request)
    assert err.info.metadata["field"] == "role_id"
    assert err.resource is not None and err.resource.resource_type == "Role"
    assert list(client.identity.GetUser(ipb.GetUserRequest(id=user.id)).role_names) == []


def test_duplicate_role_name_is_already_exists(client: Client) -> None:
    role = new_role(client)
    err = expect_error(Code.ALREADY_EXISTS, client.identity.CreateRole, ipb.CreateRoleRequest(role=ipb.Role(name=role.name)))
    assert names_field(err, "name"), err


def test_deleting_a_role_takes_it_from_its_users(client: Client) -> None:
    user = create_user(client)
    role = new_role(client)
    client.identity.AssignRole(ipb.AssignRoleRequest(user_id=user.id, role_id=role.id))
    client.identity.DeleteRole(ipb.DeleteRoleRequest(id=role.id))
    assert list(client.identity.GetUser(ipb.GetUserRequest(id=user.id)).role_names) == []


# ------------------------------------------------------------------ API keys


def create_api_key(c: Client, **fields: Any) -> ipb.ApiKey:
    values: dict[str, Any] = {"name": unique("key"), "role": ipb.USER_ROLE_USER}
    values.update(fields)
    return c.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(**values)))


def test_create_api_key_returns_secret_once(client: Client) -> None:
    user = create_user(client)
    key = create_api_key(client, user_id=user.id, expire_time=timestamp(now() + dt.timedelta(days=1)))
    assert key.key_prefix
    assert key.secret.startswith(key.key_prefix)
    assert len(key.secret) > len(key.key_prefix) + 16
    assert key.user_id == user.id
    fetched = client.identity.GetApiKey(ipb.GetApiKeyRequest(id=key.id))
    assert fetched.key_prefix == key.key_prefix
    assert fetched.secret == ""
    assert key.secret.encode() not in fetched.SerializeToString()


def test_api_key_secrets_differ(client: Client) -> None:
    a, b = create_api_key(client), create_api_key(client)
    assert a.secret != b.secret and a.key_prefix != b.key_prefix


def test_list_api_keys_never_returns_the_secret(client: Client) -> None:
    user = create_user(client)
    keys = [create_api_key(client, user_id=user.id) for _ in range(3)]
    response = client.identity.ListApiKeys(ipb.ListApiKeysRequest(filter=f'user_id = "{user.id}"'))
    assert sorted(k.id for k in response.api_keys) == sorted(k.id for k in keys)
    raw = response.SerializeToString()
    for listed in response.api_keys:
        assert listed.secret == ""
        assert listed.key_prefix
    for key in keys:
        assert key.secret.encode() not in raw
        # Not even the random part after the prefix.
        assert key.secret.split(".", 1)[1].encode() not in raw
    assert b"$argon2" not in raw


def test_create_api_key_repeated_request_id_does_not_return_secret_again(client: Client) -> None:
    request = ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("key")), request_id=unique("req"))
    first = client.identity.CreateApiKey(request)
    second = client.identity.CreateApiKey(request)
    assert second.id == first.id
    assert first.secret and second.secret == ""


def test_revoke_api_key_is_idempotent(client: Client) -> None:
    key = create_api_key(client)
    assert not key.HasField("revoke_time")
    revoked = client.identity.RevokeApiKey(ipb.RevokeApiKeyRequest(id=key.id))
    assert revoked.HasField("revoke_time")
    assert abs(as_datetime(revoked.revoke_time) - now()) < dt.timedelta(minutes=1)
    assert revoked.secret == ""
    again = client.identity.RevokeApiKey(ipb.RevokeApiKeyRequest(id=key.id))
    assert again.revoke_time == revoked.revoke_time
    assert again.etag == revoked.etag
    assert client.identity.GetApiKey(ipb.GetApiKeyRequest(id=key.id)).revoke_time == revoked.revoke_time


def test_revoke_unknown_api_key_is_not_found(client: Client) -> None:
    key = create_api_key(client)
    client.identity.DeleteApiKey(ipb.DeleteApiKeyRequest(id=key.id))
    expect_error(Code.NOT_FOUND, client.identity.RevokeApiKey, ipb.RevokeApiKeyRequest(id=key.id))


def test_api_key_expire_time_in_the_past_is_invalid_argument(client: Client) -> None:
    name = unique("key")
    err = expect_error(
        Code.INVALID_ARGUMENT,
        client.identity.CreateApiKey,
        ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=name, expire_time=timestamp(now() - dt.timedelta(hours=1)))),
    )
    assert "api_key.expire_time" in violation_fields(err)
    listed = client.identity.ListApiKeys(ipb.ListApiKeysRequest(filter=f'name = "{name}"'))
    assert list(listed.api_keys) == []


def test_api_key_for_missing_user_is_not_found(client: Client) -> None:
    gone = create_user(client)
    client.identity.DeleteUser(ipb.DeleteUserRequest(id=gone.id, force=True))
    err = expect_error(
        Code.NOT_FOUND,
        client.identity.CreateApiKey,
        ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("key"), user_id=gone.id)),
    )
    assert err.info.metadata["field"] == "api_key.user_id"
    assert err.resource is not None and err.resource.resource_type == "User"


def test_api_key_for_soft_deleted_user_is_not_found(client: Client) -> None:
    user = create_user(client)
    client.identity.DeleteUser(ipb.DeleteUserRequest(id=user.id))
    err = expect_error(
        Code.NOT_FOUND,
        client.identity.CreateApiKey,
        ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("key"), user_id=user.id)),
    )
    assert err.info.metadata["field"] == "api_key.user_id"


def test_api_key_user_id_is_immutable(client: Client) -> None:
    key = create_api_key(client, user_id=create_user(client).id)
    other = create_user(client)
    err = expect_error(
        Code.INVALID_ARGUMENT,
        client.identity.UpdateApiKey,
        ipb.UpdateApiKeyRequest(api_key=ipb.ApiKey(id=key.id, user_id=other.id), update_mask=mask("user_id")),
    )
    assert "update_mask" in violation_fields(err)


# ------------------------------------------------------------------ filters on users


@pytest.fixture
def people(client: Client) -> tuple[str, dict[str, ipb.User]]:
    """Five users sharing a unique username prefix, with distinct roles, flags, prefs and e-mails."""
    prefix = unique("f")

    def prefs(theme: str) -> struct_pb2.Struct:
        return struct_pb2.Struct(fields={"theme": struct_pb2.Value(string_value=theme)})

    specs = {
        "admin_dark": dict(role=ipb.USER_ROLE_ADMIN, preferences=prefs("dark"), email_domain="example.com"),
        "admin_off": dict(role=ipb.USER_ROLE_ADMIN, is_active=False, preferences=prefs("light"), email_domain="corp.test"),
        "user_dark": dict(role=ipb.USER_ROLE_USER, preferences=prefs("dark"), email_domain="corp.test"),
        "user_off": dict(role=ipb.USER_ROLE_USER, is_active=False, email_domain="example.org"),
        "guest": dict(role=ipb.USER_ROLE_GUEST, preferences=prefs("DARK"), email_domain="mail.test"),
    }
    users = {}
    for key, fields in specs.items():
        fields = dict(fields)
        name = f"{prefix}_{key}"
        domain = fields.pop("email_domain")
        users[key] = create_user(client, username=name, email=f"{name}@{domain}", **fields)
    return prefix, users


def scoped(prefix: str, expression: str) -> str:
    return f'username = "{prefix}_*" AND ({expression})'


def names_of(prefix: str, *keys: str) -> set[str]:
    return {f"{prefix}_{k}" for k in keys}


FILTER_CASES = [
    ("role = ADMIN", ("admin_dark", "admin_off")),
    ("role = USER_ROLE_GUEST", ("guest",)),
    ("role != ADMIN", ("user_dark", "user_off", "guest")),
    ("is_active = false", ("admin_off", "user_off")),
    ("is_active = true", ("admin_dark", "user_dark", "guest")),
    ('preferences.theme = "dark"', ("admin_dark", "user_dark")),
    ('email:"example"', ("admin_dark", "user_off")),
    ('email:"EXAMPLE"', ("admin_dark", "user_off")),
    ('role = ADMIN AND preferences.theme = "dark"', ("admin_dark",)),
    ("role = ADMIN OR is_active = false", ("admin_dark", "admin_off", "user_off")),
    ('role = USER AND is_active = true AND email:"corp"', ("user_dark",)),
    ('(role = ADMIN OR role = GUEST) AND NOT email:"example"', ("admin_off", "guest")),
    ('preferences.theme = "dark" OR is_active = false', ("admin_dark", "user_dark", "admin_off", "user_off")),
    ("preferences.theme = null", ("user_off",)),
]


@pytest.mark.parametrize("expression,expected", FILTER_CASES, ids=[c[0] for c in FILTER_CASES])
def test_user_filters(client: Client, people: tuple[str, dict[str, ipb.User]], expression: str, expected: tuple[str, ...]) -> None:
    prefix, _ = people
    assert usernames(client, scoped(prefix, expression)) == names_of(prefix, *expected)


def test_user_filter_prefix_alone_scopes_exactly(client: Client, people: tuple[str, dict[str, ipb.User]]) -> None:
    prefix, users = people
    assert usernames(client, f'username = "{prefix}_*"') == {u.username for u in users.values()}


def test_user_filter_excludes_soft_deleted(client: Client, people: tuple[str, dict[str, ipb.User]]) -> None:
    prefix, users = people
    client.identity.DeleteUser(ipb.DeleteUserRequest(id=users["admin_dark"].id))
    assert usernames(client, scoped(prefix, "role = ADMIN")) == names_of(prefix, "admin_off")
    shown = client.identity.ListUsers(ipb.ListUsersRequest(filter=scoped(prefix, "role = ADMIN"), show_deleted=True))
    assert {u.username for u in shown.users} == names_of(prefix, "admin_dark", "admin_off")


def test_user_filter_with_unknown_enum_value_is_invalid_argument(client: Client) -> None:
    err = expect_error(Code.INVALID_ARGUMENT, client.identity.ListUsers, ipb.ListUsersRequest(filter="role = SUPERUSER"))
    assert "filter" in violation_fields(err)


def test_user_filter_on_password_is_not_allowed(client: Client) -> None:
    err = expect_error(Code.INVALID_ARGUMENT, client.identity.ListUsers, ipb.ListUsersRequest(filter='password = "x"'))
    assert "filter" in violation_fields(err)
