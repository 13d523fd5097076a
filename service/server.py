"""The grpc.aio server: services, health, reflection, limits, graceful shutdown."""
from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import errno
import gc
import os
import logging
import signal
import socket
import ssl
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

import db.domains  # noqa: F401 - every domain's resources registered, its tables on the metadata
from db import migrate, secrets
from db.base import utcnow
from db.domains import ai_usage
from db.blobs import BlobStore
from db.database import Database, first_line
from db.engine import events
from db.unit import SESSION_READ
from service import __version__, metrics, policy, reflection
from service.auth import AuthSettings, Authenticator, JwtSettings
from service.chat import ChatService
from service.config import Config, ConfigError, legacy_data_dir, redacted_url
from service.ai import AIService
from service.files import FileService
from service.identity import IdentityService
from service.interceptors import Gate, GuardedRegistration
from service.knowledge import KnowledgeService
from service.mail import MailService
from service.memory import MemoryTrimmer
from service.rpc import DomainServicer, Runner, UploadLimits
from service.security import SecurityService
from service.streams import ChangeHub, HubSettings
from service import telemetry
from service.work import WorkService

log = logging.getLogger("nexus.server")

# grpcio's AioServer.__dealloc__ logs itself at DEBUG ("__dealloc__ called on running server %s")
# when a server that never stopped is freed (one made and never started, as when create_server
# refuses a setting after making it). A log record is kept past the call by any handler that
# keeps records (a test's log capture, a buffering handler): it holds the freed server, and when
# it goes, the server is freed a second time and the process dies of a segmentation fault. That
# logger is held at INFO, whatever LOG_LEVEL says (tests/test_server.py).
GRPC_DEALLOC_LOGGER = "grpc._cython.cygrpc"
logging.getLogger(GRPC_DEALLOC_LOGGER).setLevel(logging.INFO)

# The initial metadata key of every health answer: the server's version (service.__version__),
# for an operator or a probe that asks what runs (`grpcurl -v ... grpc.health.v1.Health/Check`).
VERSION_HEADER = "nexus-version"


class VersionedHealth(health.aio.HealthServicer):
    """The standard health service; its answers say which version of the server gives them."""

    async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method's name
        await context.send_initial_metadata(((VERSION_HEADER, __version__),))
        return await super().Check(request, context)

    async def Watch(self, request: Any, context: Any) -> Any:  # noqa: N802 - the gRPC method's name
        await context.send_initial_metadata(((VERSION_HEADER, __version__),))
        await super().Watch(request, context)


# The least time the spans still buffered at a stop get to be exported, when the drain and the
# grace are spent.
TRACE_FLUSH_SECONDS = 0.5

LIVENESS = "liveness"
READINESS = "readiness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Every domain service's servicer: one line per domain.
# As DomainServicer classes (DomainServicer binds the standard RPCs when an instance is made;
# test_server checks that every RPC of every service is implemented).
SERVICERS: tuple[type[DomainServicer], ...] = (
    IdentityService, WorkService, ChatService, KnowledgeService, MailService, SecurityService, FileService, AIService,
)
# (servicer class, registration function, service full name) of each.
DOMAIN_SERVICES = tuple((cls, cls.registration(), cls.service_descriptor.full_name) for cls in SERVICERS)


