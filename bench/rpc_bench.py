#!/usr/bin/env python3
"""bench/run: the project's server vs the floor, RPC by RPC, on SQLite and PostgreSQL.

Run it through `bench/run` (which installs matplotlib into the venv when it is missing):

    bench/run [--db sqlite,postgresql] [--concurrency 32] [--seconds 10] [--scale 10000,100000]

For each database: a fresh database (a SQLite file in a temp directory, or a PostgreSQL database
created on `postgres` and dropped afterwards), `nexus-data migrate`, an admin API key from
`nexus-data keys create`, users + a project of --tasks tasks seeded with raw SQL (bench/benchdb.py).
Then `nexus-data serve` and bench/floor_server.py start on that database (each its own process,
its own port), their answers to the same requests are compared, and bench/loadgen.py (its own
process) drives each RPC on the project's server, then on the floor, with the same load. One
table per database: printed, and written with a chart to bench/results/<db>.md / <db>.png.

--scale: a second fresh database that grows to each row count, the project's server alone:
GetTask and ListTasks latency at page 1 and page 20, and the service's SQL timed alone.

Every run is bounded: each call has a deadline, each load generator a timeout, and a watchdog
stops everything after --max-runtime. Servers (SIGTERM, then SIGKILL), load generators, the
databases and the temp directory are removed on every exit path (error, Ctrl-C, SIGTERM).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO / "generated"))
sys.path.insert(0, str(BENCH))

import grpc  # noqa: E402
from google.protobuf import field_mask_pb2  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from nexus.identity.v1 import identity_pb2 as ipb  # noqa: E402
from nexus.identity.v1 import identity_pb2_grpc  # noqa: E402
from nexus.work.v1 import work_pb2 as wpb  # noqa: E402
from nexus.work.v1 import work_pb2_grpc  # noqa: E402

import benchdb  # noqa: E402
import heavy  # noqa: E402
import report  # noqa: E402

NEXUS_DATA = str(REPO / ".venv" / "bin" / "nexus-data")
PYTHON = sys.executable
RESULTS = BENCH / "results"
MAIN_RPCS = ("GetUser", "ListTasks", "SearchTasks", "CreateTask", "UpdateTask", "BatchCreateTasks")
CLK_TCK = os.sysconf("SC_CLK_TCK")
PYSPY = REPO / ".venv" / "bin" / "py-spy"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ======================================================================== cleanup on every path

_CLEANUPS: list[tuple[str, Callable[[], None]]] = []
_lock = threading.Lock()


def on_exit(name: str, fn: Callable[[], None]) -> Callable[[], None]:
    with _lock:
        _CLEANUPS.append((name, fn))
    return fn


def cleanup(name_or_fn: Any = None) -> None:
    """Run (and forget) one registered cleanup, or all of them, newest first."""
    while True:
        with _lock:
            if name_or_fn is None:
                if not _CLEANUPS:
                    return
                name, fn = _CLEANUPS.pop()
            else:
                match = [i for i, (n, f) in enumerate(_CLEANUPS) if f == name_or_fn or n == name_or_fn]
                if not match:
                    return
                name, fn = _CLEANUPS.pop(match[-1])
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - go on with the rest
            print(f"cleanup of {name} failed: {exc!r}", file=sys.stderr)
        if name_or_fn is not None:
            return


class Interrupted(BaseException):
    pass


_watchdog_fired = False


def _on_signal(signum: int, frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


# ======================================================================== processes


class Server:
    """A server subprocess in its own session; stop() = SIGTERM, then SIGKILL after a grace."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, port: int, cwd: str | None = None) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)
        on_exit(f"server {name}", self.stop)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self._log.closed:
            self._log.close()

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def status_kib(pid: int, key: str) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return float("nan")


def process_tree(pid: int) -> list[int]:
    """pid and its live descendants (the worker processes of `serve --workers N`)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree.extend(frontier)
    return tree


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a server and its workers (a worker that exits during a run is missed)."""
    return sum(c for p in process_tree(pid) if not math.isnan(c := cpu_seconds(p)))


def tree_status_kib(pid: int, key: str) -> float:
    return sum(v for p in process_tree(pid) if not math.isnan(v := status_kib(p, key)))


def machine_busy() -> float:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def mem_total() -> str:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                return f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB RAM"
    return "?"


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def pg_sessions(dbname: str) -> int | None:
    """Sessions ever established to dbname (PostgreSQL 14+ statistics; updated when a session ends)."""
    try:
        conn = benchdb.pg_admin()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT pg_stat_clear_snapshot()")
                cur.execute("SELECT sessions FROM pg_stat_database WHERE datname = %s", (dbname,))
                row = cur.fetchone()
                return int(row[0]) if row and row[0] is not None else None
        finally:
            conn.close()
    except Exception:  # noqa: BLE001
        return None


def _pg_cpu(where: str, params: tuple[Any, ...] = ()) -> dict[int, float]:
    """CPU seconds of the PostgreSQL processes pg_stat_activity lists under `where`, by pid."""
    try:
        conn = benchdb.pg_admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f"SELECT pid FROM pg_stat_activity WHERE {where}", params)
                pids = [int(r[0]) for r in cur.fetchall()]
        finally:
            conn.close()
    except Exception:  # noqa: BLE001 - a metric, not a reason to fail the run
        return {}
    return {pid: c for pid in pids if not math.isnan(c := cpu_seconds(pid))}


def pg_backend_cpu(dbname: str) -> dict[int, float]:
    """CPU seconds of every PostgreSQL backend connected to dbname, by pid."""
    return _pg_cpu("datname = %s", (dbname,))


def pg_background_cpu() -> dict[int, float]:
    """CPU seconds of PostgreSQL's processes that belong to no database (WAL writer, checkpointer,
    background writer, autovacuum launcher, ...), by pid: shared by every database of the server."""
    return _pg_cpu("datname IS NULL")


