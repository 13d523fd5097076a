"""Hostile and unlucky callers on every surface: demoted credentials with open streams, JWT role
claims the server does not know, Structs JSON cannot hold or nested too deep, batches whose
answer a client could not read, forged resume tokens, SIGTERM under a large write, database
settings that cannot work. On SQLite and PostgreSQL."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.work.v1 import work_pb2 as wpb

from tests.conftest import Client, unique
from tests.support import expect_error, mask, new_channel, new_user
from tests.test_stream_access import Code, caller, ends_after_change, key_for, live  # noqa: F401 - a fixture
from tests.test_streams import EventReader, post

ROOT = Path(__file__).resolve().parent.parent
NEXUS = str(Path(sys.executable).with_name("nexus-data"))


# ----------------------------------------------------------------- streams: a demoted *user*


def ends_when_demoted(reader: EventReader, client: Client, user: Any, private: Any) -> None:
    """The stream of a private channel ends PERMISSION_DENIED once its admin user is demoted to
    user, and never delivers a message posted after it."""
    ends_after_change(
        reader,
        lambda: client.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=user.id, role=ipb.USER_ROLE_USER), update_mask=mask("role"))),
        lambda: post(client, private, "after"),
        Code.PERMISSION_DENIED,
        "ROW_ACCESS_DENIED",
    )


def test_a_demoted_users_admin_key_loses_its_stream_of_a_private_channel(client: Client, caller: Callable[..., Any]) -> None:
    """A key acts with min(key role, its user's current role). An admin user's admin key streams a
    private channel it is not a member of; the user is demoted to USER (the key row is untouched).
    A new Get with that key is PERMISSION_DENIED at once, and the open stream must end the same
    way within ~2 s, delivering nothing written after the demotion."""
    user, key, c = caller(role=ipb.USER_ROLE_ADMIN, user_role=ipb.USER_ROLE_ADMIN)
    private = new_channel(client, is_private=True)
    reader = EventReader(c.chat, cpb.StreamEventsRequest(channel_ids=[private.id]))
    live(reader, client, private)
    ends_when_demoted(reader, client, user, private)


# ----------------------------------------------------------------- Struct values no JSON can hold


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_a_struct_number_that_json_cannot_hold_is_invalid_argument(client: Client, number: float) -> None:
    """preferences {"x": NaN/Infinity}: a client's input error, INVALID_ARGUMENT naming
    user.preferences, never INTERNAL/UNKNOWN (and nothing stored)."""
    prefs = struct_pb2.Struct()
    prefs.fields["x"].number_value = number
    name = unique("u")
    with pytest.raises(grpc.RpcError) as caught:
        client.identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(username=name, email=f"{name}@example.com", preferences=prefs)))
    assert caught.value.code() == Code.INVALID_ARGUMENT, f"{caught.value.code()}: {caught.value.details()}"


def nested(depth: int) -> struct_pb2.Struct:
    prefs = struct_pb2.Struct()
    inner = prefs
    for _ in range(depth):  # Struct -> Value -> Struct: two message levels each
        inner = inner.fields["a"].struct_value
    inner.fields["leaf"].string_value = "x"
    return prefs


def test_a_struct_nested_deeper_than_responses_can_carry_is_refused(client: Client) -> None:
    """A Struct nested deeper than MAX_JSON_DEPTH is INVALID_ARGUMENT naming the field (protobuf's
    decoders would refuse a Search page wrapping it); one at that depth is stored, and every
    page that carries it, Search included, stays readable."""
    from db.engine.codecs import MAX_JSON_DEPTH

    err = expect_error(Code.INVALID_ARGUMENT, new_user, client, preferences=nested(MAX_JSON_DEPTH))  # MAX_JSON_DEPTH + 1 levels
    assert err.violations[0].field == "user.preferences"
    tag = unique("deep")
    user = new_user(client, full_name=f"Deep {tag}", preferences=nested(MAX_JSON_DEPTH - 1))
    assert client.identity.GetUser(ipb.GetUserRequest(id=user.id)).preferences == user.preferences
    assert [u.id for u in client.identity.ListUsers(ipb.ListUsersRequest(filter=f'id = "{user.id}"')).users] == [user.id]
    assert user.id in [r.user.id for r in client.identity.SearchUsers(ipb.SearchUsersRequest(query=tag)).results]


# ----------------------------------------------------------------- the database setting


@pytest.mark.parametrize(
    "env_",
    [
        {"DATABASE_URL": "postgresql://nexus:pw@127.0.0.1:1/nexus"},
        {"DATABASE_URL": "postgresql://nexus:pw@127.0.0.1:notaport/nexus"},
        {"DB_HOST": "127.0.0.1", "DB_PORT": "notaport"},
    ],
    ids=["unreachable", "url-port", "DB_PORT"],
)
def test_a_database_setting_that_cannot_work_is_one_clear_line(tmp_path: Path, env_: dict[str, str]) -> None:
    """An unreachable PostgreSQL (or a port that is no number) at start: one line naming the
    setting / the problem, non-zero exit, no 100-line traceback (the unreachable case prints 139
    lines with two tracebacks)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXUS_", "DB_", "DATABASE_URL"))}
    env.update(NEXUS_BOOTSTRAP_KEY_FILE=str(tmp_path / "key"), NEXUS_PORT="0", NEXUS_DB_WAIT_SECONDS="0", **env_)
    done = subprocess.run([NEXUS, "serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Traceback" not in output, f"a traceback ({len(output.splitlines())} lines):\n{output[-500:]}"
    assert "pw@" not in output


# ----------------------------------------------------------------- JWT role claims


@pytest.mark.parametrize("claim", ["Guest", "GUEST", "readonly", ["guest"], "USER_ROLE_GUEST"])
def test_a_jwt_role_claim_the_server_does_not_know_never_grants_the_full_role(client: Client, claim: Any) -> None:
    """The role claim "may lower the user's stored role for that token, never raise it". An
    admin user's token carrying a role claim the server does not recognise ('Guest', a list,
    'readonly') is served with the user's full ADMIN role: the issuer's restriction fails open.
    Expected: the token is refused (UNAUTHENTICATED) or served at the lowest role, so an
    admin-only RPC (ListAuditLogEntries) is refused."""
    from nexus.security.v1 import security_pb2 as spb

    from tests.conftest import make_config
    from tests.test_access import HS_SECRET, JWT_CLAIMS, calling, running, token_for

    user = new_user(client, role=ipb.USER_ROLE_ADMIN, external_id=unique("ext"))
    with running(make_config(client.database_url, jwt_hs256_secret=HS_SECRET, **JWT_CLAIMS)) as server:
        with calling(f"127.0.0.1:{server.port}", f"Bearer {token_for(HS_SECRET, user.external_id, role=claim)}") as me:
            try:
                me.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(page_size=1))
            except grpc.RpcError as exc:
                assert exc.code() in (Code.UNAUTHENTICATED, Code.PERMISSION_DENIED), f"{exc.code()}: {exc.details()}"
            else:
                pytest.fail(f"a token with role claim {claim!r} read the audit log as an admin")


# ----------------------------------------------------------------- BatchCreate answers too large to receive


def test_a_batch_create_a_default_client_cannot_read_the_answer_of_changes_nothing(client: Client) -> None:
    """A client with gRPC's default limits (send: unlimited, receive: 4 MiB, the figure
    NEXUS_MAX_PAGE_BYTES is chosen for) sends BatchCreateTasks of 80 tasks of 65,000-character
    descriptions (5.2 MB, under NEXUS_MAX_MESSAGE_BYTES). The server commits all 80 rows and
    answers 5.2 MB, which the client refuses: it sees RESOURCE_EXHAUSTED ("Received message larger
    than max"), a code that reads as "refused, nothing done", with no committed metadata, so a retry
    without request_id writes the 80 rows again. As BatchGet does (RESPONSE_TOO_LARGE), the server
    should refuse before committing a batch whose answer passes NEXUS_MAX_PAGE_BYTES (or answer
    within it)."""
    from tests.test_access import project_of

    marker = unique("big")
    project = project_of(client, new_user(client, role=ipb.USER_ROLE_MANAGER).id)
    request = wpb.BatchCreateTasksRequest(
        requests=[wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{marker} {i}", description="d" * 65_000)) for i in range(80)]
    )
    try:
        answer = client.work.BatchCreateTasks(request, timeout=60)  # the fixture's channel: default options
    except grpc.RpcError as exc:
        stored = client.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"', page_size=1)).total_size
        assert stored == 0, f"the client saw {exc.code()} ({exc.details()}) yet {stored} rows were committed"
    else:
        assert len(answer.tasks) == 80


# ----------------------------------------------------------------- a JWT demoted elsewhere


def test_a_jwt_admin_demoted_through_another_replica_loses_its_stream_within_the_bound(client: Client) -> None:
    """Replica A (JWTs accepted) streams a private channel to an admin user's JWT; the user is
    demoted through replica B (the `client` server). A's re-check (B's NOTIFY on PostgreSQL, the
    1 s periodic one on SQLite) asks the Authenticator for the JWT's role, which answers from its
    cache (NEXUS_AUTH_RECHECK_SECONDS, 5 s) with ADMIN; stream_access does not read a JWT user's
    role itself. So the stream outlives the 2 s bound and delivers events committed after the
    demotion."""
    from tests.conftest import make_config
    from tests.test_access import HS_SECRET, JWT_CLAIMS, calling, running, token_for

    user = new_user(client, role=ipb.USER_ROLE_ADMIN, external_id=unique("ext"))
    private = new_channel(client, is_private=True)
    with running(make_config(client.database_url, jwt_hs256_secret=HS_SECRET, **JWT_CLAIMS)) as server:
        with calling(f"127.0.0.1:{server.port}", f"Bearer {token_for(HS_SECRET, user.external_id)}") as me:
            reader = EventReader(me.chat, cpb.StreamEventsRequest(channel_ids=[private.id]))  # type: ignore[arg-type]
            live(reader, client, private)
            ends_when_demoted(reader, client, user, private)


# ----------------------------------------------------------------- SIGTERM during a large BatchCreate


def test_sigterm_lets_a_large_batch_create_under_way_deliver_its_answer(client: Client, tmp_path: Path) -> None:
    """README: on SIGTERM "calls under way finished within the grace, then exit". A
    BatchCreateTasks of 1,000 rows (14 MB) is under way when SIGTERM arrives, grace 10 s: the
    server commits all 1,000 rows, the Gate counts the call done when the handler returns
    (before grpc has written the 14 MB answer), and serve() reaches os._exit while the answer
    is still being sent. The client gets UNAVAILABLE "Stream removed (Socket closed / Connection
    reset)" with no ErrorInfo - the code the README calls safe to retry - although all 1,000
    rows were committed: a retry without request_id writes them twice. Expected: the answer
    (OK, 1,000 tasks) reaches the client before the process exits. (SIGTERM is sent at a few
    delays: an attempt refused before it began, nothing committed, proves nothing.)"""
    import signal
    import threading

    from nexus.work.v1 import work_pb2_grpc

    from tests.conftest import authed_channel
    from tests.test_access import project_of
    from tests.test_server import SERVING, _free_port, health_of, serve_process, wait_for

    for attempt, delay in enumerate((0.15, 0.3, 0.5, 0.8)):
        project = project_of(client, new_user(client, role=ipb.USER_ROLE_MANAGER).id)
        port = _free_port()
        log = (tmp_path / f"server{attempt}.log").open("w+")
        proc = serve_process(client.database_url, port, log, NEXUS_DRAIN_SECONDS="0.2", NEXUS_GRACE_SECONDS="10")
        channel = authed_channel(f"127.0.0.1:{port}", client.admin_secret, options=[("grpc.max_receive_message_length", -1)])
        outcome: dict[str, Any] = {}
        try:
            grpc.channel_ready_future(channel).result(timeout=30)
            assert wait_for(lambda: health_of(channel, "readiness") == SERVING, timeout=30)  # noqa: B023 - called within this iteration
            request = wpb.BatchCreateTasksRequest(
                requests=[wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"b{i}", description="é" * 7_000)) for i in range(1000)]
            )

            def send(channel: grpc.Channel = channel, request: wpb.BatchCreateTasksRequest = request, outcome: dict[str, Any] = outcome) -> None:
                try:
                    outcome["ok"] = len(work_pb2_grpc.WorkServiceStub(channel).BatchCreateTasks(request, timeout=60).tasks)
                except grpc.RpcError as exc:
                    outcome["error"] = exc  # noqa: B023 - this except clause binds exc (the loop's exc is another name)

            t = threading.Thread(target=send)
            t.start()
            time.sleep(delay)
            proc.send_signal(signal.SIGTERM)
            t.join(60)
            assert proc.wait(timeout=30) == 0
        finally:
            channel.close()
            if proc.poll() is None:
                proc.kill()
        stored = client.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"', page_size=1)).total_size
        if "ok" in outcome:
            assert stored == 1000
            continue
        exc = outcome["error"]
        assert stored in (0, 1000), stored
        if stored:
            pytest.fail(
                f"SIGTERM {delay} s after the call: it got {exc.code()} ({exc.details()}), no answer, with the grace "
                f"unused, yet all {stored} rows were committed"
            )


# ----------------------------------------------------------------- forged resume tokens


def forged_token(positions: list[tuple[str, int]]) -> str:
    import base64
    import zlib

    raw = ";".join(f"{scope}={seq}" for scope, seq in positions).encode()
    return base64.urlsafe_b64encode(zlib.crc32(raw).to_bytes(4, "big") + raw).decode().rstrip("=")


@pytest.mark.parametrize("spelling", ["upper", "braces", "urn", "hex"])
def test_a_forged_token_naming_a_visible_channel_in_another_spelling_is_invalid_argument(client: Client, spelling: str) -> None:
    """A resume token is checksummed, not signed. Its scope "channels/<id>" is checked with
    uuid.UUID (any spelling: upper case, braces, urn:uuid:, no hyphens) but used as a string:
    expected INVALID_ARGUMENT (INVALID_RESUME_TOKEN), or a stream of that channel that delivers
    its events; never INTERNAL/UNKNOWN."""
    channel = new_channel(client)
    raw = {"upper": channel.id.upper(), "braces": "{" + channel.id + "}", "urn": "urn:uuid:" + channel.id, "hex": channel.id.replace("-", "")}[spelling]
    reader = EventReader(client.chat, cpb.StreamEventsRequest(resume_token=forged_token([(f"channels/{raw}", 0)])))
    time.sleep(0.5)
    if reader.done.is_set():
        assert reader.error is not None and reader.error.code() == Code.INVALID_ARGUMENT, f"{reader.error and reader.error.code()}: {reader.error and reader.error.details()}"
        return
    post(client, channel, "seen")
    got = reader.quiet(3)
    reader.call.cancel()
    assert [g.chat_message.content for g in got] == ["seen"], f"the forged stream is open but delivered {len(got)} events"


def test_a_forged_token_cannot_follow_more_than_1000_scopes(client: Client) -> None:
    """Public channels' ids in 1,001 spellings (case of the hex letters, braces, urn:, no hyphens): a
    forged resume token naming them all must be refused like 1,001 channel_ids are
    (INVALID_ARGUMENT), not open a stream following 1,001 scopes (one query each)."""
    import itertools

    spellings: list[str] = []
    while len(spellings) < 1001:  # a few public channels, each id in many spellings
        cid = new_channel(client).id
        letters = [i for i, ch in enumerate(cid) if ch in "abcdef"]
        for mask_ in itertools.product((0, 1), repeat=min(len(letters), 8)):
            chars = list(cid)
            for bit, i in zip(mask_, letters, strict=False):
                if bit:
                    chars[i] = chars[i].upper()
            spelled = "".join(chars)
            spellings += [spelled, "{" + spelled + "}", "urn:uuid:" + spelled, spelled.replace("-", "")]
    spellings = list(dict.fromkeys(spellings))[:1001]
    token = forged_token([(f"channels/{s}", 0) for s in spellings])
    reader = EventReader(client.chat, cpb.StreamEventsRequest(resume_token=token))
    assert reader.done.wait(15), "a stream of 1,001 forged scopes is open"
    assert reader.error is not None and reader.error.code() == Code.INVALID_ARGUMENT, f"{reader.error.code()}: {reader.error.details()}"
