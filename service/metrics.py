"""Prometheus metrics: http://<NEXUS_HOST>:<NEXUS_METRICS_PORT>/metrics (off when the port is 0).

Two kinds, both with prometheus_client:

- Counted as they happen. The gRPC server metrics, with the names and labels of
  go-grpc-prometheus and py-grpc-prometheus (grpc_server_*): CallGuard (service/interceptors.py)
  holds a MethodWatch per method, made once with its label children, and tells it when a call
  starts and how it ended; messages are counted by the method's (de)serializers, which grpc
  calls once per message. The database calls' latency (Database.timing).
- Read from the service's own counters and state when the metrics are refreshed: the pools
  (Database.load), the open streams and their queues, cut-offs and delivered events
  (ChangeHub.load and its counters), refused credentials and the credential cache
  (Authenticator), the hits of the other caches (functools.lru_cache's cache_info), and the
  glibc heaps: how many, their bytes in use and free (service/memory.py heap_stats). The
  code that counts them adds to a plain integer; nothing is done per event for the metrics.
  Refreshed on every scrape in a single process; every SAMPLE_SECONDS in each worker of
  `serve --workers N` (and once more as it stops).

`serve --workers N`: prometheus_client's multiprocess mode. The parent makes a directory, names it
in PROMETHEUS_MULTIPROC_DIR before it spawns the workers (prometheus_client reads it when it is
imported), serves /metrics itself from every worker's files (MultiProcessCollector), marks a
worker dead when it exits (its live gauges go; its counters stay, so nothing counted is lost or
counted twice), and removes the directory at the end.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    multiprocess,
    start_http_server,
    values,
)
from prometheus_client.core import GaugeMetricFamily

import service
from db.unit import Mode, Plan
from service import memory

log = logging.getLogger("nexus.metrics")

MULTIPROC_DIR = "PROMETHEUS_MULTIPROC_DIR"
# How often each worker of `serve --workers N` writes the state-read metrics to its files.
SAMPLE_SECONDS = 1.0
# prometheus_client's defaults (those of go-grpc-prometheus too) with finer ones below 5 ms, where
# most of this service's calls end.
HANDLING_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DB_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")
# grpc_type of each kind of method handler.
UNARY, CLIENT_STREAM, SERVER_STREAM, BIDI_STREAM = "UNARY", "CLIENT_STREAM", "SERVER_STREAM", "BIDI_STREAM"
_CODES = {code.value[0]: code for code in grpc.StatusCode}
_OK = grpc.StatusCode.OK
_ENDED = (asyncio.CancelledError, GeneratorExit)

disable_created_metrics()  # no *_created series: neither go-grpc-prometheus nor multiprocess mode has them


class _Metrics:
    """Every metric of the process (one set: prometheus_client keeps them by name)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.started = Counter("grpc_server_started", "Total number of RPCs started on the server.", GRPC_LABELS, registry=r)
        self.handled = Counter(
            "grpc_server_handled", "Total number of RPCs completed on the server, regardless of success or failure.",
            (*GRPC_LABELS, "grpc_code"), registry=r,
        )
        self.received = Counter("grpc_server_msg_received", "Total number of RPC stream messages received on the server.", GRPC_LABELS, registry=r)
        self.sent = Counter("grpc_server_msg_sent", "Total number of gRPC stream messages sent by the server.", GRPC_LABELS, registry=r)
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server.",
            GRPC_LABELS, buckets=HANDLING_BUCKETS, registry=r,
        )
        self.db_seconds = Histogram(
            "nexus_db_call_duration_seconds",
            "Database calls (units of work) from submission to answer, the wait for a database thread included, by plan mode.",
            ("mode",), buckets=DB_BUCKETS, registry=r,
        )
        self.pool_in_use = Gauge(
            "nexus_db_pool_connections_in_use", "Connections checked out of each SQLAlchemy pool (read, write), kept ones included.",
            ("pool",), multiprocess_mode="livesum", registry=r,
        )
        self.pool_waiting = Gauge(
            "nexus_db_pool_waiting",
            "Database calls waiting for a connection: for a database thread (threads), for SQLite's one write connection (sqlite_write).",
            ("queue",), multiprocess_mode="livesum", registry=r,
        )
        self.open_streams = Gauge("nexus_open_streams", "Open StreamEvents and Watch streams.", multiprocess_mode="livesum", registry=r)
        self.queued = Gauge(
            "nexus_stream_queued_events", "Events waiting in the streams' queues (NEXUS_STREAM_QUEUE_SIZE each).", multiprocess_mode="livesum", registry=r
        )
        self.deepest = Gauge(
            "nexus_stream_queue_depth_max", "The most events waiting in one stream's queue.", multiprocess_mode="livemax", registry=r
        )
        self.cut_offs = Counter("nexus_stream_cut_offs", "Streams cut off because their queue was full (SUBSCRIBER_TOO_SLOW).", registry=r)
        self.delivered = Counter(
            "nexus_stream_events_delivered", "Change events StreamEvents sent: as offered (live) or read from the change log (log).",
            ("source",), registry=r,
        )
        self.auth_failures = Counter("nexus_auth_failures", "Calls refused for their credentials, by reason.", ("reason",), registry=r)
        self.cache_hits = Counter("nexus_cache_hits", "Lookups a cache answered, by cache.", ("cache",), registry=r)
        self.cache_misses = Counter("nexus_cache_misses", "Lookups a cache could not answer, by cache.", ("cache",), registry=r)
        self.malloc_arenas = Gauge(
            "nexus_malloc_arenas", "glibc heaps (arenas) of a server process (NEXUS_MALLOC_ARENAS caps them).", multiprocess_mode="livemax", registry=r
        )
        self.malloc_bytes = Gauge(
            "nexus_malloc_bytes", "Bytes of the glibc heaps: handed out (in_use) and held free by the heaps (free).",
            ("state",), multiprocess_mode="livesum", registry=r,
        )
        self.db_children = {mode: self.db_seconds.labels(mode.name.lower()) for mode in Mode}

    def time_database(self, plan: Plan, seconds: float) -> None:
        self.db_children[plan.mode].observe(seconds)


