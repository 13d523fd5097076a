"""AIService against hostile callers and bad days: another user's rows reached through batches,
page tokens and streams, concurrent moves of one job, a watch that outlives its caller's sight of
the job, its role or its credential, a database outage under a watch, migrations with data.
(Token counts and costs past their bounds: tests/test_ai_usage.py.)"""
from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from nexus.ai.v1 import ai_pb2 as apb
from nexus.identity.v1 import identity_pb2 as ipb

from tests.conftest import Client, ServerThread, connect, make_config
from tests.support import expect_error, rich_error
from tests.test_access import Actor, actor  # noqa: F401 - the fixture
from tests.test_ai_jobs import ANALYSIS, KINDS, RUNNING, Kind
from tests.test_ai_usage import MODEL, _batch, _span, _summary, _ts

Code = grpc.StatusCode


# ------------------------------------------------------------------ writes for another user


def test_a_batch_may_not_record_interactions_for_another_user(actor: Callable[..., Actor], client: Client) -> None:
    ann, bob = actor(), actor()
    start = _span()
    rows = [apb.AIInteraction(module="m", model="forged", request_time=_ts(start)) for _ in range(5)]
    rows[3].user_id = bob.id
    expect_error(Code.PERMISSION_DENIED, _batch, ann.c, rows)
    assert _summary(client, start, start + dt.timedelta(hours=1), [MODEL])[0] == [], "all or nothing"


# ------------------------------------------------------------------ concurrent moves


