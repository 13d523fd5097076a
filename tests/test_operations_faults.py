"""The operations side under faults: wrong settings of TLS, tracing and metrics, a database
password where the log would show it, a collector that is down at stop, a database that
accepts connections and never answers, and compose.yaml's published ports.

Each test runs the installed `nexus-data` as a process of its own (tests/test_operator_errors.py's
way), on SQLite and on PostgreSQL where a database is involved.
"""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import yaml
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.identity.v1 import identity_pb2_grpc

from service.cli import EXIT_BAD_SETTING, EXIT_DATABASE_UNREACHABLE
from tests.conftest import Client, authed_channel
from tests.databases import fresh_postgres_database
from tests.test_operator_errors import BASE_ENV, NEXUS_DATA, empty_url, free_port, one_line, run, tables_of  # noqa: F401 - empty_url is a fixture

ROOT = Path(__file__).resolve().parent.parent
SECRET = "Hunter2QueryPassw0rd"


# ------------------------------------------------------------------ TLS files that are not PEM


def test_an_unparseable_tls_certificate_names_its_setting_not_the_port(tmp_path: Path, empty_url: str) -> None:
    """Files that exist but hold no certificate or key (a truncated copy, the wrong file): the one
    line must name NEXUS_TLS_CERT / NEXUS_TLS_KEY, as for a missing file, and the database must
    not be touched (README: TLS files are read before the database is touched). Today the
    database is migrated, then grpc fails to add the port and the line blames NEXUS_HOST and
    NEXUS_PORT: 'is another server on that port?'."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("this is not a certificate\n")
    done = run(["serve", "--port", "0", "--tls-cert", str(garbage), "--tls-key", str(garbage)], tmp_path,
               DATABASE_URL=empty_url, NEXUS_BOOTSTRAP_KEY_FILE=str(tmp_path / "key"))
    line = one_line(done, EXIT_BAD_SETTING, "NEXUS_TLS")
    assert "another server" not in line, line
    assert tables_of(empty_url) == [], "nothing migrated before the TLS files were found wrong"


def test_a_host_that_cannot_be_bound_is_found_before_anything_is_migrated(tmp_path: Path, empty_url: str) -> None:
    """NEXUS_HOST=999.1.1.1 (a typo): the port check runs before migrating for a port in use,
    but an address that cannot be bound at all passes it; the database is migrated and the line
    then asks whether another server is on the port."""
    done = run(["serve", "--port", "0"], tmp_path, DATABASE_URL=empty_url, NEXUS_HOST="999.1.1.1",
               NEXUS_BOOTSTRAP_KEY_FILE=str(tmp_path / "key"))
    line = one_line(done, EXIT_BAD_SETTING, "NEXUS_HOST", "999.1.1.1")
    assert "another server" not in line, line
    assert tables_of(empty_url) == [], "nothing migrated"


# ------------------------------------------------------------------ the database password


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_password_in_the_database_urls_query_is_never_logged(tmp_path: Path, log_format: str) -> None:
    """libpq and psycopg2 take the password from the URL's query too
    (postgresql://nexus@db/nexus?password=...). The start logs the configuration and the
    database 'with the database password masked': the query's password is written out in full,
    twice."""
    with fresh_postgres_database("nexus_pwq") as url:
        done = run(["serve", "--port", "0", "--no-migrate"], tmp_path, DATABASE_URL=f"{url}?password={SECRET}",
                   LOG_FORMAT=log_format, NEXUS_BOOTSTRAP_KEY_FILE=str(tmp_path / "key"))
    assert done.returncode == EXIT_BAD_SETTING, done.stderr[-1500:]  # the schema is not at head
    assert "configuration" in done.stderr
    assert SECRET not in done.stderr + done.stdout, [line for line in done.stderr.splitlines() if SECRET in line][:2]


# ------------------------------------------------------------------ tracing settings


@pytest.mark.parametrize(
    "env, name",
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "https://[::1"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", "OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}, "OTEL_EXPORTER_OTLP_TIMEOUT"),
    ],
    ids=["endpoint-unparseable", "timeout-not-a-number"],
)
def test_a_malformed_tracing_setting_is_one_line_exit_2(tmp_path: Path, empty_url: str, env: dict[str, str], name: str) -> None:
    """README: every mistake an operator can make at start is one line naming the setting, exit
    2, and a traceback without --debug is a bug. A tracing setting the exporter cannot parse is
    an uncaught exception today: a traceback, exit 1."""
    done = run(["serve", "--port", "0"], tmp_path, DATABASE_URL=empty_url, NEXUS_BOOTSTRAP_KEY_FILE=str(tmp_path / "key"), **env)
    one_line(done, EXIT_BAD_SETTING, name)


def test_a_collector_that_is_down_does_not_hold_up_the_stop(client: Client, tmp_path: Path) -> None:
    """OTEL_EXPORTER_OTLP_ENDPOINT names a port nobody listens on: the server serves (it does),
    and on SIGTERM it must exit within its drain and grace, not after the exporter's retries:
    today the stop takes 7 to 9 s with a grace of 1 s. In the Deployment (drain 5 + grace 20 of
    terminationGracePeriodSeconds 30) that is a SIGKILL."""
    port = free_port()
    env = {
        **BASE_ENV, "DATABASE_URL": client.database_url, "NEXUS_PORT": str(port), "NEXUS_HOST": "127.0.0.1",
        "NEXUS_BLOB_DIR": str(tmp_path / "blobs"), "NEXUS_DRAIN_SECONDS": "0", "NEXUS_GRACE_SECONDS": "1",
        "LOG_FORMAT": "json", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
    }
    stderr = tmp_path / "stderr"
    with stderr.open("w") as sink:
        process = subprocess.Popen([NEXUS_DATA, "serve", "--no-migrate"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=sink)
        try:
            channel = authed_channel(f"127.0.0.1:{port}", client.admin_secret)
            try:
                grpc.channel_ready_future(channel).result(timeout=60)
                stub = identity_pb2_grpc.IdentityServiceStub(channel)
                for _ in range(20):
                    stub.ListUsers(ipb.ListUsersRequest(page_size=1), timeout=10)
            finally:
                channel.close()
            time.sleep(0.5)
            began = time.monotonic()
            process.send_signal(signal.SIGTERM)
            status = process.wait(60)
            took = time.monotonic() - began
        finally:
            if process.poll() is None:
                process.kill()
    assert status == 0
    for line in stderr.read_text().splitlines():
        json.loads(line)  # the exporter's complaints are JSON lines too
    assert took < 0 + 1 + 2.0, f"SIGTERM to exit took {took:.1f}s with NEXUS_DRAIN_SECONDS=0 and NEXUS_GRACE_SECONDS=1"


# ------------------------------------------------------------------ metrics


def test_an_inherited_prometheus_multiproc_dir_is_named(tmp_path: Path, empty_url: str) -> None:
    """PROMETHEUS_MULTIPROC_DIR left in the environment (a base image, a shell profile) naming a
    directory that is not there, with metrics on: the refusal is 'No such file or directory:
    /nowhere/gauge_livesum_<pid>.db', naming no setting, after the database was migrated."""
    done = run(["serve", "--port", "0", "--metrics-port", str(free_port())], tmp_path, DATABASE_URL=empty_url,
               PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "nowhere"), NEXUS_BOOTSTRAP_KEY_FILE=str(tmp_path / "key"))
    one_line(done, EXIT_BAD_SETTING, "PROMETHEUS_MULTIPROC_DIR")


