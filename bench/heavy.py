#!/usr/bin/env python3
"""The heavy paths in one table: knowledge upserts, AI interactions and their usage summary, file
transfer, each against its floor and its target.

    bench/run --heavy                 # after the RPC tables
    bench/run --only-heavy [--db postgresql]
    .venv/bin/python bench/heavy.py [--db sqlite,postgresql] [--parse-only]

Runs bench/knowledge_upsert.py, bench/file_transfer.py and bench/ai_usage.py one after the other
with the short settings below (each its own process and process group, stopped on every exit path), then
reads the tables they wrote to bench/results/{knowledge_upsert,file_transfer,ai_usage}.md and
writes bench/results/heavy.md and heavy.png: each path's service / floor ratio (MB/s for the
file transfer), GetAIUsageSummary's p50 at 1,000,000 interactions, their targets, and the paths
that have no service yet. --parse-only skips the runs and builds the table from the files as they
are.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
PYTHON = sys.executable

RATIO_TARGET = 0.8
SUMMARY_TARGET_MS = 200.0
SUMMARY_ROWS = 1_000_000

# The short settings: the whole step in about 6-8 minutes on a 2-core machine (the 1,000,000-row
# load of ai_usage.py is most of it). Each entry: (name, script, arguments, time limit in seconds).
STEPS: tuple[tuple[str, str, list[str], float], ...] = (
    ("knowledge upserts", "knowledge_upsert.py", ["--rows", "10000", "--batch", "5000", "--rounds", "2"], 300),
    ("file transfer", "file_transfer.py", ["--mib", "64", "--rounds", "3"], 200),
    ("AI usage", "ai_usage.py", ["--rows", "5000", "--batch", "5000", "--rounds", "2", "--calls", "10", "--ranges", "30"], 480),
)

NOT_BUILT = (
    ("PostTransaction", "no such RPC in protos/ yet: not built"),
    ("BatchCreateAnalyticsEvents", "no such RPC in protos/ yet: not built"),
    ("Export / Import", "no such RPCs in protos/ yet: not built"),
)


def time_limit() -> float:
    """The heavy step's share of bench/run's watchdog: every step's limit, and a minute."""
    return sum(limit for *_, limit in STEPS) + 60


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def _print(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ======================================================================== running the three benchmarks


def run_steps(dbs: list[str], on_exit: Callable[[str, Callable[[], None]], Any], cleanup: Callable[[Any], None],
              log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Run each benchmark; returns, per script, its load at the start, wall time and exit code."""
    out: dict[str, dict[str, Any]] = {}
    for name, script, argv, limit in STEPS:
        cmd = [PYTHON, str(BENCH / script), "--db", ",".join(dbs), *argv]
        load, t0 = loadavg(), time.monotonic()
        log(f"heavy: {name}: bench/{script} {' '.join(cmd[2:])} (load {load}, limit {limit:.0f} s)")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)

        def kill(proc: subprocess.Popen[str] = proc) -> None:
            if proc.poll() is None:
                # SIGINT: the benchmark's finally blocks stop its servers (process groups of their own)
                # and drop its database; what is still there after 30 s is killed.
                from rpc_bench import process_tree  # rpc_bench imports this module

                tree = process_tree(proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(30)
                for pid in tree:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.wait(5)

        on_exit(f"heavy {script}", kill)
        timer = None
        try:
            import threading

            timer = threading.Timer(limit, kill)
            timer.daemon = True
            timer.start()
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip()
                if line.startswith("[") or "error" in line.lower() or "Traceback" in line:
                    print(f"    {line}", flush=True)
            proc.wait()
        finally:
            if timer is not None:
                timer.cancel()
            cleanup(kill)
        wall = time.monotonic() - t0
        # file_transfer.py exits 1 when its target is missed: a result, not a failure.
        ok = proc.returncode in (0, 1)
        log(f"heavy: {name}: {'done' if ok else f'FAILED (exit {proc.returncode})'} in {wall:.0f} s")
        out[script] = {"load": load, "wall": wall, "code": proc.returncode, "command": " ".join(["bench/" + script, *cmd[2:]])}
    return out


# ======================================================================== reading their tables


def md_tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """The markdown tables of a text: (header, rows), cells stripped."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|?\s*$", lines[i + 1]):
            header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            tables.append((header, rows))
        else:
            i += 1
    return tables


def num(cell: str) -> float | None:
    m = re.search(r"-?[\d,]*\.?\d+", cell.replace("*", ""))
    return float(m.group(0).replace(",", "")) if m else None


def col(header: list[str], *needles: str, exclude: str = "") -> int | None:
    """The first column whose name contains every needle (case-insensitive), and not `exclude`."""
    for i, h in enumerate(header):
        low = h.lower()
        if all(n in low for n in needles) and not (exclude and exclude in low):
            return i
    return None


def cols(header: list[str], *specs: tuple[str, ...] | str) -> list[int] | None:
    """The columns of every spec (a needle, or needles and then an exclusion after "!"), or None
    when one is missing."""
    out = []
    for spec in specs:
        needles = (spec,) if isinstance(spec, str) else spec
        exclude = next((n[1:] for n in needles if n.startswith("!")), "")
        i = col(header, *(n for n in needles if not n.startswith("!")), exclude=exclude)
        if i is None:
            return None
        out.append(i)
    return out


def _read(name: str) -> tuple[str, str]:
    path = RESULTS / name
    if not path.exists():
        return "", ""
    text = path.read_text()
    load = re.search(r"load ([\d.]+ [\d.]+ [\d.]+)", text.splitlines()[0] if text else "")
    return text, load.group(1) if load else ""


def collect(meta: dict[str, dict[str, Any]] | None = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(ratio rows, summary rows) from the benchmarks' result files."""
    meta = meta or {}
    ratios: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []

    def load_of(script: str, from_file: str) -> str:
        return meta.get(script, {}).get("load") or from_file

    text, fload = _read("knowledge_upsert.md")
    for header, rows in md_tables(text):
        found = cols(header, "database", "phase", "service rows/s", ("floor rows/s", "!bare"))
        if found is None:
            continue
        db, phase, svc, flo = found
        for r in rows:
            service, floor = num(r[svc]), num(r[flo])
            pg = r[db] == "postgresql"
            ratios.append({"path": f"BatchUpsertKnowledgeChunks, {r[phase]}", "db": r[db], "unit": "rows/s",
                           "service": service, "floor": floor, "target": RATIO_TARGET if pg else None,
                           "note": "" if pg else "no target on SQLite (bench/README)", "load": load_of("knowledge_upsert.py", fload)})
    text, fload = _read("ai_usage.md")
    for header, rows in md_tables(text):
        p50 = col(header, "p50", exclude="floor")
        if p50 is not None:
            grouping = col(header, "group_by")
            grouping = 0 if grouping is None else grouping
            size = col(header, "rows") if col(header, "rows") is not None else col(header, "interactions")
            p95 = col(header, "p95", exclude="floor")
            days = col(header, "range")
            floor_p50 = col(header, "floor p50")
            for r in rows:
                if size is not None and num(r[size]) not in (None, float(SUMMARY_ROWS)):
                    continue
                label = r[grouping] + (f", last {r[days]} days" if days is not None else "")
                summary.append({"grouping": label, "p50": num(r[p50]), "p95": num(r[p95]) if p95 is not None else None,
                                "floor_p50": num(r[floor_p50]) if floor_p50 is not None else None,
                                "load": load_of("ai_usage.py", fload)})
            continue
        found = cols(header, "database", "service rows/s", "floor rows/s")
        if found is None or col(header, "phase") is not None:
            continue
        db, svc, flo = found
        for r in rows:
            ratios.append({"path": "BatchCreateAIInteractions", "db": r[db], "unit": "rows/s", "service": num(r[svc]),
                           "floor": num(r[flo]), "target": RATIO_TARGET, "note": "", "load": load_of("ai_usage.py", fload)})
    text, fload = _read("file_transfer.md")
    for header, rows in md_tables(text):
        found = cols(header, "database", "direction", "service mb/s", ("floor mb/s", "!sha256"))
        if found is None:
            continue
        db, way, svc, flo = found
        hashed = col(header, "floor+sha256 mb/s")
        for r in rows:
            note = ""
            if hashed is not None and (h := num(r[hashed])) and (s := num(r[svc])):
                note = f"÷ floor+sha256 ({h:,.0f} MB/s): {s / h:.2f}"
            ratios.append({"path": "UploadFile" if r[way] == "upload" else "DownloadFile", "db": r[db], "unit": "MB/s",
                           "service": num(r[svc]), "floor": num(r[flo]), "target": RATIO_TARGET, "note": note,
                           "load": load_of("file_transfer.py", fload)})
    return ratios, summary


# ======================================================================== the table and the chart


def _verdict(ok: bool | None) -> str:
    return "no target" if ok is None else "PASS" if ok else "FALL SHORT"


def markdown(ratios: list[dict[str, Any]], summary: list[dict[str, Any]], meta: dict[str, dict[str, Any]], command: str) -> str:
    lines = [
        "# Heavy paths: service vs floor, and their targets",
        "",
        f"- command: `{command}`",
        f"- date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}; machine: {os.cpu_count()} CPUs, shared with other work",
    ]
    for m in meta.values():
        lines.append(f"- `{m['command']}`: load {m['load']} at its start, {m['wall']:.0f} s, exit {m['code']}")
    lines += [
        "",
        "| path | database | service | floor | service / floor | target | verdict | load at start | note |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in ratios:
        ratio = r["service"] / r["floor"] if r["service"] and r["floor"] else None
        ok = None if r["target"] is None or ratio is None else ratio >= r["target"]
        shown = "-" if ratio is None else f"{ratio:.2f}"
        target = "-" if r["target"] is None else f">= {r['target']:.1f}"
        lines.append(f"| {r['path']} | {r['db']} | {r['service']:,.0f} {r['unit']} | {r['floor']:,.0f} {r['unit']} | "
                     f"{shown} | {target} | {_verdict(ok)} | {r['load']} | {r['note']} |")
    for r in summary:
        p95 = f", p95 {r['p95']:,.0f} ms" if r["p95"] is not None else ""
        floor = "-" if r.get("floor_p50") is None else f"p50 {r['floor_p50']:,.0f} ms"
        note = "floor: the exact summary in one SQL statement (percentile_disc)" if r.get("floor_p50") is not None else ""
        lines.append(f"| GetAIUsageSummary, group_by {r['grouping']} | postgresql, {SUMMARY_ROWS:,} interactions | "
                     f"p50 {r['p50']:,.0f} ms{p95} | {floor} | - | p50 < {SUMMARY_TARGET_MS:.0f} ms | "
                     f"{_verdict(r['p50'] < SUMMARY_TARGET_MS)} | {r['load']} | {note} |")
    for path, why in NOT_BUILT:
        lines.append(f"| {path} | - | not measured | - | - | - | - | - | {why} |")
    lines += [
        "",
        "service / floor: rows per second (MB/s for UploadFile and DownloadFile) of the service over its floor's, "
        "best round of each side, measured back to back in the same run; the floors are described in bench/README.md "
        "under each benchmark. GetAIUsageSummary: the client's latency over the whole 30-day range, first page.",
        "",
    ]
    return "\n".join(lines)


def chart(ratios: list[dict[str, Any]], summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    items = [r for r in ratios if r["service"] and r["floor"]]
    labels = [f"{r['path']}\n{r['db']}" for r in items]
    values = [r["service"] / r["floor"] for r in items]
    colors = ["#888" if r["target"] is None else "#2a7d2a" if v >= r["target"] else "#b22222" for r, v in zip(items, values, strict=True)]
    ys = list(range(len(items)))[::-1]
    ax.barh(ys, values, color=colors)
    for y, v in zip(ys, values, strict=True):
        ax.text(v + 0.01, y, f"{v:.2f}", va="center", fontsize=8)
    ax.axvline(RATIO_TARGET, color="#333", linestyle="--", linewidth=1)
    ax.text(RATIO_TARGET, len(items) - 0.4, f" target {RATIO_TARGET}", fontsize=8)
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    ax.set_xlabel("service / floor (rows/s; MB/s for files)")
    ax.set_title("Heavy writes and file transfer vs their floors", fontsize=10)
    ax = axes[1]
    if summary:
        names = [r["grouping"] for r in summary]
        p50 = [r["p50"] for r in summary]
        ax.bar(range(len(names)), p50, color=["#2a7d2a" if v < SUMMARY_TARGET_MS else "#b22222" for v in p50])
        for x, v in enumerate(p50):
            ax.text(x, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        ax.axhline(SUMMARY_TARGET_MS, color="#333", linestyle="--", linewidth=1)
        ax.text(-0.4, SUMMARY_TARGET_MS, f"target p50 < {SUMMARY_TARGET_MS:.0f} ms", fontsize=8, va="bottom")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace(", ", ",\n") for n in names], fontsize=7)
    ax.set_ylabel("p50 ms")
    ax.set_title(f"GetAIUsageSummary, PostgreSQL, {SUMMARY_ROWS:,} interactions", fontsize=10)
    fig.text(0.01, 0.01, "not measured (no service yet): " + ", ".join(p for p, _ in NOT_BUILT), fontsize=8, color="#555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render_text(ratios: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
    out = ["== heavy paths =="]
    for r in ratios:
        ratio = r["service"] / r["floor"] if r["service"] and r["floor"] else float("nan")
        target = "-" if r["target"] is None else f">= {r['target']}"
        out.append(f"{r['path']:<40} {r['db']:<11} {r['service']:>9,.0f} / {r['floor']:>9,.0f} {r['unit']:<6} = {ratio:5.2f}  target {target}")
    for r in summary:
        out.append(f"{'GetAIUsageSummary ' + r['grouping']:<40} postgresql  p50 {r['p50']:>6,.0f} ms  target < {SUMMARY_TARGET_MS:.0f} ms")
    for path, why in NOT_BUILT:
        out.append(f"{path:<40} not measured: {why}")
    return "\n".join(out)


def write(results_dir: Path, meta: dict[str, dict[str, Any]], command: str, log: Callable[[str], None]) -> str:
    ratios, summary = collect(meta)
    (results_dir / "heavy.md").write_text(markdown(ratios, summary, meta, command))
    try:
        chart(ratios, summary, results_dir / "heavy.png")
    except ImportError:
        log("heavy: matplotlib missing: no chart (bench/run installs it)")
    log(f"heavy: wrote {results_dir / 'heavy.md'} and heavy.png")
    return render_text(ratios, summary)


def run(dbs: list[str], results_dir: Path, on_exit: Callable[[str, Callable[[], None]], Any],
        cleanup: Callable[[Any], None], log: Callable[[str], None], command: str = "") -> str:
    meta = run_steps(dbs, on_exit, cleanup, log)
    return write(results_dir, meta, command or "bench/run --heavy", log)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", default="sqlite,postgresql")
    p.add_argument("--parse-only", action="store_true", help="build heavy.md / heavy.png from the result files as they are")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    command = "bench/heavy.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.parse_only:
        print(write(Path(args.results), {}, command.strip(), _print))
        return 0
    cleanups: list[Callable[[], None]] = []

    def on_exit(name: str, fn: Callable[[], None]) -> Callable[[], None]:
        cleanups.append(fn)
        return fn

    def cleanup(fn: Any) -> None:
        if fn in cleanups:
            cleanups.remove(fn)
            fn()

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        print(run([d for d in args.db.split(",") if d], Path(args.results), on_exit, cleanup, _print, command.strip()))
    except KeyboardInterrupt:
        for fn in reversed(cleanups):
            fn()
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
