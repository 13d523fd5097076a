"""Credentials that cannot do more than their owner, cost the server little when wrong, and
leave a trace, end to end on SQLite and on PostgreSQL.

A key acts with at most its owner's current role; a JWT's role claim only lowers the stored
role and its lifetime is bounded; a wrong secret is rate limited and hashed off the database
threads, a revoked or expired key is refused before any hash; an owner may shorten but not
extend its key's expiry; a changed e-mail is no longer verified; the first admin key goes to a
private file (or a terminal), never to a log; CLI writes are audited as such; a bad x-request-id
is refused before it is written anywhere.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import getpass
import os
import pty
import re
import select
import signal
import stat
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.security.v1 import security_pb2 as spb
from nexus.work.v1 import work_pb2 as wpb
from sqlalchemy import update

from db import secrets
from db.database import Database
from db.domains.identity import ApiKey
from service.config import Config
from service.server import create_server
from tests.conftest import Client, blob_dir_of, connect, make_config, unique
from tests.support import expect_error, mask, new_user, rich_error
from tests.test_access import (  # noqa: F401 - actor is a fixture
    HS_SECRET,
    JWT_CLAIMS,
    NEXUS_DATA,
    ROOT,
    Actor,
    actor,
    addr,
    audit_entries,
    calling,
    denied,
    fresh_database,
    jwt_user,
    new_key,
    running,
    token_for,
    unauthenticated,
)

Code = grpc.StatusCode
LIST = wpb.ListProjectsRequest(page_size=1)


def when(days: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(days=days))
    return ts


def set_key_expiry(client: Client, key_id: str, at: dt.datetime) -> None:
    database = Database(client.database_url)
    try:
        database.run_sync(lambda s: s.execute(update(ApiKey).where(ApiKey.id == uuid.UUID(key_id)).values(expire_time=at)))
    finally:
        database.dispose()


def set_role(client: Client, user_id: str, role: int) -> None:
    client.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=user_id, role=role), update_mask=mask("role")))


# ================================================================== a key's role: at most its owner's


def test_a_key_is_never_made_above_its_owners_role(client: Client) -> None:
    user = new_user(client, role=ipb.USER_ROLE_USER)
    name = unique("k")
    err = expect_error(
        Code.INVALID_ARGUMENT,
        client.identity.CreateApiKey,
        ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=name, role=ipb.USER_ROLE_ADMIN, user_id=user.id)),
    )
    assert err.info.reason == "ROLE_ABOVE_OWNER" and err.violations[0].field == "api_key.role"
    assert client.identity.ListApiKeys(ipb.ListApiKeysRequest(filter=f'name = "{name}"')).total_size == 0
    # At the owner's role or lower it is made; left unset for a guest, it is the guest's role.
    assert new_key(client, role=ipb.USER_ROLE_GUEST, user_id=user.id).role == ipb.USER_ROLE_GUEST
    assert new_key(client, role=ipb.USER_ROLE_USER, user_id=user.id).role == ipb.USER_ROLE_USER
    guest = new_user(client, role=ipb.USER_ROLE_GUEST)
    made = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), user_id=guest.id)))
    assert made.role == ipb.USER_ROLE_GUEST
    # Nor raised above it later.
    key = new_key(client, role=ipb.USER_ROLE_GUEST, user_id=user.id)
    err = expect_error(
        Code.INVALID_ARGUMENT,
        client.identity.UpdateApiKey,
        ipb.UpdateApiKeyRequest(api_key=ipb.ApiKey(id=key.id, role=ipb.USER_ROLE_MANAGER), update_mask=mask("role")),
    )
    assert err.info.reason == "ROLE_ABOVE_OWNER"
    assert client.identity.GetApiKey(ipb.GetApiKeyRequest(id=key.id)).role == ipb.USER_ROLE_GUEST


def test_a_caller_asks_for_keys_at_its_own_role_or_lower(client: Client, actor: Callable[..., Actor]) -> None:
    boss = actor(ipb.USER_ROLE_MANAGER)

    def ask(c: Client, role: int) -> ipb.ApiKey:
        return c.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=role)))

    assert ask(boss.c, ipb.USER_ROLE_MANAGER).role == ipb.USER_ROLE_MANAGER
    assert ask(boss.c, ipb.USER_ROLE_GUEST).role == ipb.USER_ROLE_GUEST
    assert expect_error(Code.PERMISSION_DENIED, ask, boss.c, ipb.USER_ROLE_ADMIN).info.reason == "ROLE_ABOVE_CALLER"
    # Calling with a lower key of its own, the manager gets keys at that key's role at most.
    lower = ask(boss.c, ipb.USER_ROLE_USER)
    with_lower = connect(client.backend, client.database_url, client.server, secret=lower.secret)
    try:
        assert expect_error(Code.PERMISSION_DENIED, ask, with_lower, ipb.USER_ROLE_MANAGER).info.reason == "ROLE_ABOVE_CALLER"
        raise_it = ipb.UpdateApiKeyRequest(api_key=ipb.ApiKey(id=lower.id, role=ipb.USER_ROLE_MANAGER), update_mask=mask("role"))
        assert expect_error(Code.PERMISSION_DENIED, with_lower.identity.UpdateApiKey, raise_it).info.reason == "ROLE_ABOVE_CALLER"
        assert ask(with_lower, ipb.USER_ROLE_USER).role == ipb.USER_ROLE_USER
    finally:
        with_lower.channel.close()
    assert client.identity.GetApiKey(ipb.GetApiKeyRequest(id=lower.id)).role == ipb.USER_ROLE_USER


def test_demoting_a_user_demotes_its_keys_at_once(client: Client, actor: Callable[..., Actor]) -> None:
    boss = actor(ipb.USER_ROLE_MANAGER)
    project = boss.c.work.CreateProject(wpb.CreateProjectRequest(project=wpb.Project(name=f"P {unique()}")))
    set_role(client, boss.id, ipb.USER_ROLE_GUEST)
    # The key still says manager; its owner is a guest now, and so is the key.
    assert client.identity.GetApiKey(ipb.GetApiKeyRequest(id=boss.key.id)).role == ipb.USER_ROLE_MANAGER
    err = denied(boss.c.work.CreateProject, wpb.CreateProjectRequest(project=wpb.Project(name=f"P {unique()}")), reason="ROLE_FORBIDS_METHOD")
    assert err.info.metadata["role"] == "guest"
    assert boss.c.work.GetProject(wpb.GetProjectRequest(id=project.id)).id == project.id
    # Promoted again: the key's own role is the ceiling.
    set_role(client, boss.id, ipb.USER_ROLE_ADMIN)
    denied(boss.c.security.ListAuditLogEntries, spb.ListAuditLogEntriesRequest(page_size=1), reason="ROLE_FORBIDS_METHOD")
    boss.c.work.CreateProject(wpb.CreateProjectRequest(project=wpb.Project(name=f"P {unique()}")))


def test_a_demotion_reaches_another_replica_within_its_recheck_time(client: Client, actor: Callable[..., Actor]) -> None:
    boss = actor(ipb.USER_ROLE_MANAGER)
    with running(make_config(client.database_url, auth_recheck_seconds=0.0)) as replica, calling(addr(replica), f"Bearer {boss.key.secret}") as there:
        there.work.CreateProject(wpb.CreateProjectRequest(project=wpb.Project(name=f"P {unique()}")))
        set_role(client, boss.id, ipb.USER_ROLE_GUEST)  # through the other server
        denied(there.work.CreateProject, wpb.CreateProjectRequest(project=wpb.Project(name=f"P {unique()}")), reason="ROLE_FORBIDS_METHOD")


def test_a_key_without_a_user_keeps_its_own_role(client: Client) -> None:
    key = new_key(client, role=ipb.USER_ROLE_ADMIN)
    with calling(client.address, f"Bearer {key.secret}") as s:
        s.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(page_size=1))


# ================================================================== JWTs: the claim only lowers, the lifetime is bounded


@pytest.fixture(scope="module")
def jwt_server(client: Client) -> Iterator[Any]:
    with running(make_config(client.database_url, jwt_hs256_secret=HS_SECRET, jwt_max_lifetime_seconds=3600.0, **JWT_CLAIMS)) as server:
        yield server


def test_a_jwt_role_claim_never_raises_the_stored_role(client: Client, jwt_server: Any) -> None:
    user = jwt_user(client, role=ipb.USER_ROLE_USER)
    with calling(addr(jwt_server), f"Bearer {token_for(HS_SECRET, user.external_id, role='admin')}") as s:
        err = denied(s.security.ListAuditLogEntries, spb.ListAuditLogEntriesRequest(page_size=1), reason="ROLE_FORBIDS_METHOD")
        assert err.info.metadata["role"] == "user"
        denied(s.work.CreateProject, wpb.CreateProjectRequest(project=wpb.Project(name=f"P {unique()}", owner_id=user.id)))
    # Demoted after the token was issued: the token follows the user down.
    boss = jwt_user(client, role=ipb.USER_ROLE_MANAGER)
    with calling(addr(jwt_server), f"Bearer {token_for(HS_SECRET, boss.external_id, role='manager')}") as s:
        s.work.CreateProject(wpb.CreateProjectRequest(project=wpb.Project(name=f"P {unique()}", owner_id=boss.id)))
    set_role(client, boss.id, ipb.USER_ROLE_GUEST)
    with calling(addr(jwt_server), f"Bearer {token_for(HS_SECRET, boss.external_id, role='manager')}") as s:
        denied(s.work.CreateTask, wpb.CreateTaskRequest(task=wpb.Task(project_id=unique(), title="x")), reason="ROLE_FORBIDS_METHOD")


@pytest.mark.parametrize("case", ["no_iat", "too_long", "iat_in_future"])
def test_a_jwt_with_a_long_or_unknown_lifetime_is_unauthenticated(client: Client, jwt_server: Any, case: str) -> None:
    user = jwt_user(client)
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user.external_id, "iss": JWT_CLAIMS["jwt_issuer"], "aud": JWT_CLAIMS["jwt_audience"]}
    claims.update({
        "no_iat": {"exp": now + 300},
        "too_long": {"iat": now - 10, "exp": now + 7200},
        "iat_in_future": {"iat": now + 5000, "exp": now + 5500},
    }[case])
    token = jwt.encode(claims, HS_SECRET, algorithm="HS256")
    with calling(addr(jwt_server), f"Bearer {token}") as s:
        err = unauthenticated(s.work.ListProjects, LIST, reason="INVALID_CREDENTIALS")
        assert token not in err.message
    # Within the maximum: accepted.
    good = jwt.encode({**claims, "iat": now, "exp": now + 3500}, HS_SECRET, algorithm="HS256")
    with calling(addr(jwt_server), f"Bearer {good}") as s:
        s.work.ListProjects(LIST)


@pytest.mark.parametrize(
    ("settings", "variable"),
    [
        ({"jwt_hs256_secret": "s3cret", **JWT_CLAIMS}, "NEXUS_JWT_HS256_SECRET"),
        ({"jwt_hs256_secret": HS_SECRET, "jwt_audience": "nexus-data"}, "NEXUS_JWT_ISSUER"),
        ({"jwt_hs256_secret": HS_SECRET, "jwt_issuer": "https://issuer.example.com"}, "NEXUS_JWT_AUDIENCE"),
        ({"jwt_hs256_secret": HS_SECRET, "jwt_max_lifetime_seconds": 0.0, **JWT_CLAIMS}, "NEXUS_JWT_MAX_LIFETIME_SECONDS"),
        ({"auth_hash_workers": 0}, "NEXUS_AUTH_HASH_WORKERS"),
        ({"auth_key_failure_limit": 0}, "NEXUS_AUTH_KEY_FAILURE_LIMIT"),
        ({"bootstrap_key_file": "  "}, "NEXUS_BOOTSTRAP_KEY_FILE"),
    ],
)
def test_bad_credential_settings_stop_the_server_from_starting(client: Client, settings: dict[str, Any], variable: str) -> None:
    with pytest.raises(ValueError, match=variable):
        create_server(make_config(client.database_url, **settings))


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"NEXUS_JWT_HS256_SECRET": "short", "NEXUS_JWT_ISSUER": "i", "NEXUS_JWT_AUDIENCE": "a"}, "NEXUS_JWT_HS256_SECRET"),
        ({"NEXUS_JWT_HS256_SECRET": HS_SECRET, "NEXUS_JWT_AUDIENCE": "a"}, "NEXUS_JWT_ISSUER"),
        ({"NEXUS_JWT_MAX_LIFETIME_SECONDS": "an hour"}, "NEXUS_JWT_MAX_LIFETIME_SECONDS"),
        ({"NEXUS_AUTH_HASH_WORKERS": "-1"}, "NEXUS_AUTH_HASH_WORKERS"),
        ({"NEXUS_AUTH_PEER_FAILURE_LIMIT": "many"}, "NEXUS_AUTH_PEER_FAILURE_LIMIT"),
        ({"NEXUS_AUTH_FAILURE_WINDOW_SECONDS": "0"}, "NEXUS_AUTH_FAILURE_WINDOW_SECONDS"),
        ({"NEXUS_AUTH_RECHECK_SECONDS": "-5"}, "NEXUS_AUTH_RECHECK_SECONDS"),
    ],
)
def test_bad_credential_settings_in_the_environment_name_their_variable(client: Client, env: dict[str, str], variable: str) -> None:
    with pytest.raises(ValueError, match=variable):
        Config.from_env({"DATABASE_URL": client.database_url, **env})


def test_serve_refuses_a_short_jwt_secret_in_one_line(client: Client, tmp_path: Path) -> None:
    env = {**os.environ, "DATABASE_URL": client.database_url, "NEXUS_PORT": "0", "NEXUS_JWT_HS256_SECRET": "s3cret",
           "NEXUS_JWT_ISSUER": "i", "NEXUS_JWT_AUDIENCE": "a"}
    done = subprocess.run([str(NEXUS_DATA), "serve"], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert done.returncode == 2, done.stderr
    assert "NEXUS_JWT_HS256_SECRET" in done.stderr and "32 bytes" in done.stderr and "Traceback" not in done.stderr
    assert "s3cret" not in done.stderr


# ================================================================== wrong secrets: cheap, limited, off the database threads


@contextlib.contextmanager
def counting_hashes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Names of the threads that ran db.secrets.verify_secret (the real one) while inside."""
    threads: list[str] = []
    real = secrets.verify_secret

    def observed(stored_hash: str | None, plain: str) -> bool:
        threads.append(threading.current_thread().name)
        return real(stored_hash, plain)

    monkeypatch.setattr(secrets, "verify_secret", observed)
    try:
        yield threads
    finally:
        monkeypatch.setattr(secrets, "verify_secret", real)


