"""AIService jobs: data analyses and tool generations moved PENDING -> RUNNING -> COMPLETED |
FAILED by their own methods only (every other move refused, naming both statuses), their times
the server's, Update only while PENDING; an analysis's files (Files it links, removed with it);
Watch streams (states in order to the end, a finished job once, strangers refused, a deleted row
or lost access ending the stream); and who may reach a job by every way there is.

The standard methods of the three resources are also covered by the registry-driven suites
(tests/test_standard_methods.py, test_access_matrix.py, ...) through their samples."""
from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from nexus.ai.v1 import ai_pb2 as apb
from nexus.files.v1 import files_pb2 as fpb
from nexus.security.v1 import security_pb2 as spb

from tests.conftest import Client, ServerThread, connect, make_config, unique
from tests.support import expect_error, mask, new_file, rich_error
from tests.test_access import Actor, actor  # noqa: F401 - the fixture

Code = grpc.StatusCode
PENDING, RUNNING, COMPLETED, FAILED = apb.JOB_STATUS_PENDING, apb.JOB_STATUS_RUNNING, apb.JOB_STATUS_COMPLETED, apb.JOB_STATUS_FAILED
STATUSES = (PENDING, RUNNING, COMPLETED, FAILED)
METHODS = ("Start", "Complete", "Fail")
# The legal moves, as the API documents them: (from, method) -> to.
LEGAL = {(PENDING, "Start"): RUNNING, (RUNNING, "Complete"): COMPLETED, (PENDING, "Fail"): FAILED, (RUNNING, "Fail"): FAILED}
WATCH_DEADLINE = 60  # seconds: a stream that should have answered fails the test instead of hanging it


@dataclass(frozen=True)
class Kind:
    """One of the two job resources, as the tests call it."""

    name: str  # "DataAnalysis"
    plural: str
    field: str  # the singular field of requests
    message: Any
    fields: Callable[[str], dict[str, Any]]
    change: tuple[str, Any]  # an updatable field and a new value
    search_word: Callable[[Any], str]
    list_field: str  # the repeated field of List and BatchGet responses

    def stub(self, c: Client) -> Any:
        return c.ai

    def create(self, c: Client, **fields: Any) -> Any:
        values = self.fields(unique("w"))
        values.update(fields)
        request = getattr(apb, f"Create{self.name}Request")(**{self.field: self.message(**values)})
        return getattr(c.ai, f"Create{self.name}")(request)

    def get(self, c: Client, job_id: str) -> Any:
        return getattr(c.ai, f"Get{self.name}")(getattr(apb, f"Get{self.name}Request")(id=job_id))

    def move(self, c: Client, method: str, job_id: str, etag: str = "", **extra: Any) -> Any:
        if method == "Fail" and "error" not in extra:
            extra["error"] = "the model gave up"
        if method == "Complete" and not extra:
            extra = self.outcome()
        request = getattr(apb, f"{method}{self.name}Request")(id=job_id, etag=etag, **extra)
        return getattr(c.ai, f"{method}{self.name}")(request)

    def outcome(self) -> dict[str, Any]:
        if self.name == "DataAnalysis":
            return {"result": struct_pb2.Struct(fields={"r2": struct_pb2.Value(string_value="0.91")})}
        return {"generated_code": "def parse(text):\n    return text.split(',')", "output": "1 function"}

    def update(self, c: Client, job_id: str, **fields: Any) -> Any:
        request = getattr(apb, f"Update{self.name}Request")(**{self.field: self.message(id=job_id, **fields)}, update_mask=mask(*fields))
        return getattr(c.ai, f"Update{self.name}")(request)

    def delete(self, c: Client, job_id: str) -> Any:
        return getattr(c.ai, f"Delete{self.name}")(getattr(apb, f"Delete{self.name}Request")(id=job_id))

    def watch(self, c: Client, job_id: str) -> Any:
        return getattr(c.ai, f"Watch{self.name}")(getattr(apb, f"Watch{self.name}Request")(id=job_id), timeout=WATCH_DEADLINE)

    def in_status(self, c: Client, status: int, **fields: Any) -> Any:
        """A new job of the caller of c, moved to status by the legal moves."""
        job = self.create(c, **fields)
        if status in (RUNNING, COMPLETED):
            job = self.move(c, "Start", job.id)
        if status == COMPLETED:
            job = self.move(c, "Complete", job.id)
        if status == FAILED:
            job = self.move(c, "Fail", job.id)
        assert job.status == status
        return job


