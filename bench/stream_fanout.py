#!/usr/bin/env python3
"""StreamEvents fan-out benchmark: N live subscribers on a channel, one steady writer.

    .venv/bin/python bench/stream_fanout.py --db sqlite|postgresql \
        [--subscribers 1000] [--rate 10] [--seconds 20] [--channels 1]

Two cases run one after the other, each against its own server subprocess:

* service: the real `nexus-data serve` on a fresh database (a SQLite file in a temp directory,
  or a PostgreSQL database created for the run and dropped afterwards);
* floor: a minimal grpc.aio server defined in this file (generic handlers, no new protos) that
  fans each message it is sent by a unary RPC out to the subscribers' asyncio queues, from
  memory, serialised once, with no database, no per-stream resume token and no copies. It is
  the cost of gRPC + asyncio alone on this machine, i.e. the best the service could do.

Both cases use the same load generator: --procs separate processes (multiprocessing, spawn)
that each hold subscribers/procs grpc.aio streams, multiplexed --streams-per-conn to one HTTP/2
connection. The writer is an open-loop asyncio task in the parent process: message i is sent
at t0 + i/rate whatever the previous calls do, with time.time_ns() in its content, so a slow
server shows as latency instead of silently lowering the rate. Each subscriber records
receive time - send time for every message, its sequence numbers and which messages it got.

Bounded: every phase has a timeout, a watchdog ends the run after --max-runtime seconds, and
processes, the PostgreSQL database and temp files are cleaned up on success, failure, Ctrl-C
or SIGTERM.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.chat.v1 import chat_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
NEXUS_DATA = Path(sys.executable).parent / "nexus-data"
PG_ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "dbname": "postgres"}
FLOOR_SERVICE = "bench.FloorFanout"
PUBLISH = f"/{FLOOR_SERVICE}/Publish"
SUBSCRIBE = f"/{FLOOR_SERVICE}/Subscribe"
CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

# Message contents: "w <k>" warm-up, "b <index> <send time_ns> <padding>" measured.
WARMUP, MEASURED = "w", "b"


# ======================================================================== process registry
# Everything started is registered here so that any exit path (exception, Ctrl-C, SIGTERM,
# the watchdog) can stop it. Each entry is a callable that must be safe to call twice.

_CLEANUPS: list[tuple[str, Callable[[], None]]] = []
_cleanup_lock = threading.Lock()


def register_cleanup(name: str, fn: Callable[[], None]) -> Callable[[], None]:
    with _cleanup_lock:
        _CLEANUPS.append((name, fn))
    return fn


def run_cleanups() -> None:
    while True:
        with _cleanup_lock:
            if not _CLEANUPS:
                return
            name, fn = _CLEANUPS.pop()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - keep cleaning up the rest
            print(f"cleanup of {name} failed: {exc!r}", file=sys.stderr)


class ServerProcess:
    """A server subprocess in its own session (Ctrl-C in the terminal does not reach it)."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        register_cleanup(name, self.stop)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self._log.closed:
            self._log.close()

    def tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# ======================================================================== /proc helpers


def _status_kib(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def rss_mib(pid: int) -> float:
    return _status_kib(pid, "VmRSS") / 1024


def hwm_mib(pid: int) -> float:
    return _status_kib(pid, "VmHWM") / 1024


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included); 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0