def pg_wal() -> tuple[float, float] | None:
    """(WAL bytes, WAL syncs) of the whole PostgreSQL server so far (pg_stat_wal: every database's)."""
    try:
        conn = benchdb.pg_admin()
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT wal_bytes, wal_sync FROM pg_stat_wal")
                row = cur.fetchone()
                return float(row[0]), float(row[1])
        finally:
            conn.close()
    except Exception:  # noqa: BLE001 - a metric, not a reason to fail the run
        return None


def postgres_processes_cpu() -> dict[int, float]:
    """CPU seconds of every process named postgres on the machine, by pid (every database's
    backends and the background processes, other users' included: an upper bound)."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/comm") as f:
                    if f.read().strip() != "postgres":
                        continue
            except OSError:
                continue
            if not math.isnan(c := cpu_seconds(int(entry))):
                out[int(entry)] = c
    return out


def _delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU of processes alive at the end: their delta; new ones: all their CPU (ones that exit are missed)."""
    return sum(c - before.get(pid, 0.0) for pid, c in after.items())


def wait_ready(server: Server, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited ({server.proc.returncode}):\n{server.tail()}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f} s:\n{server.tail()}")


def start_project(dialect: str, url: str, work: Path, args: argparse.Namespace, tag: str) -> Server:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": url,
        "NEXUS_PORT": str(port),
        "NEXUS_HOST": "127.0.0.1",
        "NEXUS_MAX_CONCURRENT_RPCS": str(args.max_rpcs),
        "DB_POOL_SIZE": str(args.pool_size),
        "DB_MAX_OVERFLOW": str(args.max_overflow),
        "NEXUS_DRAIN_SECONDS": "0",
        "NEXUS_GRACE_SECONDS": "3",
    }
    argv = [NEXUS_DATA, "serve", *(["--workers", str(args.workers)] if args.workers > 1 else [])]
    cwd = None
    if args.project_src:
        # Another checkout of the service (e.g. a patched copy), run with this venv's packages.
        src = str(Path(args.project_src).resolve())
        env["PYTHONPATH"] = os.pathsep.join([src, os.path.join(src, "generated"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        argv = [PYTHON, "-c", "import sys; from service.cli import main; sys.exit(main())", *argv[1:]]
        cwd = src
    server = Server(f"project-{tag}", argv, env, work / f"project-{tag}.log", port, cwd=cwd)
    wait_ready(server)
    return server


def start_floor(target: str, work: Path, args: argparse.Namespace, tag: str) -> Server:
    port = free_port()
    argv = [PYTHON, str(BENCH / "floor_server.py"), "--db", target, "--port", str(port),
            "--threads", str(args.floor_threads), "--max-concurrent-rpcs", str(args.max_rpcs),
            *(["--bare"] if args.floor_bare else [])]
    server = Server(f"floor-{tag}", argv, dict(os.environ), work / f"floor-{tag}.log", port)
    wait_ready(server)
    return server


def run_loadgen(server: Server, rpc: str, spec: Path, *, key: str | None, concurrency: int, seconds: float,
                warmup: float, timeout: float, extra: list[str] | None = None, pg_db: str | None = None) -> dict[str, Any]:
    argv = [PYTHON, str(BENCH / "loadgen.py"), "--target", f"127.0.0.1:{server.port}", "--rpc", rpc,
            "--spec", str(spec), "--concurrency", str(concurrency), "--seconds", str(seconds),
            "--warmup", str(warmup), "--timeout", str(timeout), *(extra or [])]
    env = dict(os.environ)
    if key:
        env["NEXUS_BENCH_KEY"] = key
        argv.append("--auth")
    cpu0, busy0, t0 = tree_cpu_seconds(server.pid), machine_busy(), time.monotonic()
    kids0 = _children_cpu()
    db0 = pg_backend_cpu(pg_db) if pg_db else None
    bg0 = pg_background_cpu() if pg_db else None
    all0 = postgres_processes_cpu() if pg_db else None
    wal0 = pg_wal() if pg_db else None
    sessions0 = pg_sessions(pg_db) if pg_db else None
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)

    def kill() -> None:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)

    on_exit(f"loadgen {rpc}", kill)
    try:
        out, err = proc.communicate(timeout=warmup + seconds + timeout + 120)
    except subprocess.TimeoutExpired:
        kill()
        raise RuntimeError(f"loadgen {rpc} against {server.name} did not finish in time") from None
    finally:
        cleanup(kill)
    if proc.returncode != 0:
        raise RuntimeError(f"loadgen {rpc} against {server.name} failed ({proc.returncode}):\n{err[-3000:]}\n{server.tail()}")
    result = json.loads(out.strip().splitlines()[-1])
    wall = time.monotonic() - t0
    cpu = tree_cpu_seconds(server.pid) - cpu0
    result["server_cpu_s"] = cpu
    result["server_cpu_ms_per_call"] = cpu * 1000 / result["calls_total"] if result["calls_total"] else None
    busy = (machine_busy() - busy0) / wall
    loadgen_cpu = _children_cpu() - kids0
    result["machine_busy_cores"] = busy
    result["loadgen_cores"] = loadgen_cpu / wall
    result["server_cores"] = cpu / wall
    result["wall_s"] = wall
    calls = result["calls_total"]
    result["loadgen_cpu_ms_per_call"] = loadgen_cpu * 1000 / calls if calls else None
    result["machine_cpu_ms_per_call"] = busy * wall * 1000 / calls if calls else None
    if db0 is not None:
        db1 = pg_backend_cpu(pg_db)
        # Backends alive at both ends: their delta; new ones: all their CPU (short-lived ones are missed).
        db_cpu = _delta(db0, db1)
        result["db_cpu_ms_per_call"] = db_cpu * 1000 / calls if calls else None
        bg_cpu = _delta(bg0 or {}, pg_background_cpu())
        all_cpu = _delta(all0 or {}, postgres_processes_cpu())
        result["db_background_cpu_ms_per_call"] = bg_cpu * 1000 / calls if calls else None
        result["postgres_all_cpu_ms_per_call"] = all_cpu * 1000 / calls if calls else None
        wal1 = pg_wal()
        if wal0 is not None and wal1 is not None and calls:
            # The server's, not only this database's: other databases' writes are in it too.
            result["wal_bytes_per_call"] = (wal1[0] - wal0[0]) / calls
            result["wal_syncs_per_call"] = (wal1[1] - wal0[1]) / calls
        result["db_cores"] = db_cpu / wall
        sessions1 = pg_sessions(pg_db)
        if sessions0 is not None and sessions1 is not None:
            # Connections opened during the run (pg_stat_database.sessions): pool churn shows here.
            result["db_connections_opened"] = sessions1 - sessions0
        result["other_cores"] = busy - (cpu + loadgen_cpu + db_cpu) / wall
    else:
        result["other_cores"] = busy - (cpu + loadgen_cpu) / wall
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.name} died during {rpc}:\n{server.tail()}")
    return result


