"""An operator's mistakes end in one line on stderr naming the setting and what to do, with an
exit status that says which kind of failure it is, and no traceback (unless --debug).

Every test runs the installed `nexus-data` entry point as a process of its own, with an
environment holding only what the test sets.
"""
from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy.engine import make_url

import service
from db.database import Database
from service.cli import EXIT_BAD_SETTING, EXIT_DATABASE_UNREACHABLE, EXIT_REFUSED
from service.config import Config, ConfigError
from service.server import create_server
from tests.conftest import BACKENDS, Client, make_config
from tests.databases import fresh_postgres_database, postgres_admin_url
from tests.tcp_proxy import proxied

NEXUS_DATA = str(Path(sys.executable).parent / "nexus-data")
# What every process gets besides the test's own settings: cheap hashing, no inherited setting.
BASE_ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "NEXUS_HASH_TIME_COST": "1", "NEXUS_HASH_MEMORY_KIB": "1024"}


def run(args: list[str], cwd: Path, timeout: float = 90, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([NEXUS_DATA, *args], cwd=cwd, env={**BASE_ENV, **default_home(cwd), **env}, capture_output=True, text=True, timeout=timeout)


def default_home(cwd: Path) -> dict[str, str]:
    """The default data directory's parent, under the test's directory: the default data
    directory is then cwd/xdg/nexus-data (nothing written outside the test's directory)."""
    return {"XDG_DATA_HOME": str(cwd / "xdg")}


def one_line(done: subprocess.CompletedProcess[str], status: int, *names: str) -> str:
    """The process ended with `status` and, as the last line of its stderr, the one line of
    nexus-data's own that names every one of `names`; no traceback."""
    assert done.returncode == status, (done.returncode, done.stderr[-1500:])
    assert "Traceback" not in done.stderr, done.stderr[-1500:]
    ours = [line for line in done.stderr.splitlines() if line.startswith("nexus-data")]
    assert len(ours) == 1, done.stderr[-1500:]
    assert done.stderr.strip().splitlines()[-1] == ours[0], done.stderr[-1500:]
    for name in names:
        assert name in ours[0], (name, ours[0])
    return ours[0]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def empty_database(backend: str, tmp_path: Path) -> Iterator[str]:
    """A database nothing was ever written to, of the backend."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'db' / 'nexus.db'}"
    else:
        with fresh_postgres_database("nexus_oper") as url:
            yield url


def tables_of(url: str) -> list[str]:
    """The tables of the database (none if its SQLite file was never made)."""
    path = make_url(url).database
    if url.startswith("sqlite") and not (path and Path(path).exists()):
        return []
    engine = sa.create_engine(url)
    try:
        return sa.inspect(engine).get_table_names()
    finally:
        engine.dispose()


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    with empty_database(request.param, tmp_path) as url:
        yield url


class Serving:
    """`nexus-data serve` as a process, its stderr read line by line as it comes."""

    def __init__(self, cwd: Path, *args: str, **env: str) -> None:
        self.process = subprocess.Popen(
            [NEXUS_DATA, "serve", *args], cwd=cwd, env={**BASE_ENV, **default_home(cwd), **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_line(self, text: str, timeout: float = 60) -> str:
        """The first line (from here on) holding text; AssertionError if the process ends first."""
        while True:
            line = self._queue.get(timeout=timeout)
            if line is None:
                raise AssertionError(f"the server ended without saying {text!r}:\n" + "\n".join(self.lines[-20:]))
            self.lines.append(line)
            if text in line:
                return line

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            if self.process.poll() is None:
                self.process.kill()


def readiness(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        stub = health_pb2_grpc.HealthStub(channel)
        return int(stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=10).status)


# ------------------------------------------------------------------ --version, --debug


def test_version_prints_the_package_version(tmp_path: Path) -> None:
    done = run(["--version"], tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (0, f"nexus-data {service.__version__}\n", "")


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_before_the_one_line(tmp_path: Path, where: str) -> None:
    args = ["--debug", "serve"] if where == "before" else ["serve", "--debug"]
    done = run(args, tmp_path, NEXUS_PORT="abc")
    assert done.returncode == EXIT_BAD_SETTING
    assert "Traceback" in done.stderr and "ConfigError" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "nexus-data: refusing to start: NEXUS_PORT='abc' is not a whole number"
    # Without it: the one line alone.
    assert run(["serve"], tmp_path, NEXUS_PORT="abc").stderr == "nexus-data: refusing to start: NEXUS_PORT='abc' is not a whole number\n"


# ------------------------------------------------------------------ PostgreSQL not there yet


def test_an_unreachable_postgres_is_waited_for_then_one_line_exit_3(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    done = run(["serve"], tmp_path, DATABASE_URL=f"postgresql://nexus:secret-pw@127.0.0.1:{port}/nexus", NEXUS_DB_WAIT_SECONDS="1")
    line = one_line(done, EXIT_DATABASE_UNREACHABLE, f"127.0.0.1:{port}", "DATABASE_URL", "NEXUS_DB_WAIT_SECONDS", "within 1s")
    assert line.startswith("nexus-data: refusing to start: the database at")
    waits = [w for w in done.stderr.splitlines() if "does not answer" in w and "trying again" in w]
    assert len(waits) >= 2, done.stderr  # each wait logged (0.25 s, then 0.5 s, then what is left)
    assert "secret-pw" not in done.stderr
    assert not (tmp_path / "xdg").exists()


def test_the_pauses_between_tries_double_up_to_a_cap() -> None:
    pauses: list[float] = []

    class Enough(Exception):
        pass

    def sleep(seconds: float) -> None:
        pauses.append(seconds)
        if len(pauses) == 8:
            raise Enough

    database = Database(f"postgresql+psycopg2://nexus@127.0.0.1:{free_port()}/nexus")
    try:
        with pytest.raises(Enough):
            database.wait_until_reachable(3600, sleep=sleep)
    finally:
        database.dispose()
    assert pauses == [0.25, 0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]


def test_an_unreachable_postgres_of_db_host_names_db_host(tmp_path: Path) -> None:
    port = free_port()
    done = run(["migrate"], tmp_path, DB_HOST="127.0.0.1", DB_PORT=str(port), NEXUS_DB_WAIT_SECONDS="0")
    line = one_line(done, EXIT_DATABASE_UNREACHABLE, f"127.0.0.1:{port}", "DB_HOST", "NEXUS_DB_WAIT_SECONDS")
    assert line.startswith("nexus-data migrate: the database at")


def test_a_postgres_that_comes_up_during_the_wait_is_used(tmp_path: Path) -> None:
    """A pod starting before its database: the server waits, logging each wait, and serves once
    the database answers (here: a proxy to it opened only after the first wait was logged)."""
    with fresh_postgres_database("nexus_oper") as url:
        routed, proxy = proxied(url)
        port = free_port()
        server = Serving(tmp_path, DATABASE_URL=routed, NEXUS_DB_WAIT_SECONDS="120", NEXUS_PORT=str(port), NEXUS_HOST="127.0.0.1",
                         NEXUS_BOOTSTRAP_KEY_FILE=str(tmp_path / "key"))
        try:
            waited = server.wait_for_line("does not answer")
            assert f"127.0.0.1:{proxy.port}" in waited and "trying again" in waited
            proxy.open()
            server.wait_for_line("serving on")
            assert readiness(port) == health_pb2.HealthCheckResponse.SERVING
            assert "alembic_version" in tables_of(url)  # migrated once it answered
        finally:
            assert server.stop() == 0
            proxy.close()


def test_a_postgres_refusing_the_url_is_not_waited_for(tmp_path: Path) -> None:
    """No such database (or role, or password): no wait mends it, a setting is wrong: exit 2 at once."""
    missing = make_url(postgres_admin_url()).set(database=f"nexus_none_{uuid.uuid4().hex[:8]}").render_as_string(hide_password=False)
    done = run(["serve"], tmp_path, DATABASE_URL=missing, NEXUS_DB_WAIT_SECONDS="600", timeout=60)
    line = one_line(done, EXIT_BAD_SETTING, "DATABASE_URL", "refused the connection", "does not exist")
    assert "does not answer" not in done.stderr and line.startswith("nexus-data: refusing to start: DATABASE_URL")


# ------------------------------------------------------------------ DATABASE_URL malformed


@pytest.mark.parametrize(
    "url, says",
    [
        ("not a url", "it cannot be parsed"),
        ("postgresql://nexus@db.internal:abc/nexus", "its port is not a number"),
        ("postgresql://nexus@db.internal:70000/nexus", "port 70000"),
        ("oracle://nexus@db.internal/nexus", "names a oracle database"),
        ("postgresql+asyncpg://nexus@db.internal/nexus", "driver asyncpg"),
        ("postgresql+pg8000://nexus@db.internal/nexus", "driver pg8000"),
        ("mysql://nexus@db.internal/nexus", "names a mysql database"),
        ("sqlite+aiosqlite:///nexus.db", "driver aiosqlite"),
        ("", "set but empty"),
        ("   ", "set but empty"),
    ],
    ids=["unparsable", "port-not-a-number", "port-out-of-range", "unknown-scheme", "asyncpg", "pg8000", "mysql", "aiosqlite", "empty", "blank"],
)
def test_a_malformed_database_url_is_one_line_and_touches_nothing(tmp_path: Path, url: str, says: str) -> None:
    done = run(["serve"], tmp_path, DATABASE_URL=url)
    line = one_line(done, EXIT_BAD_SETTING, "DATABASE_URL", says)
    assert line.startswith("nexus-data: refusing to start: DATABASE_URL")
    assert list(tmp_path.iterdir()) == [], "an empty DATABASE_URL must not fall back to a SQLite file"


@pytest.mark.parametrize("command", ["migrate", "check-schema", "seed"])
def test_an_empty_database_url_flag_names_the_flag(tmp_path: Path, command: str) -> None:
    one_line(run([command, "--database-url", ""], tmp_path), EXIT_BAD_SETTING, "--database-url", "is empty")


def test_a_libpq_style_database_url_flag_is_taken(tmp_path: Path) -> None:
    """--database-url postgresql://... uses psycopg2, as DATABASE_URL does (SQLAlchemy's own
    default driver for postgresql:// is another, which the service does not use)."""
    with fresh_postgres_database("nexus_oper") as url:
        libpq_style = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        done = run(["check-schema", "--database-url", libpq_style], tmp_path)
    assert done.returncode == 1 and "database schema is at nothing" in done.stderr, done.stderr  # reached, not refused


@pytest.mark.parametrize("variable", ["DB_HOST", "DB_PATH", "NEXUS_DATA_DIR"])
def test_other_empty_database_settings_are_refused(tmp_path: Path, variable: str) -> None:
    one_line(run(["serve"], tmp_path, **{variable: ""}), EXIT_BAD_SETTING, variable, "set but empty")
    assert list(tmp_path.iterdir()) == []


def test_a_sqlite_directory_that_cannot_be_made_names_db_path(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = run(["serve", "--port", "0"], tmp_path, DB_PATH=str(blocker / "sub" / "nexus.db"))
    one_line(done, EXIT_BAD_SETTING, "DB_PATH", str(blocker))


# ------------------------------------------------------------------ the port


@pytest.mark.parametrize("flag, variable", [("--port", "NEXUS_PORT"), ("--metrics-port", "NEXUS_METRICS_PORT")])
def test_a_port_in_use_is_found_before_anything_is_migrated(tmp_path: Path, empty_url: str, flag: str, variable: str) -> None:
    with socket.socket(socket.AF_INET6) as taken:  # the default host [::] covers IPv4 too
        taken.bind(("::", 0))
        taken.listen()
        port = taken.getsockname()[1]
        other = ["--metrics-port", str(free_port())] if flag == "--port" else ["--port", str(free_port())]
        done = run(["serve", flag, str(port), *other], tmp_path, DATABASE_URL=empty_url, NEXUS_BOOTSTRAP_KEY_FILE=str(tmp_path / "key"))
    one_line(done, EXIT_BAD_SETTING, variable, flag, str(port), "is in use")
    assert tables_of(empty_url) == [], "nothing migrated"
    assert not (tmp_path / "key").exists()


@pytest.mark.parametrize(
    "args, env, names",
    [
        ([], {"NEXUS_PORT": "abc"}, ["NEXUS_PORT", "'abc'"]),
        (["--port", "70000"], {}, ["NEXUS_PORT", "70000"]),
        ([], {"NEXUS_PORT": "70000"}, ["NEXUS_PORT", "70000"]),
        ([], {"DB_POOL_SIZE": "x"}, ["DB_POOL_SIZE", "'x'"]),
        ([], {"NEXUS_DB_WAIT_SECONDS": "soon"}, ["NEXUS_DB_WAIT_SECONDS"]),
        ([], {"NEXUS_DB_WAIT_SECONDS": "-1"}, ["NEXUS_DB_WAIT_SECONDS"]),
        (["--port", "abc"], {}, ["--port", "'abc'"]),
        (["--workers", "2", "--port", "0"], {}, ["NEXUS_WORKERS", "NEXUS_PORT"]),
    ],
    ids=["NEXUS_PORT=abc", "--port-70000", "NEXUS_PORT=70000", "DB_POOL_SIZE=x", "wait-not-a-number", "wait-negative", "--port-abc", "workers-port-0"],
)
def test_a_wrong_setting_is_one_line_exit_2(tmp_path: Path, args: list[str], env: dict[str, str], names: list[str]) -> None:
    one_line(run(["serve", *args], tmp_path, **env), EXIT_BAD_SETTING, *names)
    assert list(tmp_path.iterdir()) == []


def test_a_port_grpc_would_wrap_is_never_served_on_another_port(tmp_path: Path) -> None:
    """gRPC keeps the low 16 bits of a port: 70000 binds 4464. The settings refuse such a port;
    should one reach the server anyway, it refuses to serve rather than serve elsewhere."""
    config = make_config(f"sqlite:///{tmp_path / 'nexus.db'}")
    wrapped = free_port()  # (a free port: 70000's 4464 may be another process's)
    object.__setattr__(config, "port", 65536 + wrapped)  # past the settings' own check
    with pytest.raises(ConfigError, match=rf"NEXUS_PORT \(--port\) {65536 + wrapped}: gRPC bound port {wrapped} instead"):
        create_server(config)


# ------------------------------------------------------------------ files named by settings


@pytest.mark.parametrize("missing", ["NEXUS_TLS_CERT", "NEXUS_TLS_KEY", "NEXUS_TLS_CLIENT_CA"])
def test_a_missing_tls_file_names_its_setting_and_migrates_nothing(tmp_path: Path, empty_url: str, missing: str) -> None:
    present = tmp_path / "present.pem"
    present.write_text("-----BEGIN CERTIFICATE-----\n")
    files = {name: str(present) for name in ("NEXUS_TLS_CERT", "NEXUS_TLS_KEY", "NEXUS_TLS_CLIENT_CA")}
    files[missing] = str(tmp_path / "nowhere.pem")
    done = run(["serve", "--port", "0"], tmp_path, DATABASE_URL=empty_url, **files)
    one_line(done, EXIT_BAD_SETTING, missing, "nowhere.pem", "No such file")
    assert tables_of(empty_url) == [], "nothing migrated"


def test_with_json_logs_the_one_line_is_a_json_line(tmp_path: Path) -> None:
    done = run(["serve", "--tls-cert", "cert.pem", "--tls-key", "key.pem"], tmp_path, LOG_FORMAT="json")
    assert done.returncode == EXIT_BAD_SETTING and "Traceback" not in done.stderr, done.stderr
    last = json.loads(done.stderr.strip().splitlines()[-1])
    assert (last["level"], last["message"]) == ("CRITICAL", "refusing to start: NEXUS_TLS_KEY (--tls-key): key.pem cannot be read (No such file or directory)")
    assert all(line.startswith("{") for line in done.stderr.strip().splitlines())


def test_a_missing_tls_flag_file_names_the_flag(tmp_path: Path) -> None:
    done = run(["serve", "--tls-cert", "cert.pem", "--tls-key", "key.pem"], tmp_path)
    one_line(done, EXIT_BAD_SETTING, "--tls-key", "key.pem")
    assert not (tmp_path / "xdg").exists()


def test_a_missing_jwt_public_key_file_names_its_setting(tmp_path: Path) -> None:
    done = run(["serve", "--port", "0"], tmp_path, NEXUS_JWT_RS256_PUBLIC_KEY_FILE=str(tmp_path / "jwt.pub"),
               NEXUS_JWT_ISSUER="i", NEXUS_JWT_AUDIENCE="a")
    one_line(done, EXIT_BAD_SETTING, "NEXUS_JWT_RS256_PUBLIC_KEY_FILE", "jwt.pub")
    assert not (tmp_path / "xdg").exists()


# ------------------------------------------------------------------ keys create


@pytest.mark.parametrize(
    "args, names",
    [
        (["--name", "ci", "--role", "boss"], ["--role", "'boss'"]),
        (["--role", "admin"], ["--name", "required"]),
        (["--name", " ", "--role", "admin"], ["--name", "blank"]),
        (["--name", "ci", "--role", "admin", "--user-id", "nope"], ["--user-id", "'nope'", "UUID"]),
        (["--name", "ci", "--role", "admin", "--expires-in-days", "0"], ["--expires-in-days", "'0'"]),
        (["--name", "ci", "--role", "admin", "--expires-in-days", "-3"], ["--expires-in-days"]),
        (["--name", "ci", "--role", "admin", "--expires-in-days", "99999999"], ["--expires-in-days", "'99999999'"]),
        (["--name", "ci", "--role", "admin", "--colour", "red"], ["--colour"]),
    ],
    ids=["role", "no-name", "blank-name", "user-id", "days-0", "days-negative", "days-overflow", "unknown-flag"],
)
def test_keys_create_refuses_a_bad_argument_in_one_line(tmp_path: Path, args: list[str], names: list[str]) -> None:
    done = run(["keys", "create", *args], tmp_path)
    line = one_line(done, EXIT_BAD_SETTING, *names)
    assert line.startswith("nexus-data keys create: ") and line.endswith("(see nexus-data keys create --help)")
    assert list(tmp_path.iterdir()) == [], "the database was not touched"


def test_keys_create_names_the_flag_the_service_refuses(tmp_path: Path, client: Client) -> None:
    url = client.database_url
    no_user = run(["keys", "create", "--name", "ci", "--role", "user", "--user-id", str(uuid.uuid4()), "--database-url", url], tmp_path)
    one_line(no_user, EXIT_REFUSED, "--user-id", "not found")
    name = f"ci-{uuid.uuid4().hex[:8]}"
    assert run(["keys", "create", "--name", name, "--role", "guest", "--database-url", url], tmp_path).returncode == 0
    again = run(["keys", "create", "--name", name, "--role", "guest", "--database-url", url], tmp_path)
    one_line(again, EXIT_REFUSED, "--name", "already exists")
    too_long = run(["keys", "create", "--name", "k" * 300, "--role", "guest", "--database-url", url], tmp_path)
    one_line(too_long, EXIT_REFUSED, "--name", "at most 128")


def test_keys_create_on_a_database_never_migrated_says_to_migrate(tmp_path: Path, empty_url: str) -> None:
    done = run(["keys", "create", "--name", "ci", "--role", "admin", "--database-url", empty_url], tmp_path)
    one_line(done, EXIT_BAD_SETTING, "nexus-data migrate")


# ------------------------------------------------------------------ the data directory


def test_the_data_directory_holds_the_sqlite_file_blobs_and_first_key_and_is_logged(tmp_path: Path) -> None:
    """NEXUS_DATA_DIR (relative here): the SQLite file, the blob store and the first admin key's
    file go in it, and the server logs its absolute path."""
    port = free_port()
    server = Serving(tmp_path, NEXUS_DATA_DIR="state", NEXUS_PORT=str(port), NEXUS_HOST="127.0.0.1")
    try:
        logged = server.wait_for_line("data directory")
        server.wait_for_line("serving on")
    finally:
        assert server.stop() == 0
    data = tmp_path / "state"
    assert f"data directory {data} (NEXUS_DATA_DIR): SQLite file {data / 'nexus.db'}, blob store {data / 'blobs'}" in logged
    assert {p.name for p in data.iterdir()} >= {"nexus.db", "blobs", "bootstrap-admin-key"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


def test_the_data_directory_of_postgres_holds_the_blobs_and_first_key(tmp_path: Path) -> None:
    with fresh_postgres_database("nexus_oper") as url:
        port = free_port()
        server = Serving(tmp_path, DATABASE_URL=url, NEXUS_DATA_DIR=str(tmp_path / "state"), NEXUS_PORT=str(port), NEXUS_HOST="127.0.0.1")
        try:
            logged = server.wait_for_line("data directory")
            server.wait_for_line("serving on")
        finally:
            assert server.stop() == 0
    data = tmp_path / "state"
    assert f"data directory {data} (NEXUS_DATA_DIR): database at postgresql" in logged and f"blob store {data / 'blobs'}" in logged
    assert {p.name for p in data.iterdir()} == {"blobs", "bootstrap-admin-key"}


@pytest.mark.parametrize(
    "env, database, blobs",
    [
        ({"XDG_DATA_HOME": "/home/u/.data"}, "/home/u/.data/nexus-data/nexus.db", "/home/u/.data/nexus-data/blobs"),  # the default
        ({"NEXUS_DATA_DIR": "/srv/nexus"}, "/srv/nexus/nexus.db", "/srv/nexus/blobs"),
        ({"DB_PATH": "/var/lib/x/app.db"}, "/var/lib/x/app.db", "/var/lib/x/blobs"),  # as before: beside it
        ({"DB_PATH": "/var/lib/x/app.db", "NEXUS_DATA_DIR": "/srv/nexus"}, "/var/lib/x/app.db", "/srv/nexus/blobs"),
        ({"NEXUS_DATA_DIR": "/srv/nexus", "NEXUS_BLOB_DIR": "/mnt/blobs"}, "/srv/nexus/nexus.db", "/mnt/blobs"),
        ({"DATABASE_URL": "postgresql://db/nexus", "XDG_DATA_HOME": "/home/u/.data"}, None, "/home/u/.data/nexus-data/blobs"),
        ({"DATABASE_URL": "postgresql://db/nexus", "NEXUS_DATA_DIR": "/srv/nexus"}, None, "/srv/nexus/blobs"),
    ],
)
def test_where_the_data_goes(env: dict[str, str], database: str | None, blobs: str) -> None:
    config = Config.from_env(env)
    assert config.sqlite_path == (os.path.abspath(database) if database else None)
    assert config.blob_path == os.path.abspath(blobs)


def test_the_default_data_directory_is_the_users_from_any_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset, the data directory is $XDG_DATA_HOME/nexus-data (a relative XDG_DATA_HOME is
    ignored, as the XDG rules say), else ~/.local/share/nexus-data, whatever the working
    directory; a data/nexus.db under the working directory (where the data was kept before the
    setting existed) is used instead, so an upgrade never starts on a new, empty database."""
    monkeypatch.chdir(tmp_path)
    home = str(tmp_path / "home")
    assert Config.from_env({"HOME": home}).sqlite_path == f"{home}/.local/share/nexus-data/nexus.db"
    assert Config.from_env({"HOME": home, "XDG_DATA_HOME": "relative"}).sqlite_path == f"{home}/.local/share/nexus-data/nexus.db"
    assert Config.from_env({"HOME": home, "XDG_DATA_HOME": "/x"}).blob_path == "/x/nexus-data/blobs"
    (tmp_path / "data").mkdir()
    assert Config.from_env({"HOME": home}).sqlite_path == f"{home}/.local/share/nexus-data/nexus.db"  # an empty data/ is not one
    (tmp_path / "data" / "nexus.db").write_bytes(b"")
    legacy = Config.from_env({"HOME": home})
    assert (legacy.sqlite_path, legacy.data_path) == (str(tmp_path / "data" / "nexus.db"), str(tmp_path / "data"))
    assert Config.from_env({"HOME": home, "NEXUS_DATA_DIR": "/srv/n"}).sqlite_path == "/srv/n/nexus.db"


def test_a_server_on_the_old_data_directory_says_how_to_keep_it(tmp_path: Path) -> None:
    """Started where data/nexus.db is (a directory made before NEXUS_DATA_DIR existed): it serves
    that database, and a warning names the setting to keep it from anywhere."""
    first = run(["migrate"], tmp_path, DB_PATH="data/nexus.db")
    assert first.returncode == 0, first.stderr[-1500:]
    port = free_port()
    server = Serving(tmp_path, NEXUS_PORT=str(port), NEXUS_HOST="127.0.0.1")
    try:
        warning = server.wait_for_line("because it holds nexus.db")
        assert f"NEXUS_DATA_DIR={tmp_path / 'data'}" in warning
        server.wait_for_line("serving on")
    finally:
        server.stop()
    assert not (tmp_path / "xdg").exists()