def retry_info(exc: grpc.RpcError) -> error_details_pb2.RetryInfo | None:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info
    return None


def wrong(key: ipb.ApiKey) -> str:
    return f"Bearer {key.key_prefix}.{uuid.uuid4().hex}{uuid.uuid4().hex}"


def test_revoked_and_expired_keys_are_refused_without_hashing(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    revoked, expired = new_key(client), new_key(client)
    client.identity.RevokeApiKey(ipb.RevokeApiKeyRequest(id=revoked.id))
    set_key_expiry(client, expired.id, dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1))
    with counting_hashes(monkeypatch) as hashed:
        with calling(client.address, f"Bearer {revoked.secret}") as s:
            unauthenticated(s.work.ListProjects, LIST, reason="INVALID_CREDENTIALS")
        with calling(client.address, f"Bearer {expired.secret}") as s:
            unauthenticated(s.work.ListProjects, LIST, reason="EXPIRED_CREDENTIALS")
        # ... even with a wrong secret for the prefix (no hash says whether it was right).
        with calling(client.address, wrong(revoked)) as s:
            unauthenticated(s.work.ListProjects, LIST, reason="INVALID_CREDENTIALS")
    assert hashed == []


def test_a_steady_caller_is_hashed_once_and_off_the_database_threads(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    key = new_key(client)
    with counting_hashes(monkeypatch) as hashed, calling(client.address, f"Bearer {key.secret}") as s:
        for _ in range(20):
            s.work.ListProjects(LIST)
        with calling(client.address, wrong(key)) as bad:
            unauthenticated(bad.work.ListProjects, LIST, reason="INVALID_CREDENTIALS")
    assert len(hashed) == 2, hashed
    assert all(name.startswith("nexus-auth-hash") for name in hashed), hashed


def test_wrong_secrets_for_one_prefix_are_rate_limited_while_the_good_key_works(client: Client) -> None:
    key, other = new_key(client), new_key(client)
    config = make_config(client.database_url, auth_key_failure_limit=3, auth_peer_failure_limit=1000, auth_failure_window_seconds=600.0)
    with running(config) as server, calling(addr(server), f"Bearer {key.secret}") as good:
        good.work.ListProjects(LIST)
        for _ in range(3):
            with calling(addr(server), wrong(key)) as bad:
                unauthenticated(bad.work.ListProjects, LIST, reason="INVALID_CREDENTIALS")
        for _ in range(3):
            with calling(addr(server), wrong(key)) as bad, pytest.raises(grpc.RpcError) as caught:
                bad.work.ListProjects(LIST)
            err = rich_error(caught.value)
            assert err.code == Code.RESOURCE_EXHAUSTED and err.error_info_count == 1
            assert err.info.reason == "AUTH_RATE_LIMITED" and err.info.metadata["key_prefix"] == key.key_prefix
            info = retry_info(caught.value)
            assert info is not None and info.retry_delay.seconds > 0
        # The good key goes on; so does another key's wrong secret (another prefix), once.
        good.work.ListProjects(LIST)
        good.work.ListTasks(wpb.ListTasksRequest(page_size=1))
        with calling(addr(server), wrong(other)) as bad:
            unauthenticated(bad.work.ListProjects, LIST, reason="INVALID_CREDENTIALS")


def test_wrong_secrets_from_one_peer_are_rate_limited(client: Client) -> None:
    keys = [new_key(client) for _ in range(4)]
    config = make_config(client.database_url, auth_key_failure_limit=100, auth_peer_failure_limit=3, auth_failure_window_seconds=600.0)
    with running(config) as server, calling(addr(server), f"Bearer {keys[0].secret}") as good:
        good.work.ListProjects(LIST)
        for key in keys[:3]:
            with calling(addr(server), wrong(key)) as bad:
                unauthenticated(bad.work.ListProjects, LIST, reason="INVALID_CREDENTIALS")
        with calling(addr(server), wrong(keys[3])) as bad, pytest.raises(grpc.RpcError) as caught:
            bad.work.ListProjects(LIST)
        assert caught.value.code() == Code.RESOURCE_EXHAUSTED
        assert retry_info(caught.value) is not None
        good.work.ListProjects(LIST)  # proven before: no hash, no limit


# ================================================================== e-mail verification and key expiry


def test_changing_the_email_clears_is_verified(client: Client, actor: Callable[..., Actor]) -> None:
    def verified(user_id: str) -> bool:
        return client.identity.VerifyUserEmail(ipb.VerifyUserEmailRequest(id=user_id)).is_verified

    me = actor()
    assert verified(me.id)
    # The same address again (any mask, "*" included) keeps it verified.
    full = client.identity.GetUser(ipb.GetUserRequest(id=me.id))
    full.ClearField("etag")
    full.email = full.email.upper()
    assert client.identity.UpdateUser(ipb.UpdateUserRequest(user=full, update_mask=mask("*"))).is_verified
    for update_mask in (mask("email"), mask(), mask("*"), mask("full_name", "email")):
        assert verified(me.id)
        full.email = f"{unique()}@example.com"
        changed = client.identity.UpdateUser(ipb.UpdateUserRequest(user=full, update_mask=update_mask))
        assert changed.email == full.email and not changed.is_verified, update_mask
        assert not client.identity.GetUser(ipb.GetUserRequest(id=me.id)).is_verified
    # The user changing its own address: not verified either.
    assert verified(me.id)
    mine = me.c.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=me.id, email=f"{unique()}@example.com"), update_mask=mask("email")))
    assert not mine.is_verified