@dataclass
class App:
    """A running service: the server, its database, and the health state it reports."""

    config: Config
    server: grpc.aio.Server
    db: Database
    port: int
    health: health.aio.HealthServicer
    service_names: list[str]
    hub: ChangeHub
    gate: Gate
    _monitor: asyncio.Task[None] | None = None
    _purger: asyncio.Task[None] | None = None
    _folder: asyncio.Task[None] | None = None
    _readiness: asyncio.Future[None] | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _trimmer: asyncio.Task[None] | None = None
    _metrics: metrics.Exporter | None = None
    _stopping: bool = False
    ready: bool = False
    servicers: list[Any] = field(default_factory=list)
    # The admin API key made on the first start of an empty database: shown once, never stored.
    bootstrap_secret: str | None = None

    async def set_ready(self, ready: bool) -> None:
        self.ready = ready
        status = SERVING if ready and not self._stopping else NOT_SERVING
        for name in ["", READINESS, *self.service_names]:
            await self.health.set(name, status)

    def _database_changed(self, reachable: bool) -> None:
        """Readiness follows the database as the calls find it (Database.note_reachable): the
        first call that finds it unreachable makes the server NOT_SERVING, the first that
        succeeds again SERVING, without waiting for the periodic check."""
        log.warning("database %s", "reachable again: serving" if reachable else "unreachable: NOT_SERVING")
        if self._loop is not None:  # (the database may be used from another loop: a CLI, a test)
            self._loop.call_soon_threadsafe(self._follow_database_soon)

    def _follow_database_soon(self) -> None:
        if self._readiness is None or self._readiness.done():
            self._readiness = asyncio.ensure_future(self._follow_database())

    async def _follow_database(self) -> None:
        while self.ready != self.db.reachable and not self._stopping:  # it may change again meanwhile
            await self.set_ready(self.db.reachable)

    async def _watch_database(self) -> None:
        """Readiness follows the database while no call tells: NOT_SERVING while it does not answer."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            self.db.note_reachable(await loop.run_in_executor(None, self.db.ping))
            await asyncio.sleep(self.config.health_interval_seconds)

    async def _purge_old_events(self) -> None:
        """Retention of the change log: older events go; tokens older than them must reload."""
        while not self._stopping:
            await asyncio.sleep(self.config.event_purge_interval_seconds)
            cutoff = utcnow() - dt.timedelta(seconds=self.config.event_retention_seconds)
            try:
                removed = await self.db.run(lambda s: events.purge(s, cutoff))  # noqa: B023 - run and awaited within this iteration
                if removed:
                    log.info("purged %d change events older than %s", removed, cutoff.isoformat())
            except Exception as exc:  # noqa: BLE001 - retried at the next interval
                log.warning("change event purge failed: %s", exc)

    async def _fold_usage_days(self) -> None:
        """PostgreSQL: the AI usage triggers' appended rows folded, every usage_fold_seconds."""
        mark = 0
        while not self._stopping:
            await asyncio.sleep(self.config.usage_fold_seconds)
            try:
                days, mark = await self.db.run(lambda s: ai_usage.fold_usage_days(s.connection(), mark))  # noqa: B023 - awaited within this iteration
                if days:
                    log.info("folded the AI usage of %d days", days)
            except Exception as exc:  # noqa: BLE001 - retried at the next interval
                log.warning("AI usage fold failed: %s", exc)

    async def start(self) -> None:
        self._metrics = metrics.start(self)  # first: a metrics port that cannot be had stops the start
        await self.hub.start()
        # Every health name answers from the first accepted connection: alive, and not ready
        # until the database has answered (a probe then reads NOT_SERVING, never NOT_FOUND).
        await self.health.set(LIVENESS, SERVING)
        await self.set_ready(False)
        await self.server.start()
        self._loop = asyncio.get_running_loop()
        self.db.note_reachable(await asyncio.get_running_loop().run_in_executor(None, self.db.ping))
        await self.set_ready(self.db.reachable)
        self.db.add_reachability_listener(self._database_changed)
        self._monitor = asyncio.create_task(self._watch_database())
        self._purger = asyncio.create_task(self._purge_old_events())
        if self.db.dialect == "postgresql" and self.config.usage_fold_seconds > 0:
            self._folder = asyncio.create_task(self._fold_usage_days())
        self._trimmer = asyncio.create_task(MemoryTrimmer(
            self.config.memory_trim_seconds, release=self.db.release_connections, busy=lambda: self.gate.calls).run())

    async def stop(self, grace: float | None = None, stop_server: bool = True) -> None:
        """NOT_SERVING and new calls refused with UNAVAILABLE (clients retry them elsewhere), a
        short drain so load balancers notice, the calls under way finished (within the grace),
        then the server stopped and the engine disposed.

        stop_server=False leaves the gRPC server as it is, for a process about to exit (serve):
        grpc's stop answers CANCELLED to the calls that reach it while it stops (accepted, not
        yet handed to a handler), where the connections the exit closes make them UNAVAILABLE."""
        if self._stopping:
            return
        self._stopping = True
        self.gate.close()
        await self.set_ready(False)
        for task in (self._monitor, self._purger, self._trimmer, self._folder):
            if task is not None:
                task.cancel()
        if self.config.drain_seconds > 0:
            await asyncio.sleep(self.config.drain_seconds)
        # Streams end with a final event carrying their resume token before the server stops.
        await self.hub.close()
        grace = self.config.grace_seconds if grace is None else grace
        started = asyncio.get_running_loop().time()
        # grpc.aio's stop() cancels the calls still under way when the grace ends (CANCELLED):
        # they are let finish first.
        if not await self.gate.wait_idle(grace):
            log.warning("%d calls still under way after the grace of %.1fs: cut", self.gate.calls, grace)
        if stop_server:
            await self.server.stop(max(0.0, grace - (asyncio.get_running_loop().time() - started)))
        if self._metrics is not None:
            self._metrics.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.db.dispose)
        if self.hub.authenticator is not None:
            self.hub.authenticator.close()


