"""Users moved in, at their limits, end to end over a real channel, on SQLite and on PostgreSQL:
the cost a ready password hash may ask of a login, and the usernames EnsureUser derives from
external ids (which anyone who may name a user can take first).

A ready hash is checked only once, when it is written; every login then pays what it asks for,
on a database thread and inside a transaction. A hash whose cost no deployment ever used (bcrypt
cost 31: 2^31 rounds, days of one core; argon2id with t=2^32-1 or terabytes of memory) is a
denial of service waiting for its first login attempt, by anyone who knows the username.

Every test makes its own data with unique names: all the tests of a run share one database of each kind.
"""
from __future__ import annotations

from typing import Any

import grpc
import pytest
from nexus.identity.v1 import identity_pb2 as ipb

from tests.conftest import Client, unique
from tests.support import expect_error, mask, new_user
from tests.test_identity_moving_in import SCOPE, argon2id_hash, caller, derived, ensure, stored_hash  # noqa: F401 - caller is a fixture

Code = grpc.StatusCode
PASSWORD = "moved in with this password"
SALT_AND_HASH = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0"[:53]


def _argon2id_with(parameters: str) -> str:
    """A well-formed argon2id hash (salt and hash of a real one) whose parameters are `parameters`."""
    real = argon2id_hash(PASSWORD)
    _, name, version, _, salt, digest = real.split("$")
    return "$".join(("", name, version, parameters, salt, digest))


# What a single login would cost with each of these (the bcrypt cost is log2 of its rounds).
ABSURD = {
    "bcrypt cost 31 (2^31 rounds: days of a core per login)": "$2b$31$" + SALT_AND_HASH,
    "bcrypt cost 24 (minutes of a core per login)": "$2b$24$" + SALT_AND_HASH,
    "argon2id t=4294967295 (years of a core per login)": _argon2id_with("m=1024,t=4294967295,p=1"),
    "argon2id m=4194304 (4 GiB of memory per login)": _argon2id_with("m=4194304,t=1,p=1"),
    "argon2id m=9999999999 (10 TB of memory per login)": _argon2id_with("m=9999999999,t=1,p=1"),
}


@pytest.mark.parametrize("absurd", list(ABSURD.values()), ids=list(ABSURD))
def test_a_ready_hash_whose_cost_would_stall_a_login_is_refused_at_write_time(client: Client, absurd: str) -> None:
    """Not logged in with here: the login would hold a database thread (and a core, or the
    memory) of the test server for as long as the description says."""
    name = unique("u")
    try:
        made = client.identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(username=name, password_hash=absurd)))
    except grpc.RpcError:
        made = None
    assert made is None, f"CreateUser took the ready hash {absurd[:40]}...: the first AuthenticateUser of {name!r} would run its cost"
    err = expect_error(Code.INVALID_ARGUMENT, client.identity.CreateUser, ipb.CreateUserRequest(user=ipb.User(username=unique("u"), password_hash=absurd)))
    assert [v.field for v in err.violations] == ["user.password_hash"]
    user = new_user(client)
    err = expect_error(
        Code.INVALID_ARGUMENT, client.identity.UpdateUser,
        ipb.UpdateUserRequest(user=ipb.User(id=user.id, password_hash=absurd), update_mask=mask("password_hash")),
    )
    assert [v.field for v in err.violations] == ["user.password_hash"]
    assert stored_hash(client, user.id) is None


# ------------------------------------------------------------------ derived usernames taken first


def test_a_user_renaming_itself_to_a_derived_username_does_not_lock_out_that_external_id(client: Client, caller: Any) -> None:
    """Usernames of users moved in are `ext-` and 16 hex digits of a public function of the
    external id: a plain user who guesses an external id the migration will bring in (an e-mail
    address, an employee number) renames itself first, and EnsureUser for that id fails for good."""
    person = new_user(client)
    _, own = caller(ipb.USER_ROLE_USER, user_id=person.id)
    coming = unique("employee")
    with pytest.raises(grpc.RpcError) as refused:  # the derived form is reserved for its own external id
        own.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=person.id, username=derived(coming)), update_mask=mask("username")))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user.username" in (refused.value.details() or "")
    made = ensure(client, external_id=coming)
    assert made.created is True and made.user.external_id == coming
    assert made.user.id != person.id


def test_a_scoped_key_naming_a_derived_username_does_not_lock_out_another_external_id(client: Client, caller: Any) -> None:
    """The scope lets a service choose the username of the users it ensures: it may choose the
    one EnsureUser would derive for an external id that is not yet moved in."""
    _, service = caller(ipb.USER_ROLE_GUEST, (SCOPE,))
    coming = unique("employee")
    with pytest.raises(grpc.RpcError) as refused:
        service.identity.EnsureUser(ipb.EnsureUserRequest(user=ipb.User(external_id=unique("other"), username=derived(coming))))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "user.username" in (refused.value.details() or "")
    mine = unique("mine")  # the form derived from the user's own external id is taken as it is
    assert service.identity.EnsureUser(ipb.EnsureUserRequest(user=ipb.User(external_id=mine, username=derived(mine)))).user.username == derived(mine)
    made = ensure(client, external_id=coming)
    assert made.created is True and made.user.external_id == coming


def test_an_external_id_of_only_blanks_is_refused_as_lookup_user_refuses_it(client: Client) -> None:
    """LookupUser refuses an external id of blanks ("must not be empty"); EnsureUser makes a user
    of it, which LookupUser then cannot find."""
    blanks = " " * 7
    try:
        made = ensure(client, external_id=blanks)
    except grpc.RpcError:
        made = None
    assert made is None, "EnsureUser made a user whose external id is only blanks"
    err = expect_error(Code.INVALID_ARGUMENT, ensure, client, external_id=blanks)
    assert err.violations[0].field == "user.external_id"


def test_a_deleted_users_id_is_told_to_admins_only(client: Client, caller: Any) -> None:
    """EnsureUser of a deleted user's external id is FAILED_PRECONDITION USER_DELETED; the user's
    id (what an admin needs to undelete it) is in the answer for admins only: a deleted user is
    not visible to a scoped key."""
    external = unique("gone")
    made = ensure(client, external_id=external)
    client.identity.DeleteUser(ipb.DeleteUserRequest(id=made.user.id))
    err = expect_error(grpc.StatusCode.FAILED_PRECONDITION, ensure, client, external_id=external)
    assert err.info.reason == "USER_DELETED" and err.info.metadata["resource_id"] == made.user.id
    _, service = caller(ipb.USER_ROLE_GUEST, (SCOPE,))
    err = expect_error(grpc.StatusCode.FAILED_PRECONDITION, ensure, service, external_id=external)
    assert err.info.reason == "USER_DELETED" and "resource_id" not in err.info.metadata
    assert made.user.id not in err.message
