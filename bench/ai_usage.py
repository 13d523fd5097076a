"""BatchCreateAIInteractions against a raw-SQL floor, and GetAIUsageSummary over 1,000,000 interactions.

    .venv/bin/python bench/ai_usage.py [--db postgresql,sqlite] [--rows 20000] [--batch 5000] [--rounds 3]
                                       [--summary-rows 1000000] [--calls 20] [--skip-summary] [--ranges 1,7,30]

For each database: a fresh one (PostgreSQL: created on `postgres` and dropped afterwards;
SQLite: a temporary file), `nexus-data migrate`, an admin key, `nexus-data serve`, 20 users made
through the API. Interactions are a service's records: a prompt of 12 words and a response of
30, token counts, a cost in USD with nanos, a latency, a status, request_metadata {client,
temperature}, a request_time; the same rows for both sides.

Writes, each round both sides (their order alternating), --rows interactions in batches of --batch:
- service: BatchCreateAIInteractions over gRPC, requests built before the clock starts. It
  validates every row, checks the users exist (one query), writes the rows and an audit entry
  for each, and answers every row.
- floor: the same rows and their audit entries (each field set, as the service's entry has them)
  with raw SQL from one connection: per batch BEGIN; an INSERT of the rows and one of the
  entries (psycopg2 execute_values, SQLite executemany); COMMIT. No validation, no answer.
Rows per second, best of --rounds; ratio service / floor (target >= 0.8).

Summary (PostgreSQL only; skipped with --skip-summary): --summary-rows interactions loaded with
COPY over 30 days in time order, as calls are recorded (20 users, 6 models, 5 modules, 3
currencies), VACUUM ANALYZE (as autovacuum would after the load); then --calls
GetAIUsageSummary calls per grouping over ranges of the last --ranges days (first page, 50
groups): p50 and p95 latency as the client sees it (target p50 <
200 ms), each call followed by the floor's: the plain exact summary as one SQL statement
(percentile_disc), from psycopg2.

Written to bench/results/ai_usage.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "generated"))
import benchdb  # noqa: E402
import rpc_bench  # noqa: E402
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2  # noqa: E402
from nexus.ai.v1 import ai_pb2 as apb  # noqa: E402
from nexus.ai.v1 import ai_pb2_grpc  # noqa: E402
from nexus.common.v1 import common_pb2  # noqa: E402
from nexus.identity.v1 import identity_pb2 as ipb  # noqa: E402
from nexus.identity.v1 import identity_pb2_grpc  # noqa: E402

SIDES = ("service", "floor")
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-3-5", "llama-3-70b", "mistral-large", "embedder")
MODULES = ("chat", "analysis", "tools", "search", "mail")
CURRENCIES = ("USD", "USD", "USD", "EUR", "GBP")
STATUSES = ("succeeded",) * 18 + ("failed", "timed_out")
STATUS_NUMBER = {"succeeded": apb.AI_INTERACTION_STATUS_SUCCEEDED, "failed": apb.AI_INTERACTION_STATUS_FAILED, "timed_out": apb.AI_INTERACTION_STATUS_TIMED_OUT}
COLUMNS = ("id", "user_id", "module", "model", "prompt", "response", "prompt_tokens", "completion_tokens", "total_tokens",
           "cost_units", "cost_nanos", "cost_currency", "latency_nanos", "status", "error", "request_metadata", "request_time",
           "create_time", "update_time", "revision")
AUDIT_COLUMNS = ("id", "create_time", "actor_type", "actor_id", "action", "resource_type", "resource_id", "changes", "method", "summary")
METHOD = "/nexus.ai.v1.AIService/BatchCreateAIInteractions"
GROUPINGS = {
    "model": [apb.USAGE_GROUPING_MODEL],
    "module": [apb.USAGE_GROUPING_MODULE],
    "user": [apb.USAGE_GROUPING_USER],
    "model, module, user": [apb.USAGE_GROUPING_MODEL, apb.USAGE_GROUPING_MODULE, apb.USAGE_GROUPING_USER],
    "none": [],
}
DAYS = 30


def interactions(rows: int, users: list[str], rng: random.Random, start: dt.datetime) -> list[dict[str, Any]]:
    words = benchdb.VOCABULARY
    out = []
    for _ in range(rows):
        prompt_tokens, completion_tokens = rng.randrange(10, 4000), rng.randrange(0, 1500)
        status = rng.choice(STATUSES)
        out.append({
            "user_id": rng.choice(users),
            "module": rng.choice(MODULES),
            "model": rng.choice(MODELS),
            "prompt": " ".join(rng.choice(words) for _ in range(12)),
            "response": " ".join(rng.choice(words) for _ in range(30)),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cost_units": rng.randrange(0, 2),
            "cost_nanos": rng.randrange(0, 1_000_000_000),
            "cost_currency": rng.choice(CURRENCIES),
            "latency_nanos": rng.randrange(50_000_000, 20_000_000_000),
            "status": status,
            "error": "the model refused" if status == "failed" else None,
            "request_metadata": {"client": rng.choice(("web", "ios", "cli")), "temperature": rng.choice((0.0, 0.2, 0.7))},
            "request_time": start + dt.timedelta(seconds=rng.randrange(0, DAYS * 86400), microseconds=rng.randrange(0, 1_000_000)),
        })
    return out


def request_of(batch: list[dict[str, Any]]) -> apb.BatchCreateAIInteractionsRequest:
    requests = []
    for r in batch:
        meta = struct_pb2.Struct()
        meta.update(r["request_metadata"])
        ts = timestamp_pb2.Timestamp()
        ts.FromDatetime(r["request_time"])
        msg = apb.AIInteraction(
            user_id=r["user_id"], module=r["module"], model=r["model"], prompt=r["prompt"], response=r["response"],
            prompt_tokens=r["prompt_tokens"], completion_tokens=r["completion_tokens"],
            cost=common_pb2.Money(currency_code=r["cost_currency"], units=r["cost_units"], nanos=r["cost_nanos"]),
            latency=duration_pb2.Duration(seconds=r["latency_nanos"] // 10**9, nanos=r["latency_nanos"] % 10**9),
            status=STATUS_NUMBER[r["status"]], error=r["error"] or "", request_metadata=meta, request_time=ts,
        )
        requests.append(apb.CreateAIInteractionRequest(ai_interaction=msg))
    return apb.BatchCreateAIInteractionsRequest(requests=requests)


def run_service(stub: Any, key: str, batches: list[list[dict[str, Any]]]) -> float:
    prepared = [request_of(b) for b in batches]
    metadata = (("authorization", f"Bearer {key}"),)
    start = time.perf_counter()
    for request in prepared:
        answer = stub.BatchCreateAIInteractions(request, metadata=metadata, timeout=300)
        assert len(answer.ai_interactions) == len(request.requests)
    return time.perf_counter() - start


def _stamp(dialect: str, value: dt.datetime) -> Any:
    return value if dialect == "postgresql" else value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _ident(dialect: str, value: str) -> str:
    return value if dialect == "postgresql" else uuid.UUID(value).hex


def floor_rows(dialect: str, batch: list[dict[str, Any]]) -> tuple[list[tuple], list[tuple]]:
    """The rows the floor writes for a batch, and an audit entry for each naming every field set
    with its new value (as the service's entry of a create)."""
    now = dt.datetime.now(dt.UTC)
    stamp = _stamp(dialect, now)
    rows, entries = [], []
    for r in batch:
        row_id = str(uuid.uuid4())
        total = r["prompt_tokens"] + r["completion_tokens"]
        rows.append((
            _ident(dialect, row_id), _ident(dialect, r["user_id"]), r["module"], r["model"], r["prompt"], r["response"],
            r["prompt_tokens"], r["completion_tokens"], total, r["cost_units"], r["cost_nanos"], r["cost_currency"],
            r["latency_nanos"], r["status"], r["error"], json.dumps(r["request_metadata"]), _stamp(dialect, r["request_time"]),
            stamp, stamp, 1,
        ))
        changes = [
            {"field": "id", "old_value": None, "new_value": row_id},
            *({"field": f, "old_value": None, "new_value": r[f]} for f in ("user_id", "module", "model", "prompt", "response", "prompt_tokens", "completion_tokens")),
            {"field": "total_tokens", "old_value": None, "new_value": total},
            {"field": "cost", "old_value": None, "new_value": {"currency_code": r["cost_currency"], "units": r["cost_units"], "nanos": r["cost_nanos"]}},
            {"field": "latency", "old_value": None, "new_value": f"{r['latency_nanos'] / 1e9:.9f}s"},
            {"field": "status", "old_value": None, "new_value": r["status"]},
            {"field": "request_metadata", "old_value": None, "new_value": r["request_metadata"]},
            {"field": "request_time", "old_value": None, "new_value": r["request_time"].isoformat()},
        ]
        summary = " ".join(["create", "AIInteraction", *(c["field"] for c in changes)])
        entries.append((_ident(dialect, str(uuid.uuid4())), stamp, "api_key", None, "create", "AIInteraction", _ident(dialect, row_id),
                        json.dumps(changes), METHOD, summary))
    return rows, entries


def run_floor(dialect: str, target: str, batches: list[list[dict[str, Any]]]) -> float:
    """Each batch in one transaction: its rows in one statement, its audit entries in one more;
    the rows are built inside the clock, as a client builds them."""
    values = lambda n: "%s" if dialect == "postgresql" else "(" + ", ".join("?" for _ in range(n)) + ")"  # noqa: E731
    stmt = f"INSERT INTO ai_interactions ({', '.join(COLUMNS)}) VALUES {values(len(COLUMNS))}"
    audit_stmt = f"INSERT INTO audit_log_entries ({', '.join(AUDIT_COLUMNS)}) VALUES {values(len(AUDIT_COLUMNS))}"
    conn = benchdb.connect(dialect, target)
    try:
        start = time.perf_counter()
        for batch in batches:
            rows, entries = floor_rows(dialect, batch)
            if dialect == "postgresql":
                import psycopg2.extras

                with conn.cursor() as cur:
                    psycopg2.extras.execute_values(cur, stmt, rows, page_size=len(rows))
                    psycopg2.extras.execute_values(cur, audit_stmt, entries, page_size=len(entries))
                conn.commit()
            else:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(stmt, rows)
                conn.executemany(audit_stmt, entries)
                conn.execute("COMMIT")
        return time.perf_counter() - start
    finally:
        conn.close()


def load_summary_rows(target: str, count: int, users: list[str], start: dt.datetime) -> float:
    """count interactions COPYed into ai_interactions (no audit entries: a load, not writes; the
    triggers fill ai_usage_days), then VACUUM ANALYZE. They go in in the order of their
    request_time, as services record calls as they happen: each COPY of 100,000 holds the next
    slice of the 30 days, its rows in time order."""
    import psycopg2

    rng = random.Random(7)
    began = time.perf_counter()
    conn = psycopg2.connect(**benchdb.PG, dbname=target)
    try:
        chunk = 100_000
        seconds = DAYS * 86400
        for offset in range(0, count, chunk):
            n = min(chunk, count - offset)
            first, last = seconds * offset // count, seconds * (offset + n) // count
            moments = sorted(rng.randrange(first * 1_000_000, last * 1_000_000) for _ in range(n))
            buf = io.StringIO()
            for micros in moments:
                pt, ct = rng.randrange(10, 4000), rng.randrange(0, 1500)
                status = rng.choice(STATUSES)
                at = start + dt.timedelta(microseconds=micros)
                fields = (
                    str(uuid.uuid4()), rng.choice(users), rng.choice(MODULES), rng.choice(MODELS), "p", "r", pt, ct, pt + ct,
                    rng.randrange(0, 2), rng.randrange(0, 1_000_000_000), rng.choice(CURRENCIES), rng.randrange(50_000_000, 20_000_000_000),
                    status, "\\N", "\\N", at.isoformat(), at.isoformat(), at.isoformat(), 1,
                )
                buf.write("\t".join(map(str, fields)) + "\n")
            buf.seek(0)
            with conn.cursor() as cur:
                cur.copy_expert(f"COPY ai_interactions ({', '.join(COLUMNS)}) FROM STDIN", buf)
            conn.commit()
        conn.autocommit = True
        with conn.cursor() as cur:
            # As autovacuum does after such a load (it is off on the benchmark machine's
            # PostgreSQL): statistics, and the visibility map the summary's index walks need.
            cur.execute("VACUUM ANALYZE ai_interactions")
            cur.execute("VACUUM ANALYZE ai_usage_days")
    finally:
        conn.close()
    return time.perf_counter() - began


# The floor's GROUP BY of each grouping: the raw columns, NULLs as the service's keys ('').
FLOOR_KEYS = {
    "model": ["model"],
    "module": ["module"],
    "user": ["coalesce(user_id::text, '')"],
    "model, module, user": ["model", "module", "coalesce(user_id::text, '')"],
    "none": [],
}


def floor_summary_sql(grouping: str) -> str:
    """The plain exact summary in one statement: the sums and percentile_disc (nearest rank, as
    the service's) per group and currency, the first page of 50 in key order, the number of
    groups as a window over them."""
    keys = [*FLOOR_KEYS[grouping], "coalesce(cost_currency, '')"]
    listed = ", ".join(keys)
    ordered = ", ".join(f'{k} COLLATE "C"' for k in keys)
    return (
        f"SELECT {listed}, count(*), count(latency_nanos), "
        "sum(CASE WHEN status IN ('failed', 'timed_out') THEN 1 ELSE 0 END), sum(prompt_tokens), sum(completion_tokens), "
        "sum(cost_units), sum(cost_nanos), "
        "percentile_disc(0.5) WITHIN GROUP (ORDER BY latency_nanos), percentile_disc(0.95) WITHIN GROUP (ORDER BY latency_nanos), "
        "count(*) OVER () "
        "FROM ai_interactions WHERE request_time >= %s AND request_time < %s "
        f"GROUP BY {listed} ORDER BY {ordered} LIMIT 51"
    )


def run_floor_summary(conn: Any, sql: str, begin: dt.datetime, end: dt.datetime) -> tuple[float, list[tuple]]:
    """One floor summary as the service runs its own: a read-only transaction, no JIT, 64 MB of work_mem."""
    t0 = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        cur.execute("SET LOCAL jit = off")
        cur.execute("SET LOCAL work_mem = '64MB'")
        cur.execute(sql, (begin, end))
        rows = cur.fetchall()
        cur.execute("COMMIT")
    return (time.perf_counter() - t0) * 1000, rows


def _p50_p95(took: list[float]) -> tuple[float, float]:
    took = sorted(took)
    return statistics.median(took), took[min(len(took) - 1, int(len(took) * 0.95 + 0.999) - 1)]


def bench_summary(stub: Any, key: str, target: str, start: dt.datetime, calls: int, ranges: list[int]) -> list[dict[str, Any]]:
    """Per range (the last N days of the data) and grouping: --calls service calls and as many
    floor statements, alternating, after one warm-up of each; p50 and p95 of each side."""
    import psycopg2

    metadata = (("authorization", f"Bearer {key}"),)
    end_at = start + dt.timedelta(days=DAYS)
    conn = psycopg2.connect(**benchdb.PG, dbname=target)
    conn.autocommit = True
    out = []
    try:
        for days in ranges:
            begin_at = end_at - dt.timedelta(days=days)
            begin, end = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
            begin.FromDatetime(begin_at)
            end.FromDatetime(end_at)
            for name, group_by in GROUPINGS.items():
                request = apb.GetAIUsageSummaryRequest(start_time=begin, end_time=end, group_by=group_by)
                sql = floor_summary_sql(name)
                answer = stub.GetAIUsageSummary(request, metadata=metadata, timeout=120)  # warm-ups
                _, floor_rows = run_floor_summary(conn, sql, begin_at, end_at)
                # The floor answers what the service does: the same groups and the same p50s.
                assert len(floor_rows) == min(51, answer.total_size) and floor_rows[0][-1] == answer.total_size, (name, days)
                first = answer.groups[0]
                assert floor_rows[0][-3] == first.latency_p50.seconds * 10**9 + first.latency_p50.nanos, (name, days)
                service, floor = [], []
                for _ in range(calls):
                    t0 = time.perf_counter()
                    stub.GetAIUsageSummary(request, metadata=metadata, timeout=120)
                    service.append((time.perf_counter() - t0) * 1000)
                    floor.append(run_floor_summary(conn, sql, begin_at, end_at)[0])
                p50, p95 = _p50_p95(service)
                f50, f95 = _p50_p95(floor)
                rpc_bench.log(f"summary over {days} days by {name}: p50 {p50:.0f} ms (floor {f50:.0f}), p95 {p95:.0f} ms, {answer.total_size} groups")
                out.append({"days": days, "grouping": name, "groups": answer.total_size, "p50": p50, "p95": p95, "floor_p50": f50, "floor_p95": f95})
    finally:
        conn.close()
    return out


def bench_dialect(dialect: str, args: argparse.Namespace, work: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    target = benchdb.create_pg_database("nexus_aiusagebench") if dialect == "postgresql" else str(work / "bench.db")
    url = benchdb.database_url(dialect, target)
    try:
        benchdb.migrate(url)
        key = benchdb.create_admin_key(url)
        ns = argparse.Namespace(max_rpcs=100, pool_size=5, max_overflow=5, workers=1, project_src=None)
        server = rpc_bench.start_project(dialect, url, work, ns, dialect)
        options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=options)
        stub = ai_pb2_grpc.AIServiceStub(channel)
        metadata = (("authorization", f"Bearer {key}"),)
        identity = identity_pb2_grpc.IdentityServiceStub(channel)
        users = [
            identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(username=f"bench{i}", email=f"bench{i}@example.com", full_name=f"Bench {i}")), metadata=metadata).id
            for i in range(20)
        ]
        best: dict[str, float] = {}
        summary: list[dict[str, Any]] = []
        try:
            for round_no in range(args.rounds):
                sides = list(SIDES) if round_no % 2 == 0 else list(reversed(SIDES))
                for side in sides:
                    rows = interactions(args.rows, users, random.Random(f"{round_no}-{side}"), dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
                    batches = [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]
                    took = run_service(stub, key, batches) if side == "service" else run_floor(dialect, target, batches)
                    rate = args.rows / took
                    rpc_bench.log(f"{dialect} round {round_no + 1} {side}: {rate:,.0f} rows/s")
                    best[side] = max(best.get(side, 0.0), rate)
            if dialect == "postgresql" and not args.skip_summary:
                start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
                loaded = load_summary_rows(target, args.summary_rows, users, start)
                rpc_bench.log(f"loaded {args.summary_rows:,} interactions in {loaded:.0f} s")
                summary = bench_summary(stub, key, target, start, args.calls, [int(d) for d in args.ranges.split(",")])
        finally:
            channel.close()
            server.stop()
        return [{"db": dialect, **best}], summary
    finally:
        if dialect == "postgresql":
            benchdb.drop_pg_database(target)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--db", default="postgresql,sqlite")
    p.add_argument("--rows", type=int, default=20_000, help="interactions per side and round (default 20000)")
    p.add_argument("--batch", type=int, default=5_000, help="interactions per call (default 5000)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--summary-rows", type=int, default=1_000_000)
    p.add_argument("--calls", type=int, default=20, help="GetAIUsageSummary calls per grouping (default 20)")
    p.add_argument("--skip-summary", action="store_true")
    p.add_argument("--ranges", default="1,7,30", help="summary ranges: the last N days of the 30 (default 1,7,30)")
    args = p.parse_args()
    writes, summary = [], []
    load = rpc_bench.loadavg()
    with tempfile.TemporaryDirectory(prefix="nexus-ai-usage-bench-") as tmp:
        for dialect in args.db.split(","):
            w, s = bench_dialect(dialect, args, Path(tmp))
            writes += w
            summary += s
    lines = [
        f"# AI usage: BatchCreateAIInteractions vs raw SQL, GetAIUsageSummary ({dt.date.today()}, {os.cpu_count()} cores, load {load} at start)",
        "",
        f"`{' '.join(['bench/ai_usage.py', *sys.argv[1:]])}`: {args.rows} interactions per side and round, {args.batch} per call, best of {args.rounds} rounds.",
        "",
        "| database | service rows/s | floor rows/s | service / floor |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r['db']} | {r['service']:,.0f} | {r['floor']:,.0f} | {r['service'] / r['floor']:.2f} |" for r in writes]
    if summary:
        lines += [
            "",
            f"GetAIUsageSummary on PostgreSQL over {args.summary_rows:,} interactions spread over {DAYS} days; ranges of the "
            f"last N days, first page (50 groups); {args.calls} calls per range and grouping after one warm-up, client-side "
            "latency; the floor is the plain exact summary in one SQL statement (percentile_disc) from psycopg2, alternating with the service.",
            "",
            "| range (days) | group_by | groups | service p50 ms | service p95 ms | floor p50 ms | floor / service |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['days']} | {r['grouping']} | {r['groups']} | {r['p50']:.0f} | {r['p95']:.0f} | {r['floor_p50']:.0f} | {r['floor_p50'] / r['p50']:.2f} |"
            for r in summary
        ]
    table = "\n".join(lines) + "\n"
    print(table)
    (BENCH / "results" / "ai_usage.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
