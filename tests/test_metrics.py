"""Prometheus metrics: scraped over HTTP from a real server after real calls, on both databases;
the sums of `serve --workers 2`; the setting refused when it is wrong."""
from __future__ import annotations

import glob
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import prometheus_client.metrics
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.files.v1 import files_pb2 as fpb
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.identity.v1 import identity_pb2_grpc
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

import service
from service.config import Config, ConfigError
from tests.conftest import Client, ServerThread, authed_channel, connect, make_config, unique
from tests.support import expect_error, new_channel, new_user

IDENTITY = "nexus.identity.v1.IdentityService"
FILES = "nexus.files.v1.FileService"
CHAT = "nexus.chat.v1.ChatService"
NEXUS_DATA = Path(sys.executable).parent / "nexus-data"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.status == 200
        return answer.read().decode()


def scrape(url: str) -> Samples:
    text = scrape_text(url)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def grpc_labels(kind: str, full_method: str, **extra: str) -> dict[str, str]:
    service_name, _, method = full_method.rpartition("/")
    return {"grpc_type": kind, "grpc_service": service_name, "grpc_method": method, **extra}


def wait_until(predicate: Any, timeout: float = 15.0) -> bool:
    """For what the server does after the client saw its answer (a cancelled stream's end)."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


@pytest.fixture
def metered(database_url: str) -> Iterator[tuple[Client, str]]:
    """A server with metrics on a port of its own, and its /metrics URL."""
    port = free_port()
    server = ServerThread(make_config(database_url, metrics_port=port)).start()
    backend = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    c = connect(backend, database_url, server)
    try:
        yield c, f"http://127.0.0.1:{port}/metrics"
    finally:
        c.channel.close()
        server.stop()


def test_scrape_counts_every_call_by_method_and_code(metered: tuple[Client, str]) -> None:
    c, url = metered
    user = new_user(c)
    channel = new_channel(c)
    before = scrape(url)

    get = f"{IDENTITY}/GetUser"
    c.identity.GetUser(ipb.GetUserRequest(id=user.id))
    c.identity.GetUser(ipb.GetUserRequest(id=user.id))
    expect_error(grpc.StatusCode.NOT_FOUND, c.identity.GetUser, ipb.GetUserRequest(id=str(uuid.uuid4())))
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, c.identity.GetUser, ipb.GetUserRequest(id="nope"))
    stranger = authed_channel(c.address, "nx_nobody.secret")
    expect_error(grpc.StatusCode.UNAUTHENTICATED, identity_pb2_grpc.IdentityServiceStub(stranger).GetUser, ipb.GetUserRequest(id=user.id))
    stranger.close()
    # A client stream of 4 messages, then a server stream of as many as the file takes.
    data = os.urandom(150_000)
    parts = [fpb.UploadFileRequest(metadata=fpb.UploadFileMetadata(name=f"{unique('m')}.bin"))]
    parts += [fpb.UploadFileRequest(chunk=data[i : i + 50_000]) for i in range(0, len(data), 50_000)]
    made = c.files.UploadFile(iter(parts))
    chunks = list(c.files.DownloadFile(fpb.DownloadFileRequest(id=made.id)))
    assert b"".join(m.chunk for m in chunks) == data and len(chunks) > 1
    # A live stream, cancelled by its client once it had one event.
    events = c.chat.StreamEvents(cpb.StreamEventsRequest(channel_ids=[channel.id]), timeout=60)
    assert wait_until(lambda: value(scrape(url), "nexus_open_streams") == 1)
    c.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel.id, content="hello")))
    assert next(events).chat_message.content == "hello"
    events.cancel()
    stream = f"{CHAT}/StreamEvents"
    assert wait_until(lambda: value(scrape(url), "grpc_server_handled_total", **grpc_labels("SERVER_STREAM", stream, grpc_code="CANCELLED")) > 0)
    assert wait_until(lambda: value(scrape(url), "nexus_open_streams") == 0)
    after = scrape(url)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    unary = grpc_labels("UNARY", get)
    assert delta("grpc_server_started_total", **unary) == 5
    assert {code: delta("grpc_server_handled_total", **unary, grpc_code=code) for code in ("OK", "NOT_FOUND", "INVALID_ARGUMENT", "UNAUTHENTICATED")} == {
        "OK": 2, "NOT_FOUND": 1, "INVALID_ARGUMENT": 1, "UNAUTHENTICATED": 1,
    }
    assert delta("grpc_server_msg_received_total", **unary) == 5
    assert delta("grpc_server_msg_sent_total", **unary) == 2  # an answer only when it is OK
    assert delta("grpc_server_handling_seconds_count", **unary) == 5
    assert delta("grpc_server_handling_seconds_bucket", **unary, le="+Inf") == 5
    assert delta("grpc_server_handling_seconds_bucket", **unary, le="10.0") == 5
    assert delta("grpc_server_handling_seconds_sum", **unary) > 0

    upload = grpc_labels("CLIENT_STREAM", f"{FILES}/UploadFile")
    assert delta("grpc_server_handled_total", **upload, grpc_code="OK") == 1
    assert (delta("grpc_server_msg_received_total", **upload), delta("grpc_server_msg_sent_total", **upload)) == (len(parts), 1)
    download = grpc_labels("SERVER_STREAM", f"{FILES}/DownloadFile")
    assert delta("grpc_server_handled_total", **download, grpc_code="OK") == 1
    assert (delta("grpc_server_msg_received_total", **download), delta("grpc_server_msg_sent_total", **download)) == (1, len(chunks))
    events_labels = grpc_labels("SERVER_STREAM", stream)
    assert delta("grpc_server_started_total", **events_labels) == 1
    assert delta("grpc_server_handled_total", **events_labels, grpc_code="CANCELLED") == 1
    assert delta("grpc_server_msg_sent_total", **events_labels) >= 1

    assert delta("nexus_stream_events_delivered_total", source="live") + delta("nexus_stream_events_delivered_total", source="log") == 1
    assert delta("nexus_auth_failures_total", reason="INVALID_CREDENTIALS") == 1
    assert delta("nexus_cache_hits_total", cache="credentials") >= 8  # the admin key, checked once before
    assert sum(delta("nexus_db_call_duration_seconds_count", mode=m) for m in ("read", "session_read", "transaction", "one_statement")) >= 8
    assert ("nexus_db_pool_connections_in_use", (("pool", "read"),)) in after
    assert ("nexus_db_pool_waiting", (("queue", "threads"),)) in after
    assert value(after, "nexus_stream_queued_events") == 0
    assert value(after, "nexus_build_info", version=service.__version__) == 1
    assert value(after, "process_resident_memory_bytes") > 0

    # The README's Metrics section lists every metric of the service (prometheus_client's own
    # process_* and python_* as a group).
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    documented = set(re.findall(r"`((?:grpc_server|nexus)_[a-z_]+)`", readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]))
    ours = {f.name for f in text_string_to_metric_families(scrape_text(url)) if f.name.startswith(("grpc_server_", "nexus_"))}
    assert len(ours) == 19
    assert sorted(name for name in ours if name not in documented and f"{name}_total" not in documented) == []


def test_a_call_takes_no_label_lookup(metered: tuple[Client, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Each method's label children are made once: after a first call of each outcome, calls
    are counted without prometheus_client's labels() (its lookup builds a tuple and takes a lock)."""
    c, url = metered
    user = new_user(c)
    requests = [ipb.GetUserRequest(id=user.id), ipb.GetUserRequest(id=str(uuid.uuid4()))]

    def call_each() -> None:
        c.identity.GetUser(requests[0])
        expect_error(grpc.StatusCode.NOT_FOUND, c.identity.GetUser, requests[1])

    call_each()
    before = scrape(url)

    def looked_up(*_: Any, **__: Any) -> Any:
        raise AssertionError("labels() during a call")

    monkeypatch.setattr(prometheus_client.metrics.MetricWrapperBase, "labels", looked_up)
    call_each()
    call_each()
    monkeypatch.undo()
    after = scrape(url)
    unary = grpc_labels("UNARY", f"{IDENTITY}/GetUser")
    for code in ("OK", "NOT_FOUND"):
        key = ("grpc_server_handled_total", tuple(sorted({**unary, "grpc_code": code}.items())))
        assert after[key] - before[key] == 2