# ======================================================================== response check


def _strip(msg: Any, *fields: str) -> Any:
    m = type(msg)()
    m.CopyFrom(msg)
    for f in fields:
        m.ClearField(f)
    return m


_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d)?$")


def audit_entries(dialect: str, target: str, resource_ids: list[str]) -> list[tuple[Any, ...]]:
    """The audit entries of these resources, oldest first, with the values that differ by nature
    (the resource's own id, timestamps) reduced to their form."""
    fmt = benchdb.Fmt(dialect)
    conn = benchdb.connect(dialect, target)
    try:
        cur = conn.cursor()
        marks = ", ".join(["?" if dialect == "sqlite" else "%s"] * len(resource_ids))
        cur.execute(
            "SELECT resource_id, actor_type, actor_id, action, resource_type, changes, method, summary, request_id "
            f"FROM audit_log_entries WHERE resource_id IN ({marks}) ORDER BY create_time, id",
            [fmt.id(uuid.UUID(i)) for i in resource_ids],
        )
        rows = cur.fetchall()
    finally:
        conn.close()
    out = []
    for rid, actor_type, actor_id, action, rtype, changes, method, summary, request_id in rows:
        changes = json.loads(changes) if isinstance(changes, str) else changes
        for c in changes:
            for k in ("old_value", "new_value"):
                v = c[k]
                if c["field"] == "id" and v is not None:
                    c[k] = "<its id>" if uuid.UUID(v) == uuid.UUID(str(rid)) else v
                elif isinstance(v, str) and _TIMESTAMP.match(v):
                    c[k] = re.sub(r"\d", "0", v)
        out.append((actor_type, str(actor_id), action, rtype, changes, method, summary, bool(request_id)))
    return out