def open_database(config: Config) -> Database:
    """The database, once it answers: PostgreSQL is waited for (NEXUS_DB_WAIT_SECONDS; then
    DatabaseUnreachable); a SQLite directory that cannot be made, or a PostgreSQL that refuses
    the URL's user, password or database, is a ConfigError naming the setting."""
    try:
        database = Database(config.database_url, config.pool, echo=config.db_echo)
    except OSError as exc:
        raise ConfigError(
            f"{config.database_setting}: the SQLite file's directory {exc.filename} cannot be made ({exc.strerror}): choose a writable path"
        ) from None
    try:
        database.wait_until_reachable(config.db_wait_seconds)
    except DBAPIError as exc:
        database.dispose()
        raise ConfigError(f"{config.database_setting}: the database at {database.where} refused the connection: {first_line(exc)}") from exc
    except BaseException:
        database.dispose()
        raise
    return database


def prepare_database(config: Config) -> Database:
    """Open the database and bring its schema to head (or refuse a mismatched one)."""
    database = open_database(config)
    try:
        if config.migrate_on_start:
            migrate.upgrade(database.engine)
        else:
            migrate.check(database.engine)
    except BaseException:
        database.dispose()
        raise
    return database


def _setting_file(path: str, variable: str) -> bytes:
    """The bytes of a file a setting names; ConfigError naming the setting if it cannot be read."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{variable}: {path} cannot be read ({exc.strerror})") from None


def check_port(config: Config) -> None:
    """ConfigError naming NEXUS_HOST when the address cannot be listened on at all (not an
    address, not one of this machine's), or NEXUS_PORT (or NEXUS_METRICS_PORT) when the port is
    taken (or not ours to take), found before anything is migrated: a probe socket bound as the
    server binds (SO_REUSEADDR) and closed at once; with port 0 (any free port) the address
    alone is probed. Other failures are left to the server's own bind, which reports them."""
    why = _taken(config.host, config.port)
    if why:
        raise ConfigError(f"NEXUS_PORT (--port) {config.port} {why}")
    if config.metrics_port:
        why = _taken(config.host, config.metrics_port)
        if why:
            raise ConfigError(f"NEXUS_METRICS_PORT: cannot serve metrics on {config.host}:{config.metrics_port} (--metrics-port): the port {why}")


def _taken(host_setting: str, port: int) -> str | None:
    """Why the server could not listen on host:port (what to do included), or None; ConfigError
    naming NEXUS_HOST when no port could be listened on at that address."""
    host = host_setting.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"NEXUS_HOST (--host) {host_setting!r} is not an address to listen on: {exc.strerror}") from None
    try:
        probe_socket = socket.socket(family, kind, proto)
    except OSError:  # (no IPv6 on this machine: grpc binds [::] as 0.0.0.0 then) left to the server's bind
        return None
    with probe_socket as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                raise ConfigError(
                    f"NEXUS_HOST (--host) {host_setting!r} is not an address of this machine to listen on ({exc.strerror}): "
                    "use [::] or 0.0.0.0 for every interface, or one of this machine's addresses"
                ) from None
            if port and exc.errno == errno.EADDRINUSE:
                return f"is in use on {host_setting}: stop what listens there, or choose another port"
            if port and exc.errno == errno.EACCES:
                return f"is not ours to listen on ({exc.strerror}): choose a port above 1023"
    return None


