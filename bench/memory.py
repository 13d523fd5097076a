#!/usr/bin/env python3
"""Server memory in one table: idle, with 1,000 open streams, after they close, at the peak of a
burst of the largest requests and after it, each event against the reading before it (within 20 %?).

    .venv/bin/python bench/memory.py                         # both databases, ~3 min
    .venv/bin/python bench/memory.py --db postgresql --streams 1000 --settle 10

Per database, one fresh database and one `nexus-data serve` (its defaults, two glibc heaps among
them, NEXUS_MALLOC_ARENAS; MALLOC_ARENA_MAX taken out of the environment, as
bench/rss_after_large.py does), in this order:

1. idle, cold: VmRSS 2 s after the server answers its readiness check, before any call;
   idle, warm: after the load's setup (a user, a channel, a conversation, a project) and
   --warm-streams (50) streams opened, sent a message and closed, VmRSS after --settle s. The first
   calls start the database threads, open their connections (each reads the schema) and fill
   the statement caches, once; the streams below are measured against this reading;
2. --streams ChatService.StreamEvents streams opened by one load-generator process (50 per HTTP/2
   connection, one API key); a chat message is posted every second until every stream got one,
   then VmRSS after 1 s;
3. the streams closed (the load generator cancels them and exits), VmRSS after --settle s;
4. --bursts times (2), the burst of bench/rss_after_large.py (CreateChatMessage, UpdateChatMessage and
   CreateConversationMessage at their size limits, BatchCreateTasks of 200 tasks at the
   description limit, lists of 1,000 rows cut at the response budget; --rounds rounds from
   --concurrency threads): VmRSS sampled every 50 ms for the peak, then read after --settle s,
   against the reading before the burst;
5. when gdb is there, malloc_trim(0) called inside the server, and VmRSS read again: what is left
   is in use, not glibc's free memory; then pymalloc's arenas (sys._debugmallocstats, run inside
   the server through gdb, at the very end: the interrupted system calls can upset the server's
   gRPC polling afterwards). --trace: the Python allocations alive at the end, by file.

Each reading also splits the RSS into anonymous memory (heaps) and file-backed pages (the
interpreter and its libraries) from /proc/<pid>/smaps_rollup. Writes bench/results/memory.md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "generated"))
sys.path.insert(0, str(BENCH))

import grpc  # noqa: E402
from nexus.chat.v1 import chat_pb2 as cpb  # noqa: E402
from nexus.chat.v1 import chat_pb2_grpc  # noqa: E402

import benchdb  # noqa: E402
from rss_after_large import Load, Sampler  # noqa: E402
from stream_fanout import ServerProcess, free_port, loadavg, register_cleanup, run_cleanups, wait_ready  # noqa: E402

WITHIN = 0.20


def smaps(pid: int) -> dict[str, float]:
    """Rss, Anonymous and file-backed MiB of a process (smaps_rollup)."""
    out: dict[str, float] = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0].rstrip(":") in ("Rss", "Anonymous"):
                    out[parts[0].rstrip(":")] = int(parts[1]) / 1024
    except OSError:
        return {}
    if "Rss" in out and "Anonymous" in out:
        out["File"] = out["Rss"] - out["Anonymous"]
    return out


def inject(pid: int, code: str, work: Path) -> bool:
    """Run Python code inside the server (gdb: PyGILState_Ensure, PyRun_SimpleString): a
    diagnostic, for --trace only, at the very end (the interrupted system calls can upset
    the server's gRPC polling afterwards)."""
    script = work / f"inject-{time.monotonic_ns()}.py"
    script.write_text(code)
    call = f"call (int)PyRun_SimpleString(\"exec(open('{script}').read())\")"
    done = subprocess.run(["gdb", "-p", str(pid), "-batch", "-nx", "-ex", "call (int)PyGILState_Ensure()", "-ex", call,
                           "-ex", "call (void)PyGILState_Release($1)"], capture_output=True, text=True, timeout=120)
    return done.returncode == 0 and "$2 = 0" in done.stdout


TRACE_REPORT = """
import tracemalloc
current, peak = tracemalloc.get_traced_memory()
snapshot = tracemalloc.take_snapshot().filter_traces([
    tracemalloc.Filter(False, tracemalloc.__file__),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
    tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
])
modules = (current - sum(t.size for t in snapshot.traces)) / 2**20
with open({path!r}, "w") as out:
    out.write(f"Python allocations alive: {{current / 2**20:.1f}} MiB (peak {{peak / 2**20:.1f}}), "
              f"of which {{modules:.1f}} MiB made by imports (code, module dicts)\\n")
    for stat in snapshot.statistics("filename")[:15]:
        name = stat.traceback[0].filename.split("site-packages/")[-1].split("/python3.11/")[-1]
        out.write(f"{{stat.size / 2**20:8.2f}} MiB {{stat.count:8d}} blocks  {{name}}\\n")
"""

MALLOC_STATS = """
import os, sys
fd = os.open({stats!r}, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
saved = os.dup(2)
os.dup2(fd, 2)
sys._debugmallocstats()
os.dup2(saved, 2)
os.close(fd)
os.close(saved)
"""


def pymalloc_summary(path: Path) -> str:
    """The arena lines of sys._debugmallocstats()."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return ""
    values: dict[str, int] = {}
    for line in lines:
        key, _, value = line.partition("=")
        if value.strip().replace(",", "").isdigit():
            values.setdefault(" ".join(key.split()), int(value.strip().replace(",", "")))
    if "Total" not in values:
        return ""
    used = values.get("# bytes in allocated blocks", 0)
    return f"{values['Total'] / 2**20:.0f} MiB in pymalloc's arenas, {used / 2**20:.0f} MiB of it in live objects"


def trim(pid: int) -> bool:
    """malloc_trim(0) called inside the server (gdb): what glibc holds free goes back."""
    if not shutil.which("gdb"):
        return False
    probe = subprocess.run(["gdb", "-p", str(pid), "-batch", "-nx", "-ex", "call (int)malloc_trim(0)"],
                           capture_output=True, text=True, timeout=60)
    time.sleep(0.5)
    return probe.returncode == 0


# ======================================================================== the stream holder (its own process)


async def hold(address: str, channel_id: str, count: int, per_conn: int, secret: str) -> None:
    """Open `count` streams, print "warm K" as streams get their first event, close them all on
    "stop" from stdin, then exit."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), loop.call_soon_threadsafe(stop.set)), daemon=True).start()
    metadata = (("authorization", f"Bearer {secret}"),)
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1), ("bench.connection", str(c))])
                for c in range(math.ceil(count / per_conn))]
    warm = 0
    errors = 0
    calls: list[Any] = []

    async def consume(j: int) -> None:
        nonlocal warm, errors
        call = chat_pb2_grpc.ChatServiceStub(channels[j // per_conn]).StreamEvents(
            cpb.StreamEventsRequest(channel_ids=[channel_id]), metadata=metadata)
        calls.append(call)
        first = True
        try:
            async for event in call:
                if first and event.type == cpb.EVENT_TYPE_CREATED:
                    first = False
                    warm += 1
        except asyncio.CancelledError:
            pass
        except grpc.aio.AioRpcError as exc:
            if not stop.is_set():
                errors += 1
                print(f"error {exc.code().name} {exc.details()}", flush=True)

    tasks = [asyncio.create_task(consume(j)) for j in range(count)]
    shown = -1
    while not stop.is_set():
        if warm != shown:
            print(f"warm {warm} errors {errors}", flush=True)
            shown = warm
        try:
            await asyncio.wait_for(stop.wait(), 0.5)
        except TimeoutError:
            pass
    for call in calls:
        call.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()
    print("closed", flush=True)


# ======================================================================== one database


def run_db(db: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    pg_name = ""
    if db == "sqlite":
        url = benchdb.database_url("sqlite", str(work / "memory.db"))
    else:
        pg_name = benchdb.create_pg_database("nexus_membench")
        register_cleanup(f"database {pg_name}", lambda: benchdb.drop_pg_database(pg_name))
        url = benchdb.database_url("postgresql", pg_name)
    benchdb.migrate(url)
    secret = benchdb.create_admin_key(url)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"},
        "DATABASE_URL": url, "NEXUS_HOST": "127.0.0.1", "NEXUS_PORT": str(port),
        "NEXUS_MAX_CONCURRENT_RPCS": str(max(5000, 2 * args.streams + 100)),
        "NEXUS_MAX_STREAMS_PER_CALLER": str(args.streams + 10),
        "NEXUS_HASH_TIME_COST": "1", "NEXUS_HASH_MEMORY_KIB": "1024", "NEXUS_DRAIN_SECONDS": "0", "NEXUS_GRACE_SECONDS": "2",
        # --trace: every Python allocation traced from the start, 8 frames each.
        **({"PYTHONTRACEMALLOC": "8"} if args.trace else {}),
        **dict(item.partition("=")[::2] for item in args.env or []),
    }
    server = ServerProcess(f"{db} server", [str(benchdb.NEXUS_DATA), "serve"], env, work / f"{db}-server.log")
    address = f"127.0.0.1:{port}"
    out: dict[str, Any] = {"db": db, "load": loadavg()}
    try:
        asyncio.run(wait_ready(address, server, 60))
        time.sleep(2)
        out["idle"] = smaps(server.pid)
        print(f"{db}: idle {out['idle']['Rss']:.0f} MiB", flush=True)

        def streams(count: int) -> float:
            """Open `count` streams from a load-generator process, post a chat message every second
            until each got one, read VmRSS (out["streams"]) 1 s later, close them, wait --settle s.
            The seconds it took to subscribe them."""
            holder = subprocess.Popen(
                [sys.executable, __file__, "--hold", address, load.channel_id, str(count), str(args.per_conn)],
                env={**os.environ, "NEXUS_BENCH_KEY": secret}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                start_new_session=True)

            def stop_holder() -> None:
                if holder.poll() is None:
                    holder.kill()

            register_cleanup("stream holder", stop_holder)
            warm = [0]
            lines: list[str] = []

            def read() -> None:
                assert holder.stdout is not None
                for line in holder.stdout:
                    lines.append(line.strip())
                    if line.startswith("warm"):
                        warm[0] = int(line.split()[1])

            threading.Thread(target=read, daemon=True).start()
            t0 = time.monotonic()
            k = 0
            while warm[0] < count:
                if time.monotonic() - t0 > args.subscribe_timeout or holder.poll() is not None:
                    raise RuntimeError(f"{db}: {warm[0]} of {count} streams subscribed after {time.monotonic() - t0:.0f} s: {lines[-3:]}")
                chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=load.channel_id, content=f"w {k}")),
                                       metadata=load.metadata, timeout=30)
                k += 1
                time.sleep(1.0)
            took = time.monotonic() - t0
            time.sleep(1.0)
            out["streams"] = smaps(server.pid)
            assert holder.stdin is not None
            holder.stdin.write("stop\n")
            holder.stdin.flush()
            holder.wait(60)
            time.sleep(args.settle)
            return took

        load = Load(address, secret)  # a user, a channel, a conversation, a project
        chat = chat_pb2_grpc.ChatServiceStub(load.channel)
        if args.warm_streams:
            # Idle, warm: the setup's creates, a few streams and their messages served, then --settle s of rest.
            streams(args.warm_streams)  # (it waits --settle s after they close)
            out["warm"] = smaps(server.pid)
            print(f"{db}: idle after a warm-up {out['warm']['Rss']:.0f} MiB", flush=True)
        out["subscribe_s"] = streams(args.streams)
        print(f"{db}: {args.streams} streams in {out['subscribe_s']:.0f} s, {out['streams']['Rss']:.0f} MiB", flush=True)
        out["streams_after"] = smaps(server.pid)
        print(f"{db}: {args.settle:g} s after the streams closed {out['streams_after']['Rss']:.0f} MiB", flush=True)
        if args.trim_after_streams and trim(server.pid):
            out["streams_trimmed"] = smaps(server.pid)
            print(f"{db}: then after malloc_trim(0) {out['streams_trimmed']['Rss']:.0f} MiB", flush=True)

        for b in range(args.bursts):
            suffix = "" if b == 0 else f"_{b + 1}"
            started = time.monotonic()
            with Sampler(server.pid) as sampler, ThreadPoolExecutor(args.concurrency) as pool:
                moved = sum(pool.map(load.round, range(1000 * b, 1000 * b + args.rounds)))
            out["burst_s" + suffix] = time.monotonic() - started
            out["burst_mib" + suffix] = moved / 2**20
            out["peak" + suffix] = sampler.peak
            time.sleep(args.settle)
            out["burst_after" + suffix] = smaps(server.pid)
            print(f"{db}: burst {b + 1}: {moved / 2**20:.0f} MiB in {out['burst_s' + suffix]:.1f} s, peak {sampler.peak:.0f} MiB, "
                  f"{args.settle:g} s after {out['burst_after' + suffix]['Rss']:.0f} MiB", flush=True)
        if trim(server.pid):
            out["trimmed"] = smaps(server.pid)
            print(f"{db}: after malloc_trim(0) {out['trimmed']['Rss']:.0f} MiB", flush=True)
        if args.trace:
            report = work / f"{db}-trace.txt"
            if inject(server.pid, TRACE_REPORT.format(path=str(report)), work):
                out["trace"] = report.read_text().replace(str(REPO) + "/", "")
                print(out["trace"], flush=True)
        elif shutil.which("gdb"):
            stats = work / f"{db}-mallocstats.txt"
            if inject(server.pid, MALLOC_STATS.format(stats=str(stats)), work):
                out["pymalloc"] = pymalloc_summary(stats)
                print(f"{db}: {out['pymalloc']}", flush=True)
        load.channel.close()
    finally:
        server.stop()
        if pg_name:
            benchdb.drop_pg_database(pg_name)
    return out