def test_compose_publishes_the_metrics_endpoint_only_on_the_loopback() -> None:
    """README: the metrics endpoint has no authentication and no TLS, 'for the operator's network
    only, ... on a port chosen and firewalled for it'. compose.yaml publishes 9464:9464, which
    Docker binds on every interface of the host (and opens in its own iptables rules, past a
    host firewall). deploy/check.py does not look at published ports."""
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    published = compose["services"]["nexus-data"].get("ports", [])
    metrics = [p for p in published if str(p).rsplit(":", 1)[-1] == "9464"]
    assert metrics, "compose publishes the metrics port"
    for mapping in metrics:
        parts = str(mapping).split(":")
        assert len(parts) == 3 and parts[0] in ("127.0.0.1", "[::1]"), f"{mapping!r} is published on every interface of the host"


# ------------------------------------------------------------------ the database wait


def test_a_database_that_accepts_and_never_answers_is_given_up_on_in_the_wait(tmp_path: Path) -> None:
    """A PostgreSQL port that accepts connections and says nothing (a hung server, a proxy in
    front of nothing): NEXUS_DB_WAIT_SECONDS=2 ends in 'did not answer within 2s', exit 3, but
    after 12 to 14 s, the driver's own connect timeout on top of the wait (30 s: over 40 s)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        began = time.monotonic()
        done = run(["check-schema"], tmp_path, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/nexus", NEXUS_DB_WAIT_SECONDS="2")
        took = time.monotonic() - began
    one_line(done, EXIT_DATABASE_UNREACHABLE, "within 2s")
    assert took < 2 + 3, f"the wait of 2 s took {took:.1f}s"


def test_serve_gives_up_on_a_silent_database_within_the_wait(tmp_path: Path) -> None:
    """The same for serve: a pod's start is bounded by NEXUS_DB_WAIT_SECONDS, not by it plus a
    driver timeout per try."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        began = time.monotonic()
        done = run(["serve", "--port", "0"], tmp_path, DATABASE_URL=f"postgresql://postgres@127.0.0.1:{port}/nexus", NEXUS_DB_WAIT_SECONDS="2",
                   NEXUS_BOOTSTRAP_KEY_FILE=str(tmp_path / "key"), NEXUS_BLOB_DIR=str(tmp_path / "blobs"))
        took = time.monotonic() - began
    one_line(done, EXIT_DATABASE_UNREACHABLE, "within 2s")
    assert took < 2 + 3, f"the wait of 2 s took {took:.1f}s"