def preflight(config: Config) -> None:
    """What serve checks before it opens the database: the files settings name (TLS, the JWT
    public key) and the port, so that a mistake in them migrates nothing."""
    _tls_credentials(config)
    _jwt_settings(config)
    telemetry.check_tracing_settings()
    metrics.check_multiproc_dir(config)
    check_port(config)


def create_server(config: Config, database: Database | None = None) -> App:
    """Build the server bound to config.host:config.port (port 0 picks a free one); not started."""
    secrets.configure(config.hash_time_cost, config.hash_memory_kib)
    # The files settings name are read before the database is touched.
    tls = _tls_credentials(config) if config.tls_cert else None
    jwt_settings = _jwt_settings(config)
    db = database or prepare_database(config)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_idle_ms", 30 * 60_000),
        # Several worker processes share one port (serve --workers N); a lone server owns it.
        ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
    ]
    methods = [f"/{full}/{m.name}" for cls, _, full in DOMAIN_SERVICES for m in cls.service_descriptor.methods]
    actions = policy.check_all_covered(methods)  # refuses to start if an RPC has no access rule
    policy.install_permissions(methods)  # or no permission; the catalog Roles are checked against
    authenticator = None if config.insecure_dev else Authenticator(db, jwt_settings, _auth_settings(config))
    # Checked before the gRPC server is made: a server made and never started stays in the
    # process until the garbage collector frees it (GRPC_DEALLOC_LOGGER above).
    blobs = BlobStore(config.blob_path)
    try:
        blobs.check()
    except OSError as exc:
        raise ConfigError(f"NEXUS_BLOB_DIR: the blob store {config.blob_path} cannot hold files: {exc}") from None
    server = grpc.aio.server(
        options=options,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    uploads = UploadLimits(config.max_file_bytes, config.upload_idle_seconds, config.max_uploads_per_caller)
    run = Runner(db, config.page_bytes, blobs, uploads, config.exact_count_limit)
    hub = ChangeHub(
        db,
        HubSettings(
            queue_size=config.stream_queue_size,
            poll_seconds=config.stream_poll_seconds,
            max_streams_per_caller=config.max_streams_per_caller,
            recheck_seconds=config.stream_recheck_seconds,
        ),
        authenticator,
    )
    names = []
    servicers = []
    telemetry.trace_database(db)  # (only while tracing is on)
    metrics.enable(config)  # before the methods are registered: each gets its MethodWatch
    guarded = GuardedRegistration(server, actions, authenticator, db.dialect, telemetry.CallTelemetry(config.access_log, config.access_log_sample))
    for servicer_cls, register, full_name in DOMAIN_SERVICES:
        servicer = servicer_cls(run, hub)
        register(servicer, guarded)
        servicers.append(servicer)
        names.append(full_name)
    if guarded.registered != names:
        raise RuntimeError(f"domain services registered without their guard: {sorted(set(names) - set(guarded.registered))}")
    health_servicer = VersionedHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    # v1 and v1alpha, the protos' comments included (service/reflection.py)
    reflection.enable_server_reflection([*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name], server)
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, tls) if tls is not None else server.add_insecure_port(address)
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    if config.port and port != config.port:
        # gRPC keeps only the low 16 bits of a port number (70000 binds 4464): never serve on
        # another port than the one asked for, whatever let it through.
        raise ConfigError(f"NEXUS_PORT (--port) {config.port}: gRPC bound port {port} instead; a port is from 1 to 65535")
    # With several workers the parent made the bootstrap key (if any) before forking them.
    secret = None if config.insecure_dev or config.workers > 1 else bootstrap_admin_key(db, config)
    return App(config, server, db, port, health_servicer, names, hub, guarded.gate, servicers=servicers, bootstrap_secret=secret)