def verdict(value: float, idle: float) -> str:
    change = (value - idle) / idle
    return f"{change:+.0%} {'yes' if change <= WITHIN else 'NO'}"


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, command: str, started: str) -> str:
    lines = [
        f"# Server memory: idle, {args.streams:,} streams, a burst of the largest requests ({started})",
        "",
        f"- command: `{command}`",
        f"- machine: {os.cpu_count()} CPUs, shared with other work; `nexus-data serve` with its defaults (memory trimmer "
        f"every 2 s, NEXUS_MALLOC_ARENAS 2 unless set below), MALLOC_ARENA_MAX unset" + "".join(f", {item}" for item in args.env or []),
        f"- streams: one API key, {args.per_conn} per HTTP/2 connection; burst: {args.rounds} rounds of bench/rss_after_large.py's "
        f"requests from {args.concurrency} threads; readings {args.settle:g} s after the streams closed and after the burst",
        *(["- --trace: the server under PYTHONTRACEMALLOC=8; its RSS includes the traces (about 100 MiB here), so "
            "compare these figures only with each other"] if args.trace else []),
        "",
        "Each event against the reading just before it (within 20 %?): the streams against idle after the warm-up, "
        "each burst against the reading before that burst. The last column puts the end against both idle readings.",
        "",
        "| database | load at start | idle, cold MiB | idle, warm MiB | with streams MiB | after streams closed MiB "
        "| burst: peak MiB | after the burst MiB | after the second burst MiB | at the end vs idle warm / cold | MiB moved, burst s |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | --- | --- | --- | ---: |",
    ]
    for r in results:
        cold = r["idle"]["Rss"]
        before = r["warm"]["Rss"] if "warm" in r else cold
        after = r["streams_after"]["Rss"]
        burst = r["burst_after"]["Rss"]
        second = f"{r['burst_after_2']['Rss']:.0f} ({verdict(r['burst_after_2']['Rss'], burst)})" if "burst_after_2" in r else "-"
        end = r["burst_after_2" if "burst_after_2" in r else "burst_after"]["Rss"]
        lines.append(
            f"| {r['db']} | {r['load']} | {cold:.0f} | {before:.0f} | {r['streams']['Rss']:.0f} ({verdict(r['streams']['Rss'], before).split()[0]}) "
            f"| {after:.0f} ({verdict(after, before)}) | {r['peak']:.0f} | {burst:.0f} ({verdict(burst, after)}) | {second} "
            f"| {verdict(end, before).split()[0]} / {verdict(end, cold).split()[0]} | {r['burst_mib']:.0f}, {r['burst_s']:.1f} |")
    lines += [
        "",
        "Anonymous (heap) / file-backed MiB at each reading (/proc/<pid>/smaps_rollup):",
        "",
        "| database | idle, cold | idle, warm | with streams | after streams closed | after the burst | after the second burst | then after malloc_trim(0) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        cells = [f"{r[k].get('Anonymous', float('nan')):.0f} / {r[k].get('File', float('nan')):.0f}" if k in r else "-"
                 for k in ("idle", "warm", "streams", "streams_after", "burst_after", "burst_after_2", "trimmed")]
        lines.append(f"| {r['db']} | " + " | ".join(cells) + " |")
    for r in results:
        if r.get("trace"):
            lines += ["", f"{r['db']}, --trace (at the end, after malloc_trim):", "", "```", r["trace"].rstrip(), "```"]
    for r in results:
        if r.get("streams_trimmed"):
            lines += ["", f"{r['db']}: after the streams closed, then malloc_trim(0): {r['streams_trimmed']['Rss']:.0f} MiB "
                          f"({r['streams_trimmed'].get('Anonymous', float('nan')):.0f} anonymous)"]
    for r in results:
        if r.get("pymalloc"):
            lines += ["", f"{r['db']}, at the end (sys._debugmallocstats inside the server): {r['pymalloc']}"]
    lines += ["", "Time to subscribe every stream: " + ", ".join(f"{r['db']} {r['subscribe_s']:.0f} s" for r in results), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--hold":
        address, channel_id, count, per_conn = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        asyncio.run(hold(address, channel_id, count, per_conn, os.environ["NEXUS_BENCH_KEY"]))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="sqlite,postgresql")
    p.add_argument("--streams", type=int, default=1000)
    p.add_argument("--per-conn", type=int, default=50, help="streams per HTTP/2 connection (default 50)")
    p.add_argument("--rounds", type=int, default=16, help="rounds of the large requests (default 16)")
    p.add_argument("--concurrency", type=int, default=8, help="client threads of the burst (default 8)")
    p.add_argument("--bursts", type=int, default=2, help="bursts, one after the other (default 2: is what stays a one-time cost?)")
    p.add_argument("--warm-streams", type=int, default=50,
                   help="streams of the warm-up before 'idle, warm' (default 50; 0: no warm-up)")
    p.add_argument("--settle", type=float, default=10.0, help="seconds before the readings after (default 10)")
    p.add_argument("--subscribe-timeout", type=float, default=120.0)
    p.add_argument("--trim-after-streams", action="store_true",
                   help="also call malloc_trim(0) inside the server (gdb) after the streams closed, and read RSS again")
    p.add_argument("--env", action="append", help="NAME=VALUE for the server (repeatable), e.g. MALLOC_ARENA_MAX=2")
    p.add_argument("--trace", action="store_true",
                   help="diagnostic: the server traced by tracemalloc from its start (PYTHONTRACEMALLOC=8); at the end, "
                        "through gdb, the Python allocations still alive by where they were made, and pymalloc's arenas "
                        "(tracing slows the server and takes memory: its figures are not the table's)")
    p.add_argument("--results", default=str(BENCH / "results" / "memory.md"))
    args = p.parse_args(argv)
    command = "bench/memory.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    work = Path(tempfile.mkdtemp(prefix="nexus-memory-"))
    results = []
    try:
        for db in [d for d in args.db.split(",") if d]:
            results.append(run_db(db, args, work))
    finally:
        run_cleanups()
        shutil.rmtree(work, ignore_errors=True)
    md = markdown(results, args, command.strip(), started)
    Path(args.results).write_text(md)
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
