"""Logs and traces: the log's format, the access log, and OpenTelemetry spans of calls and statements.

- `configure_logging` sets up the process's logging once (`serve` and each worker of
  `serve --workers`): text or JSON lines (LOG_FORMAT), each carrying the request id, the trace
  and span ids, the method and the caller of the call it was logged in, when there is one.
- `CallTelemetry` is the call guard's (service/interceptors.py) one hook per outcome: `begin`
  when a call arrives, `end` with its status code. It writes the access line (NEXUS_ACCESS_LOG,
  NEXUS_ACCESS_LOG_SAMPLE) and, when tracing is on, makes the call's server span.
- `setup_tracing` turns tracing on only when an OTLP endpoint is configured
  (OTEL_EXPORTER_OTLP_ENDPOINT): an SDK tracer provider exporting over OTLP/gRPC, and
  `trace_database` then traces the database's statements (opentelemetry-instrumentation-sqlalchemy).
  Without an endpoint nothing of the SDK is even imported, and a call pays one test of a global.

The server span is made here, not by opentelemetry-instrumentation-grpc's grpc.aio server
interceptor: that interceptor would run on every call, before the handler is looked up, which
the guard exists to avoid (GuardedRegistration), and it reads the status code only from
`context.abort` and `set_code`, while the guard answers errors with `abort_with_status`: its
spans said OK (rpc.grpc.status_code 0) for a NOT_FOUND. The span here has its attributes
(rpc.system, rpc.service, rpc.method, rpc.grpc.status_code, the span kind and name) and
continues an incoming `traceparent`.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import random
import sys
import threading
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import IO, Any
from urllib.parse import urlsplit

import grpc

from db.engine.call import Call

access_log = logging.getLogger("nexus.rpc.access")
log = logging.getLogger("nexus.telemetry")

SERVICE_NAME = "nexus-data"
# The server span's status is an error for these codes only (OpenTelemetry's semantic
# conventions for gRPC servers): the others are the client's mistakes, not the server's.
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
    }
)


class CallRecord:
    """One call as telemetry follows it, from `begin` to `end`. The guard fills in the Call
    once it has made it and the caller once authenticated (`principal`: the kind of caller and
    its id, "api_key:<key id>", "user:<user id>", "system": never a secret)."""

    __slots__ = ("method", "started", "peer", "deadline", "call", "principal", "span", "ended", "_token", "_otel_token")

    def __init__(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.method = method
        self.started = time.perf_counter()
        # Read now: a stream the client left may end after its call is gone, when the
        # context must not be touched any more.
        self.peer = context.peer() or ""
        remaining = context.time_remaining()
        self.deadline = None if remaining is None else self.started + remaining
        self.call: Call | None = None
        self.principal: str | None = None
        self.span: Any = None
        self.ended = False
        self._token: Any = None
        self._otel_token: Any = None

    @property
    def request_id(self) -> str | None:
        return self.call.request_id if self.call is not None else None

    def interrupted(self) -> grpc.StatusCode:
        """The code of a call that ended without an answer of ours: its deadline passed, or
        the client went away."""
        passed = self.deadline is not None and time.perf_counter() >= self.deadline
        return grpc.StatusCode.DEADLINE_EXCEEDED if passed else grpc.StatusCode.CANCELLED


# The call being handled, for the log lines written while it is (LogContext). The database
# threads see it: Database.run copies the context into the thread.
CURRENT_RECORD: ContextVar[CallRecord] = ContextVar("nexus_call_record")


def principal_of(actor_type: str, actor_id: Any) -> str:
    return f"{actor_type}:{actor_id}" if actor_id else actor_type


# ------------------------------------------------------------------------------------ logging


class LogContext(logging.Filter):
    """Adds what is known of the call being handled to every record: request_id, trace_id,
    span_id, method, principal (only those known; a record that carries one already keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        current = CURRENT_RECORD.get(None)
        if current is None:
            return True
        values = record.__dict__
        if "method" not in values:
            values["method"] = current.method
        if "request_id" not in values and current.call is not None:
            values["request_id"] = current.call.request_id
        if "principal" not in values and current.principal is not None:
            values["principal"] = current.principal
        if "trace_id" not in values and current.span is not None:
            context = current.span.get_span_context()
            values["trace_id"] = format(context.trace_id, "032x")
            values["span_id"] = format(context.span_id, "016x")
        return True


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


class TextFormatter(logging.Formatter):
    """The text line, with the call's request id and trace id appended when it has them (and
    its message does not say them already, as an access line does its request id)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        values = record.__dict__
        tags = [f"{name}={values[name]}" for name in ("request_id", "trace_id") if values.get(name) and values[name] not in record.message]
        if not tags:
            return line
        first, newline, rest = line.partition("\n")  # after the message, before a traceback
        return f"{first} [{' '.join(tags)}]{newline}{rest}"


def json_formatter() -> logging.Formatter:
    """One JSON object per line: time (RFC 3339, UTC), level, logger, message, pid, then the
    fields of the call (request_id, trace_id, span_id, method, principal) and of an access line (code, duration_ms, peer, reason)
    when known, and exc_info (the traceback) for an exception."""
    from pythonjsonlogger.json import JsonFormatter

    class Formatter(JsonFormatter):
        def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging's name
            stamp = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
            return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    return Formatter(
        ["asctime", "levelname", "name", "message", "process"],
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger", "process": "pid"},
        json_ensure_ascii=False,
    )


def configure_logging(level: str, log_format: str, stream: IO[str] | None = None) -> logging.Handler:
    """The process's logging: one handler on the root logger, to stderr (or stream), text or
    JSON (log_format), with the call's fields (LogContext); warnings become log lines too, so
    that with JSON every line on stderr is JSON. Replaces handlers an earlier call installed.
    Returns the handler."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(json_formatter() if log_format == "json" else TextFormatter(TEXT_FORMAT))
    handler.addFilter(LogContext())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "nexus_configured", False)]:
        root.removeHandler(old)
    handler.nexus_configured = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    if log_format == "json":
        sys.excepthook = _log_uncaught
    return handler


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, exc, tb)
        return
    logging.getLogger("nexus").critical("uncaught exception", exc_info=(kind, exc, tb))