ANALYSIS = Kind(
    "DataAnalysis", "DataAnalyses", "data_analysis", apb.DataAnalysis,
    lambda w: {"title": f"{w} revenue by region", "analysis_type": "summary"},
    ("title", "renamed analysis"),
    lambda job: job.title.split()[0],
    "data_analyses",
)
GENERATION = Kind(
    "ToolGeneration", "ToolGenerations", "tool_generation", apb.ToolGeneration,
    lambda w: {"prompt": f"{w} a parser of invoices", "tool_type": "python"},
    ("prompt", "a parser of receipts"),
    lambda job: job.prompt.split()[0],
    "tool_generations",
)
KINDS = [pytest.param(ANALYSIS, id="DataAnalysis"), pytest.param(GENERATION, id="ToolGeneration")]


def _time(ts: Any) -> dt.datetime:
    return ts.ToDatetime(tzinfo=dt.UTC)


@pytest.fixture(autouse=True)
def watches_woken_by_commits_only(client: Client) -> Iterator[None]:
    """The server's Watches re-read their job only when a commit of its scope wakes them (not
    every recheck interval as well): each state a test expects comes by the change log's wake-up."""
    assert client.server.app is not None
    (service,) = [s for s in client.server.app.servicers if type(s).__name__ == "AIService"]
    service.watch_recheck_seconds = 3600.0
    yield
    service.watch_recheck_seconds = None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _entries(c: Client, resource_id: str) -> list[spb.AuditLogEntry]:
    page = c.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(filter=f'resource_id = "{resource_id}"', page_size=100))
    return list(page.audit_log_entries)


# ------------------------------------------------------------------ the lifecycle


@pytest.mark.parametrize("kind", KINDS)
def test_every_move_of_every_status_is_refused_or_made_as_the_graph_says(kind: Kind, actor: Callable[..., Actor]) -> None:
    owner = actor()
    for status in STATUSES:
        for method in METHODS:
            job = kind.in_status(owner.c, status)
            target = LEGAL.get((status, method))
            if target is None:
                err = expect_error(Code.FAILED_PRECONDITION, kind.move, owner.c, method, job.id)
                assert err.info.reason == "ILLEGAL_STATUS_TRANSITION", (status, method)
                asked = {"Start": RUNNING, "Complete": COMPLETED, "Fail": FAILED}[method]
                assert err.info.metadata["current_status"] == apb.JobStatus.Name(status)
                assert err.info.metadata["requested_status"] == apb.JobStatus.Name(asked)
                assert kind.get(owner.c, job.id) == job, "a refused move changes nothing"
                continue
            before = _now()
            moved = kind.move(owner.c, method, job.id, etag=job.etag)
            after = _now()
            assert moved.status == target and moved.etag != job.etag
            stamped = moved.started_time if target == RUNNING else moved.completed_time
            assert before <= _time(stamped) <= after, (status, method)
            if target == RUNNING:
                assert not moved.HasField("completed_time")
            else:
                assert moved.started_time == job.started_time, "a finish keeps the start"
            assert kind.get(owner.c, job.id) == moved


@pytest.mark.parametrize("kind", KINDS)
def test_completion_and_failure_keep_what_they_carry_and_failure_needs_its_error(kind: Kind, actor: Callable[..., Actor]) -> None:
    owner = actor()
    running = kind.in_status(owner.c, RUNNING)
    done = kind.move(owner.c, "Complete", running.id, **kind.outcome())
    if kind is ANALYSIS:
        assert done.result == kind.outcome()["result"]
    else:
        assert (done.generated_code, done.output) == (kind.outcome()["generated_code"], kind.outcome()["output"])
    assert done.started_time == running.started_time and not done.error
    pending = kind.create(owner.c)
    err = expect_error(Code.INVALID_ARGUMENT, kind.move, owner.c, "Fail", pending.id, error="")
    assert [v.field for v in err.violations] == ["error"]
    assert kind.get(owner.c, pending.id) == pending
    failed = kind.move(owner.c, "Fail", pending.id, error="out of memory")
    assert (failed.status, failed.error, failed.HasField("started_time")) == (FAILED, "out of memory", False)


@pytest.mark.parametrize("kind", KINDS)
def test_a_stale_etag_refuses_a_move(kind: Kind, actor: Callable[..., Actor]) -> None:
    owner = actor()
    job = kind.create(owner.c)
    kind.update(owner.c, job.id, **dict([kind.change]))
    err = expect_error(Code.ABORTED, kind.move, owner.c, "Start", job.id, etag=job.etag)
    assert err.info.reason == "ETAG_MISMATCH"
    assert kind.get(owner.c, job.id).status == PENDING


