"""Logs and traces (service/telemetry.py): JSON lines, the access log, and OpenTelemetry spans,
against the real server on each database."""
from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.identity.v1 import identity_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service import telemetry
from tests.conftest import Client, ServerThread, authed_channel, connect, make_config, unique

ROOT = Path(__file__).resolve().parent.parent
NEXUS_DATA = Path(sys.executable).parent / "nexus-data"
ACCESS = "nexus.rpc.access"
GET_USER = "/nexus.identity.v1.IdentityService/GetUser"
LIST_USERS = "/nexus.identity.v1.IdentityService/ListUsers"
# A caller's trace context (W3C traceparent): its trace id and the id of its span.
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


Lines = Callable[[], list[dict[str, Any]]]


@pytest.fixture
def json_log() -> Iterator[Lines]:
    """The process's logging set up by the service's own function, as JSON into a buffer: a
    function returning every line written so far, parsed (each must be one JSON object)."""
    root = logging.getLogger()
    level, hook = root.level, sys.excepthook
    buffer = io.StringIO()
    handler = telemetry.configure_logging("DEBUG", "json", buffer)

    def lines() -> list[dict[str, Any]]:
        return [json.loads(line) for line in buffer.getvalue().splitlines()]

    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        sys.excepthook = hook
        logging.captureWarnings(False)


@pytest.fixture
def tracing() -> Iterator[InMemorySpanExporter]:
    """Tracing on through setup_tracing, its spans kept in memory; off again after."""
    exporter = InMemorySpanExporter()
    assert telemetry.setup_tracing({}, exporter=exporter) is not None
    try:
        yield exporter
    finally:
        telemetry.shutdown_tracing()


def started(database_url: str, **settings: Any) -> tuple[ServerThread, Client]:
    server = ServerThread(make_config(database_url, **settings)).start()
    return server, connect("any", database_url, server)


def stopped(server: ServerThread, client: Client) -> None:
    client.channel.close()
    server.stop()


def access_lines(lines: list[dict[str, Any]], request_id: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["logger"] == ACCESS and line.get("request_id") == request_id]


def rfc3339_utc(value: str) -> dt.datetime:
    assert value.endswith("Z"), value
    parsed = dt.datetime.fromisoformat(value[:-1] + "+00:00")
    assert parsed.tzinfo is not None
    return parsed


# ------------------------------------------------------------------------------------ logs


def test_a_call_has_one_json_access_line_and_its_log_lines_carry_its_request_id(database_url: str, json_log: Lines) -> None:
    # DB_ECHO: the statements are logged from the database threads while the call is handled.
    server, client = started(database_url, access_log="all", db_echo=True)
    try:
        request_id = f"req-{unique()}"
        client.identity.ListUsers(ipb.ListUsersRequest(page_size=1), metadata=[("x-request-id", request_id)])
    finally:
        stopped(server, client)
    lines = json_log()
    assert lines
    for line in lines:
        assert {"time", "level", "logger", "message", "pid"} <= line.keys(), line
        rfc3339_utc(line["time"])
        assert line["pid"] == os.getpid()
    [access] = access_lines(lines, request_id)
    assert access["method"] == LIST_USERS and access["code"] == "OK" and access["level"] == "INFO"
    assert isinstance(access["duration_ms"], float) and access["duration_ms"] >= 0
    assert access["peer"].startswith("ipv4:127.0.0.1:")
    kind, _, key_id = access["principal"].partition(":")
    assert kind == "api_key" and uuid.UUID(key_id), "the caller, by its key's id"
    assert "trace_id" not in access, "no tracing without an OTLP endpoint"
    inside = [line for line in lines if line["logger"].startswith("sqlalchemy.engine") and line.get("request_id") == request_id]
    assert inside, "the statements logged while the call was handled carry its request id"
    assert all(line["method"] == LIST_USERS for line in inside)
    # The caller is named once known: the statements of authentication come before.
    assert {line.get("principal") for line in inside} <= {None, access["principal"]}
    assert any("FROM users" in line["message"] and line.get("principal") == access["principal"] for line in inside)