# ------------------------------------------------------------------------------------ tracing

_tracer: Any = None  # the SDK tracer while tracing is on (setup_tracing), else None
_provider: Any = None
_traced_engines: Any = None  # a WeakSet of the engines whose statements are traced


def tracing_endpoint(env: Mapping[str, str]) -> str | None:
    """The OTLP endpoint traces go to, if one is configured."""
    return (env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "").strip() or None


# The compressions the OTLP/gRPC exporter knows (OTEL_EXPORTER_OTLP_[TRACES_]COMPRESSION).
OTLP_COMPRESSIONS = ("gzip", "deflate", "none")


def check_tracing_settings(env: Mapping[str, str] | None = None) -> None:
    """ConfigError naming the first OTEL_EXPORTER_OTLP_* setting the exporter could not use
    (serve checks them before the database is touched; the exporter itself would raise a bare
    ValueError, or log and go on without the file). Nothing is checked without an endpoint:
    then no setting of the exporter is read."""
    from service.config import ConfigError

    env = os.environ if env is None else env
    if tracing_endpoint(env) is None:
        return
    for variable in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        raw = env.get(variable, "").strip()
        if not raw:
            continue
        try:
            parsed = urlsplit(raw)
            parsed.port  # noqa: B018 - a port that is not a number raises here
        except ValueError as exc:
            raise ConfigError(f"{variable}={raw!r} is not a URL ({exc}): give the collector's, e.g. http://otel-collector:4317") from None
        if parsed.scheme in ("http", "https") and not parsed.hostname:
            raise ConfigError(f"{variable}={raw!r} names no host: give the collector's URL, e.g. http://otel-collector:4317")
    for prefix in ("OTEL_EXPORTER_OTLP_", "OTEL_EXPORTER_OTLP_TRACES_"):
        timeout = prefix + "TIMEOUT"
        raw = env.get(timeout, "").strip()
        if timeout in env:
            try:
                seconds = float(raw)
            except ValueError:
                seconds = math.nan
            if not 0 < seconds < math.inf:
                raise ConfigError(f"{timeout}={env[timeout]!r} is not a number of seconds above 0 (the exporter's time for one export)")
        compression = prefix + "COMPRESSION"
        if compression in env and env[compression].strip().lower() not in OTLP_COMPRESSIONS:
            raise ConfigError(f"{compression}={env[compression]!r} must be one of {', '.join(OTLP_COMPRESSIONS)}")
        insecure = prefix + "INSECURE"
        if insecure in env and env[insecure].strip().lower() not in ("true", "false"):
            raise ConfigError(f"{insecure}={env[insecure]!r} must be true or false")
        for name in ("CERTIFICATE", "CLIENT_KEY", "CLIENT_CERTIFICATE"):
            variable = prefix + name
            path = env.get(variable, "")
            if path and not os.access(path, os.R_OK):
                why = "does not exist" if not os.path.exists(path) else "cannot be read"
                raise ConfigError(f"{variable}: {path} {why}")