def verify(project: Server, floor: Server, key: str, spec: dict[str, Any], reserved: list[str], dialect: str,
           target: str, bare: bool) -> list[str]:
    """Send the same requests to both servers; list the differences (empty: identical). The audit
    entries the floor writes must be the service's too (unless the floor is --bare)."""
    problems: list[str] = []
    md = (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(f"127.0.0.1:{project.port}") as pc, grpc.insecure_channel(f"127.0.0.1:{floor.port}") as fc:
        P = (identity_pb2_grpc.IdentityServiceStub(pc), work_pb2_grpc.WorkServiceStub(pc))
        F = (identity_pb2_grpc.IdentityServiceStub(fc), work_pb2_grpc.WorkServiceStub(fc))

        def both(svc: int, name: str, req: Any) -> tuple[Any, Any]:
            # The first authenticated call also warms the project's credential cache.
            a = getattr(P[svc], name)(req, metadata=md, timeout=60)
            b = getattr(F[svc], name)(req, timeout=60)
            return a, b

        def check(what: str, ok: bool, detail: str = "") -> None:
            if not ok:
                problems.append(f"{what} differs{': ' + detail if detail else ''}")

        a, b = both(0, "GetUser", ipb.GetUserRequest(id=spec["user_ids"][3]))
        check("GetUser", a == b, f"\n{a}\nvs\n{b}")
        a, b = both(1, "GetTask", wpb.GetTaskRequest(id=reserved[0]))
        check("GetTask", a == b, f"\n{a}\nvs\n{b}")
        flt = f'project_id = "{spec["project_id"]}" AND status = TODO'
        a, b = both(1, "ListTasks", wpb.ListTasksRequest(page_size=50, filter=flt))
        check("ListTasks page 1", list(a.tasks) == list(b.tasks) and a.total_size == b.total_size,
              f"{len(a.tasks)} vs {len(b.tasks)} tasks, total {a.total_size} vs {b.total_size}")
        a2 = P[1].ListTasks(wpb.ListTasksRequest(page_size=50, filter=flt, page_token=a.next_page_token), metadata=md, timeout=60)
        b2 = F[1].ListTasks(wpb.ListTasksRequest(page_size=50, filter=flt, page_token=b.next_page_token), timeout=60)
        check("ListTasks page 2", list(a2.tasks) == list(b2.tasks), f"{len(a2.tasks)} vs {len(b2.tasks)} tasks")
        for q in spec["queries"][:3]:
            a, b = both(1, "SearchTasks", wpb.SearchTasksRequest(query=q, page_size=50))
            same = [r.task for r in a.results] == [r.task for r in b.results] and a.total_size == b.total_size
            scores = all(math.isclose(x.score, y.score, rel_tol=1e-6) for x, y in zip(a.results, b.results, strict=False))
            check(f"SearchTasks {q!r}", same and scores, f"{len(a.results)} vs {len(b.results)} hits, total {a.total_size} vs {b.total_size}")
        task = wpb.Task(project_id=spec["sink_project_id"], title="verify create", description="check both servers",
                        status=wpb.TASK_STATUS_DONE, priority=wpb.PRIORITY_LOW, tags=["x", "y", "x"], estimated_hours=1.5)
        a, b = both(1, "CreateTask", wpb.CreateTaskRequest(task=task))
        volatile = ("id", "create_time", "update_time", "completed_time")
        check("CreateTask", _strip(a, *volatile) == _strip(b, *volatile) and a.HasField("completed_time") == b.HasField("completed_time"),
              f"\n{a}\nvs\n{b}")
        audited = [("CreateTask's audit entry", [a.id], [b.id])]
        mask = field_mask_pb2.FieldMask(paths=["title", "status"])
        up = wpb.Task(id=reserved[1], title="verify update", status=wpb.TASK_STATUS_REVIEW, etag='W/"1"')
        a = P[1].UpdateTask(wpb.UpdateTaskRequest(task=up, update_mask=mask), metadata=md, timeout=60)
        # The floor changes the same task again: its title, back and forth, so that the project's
        # third update is the mirror of the floor's second (the same audit entry, old and new swapped).
        up.etag, up.title = a.etag, "verify update (floor)"
        b = F[1].UpdateTask(wpb.UpdateTaskRequest(task=up, update_mask=mask), timeout=60)
        check("UpdateTask", _strip(a, "update_time", "etag", "title") == _strip(b, "update_time", "etag", "title")
              and b.etag == 'W/"3"' and b.title == up.title, f"\n{a}\nvs\n{b}")
        up.etag, up.title = b.etag, "verify update"
        a = P[1].UpdateTask(wpb.UpdateTaskRequest(task=up, update_mask=mask), metadata=md, timeout=60)
        check("UpdateTask back", a.etag == 'W/"4"' and a.title == "verify update", str(a))
        stale = wpb.Task(id=reserved[1], title="stale", status=wpb.TASK_STATUS_TODO, etag='W/"1"')
        codes = []
        for stub, kw in ((P[1], {"metadata": md}), (F[1], {})):
            try:
                stub.UpdateTask(wpb.UpdateTaskRequest(task=stale, update_mask=mask), timeout=60, **kw)
                codes.append("OK")
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
        check("UpdateTask with a stale etag", codes == ["ABORTED", "ABORTED"], str(codes))
        batch = wpb.BatchCreateTasksRequest(requests=[wpb.CreateTaskRequest(task=_strip(task, "status")) for _ in range(3)])
        a, b = both(1, "BatchCreateTasks", batch)
        check("BatchCreateTasks", [_strip(t, *volatile) for t in a.tasks] == [_strip(t, *volatile) for t in b.tasks])
        audited.append(("BatchCreateTasks' audit entries", [t.id for t in a.tasks], [t.id for t in b.tasks]))
    for what, ids_a, ids_b in audited:
        ea, eb = audit_entries(dialect, target, ids_a), audit_entries(dialect, target, ids_b)
        if bare:
            check(f"{what} (--bare floor: none)", len(ea) == len(ids_a) and not eb, f"{len(ea)} vs {len(eb)}")
        else:
            check(what, len(ea) == len(ids_a) and ea == eb, f"\n{ea}\nvs\n{eb}")
    updates = audit_entries(dialect, target, [reserved[1]])
    if bare:
        check("UpdateTask's audit entries (--bare floor: the project's two)", len(updates) == 2, str(updates))
    else:
        floor_entry, back = (updates[1], updates[2]) if len(updates) == 3 else (None, None)
        mirrored = back and [{**c, "old_value": c["new_value"], "new_value": c["old_value"]} for c in back[4]]
        check("UpdateTask's audit entry", floor_entry is not None and floor_entry[:4] == back[:4] and floor_entry[4] == mirrored
              and floor_entry[5:] == back[5:], f"\n{updates}")
    return problems


# ======================================================================== one database: project vs floor


def make_database(dialect: str, work: Path, tag: str) -> tuple[str, str, str]:
    """(target for benchdb/floor, SQLAlchemy URL, floor --db) of a fresh database, dropped on exit."""
    if dialect == "sqlite":
        path = str(work / f"{tag}.db")

        def remove() -> None:
            for suffix in ("", "-wal", "-shm"):
                Path(path + suffix).unlink(missing_ok=True)

        on_exit(f"database {path}", remove)
        return path, benchdb.database_url("sqlite", path), f"sqlite:{path}"
    name = benchdb.create_pg_database()
    on_exit(f"database {name}", lambda: benchdb.drop_pg_database(name))
    return name, benchdb.database_url("postgresql", name), f"postgresql:{name}"


def db_version(dialect: str, target: str) -> str:
    if dialect == "sqlite":
        return f"SQLite {sqlite3.sqlite_version} (WAL)"
    conn = benchdb.connect(dialect, target)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            return f"PostgreSQL {cur.fetchone()[0]}"
    finally:
        conn.close()


def write_spec(path: Path, seeded: benchdb.Seeded, update_ids: list[str], task_ids: list[str], statuses: list[str]) -> Path:
    spec = {
        "user_ids": seeded.user_ids,
        "project_id": seeded.project_id,
        "sink_project_id": seeded.sink_project_id,
        "task_ids": task_ids,
        "update_ids": update_ids,
        "queries": seeded.queries,
        "statuses": statuses,
    }
    path.write_text(json.dumps(spec))
    return path


def bench_database(dialect: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    t_start = time.monotonic()
    results: dict[str, Any] = {"db": dialect, "runs": defaultdict(dict), "tasks": args.tasks, "users": args.users}
    target, url, floor_db = make_database(dialect, work, "main")
    log(f"{dialect}: migrating {url}")
    benchdb.migrate(url)
    key = benchdb.create_admin_key(url)
    log(f"{dialect}: seeding {args.users} users and {args.tasks:,} tasks")
    rng = random.Random(args.seed)
    conn = benchdb.connect(dialect, target)
    try:
        seeded = benchdb.seed_base(conn, dialect, args.users, rng)
        benchdb.add_tasks(conn, dialect, seeded, args.tasks, rng)
        benchdb.analyze(conn, dialect)
    finally:
        conn.close()
    results["db_version"] = db_version(dialect, target)
    reserved = seeded.task_ids[-20:]
    pool = seeded.task_ids[:-20]
    statuses = ["TODO", "IN_PROGRESS", "DONE"]
    n_parts = 2 * args.rounds + (1 if args.profile else 0)
    update_parts = [pool[i::n_parts] for i in range(n_parts)]
    # The last part is for the profiling pass (fresh tasks at revision 1).
    spec_project = write_spec(work / "spec_project.json", seeded, update_parts[-1], pool, statuses)

    log(f"{dialect}: starting nexus-data serve and the floor")
    project = start_project(dialect, url, work, args, dialect)
    floor = start_floor(floor_db, work, args, dialect)
    time.sleep(1.0)
    rss = {side: {"pid": s.pid, "idle": tree_status_kib(s.pid, "VmRSS")} for side, s in (("project", project), ("floor", floor))}
    problems = verify(project, floor, key, json.loads(spec_project.read_text()), reserved, dialect, target, args.floor_bare)
    results["verify"] = "identical" if not problems else "DIFFERENT: " + "; ".join(p.splitlines()[0] for p in problems)
    for p in problems:
        log(f"{dialect}: WARNING {p[:2000]}")
    if not problems:
        log(f"{dialect}: both servers answer identically")

    for rpc in [r for r in MAIN_RPCS if r in args.rpcs]:
        batch = rpc == "BatchCreateTasks"
        conc = args.batch_concurrency if batch else args.concurrency
        timeout = 120.0 if batch else 30.0
        for rnd in range(args.rounds):
            for i, (side, server, k) in enumerate((("project", project, key), ("floor", floor, None))):
                # Each (round, side) updates its own tasks, all still at revision 1 (etag W/"1").
                part = update_parts[rnd * 2 + i]
                spec = write_spec(work / f"spec_{side}_{rnd}.json", seeded, part, pool, statuses)
                channels = args.channels  # the same client for both sides
                r = run_loadgen(server, rpc, spec, key=k, concurrency=conc, seconds=args.seconds, warmup=args.warmup,
                                timeout=timeout, extra=["--batch-size", str(args.batch_size), "--channels", str(channels)],
                                pg_db=target if dialect == "postgresql" else None)
                r["round"] = rnd + 1
                earlier = results["runs"][rpc].get(side)
                all_rounds = (earlier or {}).get("rounds", []) + [report.throughput(r)]
                if earlier is None or report.throughput(r) > report.throughput(earlier):
                    results["runs"][rpc][side] = r
                results["runs"][rpc][side]["rounds"] = all_rounds
                log_run(dialect, rpc, side, r)

    for side, s in (("project", project), ("floor", floor)):
        rss[side]["after"] = tree_status_kib(s.pid, "VmRSS")
        rss[side]["peak"] = tree_status_kib(s.pid, "VmHWM")
    results["rss"] = rss

    if args.profile:
        results["profile"] = profile_project(dialect, project, spec_project, key, args, work)

    cleanup(project.stop)
    cleanup(floor.stop)
    cleanup(f"database {target}")
    results["wall_s"] = time.monotonic() - t_start
    results["runs"] = dict(results["runs"])
    return results


# ======================================================================== profile (optional)


def log_run(dialect: str, rpc: str, side: str, r: dict[str, Any]) -> None:
    unit = "rows/s" if rpc == "BatchCreateTasks" else "RPC/s"
    errs = f" errors {r['errors']} ({r['first_error']})" if r["errors"] else ""
    log(f"{dialect}: {rpc:<17} {side:<7} {report.throughput(r):>9,.0f} {unit}  p50 {r['p50_ms']:7.1f} ms  "
        f"p99 {r['p99_ms']:7.1f} ms  server CPU {r['server_cpu_ms_per_call'] or 0:.2f} ms/call  "
        f"cores: server {r['server_cores']:.2f} db {r.get('db_cores', 0):.2f} loadgen {r['loadgen_cores']:.2f} "
        f"others {r['other_cores']:.2f}"
        + (f" new PG connections {r['db_connections_opened']}" if "db_connections_opened" in r else "") + errs)


def profile_project(dialect: str, project: Server, spec: Path, key: str, args: argparse.Namespace, work: Path) -> dict[str, str]:
    """py-spy (GIL-holder samples) on the project's server while each RPC runs; top functions."""
    out: dict[str, str] = {}
    prof_dir = Path(args.results) / "profiles"
    prof_dir.mkdir(parents=True, exist_ok=True)
    for rpc in [r for r in MAIN_RPCS if r in args.rpcs]:
        batch = rpc == "BatchCreateTasks"
        raw = prof_dir / f"{dialect}_{rpc}.txt"
        pyspy = [str(PYSPY), "record", "--pid", str(project.pid), "--duration", str(int(args.seconds)), "--rate", "200",
                 "--gil", "--nonblocking", "--format", "raw", "--output", str(raw)]
        holder: dict[str, Any] = {}

        def load(rpc: str = rpc, batch: bool = batch, holder: dict[str, Any] = holder) -> None:  # the thread may outlive the join below
            try:
                holder["r"] = run_loadgen(project, rpc, spec, key=key, concurrency=args.batch_concurrency if batch else args.concurrency,
                                          seconds=args.seconds + 2, warmup=args.warmup, timeout=120.0 if batch else 30.0,
                                          extra=["--batch-size", str(args.batch_size)])
            except Exception as exc:  # noqa: BLE001
                holder["e"] = exc

        t = threading.Thread(target=load, daemon=True)
        t.start()
        time.sleep(args.warmup + 1)
        spy = subprocess.Popen(pyspy, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)

        def kill_spy(spy: subprocess.Popen[str] = spy) -> None:
            if spy.poll() is None:
                spy.kill()
                spy.wait(5)

        on_exit("py-spy", kill_spy)
        try:
            _, err = spy.communicate(timeout=args.seconds + 60)
        finally:
            cleanup(kill_spy)
        t.join(args.seconds + 300)
        if "e" in holder:
            raise holder["e"]
        if not raw.exists():
            out[rpc] = f"py-spy failed: {err[-500:]}"
            continue
        out[rpc] = summarize_profile(raw, args.seconds, 200)
        log(f"{dialect}: profiled {rpc} -> {raw}")
    return out


def _frame_name(frame: str) -> tuple[str, str]:
    """'func (path/file.py:12)' -> ('func', 'short/path.py')."""
    name, _, loc = frame.rpartition(" (")
    path = loc.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3.11/", str(REPO) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return (name or frame), path


def _layer(path: str) -> str:
    if path.startswith("sqlalchemy"):
        return "SQLAlchemy"
    if path.startswith(("psycopg2", "sqlite3")):
        return "DB driver (Python side)"
    if path.startswith("grpc"):
        return "grpc (Python side)"
    if path.startswith("google/protobuf"):
        return "protobuf (Python side)"
    if path.startswith("asyncio") or path.startswith("concurrent") or path in ("threading.py", "selectors.py", "queue.py"):
        return "asyncio / threads"
    if path.startswith("db/"):
        return "project: db/"
    if path.startswith("service/"):
        return "project: service/"
    return "other stdlib / libs"


def _run_sync_lines() -> set[str]:
    """Lines of db/database.py's runners that open and close the session and its transaction."""
    try:
        src = (REPO / "db" / "database.py").read_text().splitlines()
    except OSError:
        return set()
    return {str(i + 1) for i, line in enumerate(src) if "_sessions(" in line or "with session.begin()" in line}


_TX_LINES = _run_sync_lines()
PHASES: tuple[tuple[str, Callable[[set[str], str], bool]], ...] = (
    ("ORM lazy loads (one SELECT per row: N+1)", lambda n, r: "_LazyLoader._emit_lazyload" in n),
    ("ORM selectin loads (relationships)", lambda n, r: "_SelectInLoader._load_for_path" in n),
    ("to_proto (row -> message, codecs)", lambda n, r: "ResourceSpec.to_proto" in n),
    ("Session.flush (unit of work: INSERT / UPDATE)", lambda n, r: "Session._flush" in n),
    ("audit trail (engine/audit.py)", lambda n, r: "db/engine/audit.py" in r),
    ("reference checks (SELECT ... FOR SHARE per reference)", lambda n, r: "check_references" in n),
    ("statement_timeout (SET when a connection's value changes)", lambda n, r: "Database._statement_timeout" in n),
    ("transaction begin / commit / session close",
     lambda n, r: any(f"Database.{runner} (db/database.py:{ln})" in r for ln in _TX_LINES for runner in ("_run_transaction", "_run_read"))),
    ("authentication + role check (CallGuard.enter)", lambda n, r: "CallGuard.enter" in n),
)


def summarize_profile(raw: Path, seconds: float, rate: int) -> str:
    stacks: list[tuple[list[tuple[str, str]], int]] = []
    stacks_raw: dict[int, str] = {}
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if frames:
            stacks.append((frames, int(count)))
            stacks_raw[id(frames)] = stack
    total = sum(c for _, c in stacks)
    if not total:
        return "no samples"
    leaf: Counter[str] = Counter()
    layer: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    for frames, c in stacks:
        name, path = frames[-1]
        leaf[f"{name} ({path})"] += c
        layer[_layer(path)] += c
        seen = set()
        for name, path in frames:
            if path.startswith(("db/", "service/")) or path.startswith("sqlalchemy/orm") or name in (
                "_record", "to_proto", "authenticate"):
                k = f"{name} ({path})"
                if k not in seen:
                    seen.add(k)
                    inclusive[k] += c
    phases: Counter[str] = Counter()
    for frames, c in stacks:
        names = {n for n, _ in frames}
        raw_stack = stacks_raw.get(id(frames), "")
        in_worker = "_worker" in names and any(p.startswith("concurrent/futures/thread") for _, p in frames)
        phases["event loop thread: grpc.aio, asyncio, interceptor, handlers" if not in_worker else
               "database threads: Database.run_sync (the unit of work)"] += c
        for label, needle in PHASES:
            if needle(names, raw_stack):
                phases[label] += c
    lines = [f"{total:,} samples of the thread holding the GIL (py-spy --gil, {rate}/s for {seconds:.0f} s); "
             "shares are of these samples.", "",
             "| phase (inclusive; phases overlap) | share |", "| --- | ---: |"]
    lines += [f"| {k} | {100 * v / total:.1f} % |" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])]
    lines += ["", "| layer (leaf frame) | share |", "| --- | ---: |"]
    lines += [f"| {k} | {100 * v / total:.1f} % |" for k, v in layer.most_common()]
    lines += ["", "| top self (leaf) functions | share |", "| --- | ---: |"]
    lines += [f"| `{k}` | {100 * v / total:.1f} % |" for k, v in leaf.most_common(12)]
    lines += ["", "| project + ORM functions, inclusive | share |", "| --- | ---: |"]
    lines += [f"| `{k}` | {100 * v / total:.1f} % |" for k, v in inclusive.most_common(14) if v / total < 0.999]
    return "\n".join(lines)


