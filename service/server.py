"""The grpc.aio server: services, health, reflection, limits, graceful shutdown."""
from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from nexus.identity.v1 import identity_pb2, identity_pb2_grpc
from nexus.work.v1 import work_pb2, work_pb2_grpc

from db import migrate, secrets
from db.database import Database
from service.config import Config
from service.errors import ErrorInterceptor
from service.identity import IdentityService
from service.rpc import Runner
from service.work import WorkService

log = logging.getLogger("nexus.server")

LIVENESS = "liveness"
READINESS = "readiness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# (servicer class, registration function, service full name) for every domain service.
DOMAIN_SERVICES = (
    (IdentityService, identity_pb2_grpc.add_IdentityServiceServicer_to_server, identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name),
    (WorkService, work_pb2_grpc.add_WorkServiceServicer_to_server, work_pb2.DESCRIPTOR.services_by_name["WorkService"].full_name),
)


@dataclass
class App:
    """A running service: the server, its database, and the health state it reports."""

    config: Config
    server: grpc.aio.Server
    db: Database
    port: int
    health: health.aio.HealthServicer
    service_names: list[str]
    _monitor: asyncio.Task[None] | None = None
    _stopping: bool = False
    ready: bool = False
    servicers: list[Any] = field(default_factory=list)

    async def set_ready(self, ready: bool) -> None:
        self.ready = ready
        status = SERVING if ready and not self._stopping else NOT_SERVING
        for name in ["", READINESS, *self.service_names]:
            await self.health.set(name, status)

    async def _watch_database(self) -> None:
        """Readiness follows the database: NOT_SERVING while it does not answer."""
        loop = asyncio.get_running_loop()
        while not self._stopping:
            ok = await loop.run_in_executor(None, self.db.ping)
            if ok != self.ready:
                log.warning("database %s", "reachable again: serving" if ok else "unreachable: NOT_SERVING")
                await self.set_ready(ok)
            await asyncio.sleep(self.config.health_interval_seconds)

    async def start(self) -> None:
        await self.server.start()
        await self.health.set(LIVENESS, SERVING)
        await self.set_ready(await asyncio.get_running_loop().run_in_executor(None, self.db.ping))
        self._monitor = asyncio.create_task(self._watch_database())

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, a short drain so load balancers notice, stop with grace, dispose the engine."""
        if self._stopping:
            return
        self._stopping = True
        await self.set_ready(False)
        if self._monitor is not None:
            self._monitor.cancel()
        if self.config.drain_seconds > 0:
            await asyncio.sleep(self.config.drain_seconds)
        await self.server.stop(self.config.grace_seconds if grace is None else grace)
        await asyncio.get_running_loop().run_in_executor(None, self.db.dispose)


def prepare_database(config: Config) -> Database:
    """Open the database and bring its schema to head (or refuse a mismatched one)."""
    database = Database(config.database_url, config.pool, echo=config.db_echo)
    if config.migrate_on_start:
        migrate.upgrade(database.engine)
    else:
        migrate.check(database.engine)
    return database


def create_server(config: Config, database: Database | None = None) -> App:
    """Build the server bound to config.host:config.port (port 0 picks a free one); not started."""
    secrets.configure(config.hash_time_cost, config.hash_memory_kib)
    db = database or prepare_database(config)
    options = [
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.max_connection_idle_ms", 30 * 60_000),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor()],
        options=options,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )
    run = Runner(db)
    names = []
    servicers = []
    for servicer_cls, register, full_name in DOMAIN_SERVICES:
        servicer = servicer_cls(run)
        register(servicer, server)
        servicers.append(servicer)
        names.append(full_name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if port == 0:
        raise RuntimeError(f"could not bind {config.host}:{config.port}")
    return App(config, server, db, port, health_servicer, names, servicers=servicers)


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully."""
    log.info("configuration: %s", config.describe())
    app = create_server(config)
    await app.start()
    log.info("nexus-data serving on %s:%d (%s)", config.host, app.port, app.db.dialect)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: NOT_SERVING, draining %.1fs, grace %.1fs", config.drain_seconds, config.grace_seconds)
    await app.stop()
    log.info("stopped")
