#!/usr/bin/env python3
"""Cores: `nexus-data serve --workers N` throughput and where its CPU goes, for N = 1, 2, ...

    .venv/bin/python bench/cores.py                                   # PostgreSQL, N = 1,2, ~4 min
    .venv/bin/python bench/cores.py --workers 1,2 --rpcs GetUser,CreateTask --seconds 8 --rounds 2

For each N, one `bench/run --db postgresql --workers N --rpcs ... --scale none` (bench/rpc_bench.py,
the same database, seed, floor and load generator as every other figure of bench/run), the load
generator on the same number of connections for every N (--channels, default 8: SO_REUSEPORT
spreads connections, not calls, so N = 2 needs several), then from its JSON: throughput, p50, and
the CPU split per call: the server's process tree, the PostgreSQL backends of the benchmark
database, PostgreSQL's background processes (WAL writer, checkpointer, ...), every process named
postgres (other databases' included: an upper bound on a shared machine), the load generator, and
the whole machine (/proc/stat). Prints the table and writes bench/results/cores.md, with the
model of bench/README.md's "Cores" section computed from the measured CPU per call.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

import report  # noqa: E402

# Connections one `serve` process may hold on PostgreSQL (db/database.py): the write pool
# (DB_POOL_SIZE + DB_MAX_OVERFLOW, default 10 + 0) and the read pool (one per database thread,
# as many threads as write connections, + 2).
POOL = 10


def connections_per_process(pool: int = POOL) -> int:
    return pool + pool + 2


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_one(workers: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(BENCH / "rpc_bench.py"), "--db", args.db, "--workers", str(workers), "--rpcs", args.rpcs,
           "--scale", "none", "--seconds", str(args.seconds), "--rounds", str(args.rounds), "--channels", str(args.channels),
           "--results", str(out)]
    log(f"workers {workers}: {' '.join(['bench/run', *cmd[2:-2]])} (load {loadavg()})")
    subprocess.run(cmd, check=True)
    return json.loads((out / f"{args.db}.json").read_text())


def per_call(r: dict[str, Any], key: str) -> float | None:
    v = r.get(key)
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def rows_of(workers: int, data: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for rpc, sides in data["results"]["runs"].items():
        for side in ("project", "floor"):
            r = sides.get(side)
            if not r:
                continue
            out.append({
                "rpc": rpc, "side": side, "workers": workers if side == "project" else 1,
                "rps": report.throughput(r), "p50": r.get("p50_ms"), "p99": r.get("p99_ms"),
                "server": per_call(r, "server_cpu_ms_per_call"), "pg": per_call(r, "db_cpu_ms_per_call"),
                "pg_bg": per_call(r, "db_background_cpu_ms_per_call"), "pg_all": per_call(r, "postgres_all_cpu_ms_per_call"),
                "loadgen": per_call(r, "loadgen_cpu_ms_per_call"), "machine": per_call(r, "machine_cpu_ms_per_call"),
                "server_cores": r.get("server_cores"), "pg_cores": r.get("db_cores"), "loadgen_cores": r.get("loadgen_cores"),
                "other_cores": r.get("other_cores"), "wal_bytes": per_call(r, "wal_bytes_per_call"),
                "wal_syncs": per_call(r, "wal_syncs_per_call"),
                "load": data["meta"]["load_before"],
            })
    return out


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| RPC | server | workers | RPC/s | p50 / p99 ms | server CPU ms/call | PostgreSQL backends ms/call "
        "| PostgreSQL background ms/call | every postgres process ms/call | load generator ms/call | whole machine ms/call "
        "| WAL bytes/call, calls per WAL sync | cores: server / PostgreSQL / load generator / others | load before |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        cores = " / ".join(_f(r[k]) for k in ("server_cores", "pg_cores", "loadgen_cores", "other_cores"))
        wal = "-"
        if r["wal_bytes"] is not None and r["wal_bytes"] >= 1:
            per_sync = f"{1 / r['wal_syncs']:.1f}" if r["wal_syncs"] else "-"
            wal = f"{r['wal_bytes']:,.0f}, {per_sync}"
        lines.append(
            f"| {r['rpc']} | {'serve' if r['side'] == 'project' else 'floor'} | {r['workers']} | {_f(r['rps'], 0)} "
            f"| {_f(r['p50'], 1)} / {_f(r['p99'], 1)} | {_f(r['server'])} | {_f(r['pg'])} | {_f(r['pg_bg'], 3)} "
            f"| {_f(r['pg_all'])} | {_f(r['loadgen'])} | {_f(r['machine'])} | {wal} | {cores} | {r['load']} |")
    return lines


def model(rows: list[dict[str, Any]], cores_list: tuple[int, ...] = (8, 32)) -> list[str]:
    """Throughput on C cores from the CPU per call measured with one worker: the server's work
    spread over worker processes (each bound by its GIL at about one core), PostgreSQL's on the
    rest, the clients on other machines."""
    lines = [
        "| RPC | cores | server ms/call (S) | PostgreSQL ms/call (P) | workers W = C·S/(S+P) | PostgreSQL's cores C·P/(S+P) "
        "| RPC/s = C/(S+P) | RPC/s per worker | PostgreSQL connections (W × 22, pool 10) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["side"] != "project" or r["workers"] != 1 or r["server"] is None or r["pg"] is None:
            continue
        s, p = r["server"], r["pg"] + (r["pg_bg"] or 0.0)
        for c in cores_list:
            w = c * s / (s + p)
            rps = c * 1000 / (s + p)
            lines.append(f"| {r['rpc']} | {c} | {s:.2f} | {p:.2f} | {w:.1f} → {math.ceil(w)} | {c * p / (s + p):.1f} "
                         f"| {rps:,.0f} | {rps / math.ceil(w):,.0f} | {math.ceil(w) * connections_per_process():,} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="postgresql", choices=("postgresql", "sqlite"))
    p.add_argument("--workers", default="1,2", help="values of serve --workers (default 1,2)")
    p.add_argument("--rpcs", default="GetUser,CreateTask")
    p.add_argument("--seconds", type=float, default=8.0, help="measured seconds per RPC and server (default 8)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--channels", type=int, default=8, help="load generator connections for every N (default 8)")
    p.add_argument("--results", default=str(RESULTS / "cores.md"))
    args = p.parse_args(argv)
    command = "bench/cores.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started, load = dt.datetime.now(dt.UTC), loadavg()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nexus-cores-") as tmp:
        for n in [int(x) for x in args.workers.split(",")]:
            out = Path(tmp) / f"w{n}"
            out.mkdir()
            data = run_one(n, args, out)
            rows += [r for r in rows_of(n, data) if r["side"] == "project" or n == 1]
    rows.sort(key=lambda r: (r["rpc"], r["side"] != "project", r["workers"]))
    text = [
        f"# Cores: `serve --workers N` on {args.db} ({started.strftime('%Y-%m-%d %H:%M UTC')})",
        "",
        f"- command: `{command.strip()}`; load average {load} at the start, {loadavg()} at the end",
        f"- machine: {os.cpu_count()} CPUs, shared with other work; the load generator and PostgreSQL on the same cores",
        f"- load: {args.channels} connections, 32 calls in flight, {args.seconds:g} s measured per RPC and server "
        f"(best of {args.rounds}); the floor (bench/floor_server.py) measured in the N = 1 run",
        "",
        *table(rows),
        "",
        "CPU ms/call: CPU seconds during the run (warm-up included) ÷ calls. PostgreSQL backends: those of the benchmark "
        "database; background: the processes of no database (WAL writer, checkpointer, background writer, autovacuum "
        "launcher), shared with every other database of the server; every postgres process: all of them on the machine, "
        "other users' included (an upper bound). WAL: pg_stat_wal's bytes and syncs of the whole server during the run "
        "÷ calls (other databases' writes included); calls per WAL sync > 1 is group commit. cores: CPU seconds ÷ wall seconds.",
        "",
        "## Model: C cores, clients elsewhere, from the N = 1 CPU per call",
        "",
        *model(rows),
        "",
        "S and P are the CPU per call measured above (P = backends + background). Assumes CPU per call stays what it is "
        "at N = 1 (no lock, connection or fsync limit reached) and each worker stays under one core (its GIL). "
        "See bench/README.md, section Cores, for where this stops holding.",
        "",
    ]
    md = "\n".join(text)
    Path(args.results).write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