# ======================================================================== scale: the project's server alone


def sql_timings(dialect: str, target: str, project_id: str) -> dict[str, float]:
    """The service's ListTasks statements run alone: page 1, page 20 (keyset), COUNT; median of 3, ms."""
    conn = benchdb.connect(dialect, target)
    f = benchdb.Fmt(dialect)
    import uuid

    pid = f.id(uuid.UUID(project_id))
    ph = "?" if dialect == "sqlite" else "%s"
    where = f"tasks.project_id = {ph} AND tasks.status = {ph} AND tasks.delete_time IS NULL"
    order = "ORDER BY tasks.create_time ASC NULLS LAST, tasks.id ASC NULLS LAST"
    limit = "LIMIT ? OFFSET ?" if dialect == "sqlite" else "LIMIT %s"
    lim = [51, 0] if dialect == "sqlite" else [51]
    columns = ", ".join(f"tasks.{c}" for c in benchdb.TASK_COLUMNS)  # a task's fields, not its search vector
    keyset = (f" AND (tasks.create_time > {ph} OR tasks.create_time IS NULL OR tasks.create_time = {ph} "
              f"AND (tasks.id > {ph} OR tasks.id IS NULL))")
    cur = conn.cursor()

    def timed(sql: str, params: list[Any]) -> float:
        runs = []
        for _ in range(3):
            t = time.perf_counter()
            cur.execute(sql, params)
            cur.fetchall()
            runs.append((time.perf_counter() - t) * 1000)
        return statistics.median(runs)

    try:
        cur.execute(f"SELECT tasks.create_time, tasks.id FROM tasks WHERE {where} {order} LIMIT 1 OFFSET 949", [pid, "todo"])
        after = cur.fetchone()
        out = {
            "page1": timed(f"SELECT {columns} FROM tasks WHERE {where} {order} {limit}", [pid, "todo", *lim]),
            "count": timed(f"SELECT count(*) FROM tasks WHERE {where}", [pid, "todo"]),
        }
        if after:
            out["page20"] = timed(f"SELECT {columns} FROM tasks WHERE {where}{keyset} {order} {limit}",
                                  [pid, "todo", after[0], after[0], after[1], *lim])
        if dialect != "sqlite":
            conn.rollback()
        return out
    finally:
        conn.close()


