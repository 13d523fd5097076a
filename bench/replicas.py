#!/usr/bin/env python3
"""Events across replicas: writes on replica A, subscribers on replica B (PostgreSQL).

    .venv/bin/python bench/replicas.py [--rates 100,1000] [--seconds 10] [--subscribers 4] [--local 1]

Two `nexus-data serve` processes (A and B) on one fresh PostgreSQL database (created for the
run, dropped after it). --subscribers StreamEvents streams on B and --local streams on A (the
same-replica reference) follow one channel, opened by a process of their own. The writer (this
process) sends CreateChatMessage to A open loop: message i leaves at t0 + i/rate whatever the
earlier calls do. For every (stream, message) it records the time from the write's
acknowledgement on A (its OK received by the writer) to the event's arrival at the subscriber,
and from the request's send to the arrival; and which messages each stream got (lost: an
acknowledged message a stream never got; duplicated: one it got twice; out of order: a
sequence that is not the previous + 1). One phase per rate, each --seconds long.

Bounded like bench/stream_fanout.py (whose process helpers it uses): phase timeouts, a watchdog,
processes and the database cleaned up on every exit path.
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
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.chat.v1 import chat_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stream_fanout import (  # noqa: E402
    NCPU,
    NEXUS_DATA,
    PG_ADMIN,
    RESULTS_DIR,
    ServerProcess,
    create_api_key,
    create_pg_database,
    free_port,
    loadavg,
    percentiles,
    register_cleanup,
    render_text,
    run_cleanups,
    wait_ready,
)

WARMUP, MEASURED = "w", "b"


# ======================================================================== subscriber process


def subscriber_main(targets: list[tuple[str, str]], channel_id: str, metadata: tuple[tuple[str, str], ...], warmed: Any, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    asyncio.run(_subscribers(targets, channel_id, metadata, warmed, conn))


class _Stream:
    def __init__(self, replica: str) -> None:
        self.replica = replica
        self.warm = False
        self.last_seq = 0
        self.out_of_order = 0
        self.error = ""
        # (phase, index) -> receive time_ns of the first delivery; duplicates counted
        self.got: dict[tuple[int, int], int] = {}
        self.duplicates = 0
        self.resumed = 0  # cut off as too slow (RESOURCE_EXHAUSTED) and resumed from its token


async def _subscribers(targets: list[tuple[str, str]], channel_id: str, metadata: tuple[tuple[str, str], ...], warmed: Any, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    streams = [_Stream(replica) for replica, _ in targets]
    channels = {address: grpc.aio.insecure_channel(address) for _, address in targets}
    stopping = False

    async def consume(j: int) -> None:
        st = streams[j]
        stub = chat_pb2_grpc.ChatServiceStub(channels[targets[j][1]])
        token = ""
        while True:  # a stream cut off as too slow resumes from its token, as a client does
            call = stub.StreamEvents(cpb.StreamEventsRequest(channel_ids=[channel_id], resume_token=token), metadata=metadata)
            try:
                async for event in call:
                    token = event.resume_token or token
                    handle(st, event)
                if not stopping:
                    st.error = "ENDED"
                return
            except asyncio.CancelledError:
                if not stopping:
                    raise
                return
            except grpc.aio.AioRpcError as exc:
                if stopping:
                    return
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and token:
                    st.resumed += 1
                    continue
                st.error = exc.code().name
                return

    def handle(st: _Stream, event: cpb.StreamEventsResponse) -> None:
        now = time.time_ns()
        if event.type != cpb.EVENT_TYPE_CREATED:
            return
        if st.last_seq and event.sequence != st.last_seq + 1:
            st.out_of_order += 1
        st.last_seq = event.sequence
        text = event.chat_message.content
        if text.startswith(MEASURED):
            _, phase, i, _ = text.split(" ", 3)
            key = (int(phase), int(i))
            if key in st.got:
                st.duplicates += 1
            else:
                st.got[key] = now
        elif not st.warm:
            st.warm = True
            warmed.value += 1

    tasks = [asyncio.create_task(consume(j)) for j in range(len(streams))]
    try:
        while True:
            command = await loop.run_in_executor(None, conn.recv)
            if command[0] == "stop":
                break
            _, phase, expected, drain_seconds = command
            want = set(expected)
            deadline = time.monotonic() + drain_seconds
            while time.monotonic() < deadline and not all(st.error or want <= {i for (p, i) in st.got if p == phase} for st in streams):  # noqa: ASYNC110 - a condition over every stream, until a deadline
                await asyncio.sleep(0.05)
            report = []
            for st in streams:
                mine = {i: t for (p, i), t in st.got.items() if p == phase}
                indices, times = array("q", mine), array("q", mine.values())
                report.append(
                    {
                        "replica": st.replica,
                        "indices": indices.tobytes(),
                        "times": times.tobytes(),
                        "duplicates": st.duplicates,
                        "out_of_order": st.out_of_order,
                        "error": st.error,
                        "resumed": st.resumed,
                    }
                )
                st.duplicates = st.out_of_order = st.resumed = 0
            conn.send(report)
    finally:
        stopping = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels.values():
            await channel.close()


# ======================================================================== one run


async def _recv(conn: Connection, timeout: float) -> Any:  # noqa: ASYNC109 - handed to Connection.poll in an executor thread
    ready = await asyncio.get_running_loop().run_in_executor(None, conn.poll, timeout)
    if not ready:
        raise TimeoutError("the subscriber process did not answer in time")
    return conn.recv()


def _ms(values: list[float]) -> dict[str, float]:
    p = percentiles(values)
    p["p95"] = sorted(values)[min(len(values) - 1, max(0, math.ceil(0.95 * len(values)) - 1))] if values else math.nan
    return p


async def run(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    pg_name = create_pg_database()
    url = f"postgresql+psycopg2://{PG_ADMIN['user']}@{PG_ADMIN['host']}:{PG_ADMIN['port']}/{pg_name}"
    ports = {"A": free_port(), "B": free_port()}
    servers: dict[str, ServerProcess] = {}
    for name in ("A", "B"):  # one after the other: A migrates the database, B finds it migrated
        env = dict(
            os.environ,
            DATABASE_URL=url,
            NEXUS_PORT=str(ports[name]),
            NEXUS_HOST="127.0.0.1",
            NEXUS_HASH_TIME_COST="1",
            NEXUS_HASH_MEMORY_KIB="1024",
            NEXUS_DRAIN_SECONDS="0",
            NEXUS_GRACE_SECONDS="2",
            NEXUS_MAX_CONCURRENT_RPCS="5000",
        )
        servers[name] = ServerProcess(f"replica {name}", [str(NEXUS_DATA), "serve"], env, work / f"replica-{name}.log")
        await wait_ready(f"127.0.0.1:{ports[name]}", servers[name], args.ready_timeout)
    print(f"    replicas ready: A pid {servers['A'].pid} :{ports['A']}, B pid {servers['B'].pid} :{ports['B']}", flush=True)
    secret = await asyncio.get_running_loop().run_in_executor(None, create_api_key, env)
    metadata = (("authorization", f"Bearer {secret}"),)
    results: list[dict[str, Any]] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports['A']}") as channel_a:
        chat = chat_pb2_grpc.ChatServiceStub(channel_a)
        channel_id = (await chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name="replicas bench")), metadata=metadata, timeout=30)).id
        targets = [("B", f"127.0.0.1:{ports['B']}")] * args.subscribers + [("A", f"127.0.0.1:{ports['A']}")] * args.local
        ctx = mp.get_context("spawn")
        warmed = ctx.Value("i", 0, lock=False)
        parent_end, child_end = ctx.Pipe()
        proc = ctx.Process(target=subscriber_main, args=(targets, channel_id, metadata, warmed, child_end), daemon=True)
        proc.start()
        child_end.close()

        def stop_subscribers() -> None:
            if proc.is_alive():
                proc.terminate()
            proc.join(5)

        register_cleanup("subscriber process", stop_subscribers)
        t_sub, k = time.monotonic(), 0
        while warmed.value < len(targets):
            if time.monotonic() - t_sub > args.ready_timeout:
                raise TimeoutError(f"only {warmed.value}/{len(targets)} streams subscribed")
            if not proc.is_alive():
                raise RuntimeError("the subscriber process died")
            await chat.CreateChatMessage(
                cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel_id, content=f"{WARMUP} {k}")), metadata=metadata, timeout=30
            )
            k += 1
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)

        pad = "x" * 60
        for phase, rate in enumerate(args.rates):
            total = max(1, round(rate * args.seconds))
            sent_ns = array("q", [0] * total)
            acked_ns = array("q", [0] * total)
            failures: Counter[str] = Counter()

            async def send(i: int, phase: int = phase) -> None:
                sent_ns[i] = sent = time.time_ns()  # noqa: B023 - the phase's arrays, awaited within it
                request = cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel_id, content=f"{MEASURED} {phase} {i} {pad}"))
                try:
                    await chat.CreateChatMessage(request, metadata=metadata, timeout=args.write_timeout)
                except grpc.aio.AioRpcError as exc:
                    failures[exc.code().name] += 1  # noqa: B023
                    return
                acked_ns[i] = time.time_ns()  # noqa: B023
                assert sent

            load = loadavg()
            print(f"    phase {phase}: {rate:g} writes/s on A for {args.seconds:g}s (load {load})", flush=True)
            t0 = time.monotonic()
            tasks = []
            for i in range(total):
                delay = t0 + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(send(i)))
            write_seconds = time.monotonic() - t0
            await asyncio.gather(*tasks)
            acked = [i for i in range(total) if acked_ns[i]]
            parent_end.send(("finish", phase, acked, args.drain_timeout))
            report = await _recv(parent_end, args.drain_timeout + 30)
            acked_set = set(acked)
            for replica in ("B", "A"):
                rows = [r for r in report if r["replica"] == replica]
                if not rows:
                    continue
                from_ack: list[float] = []
                from_send: list[float] = []
                lost = extra = dup = ooo = resumed = 0
                errors: Counter[str] = Counter()
                for r in rows:
                    indices, times = array("q"), array("q")
                    indices.frombytes(r["indices"])
                    times.frombytes(r["times"])
                    got = dict(zip(indices, times, strict=True))
                    lost += len(acked_set - got.keys())
                    extra += len(got.keys() - acked_set)
                    dup += r["duplicates"]
                    ooo += r["out_of_order"]
                    resumed += r["resumed"]
                    if r["error"]:
                        errors[r["error"]] += 1
                    for i in acked:
                        if i in got:
                            from_ack.append((got[i] - acked_ns[i]) / 1e6)
                            from_send.append((got[i] - sent_ns[i]) / 1e6)
                write_ms = [(acked_ns[i] - sent_ns[i]) / 1e6 for i in acked]
                span = (max(acked_ns) - sent_ns[0]) / 1e9 if acked else math.nan
                results.append(
                    {
                        "rate": rate,
                        "replica": replica,
                        "streams": len(rows),
                        "load": load,
                        "write_seconds": write_seconds,
                        "written": len(acked),
                        "acked_per_s": len(acked) / span if span > 0 else math.nan,
                        "failed": dict(failures),
                        "from_ack": _ms(from_ack),
                        "from_send": _ms(from_send),
                        "write": _ms(write_ms),
                        "lost": lost,
                        "extra": extra,
                        "duplicated": dup,
                        "out_of_order": ooo,
                        "resumed": resumed,
                        "errors": dict(errors),
                    }
                )
        parent_end.send(("stop",))
        proc.join(10)
    return results


# ======================================================================== report


def build_rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "writes/s on A",
        "streams on",
        "written (failed)",
        "acked writes/s",
        "ack->arrival p50 / p95 / p99 / max (ms)",
        "send->arrival p50 / p95 / p99 / max (ms)",
        "write RPC p50 / p99 (ms)",
        "lost / duplicated / out of order (streams resumed)",
        "load at start",
    ]

    def q(p: dict[str, float]) -> str:
        return " / ".join("n/a" if math.isnan(p[k]) else f"{p[k]:.1f}" for k in ("p50", "p95", "p99", "max"))

    rows = []
    for r in results:
        failed = sum(r["failed"].values())
        errs = f" (stream errors {r['errors']})" if r["errors"] else ""
        rows.append(
            [
                f"{r['rate']:g} (sent in {r['write_seconds']:.1f}s)",
                f"{'B (other replica)' if r['replica'] == 'B' else 'A (same replica)'} x{r['streams']}",
                f"{r['written']:,} ({failed})",
                f"{r['acked_per_s']:.0f}",
                q(r["from_ack"]),
                q(r["from_send"]),
                f"{r['write']['p50']:.1f} / {r['write']['p99']:.1f}",
                f"{r['lost']} / {r['duplicated']} / {r['out_of_order']} ({r['resumed']}){errs}",
                r["load"],
            ]
        )
    return header, rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="100,1000", help="writes per second on A, one phase each (comma-separated)")
    ap.add_argument("--seconds", type=float, default=10.0, help="how long each phase writes")
    ap.add_argument("--subscribers", type=int, default=4, help="StreamEvents streams on replica B")
    ap.add_argument("--local", type=int, default=1, help="streams on replica A itself (the same-replica reference; 0: none)")
    ap.add_argument("--write-timeout", type=float, default=20.0)
    ap.add_argument("--ready-timeout", type=float, default=60.0)
    ap.add_argument("--drain-timeout", type=float, default=30.0)
    ap.add_argument("--results", help="markdown file to write (default bench/results/replicas.md)")
    args = ap.parse_args(argv)
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not args.rates or min(args.rates) <= 0 or args.seconds <= 0 or args.subscribers < 1 or args.local < 0:
        ap.error("rates and seconds must be positive, and at least one subscriber on B")
    args.max_runtime = 120 + len(args.rates) * (args.seconds + args.write_timeout + args.drain_timeout + 30)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    meta = {
        "command": " ".join([".venv/bin/python", "bench/replicas.py", *(sys.argv[1:] if argv is None else argv)]),
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load": loadavg(),
    }
    work = Path(tempfile.mkdtemp(prefix="nexus-replicas-"))
    register_cleanup("temp dir", lambda: shutil.rmtree(work, ignore_errors=True))

    def watchdog() -> None:
        print(f"\nwatchdog: still running after {args.max_runtime:.0f}s; stopping everything", file=sys.stderr, flush=True)
        run_cleanups()
        os._exit(3)

    timer = threading.Timer(args.max_runtime, watchdog)
    timer.daemon = True
    timer.start()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        print(f"two replicas on one PostgreSQL database; {args.subscribers} stream(s) on B, {args.local} on A", flush=True)
        results = asyncio.run(run(args, work))
        header, rows = build_rows(results)
        print()
        print(render_text(header, rows))
        out = Path(args.results) if args.results else RESULTS_DIR / "replicas.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            "# Events across replicas: writes on A, streams on B (PostgreSQL)",
            "",
            f"Command: `{meta['command']}`  ",
            f"Run at {meta['when']} on {NCPU} cores (load average before the run: {meta['load']}); wall time {time.monotonic() - started:.0f} s.  ",
            "ack->arrival: the event's arrival at a stream minus the writer's receipt of the write's OK from A; "
            "send->arrival: minus the request's send. Negative: the event reached B before A's answer reached the writer.",
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
            *("| " + " | ".join(rows_i) + " |" for rows_i in rows),
            "",
            "Method: see bench/README.md.",
            "",
        ]
        out.write_text("\n".join(lines))
        print(f"\nwritten to {out}")
        return 1 if any(r["lost"] or r["duplicated"] or r["out_of_order"] for r in results) else 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one line, then cleanup
        print(f"\nbenchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        run_cleanups()
        timer.cancel()


if __name__ == "__main__":
    sys.exit(main())