def _health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=5).status


def _wait_serving(address: str) -> None:
    """Until the server at address answers its health check SERVING."""
    probe = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(probe).result(timeout=60)
        assert wait_until(lambda: _health(probe) == health_pb2.HealthCheckResponse.SERVING, timeout=30)
    finally:
        probe.close()


def _per_worker(directory: str, name: str, labels: dict[str, str]) -> dict[int, float]:
    """A counter's value in each worker's own file (counter_<pid>.db)."""
    counts = {}
    for path in glob.glob(os.path.join(directory, "counter_*.db")):
        pid = int(Path(path).stem.split("_")[1])
        counts[pid] = sum(
            s.value for metric in MultiProcessCollector.merge([path], accumulate=True) for s in metric.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )
    return counts


def test_workers_counters_add_up_and_outlive_a_worker(client: Client, tmp_path: Path) -> None:
    """`serve --workers 2`: the parent's /metrics sums both workers' counts; a worker killed
    keeps what it counted, nothing twice; the parent removes the directory as it exits."""
    from tests.test_server import serve_process

    user = new_user(client)
    port, metrics_port = free_port(), free_port()
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    log = (tmp_path / "workers.log").open("w+")
    proc = serve_process(client.database_url, port, log, "--workers", "2", NEXUS_METRICS_PORT=str(metrics_port), TMPDIR=str(scratch),
                         NEXUS_DRAIN_SECONDS="0", NEXUS_GRACE_SECONDS="1")
    address, url = f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    get = grpc_labels("UNARY", f"{IDENTITY}/GetUser")
    ok = {**get, "grpc_code": "OK"}

    def call_once() -> None:
        # A connection of its own: the kernel spreads connections over the workers.
        channel = authed_channel(address, client.admin_secret, options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            identity_pb2_grpc.IdentityServiceStub(channel).GetUser(ipb.GetUserRequest(id=user.id), timeout=30)
        finally:
            channel.close()

    try:
        _wait_serving(address)
        [directory] = glob.glob(str(scratch / "nexus-metrics-*"))
        calls = 0
        while calls < 6 or sum(1 for n in _per_worker(directory, "grpc_server_started_total", get).values() if n) < 2:
            call_once()
            calls += 1
            assert calls < 60, "the kernel never gave the second worker a connection"
        by_worker = _per_worker(directory, "grpc_server_started_total", get)
        assert len(by_worker) == 2 and sum(by_worker.values()) == calls and all(by_worker.values())
        scraped = scrape(url)
        assert value(scraped, "grpc_server_started_total", **get) == calls
        assert value(scraped, "grpc_server_handled_total", **ok) == calls
        assert value(scraped, "grpc_server_handling_seconds_count", **get) == calls
        assert value(scraped, "nexus_build_info", version=service.__version__) == 1
        assert ("nexus_db_pool_connections_in_use", (("pool", "read"),)) in scraped  # the workers' samples, summed

        victim = min(by_worker)
        os.kill(victim, signal.SIGKILL)
        # The parent marks it dead: its live gauges go, its counters stay.
        assert wait_until(lambda: not glob.glob(os.path.join(directory, f"gauge_live*_{victim}.db")))
        assert value(scrape(url), "grpc_server_handled_total", **ok) == calls
        for _ in range(3):
            call_once()
        scraped = scrape(url)
        assert value(scraped, "grpc_server_handled_total", **ok) == calls + 3
        assert value(scraped, "grpc_server_started_total", **get) == calls + 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.exists(directory)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.seek(0)
        output = log.read()
    assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in output, output[-2000:]


@pytest.mark.parametrize(
    ("settings", "most", "least"),
    [
        ({}, 2, 1),  # the default, NEXUS_MALLOC_ARENAS=2
        ({"NEXUS_MALLOC_ARENAS": "0"}, None, 3),  # glibc's own limit: a heap for most threads that allocate
        ({"MALLOC_ARENA_MAX": "3"}, 3, 3),  # the operator's MALLOC_ARENA_MAX wins
    ],
    ids=["default", "glibc", "operator"],
)
def test_glibc_heaps_of_a_server_under_mixed_load_are_capped(client: Client, tmp_path: Path, settings: dict[str, str], most: int | None, least: int) -> None:
    """However many threads allocate (gRPC's, the database threads, the hash pool) and free
    what the others allocated, a server keeps at most NEXUS_MALLOC_ARENAS glibc heaps
    (nexus_malloc_arenas): each heap a thread has to itself grew its free holes under a mixed
    soak (bench/soak.py)."""
    from tests.test_server import serve_process

    if sys.platform != "linux":
        pytest.skip("glibc's heaps")
    port, metrics_port = free_port(), free_port()
    env = {"MALLOC_ARENA_MAX": "", "NEXUS_METRICS_PORT": str(metrics_port), **settings}
    log = (tmp_path / "server.log").open("w+")
    proc = serve_process(client.database_url, port, log, NEXUS_DRAIN_SECONDS="0", NEXUS_GRACE_SECONDS="1", **env)
    address, url = f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics"
    failures: list[BaseException] = []

    def load(n: int) -> None:
        channel = authed_channel(address, client.admin_secret, options=[("grpc.use_local_subchannel_pool", 1)])
        identity = identity_pb2_grpc.IdentityServiceStub(channel)
        try:
            for i in range(25):
                name = unique(f"arena{n}x{i}")
                user = identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(username=name, email=f"{name}@example.com")), timeout=30)
                identity.GetUser(ipb.GetUserRequest(id=user.id), timeout=30)
                identity.ListUsers(ipb.ListUsersRequest(filter=f'username = "{name}"'), timeout=30)
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            failures.append(exc)
        finally:
            channel.close()

    try:
        _wait_serving(address)
        threads = [threading.Thread(target=load, args=(n,)) for n in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert failures == []
        scraped = scrape(url)
        arenas = value(scraped, "nexus_malloc_arenas")
        assert arenas >= least and (most is None or arenas <= most), arenas
        assert value(scraped, "nexus_malloc_bytes", state="in_use") > 1 << 20
        assert ("nexus_malloc_bytes", (("state", "free"),)) in scraped
    finally:
        proc.kill()
        proc.wait(30)
        log.close()


@pytest.mark.parametrize("raw", ["http", "-1", "65536", "9090.5"])
def test_a_wrong_metrics_port_is_refused_naming_it(raw: str) -> None:
    with pytest.raises(ConfigError, match="NEXUS_METRICS_PORT"):
        Config.from_env({"NEXUS_METRICS_PORT": raw})
    with pytest.raises(ConfigError, match="NEXUS_METRICS_PORT must differ from NEXUS_PORT"):
        Config.from_env({"NEXUS_METRICS_PORT": "50051", "NEXUS_PORT": "50051"})
    assert Config.from_env({"NEXUS_METRICS_PORT": ""}).metrics_port == 0  # empty: off


def test_a_metrics_port_in_use_stops_the_start(client: Client, tmp_path: Path) -> None:
    # (The session's server made the database's first admin key: a start refused here after
    # creating one would leave the other tests without it.)
    database_url = client.database_url
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"NEXUS_METRICS_PORT: cannot serve metrics on 127.0.0.1:{busy}"):
            ServerThread(make_config(database_url, metrics_port=busy)).start()
        env = dict(os.environ, DATABASE_URL=database_url, NEXUS_HOST="127.0.0.1", NEXUS_PORT=str(free_port()), NEXUS_METRICS_PORT=str(busy),
                   NEXUS_BLOB_DIR=str(tmp_path / "blobs"), NEXUS_BOOTSTRAP_KEY_FILE=str(tmp_path / "key"))
        for args in ([], ["--workers", "2"]):
            done = subprocess.run([str(NEXUS_DATA), "serve", *args], env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 2, done.stderr[-2000:]
            assert "refusing to start: NEXUS_METRICS_PORT: cannot serve metrics" in done.stderr
    bad = dict(os.environ, DATABASE_URL=database_url, NEXUS_METRICS_PORT="metrics")
    done = subprocess.run([str(NEXUS_DATA), "serve"], env=bad, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "NEXUS_METRICS_PORT='metrics' is not a whole number" in done.stderr