def expiry_update(key_id: str, days: float | None) -> ipb.UpdateApiKeyRequest:
    key = ipb.ApiKey(id=key_id)
    if days is not None:
        key.expire_time.CopyFrom(when(days))
    return ipb.UpdateApiKeyRequest(api_key=key, update_mask=mask("expire_time"))


def test_an_owner_may_shorten_but_not_extend_its_key_expiry(client: Client, actor: Callable[..., Actor]) -> None:
    me = actor()
    key = new_key(client, user_id=me.id, expire_time=when(30))
    assert me.c.identity.UpdateApiKey(expiry_update(key.id, 10)).expire_time.seconds < when(11).seconds
    for days in (20, None):  # later, or never
        err = denied(me.c.identity.UpdateApiKey, expiry_update(key.id, days), reason="KEY_EXPIRY_EXTENSION_DENIED")
        assert err.info.metadata["field"] == "api_key.expire_time"
    assert client.identity.GetApiKey(ipb.GetApiKeyRequest(id=key.id)).expire_time.seconds < when(11).seconds
    # A key without an expiry may get one (sooner than never).
    endless = new_key(client, user_id=me.id)
    assert me.c.identity.UpdateApiKey(expiry_update(endless.id, 5)).HasField("expire_time")
    # Never on a revoked or an expired key: no reviving.
    client.identity.RevokeApiKey(ipb.RevokeApiKeyRequest(id=endless.id))
    expect_error(Code.FAILED_PRECONDITION, me.c.identity.UpdateApiKey, expiry_update(endless.id, 1))
    lapsed = new_key(client, user_id=me.id, expire_time=when(1))
    set_key_expiry(client, lapsed.id, dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    err = expect_error(Code.FAILED_PRECONDITION, me.c.identity.UpdateApiKey, expiry_update(lapsed.id, 0.5))
    assert err.info.reason == "KEY_EXPIRED"
    # Its other fields stay the owner's to change; an admin may extend.
    me.c.identity.UpdateApiKey(ipb.UpdateApiKeyRequest(api_key=ipb.ApiKey(id=key.id, name=unique("k")), update_mask=mask("name")))
    assert client.identity.UpdateApiKey(expiry_update(key.id, 60)).expire_time.seconds > when(59).seconds
    assert client.identity.UpdateApiKey(expiry_update(lapsed.id, 1)).expire_time.seconds > when(0.9).seconds


# ================================================================== the first admin key: a private file or a terminal


def _serve(url: str, cwd: Path, env: dict[str, str], **popen: Any) -> subprocess.Popen[bytes]:
    # The blob store in a directory of its own: on PostgreSQL the default is the data directory's
    # blobs/, where the tests look for what the server wrote of its bootstrap key.
    full = {**os.environ, "DATABASE_URL": url, "NEXUS_PORT": "0", "NEXUS_HOST": "127.0.0.1", "NEXUS_BLOB_DIR": str(cwd / "blob-store"),
            "NEXUS_HASH_TIME_COST": "1", "NEXUS_HASH_MEMORY_KIB": "1024", "NEXUS_DRAIN_SECONDS": "0", **env}
    if "NEXUS_BOOTSTRAP_KEY_FILE" not in env:
        full.pop("NEXUS_BOOTSTRAP_KEY_FILE", None)
    return subprocess.Popen([str(NEXUS_DATA), "serve"], env=full, cwd=cwd, **popen)


def _wait_for(path: Path, pattern: str, timeout: float = 60.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(pattern, path.read_text()) if path.exists() else None
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} not in {path}: {path.read_text() if path.exists() else '(missing)'}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def test_the_first_admin_key_goes_to_a_private_file_not_the_log(client: Client, tmp_path: Path) -> None:
    with fresh_database(client.backend, tmp_path) as url:
        log = tmp_path / "server.log"
        # Default place: beside the SQLite file; on PostgreSQL the default data directory.
        home = tmp_path / "data-home"
        expected = tmp_path / "bootstrap-admin-key" if client.backend == "sqlite" else home / "nexus-data" / "bootstrap-admin-key"
        with log.open("wb") as out:
            process = _serve(url, tmp_path, {"XDG_DATA_HOME": str(home)}, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            port = int(_wait_for(log, r"serving on 127\.0\.0\.1:(\d+)").group(1))
            text = expected.read_text()
            assert re.fullmatch(r"NEXUS_ADMIN_KEY=nx_[^\s]+\n", text), text
            assert stat.S_IMODE(expected.stat().st_mode) == 0o600
            secret = text.strip().split("=", 1)[1]
            with calling(f"127.0.0.1:{port}", f"Bearer {secret}") as admin:
                admin.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(page_size=1))
        finally:
            _stop(process)
        logged = log.read_text()
        assert secret not in logged and secret.split(".")[1] not in logged
        assert str(expected) in logged


def test_a_first_admin_key_that_cannot_be_written_is_not_made(client: Client, tmp_path: Path) -> None:
    with fresh_database(client.backend, tmp_path) as url:
        done = _serve(url, tmp_path, {"NEXUS_BOOTSTRAP_KEY_FILE": "/proc/no-such-dir/key"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = done.communicate(timeout=60)
        assert done.returncode == 2
        assert err.decode().strip().splitlines()[-1] == (
            "nexus-data: refusing to start: NEXUS_BOOTSTRAP_KEY_FILE: the first admin key cannot be written to "
            "/proc/no-such-dir/key (No such file or directory): choose a writable file"
        )
        # No key was made, so the next start with a writable file hands one out.
        key_file = tmp_path / "key"
        log = tmp_path / "server.log"
        with log.open("wb") as sink:
            process = _serve(url, tmp_path, {"NEXUS_BOOTSTRAP_KEY_FILE": str(key_file)}, stdout=sink, stderr=subprocess.STDOUT)
        try:
            _wait_for(log, r"serving on 127\.0\.0\.1:(\d+)")
            assert key_file.read_text().startswith("NEXUS_ADMIN_KEY=nx_")
        finally:
            _stop(process)


def test_seeding_an_empty_database_hands_out_the_first_admin_key(client: Client, tmp_path: Path) -> None:
    with fresh_database(client.backend, tmp_path) as url:
        key_file = tmp_path / "key"
        env = {**os.environ, "DATABASE_URL": url, "NEXUS_BOOTSTRAP_KEY_FILE": str(key_file), "NEXUS_HASH_TIME_COST": "1", "NEXUS_HASH_MEMORY_KIB": "1024"}
        subprocess.run([str(NEXUS_DATA), "seed", "--users", "3", "--projects", "1", "--tasks", "1", "--quiet"], env=env, cwd=tmp_path, check=True, timeout=120)
        secret = key_file.read_text().strip().split("=", 1)[1]
        log = tmp_path / "server.log"
        with log.open("wb") as sink:
            process = _serve(url, tmp_path, {"NEXUS_BOOTSTRAP_KEY_FILE": str(tmp_path / "second")}, stdout=sink, stderr=subprocess.STDOUT)
        try:
            port = int(_wait_for(log, r"serving on 127\.0\.0\.1:(\d+)").group(1))
            with calling(f"127.0.0.1:{port}", f"Bearer {secret}") as admin:
                assert admin.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(page_size=1)).audit_log_entries
        finally:
            _stop(process)
        assert not (tmp_path / "second").exists(), "the seeded database had its key: serve makes none"


def test_the_first_admin_key_goes_to_the_terminal_when_there_is_one(client: Client, tmp_path: Path) -> None:
    with fresh_database(client.backend, tmp_path) as url:
        log = tmp_path / "server.log"
        master, terminal = pty.openpty()
        try:
            with log.open("wb") as err:
                process = _serve(url, tmp_path, {}, stdout=terminal, stderr=err, stdin=subprocess.DEVNULL)
            os.close(terminal)
            shown = b""
            deadline = time.monotonic() + 60
            while b"NEXUS_ADMIN_KEY=" not in shown or not shown.split(b"NEXUS_ADMIN_KEY=", 1)[1].count(b"\n"):
                assert time.monotonic() < deadline, shown
                ready, _, _ = select.select([master], [], [], 0.5)
                if ready:
                    shown += os.read(master, 4096)
            _wait_for(log, r"serving on")
        finally:
            with contextlib.suppress(NameError):
                _stop(process)
            os.close(master)
        line = next(x for x in shown.decode().splitlines() if x.startswith("NEXUS_ADMIN_KEY="))
        secret = line.strip().split("=", 1)[1]
        assert secret.startswith("nx_")
        assert secret not in log.read_text()
        assert not (tmp_path / "bootstrap-admin-key").exists() and not (tmp_path / "data").exists()


# ================================================================== the CLI's writes are audited; request ids are checked


def test_cli_writes_are_audited_with_the_operator_and_the_command(client: Client, tmp_path: Path) -> None:
    name = unique("cli")
    done = subprocess.run(
        [str(NEXUS_DATA), "keys", "create", "--name", name, "--role", "guest", "--database-url", client.database_url],
        capture_output=True, text=True, timeout=120, cwd=ROOT, check=False,
    )
    assert done.returncode == 0, done.stderr
    [key] = client.identity.ListApiKeys(ipb.ListApiKeysRequest(filter=f'name = "{name}"')).api_keys
    [entry] = audit_entries(client, f'resource_id = "{key.id}"')
    assert entry.actor_type == spb.ACTOR_TYPE_SYSTEM and entry.actor_id == ""
    assert entry.method == f"cli:keys create by {getpass.getuser()}"
    assert entry.request_id and entry.request_id in done.stderr
    done = subprocess.run(
        [str(NEXUS_DATA), "seed", "--users", "2", "--projects", "1", "--tasks", "1", "--quiet", "--database-url", client.database_url],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
        env=dict(os.environ, NEXUS_BLOB_DIR=str(blob_dir_of(client.database_url))),  # its files beside the other servers'
    )
    assert done.returncode == 0, done.stderr
    seeded = audit_entries(client, f'method = "cli:seed by {getpass.getuser()}"')
    assert {e.resource_type for e in seeded} >= {"User", "Project", "Task"}
    assert len({e.request_id for e in seeded}) == 1 and seeded[0].request_id


@pytest.mark.parametrize("given", ["r" * 129, "has space", 'quote"d', "semi;colon", "<b>", "a/b"])
def test_an_invalid_x_request_id_is_refused_and_writes_nothing(client: Client, given: str) -> None:
    project = client.work.CreateProject(wpb.CreateProjectRequest(project=wpb.Project(name=f"P {unique()}", owner_id=new_user(client).id)))
    title = unique("t")
    request = wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=title))
    err = expect_error(Code.INVALID_ARGUMENT, client.work.CreateTask, request, metadata=[("x-request-id", given)])
    assert [v.field for v in err.violations] == ["x-request-id"] and err.info.reason == "INVALID_REQUEST_ID"
    assert given not in err.message and err.info.metadata.get("request_id", "") != given
    assert client.work.ListTasks(wpb.ListTasksRequest(filter=f'title = "{title}"')).total_size == 0
    # Valid ids: letters, digits and . _ : - up to 128 characters.
    for ok in ("a" * 128, "req-1.2:3_4", str(uuid.uuid4())):
        client.work.ListProjects(LIST, metadata=[("x-request-id", ok)])


def test_a_flood_of_bad_credentials_does_not_flush_proven_keys(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """The credential cache is bounded; when full it drops refusals first, so cheap garbage
    cannot make every proven key pay its hash again."""
    from service.auth import Authenticator
    from tests.support import run_async

    key = new_key(client)
    database = Database(client.database_url)
    try:
        authenticator = Authenticator(database)
        authenticator.max_cached = 8

        async def flood() -> None:
            assert (await authenticator.authenticate(f"Bearer {key.secret}")).actor_id == uuid.UUID(key.id)
            for i in range(3 * authenticator.max_cached):
                with pytest.raises(Exception) as caught:
                    await authenticator.authenticate(f"Bearer garbage-{i}")
                assert getattr(caught.value, "reason", "") == "INVALID_CREDENTIALS"
            assert (await authenticator.authenticate(f"Bearer {key.secret}")).actor_id == uuid.UUID(key.id)

        with counting_hashes(monkeypatch) as hashed:
            run_async(flood())
        assert len(hashed) == 1, hashed
    finally:
        database.dispose()