@pytest.mark.parametrize("kind", KINDS)
def test_two_completes_at_once_make_one_move(kind: Kind, actor: Callable[..., Actor]) -> None:
    owner = actor()
    for _ in range(5):
        job = kind.in_status(owner.c, RUNNING)
        barrier = threading.Barrier(2)
        outcomes: list[Any] = [None, None]

        def complete(i: int) -> None:
            barrier.wait()  # noqa: B023 - the threads are joined within this iteration
            try:
                outcomes[i] = kind.move(owner.c, "Complete", job.id)  # noqa: B023 - the threads are joined within this iteration
            except grpc.RpcError as exc:
                outcomes[i] = rich_error(exc)  # noqa: B023 - the threads are joined within this iteration

        threads = [threading.Thread(target=complete, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        made = [o for o in outcomes if isinstance(o, kind.message)]
        refused = [o for o in outcomes if not isinstance(o, kind.message)]
        assert len(made) == 1, outcomes
        assert refused[0].code == Code.FAILED_PRECONDITION and refused[0].info.reason == "ILLEGAL_STATUS_TRANSITION", refused[0].message


@pytest.mark.parametrize("kind", KINDS)
def test_an_update_racing_a_start_changes_only_a_pending_job(kind: Kind, actor: Callable[..., Actor]) -> None:
    """Update and Start of one PENDING job at once: either the Update came first (Start's answer
    carries its change) or it is refused JOB_NOT_PENDING; a RUNNING job is never changed."""
    owner = actor()
    name, value = kind.change
    for _ in range(8):
        job = kind.create(owner.c)
        barrier = threading.Barrier(2)
        outcomes: dict[str, Any] = {}

        def run(label: str, fn: Callable[[], Any]) -> None:
            barrier.wait()  # noqa: B023 - the threads are joined within this iteration
            try:
                outcomes[label] = fn()  # noqa: B023 - the threads are joined within this iteration
            except grpc.RpcError as exc:
                outcomes[label] = rich_error(exc)  # noqa: B023 - the threads are joined within this iteration

        threads = [
            threading.Thread(target=run, args=("update", lambda: kind.update(owner.c, job.id, **{name: value}))),  # noqa: B023 - the threads are joined within this iteration
            threading.Thread(target=run, args=("start", lambda: kind.move(owner.c, "Start", job.id))),  # noqa: B023 - the threads are joined within this iteration
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        started, updated = outcomes["start"], outcomes["update"]
        now = kind.get(owner.c, job.id)
        assert now.status == RUNNING, outcomes
        if isinstance(updated, kind.message):
            assert isinstance(started, kind.message) and getattr(started, name) == value, "an Update applied after the Start"
            assert getattr(now, name) == value
        else:
            assert updated.code in (Code.FAILED_PRECONDITION, Code.ABORTED), updated.message
            assert getattr(now, name) == getattr(job, name)


# ------------------------------------------------------------------ a watch and its caller's sight


def _blocked_when_idle(server: ServerThread, scope: str) -> threading.Event:
    """Stop server's event loop, once every stream of scope waits for a wake-up (no read of it
    under way), until the returned event is set: nothing it serves moves meanwhile."""
    release, held = threading.Event(), threading.Event()
    assert server.app is not None
    hub = server.app.hub

    async def hold() -> None:
        end = asyncio.get_running_loop().time() + 30
        while asyncio.get_running_loop().time() < end:
            subs = hub._subs.get(scope, ())
            if subs and all(sub.queue._getters for sub in subs):  # each awaits its queue
                break
            await asyncio.sleep(0.005)
        held.set()
        release.wait(60)

    asyncio.run_coroutine_threadsafe(hold(), server.loop)
    assert held.wait(40)
    return release


@pytest.mark.parametrize("kind", KINDS)
def test_a_watch_does_not_send_states_written_while_its_caller_could_not_see_the_job(
    kind: Kind, client: Client, actor: Callable[..., Actor]
) -> None:
    """The owner watches through one server (a replica); through another, an admin gives the job
    to another user, who writes into it, and the admin gives it back. The states of the job
    while it was the other user's are not the owner's to see; the stream should end with
    PERMISSION_DENIED (as it does when the watch reads the move at once) and never carry them."""
    owner, heir = actor(), actor()
    replica = ServerThread(make_config(client.database_url)).start()
    watcher = connect(client.backend, client.database_url, replica, secret=owner.key.secret)
    try:
        assert replica.app is not None
        (service,) = [s for s in replica.app.servicers if type(s).__name__ == "AIService"]
        service.watch_recheck_seconds = 3600.0
        job = kind.create(owner.c)
        stream = kind.watch(watcher, job.id)
        assert next(stream) == job
        scope = f"{'data_analyses' if kind is ANALYSIS else 'tool_generations'}/{job.id}"
        release = _blocked_when_idle(replica, scope)  # the replica reads nothing until the three writes are made
        try:
            kind.update(client, job.id, user_id=heir.id)
            name = kind.change[0]
            secret = kind.update(heir.c, job.id, **{name: "the heir's private notes"})
            kind.update(client, job.id, user_id=owner.id)
        finally:
            release.set()
        seen: list[Any] = []
        try:
            for state in stream:
                seen.append(state)
                if getattr(state, name) == getattr(secret, name) or len(seen) >= 3:
                    break
        except grpc.RpcError as exc:
            assert rich_error(exc).code == Code.PERMISSION_DENIED
        stream.cancel()
        leaked = [s for s in seen if s.user_id == heir.id]
        assert leaked == [], f"the owner's watch sent the job's states while it was another user's: {[getattr(s, name) for s in leaked]}"
    finally:
        watcher.channel.close()
        replica.stop()


@pytest.mark.parametrize("kind", KINDS)
def test_a_watch_ends_when_its_key_is_revoked(kind: Kind, client: Client, actor: Callable[..., Actor]) -> None:
    owner = actor()
    job = kind.create(owner.c)
    stream = kind.watch(owner.c, job.id)
    assert next(stream) == job
    client.identity.RevokeApiKey(ipb.RevokeApiKeyRequest(id=owner.key.id))
    kind.move(client, "Start", job.id)  # a commit of the job wakes the watch
    with pytest.raises(grpc.RpcError) as caught:
        state = next(stream)
        pytest.fail(f"a revoked key's watch sent {state.status}")
    assert rich_error(caught.value).code in (Code.UNAUTHENTICATED, Code.PERMISSION_DENIED)


# ------------------------------------------------------------------ analyses' files


def test_a_file_link_may_not_be_moved_to_another_users_analysis_by_star_mask(actor: Callable[..., Actor]) -> None:
    from tests.support import mask, new_file

    owner, other = actor(), actor()
    mine = ANALYSIS.create(owner.c)
    theirs = ANALYSIS.create(other.c)
    link = owner.c.ai.CreateAnalysisFile(apb.CreateAnalysisFileRequest(analysis_file=apb.AnalysisFile(analysis_id=mine.id, file_id=new_file(owner.c).id)))
    star = apb.UpdateAnalysisFileRequest(analysis_file=apb.AnalysisFile(id=link.id, analysis_id=theirs.id, file_id=link.file_id), update_mask=mask("*"))
    try:
        owner.c.ai.UpdateAnalysisFile(star)  # "*" leaves immutable fields alone
    except grpc.RpcError as exc:
        assert rich_error(exc).code in (Code.PERMISSION_DENIED, Code.INVALID_ARGUMENT)
    assert owner.c.ai.GetAnalysisFile(apb.GetAnalysisFileRequest(id=link.id)).analysis_id == mine.id
    assert other.c.ai.ListAnalysisFiles(apb.ListAnalysisFilesRequest(filter=f'analysis_id = "{theirs.id}"')).analysis_files == []


# ------------------------------------------------------------------ bad days


def test_a_watch_across_a_database_outage_ends_unavailable_or_goes_on_without_a_gap() -> None:
    """PostgreSQL goes away while a Watch waits and comes back: the stream either ended with
    UNAVAILABLE (watch again) or sends the next state; it never hangs nor skips one."""
    from tests.test_server import NOT_SERVING, SERVING, blinking_postgres_server, health_of, wait_for

    with blinking_postgres_server(health_interval_seconds=0.2) as (c, proxy):
        job = ANALYSIS.create(c)
        stream = ANALYSIS.watch(c, job.id)
        assert next(stream) == job
        proxy.close()
        assert wait_for(lambda: health_of(c.channel, "readiness") == NOT_SERVING, timeout=30)
        proxy.open()
        assert wait_for(lambda: health_of(c.channel, "readiness") == SERVING, timeout=30)
        running = ANALYSIS.move(c, "Start", job.id)
        done = ANALYSIS.move(c, "Complete", job.id)
        try:
            got = list(stream)
        except grpc.RpcError as exc:
            assert rich_error(exc).code == Code.UNAVAILABLE, rich_error(exc).message
            got = [running, *ANALYSIS.watch(c, job.id)]  # watched again: the state now, the end
        assert got == [running, done]


def test_ai_tables_with_rows_go_down_and_up_again(tmp_path: Any, request: pytest.FixtureRequest, database_url: str) -> None:
    """Migrations down past the AI tables and up again with rows in them (and their stream
    events left in the change log): the server starts, sums and watches as before."""
    from db import migrate
    from db.database import Database
    from tests.databases import fresh_postgres_database

    def check(url: str) -> None:
        server = ServerThread(make_config(url)).start()
        c = connect("sqlite" if url.startswith("sqlite") else "postgresql", url, server)
        try:
            start = _span()
            _batch(c, [apb.AIInteraction(module="m", model="before", request_time=_ts(start), latency={"seconds": 1})])
            job = ANALYSIS.in_status(c, RUNNING)
            ANALYSIS.move(c, "Complete", job.id)
        finally:
            c.channel.close()
            server.stop()
        database = Database(url)
        try:
            migrate.downgrade(database.engine, "0011")
            migrate.upgrade(database.engine)
        finally:
            database.dispose()
        server = ServerThread(make_config(url)).start()
        c = connect("sqlite" if url.startswith("sqlite") else "postgresql", url, server)
        try:
            start = _span()
            _batch(c, [apb.AIInteraction(module="m", model="after", request_time=_ts(start), latency={"seconds": 2})])
            [group] = _summary(c, start, start + dt.timedelta(hours=1), [MODEL])[0]
            assert (group.model, group.latency_p50.seconds) == ("after", 2)
            job = ANALYSIS.create(c)
            stream = ANALYSIS.watch(c, job.id)
            assert next(stream) == job
            running = ANALYSIS.move(c, "Start", job.id)
            assert next(stream) == running
            stream.cancel()
        finally:
            c.channel.close()
            server.stop()

    if database_url.startswith("sqlite"):
        check(f"sqlite:///{tmp_path / 'updown.db'}")
    else:
        with fresh_postgres_database("nexus_ai_updown") as url:
            check(url)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("lowered", ["user", "key"])
def test_a_watch_ends_when_its_callers_admin_role_is_lowered(kind: Kind, lowered: str, client: Client, actor: Callable[..., Actor]) -> None:
    """An admin watches another user's job; then the admin's user (or its API key) is made an
    ordinary USER. The next state must not reach it: the stream ends with PERMISSION_DENIED (as a
    new Watch or Get of that job by it now is refused)."""
    from tests.support import mask

    owner, admin = actor(), actor(ipb.USER_ROLE_ADMIN)
    job = kind.create(owner.c)
    stream = kind.watch(admin.c, job.id)
    assert next(stream) == job
    if lowered == "user":
        client.identity.UpdateUser(ipb.UpdateUserRequest(user=ipb.User(id=admin.id, role=ipb.USER_ROLE_USER), update_mask=mask("role")))
    else:
        client.identity.UpdateApiKey(ipb.UpdateApiKeyRequest(api_key=ipb.ApiKey(id=admin.key.id, role=ipb.USER_ROLE_USER), update_mask=mask("role")))
    expect_error(Code.PERMISSION_DENIED, kind.get, admin.c, job.id)  # the lowered caller now sees nothing of it
    kind.move(owner.c, "Start", job.id)  # a commit of the job wakes the watch
    with pytest.raises(grpc.RpcError) as caught:
        state = next(stream)
        stream.cancel()
        pytest.fail(f"a caller lowered to USER still watches another user's job: it was sent {apb.JobStatus.Name(state.status)}")
    assert rich_error(caught.value).code == Code.PERMISSION_DENIED


def test_a_summary_page_token_replayed_or_forged_by_another_user_reaches_only_their_rows(actor: Callable[..., Actor]) -> None:
    """Ann's page token (its keys: her model names) replayed by Bob, and a token made by hand
    from the format (checksum and all) with keys before everything: Bob gets his own groups
    after that position, or a refusal; never a group of Ann's."""
    import base64
    import hashlib
    import json

    from db.engine import paging

    ann, bob = actor(), actor()
    start = _span()
    end = start + dt.timedelta(hours=1)
    _batch(ann.c, [apb.AIInteraction(module="m", model=f"ann-{i}", request_time=_ts(start)) for i in range(3)])
    _batch(bob.c, [apb.AIInteraction(module="m", model=f"bob-{i}", request_time=_ts(start)) for i in range(3)])
    request = apb.GetAIUsageSummaryRequest(start_time=_ts(start), end_time=_ts(end), group_by=[MODEL], page_size=1)
    ann_page = ann.c.ai.GetAIUsageSummary(request)
    assert [g.model for g in ann_page.groups] == ["ann-0"] and ann_page.total_size == 3
    request.page_token = ann_page.next_page_token
    replayed = bob.c.ai.GetAIUsageSummary(request)
    assert all(g.model.startswith("bob-") for g in replayed.groups) and replayed.total_size == 3
    raw = json.dumps({"q": json.loads(base64.urlsafe_b64decode(ann_page.next_page_token + "==")[6:])["q"], "k": [["v", ""], ["v", ""]]}, separators=(",", ":")).encode()
    request.page_token = base64.urlsafe_b64encode(hashlib.sha256(raw).digest()[:6] + raw).decode().rstrip("=")
    assert paging.decode_token(request.page_token, json.loads(raw)["q"], 2)["k"] == ["", ""]
    request.page_size = 100
    forged = bob.c.ai.GetAIUsageSummary(request)
    assert [g.model for g in forged.groups] == ["bob-0", "bob-1", "bob-2"]


def test_another_users_request_id_returns_nothing_of_theirs(actor: Callable[..., Actor]) -> None:
    """Idempotency keys: Bob repeating Ann's request_id (in one create or inside a batch) gets a
    row of his own or a refusal, never Ann's interaction (her prompt)."""
    import uuid as uuid_mod

    ann, bob = actor(), actor()
    key = str(uuid_mod.uuid4())
    hers = ann.c.ai.CreateAIInteraction(apb.CreateAIInteractionRequest(
        ai_interaction=apb.AIInteraction(module="m", model="x", prompt="ann's secret"), request_id=key))
    attempts = [
        lambda: [bob.c.ai.CreateAIInteraction(apb.CreateAIInteractionRequest(ai_interaction=apb.AIInteraction(module="m", model="x"), request_id=key))],
        lambda: list(bob.c.ai.BatchCreateAIInteractions(apb.BatchCreateAIInteractionsRequest(requests=[
            apb.CreateAIInteractionRequest(ai_interaction=apb.AIInteraction(module="m", model="x"), request_id=key)])).ai_interactions),
    ]
    for attempt in attempts:
        try:
            got = attempt()
        except grpc.RpcError as exc:
            assert rich_error(exc).code in (Code.INVALID_ARGUMENT, Code.ALREADY_EXISTS, Code.FAILED_PRECONDITION, Code.PERMISSION_DENIED)
            continue
        assert all(m.id != hers.id and m.prompt != "ann's secret" and m.user_id == bob.id for m in got), got




def test_watches_count_against_the_callers_limit_of_open_streams(client: Client, actor: Callable[..., Actor]) -> None:
    """NEXUS_MAX_STREAMS_PER_CALLER bounds a caller's open streams: Watches of jobs are streams
    like StreamEvents, so a caller at its limit with StreamEvents may not open Watches beyond
    it (and Watches alone stop at the limit)."""
    from nexus.chat.v1 import chat_pb2 as cpb

    owner = actor()
    server = ServerThread(make_config(client.database_url, max_streams_per_caller=2)).start()
    c = connect(client.backend, client.database_url, server, secret=owner.key.secret)
    opened: list[Any] = []
    try:
        jobs = [ANALYSIS.create(c) for _ in range(3)]
        for job in jobs[:2]:
            opened.append(ANALYSIS.watch(c, job.id))
            assert next(opened[-1]).id == job.id
        err = expect_error(Code.RESOURCE_EXHAUSTED, lambda: next(ANALYSIS.watch(c, jobs[2].id)))
        for s in opened:
            s.cancel()
        opened.clear()
        channel = c.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"limits-{jobs[0].id[-8:]}")))
        for _ in range(2):
            opened.append(c.chat.StreamEvents(cpb.StreamEventsRequest(channel_ids=[channel.id], heartbeat_seconds=1), timeout=60))
            next(opened[-1])
        err = expect_error(Code.RESOURCE_EXHAUSTED, lambda: next(ANALYSIS.watch(c, jobs[2].id)))
        assert err.info.reason
    finally:
        for s in opened:
            s.cancel()
        c.channel.close()
        server.stop()