def setup_tracing(env: Mapping[str, str] | None = None, exporter: Any = None) -> Any:
    """Turn tracing on when an OTLP endpoint is configured (or when an exporter is given: tests
    pass the SDK's InMemorySpanExporter): an SDK TracerProvider for service `nexus-data`
    (OTEL_SERVICE_NAME wins) at this version, its spans exported over OTLP/gRPC in batches (the
    given exporter: each span as it ends). Returns the provider, or None: then nothing is set
    up and nothing of the SDK is imported.

    With OTLP the provider becomes the global one (so any other instrumented library joins the
    same traces); a given exporter's provider stays this module's own, so that tests can set
    tracing up and down again (shutdown_tracing)."""
    global _tracer, _provider
    env = os.environ if env is None else env
    endpoint = tracing_endpoint(env)
    if exporter is None and endpoint is None:
        return None
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from service import __version__

    shutdown_tracing()
    resource = Resource.create({"service.name": (env.get("OTEL_SERVICE_NAME") or "").strip() or SERVICE_NAME, "service.version": __version__})
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        check_tracing_settings(env)
        try:
            otlp = OTLPSpanExporter()  # endpoint, headers, TLS: the OTEL_EXPORTER_OTLP_* variables
        except (ValueError, RuntimeError) as exc:  # what check_tracing_settings does not know of
            from service.config import ConfigError

            raise ConfigError(f"tracing cannot be set up from the OTEL_EXPORTER_OTLP_* settings: {exc}") from None
        provider.add_span_processor(BatchSpanProcessor(otlp))
        trace.set_tracer_provider(provider)
        log.info("tracing: spans of %s go to %s over OTLP/gRPC", resource.attributes["service.name"], endpoint)
    _provider = provider
    _tracer = provider.get_tracer("nexus.rpc", __version__)
    return provider


def shutdown_tracing(timeout: float | None = None) -> bool:
    """Export what is left and turn tracing off (serve calls it before the process exits).
    With a timeout, the export is given that long (in a thread of its own, left behind after
    it: the process is about to exit): a collector that is down or does not answer holds the
    stop up no longer; returns whether the export ended in time."""
    global _tracer, _provider
    import db.prepared

    provider, _provider, _tracer = _provider, None, None
    db.prepared.through_sqlalchemy = False
    if provider is None:
        return True
    if timeout is None:
        provider.shutdown()
        return True
    flush = threading.Thread(target=provider.shutdown, name="nexus-trace-flush", daemon=True)
    flush.start()
    flush.join(max(0.0, timeout))
    if flush.is_alive():
        log.warning(
            "tracing: the spans still buffered were not exported within %.1fs (is the collector at %s up?): dropped",
            timeout, tracing_endpoint(os.environ) or "the configured endpoint",
        )
        return False
    return True


def tracing() -> bool:
    return _tracer is not None


