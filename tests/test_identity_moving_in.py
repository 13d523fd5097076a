"""Moving users in from the earlier layers, end to end over a real channel, on SQLite and on
PostgreSQL: EnsureUser by external id alone (a derived username, no e-mail address), called by
a service's API key holding the scope identity.users.ensure, and users brought in with their
existing password hashes (bcrypt, argon2id), upgraded to argon2id at their first login.

Every test makes its own data with unique names: all the tests of a run share one database of each kind.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import bcrypt
import grpc
import pytest
from argon2 import PasswordHasher, Type
from google.protobuf.message import Message
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.security.v1 import security_pb2 as spb
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, select, text

from db import migrate
from db.database import Database
from db.domains.identity import USERS, User
from tests.conftest import BACKENDS, Client, connect, unique
from tests.databases import fresh_postgres_database
from tests.support import expect_error, mask, new_user

Code = grpc.StatusCode
PASSWORD = "moved in with this password"
SCOPE = "identity.users.ensure"


# ------------------------------------------------------------------ helpers


def derived(external_id: str) -> str:
    return "ext-" + hashlib.sha256(external_id.encode()).hexdigest()[:16]


def bcrypt_hash(password: str, prefix: str = "$2b$") -> str:
    """A bcrypt hash as the earlier layers stored them; $2a$ and $2y$ differ from $2b$ only in
    their prefix (the same algorithm for every password shorter than 256 bytes)."""
    made = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return prefix + made[4:]


def argon2id_hash(password: str) -> str:
    return PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1, type=Type.ID).hash(password)


def stored_hash(c: Client, user_id: str) -> str | None:
    """The password hash in the users table itself (no API returns it)."""
    engine = create_engine(c.database_url)
    try:
        with engine.connect() as conn:
            return conn.execute(select(User.password_hash).where(User.id == uuid.UUID(user_id))).scalar_one()
    finally:
        engine.dispose()


def login(c: Client, login_name: str, password: str) -> ipb.AuthenticateUserResponse:
    return c.identity.AuthenticateUser(ipb.AuthenticateUserRequest(login=login_name, password=password))


def ensure(c: Client, **fields: Any) -> ipb.EnsureUserResponse:
    return c.identity.EnsureUser(ipb.EnsureUserRequest(user=ipb.User(**fields)))


def audit_of(c: Client, resource_id: str) -> list[spb.AuditLogEntry]:
    request = spb.ListAuditLogEntriesRequest(filter=f'resource_id = "{resource_id}"', page_size=1000)
    return list(c.security.ListAuditLogEntries(request).audit_log_entries)


def new_key(c: Client, role: int = ipb.USER_ROLE_USER, scopes: tuple[str, ...] = (), user_id: str = "") -> ipb.ApiKey:
    return c.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=role, scopes=scopes, user_id=user_id)))


@pytest.fixture
def caller(client: Client) -> Iterator[Any]:
    """make(role, scopes, user_id) -> (the key, a Client calling with it); closed after the test."""
    made: list[Client] = []

    def make(role: int = ipb.USER_ROLE_USER, scopes: tuple[str, ...] = (), user_id: str = "") -> tuple[ipb.ApiKey, Client]:
        key = new_key(client, role, scopes, user_id)
        other = connect(client.backend, client.database_url, client.server, key.secret)
        made.append(other)
        return key, other

    yield make
    for other in made:
        other.channel.close()


# ------------------------------------------------------------------ EnsureUser by external id alone


def test_ensure_user_with_only_an_external_id_derives_a_stable_username_and_no_email(client: Client) -> None:
    ext = unique("ext")
    first = ensure(client, external_id=ext)
    assert first.created is True
    assert first.user.username == derived(ext)
    assert first.user.email == ""
    assert first.user.role == ipb.USER_ROLE_USER and first.user.is_active is True
    again = ensure(client, external_id=ext)
    assert again.created is False
    assert again.user.id == first.user.id and again.user.username == derived(ext)
    looked_up = client.identity.LookupUser(ipb.LookupUserRequest(external_id=ext))
    assert looked_up.id == first.user.id


def test_several_users_may_have_no_email_while_addresses_stay_unique(client: Client) -> None:
    made = [ensure(client, external_id=unique("ext")).user for _ in range(3)]
    made.append(client.identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(username=unique("u")))))
    assert len({u.id for u in made}) == 4
    assert all(u.email == "" for u in made)
    taken = new_user(client)
    err = expect_error(Code.ALREADY_EXISTS, ensure, client, external_id=unique("ext"), email=taken.email.upper())
    assert err.info.metadata["fields"] == "email"
    # An address set and cleared again: the user has none.
    cleared = client.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=taken.id, email=""), update_mask=mask("email")))
    assert cleared.email == ""
    expect_error(Code.INVALID_ARGUMENT, client.identity.LookupUser, ipb.LookupUserRequest(email=""))


def test_ensure_user_keeps_the_fields_it_is_given(client: Client) -> None:
    ext, name = unique("ext"), unique("u")
    made = ensure(client, external_id=ext, username=name, email=f"{name}@Example.com", full_name="Grace")
    assert (made.user.username, made.user.email, made.user.full_name) == (name, f"{name}@example.com", "Grace")


def test_concurrent_ensure_user_by_external_id_alone_makes_exactly_one(client: Client, caller: Any) -> None:
    _, service = caller(ipb.USER_ROLE_GUEST, (SCOPE,))
    ext = unique("ext")
    threads = 8
    barrier = threading.Barrier(threads)

    def call(i: int) -> ipb.EnsureUserResponse:
        barrier.wait(10)
        who = service if i % 2 else client  # the scoped key and an admin, racing
        return who.identity.EnsureUser(ipb.EnsureUserRequest(user=ipb.User(external_id=ext)), timeout=30)

    with ThreadPoolExecutor(threads) as pool:
        responses = list(pool.map(call, range(threads)))
    assert sum(r.created for r in responses) == 1
    assert len({r.user.id for r in responses}) == 1
    listed = client.identity.ListUsers(ipb.ListUsersRequest(filter=f'external_id = "{ext}"'))
    assert [u.id for u in listed.users] == [responses[0].user.id]


def test_ensure_user_needs_an_external_id_without_nul_characters(client: Client) -> None:
    expect_error(Code.INVALID_ARGUMENT, ensure, client, username=unique("u"))
    err = expect_error(Code.INVALID_ARGUMENT, ensure, client, external_id="a\x00b")
    assert err.violations[0].field == "user.external_id"
    err = expect_error(Code.INVALID_ARGUMENT, ensure, client, external_id="x" * 256)
    assert err.violations[0].field == "user.external_id"


# ------------------------------------------------------------------ who may call EnsureUser


def test_a_plain_user_key_may_not_ensure_users_and_a_scoped_key_may(client: Client, caller: Any) -> None:
    person = new_user(client)
    for role in (ipb.USER_ROLE_USER, ipb.USER_ROLE_MANAGER):
        _, plain = caller(role)
        err = expect_error(Code.PERMISSION_DENIED, ensure, plain, external_id=unique("ext"))
        assert err.info.reason == "ROLE_FORBIDS_METHOD"
        assert SCOPE in err.message
    _, own = caller(ipb.USER_ROLE_USER, user_id=person.id)
    expect_error(Code.PERMISSION_DENIED, ensure, own, external_id=unique("ext"))

    key, scoped = caller(ipb.USER_ROLE_GUEST, (SCOPE,))
    assert list(key.scopes) == [SCOPE]
    ext = unique("ext")
    made = ensure(scoped, external_id=ext, full_name="From the chat store", email=f"{unique('m')}@example.com")
    assert made.created is True and made.user.username == derived(ext)
    assert ensure(scoped, external_id=ext).user.id == made.user.id
    # Audited as the key's doing.
    (entry,) = [e for e in audit_of(client, made.user.id) if e.action == spb.AUDIT_ACTION_CREATE]
    assert entry.actor_id == key.id
    assert entry.method == "/nexus.identity.v1.IdentityService/EnsureUser"


@pytest.mark.parametrize(
    "fields",
    [
        {"role": ipb.USER_ROLE_ADMIN},
        {"is_active": False},
        {"password": PASSWORD},
        {"password_hash": "$2b$04$" + "a" * 53},
    ],
    ids=["role", "is_active", "password", "password_hash"],
)
def test_a_scoped_key_sets_only_a_new_users_own_fields(client: Client, caller: Any, fields: dict[str, Any]) -> None:
    _, scoped = caller(ipb.USER_ROLE_USER, (SCOPE,))
    ext = unique("ext")
    err = expect_error(Code.PERMISSION_DENIED, ensure, scoped, external_id=ext, **fields)
    assert err.info.metadata["field"] == f"user.{next(iter(fields))}"
    expect_error(Code.NOT_FOUND, client.identity.LookupUser, ipb.LookupUserRequest(external_id=ext))


def test_the_scope_changes_nothing_else_the_key_may_do(client: Client, caller: Any) -> None:
    """A scoped key and the same key without the scope answer every other call alike."""
    person = new_user(client)
    role = new_role = client.identity.CreateRole(ipb.CreateRoleRequest(role=ipb.Role(name=unique("role"))))
    del new_role
    _, plain = caller(ipb.USER_ROLE_USER)
    _, scoped = caller(ipb.USER_ROLE_USER, (SCOPE,))

    def outcome(c: Client, call: str, request: Message) -> Any:
        try:
            answer = getattr(c.identity, call)(request)
        except grpc.RpcError as exc:
            return exc.code()
        if isinstance(answer, ipb.ListUsersResponse):
            return sorted(u.id for u in answer.users)
        if isinstance(answer, ipb.ListApiKeysResponse):
            return len(answer.api_keys)
        return type(answer).__name__

    calls: list[tuple[str, Message]] = [
        ("CreateUser", ipb.CreateUserRequest(user=ipb.User(username=unique("u"), external_id=unique("ext")))),
        ("UpdateUser", ipb.UpdateUserRequest(user=ipb.User(id=person.id, full_name="Changed"), update_mask=mask("full_name"))),
        ("DeleteUser", ipb.DeleteUserRequest(id=person.id)),
        ("AssignRole", ipb.AssignRoleRequest(user_id=person.id, role_id=role.id)),
        ("VerifyUserEmail", ipb.VerifyUserEmailRequest(id=person.id)),
        ("AuthenticateUser", ipb.AuthenticateUserRequest(login=person.username, password=PASSWORD)),
        ("CreateApiKey", ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_ADMIN))),
        ("ListUsers", ipb.ListUsersRequest(filter=f'username = "{person.username}"')),
        ("GetUser", ipb.GetUserRequest(id=person.id)),
        ("ListApiKeys", ipb.ListApiKeysRequest()),
    ]
    for call, request in calls:
        assert outcome(scoped, call, request) == outcome(plain, call, request), call
    # Nor did either change the user.
    assert client.identity.GetUser(ipb.GetUserRequest(id=person.id)).etag == person.etag
    expect_error(Code.PERMISSION_DENIED, scoped.security.ListAuditLogEntries, spb.ListAuditLogEntriesRequest())


def test_scopes_are_known_admins_only_and_for_keys_without_a_user(client: Client, caller: Any) -> None:
    err = expect_error(Code.INVALID_ARGUMENT, new_key, client, scopes=("identity.users.ensure", "identity.users.admin"))
    assert [v.field for v in err.violations] == ["api_key.scopes[1]"]
    person = new_user(client)
    err = expect_error(Code.INVALID_ARGUMENT, new_key, client, scopes=(SCOPE,), user_id=person.id)
    assert err.violations[0].field == "api_key.scopes"
    _, manager = caller(ipb.USER_ROLE_MANAGER)
    err = expect_error(Code.PERMISSION_DENIED, new_key, manager, scopes=(SCOPE,))
    assert err.info.metadata["field"] == "api_key.scopes"
    twice = new_key(client, ipb.USER_ROLE_GUEST, (SCOPE, SCOPE))
    assert list(twice.scopes) == [SCOPE]


def test_a_scope_taken_away_takes_effect_on_the_next_call(client: Client, caller: Any) -> None:
    key, scoped = caller(ipb.USER_ROLE_USER, (SCOPE,))
    ensure(scoped, external_id=unique("ext"))
    client.identity.UpdateApiKey(ipb.UpdateApiKeyRequest(api_key=ipb.ApiKey(id=key.id), update_mask=mask("scopes")))
    expect_error(Code.PERMISSION_DENIED, ensure, scoped, external_id=unique("ext"))


# ------------------------------------------------------------------ password hashes moved in


@pytest.mark.parametrize("prefix", ["$2a$", "$2b$", "$2y$"])
def test_a_bcrypt_user_logs_in_and_is_upgraded_to_argon2id(client: Client, prefix: str) -> None:
    ready = bcrypt_hash(PASSWORD, prefix)
    user = new_user(client, password_hash=ready)
    assert stored_hash(client, user.id) == ready

    wrong = login(client, user.username, PASSWORD + "!")
    assert wrong.authenticated is False and not wrong.HasField("user")
    assert stored_hash(client, user.id) == ready  # a wrong password upgrades nothing

    right = login(client, user.username, PASSWORD)
    assert right.authenticated is True and right.user.id == user.id
    upgraded = stored_hash(client, user.id)
    assert upgraded is not None and upgraded.startswith("$argon2id$")
    assert login(client, user.username, PASSWORD).authenticated is True
    assert stored_hash(client, user.id) == upgraded  # upgraded once
    assert login(client, user.username, "not the password").authenticated is False
    # The upgrade is audited with the login, its value masked.
    updates = [e for e in audit_of(client, user.id) if e.action == spb.AUDIT_ACTION_UPDATE]
    changed = [c for e in updates for c in e.changes if c.field == "password"]
    assert len(changed) == 1 and changed[0].new_value.string_value == "***"


def test_a_bcrypt_password_longer_than_72_bytes_checks_the_bytes_bcrypt_hashed(client: Client) -> None:
    long_password = "é" * 40  # 80 bytes: bcrypt hashed its first 72
    ready = bcrypt.hashpw(long_password.encode()[:72], bcrypt.gensalt(rounds=4)).decode()
    user = new_user(client, password_hash=ready)
    assert login(client, user.username, long_password).authenticated is True
    assert login(client, user.username, long_password).authenticated is True  # now argon2id, all 80 bytes


def test_an_inactive_bcrypt_user_neither_logs_in_nor_is_upgraded(client: Client) -> None:
    ready = bcrypt_hash(PASSWORD)
    user = new_user(client, password_hash=ready, is_active=False)
    assert login(client, user.username, PASSWORD).authenticated is False
    assert stored_hash(client, user.id) == ready


def test_an_argon2id_hash_is_kept_as_it_is(client: Client) -> None:
    ready = argon2id_hash(PASSWORD)
    user = new_user(client, password_hash=ready)
    assert stored_hash(client, user.id) == ready
    assert login(client, user.email, PASSWORD).authenticated is True


def test_a_hash_set_by_update_replaces_the_password(client: Client) -> None:
    user = new_user(client, password=PASSWORD)
    ready = bcrypt_hash("the new password")
    client.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=user.id, password_hash=ready), update_mask=mask("password_hash")))
    assert stored_hash(client, user.id) == ready
    assert login(client, user.username, PASSWORD).authenticated is False
    assert login(client, user.username, "the new password").authenticated is True


BAD_HASHES = {
    "plain text": "hunter2-hunter2",
    "md5 crypt": "$1$saltsalt$qjXMvbEw8oaL.CzflDugX/",
    "sha512 crypt": "$6$saltsalt$" + "a" * 86,
    "bcrypt too short": "$2b$04$" + "a" * 52,
    "bcrypt unknown variant": "$2x$04$" + "a" * 53,
    "bcrypt cost 3": "$2b$03$" + "a" * 53,
    "bcrypt with a newline": "$2b$04$" + "a" * 53 + "\n",
    "argon2i": PasswordHasher(time_cost=1, memory_cost=1024, type=Type.I).hash(PASSWORD),
    "argon2id cut short": argon2id_hash(PASSWORD).rsplit("$", 1)[0],
    "too long": "$2b$04$" + "a" * 300,
}


@pytest.mark.parametrize("bad", list(BAD_HASHES.values()), ids=list(BAD_HASHES))
def test_unknown_hash_forms_are_refused_at_write_time_naming_the_field(client: Client, bad: str) -> None:
    name = unique("u")
    err = expect_error(
        Code.INVALID_ARGUMENT, client.identity.CreateUser, ipb.CreateUserRequest(user=ipb.User(username=name, password_hash=bad))
    )
    assert [v.field for v in err.violations] == ["user.password_hash"]
    assert bad.strip() not in err.message and all(bad.strip() not in v.description for v in err.violations)
    expect_error(Code.NOT_FOUND, client.identity.LookupUser, ipb.LookupUserRequest(username=name))
    user = new_user(client)
    err = expect_error(
        Code.INVALID_ARGUMENT, client.identity.UpdateUser,
        ipb.UpdateUserRequest(user=ipb.User(id=user.id, password_hash=bad), update_mask=mask("password_hash")),
    )
    assert [v.field for v in err.violations] == ["user.password_hash"]


def test_password_and_password_hash_together_are_refused(client: Client) -> None:
    both = ipb.User(username=unique("u"), password=PASSWORD, password_hash=bcrypt_hash(PASSWORD))
    err = expect_error(Code.INVALID_ARGUMENT, client.identity.CreateUser, ipb.CreateUserRequest(user=both))
    assert [v.field for v in err.violations] == ["user.password_hash"]
    user = new_user(client)
    both.id = user.id
    both.ClearField("username")
    err = expect_error(Code.INVALID_ARGUMENT, client.identity.UpdateUser, ipb.UpdateUserRequest(user=both))
    assert [v.field for v in err.violations] == ["user.password_hash"]


def test_only_admins_set_a_password_hash(client: Client, caller: Any) -> None:
    person = new_user(client)
    _, own = caller(ipb.USER_ROLE_USER, user_id=person.id)
    err = expect_error(
        Code.PERMISSION_DENIED, own.identity.UpdateUser,
        ipb.UpdateUserRequest(user=ipb.User(id=person.id, password_hash=bcrypt_hash(PASSWORD)), update_mask=mask("password_hash")),
    )
    assert err.info.metadata["field"] == "user.password_hash"
    assert stored_hash(client, person.id) is None


def test_a_password_hash_is_never_read_back(client: Client, caller: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    ready = bcrypt_hash(PASSWORD)
    name = unique("u")
    answers: list[Message] = [client.identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(username=name, password_hash=ready)))]
    user = answers[0]
    assert isinstance(user, ipb.User)
    answers += [
        client.identity.GetUser(ipb.GetUserRequest(id=user.id)),
        client.identity.ListUsers(ipb.ListUsersRequest(filter=f'username = "{name}"')),
        client.identity.SearchUsers(ipb.SearchUsersRequest(query=name)),
        client.identity.BatchGetUsers(ipb.BatchGetUsersRequest(ids=[user.id])),
        client.identity.LookupUser(ipb.LookupUserRequest(username=name)),
        client.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=user.id, password_hash=ready), update_mask=mask("password_hash"))),
        client.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=user.id, full_name="Moved"), update_mask=mask("full_name"))),
        client.identity.EnsureUser(ipb.EnsureUserRequest(user=ipb.User(external_id=unique("ext"), password_hash=ready))),
        client.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(filter=f'resource_id = "{user.id}"')),
    ]
    _, guest = caller(ipb.USER_ROLE_GUEST)
    answers.append(guest.identity.GetUser(ipb.GetUserRequest(id=user.id)))
    salt_and_hash = ready[7:]
    for answer in answers:
        raw = answer.SerializeToString()
        assert salt_and_hash.encode() not in raw and b"$2b$" not in raw and b"$argon2" not in raw, type(answer).__name__
    assert user.password_hash == "" and user.password == ""
    # Nor can a filter ask about it.
    err = expect_error(
        Code.INVALID_ARGUMENT, client.identity.ListUsers, ipb.ListUsersRequest(filter=f'password_hash = "{ready}"')
    )
    assert "password_hash" in err.message or any("password_hash" in v.description for v in err.violations)
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records) + caplog.text
    assert salt_and_hash not in logged
    # User changes go to no event stream (a stream would need the same care).
    assert USERS.stream_scope is None


# ------------------------------------------------------------------ the migration (0016)


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'moving-in.db'}"
    else:
        with fresh_postgres_database("nexus_movein") as url:
            yield url


def test_the_migration_keeps_every_row_that_references_a_user(empty_url: str) -> None:
    """users is rebuilt on SQLite (email loses its NOT NULL): the rows referencing it (ON DELETE
    CASCADE and RESTRICT alike) are all there after it, and the full-text index finds the users."""
    before = ScriptDirectory.from_config(migrate.alembic_config()).get_revision("0016").down_revision
    assert isinstance(before, str)
    database = Database(empty_url)
    user_id, key_id, project_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    now = "2024-05-01 10:00:00+00:00"
    ids = {"u": user_id.hex, "k": key_id.hex, "p": project_id.hex} if empty_url.startswith("sqlite") else {
        "u": str(user_id), "k": str(key_id), "p": str(project_id)
    }
    try:
        migrate.upgrade(database.engine, before)
        with database.engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO users (id, username, email, role, is_active, is_verified, create_time, update_time, revision) "
                "VALUES (:u, 'lovelace', 'ada@example.com', 'user', true, false, :t, :t, 1)"
            ), {"u": ids["u"], "t": now})
            conn.execute(text(
                "INSERT INTO api_keys (id, name, role, user_id, key_prefix, secret_hash, create_time, update_time, revision) "
                "VALUES (:k, 'hers', 'user', :u, 'nx_movein1', 'x', :t, :t, 1)"
            ), {"k": ids["k"], "u": ids["u"], "t": now})
            conn.execute(text(
                "INSERT INTO projects (id, name, owner_id, status, priority, archived, create_time, update_time, revision) "
                "VALUES (:p, 'Analytical Engine', :u, 'planning', 'medium', false, :t, :t, 1)"
            ), {"p": ids["p"], "u": ids["u"], "t": now})
        migrate.upgrade(database.engine)
        with database.engine.begin() as conn:
            assert conn.execute(text("SELECT count(*) FROM api_keys WHERE user_id = :u"), {"u": ids["u"]}).scalar() == 1
            assert conn.execute(text("SELECT count(*) FROM projects WHERE owner_id = :u"), {"u": ids["u"]}).scalar() == 1
            assert conn.execute(text("SELECT scopes FROM api_keys")).scalar() in ([], "[]")
            conn.execute(text(
                "INSERT INTO users (id, username, email, role, is_active, is_verified, create_time, update_time, revision) "
                "VALUES (:u, 'noaddress', NULL, 'user', true, false, :t, :t, 1)"
            ), {"u": uuid.uuid4().hex if empty_url.startswith("sqlite") else str(uuid.uuid4()), "t": now})
            if empty_url.startswith("sqlite"):
                found = conn.execute(text("SELECT username FROM users WHERE rowid IN (SELECT rowid FROM users_fts WHERE users_fts MATCH 'lovelace')"))
                assert found.scalars().all() == ["lovelace"]
        # Down again: the user without an address gets one that reaches nobody.
        migrate.downgrade(database.engine, before)
        with database.engine.connect() as conn:
            emails = set(conn.execute(text("SELECT email FROM users")).scalars())
            assert emails == {"ada@example.com", "noaddress@no-email.invalid"}
            assert conn.execute(text("SELECT count(*) FROM api_keys")).scalar() == 1
        migrate.upgrade(database.engine)
    finally:
        database.dispose()
