"""The database's share of a CreateTask: the floor's SQL against the service's SQL, no Python around it.

    .venv/bin/python bench/sql_ceiling.py [--db sqlite,postgresql] [--calls 3000] [--rounds 3]

For each database: a fresh one (as bench/run makes it: migrated, 20,000 seeded tasks), one
connection, calls made one after another. Cases, each the statements written out as the floor and
the service send them for one CreateTask:

- floor: one INSERT of the task, autocommit (bench/floor_server.py);
- service: what `nexus-data` sends: on PostgreSQL BEGIN, one INSERT of the task with its audit
  entry as a data-modifying CTE and the project read FOR SHARE in a CTE guarding it, COMMIT; on
  SQLite BEGIN IMMEDIATE, the project's reference check, the task INSERT, the audit INSERT, COMMIT;
- service without the audit entry (the same transaction, the task alone);
- (PostgreSQL) the service's one statement in autocommit, without BEGIN / COMMIT.

Per case: wall time, this process's CPU (the driver) and, on PostgreSQL, the backend's CPU, per
call; the best of --rounds rounds (rounds alternate the cases). The ratio floor ÷ case of wall
time is the most the service's CreateTask could reach against the floor if its Python cost
nothing. Written to bench/results/sql_ceiling.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchdb  # noqa: E402

TASK_COLUMNS = ", ".join(benchdb.TASK_COLUMNS)
AUDIT_COLUMNS = "id, create_time, actor_type, actor_id, action, resource_type, resource_id, changes, request_id, method, summary"
CHANGES = [
    {"field": "project_id", "old_value": None, "new_value": None},
    {"field": "title", "old_value": None, "new_value": "bench task 1 deploy cache"},
    {"field": "description", "old_value": None, "new_value": "deploy cache queue worker"},
    {"field": "status", "old_value": None, "new_value": "todo"},
    {"field": "priority", "old_value": None, "new_value": "high"},
    {"field": "estimated_hours", "old_value": None, "new_value": 1.0},
    {"field": "tags", "old_value": None, "new_value": ["bench", "deploy"]},
]
SUMMARY = "create Task project_id title description status priority estimated_hours tags"
METHOD = "/nexus.work.v1.WorkService/CreateTask"


class Case:
    def __init__(self, name: str, run: Callable[[], None]) -> None:
        self.name = name
        self.run = run
        self.best: dict[str, float] | None = None


def backend_cpu(dbname: str) -> float:
    """CPU seconds of the PostgreSQL backends connected to dbname."""
    total = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if f" {dbname} " not in open(f"/proc/{pid}/cmdline").read().replace("\0", " ") + " ":
                continue
            fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except OSError:
            continue
    return total / os.sysconf("SC_CLK_TCK")


def task_row(project: str, fmt: benchdb.Fmt, now: str) -> tuple[Any, ...]:
    tid = fmt.id(uuid.uuid4())
    return (tid, project, "bench task 1 deploy cache", "deploy cache queue worker", None, None, "todo", "high", None,
            1.0, 0.0, '["bench", "deploy"]', None, now, now, 1, None)


def audit_row(task_id: str, actor: str, fmt: benchdb.Fmt, now: str) -> tuple[Any, ...]:
    return (fmt.id(uuid.uuid4()), now, "api_key", actor, "create", "Task", task_id, json.dumps(CHANGES),
            str(uuid.uuid4()), METHOD, SUMMARY)


def sqlite_cases(path: str, project: str, actor: str) -> list[Case]:
    fmt = benchdb.Fmt("sqlite")
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("foreign_keys=ON", "journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=10000"):
        conn.execute(f"PRAGMA {pragma}")
    insert_task = f"INSERT INTO tasks ({TASK_COLUMNS}) VALUES ({', '.join('?' * 17)})"
    insert_audit = f"INSERT INTO audit_log_entries ({AUDIT_COLUMNS}) VALUES ({', '.join('?' * 11)})"
    check = "SELECT projects.id FROM projects WHERE projects.id = ? AND projects.delete_time IS NULL"

    def now() -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S.000000", time.gmtime())

    def floor() -> None:
        conn.execute(insert_task, task_row(project, fmt, now()))

    def service(audit: bool = True) -> None:
        t = now()
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(check, (project,)).fetchall()
        row = task_row(project, fmt, t)
        conn.execute(insert_task, row)
        if audit:
            conn.execute(insert_audit, audit_row(row[0], actor, fmt, t))
        conn.execute("COMMIT")

    return [Case("floor: INSERT, autocommit", floor), Case("service: transaction, check, task + audit", service),
            Case("service without the audit entry", lambda: service(False))]


def postgresql_cases(dbname: str, project: str, actor: str) -> list[Case]:
    import psycopg2

    fmt = benchdb.Fmt("postgresql")
    conn = psycopg2.connect(**benchdb.PG, dbname=dbname)
    cur = conn.cursor()
    marks = ", ".join(["%s"] * 17)
    insert_task = f"INSERT INTO tasks ({TASK_COLUMNS}) VALUES ({marks})"
    one_statement = (
        f"WITH companion AS (INSERT INTO audit_log_entries ({AUDIT_COLUMNS}) VALUES ({', '.join(['%s'] * 11)})), "
        "reference_0 AS (SELECT projects.id FROM projects WHERE projects.id = %s AND projects.delete_time IS NULL FOR SHARE) "
        f"INSERT INTO tasks ({TASK_COLUMNS}) SELECT {marks} WHERE EXISTS (SELECT * FROM reference_0) RETURNING tasks.id"
    )

    def now() -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S+00", time.gmtime())

    def floor() -> None:
        conn.autocommit = True
        cur.execute(insert_task, task_row(project, fmt, now()))

    def service(transaction: bool = True) -> None:
        conn.autocommit = not transaction
        t = now()
        row = task_row(project, fmt, t)
        cur.execute(one_statement, audit_row(row[0], actor, fmt, t) + (project,) + row)
        cur.fetchone()
        if transaction:
            conn.commit()

    def without_audit() -> None:
        conn.autocommit = False
        cur.execute("SELECT projects.id FROM projects WHERE projects.id = %s AND projects.delete_time IS NULL FOR SHARE", (project,))
        cur.execute(insert_task, task_row(project, fmt, now()))
        conn.commit()

    return [Case("floor: INSERT, autocommit", floor), Case("service: BEGIN, INSERT + audit CTE + FOR SHARE CTE, COMMIT", service),
            Case("service without the audit entry", without_audit), Case("service's statement in autocommit", lambda: service(False))]


def measure(cases: list[Case], calls: int, rounds: int, dbname: str | None) -> None:
    for case in cases:  # warm-up
        for _ in range(200):
            case.run()
    for _ in range(rounds):
        for case in cases:
            b0 = backend_cpu(dbname) if dbname else 0.0
            c0, w0 = time.process_time(), time.perf_counter()
            for _ in range(calls):
                case.run()
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            backend = (backend_cpu(dbname) - b0) if dbname else 0.0
            got = {"wall_us": wall / calls * 1e6, "driver_us": cpu / calls * 1e6, "backend_us": backend / calls * 1e6}
            if case.best is None or got["wall_us"] < case.best["wall_us"]:
                case.best = got


def table(title: str, cases: list[Case], backend: bool) -> str:
    def cpu(b: dict[str, float]) -> float:
        return b["driver_us"] + b["backend_us"]

    floor = cases[0].best or {}
    head = ["case", "wall µs/call", "driver CPU µs/call"] + (["PostgreSQL CPU µs/call"] if backend else [])
    head += ["floor ÷ case, wall", "floor ÷ case, CPU"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for case in cases:
        b = case.best or {}
        cells = [case.name, f"{b['wall_us']:,.0f}", f"{b['driver_us']:,.0f}"] + ([f"{b['backend_us']:,.0f}"] if backend else [])
        cells += [f"{floor['wall_us'] / b['wall_us']:.2f}", f"{cpu(floor) / cpu(b):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--db", default="sqlite,postgresql")
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--results", default=str(Path(__file__).resolve().parent / "results" / "sql_ceiling.md"))
    args = p.parse_args()
    out = [
        "# The database's share of a CreateTask",
        "",
        f"Command: `.venv/bin/python bench/sql_ceiling.py --db {args.db} --calls {args.calls} --rounds {args.rounds}`  ",
        f"Run at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {os.cpu_count()} cores "
        f"(load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}); one connection, calls one after another, "
        f"best of {args.rounds} rounds of {args.calls} calls.",
        "",
    ]
    rng = random.Random(7)
    for dialect in args.db.split(","):
        dialect = dialect.strip()
        if dialect == "sqlite":
            workdir = tempfile.mkdtemp(prefix="nexus_ceiling_")
            target = os.path.join(workdir, "bench.db")
        else:
            target = benchdb.create_pg_database("nexus_ceiling")
        try:
            benchdb.migrate(benchdb.database_url(dialect, target))
            conn = benchdb.connect(dialect, target)
            seeded = benchdb.seed_base(conn, dialect, 100, rng)
            benchdb.add_tasks(conn, dialect, seeded, args.tasks, rng)
            benchdb.analyze(conn, dialect)
            conn.close()
            fmt = benchdb.Fmt(dialect)
            project, actor = fmt.id(uuid.UUID(seeded.sink_project_id)), fmt.id(uuid.UUID(seeded.user_ids[0]))
            cases = sqlite_cases(target, project, actor) if dialect == "sqlite" else postgresql_cases(target, project, actor)
            measure(cases, args.calls, args.rounds, None if dialect == "sqlite" else target)
            out += [table(dialect, cases, dialect == "postgresql"), ""]
            print(out[-2], flush=True)
        finally:
            if dialect == "postgresql":
                benchdb.drop_pg_database(target)  # WITH (FORCE): the cases' connection goes too
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    out.append("floor ÷ case: the floor's wall time (or CPU: the driver's plus PostgreSQL's) per call over the case's. "
               "Under bench/run's load the two cores are the limit, so the CPU ratio of the service's row bounds the "
               "CreateTask ratio bench/run can show, whatever the Python around the SQL costs; one call at a time, "
               "the wall ratio does (it includes the commit's WAL flush).")
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text("\n".join(out) + "\n")
    print(f"written to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