def trace_database(database: Any) -> None:
    """While tracing is on, every statement of the database's engines gets a span, a child of
    the call's (opentelemetry-instrumentation-sqlalchemy's EngineTracer on each engine of
    db/database.py; the prepared statements then go through SQLAlchemy's execution, whose events
    it listens to). Nothing when tracing is off."""
    global _traced_engines
    if _provider is None:
        return
    import weakref

    import db.prepared
    from opentelemetry.instrumentation.sqlalchemy import __version__ as instrumentation_version
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.metrics import NoOpMeterProvider

    from opentelemetry import trace

    class CallStatements(EngineTracer):
        """Only the statements run for a call (under its span): the health check's `SELECT 1`
        every 2 s and the other background work would each make a trace of their own."""

        def _before_cur_exec(self, conn: Any, cursor: Any, statement: Any, params: Any, context: Any, executemany: Any) -> Any:
            if not trace.get_current_span().get_span_context().is_valid:
                return statement, params
            return super()._before_cur_exec(conn, cursor, statement, params, context, executemany)

    if _traced_engines is None:
        _traced_engines = weakref.WeakSet()
    tracer = _provider.get_tracer("opentelemetry.instrumentation.sqlalchemy", instrumentation_version)
    connections = NoOpMeterProvider().get_meter("nexus").create_up_down_counter("db.client.connections.usage")
    for engine in database.engines:
        if engine not in _traced_engines:
            CallStatements(tracer, engine, connections)
            _traced_engines.add(engine)
    db.prepared.through_sqlalchemy = True


# ------------------------------------------------------------------------------------ calls


class CallTelemetry:
    """The access log and the spans of one server's calls (one per server, shared by its guards)."""

    def __init__(self, access: str = "errors", sample: float = 1.0) -> None:
        self.access = access
        self.sample = sample

    def begin(self, method: str, context: grpc.aio.ServicerContext) -> CallRecord:
        """A call arrives: its clock starts, its record becomes the current one, and with
        tracing on its server span starts (continuing the caller's traceparent) as the current span."""
        record = CallRecord(method, context)
        record._token = CURRENT_RECORD.set(record)
        if _tracer is not None:
            self._start_span(record, context)
        return record

    def end(self, record: CallRecord, code: grpc.StatusCode, reason: str = "") -> None:
        """The call's outcome: its access line (if the mode and the sample say so), the end of its
        span. Once per call; a second call (an abort after its outcome was known) does nothing."""
        if record.ended:
            return
        record.ended = True
        duration_ms = (time.perf_counter() - record.started) * 1000
        if self.access != "off" and (code is not grpc.StatusCode.OK or (self.access == "all" and (self.sample >= 1 or random.random() < self.sample))):
            self._access_line(record, code, duration_ms, reason)
        if record.span is not None:
            self._end_span(record, code, reason)
        if CURRENT_RECORD.get(None) is record:  # (a stream may end in another context: nothing to undo there)
            with contextlib.suppress(ValueError):
                CURRENT_RECORD.reset(record._token)

    def _access_line(self, record: CallRecord, code: grpc.StatusCode, duration_ms: float, reason: str) -> None:
        request_id = record.request_id
        peer = record.peer
        fields: dict[str, Any] = {
            "method": record.method, "code": code.name, "duration_ms": round(duration_ms, 3), "peer": peer,
        }
        if request_id:
            fields["request_id"] = request_id
        if record.principal:
            fields["principal"] = record.principal
        if reason:
            fields["reason"] = reason
        access_log.info(
            "%s %s [request %s] %.1f ms by %s from %s%s",
            code.name, record.method, request_id or "-", duration_ms, record.principal or "-", peer, f": {reason}" if reason else "",
            extra=fields,
        )

    # -------------------------------------------------------------------------------- spans

    def _start_span(self, record: CallRecord, context: grpc.aio.ServicerContext) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry import propagate, trace

        carrier = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        parent = propagate.extract(carrier)
        service, _, method = record.method.lstrip("/").partition("/")
        span = _tracer.start_span(
            f"{service}/{method}",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )
        record.span = span
        record._otel_token = otel_context.attach(trace.set_span_in_context(span, parent))

    def _end_span(self, record: CallRecord, code: grpc.StatusCode, reason: str) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        span = record.span
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if record.principal:
            span.set_attribute("enduser.id", record.principal)
        if record.call is not None and record.call._request_id:
            span.set_attribute("nexus.request_id", record.call._request_id)
        if reason:
            span.set_attribute("error.type", reason)
        if code in SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, f"{code.name}: {reason}" if reason else code.name))
        span.end()
        if trace.get_current_span() is span:  # (not in another context: see end)
            otel_context.detach(record._otel_token)