def _jwt_settings(config: Config) -> JwtSettings:
    public_key = None
    if config.jwt_rs256_public_key_file:
        public_key = _setting_file(config.jwt_rs256_public_key_file, "NEXUS_JWT_RS256_PUBLIC_KEY_FILE").decode(errors="replace")
    return JwtSettings(config.jwt_hs256_secret, public_key, config.jwt_issuer, config.jwt_audience, config.jwt_role_claim, config.jwt_max_lifetime_seconds)


def _auth_settings(config: Config) -> AuthSettings:
    return AuthSettings(
        config.auth_hash_workers, config.auth_key_failure_limit, config.auth_peer_failure_limit,
        config.auth_failure_window_seconds, config.auth_recheck_seconds,
    )


def _tls_credentials(config: Config) -> grpc.ServerCredentials | None:
    """The server's TLS credentials (None without TLS); ConfigError naming the setting of a file
    that cannot be read."""
    if not config.tls_cert:
        if config.tls_client_ca:
            raise ConfigError("NEXUS_TLS_CLIENT_CA (--tls-client-ca) needs NEXUS_TLS_CERT and NEXUS_TLS_KEY (--tls-cert, --tls-key)")
        return None
    if not config.tls_key:
        raise ConfigError("NEXUS_TLS_CERT (--tls-cert) needs NEXUS_TLS_KEY (--tls-key)")
    pair = [(_setting_file(config.tls_key, "NEXUS_TLS_KEY (--tls-key)"), _setting_file(config.tls_cert, "NEXUS_TLS_CERT (--tls-cert)"))]
    ca = _setting_file(config.tls_client_ca, "NEXUS_TLS_CLIENT_CA (--tls-client-ca)") if config.tls_client_ca else None
    _check_tls_files(config)
    if ca is not None:
        return grpc.ssl_server_credentials(pair, root_certificates=ca, require_client_auth=True)
    return grpc.ssl_server_credentials(pair)


def _no_passphrase() -> bytes:
    raise ConfigError("NEXUS_TLS_KEY (--tls-key): the private key is encrypted (has a passphrase): gRPC needs it unencrypted")


def _check_tls_files(config: Config) -> None:
    """ConfigError naming the setting of a TLS file whose contents gRPC could not use: a
    certificate file with no PEM certificate, a key file with no PEM private key or one that is
    not the certificate's, a client CA file with no PEM certificate. (grpc reads them only when
    the port is added, after the database was migrated, and then says only that it could not
    bind.)"""
    assert config.tls_cert and config.tls_key
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=config.tls_cert)
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"NEXUS_TLS_CERT (--tls-cert): {config.tls_cert} holds no PEM certificate ({_ssl_reason(exc)})") from None
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key, password=_no_passphrase)
    except ConfigError:
        raise
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(
            f"NEXUS_TLS_KEY (--tls-key): {config.tls_key} is not a PEM private key of the certificate in NEXUS_TLS_CERT "
            f"{config.tls_cert} ({_ssl_reason(exc)})"
        ) from None
    if config.tls_client_ca:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=config.tls_client_ca)
        except (ssl.SSLError, ValueError) as exc:
            raise ConfigError(
                f"NEXUS_TLS_CLIENT_CA (--tls-client-ca): {config.tls_client_ca} holds no PEM CA certificate ({_ssl_reason(exc)})"
            ) from None