def machine_busy_seconds() -> float:
    """CPU-seconds all cores spent not idle since boot (every process on the machine)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLK_TCK


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ======================================================================== PostgreSQL


def pg_connect(dbname: str = "postgres") -> Any:
    import psycopg2

    conn = psycopg2.connect(**{**PG_ADMIN, "dbname": dbname}, connect_timeout=10)
    conn.autocommit = True
    return conn


def create_pg_database() -> str:
    name = f"nexus_bench_{uuid.uuid4().hex[:10]}"
    conn = pg_connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()

    def drop() -> None:
        c = pg_connect()
        try:
            with c.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            c.close()

    register_cleanup(f"database {name}", drop)
    return name


def pg_backend_pids(dbname: str) -> list[int]:
    conn = pg_connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = %s", (dbname,))
            return [int(r[0]) for r in cur.fetchall()]
    finally:
        conn.close()


# ======================================================================== the floor server


async def floor_serve(port: int, max_rpcs: int) -> None:
    """Fan-out from memory: Publish(CreateChatMessageRequest) -> every Subscribe stream of its channel."""
    subscribers: dict[str, set[asyncio.Queue[bytes]]] = defaultdict(set)
    sequences: dict[str, int] = defaultdict(int)

    async def publish(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        message = cpb.CreateChatMessageRequest.FromString(request).chat_message
        message.id = str(uuid.uuid4())
        message.create_time.GetCurrentTime()
        scope = f"channels/{message.channel_id}"
        sequences[scope] += 1
        event = cpb.StreamEventsResponse(type=cpb.EVENT_TYPE_CREATED, scope=scope, sequence=sequences[scope], chat_message=message)
        event.commit_time.CopyFrom(message.create_time)
        data = event.SerializeToString()  # once, whatever the number of subscribers
        for queue in subscribers.get(scope, ()):
            queue.put_nowait(data)
        return message.SerializeToString()

    async def subscribe(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        scopes = [f"channels/{c}" for c in cpb.StreamEventsRequest.FromString(request).channel_ids]
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        for scope in scopes:
            subscribers[scope].add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            for scope in scopes:
                subscribers[scope].discard(queue)

    server = grpc.aio.server(
        options=[("grpc.so_reuseport", 0), ("grpc.keepalive_permit_without_calls", 1)],
        maximum_concurrent_rpcs=max_rpcs,
    )
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                FLOOR_SERVICE,
                {
                    "Publish": grpc.unary_unary_rpc_method_handler(publish),
                    "Subscribe": grpc.unary_stream_rpc_method_handler(subscribe),
                },
            )
        ]
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await health_servicer.set("readiness", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


# ======================================================================== load generator process


@dataclass
class StreamState:
    channel_id: str
    warm: bool = False
    last_seq: int = 0
    events: int = 0  # measured events received, duplicates included
    out_of_order: int = 0  # events whose sequence was not previous + 1
    duplicates: int = 0
    seen: set[int] = field(default_factory=set)
    remaining: set[int] | None = None  # acknowledged messages not received yet, once the writer is done
    error: str = ""


def loadgen_main(
    index: int,
    address: str,
    mode: str,
    channel_ids: list[str],
    per_conn: int,
    metadata: tuple[tuple[str, str], ...],
    warmed: Any,
    failed: Any,
    conn: Connection,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when we stop
    asyncio.run(_loadgen(index, address, mode, channel_ids, per_conn, metadata, warmed, failed, conn))


async def _loadgen(
    index: int,
    address: str,
    mode: str,
    channel_ids: list[str],
    per_conn: int,
    metadata: tuple[tuple[str, str], ...],
    warmed: Any,
    failed: Any,
    conn: Connection,
) -> None:
    loop = asyncio.get_running_loop()
    streams = [StreamState(cid) for cid in channel_ids]
    latencies = array("q")
    last_receive_ns = 0
    stopping = False
    connections = [
        grpc.aio.insecure_channel(
            address,
            # A connection of its own (channels with equal arguments would share one).
            options=[("grpc.use_local_subchannel_pool", 1), ("bench.connection", f"{index}-{c}")],
        )
        for c in range(math.ceil(len(streams) / per_conn))
    ]

    def open_stream(j: int) -> Any:
        channel = connections[j // per_conn]
        request = cpb.StreamEventsRequest(channel_ids=[streams[j].channel_id])
        if mode == "service":
            return chat_pb2_grpc.ChatServiceStub(channel).StreamEvents(request, metadata=metadata)
        method = channel.unary_stream(
            SUBSCRIBE,
            request_serializer=cpb.StreamEventsRequest.SerializeToString,
            response_deserializer=cpb.StreamEventsResponse.FromString,
        )
        return method(request, metadata=metadata)

    calls: list[Any] = [None] * len(streams)

    async def consume(j: int) -> None:
        nonlocal last_receive_ns
        st = streams[j]
        call = calls[j] = open_stream(j)
        try:
            async for event in call:
                now = time.time_ns()
                if event.type != cpb.EVENT_TYPE_CREATED:
                    continue  # heartbeats
                if st.last_seq and event.sequence != st.last_seq + 1:
                    st.out_of_order += 1
                st.last_seq = event.sequence
                text = event.chat_message.content
                if text.startswith(MEASURED):
                    _, i, sent, _ = text.split(" ", 3)
                    n = int(i)
                    st.events += 1
                    if n in st.seen:
                        st.duplicates += 1
                    else:
                        st.seen.add(n)
                        latencies.append(now - int(sent))
                        last_receive_ns = max(last_receive_ns, now)
                        if st.remaining is not None:
                            st.remaining.discard(n)
                elif not st.warm:
                    st.warm = True
                    warmed[index] += 1
            if not stopping:
                st.error = "ENDED"
        except asyncio.CancelledError:
            if not stopping:
                raise
        except grpc.aio.AioRpcError as exc:
            if not stopping:
                st.error = exc.code().name
        finally:
            if st.error:
                failed[index] += 1

    tasks = [asyncio.create_task(consume(j)) for j in range(len(streams))]
    try:
        command, expected, drain_seconds = await loop.run_in_executor(None, conn.recv)
        assert command == "finish"
        wanted = {cid: set(indices) for cid, indices in expected.items()}
        for st in streams:
            st.remaining = wanted.get(st.channel_id, set()) - st.seen
        deadline = time.monotonic() + drain_seconds
        # Done when every stream has every acknowledged message (a write that timed out on the
        # client may have committed anyway: such "extra" messages are counted, not waited for).
        while time.monotonic() < deadline and not all(st.error or not st.remaining for st in streams):  # noqa: ASYNC110 - polls a condition over every stream, until a deadline
            await asyncio.sleep(0.05)
        stopping = True
        for call in calls:
            if call is not None:
                call.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        missing = extra = violators = 0
        errors: Counter[str] = Counter()
        for st in streams:
            want = wanted.get(st.channel_id, set())
            lost = len(want - st.seen)
            missing += lost
            extra += len(st.seen - want)
            if st.error:
                errors[st.error] += 1
            if lost or st.duplicates or st.out_of_order or st.error:
                violators += 1
        conn.send(
            {
                "events": sum(st.events for st in streams),
                "missing": missing,
                "extra": extra,
                "duplicates": sum(st.duplicates for st in streams),
                "out_of_order": sum(st.out_of_order for st in streams),
                "errors": dict(errors),
                "violators": violators,
                "latencies": latencies.tobytes(),
                "last_receive_ns": last_receive_ns,
            }
        )
    finally:
        stopping = True
        for task in tasks:
            task.cancel()
        for channel in connections:
            await channel.close()


# ======================================================================== writer


class Writer:
    """Creates channels and messages on the service, or publishes to the floor server."""

    def __init__(self, mode: str, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.mode = mode
        self.metadata = metadata
        self.chat = chat_pb2_grpc.ChatServiceStub(channel)
        self.publish = channel.unary_unary(
            PUBLISH,
            request_serializer=cpb.CreateChatMessageRequest.SerializeToString,
            response_deserializer=cpb.ChatMessage.FromString,
        )

    async def create_channel(self, name: str) -> str:
        if self.mode == "floor":
            return str(uuid.uuid4())
        created = await self.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=name)), timeout=30, metadata=self.metadata)
        return str(created.id)

    async def post(self, channel_id: str, content: str, timeout: float = 30.0) -> None:  # noqa: ASYNC109 - the RPC's own deadline
        request = cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel_id, content=content))
        if self.mode == "floor":
            await self.publish(request, timeout=timeout, metadata=self.metadata)
        else:
            await self.chat.CreateChatMessage(request, timeout=timeout, metadata=self.metadata)


# ======================================================================== one case


@dataclass
class CaseResult:
    mode: str  # "service" or "floor"
    label: str
    subscribers: int
    rate: float
    seconds: float
    write_seconds: float = 0.0
    written: int = 0
    write_errors: dict[str, int] = field(default_factory=dict)
    expected: int = 0
    delivered: int = 0
    delivered_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)
    write_latency_ms: dict[str, float] = field(default_factory=dict)
    rss_idle: float = 0.0
    rss_streams: float = 0.0
    rss_end: float = 0.0
    rss_peak: float = 0.0
    subscribe_seconds: float = 0.0
    missing: int = 0
    extra: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    stream_errors: dict[str, int] = field(default_factory=dict)
    violators: int = 0
    cpu: dict[str, float] = field(default_factory=dict)  # cores used during the measured window
    cpu_window: float = 0.0  # seconds: first write to the last load generator's report
    case_seconds: float = 0.0
    auth: str = "none"

    @property
    def per_stream_kib(self) -> float:
        return (self.rss_streams - self.rss_idle) * 1024 / self.subscribers if self.subscribers else 0.0


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {k: math.nan for k in ("p50", "p90", "p99", "max")}
    values = sorted(values)

    def rank(p: float) -> float:  # nearest rank
        return values[min(len(values) - 1, max(0, math.ceil(p * len(values)) - 1))]

    return {"p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99), "max": values[-1]}


async def wait_ready(address: str, server: ServerProcess, timeout: float) -> None:  # noqa: ASYNC109 - the deadline of a loop of health checks, each with its own
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.tail()}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{server.name} not ready after {timeout:.0f}s:\n{server.tail()}")
            await asyncio.sleep(0.1)


def _stop_process(p: mp.process.BaseProcess) -> None:
    if p.is_alive():
        p.terminate()
    p.join(5)
    if p.is_alive():
        p.kill()
        p.join(5)


async def _recv(conn: Connection, timeout: float) -> Any:  # noqa: ASYNC109 - handed to Connection.poll in an executor thread
    loop = asyncio.get_running_loop()
    ready = await loop.run_in_executor(None, conn.poll, timeout)
    if not ready:
        raise TimeoutError("a load generator did not report its results in time")
    return conn.recv()


def auth_mode(requested: str) -> str:
    """How the service case authenticates: an admin API key, auth turned off, or none to do."""
    has_keys = subprocess.run([str(NEXUS_DATA), "keys", "--help"], capture_output=True, timeout=60, check=False).returncode == 0
    if not has_keys:
        return "none (this version has no authentication)"
    return "off (--insecure-dev)" if requested == "insecure" else "api key"


def create_api_key(env: dict[str, str]) -> str:
    """An admin API key made with `nexus-data keys create` on the (migrated) benchmark database."""
    done = subprocess.run(
        [str(NEXUS_DATA), "keys", "create", "--name", "nexus-bench", "--role", "admin"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"nexus-data keys create failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return lines[-1].strip()


def progress(since: float, text: str) -> None:
    print(f"    [{time.monotonic() - since:5.1f}s] {text}", flush=True)


async def run_case(mode: str, args: argparse.Namespace, work: Path, database_url: str = "", pg_name: str = "") -> CaseResult:
    started = time.monotonic()
    n = args.subscribers
    label = f"nexus-data ({args.db})" if mode == "service" else "floor (memory)"
    result = CaseResult(mode, label, n, args.rate, args.seconds)
    port = free_port()
    address = f"127.0.0.1:{port}"
    max_rpcs = max(5000, 2 * n + 100)
    if mode == "service":
        env = dict(
            os.environ,
            DATABASE_URL=database_url,
            NEXUS_PORT=str(port),
            NEXUS_HOST="127.0.0.1",
            NEXUS_MAX_CONCURRENT_RPCS=str(max_rpcs),
            NEXUS_STREAM_QUEUE_SIZE=str(args.queue_size),
            # Every stream is one caller's (one key, or the insecure-dev caller).
            NEXUS_MAX_STREAMS_PER_CALLER=str(n + 10),
            NEXUS_HASH_TIME_COST="1",
            NEXUS_HASH_MEMORY_KIB="1024",
            NEXUS_DRAIN_SECONDS="0",
            NEXUS_GRACE_SECONDS="2",
        )
        argv = [str(NEXUS_DATA), "serve"]
        result.auth = auth_mode(args.auth)
        if result.auth == "off (--insecure-dev)":
            argv.append("--insecure-dev")
    else:
        env = dict(os.environ)
        argv = [sys.executable, str(Path(__file__).resolve()), "--floor-server", "--port", str(port), "--max-rpcs", str(max_rpcs)]  # noqa: ASYNC240 - once, while the case is set up
    server = ServerProcess(f"{mode} server", argv, env, work / f"{mode}-server.log")
    loadgens: list[mp.process.BaseProcess] = []
    conns: list[Connection] = []
    try:
        await wait_ready(address, server, args.ready_timeout)
        progress(started, f"{label} ready on {address} (pid {server.pid})")
        metadata: tuple[tuple[str, str], ...] = ()
        if mode == "service" and result.auth == "api key":
            secret = await asyncio.get_running_loop().run_in_executor(None, create_api_key, env)
            metadata = (("authorization", f"Bearer {secret}"),)
        async with grpc.aio.insecure_channel(address) as write_channel:
            writer = Writer(mode, write_channel, metadata)
            channel_ids = [await writer.create_channel(f"bench channel {k}") for k in range(args.channels)]
            await asyncio.sleep(1.0)
            result.rss_idle = rss_mib(server.pid)

            # ---- subscribers: stream j follows channel j % channels and lives in process j % procs
            procs = max(1, min(args.procs, n))
            ctx = mp.get_context("spawn")
            warmed = ctx.Array("i", procs, lock=False)
            failed = ctx.Array("i", procs, lock=False)
            for p in range(procs):
                assigned = [channel_ids[j % len(channel_ids)] for j in range(p, n, procs)]
                parent_end, child_end = ctx.Pipe()
                proc = ctx.Process(
                    target=loadgen_main,
                    args=(p, address, mode, assigned, args.streams_per_conn, metadata, warmed, failed, child_end),
                    name=f"loadgen-{p}",
                    daemon=True,
                )
                proc.start()
                child_end.close()
                register_cleanup(f"loadgen {p}", lambda proc=proc: _stop_process(proc))
                loadgens.append(proc)
                conns.append(parent_end)

            # ---- warm-up: keep posting until every stream has received a message
            t_sub = time.monotonic()
            k = 0
            while sum(warmed) < n:
                if sum(failed):
                    raise RuntimeError(f"{sum(failed)} streams failed while subscribing ({sum(warmed)}/{n} subscribed); see {server.log_path}")
                dead = [p.name for p in loadgens if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"load generator(s) died: {dead}")
                if time.monotonic() - t_sub > args.subscribe_timeout:
                    raise TimeoutError(f"only {sum(warmed)}/{n} streams subscribed after {args.subscribe_timeout:.0f}s")
                for cid in channel_ids:
                    await writer.post(cid, f"{WARMUP} {k}")
                k += 1
                await asyncio.sleep(args.warmup_interval)
            result.subscribe_seconds = time.monotonic() - t_sub
            progress(started, f"{n} streams subscribed in {result.subscribe_seconds:.1f}s; writing for {args.seconds:g}s")
            await asyncio.sleep(1.0)  # the last warm-up events settle
            result.rss_streams = rss_mib(server.pid)

            # ---- measured phase: open-loop writer
            pg_pids = pg_backend_pids(pg_name) if pg_name else []
            watched = {"server": [server.pid], "loadgen": [p.pid for p in loadgens if p.pid], "writer": [os.getpid()], "postgres": pg_pids}
            cpu0 = {k: [cpu_seconds(pid) for pid in pids] for k, pids in watched.items()}
            busy0, wall0 = machine_busy_seconds(), time.monotonic()

            total = max(1, round(args.rate * args.seconds))
            written: dict[str, list[int]] = defaultdict(list)
            write_errors: Counter[str] = Counter()
            write_latencies: list[float] = []
            pad = "x" * max(0, args.message_bytes - 32)

            async def send(i: int) -> None:
                cid = channel_ids[i % len(channel_ids)]
                t0 = time.monotonic()
                try:
                    await writer.post(cid, f"{MEASURED} {i} {time.time_ns()} {pad}", timeout=args.write_timeout)
                except grpc.aio.AioRpcError as exc:
                    write_errors[exc.code().name] += 1
                    return
                write_latencies.append(time.monotonic() - t0)
                written[cid].append(i)

            first_send_ns = time.time_ns()
            t_write = time.monotonic()
            tasks = []
            for i in range(total):
                delay = t_write + i / args.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(send(i)))
            result.write_seconds = time.monotonic() - t_write
            progress(started, f"last message sent; waiting for {len(tasks)} write RPCs")
            await asyncio.gather(*tasks)
            result.rss_end = rss_mib(server.pid)

            # ---- drain: each load generator waits until its streams have everything (or a timeout)
            for c in conns:
                c.send(("finish", dict(written), args.drain_timeout))
            progress(started, f"writes done; draining (at most {args.drain_timeout:g}s)")
            reports = [await _recv(c, args.drain_timeout + 30) for c in conns]
            progress(started, "subscribers reported; stopping")
            wall = result.cpu_window = time.monotonic() - wall0
            result.cpu = {
                k: sum(max(0.0, cpu_seconds(pid) - before) for pid, before in zip(pids, cpu0[k], strict=True)) / wall for k, pids in watched.items()
            }
            result.cpu["machine"] = (machine_busy_seconds() - busy0) / wall
            result.cpu["other"] = max(0.0, result.cpu["machine"] - sum(result.cpu[k] for k in watched))
            result.rss_peak = hwm_mib(server.pid)

        result.written = sum(len(v) for v in written.values())
        result.write_errors = dict(write_errors)
        per_channel_subs = Counter(channel_ids[j % len(channel_ids)] for j in range(n))
        result.expected = sum(len(written.get(cid, [])) * count for cid, count in per_channel_subs.items())
        latencies: list[float] = []
        errors: Counter[str] = Counter()
        last_ns = 0
        for r in reports:
            result.delivered += r["events"]
            result.missing += r["missing"]
            result.extra += r["extra"]
            result.duplicates += r["duplicates"]
            result.out_of_order += r["out_of_order"]
            result.violators += r["violators"]
            errors.update(r["errors"])
            lat = array("q")
            lat.frombytes(r["latencies"])
            latencies.extend(v / 1e6 for v in lat)
            last_ns = max(last_ns, r["last_receive_ns"])
        result.stream_errors = dict(errors)
        result.latency_ms = percentiles(latencies)
        result.write_latency_ms = percentiles([v * 1000 for v in write_latencies])
        span = (last_ns - first_send_ns) / 1e9 if last_ns > first_send_ns else math.nan
        result.delivered_per_s = result.delivered / span if span > 0 else 0.0
    finally:
        for c in conns:
            c.close()
        for p in loadgens:
            _stop_process(p)
        server.stop()
    result.case_seconds = time.monotonic() - started
    return result


# ======================================================================== report


def _num(value: float, digits: int = 1) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and not math.isnan(a) and not math.isnan(b) else ""


def build_rows(svc: CaseResult, floor: CaseResult | None, args: argparse.Namespace) -> tuple[list[str], list[list[str]]]:
    cases = [svc] + ([floor] if floor else [])
    header = ["metric", *(c.label for c in cases)] + (["service / floor"] if floor else [])
    rows: list[list[str]] = []

    def row(name: str, getter: Callable[[CaseResult], str], ratio: Callable[[CaseResult], float] | None = None) -> None:
        cells = [name, *(getter(c) for c in cases)]
        if floor:
            cells.append(_ratio(ratio(svc), ratio(floor)) if ratio else "")
        rows.append(cells)

    def violations(c: CaseResult) -> str:
        errs = ",".join(f"{k}:{v}" for k, v in sorted(c.stream_errors.items())) or "0"
        extra = f", extra {c.extra}" if c.extra else ""
        return f"{c.violators} (missing {c.missing}, dup {c.duplicates}, out-of-order {c.out_of_order}, stream errors {errs}{extra})"

    row("database", lambda c: args.db if c.mode == "service" else "none (in-memory fan-out)")
    row("subscribers", lambda c: f"{c.subscribers} on {args.channels} channel(s)")
    row("authentication", lambda c: c.auth)
    row("rate (msgs/s, target)", lambda c: _num(c.rate, 1))
    row("duration (s)", lambda c: f"{_num(c.seconds, 0)} (writing took {_num(c.write_seconds, 1)})")
    row("events written", lambda c: f"{c.written:,}" + (f" ({sum(c.write_errors.values())} failed: {c.write_errors})" if c.write_errors else ""))
    row("events expected", lambda c: f"{c.expected:,}")
    row("events delivered", lambda c: f"{c.delivered:,}")
    row("delivered events/s", lambda c: _num(c.delivered_per_s, 0), lambda c: c.delivered_per_s)
    for p in ("p50", "p90", "p99", "max"):
        row(f"latency {p} (ms)", lambda c, p=p: _num(c.latency_ms[p], 1), lambda c, p=p: c.latency_ms[p])
    row("RSS idle (MB)", lambda c: _num(c.rss_idle, 1), lambda c: c.rss_idle)
    row(f"RSS with {args.subscribers} streams (MB)", lambda c: _num(c.rss_streams, 1), lambda c: c.rss_streams)
    row("per-stream memory (KB)", lambda c: _num(c.per_stream_kib, 1), lambda c: c.per_stream_kib)
    row("RSS after writing / peak (MB)", lambda c: f"{_num(c.rss_end, 1)} / {_num(c.rss_peak, 1)}")
    row("exactly-once + in-order violations (subscribers)", violations)
    row("time to subscribe all streams (s)", lambda c: _num(c.subscribe_seconds, 1), lambda c: c.subscribe_seconds)
    row("write RPC p50 / p99 (ms)", lambda c: f"{_num(c.write_latency_ms['p50'], 1)} / {_num(c.write_latency_ms['p99'], 1)}")
    row("CPU server process (cores)", lambda c: _num(c.cpu.get("server", math.nan), 2), lambda c: c.cpu.get("server", math.nan))
    row(
        "server CPU per delivered event (us)",
        lambda c: _num(c.cpu.get("server", 0.0) * c.cpu_window / c.delivered * 1e6, 0) if c.delivered else "n/a",
        lambda c: c.cpu.get("server", 0.0) * c.cpu_window / c.delivered if c.delivered else math.nan,
    )
    row("CPU PostgreSQL backends (cores)", lambda c: _num(c.cpu.get("postgres", 0.0), 2) if args.db == "postgresql" and c.mode == "service" else "-")
    row(f"CPU load generators, {args.procs} procs (cores)", lambda c: _num(c.cpu.get("loadgen", math.nan), 2))
    row("CPU writer / parent (cores)", lambda c: _num(c.cpu.get("writer", math.nan), 2))
    row(f"CPU whole machine, all users (cores of {NCPU})", lambda c: _num(c.cpu.get("machine", math.nan), 2))
    row("CPU not this benchmark: other users, kernel (cores)", lambda c: _num(c.cpu.get("other", math.nan), 2))
    row("case wall time (s)", lambda c: _num(c.case_seconds, 1))
    return header, rows


def render_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def render_markdown(header: list[str], rows: list[list[str]], args: argparse.Namespace, meta: dict[str, str]) -> str:
    out = [
        f"# StreamEvents fan-out: {args.db}",
        "",
        f"Command: `{meta['command']}`  ",
        f"Run at {meta['when']} on {NCPU} cores (load average before the run: {meta['load']}); total wall time {meta['wall']} s.  ",
        (
            f"Load generator: {args.procs} processes, {args.streams_per_conn} streams per HTTP/2 connection; "
            f"writer: open loop at {args.rate:g} msgs/s, ~{args.message_bytes} B content; server stream queue {args.queue_size}."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    out += ["", "Columns and method: see bench/README.md.", ""]
    return "\n".join(out)


# ======================================================================== main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", choices=["sqlite", "postgresql"], default="sqlite")
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=10.0, help="messages per second written (total, over all channels)")
    ap.add_argument("--seconds", type=float, default=20.0, help="how long the writer writes")
    ap.add_argument("--channels", type=int, default=1, help="subscribers are spread round-robin over this many channels")
    ap.add_argument("--procs", type=int, default=2, help="load-generator processes holding the streams")
    ap.add_argument("--streams-per-conn", type=int, default=50, help="streams multiplexed on one HTTP/2 connection (1 = a connection each)")
    ap.add_argument("--message-bytes", type=int, default=100, help="approximate size of each message's content")
    ap.add_argument("--queue-size", type=int, default=1000, help="NEXUS_STREAM_QUEUE_SIZE for the service")
    ap.add_argument("--no-floor", action="store_true", help="skip the in-memory floor case")
    ap.add_argument("--floor-only", action="store_true", help="run only the in-memory floor case (no database)")
    ap.add_argument(
        "--auth",
        choices=["key", "insecure"],
        default="key",
        help="service case: call with an admin API key (default) or serve with --insecure-dev (authentication off)",
    )
    ap.add_argument("--results", help="markdown file to write (default bench/results/stream_fanout_<db>.md)")
    ap.add_argument(
        "--warmup-interval",
        type=float,
        default=1.0,
        help="while streams subscribe, post a warm-up message this often (each one fans out to every stream already open)",
    )
    ap.add_argument("--write-timeout", type=float, default=20.0, help="deadline of each measured write RPC")
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    ap.add_argument("--subscribe-timeout", type=float, default=90.0)
    ap.add_argument("--drain-timeout", type=float, default=30.0, help="after the last write, how long subscribers may take to catch up")
    ap.add_argument("--max-runtime", type=float, default=0.0, help="watchdog: hard stop after this many seconds (0 = derived from the others)")
    ap.add_argument("--floor-server", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--max-rpcs", type=int, default=5000, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.subscribers < 1 or args.rate <= 0 or args.seconds <= 0 or args.channels < 1 or args.procs < 1 or args.streams_per_conn < 1:
        ap.error("subscribers, rate, seconds, channels, procs and streams-per-conn must be positive")
    if not args.max_runtime:
        per_case = 20 + args.ready_timeout / 4 + args.subscribe_timeout / 2 + args.seconds + args.write_timeout + args.drain_timeout
        args.max_runtime = max(240.0, per_case * (1 if args.no_floor or args.floor_only else 2))
    return args


class _Terminated(KeyboardInterrupt):
    pass


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.floor_server:
        asyncio.run(floor_serve(args.port, args.max_rpcs))
        return 0

    signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.monotonic()
    meta = {
        "command": " ".join([".venv/bin/python", "bench/stream_fanout.py", *(sys.argv[1:] if argv is None else argv)]),
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load": loadavg(),
    }
    work = Path(tempfile.mkdtemp(prefix="nexus-bench-"))
    register_cleanup("temp dir", lambda: shutil.rmtree(work, ignore_errors=True))

    def watchdog() -> None:
        print(f"\nwatchdog: still running after {args.max_runtime:.0f}s; stopping everything", file=sys.stderr, flush=True)
        run_cleanups()
        os._exit(3)

    timer = threading.Timer(args.max_runtime, watchdog)
    timer.daemon = True
    timer.start()
    try:
        pg_name = ""
        url = ""
        if args.db == "postgresql" and not args.floor_only:
            pg_name = create_pg_database()
            url = f"postgresql+psycopg2://{PG_ADMIN['user']}@{PG_ADMIN['host']}:{PG_ADMIN['port']}/{pg_name}"
        elif args.db == "sqlite":
            url = f"sqlite:///{work / 'nexus.db'}"
        load = f"{args.subscribers} subscribers, {args.rate:g} msgs/s for {args.seconds:g}s"
        svc = floor = None
        if not args.floor_only:
            print(f"[{time.monotonic() - started:5.1f}s] service on {args.db}: {load}", flush=True)
            svc = asyncio.run(run_case("service", args, work, url, pg_name))
        if not args.no_floor:
            print(f"[{time.monotonic() - started:5.1f}s] floor (in-memory fan-out server): {load}", flush=True)
            floor = asyncio.run(run_case("floor", args, work))
        first = svc or floor
        assert first is not None
        header, rows = build_rows(first, floor if svc else None, args)
        meta["wall"] = f"{time.monotonic() - started:.0f}"
        print()
        print(render_text(header, rows))
        if svc is not None:
            out = Path(args.results) if args.results else RESULTS_DIR / f"stream_fanout_{args.db}.md"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(render_markdown(header, rows, args, meta))
            print(f"\nwritten to {out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out}", end="")
        print(f"; total {meta['wall']} s" if svc else f"total {meta['wall']} s")
        bad = any(c is not None and (c.violators or c.missing) for c in (svc, floor))
        return 1 if bad else 0
    except KeyboardInterrupt as exc:
        print("\nterminated" if isinstance(exc, _Terminated) else "\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, then cleanup
        print(f"\nbenchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # no second Ctrl-C in the middle of cleanup
        run_cleanups()
        timer.cancel()


if __name__ == "__main__":
    sys.exit(main())