def test_errors_mode_logs_a_not_found_and_not_an_ok(database_url: str, json_log: Lines) -> None:
    server, client = started(database_url, access_log="errors")
    try:
        ok, missing = f"ok-{unique()}", f"missing-{unique()}"
        client.identity.ListUsers(ipb.ListUsersRequest(page_size=1), metadata=[("x-request-id", ok)])
        with pytest.raises(grpc.RpcError) as caught:
            client.identity.GetUser(ipb.GetUserRequest(id=str(uuid.uuid4())), metadata=[("x-request-id", missing)])
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        stopped(server, client)
    lines = json_log()
    assert access_lines(lines, ok) == []
    [line] = access_lines(lines, missing)
    assert line["code"] == "NOT_FOUND" and line["method"] == GET_USER and line["reason"] and line["duration_ms"] >= 0


def test_all_mode_with_a_sample_of_zero_keeps_only_the_failed_calls(database_url: str, json_log: Lines) -> None:
    server, client = started(database_url, access_log="all", access_log_sample=0.0)
    try:
        ok, bad = f"ok-{unique()}", f"bad-{unique()}"
        client.identity.ListUsers(ipb.ListUsersRequest(page_size=1), metadata=[("x-request-id", ok)])
        with pytest.raises(grpc.RpcError):
            client.identity.GetUser(ipb.GetUserRequest(id="not-a-uuid"), metadata=[("x-request-id", bad)])
    finally:
        stopped(server, client)
    lines = json_log()
    assert access_lines(lines, ok) == []
    assert [line["code"] for line in access_lines(lines, bad)] == ["INVALID_ARGUMENT"]


def test_no_api_key_secret_reaches_any_log_line(database_url: str, json_log: Lines) -> None:
    server, client = started(database_url, access_log="all", db_echo=True, log_level="DEBUG")
    try:
        made = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_GUEST)))
        wrong = f"{made.secret.split('.')[0]}.{uuid.uuid4().hex}"
        for secret, code in ((made.secret, grpc.StatusCode.OK), (wrong, grpc.StatusCode.UNAUTHENTICATED), (client.admin_secret, grpc.StatusCode.OK)):
            channel = authed_channel(client.address, secret)
            try:
                identity_pb2_grpc.IdentityServiceStub(channel).ListUsers(ipb.ListUsersRequest(page_size=1))
                assert code == grpc.StatusCode.OK
            except grpc.RpcError as exc:
                assert exc.code() == code
            finally:
                channel.close()
    finally:
        stopped(server, client)
    text = "\n".join(json.dumps(line) for line in json_log())
    assert f"api_key:{made.id}" in text, "the key's calls are logged, by its id"
    assert '"UNAUTHENTICATED"' in text
    for secret in (made.secret, wrong, client.admin_secret):
        assert secret not in text and secret.split(".", 1)[1] not in text


# ------------------------------------------------------------------------------------ traces


def test_a_call_makes_a_server_span_with_its_code_and_child_statement_spans(database_url: str, tracing: InMemorySpanExporter, json_log: Lines) -> None:
    server, client = started(database_url, access_log="all")
    try:
        request_id = f"traced-{unique()}"
        with pytest.raises(grpc.RpcError) as caught:
            client.identity.GetUser(
                ipb.GetUserRequest(id=str(uuid.uuid4())),
                metadata=[("x-request-id", request_id), ("traceparent", f"00-{CALLER_TRACE}-{CALLER_SPAN}-01")],
            )
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        fresh = f"fresh-{unique()}"
        client.identity.ListUsers(ipb.ListUsersRequest(page_size=1), metadata=[("x-request-id", fresh)])
    finally:
        stopped(server, client)
    spans = tracing.get_finished_spans()
    servers = {s.name: s for s in spans if s.kind == trace.SpanKind.SERVER}
    get = servers["nexus.identity.v1.IdentityService/GetUser"]
    assert dict(get.attributes).items() >= {
        "rpc.system": "grpc", "rpc.service": "nexus.identity.v1.IdentityService", "rpc.method": "GetUser",
        "rpc.grpc.status_code": grpc.StatusCode.NOT_FOUND.value[0],
    }.items()
    # The caller's trace goes on: the same trace id, the caller's span as the parent.
    assert format(get.context.trace_id, "032x") == CALLER_TRACE
    assert get.parent is not None and format(get.parent.span_id, "016x") == CALLER_SPAN and get.parent.is_remote
    statements = [s for s in spans if s.kind == trace.SpanKind.CLIENT and s.parent is not None and s.parent.span_id == get.context.span_id]
    assert statements and all(s.context.trace_id == get.context.trace_id for s in statements)
    assert any("FROM users" in str(s.attributes.get("db.statement", s.attributes.get("db.query.text", ""))) for s in statements), "the Get's own read is traced"
    # The access line names the trace and the span.
    [line] = access_lines(json_log(), request_id)
    assert line["trace_id"] == CALLER_TRACE and line["span_id"] == format(get.context.span_id, "016x")
    # A call without a traceparent starts a trace of its own, and says OK.
    listed = servers["nexus.identity.v1.IdentityService/ListUsers"]
    assert listed.parent is None and format(listed.context.trace_id, "032x") != CALLER_TRACE
    assert listed.attributes["rpc.grpc.status_code"] == 0
    [line] = access_lines(json_log(), fresh)
    assert line["trace_id"] == format(listed.context.trace_id, "032x")