class MethodWatch:
    """The metrics of one served method; its label children are made once, here."""

    __slots__ = ("labels", "handled_by_code", "_handled", "_started", "_received", "_sent", "_observe")

    def __init__(self, metrics: _Metrics, method: str, grpc_type: str) -> None:
        service_name, _, name = method.lstrip("/").partition("/")
        self.labels = (grpc_type, service_name, name)
        self._handled = metrics.handled
        self.handled_by_code: dict[grpc.StatusCode, Callable[[], None]] = {}
        self._started = metrics.started.labels(*self.labels).inc
        self._received = metrics.received.labels(*self.labels).inc
        self._sent = metrics.sent.labels(*self.labels).inc
        self._observe = metrics.handling.labels(*self.labels).observe

    def started(self) -> float:
        """A call began: counted; the time it began."""
        self._started()
        return time.perf_counter()

    def handled(self, context: grpc.aio.ServicerContext, began: float) -> None:
        """A call ended (called from the `finally` of its handler): counted by the code it ended
        with, which grpc holds once the call was aborted; none means it returned (OK), unless
        it is ending by an exception: cancelled by its client (CANCELLED, or DEADLINE_EXCEEDED
        when its deadline passed)."""
        elapsed = time.perf_counter() - began
        code = context.code()
        if code is None:
            ending = sys.exc_info()[0]
            if ending is None:
                code = _OK
            elif issubclass(ending, _ENDED):
                remaining = context.time_remaining()
                code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else grpc.StatusCode.CANCELLED
            else:
                code = grpc.StatusCode.UNKNOWN
        elif not isinstance(code, grpc.StatusCode):
            code = _CODES.get(code, grpc.StatusCode.UNKNOWN)
        count = self.handled_by_code.get(code)
        if count is None:
            count = self.handled_by_code[code] = self._handled.labels(*self.labels, code.name).inc
        count()
        self._observe(elapsed)

    def counting(self, request_deserializer: Any, response_serializer: Any) -> dict[str, Any]:
        """A method handler's (de)serializer arguments, counting its messages."""
        return {"request_deserializer": self.deserializer(request_deserializer), "response_serializer": self.serializer(response_serializer)}

    def deserializer(self, deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
        """The method's request deserializer, counting each message it reads (grpc calls it once
        per request message, a unary call's one included)."""
        if deserialize is None:
            return None
        received = self._received

        def counted(data: bytes) -> Any:
            message = deserialize(data)
            received()
            return message

        return counted

    def serializer(self, serialize: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
        """The method's response serializer, counting each message as grpc is about to write it
        (a unary call's answer, which only an OK call has, and each message of a stream)."""
        if serialize is None:
            return None
        sent = self._sent

        def counted(message: Any) -> bytes:
            data = serialize(message)
            sent()
            return data

        return counted


class _Unwatched:
    """The MethodWatch of a server without metrics: nothing counted."""

    __slots__ = ()

    def started(self) -> float:
        return 0.0

    def handled(self, context: Any, began: float) -> None:
        pass

    def counting(self, request_deserializer: Any, response_serializer: Any) -> dict[str, Any]:
        return {"request_deserializer": request_deserializer, "response_serializer": response_serializer}


UNWATCHED = _Unwatched()


class _BuildInfo:
    """nexus_build_info{version="..."} 1, served by whichever process serves /metrics."""

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("nexus_build_info", "The running nexus-data: its version (always 1).", labels=["version"])
        family.add_metric([service.__version__], 1)
        yield family


def _lru_caches() -> dict[str, tuple[Any, ...]]:
    """The caches worth watching (functools.lru_cache and filtering.plans: cache_info()), by the
    name their metrics carry."""
    from db import prepared
    from db.engine import filtering, statements

    return {
        "filters": (filtering.plans,),
        "statements": (statements.page_statements, statements.search_statements, statements.update_statement),
        "compiled": (prepared.prepared,),
    }


class _Refresh:
    """Reads the state-read metrics from the running servers of the process (its sources)."""

    def __init__(self, metrics: _Metrics) -> None:
        self.metrics = metrics
        self.sources: list[Any] = []  # App-like: .db, .hub
        self._lock = threading.Lock()
        self._added: dict[tuple[Any, ...], float] = {}  # what each counter child got so far
        self._caches = _lru_caches()

    def _advance(self, child: Any, key: tuple[Any, ...], total: float) -> None:
        """A counter child brought up to `total`, the count its source keeps."""
        added = self._added.get(key, 0)
        if total > added:
            child.inc(total - added)
            self._added[key] = total

    def __call__(self, sources: Iterable[Any] | None = None) -> None:
        m = self.metrics
        with self._lock:
            in_use: dict[str, int] = {"read": 0, "write": 0}
            waiting: dict[str, int] = {"threads": 0}
            streams = queued = deepest = 0
            for source in list(self.sources) if sources is None else sources:
                pools, queues = source.db.load()
                for name, value in pools.items():
                    in_use[name] = in_use.get(name, 0) + value
                for name, value in queues.items():
                    waiting[name] = waiting.get(name, 0) + value
                open_now, waiting_events, most = source.hub.load()
                streams, queued, deepest = streams + open_now, queued + waiting_events, max(deepest, most)
                hub, me = source.hub, id(source)
                self._advance(m.cut_offs, (me, "cut_offs"), hub.cut_offs)
                self._advance(m.delivered.labels("live"), (me, "live"), hub.delivered_live)
                self._advance(m.delivered.labels("log"), (me, "log"), hub.delivered_from_log)
                auth = hub.authenticator
                if auth is not None:
                    self._advance(m.cache_hits.labels("credentials"), (me, "hits"), auth.cache_hits)
                    self._advance(m.cache_misses.labels("credentials"), (me, "misses"), auth.cache_misses)
                    for reason, count in dict(auth.failures).items():
                        self._advance(m.auth_failures.labels(reason), (me, "failure", reason), count)
            for name, value in in_use.items():
                m.pool_in_use.labels(name).set(value)
            for name, value in waiting.items():
                m.pool_waiting.labels(name).set(value)
            m.open_streams.set(streams)
            m.queued.set(queued)
            m.deepest.set(deepest)
            heap = memory.heap_stats()
            if heap is not None:
                m.malloc_arenas.set(heap.arenas)
                m.malloc_bytes.labels("in_use").set(heap.in_use)
                m.malloc_bytes.labels("free").set(heap.free)
            for name, functions in self._caches.items():
                infos = [f.cache_info() for f in functions]
                self._advance(m.cache_hits.labels(name), (name, "hits"), sum(i.hits for i in infos))
                self._advance(m.cache_misses.labels(name), (name, "misses"), sum(i.misses for i in infos))

    def forget(self, source: Any) -> None:
        with self._lock:
            self._added = {key: value for key, value in self._added.items() if key[0] != id(source)}


class _RefreshedRegistry(CollectorRegistry):
    """The registry of a single process: the state-read metrics are refreshed on every scrape."""

    refresh: _Refresh | None = None

    def collect(self) -> Iterator[Any]:
        if self.refresh is not None:
            self.refresh()
        yield from super().collect()


# The process's metrics, made by enable().
_registry: _RefreshedRegistry | None = None
_metrics: _Metrics | None = None
_refresh: _Refresh | None = None
_setup = threading.Lock()


def multiprocess_mode() -> bool:
    """Whether prometheus_client writes this process's values to PROMETHEUS_MULTIPROC_DIR."""
    return values.ValueClass is not values.MutexValue


def check_multiproc_dir(config: Any) -> None:
    """ConfigError naming PROMETHEUS_MULTIPROC_DIR when a single server with metrics would write
    them there (prometheus_client's multiprocess mode, chosen when it was imported with the
    variable set: inherited from a base image, a shell profile) and it is not a directory this
    process can write to. `serve --workers N` sets its own for its workers (WorkersEndpoint):
    an inherited one is not used there."""
    if not config.metrics_port or config.workers > 1 or not multiprocess_mode():
        return
    from service.config import ConfigError

    path = os.environ.get(MULTIPROC_DIR) or os.environ.get(MULTIPROC_DIR.lower()) or ""
    if not os.path.isdir(path):
        why = "is not set to a directory" if not path else "does not exist" if not os.path.exists(path) else "is not a directory"
    elif not os.access(path, os.W_OK | os.X_OK):
        why = "is a directory this process cannot write to"
    else:
        return
    raise ConfigError(
        f"{MULTIPROC_DIR}={path!r} {why}: with it set, the metrics are written there (prometheus_client's multiprocess mode); "
        "unset it (a single server needs none, serve --workers makes its own) or name a writable directory"
    )


def enable(config: Any) -> bool:
    """Before a server's methods are registered: whether it counts metrics (NEXUS_METRICS_PORT
    set), the process's metrics made at the first. A worker of `serve --workers N` must have
    been started with PROMETHEUS_MULTIPROC_DIR set (serve_workers does)."""
    global _registry, _metrics, _refresh
    if not config.metrics_port:
        return False
    if config.workers > 1 and not multiprocess_mode():
        raise RuntimeError(f"a worker of serve --workers counts metrics only with {MULTIPROC_DIR} set before it started (serve_workers sets it)")
    with _setup:
        if _metrics is None:
            _registry = _RefreshedRegistry(auto_describe=True)
            _metrics = _Metrics(_registry)
            _refresh = _Refresh(_metrics)
            _registry.refresh = _refresh
            if config.workers == 1:  # (a worker's parent serves the build's version)
                for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR, _BuildInfo()):
                    _registry.register(collector)
    return True


def watch(method: str, grpc_type: str) -> MethodWatch | _Unwatched:
    """The MethodWatch of a method being registered (UNWATCHED while metrics are off)."""
    return UNWATCHED if _metrics is None else MethodWatch(_metrics, method, grpc_type)


def grpc_type_of(handler: grpc.RpcMethodHandler) -> str:
    if handler.unary_unary is not None:
        return UNARY
    if handler.unary_stream is not None:
        return SERVER_STREAM
    if handler.stream_unary is not None:
        return CLIENT_STREAM
    return BIDI_STREAM


def _bind_address(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _serve_http(config: Any, registry: Any) -> Any:
    """The /metrics endpoint on NEXUS_HOST:NEXUS_METRICS_PORT; a port that cannot be had stops
    the start, naming its setting."""
    address = _bind_address(config.host)
    try:
        server, _ = start_http_server(config.metrics_port, addr=address, registry=registry)
    except OSError as exc:
        from service.config import ConfigError

        raise ConfigError(f"NEXUS_METRICS_PORT: cannot serve metrics on {config.host}:{config.metrics_port}: {exc.strerror or exc}") from None
    log.info("metrics on http://%s:%d/metrics", config.host if ":" not in address else f"[{address}]", config.metrics_port)
    return server


class Exporter:
    """The metrics of one running server (App.start to App.stop)."""

    def __init__(self, app: Any) -> None:
        assert _metrics is not None and _refresh is not None and _registry is not None
        self.app = app
        self._http: Any = None
        self._sampler: asyncio.Task[None] | None = None
        if app.config.workers > 1:  # a worker: its parent serves the metrics of all of them
            self._sampler = asyncio.get_running_loop().create_task(self._sample())
        else:
            self._http = _serve_http(app.config, _registry)
        app.db.timing = _metrics.time_database
        _refresh.sources.append(app)

    async def _sample(self) -> None:
        assert _refresh is not None
        while True:
            _refresh()
            await asyncio.sleep(SAMPLE_SECONDS)

    def stop(self) -> None:
        """After the server's last call: its counts brought up to date, the endpoint closed."""
        assert _refresh is not None
        if self._sampler is not None:
            self._sampler.cancel()
        _refresh()
        with contextlib.suppress(ValueError):
            _refresh.sources.remove(self.app)
        _refresh.forget(self.app)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()


def start(app: Any) -> Exporter | None:
    """App.start: the metrics of this server, served (a single process) or sampled (a worker)."""
    if _metrics is None or not app.config.metrics_port:
        return None
    return Exporter(app)


class WorkersEndpoint:
    """`serve --workers N`: the parent's side of the multiprocess mode (see the module's text)."""

    def __init__(self, config: Any) -> None:
        self.path = tempfile.mkdtemp(prefix="nexus-metrics-")
        registry = CollectorRegistry(auto_describe=True)
        multiprocess.MultiProcessCollector(registry, path=self.path)
        registry.register(_BuildInfo())
        try:
            self._http = _serve_http(config, registry)
        except BaseException:
            shutil.rmtree(self.path, ignore_errors=True)
            raise
        self._previous = os.environ.get(MULTIPROC_DIR)
        os.environ[MULTIPROC_DIR] = self.path  # inherited by the workers spawned from now on

    def worker_exited(self, pid: int | None) -> None:
        """Its live gauges go; its counters and histograms stay in the sums."""
        if pid is not None:
            multiprocess.mark_process_dead(pid, self.path)

    def close(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        if self._previous is None:
            os.environ.pop(MULTIPROC_DIR, None)
        else:
            os.environ[MULTIPROC_DIR] = self._previous
        shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def for_workers(config: Any) -> Iterator[WorkersEndpoint | None]:
    """serve_workers: the endpoint for its workers' metrics, open while they run (None: off)."""
    if not config.metrics_port:
        yield None
        return
    endpoint = WorkersEndpoint(config)
    try:
        yield endpoint
    finally:
        endpoint.close()