@pytest.mark.parametrize("kind", KINDS)
def test_each_move_is_audited_with_its_status_change(kind: Kind, client: Client, actor: Callable[..., Actor]) -> None:
    owner = actor()
    job = kind.in_status(owner.c, COMPLETED)
    entries = _entries(client, job.id)
    assert [e.action for e in entries] == [spb.AUDIT_ACTION_CREATE, spb.AUDIT_ACTION_UPDATE, spb.AUDIT_ACTION_UPDATE]
    moves = [{ch.field for ch in e.changes} for e in entries[1:]]
    assert {"status", "started_time"} <= moves[0] and {"status", "completed_time"} <= moves[1]
    assert [e.method.rsplit("/", 1)[-1] for e in entries[1:]] == [f"Start{kind.name}", f"Complete{kind.name}"]


@pytest.mark.parametrize("kind", KINDS)
def test_create_and_update_set_no_status_no_outcome_and_update_only_while_pending(
    kind: Kind, client: Client, actor: Callable[..., Actor]
) -> None:
    owner = actor()
    ts = struct_pb2.Struct()
    ts.update({"x": "y"})
    outputs: dict[str, Any] = {"status": COMPLETED, "error": "made up"}
    if kind is ANALYSIS:
        outputs["result"] = ts
    else:
        outputs.update(generated_code="print(1)", output="1")
    job = kind.create(owner.c, **outputs)
    assert job.status == PENDING and not job.error and not job.HasField("started_time")
    assert (not job.HasField("result")) if kind is ANALYSIS else (job.generated_code, job.output) == ("", "")
    for name, value in outputs.items():
        err = expect_error(Code.INVALID_ARGUMENT, kind.update, owner.c, job.id, **{name: value})
        assert err.violations[0].field == "update_mask" and err.violations[0].reason == "INVALID_FIELD_MASK"
    # "*" replaces every writable field (user_id too: an admin's) and leaves the output alone.
    star = getattr(apb, f"Update{kind.name}Request")(
        **{kind.field: kind.message(id=job.id, user_id=owner.id, **kind.fields(unique("w")), **outputs)}, update_mask=mask("*"))
    changed = getattr(client.ai, f"Update{kind.name}")(star)
    assert changed.status == PENDING and not changed.error
    name, value = kind.change
    assert getattr(kind.update(owner.c, job.id, **{name: value}), name) == value
    running = kind.move(owner.c, "Start", job.id)
    err = expect_error(Code.FAILED_PRECONDITION, kind.update, owner.c, job.id, **{name: "too late"})
    assert err.info.reason == "JOB_NOT_PENDING" and err.info.metadata["status"] == "JOB_STATUS_RUNNING"
    assert kind.get(owner.c, job.id) == running


# ------------------------------------------------------------------ analysis files


def _link(c: Client, analysis_id: str, file_id: str, **fields: Any) -> apb.AnalysisFile:
    return c.ai.CreateAnalysisFile(apb.CreateAnalysisFileRequest(analysis_file=apb.AnalysisFile(analysis_id=analysis_id, file_id=file_id, **fields)))


def _links_of(c: Client, analysis_id: str, extra: str = "") -> list[apb.AnalysisFile]:
    flt = f'analysis_id = "{analysis_id}"' + (f" AND {extra}" if extra else "")
    return list(c.ai.ListAnalysisFiles(apb.ListAnalysisFilesRequest(filter=flt, page_size=100)).analysis_files)


