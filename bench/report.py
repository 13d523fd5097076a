"""Tables (plain text and markdown) and the PNG chart of bench/run's results."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

# Row label, loadgen RPC, kind of target, target ratio (None: no target set).
ROWS: tuple[tuple[str, str, float | None], ...] = (
    ("GetUser", "GetUser", 0.8),
    ("ListTasks (page 50 + filter)", "ListTasks", 0.7),
    ("CreateTask", "CreateTask", 0.7),
    ("UpdateTask (mask)", "UpdateTask", 0.7),
    ("SearchTasks", "SearchTasks", None),
    ("BatchCreateTasks (rows/s)", "BatchCreateTasks", 0.8),
)
RPC_LABEL = {rpc: label for label, rpc, _ in ROWS}
TARGET = {rpc: target for _, rpc, target in ROWS}


def _num(v: float | None, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:,.{digits}f}"


def _ms(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def throughput(r: dict[str, Any] | None) -> float | None:
    if not r:
        return None
    return r["items_per_s"] if r["rpc"] == "BatchCreateTasks" else r["rps"]


def ratio(project: dict[str, Any] | None, floor: dict[str, Any] | None) -> float | None:
    p, f = throughput(project), throughput(floor)
    if p is None or not f:
        return None
    return p / f


def verdict(rpc: str, r: float | None) -> str:
    target = TARGET.get(rpc)
    if target is None:
        return "no target"
    if r is None:
        return "n/a"
    return "PASS" if r >= target else "FALL SHORT"


def _errors(r: dict[str, Any] | None) -> str:
    if not r or not r.get("errors"):
        return ""
    return " (errors: " + ", ".join(f"{k} {v}" for k, v in r["errors"].items()) + ")"


def main_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = [
        "RPC", "project RPC/s", "floor RPC/s", "ratio", "target", "verdict",
        "project p50 / p99 ms", "floor p50 / p99 ms", "server CPU ms/call project / floor",
    ]
    with_db = any(r.get("db_cpu_ms_per_call") is not None for runs in results["runs"].values() for r in runs.values())
    if with_db:
        header.append("PostgreSQL CPU ms/call project / floor")
    rows = []
    for label, rpc, target in ROWS:
        runs = results["runs"].get(rpc)
        if not runs:
            continue
        p, f = runs.get("project"), runs.get("floor")
        r = ratio(p, f)
        digits = 0
        rows.append([
            label,
            _num(throughput(p), digits) + _errors(p),
            _num(throughput(f), digits) + _errors(f),
            f"{r:.2f}" if r is not None else "n/a",
            f">= {target:.1f}" if target is not None else "-",
            verdict(rpc, r),
            f"{_ms(p and p['p50_ms'])} / {_ms(p and p['p99_ms'])}",
            f"{_ms(f and f['p50_ms'])} / {_ms(f and f['p99_ms'])}",
            f"{_cpu(p)} / {_cpu(f)}",
        ] + ([f"{_cpu(p, 'db_cpu_ms_per_call')} / {_cpu(f, 'db_cpu_ms_per_call')}"] if with_db else []))
    return header, rows


def other_load(results: dict[str, Any]) -> float | None:
    """Mean CPU cores used by processes outside this benchmark during the measurements."""
    vals = [r["other_cores"] for runs in results.get("runs", {}).values() for r in runs.values() if "other_cores" in r]
    return sum(vals) / len(vals) if vals else None


def _cpu(r: dict[str, Any] | None, key: str = "server_cpu_ms_per_call") -> str:
    if not r or r.get(key) is None:
        return "n/a"
    v = r[key]
    return f"{v:.2f}" if v < 10 else f"{v:,.0f}"


def cores_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["RPC", "side", "server", "PostgreSQL", "loadgen", "others", "machine busy"]
    pg = any("db_connections_opened" in r for runs in results["runs"].values() for r in runs.values())
    if pg:
        header.append("PostgreSQL connections opened")
    rows = []
    for label, rpc, _ in ROWS:
        for side, r in (results["runs"].get(rpc) or {}).items():
            rows.append([label, side, f"{r.get('server_cores', 0):.2f}",
                         f"{r['db_cores']:.2f}" if "db_cores" in r else "-",
                         f"{r.get('loadgen_cores', 0):.2f}", f"{r.get('other_cores', 0):.2f}", f"{r.get('machine_busy_cores', 0):.2f}"]
                        + ([str(r.get("db_connections_opened", "n/a"))] if pg else []))
    return header, rows


def rss_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["server", "pid", "RSS idle MiB", "RSS after the run MiB", "peak (VmHWM) MiB"]
    rows = []
    for side in ("project", "floor"):
        m = results.get("rss", {}).get(side)
        if m:
            rows.append([side, str(m.get("pid", "")), _num(m.get("idle"), 1), _num(m.get("after"), 1), _num(m.get("peak"), 1)])
    return header, rows


def scale_rows(scale: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [
        "task rows", "GetTask p50 / p99 ms", "ListTasks page 1 p50 / p99 ms", "ListTasks page 20 p50 / p99 ms",
        "page 20, first walk ms", "total_size", "SQL alone: page 1 / page 20 / COUNT ms",
        "SearchTasks p50 / p99 ms", "SearchTasks total_size (min-max)",
    ]
    rows = []
    for s in scale:
        g, l1, l20, st = s.get("GetTask"), s.get("ListTasks"), s.get("ListTasksDeep"), s.get("SearchTasks")
        search_totals = sorted((st or {}).get("total_sizes", {}).values())
        sql = s.get("sql", {})
        rows.append([
            f"{s['rows']:,}",
            f"{_ms(g and g['p50_ms'])} / {_ms(g and g['p99_ms'])}" + _errors(g),
            f"{_ms(l1 and l1['p50_ms'])} / {_ms(l1 and l1['p99_ms'])}" + _errors(l1),
            f"{_ms(l20 and l20['p50_ms'])} / {_ms(l20 and l20['p99_ms'])}" + _errors(l20),
            _ms(l20 and l20.get("deep_last_page_ms")) + (f" (page {l20['deep_page']})" if l20 and l20.get("deep_page") != 20 else ""),
            _num(l20 and l20.get("total_size")),
            f"{_ms(sql.get('page1'))} / {_ms(sql.get('page20'))} / {_ms(sql.get('count'))}",
            f"{_ms(st and st['p50_ms'])} / {_ms(st and st['p99_ms'])}" + _errors(st),
            f"{search_totals[0]:,}-{search_totals[-1]:,}" if search_totals else "-",
        ])
    return header, rows


def render_text(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def render_md(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " if i == 0 else " ---: " for i in range(len(header))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def markdown(db: str, results: dict[str, Any], meta: dict[str, Any]) -> str:
    parts = [f"# bench/run: {db}", ""]
    parts += [
        f"- command: `{meta['command']}`",
        f"- date: {meta['date']}",
        f"- machine: {meta['nproc']} CPUs (`nproc`), {meta['cpu_model']}, {meta['mem']}; load average {meta['load_before']} before, {meta['load_after']} after this database's runs (the machine is shared)",
        f"- database: {results.get('db_version', db)}; {results.get('tasks', 0):,} tasks in the listed project, {results.get('users', 0):,} users",
        f"- load: {meta['concurrency']} calls in flight ({meta['batch_concurrency']} for BatchCreateTasks, {meta['batch_size']} rows per call), "
        f"{meta['warmup']} s warm-up + {meta['seconds']} s measured per RPC and server"
        + (f", best of {meta['rounds']} alternating rounds" if meta.get("rounds", 1) > 1 else "")
        + ", closed loop, one grpc.aio client process",
        "- project server: `nexus-data serve`" + (f" --workers {meta['workers']}" if meta.get("workers", 1) > 1 else "") + (f" from `{meta['project_src']}`" if meta.get("project_src") else "") + f", API key auth, DB_POOL_SIZE={meta['pool_size']}, DB_MAX_OVERFLOW={meta['max_overflow']}, "
        f"NEXUS_MAX_CONCURRENT_RPCS={meta['max_rpcs']}; floor: `bench/floor_server.py` with {meta['floor_threads']} database threads, "
        + ("`--bare`: its writes without the audit entry and the reference check the API requires"
           if meta.get("floor_bare") else "its writes with the service's statements, audit entry included (the API requires it in the write's transaction)"),
        f"- responses (and audit entries) of the two servers compared before the load: {results.get('verify', 'not checked')}",
        f"- wall time for this database: {results.get('wall_s', 0):.0f} s",
        "",
        "## Throughput and latency: project vs floor",
        "",
        render_md(*main_rows(results)),
        "",
        "ratio = project ÷ floor throughput (RPC/s; rows/s for BatchCreateTasks). Latency is per call, measured on the client. "
        "Server CPU ms/call = CPU time of the server process during the run ÷ calls (warm-up included)"
        + ("; PostgreSQL CPU ms/call = the same for the backends connected to the benchmark database "
           "(a backend that exits during the run is missed)" if "postgresql" in results.get("db", "") else "")
        + f". On average {other_load(results) or 0:.2f} of the {meta['nproc']} cores were busy with processes outside this benchmark "
        "during the measurements (other users of the machine).",
        "",
        "## CPU use during each measurement (cores, of " + str(meta["nproc"]) + ")",
        "",
        render_md(*cores_rows(results)),
        "",
        "server = the server process; PostgreSQL = backends of the benchmark database; loadgen = the client process; "
        "others = everything else on the machine (from /proc/stat). A Python server whose process stays near 1.0 core is "
        "bound by its GIL.",
        "",
        "## Memory (VmRSS of each server process)",
        "",
        render_md(*rss_rows(results)),
        "",
    ]
    if results.get("scale"):
        parts += [
            "## Scale: the project's server alone",
            "",
            f"All task rows are in the listed project (40 % `todo`); ListTasks filter `project_id = \"…\" AND status = TODO`, page_size 50. "
            f"{meta['scale_concurrency']} call(s) in flight, {meta['scale_seconds']} s per measurement. "
            "Page 20 = the request for the 20th page (its page token obtained by following next_page_token from page 1), repeated. "
            "'SQL alone' is the service's page and COUNT statements run directly on the database (median of 3), without gRPC or Python.",
            "",
            render_md(*scale_rows(results["scale"])),
            "",
        ]
    if results.get("profile"):
        parts += ["## Where the project's server spends its time (py-spy, GIL holder samples)", ""]
        for rpc, prof in results["profile"].items():
            parts += [f"### {rpc}", "", prof, ""]
    return "\n".join(parts)


def chart(db: str, results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_call = [(label, rpc) for label, rpc, _ in ROWS if rpc != "BatchCreateTasks" and rpc in results["runs"]]
    batch = "BatchCreateTasks" in results["runs"]
    fig, axes = plt.subplots(1, 2 if batch else 1, figsize=(12, 5), gridspec_kw={"width_ratios": [5, 1]} if batch else None,
                             squeeze=False)
    ax = axes[0][0]

    def bars(ax: Any, items: list[tuple[str, str]], ylabel: str) -> None:
        xs = range(len(items))
        w = 0.38
        proj = [throughput(results["runs"][rpc].get("project")) or 0 for _, rpc in items]
        flo = [throughput(results["runs"][rpc].get("floor")) or 0 for _, rpc in items]
        ax.bar([x - w / 2 for x in xs], proj, w, label="project (nexus-data serve)", color="#3b75af")
        ax.bar([x + w / 2 for x in xs], flo, w, label="floor (raw driver)", color="#c9c9c9", edgecolor="#777")
        top = max(proj + flo + [1])
        for x, (_, rpc), p, f in zip(xs, items, proj, flo, strict=True):
            r = ratio(results["runs"][rpc].get("project"), results["runs"][rpc].get("floor"))
            if r is None:
                continue
            v = verdict(rpc, r)
            color = {"PASS": "#2a7d2a", "FALL SHORT": "#b22222"}.get(v, "#333")
            target = TARGET.get(rpc)
            text = f"{r:.2f}x" + (f"\n(≥{target:.1f})" if target else "")
            ax.text(x, max(p, f) + top * 0.02, text, ha="center", va="bottom", fontsize=9, color=color, fontweight="bold")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([label.replace(" (", "\n(") for label, _ in items], fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, top * 1.22)
        ax.grid(axis="y", alpha=0.3)

    bars(ax, per_call, "RPC/s")
    ax.legend(loc="upper right", fontsize=8)
    if batch:
        bars(axes[0][1], [("BatchCreateTasks", "BatchCreateTasks")], "rows/s")
    fig.suptitle(f"nexus-data vs floor on {db}: throughput, ratio project/floor (target)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