def test_without_an_otlp_endpoint_no_provider_is_installed() -> None:
    assert telemetry.setup_tracing({}) is None
    assert not telemetry.tracing()
    assert not isinstance(trace.get_tracer_provider(), TracerProvider)
    # Not even the SDK is imported.
    done = subprocess.run(
        [sys.executable, "-c", "import sys; from service import telemetry, server; "
         "print(telemetry.setup_tracing({}), 'opentelemetry.sdk' in sys.modules)"],
        capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["None", "False"]


def test_with_an_otlp_endpoint_the_provider_names_the_service() -> None:
    script = (
        "from opentelemetry import trace; from service import telemetry, __version__; "
        "p = telemetry.setup_tracing(); a = p.resource.attributes; "
        "print(trace.get_tracer_provider() is p, a['service.name'], a['service.version'] == __version__); "
        "telemetry.shutdown_tracing()"
    )
    env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    env.pop("OTEL_SERVICE_NAME", None)
    for extra, name in (({}, "nexus-data"), ({"OTEL_SERVICE_NAME": "data-eu"}, "data-eu")):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False, env={**env, **extra})
        assert done.returncode == 0, done.stderr
        assert done.stdout.split() == ["True", name, "True"]


# ------------------------------------------------------------------------------------ serve


def test_serve_with_json_logs_writes_only_json_lines(client: Client, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ, "DATABASE_URL": client.database_url, "NEXUS_PORT": str(port), "NEXUS_HOST": "127.0.0.1",
        "NEXUS_BLOB_DIR": str(tmp_path / "blobs"), "NEXUS_DRAIN_SECONDS": "0", "NEXUS_GRACE_SECONDS": "1",
        "NEXUS_HASH_TIME_COST": "1", "NEXUS_HASH_MEMORY_KIB": "1024",
        "LOG_FORMAT": "json", "NEXUS_ACCESS_LOG": "all", "LOG_LEVEL": "DEBUG",
    }
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        env.pop(name, None)
    stderr = tmp_path / "stderr"
    request_id = f"serve-{unique()}"
    with stderr.open("w") as sink:
        process = subprocess.Popen([str(NEXUS_DATA), "serve", "--no-migrate"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=sink)
        try:
            channel = authed_channel(f"127.0.0.1:{port}", client.admin_secret)
            try:
                grpc.channel_ready_future(channel).result(timeout=60)
                identity_pb2_grpc.IdentityServiceStub(channel).ListUsers(ipb.ListUsersRequest(page_size=1), metadata=[("x-request-id", request_id)])
            finally:
                channel.close()
            anonymous = grpc.insecure_channel(f"127.0.0.1:{port}")
            with pytest.raises(grpc.RpcError), warnings.catch_warnings():
                identity_pb2_grpc.IdentityServiceStub(anonymous).ListUsers(ipb.ListUsersRequest())
            anonymous.close()
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    assert process.returncode == 0
    text = stderr.read_text()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is JSON
    assert len(lines) >= 4
    for line in lines:
        assert {"time", "level", "logger", "message", "pid"} <= line.keys(), line
        rfc3339_utc(line["time"])
    assert [line["code"] for line in access_lines(lines, request_id)] == ["OK"]
    assert any(line["logger"] == ACCESS and line["code"] == "UNAUTHENTICATED" for line in lines)
    assert any("serving on" in line["message"] for line in lines)
    assert client.admin_secret not in text