def _ssl_reason(exc: BaseException) -> str:
    """OpenSSL's reason, without the library's decorations ("[SSL] PEM lib (_ssl.c:3900)")."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    text = str(exc.args[-1]) if exc.args else type(exc).__name__
    return "no PEM private key found in it" if "PEM lib" in text else text


def bootstrap_admin_key(db: Database, config: Config) -> str | None:
    """On an empty database (no API key at all), make one admin key and return its secret. When
    it is to go to a file, the file is made first: if it cannot be, nothing is made (OSError),
    rather than a key nobody will ever read."""
    from db.domains.identity import create_api_key_if_none
    from db.domains.identity import ApiKey

    if db.run_sync(lambda s: s.scalar(select(ApiKey.id).limit(1)), SESSION_READ) is not None:
        return None
    if not _to_terminal(config):
        path = bootstrap_key_path(config)
        try:
            _write_private(path, "")
        except OSError as exc:
            raise ConfigError(
                f"NEXUS_BOOTSTRAP_KEY_FILE: the first admin key cannot be written to {path} ({exc.strerror}): choose a writable file"
            ) from None
    return db.run_sync(create_api_key_if_none)


def _to_terminal(config: Config) -> bool:
    return config.bootstrap_key_file is None and sys.stdout.isatty()


BOOTSTRAP_KEY_NAME = "bootstrap-admin-key"


def bootstrap_key_path(config: Config) -> Path:
    """NEXUS_BOOTSTRAP_KEY_FILE, else in the data directory (Config.data_path: by default the
    SQLite file's)."""
    if config.bootstrap_key_file:
        return Path(config.bootstrap_key_file).absolute()
    return Path(config.data_path, BOOTSTRAP_KEY_NAME)


def _write_private(path: Path, text: str) -> None:
    """text in a file only its owner may read (0600), in a directory made 0700 if it is new."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "w") as out:
        os.fchmod(out.fileno(), 0o600)  # an older file keeps its mode otherwise
        out.write(text)


def _announce(config: Config, bootstrap_secret: str | None) -> None:
    if config.insecure_dev:
        log.warning("=" * 72)
        log.warning("--insecure-dev: AUTHENTICATION IS OFF. Every caller is an admin. Never run this in production.")
        log.warning("=" * 72)
    if bootstrap_secret:
        hand_out_admin_key(config, bootstrap_secret)


def hand_out_admin_key(config: Config, bootstrap_secret: str) -> None:
    # Only its hash is stored. Shown once: on the terminal when there is one, else in a private
    # file; never in the log, which a cluster ships to log storage.
    line = f"NEXUS_ADMIN_KEY={bootstrap_secret}\n"
    if _to_terminal(config):
        sys.stdout.write(
            "First start on an empty database: an admin API key was created. It is shown once:\n"
            f"{line}Call with: -H 'authorization: Bearer <key>'. Create more with `nexus-data keys create`.\n"
        )
        sys.stdout.flush()
        return
    path = bootstrap_key_path(config)
    try:
        _write_private(path, line)
    except OSError as exc:
        log.error(
            "first start on an empty database: an admin API key was created but could not be written to %s (%s); "
            "make one with `nexus-data keys create --name admin --role admin` (NEXUS_BOOTSTRAP_KEY_FILE chooses the file)", path, exc.strerror,
        )
        return
    log.warning("first start on an empty database: an admin API key was written to %s (mode 0600); read it, then delete the file", path)


def _log_places(config: Config) -> None:
    """Where the data is, absolute: the data directory, the SQLite file, the blob store."""
    sqlite = config.sqlite_path
    if config.data_dir is None and config.data_path == legacy_data_dir():
        log.warning(
            "using the data directory %s because it holds nexus.db (where the service kept its data before "
            "NEXUS_DATA_DIR existed): set NEXUS_DATA_DIR=%s to keep it from any working directory",
            config.data_path, config.data_path,
        )
    log.info(
        "data directory %s (NEXUS_DATA_DIR): %s, blob store %s", config.data_path,
        f"SQLite file {sqlite}" if sqlite else f"database at {redacted_url(config.database_url)}",
        config.blob_path,
    )


def _run_worker(config: Config) -> None:
    """Entry point of one worker process (a fresh interpreter: its own engine, its own gRPC)."""
    telemetry.configure_logging(config.log_level, config.log_format)
    asyncio.run(serve(config, worker=True))


def serve_workers(config: Config) -> int:
    """`serve --workers N`: migrate and bootstrap once, then N processes on one port (SO_REUSEPORT).

    Workers are spawned, not forked, so each builds its engine and gRPC runtime after it starts;
    they behave as replicas of one database (streams included: LISTEN/NOTIFY on PostgreSQL, the
    change-log poll on SQLite).
    """
    import multiprocessing
    import multiprocessing.connection

    if config.port == 0:
        raise ConfigError("NEXUS_WORKERS (--workers) above 1 needs a fixed NEXUS_PORT (--port), not 0")
    log.info("configuration: %s", config.describe())
    preflight(config)
    _log_places(config)
    database = prepare_database(config)
    secret = None if config.insecure_dev else bootstrap_admin_key(database, config)
    database.dispose()
    _announce(config, secret)
    worker_config = dataclasses.replace(config, migrate_on_start=False)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_run_worker, args=(worker_config,), name=f"nexus-worker-{i}") for i in range(config.workers)]
    # The metrics endpoint is open (and PROMETHEUS_MULTIPROC_DIR set) before the first worker starts.
    with metrics.for_workers(config) as endpoint:
        for worker in workers:
            worker.start()
        log.info("nexus-data %s serving on %s:%d with %d workers", __version__, config.host, config.port, config.workers)

        def forward(signum: int, _frame: object) -> None:
            for worker in workers:
                if worker.pid is not None and worker.is_alive():
                    os.kill(worker.pid, signal.SIGTERM)

        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        running = list(workers)
        while running:  # each worker as it exits, in whatever order
            ended = multiprocessing.connection.wait([w.sentinel for w in running])
            for worker in [w for w in running if w.sentinel in ended]:
                worker.join()
                running.remove(worker)
                if endpoint is not None:
                    endpoint.worker_exited(worker.pid)
    return max((w.exitcode or 0) for w in workers)


async def serve(config: Config, worker: bool = False) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully. (A worker of serve_workers: its
    parent checked the settings and the port, and migrated.)"""
    log.info("configuration: %s", config.describe())
    if not worker:
        preflight(config)
        _log_places(config)
    telemetry.setup_tracing()  # only with an OTLP endpoint (OTEL_EXPORTER_OTLP_ENDPOINT)
    app = create_server(config)
    _announce(config, app.bootstrap_secret)
    await app.start()
    # Everything built so far (modules, the ORM's mappers, descriptors) lives as long as the
    # process: out of the collector's generations, it is not traversed again on every full
    # collection: less CPU per call (bench/README.md).
    gc.collect()
    gc.freeze()
    # The youngest generation collected every 10,000 net allocations, not 700: under a stream
    # fan-out load the default's collections ran many times a second, in the middle of the
    # fan-outs, and with this threshold they are rare (bench/README.md). What this service
    # drops is freed by reference counting; the collector is there for the rare cycle.
    gc.set_threshold(10_000, 20, 20)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # (After the handlers: a SIGTERM sent on reading this line shuts down gracefully.)
    log.info("nexus-data %s serving on %s:%d (%s); blob store %s", __version__, config.host, app.port, app.db.dialect, config.blob_path)
    await stop.wait()
    log.info("shutting down: NOT_SERVING, draining %.1fs, grace %.1fs", config.drain_seconds, config.grace_seconds)
    until = loop.time() + config.drain_seconds + config.grace_seconds
    await app.stop(stop_server=False)
    # The spans still buffered are exported within what is left of the drain and grace (at
    # least TRACE_FLUSH_SECONDS): a collector that is down does not hold the stop up past them.
    telemetry.shutdown_tracing(max(TRACE_FLUSH_SECONDS, until - loop.time()))
    log.info("stopped")
    # Out without grpc's stop (App.stop): the calls still arriving (refused with UNAVAILABLE
    # since the drain began) see their connection closed, UNAVAILABLE too, never CANCELLED.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