def bench_scale(dialect: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    target, url, _ = make_database(dialect, work, "scale")
    benchdb.migrate(url)
    key = benchdb.create_admin_key(url)
    rng = random.Random(args.seed + 1)
    conn = benchdb.connect(dialect, target)
    seeded = benchdb.seed_base(conn, dialect, args.users, rng)
    project: Server | None = None
    out = []
    try:
        for n in args.scale:
            if n > seeded.task_count:
                log(f"{dialect} scale: inserting {n - seeded.task_count:,} tasks (to {n:,})")
                t = time.monotonic()

                def progress(done: int) -> None:
                    if done % 200_000 == 0:
                        log(f"{dialect} scale: {done:,} rows")

                benchdb.add_tasks(conn, dialect, seeded, n - seeded.task_count, rng, chunk=50_000, progress=progress)
                benchdb.analyze(conn, dialect)
                log(f"{dialect} scale: {n:,} rows in place ({time.monotonic() - t:.0f} s)")
            if project is None:
                project = start_project(dialect, url, work, args, f"{dialect}-scale")
                with grpc.insecure_channel(f"127.0.0.1:{project.port}") as ch:  # warm the credential cache
                    work_pb2_grpc.WorkServiceStub(ch).GetTask(wpb.GetTaskRequest(id=seeded.task_ids[0]),
                                                              metadata=(("authorization", f"Bearer {key}"),), timeout=60)
            spec = write_spec(work / "spec_scale.json", seeded, [], seeded.task_ids, ["TODO"])
            entry: dict[str, Any] = {"rows": n}
            for rpc in args.scale_rpcs:
                r = run_loadgen(project, rpc, spec, key=key, concurrency=args.scale_concurrency, seconds=args.scale_seconds,
                                warmup=min(1.0, args.warmup), timeout=120.0, extra=["--deep-pages", "20"])
                entry[rpc] = r
                deep = f"  (first walk: page {r.get('deep_page')} {r.get('deep_last_page_ms', 0):.1f} ms)" if rpc == "ListTasksDeep" else ""
                log(f"{dialect} scale {n:>9,}: {rpc:<13} p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms  "
                    f"{r['rps']:7.1f} RPC/s{deep}" + (f" errors {r['errors']}" if r["errors"] else ""))
            entry["sql"] = sql_timings(dialect, target, seeded.project_id)
            s = entry["sql"]
            log(f"{dialect} scale {n:>9,}: SQL alone page 1 {s['page1']:.1f} ms, page 20 {s.get('page20', float('nan')):.1f} ms, "
                f"COUNT {s['count']:.1f} ms")
            out.append(entry)
    finally:
        conn.close()
        if project is not None:
            cleanup(project.stop)
        cleanup(f"database {target}")
    return out


# ======================================================================== main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql (default both)")
    p.add_argument("--concurrency", type=int, default=32, help="calls in flight per RPC (default 32)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per RPC and server (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each measurement (default 1)")
    p.add_argument("--batch-concurrency", type=int, default=4, help="BatchCreateTasks calls in flight (default 4)")
    p.add_argument("--batch-size", type=int, default=1000, help="tasks per BatchCreateTasks call (default 1000)")
    p.add_argument("--tasks", type=int, default=20_000, help="tasks in the listed project (default 20000)")
    p.add_argument("--users", type=int, default=1000, help="users (default 1000)")
    p.add_argument("--rpcs", default=",".join(MAIN_RPCS), help=f"subset of {','.join(MAIN_RPCS)}")
    p.add_argument("--scale", default="10000,100000",
                   help="task row counts for the scale test, e.g. 10000,100000,1000000; 'none' skips it (default 10000,100000)")
    p.add_argument("--scale-concurrency", type=int, default=1, help="calls in flight in the scale test (default 1: latency without queueing)")
    p.add_argument("--scale-seconds", type=float, default=3.0, help="seconds per scale measurement (default 3)")
    p.add_argument("--scale-rpcs", default="GetTask,ListTasks,ListTasksDeep,SearchTasks",
                   help="RPCs of the scale test (default GetTask,ListTasks,ListTasksDeep,SearchTasks; ListTasksDeep: page 20)")
    p.add_argument("--workers", type=int, default=1, help="`serve --workers N` for the project's server; the load generator then opens 4N connections (default 1)")
    p.add_argument("--channels", type=int,
                   help="connections the load generator opens to each server (default 1; 4N with --workers N > 1: SO_REUSEPORT spreads connections, not calls)")
    p.add_argument("--heavy", action="store_true",
                   help="after the RPC tables, the heavy paths (bench/heavy.py: knowledge upserts, file transfer, AI usage) with short settings")
    p.add_argument("--only-heavy", action="store_true", help="only the heavy paths (no RPC table, no scale test)")
    p.add_argument("--pool-size", type=int, default=10, help="DB_POOL_SIZE of the project's server (default 10, its default)")
    p.add_argument("--max-overflow", type=int, default=0, help="DB_MAX_OVERFLOW of the project's server (default 0, its default)")
    p.add_argument("--floor-threads", type=int, default=8,
                   help="database threads (= connections) of the floor (default 8: more threads only add GIL contention)")
    p.add_argument("--floor-bare", action="store_true",
                   help="the floor's writes without the audit entry and reference check the API requires "
                        "(one INSERT / UPDATE in autocommit: the floor of the first rounds)")
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each RPC N times per server, alternating project and floor; keep each side's best (default 1)")
    p.add_argument("--max-rpcs", type=int, default=1000, help="NEXUS_MAX_CONCURRENT_RPCS (default 1000)")
    p.add_argument("--project-src", help="serve the project from this checkout (a patched copy) instead of the venv's nexus-data")
    p.add_argument("--profile", action="store_true", help="also py-spy the project's server per RPC (after the measurements)")
    p.add_argument("--no-main", action="store_true", help="skip project vs floor (scale test only)")
    p.add_argument("--results", default=str(RESULTS), help="directory for <db>.md / <db>.png / <db>.json")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-runtime", type=float, help="watchdog: stop everything after this many seconds (default: derived)")
    a = p.parse_args(argv)
    a.dbs = [d.strip() for d in a.db.split(",") if d.strip()]
    for d in a.dbs:
        if d not in ("sqlite", "postgresql"):
            p.error(f"unknown database {d!r}")
    a.rpcs = [r.strip() for r in a.rpcs.split(",") if r.strip()]
    a.scale_rpcs = [r.strip() for r in a.scale_rpcs.split(",") if r.strip()]
    for r in a.scale_rpcs:
        if r not in ("GetTask", "ListTasks", "ListTasksDeep", "SearchTasks"):
            p.error(f"unknown scale RPC {r!r}")
    if a.channels is None:
        a.channels = 4 * a.workers if a.workers > 1 else 1
    if a.only_heavy:
        a.heavy, a.no_main, a.scale = True, True, "none"
    a.scale = [] if a.scale.strip().lower() in ("", "none", "0") else sorted(int(x.replace("_", "")) for x in a.scale.split(","))
    if a.max_runtime is None:
        per_db = 0 if a.no_main else 240 + len(a.rpcs) * 2 * (a.warmup + a.seconds + 25) * (a.rounds + (1 if a.profile else 0))
        per_db += sum(60 + n / 2500 + 3 * (a.scale_seconds + 150) for n in a.scale)
        a.max_runtime = 120 + len(a.dbs) * per_db + (heavy.time_limit() if a.heavy else 0)
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    benchdb.PROJECT_SRC = args.project_src  # its migrations make the benchmark's databases too
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    command = ("bench/run " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))).rstrip()
    results_dir = Path(args.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="nexus-rpcbench-"))
    on_exit("temp dir", lambda: shutil.rmtree(work, ignore_errors=True))

    def watchdog() -> None:
        global _watchdog_fired
        _watchdog_fired = True
        print(f"\nbench/run: watchdog: over --max-runtime {args.max_runtime:.0f} s, stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Timer(args.max_runtime, watchdog)
    timer.daemon = True
    timer.start()
    t0 = time.monotonic()
    texts = []
    code = 0
    try:
        log(f"{command}  (watchdog at {args.max_runtime:.0f} s; logs in {work})")
        for dialect in [] if args.only_heavy else args.dbs:
            load_before = loadavg()
            started = dt.datetime.now(dt.UTC)
            results: dict[str, Any] = {"db": dialect, "runs": {}}
            if not args.no_main:
                results = bench_database(dialect, args, work)
            if args.scale:
                results["scale"] = bench_scale(dialect, args, work)
            meta = {
                "command": command, "date": started.strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(),
                "cpu_model": cpu_model(), "mem": mem_total(), "load_before": load_before, "load_after": loadavg(),
                "concurrency": args.concurrency, "batch_concurrency": args.batch_concurrency, "batch_size": args.batch_size,
                "seconds": args.seconds, "warmup": args.warmup, "pool_size": args.pool_size, "max_overflow": args.max_overflow, "workers": args.workers,
                "max_rpcs": args.max_rpcs, "floor_threads": args.floor_threads, "floor_bare": args.floor_bare, "scale_concurrency": args.scale_concurrency,
                "scale_seconds": args.scale_seconds, "rounds": args.rounds, "project_src": args.project_src,
            }
            md = report.markdown(dialect, results, meta)
            (results_dir / f"{dialect}.md").write_text(md)
            (results_dir / f"{dialect}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
            if results.get("runs"):
                try:
                    report.chart(dialect, results, results_dir / f"{dialect}.png")
                except ImportError:
                    log("matplotlib missing: no chart (bench/run installs it)")
            text = [f"== {dialect} ({results.get('db_version', '')}) =="]
            if results.get("runs"):
                text.append(report.render_text(*report.main_rows(results)))
                text.append("")
                text.append(report.render_text(*report.rss_rows(results)))
            if results.get("scale"):
                text.append("")
                text.append(report.render_text(*report.scale_rows(results["scale"])))
            texts.append("\n".join(text))
            log(f"{dialect}: wrote {(results_dir / f'{dialect}.md').relative_to(REPO) if results_dir.is_relative_to(REPO) else results_dir}")
        if args.heavy:
            texts.append(heavy.run(args.dbs, results_dir, on_exit, cleanup, log, command))
    except Interrupted as exc:
        code = 3 if _watchdog_fired else 130
        print(f"\nbench/run: interrupted ({exc}); cleaning up", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001
        code = 2
        import traceback

        traceback.print_exc()
        print(f"\nbench/run: failed: {exc}", file=sys.stderr, flush=True)
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        cleanup()
    if texts:
        print()
        print("\n\n".join(texts))
    print(f"\nbench/run: total {time.monotonic() - t0:.0f} s, exit {code}", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