def test_a_file_link_is_an_input_by_default_and_names_what_its_caller_may_see(actor: Callable[..., Actor]) -> None:
    owner, other = actor(), actor()
    analysis = ANALYSIS.create(owner.c)
    mine, public, hidden = new_file(owner.c), new_file(other.c, is_public=True), new_file(other.c)
    data = _link(owner.c, analysis.id, mine.id)
    assert data.role == apb.ANALYSIS_FILE_ROLE_INPUT
    chart = _link(owner.c, analysis.id, public.id, role=apb.ANALYSIS_FILE_ROLE_OUTPUT, description="chart")
    assert [f.id for f in _links_of(owner.c, analysis.id, "role = OUTPUT")] == [chart.id]
    err = expect_error(Code.PERMISSION_DENIED, _link, owner.c, analysis.id, hidden.id)
    assert err.info.reason == "REFERENCE_ACCESS_DENIED" and err.info.metadata["field"] == "analysis_file.file_id"
    theirs = ANALYSIS.create(other.c)
    err = expect_error(Code.PERMISSION_DENIED, _link, owner.c, theirs.id, mine.id)
    assert err.info.metadata["field"] == "analysis_file.analysis_id"
    missing = "00000000-0000-7000-8000-000000000000"
    expect_error(Code.PERMISSION_DENIED, _link, owner.c, analysis.id, missing)
    err = expect_error(Code.INVALID_ARGUMENT, _link, owner.c, "", mine.id)
    assert {v.field for v in err.violations} == {"analysis_file.analysis_id"}
    move = apb.UpdateAnalysisFileRequest(analysis_file=apb.AnalysisFile(id=data.id, analysis_id=theirs.id), update_mask=mask("analysis_id"))
    err = expect_error(Code.INVALID_ARGUMENT, owner.c.ai.UpdateAnalysisFile, move)
    assert err.violations[0].reason == "IMMUTABLE_FIELD"
    assert sorted(f.id for f in _links_of(owner.c, analysis.id)) == sorted([data.id, chart.id])
    # The links are seen as their analysis is: the other user sees none of them.
    assert _links_of(other.c, analysis.id) == []
    expect_error(Code.PERMISSION_DENIED, other.c.ai.GetAnalysisFile, apb.GetAnalysisFileRequest(id=data.id))
    expect_error(Code.PERMISSION_DENIED, other.c.ai.BatchGetAnalysisFiles, apb.BatchGetAnalysisFilesRequest(ids=[chart.id]))
    expect_error(Code.PERMISSION_DENIED, other.c.ai.DeleteAnalysisFile, apb.DeleteAnalysisFileRequest(id=data.id))


def test_deleting_an_analysis_removes_its_file_links_audited_and_leaves_the_files(client: Client, actor: Callable[..., Actor]) -> None:
    owner = actor()
    analysis = ANALYSIS.create(owner.c)
    files = [new_file(owner.c), new_file(owner.c)]
    links = [_link(owner.c, analysis.id, f.id) for f in files]
    kept = ANALYSIS.create(owner.c)
    other_link = _link(owner.c, kept.id, files[0].id)
    ANALYSIS.delete(owner.c, analysis.id)
    for link in links:
        err = expect_error(Code.NOT_FOUND, client.ai.GetAnalysisFile, apb.GetAnalysisFileRequest(id=link.id))
        assert err.resource.resource_name == link.id
        actions = [e.action for e in _entries(client, link.id)]
        assert actions == [spb.AUDIT_ACTION_CREATE, spb.AUDIT_ACTION_DELETE]
    assert [e.action for e in _entries(client, analysis.id)][-1] == spb.AUDIT_ACTION_DELETE
    for f in files:
        assert owner.c.files.GetFile(fpb.GetFileRequest(id=f.id)) == f
    assert client.ai.GetAnalysisFile(apb.GetAnalysisFileRequest(id=other_link.id)) == other_link


# ------------------------------------------------------------------ watching


def _next(stream: Any) -> Any:
    return next(stream)


@pytest.mark.parametrize("kind", KINDS)
def test_a_watch_sends_every_state_in_order_and_ends_after_the_final_one(kind: Kind, actor: Callable[..., Actor]) -> None:
    owner = actor()
    job = kind.create(owner.c)
    stream = kind.watch(owner.c, job.id)
    assert _next(stream) == job
    renamed = kind.update(owner.c, job.id, **dict([kind.change]))
    assert _next(stream) == renamed
    # Moves made before the stream reads them: each state still comes, in order.
    running = kind.move(owner.c, "Start", job.id)
    done = kind.move(owner.c, "Complete", job.id)
    assert [_next(stream), _next(stream)] == [running, done]
    assert list(stream) == [], "the stream ends after the final state"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("final", [COMPLETED, FAILED], ids=["completed", "failed"])
def test_a_finished_job_is_sent_once(kind: Kind, final: int, actor: Callable[..., Actor]) -> None:
    owner = actor()
    job = kind.in_status(owner.c, final)
    assert list(kind.watch(owner.c, job.id)) == [job]


@pytest.mark.parametrize("kind", KINDS)
def test_a_watch_of_a_job_that_fails_ends_with_the_failure(kind: Kind, actor: Callable[..., Actor]) -> None:
    owner = actor()
    job = kind.create(owner.c)
    stream = kind.watch(owner.c, job.id)
    assert _next(stream).status == PENDING
    failed = kind.move(owner.c, "Fail", job.id, error="quota exceeded")
    assert list(stream) == [failed]


@pytest.mark.parametrize("kind", KINDS)
def test_a_stranger_may_not_watch_and_a_deleted_job_ends_the_stream(kind: Kind, actor: Callable[..., Actor]) -> None:
    owner, stranger = actor(), actor()
    job = kind.create(owner.c)
    err = expect_error(Code.PERMISSION_DENIED, lambda: list(kind.watch(stranger.c, job.id)))
    assert err.info.reason == "ROW_ACCESS_DENIED"
    stream = kind.watch(owner.c, job.id)
    assert _next(stream) == job
    kind.delete(owner.c, job.id)
    with pytest.raises(grpc.RpcError) as caught:
        _next(stream)
    err = rich_error(caught.value)
    assert err.code == Code.NOT_FOUND and err.resource is not None and err.resource.resource_name == job.id


@pytest.mark.parametrize("kind", KINDS)
def test_a_watch_ends_when_its_caller_may_no_longer_see_the_job(kind: Kind, client: Client, actor: Callable[..., Actor]) -> None:
    owner, heir = actor(), actor()
    job = kind.create(owner.c)
    stream = kind.watch(owner.c, job.id)
    assert _next(stream) == job
    kind.update(client, job.id, user_id=heir.id)  # an admin gives the job to another user
    with pytest.raises(grpc.RpcError) as caught:
        _next(stream)
    assert rich_error(caught.value).code == Code.PERMISSION_DENIED


def test_a_watch_ends_when_the_server_shuts_down(client: Client) -> None:
    server = ServerThread(make_config(client.database_url)).start()
    c = connect(client.backend, client.database_url, server)
    try:
        job = ANALYSIS.create(c)
        stream = ANALYSIS.watch(c, job.id)
        assert _next(stream) == job
        stopping = threading.Thread(target=server.stop)
        stopping.start()
        with pytest.raises(grpc.RpcError) as caught:
            _next(stream)
        stopping.join()
        err = rich_error(caught.value)
        assert (err.code, err.info.reason) == (Code.UNAVAILABLE, "SERVER_SHUTTING_DOWN")
    finally:
        c.channel.close()


# ------------------------------------------------------------------ every way to a job


@pytest.mark.parametrize("kind", KINDS)
def test_owners_and_admins_reach_a_job_by_every_way_and_strangers_by_none(kind: Kind, client: Client, actor: Callable[..., Actor]) -> None:
    owner, stranger = actor(), actor()
    job = kind.create(owner.c)
    word = kind.search_word(job)

    def get(c: Client) -> Any:
        return kind.get(c, job.id)

    def listed(c: Client) -> list[str]:
        page = getattr(c.ai, f"List{kind.plural}")(getattr(apb, f"List{kind.plural}Request")(filter=f'id = "{job.id}"'))
        return [m.id for m in getattr(page, kind.list_field)]

    def searched(c: Client) -> list[str]:
        page = getattr(c.ai, f"Search{kind.plural}")(getattr(apb, f"Search{kind.plural}Request")(query=word))
        return [getattr(r, kind.field).id for r in page.results]

    def batch(c: Client) -> Any:
        return getattr(c.ai, f"BatchGet{kind.plural}")(getattr(apb, f"BatchGet{kind.plural}Request")(ids=[job.id]))

    for c in (owner.c, client):
        assert get(c) == job and listed(c) == [job.id] and searched(c) == [job.id]
        assert [m.id for m in getattr(batch(c), kind.list_field)] == [job.id]
        assert next(kind.watch(c, job.id)) == job
    assert job.user_id == owner.id, "a job's owner is its caller by default"
    assert listed(stranger.c) == [] and searched(stranger.c) == []
    for call in (get, batch, lambda c: next(kind.watch(c, job.id))):
        assert expect_error(Code.PERMISSION_DENIED, call, stranger.c).info.reason == "ROW_ACCESS_DENIED"
    for method in METHODS:
        expect_error(Code.PERMISSION_DENIED, kind.move, stranger.c, method, job.id)
    expect_error(Code.PERMISSION_DENIED, kind.update, stranger.c, job.id, **dict([kind.change]))
    expect_error(Code.PERMISSION_DENIED, kind.delete, stranger.c, job.id)
    err = expect_error(Code.PERMISSION_DENIED, kind.create, stranger.c, user_id=owner.id)
    assert err.info.metadata["field"] == f"{kind.field}.user_id"
    assert get(owner.c) == job, "the refused calls changed nothing"
    started = kind.move(client, "Start", job.id)  # an admin moves anyone's job
    assert started.status == RUNNING and kind.move(owner.c, "Complete", job.id).status == COMPLETED
    theirs = kind.create(client, user_id=stranger.id)  # an admin makes one for a user
    assert theirs.user_id == stranger.id and kind.get(stranger.c, theirs.id) == theirs
