"""Databases for bench/run: create/drop, migrate, API key, and fast raw-SQL seeding.

Rows are written straight into the tables in the formats the service's SQLAlchemy types use:
SQLite stores UUIDs as 32-char hex (`Uuid`), timestamps as naive UTC text
'YYYY-MM-DD HH:MM:SS.ffffff', booleans as 0/1 and JSON as text; PostgreSQL gets uuid,
timestamptz, boolean and jsonb. SQLite rows go through executemany in one transaction (the FTS5
triggers keep `tasks_fts` in sync), PostgreSQL rows through COPY (the stored search vector and its
GIN index are computed by PostgreSQL itself). No audit entries are written for seeded rows.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import os
import random
import sqlite3
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
NEXUS_DATA = str(REPO / ".venv" / "bin" / "nexus-data")
PG: dict[str, Any] = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}  # psycopg2.connect's keywords
UTC = dt.UTC

# Words for titles and descriptions: no English stop words, so both engines index all of them.
_WORDS = (
    "deploy database migration schema index cache queue worker scheduler backup restore replica "
    "shard cluster gateway proxy router endpoint payload token session cookie header upload "
    "download invoice payment refund customer account profile avatar dashboard report export "
    "import metrics alert incident outage latency throughput memory storage bucket archive "
    "snapshot release version branch commit pipeline runner artifact container image registry "
    "kernel driver firmware sensor device mobile tablet browser editor widget button modal layout "
    "theme font color icon sprite animation video audio socket message channel thread "
    "notification newsletter campaign landing pricing checkout cart order shipping warehouse "
    "inventory supplier contract license audit compliance privacy security firewall certificate "
    "encryption password login signup onboarding tutorial documentation glossary translation "
    "locale timezone calendar reminder meeting agenda budget forecast revenue expense payroll "
    "hiring interview feedback survey analytics experiment rollout feature toggle config secret "
    "vault cluster planner tracker ledger portal kiosk printer scanner barcode label sticker "
    "parcel courier route fleet garage engine tyre battery charger solar turbine pump valve "
    "boiler heater cooler fridge oven kettle blender mixer grinder roaster espresso"
).split()
VOCABULARY = tuple(dict.fromkeys(_WORDS))
TAGS = ("backend", "frontend", "infra", "design", "ops", "data", "mobile", "billing", "security", "docs")
# Status mix of seeded tasks: 40 % todo, the filter ListTasks uses.
STATUS_CYCLE = ("todo", "todo", "in_progress", "done", "todo", "review", "done", "todo", "in_progress", "blocked")
PRIORITIES = ("low", "medium", "high", "critical")
ROLE_NAMES = ("reviewer", "planner", "oncall", "triage")
BASE_TIME = dt.datetime(2025, 1, 1, tzinfo=UTC)


def database_url(dialect: str, target: str) -> str:
    """target: a file path (SQLite) or a database name (PostgreSQL)."""
    if dialect == "sqlite":
        return f"sqlite:///{target}"
    return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{target}"


# ---------------------------------------------------------------- PostgreSQL databases


def pg_admin() -> Any:
    import psycopg2

    conn = psycopg2.connect(**PG, dbname="postgres", connect_timeout=10)
    conn.autocommit = True
    return conn


def create_pg_database(prefix: str = "nexus_rpcbench") -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = pg_admin()
    try:
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()
    return name


def drop_pg_database(name: str) -> None:
    conn = pg_admin()
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def connect(dialect: str, target: str) -> Any:
    if dialect == "sqlite":
        conn = sqlite3.connect(target, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn
    import psycopg2

    return psycopg2.connect(**PG, dbname=target, connect_timeout=10)


# ---------------------------------------------------------------- the CLI of the service


# Another checkout whose CLI makes the databases (bench/run --project-src): its migrations, not
# this one's, so that the server run from it finds the schema it expects.
PROJECT_SRC: str | None = None


def _cli(args: list[str], url: str, timeout: float = 180) -> str:
    env = {**os.environ, "NEXUS_HASH_TIME_COST": "1", "NEXUS_HASH_MEMORY_KIB": "1024"}
    argv, cwd = [NEXUS_DATA], None
    if PROJECT_SRC:
        src = str(Path(PROJECT_SRC).resolve())
        env["PYTHONPATH"] = os.pathsep.join([src, os.path.join(src, "generated"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        argv, cwd = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main())"], src
    out = subprocess.run(
        [*argv, *args, "--database-url", url], env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd
    )
    if out.returncode != 0:
        raise RuntimeError(f"nexus-data {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out.stdout


def migrate(url: str) -> None:
    _cli(["migrate"], url)


def create_admin_key(url: str) -> str:
    secret = _cli(["keys", "create", "--name", "bench", "--role", "admin"], url).strip().splitlines()[-1].strip()
    if not secret.startswith("nx_"):
        raise RuntimeError(f"unexpected key output: {secret[:20]}...")
    return secret


# ---------------------------------------------------------------- value formats


class Fmt:
    """How one dialect wants ids, times, booleans and JSON written."""

    def __init__(self, dialect: str) -> None:
        self.sqlite = dialect == "sqlite"

    def id(self, u: uuid.UUID) -> str:
        return u.hex if self.sqlite else str(u)

    def ts(self, t: dt.datetime | None) -> str | None:
        if t is None:
            return None
        if self.sqlite:
            return t.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")
        return t.isoformat()

    def b(self, v: bool) -> Any:
        return int(v) if self.sqlite else v

    @staticmethod
    def json(v: Any) -> str:
        return json.dumps(v, separators=(",", ":"))


def _copy_text(value: Any) -> str:
    if value is None:
        return r"\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    s = str(value)
    return s.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def _insert(conn: Any, dialect: str, table: str, columns: list[str], rows: list[tuple]) -> None:
    if not rows:
        return
    if dialect == "sqlite":
        marks = ", ".join("?" for _ in columns)
        conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)
        return
    buf = io.StringIO()
    for row in rows:
        buf.write("\t".join(_copy_text(v) for v in row))
        buf.write("\n")
    buf.seek(0)
    with conn.cursor() as cur:
        cur.copy_expert(f"COPY {table} ({', '.join(columns)}) FROM STDIN", buf)


def _begin(conn: Any, dialect: str) -> None:
    if dialect == "sqlite":
        conn.execute("BEGIN IMMEDIATE")


def _commit(conn: Any) -> None:
    if isinstance(conn, sqlite3.Connection):
        conn.execute("COMMIT")
    else:
        conn.commit()


# ---------------------------------------------------------------- seeding

USER_COLUMNS = [
    "id", "username", "email", "external_id", "full_name", "avatar_url", "role", "is_active", "is_verified",
    "preferences", "password_hash", "last_login_time", "create_time", "update_time", "revision", "delete_time",
]
PROJECT_COLUMNS = [
    "id", "name", "description", "owner_id", "status", "priority", "start_date", "end_date", "budget_amount",
    "budget_currency", "archived", "create_time", "update_time", "revision", "delete_time",
]
TASK_COLUMNS = [
    "id", "project_id", "title", "description", "assignee_id", "creator_id", "status", "priority", "due_date",
    "estimated_hours", "actual_hours", "tags", "completed_time", "create_time", "update_time", "revision", "delete_time",
]


@dataclass
class Seeded:
    """What the load generator needs to know about the seeded data."""

    user_ids: list[str] = field(default_factory=list)
    project_id: str = ""  # the project read by ListTasks / SearchTasks (and updated tasks live there)
    sink_project_id: str = ""  # CreateTask and BatchCreateTasks write here
    task_ids: list[str] = field(default_factory=list)  # sample of the project's tasks (UpdateTask)
    queries: list[str] = field(default_factory=list)
    task_count: int = 0

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def _uuid7(ms: int, rng: random.Random) -> uuid.UUID:
    rand = rng.getrandbits(74)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | ((rand >> 62) & 0xFFF) << 64 | 0b10 << 62 | (rand & ((1 << 62) - 1))
    return uuid.UUID(int=value)


def seed_base(conn: Any, dialect: str, users: int, rng: random.Random) -> Seeded:
    """Users (each with one role), the benchmark project and the sink project."""
    f = Fmt(dialect)
    s = Seeded()
    _begin(conn, dialect)
    role_ids = []
    role_rows = []
    for i, name in enumerate(ROLE_NAMES):
        rid = _uuid7(int(BASE_TIME.timestamp() * 1000) + i, rng)
        role_ids.append(rid)
        t = f.ts(BASE_TIME)
        role_rows.append((f.id(rid), name, f"bench role {name}", f.json([f"{name}.read"]), t, t, 1))
    _insert(conn, dialect, "roles", ["id", "name", "description", "permissions", "create_time", "update_time", "revision"], role_rows)
    rows, assign = [], []
    for i in range(users):
        created = BASE_TIME + dt.timedelta(seconds=i)
        uid = _uuid7(int(created.timestamp() * 1000), rng)
        s.user_ids.append(str(uid))
        t = f.ts(created)
        rows.append((
            f.id(uid), f"user{i:05d}", f"user{i:05d}@bench.example", f"ext-{i:05d}", f"Bench User {i}",
            f"https://avatars.example/{i}.png", "user", f.b(True), f.b(i % 2 == 0),
            f.json({"theme": "dark" if i % 2 else "light", "digest": True}), None, None, t, t, 1, None,
        ))
        assign.append((f.id(uid), f.id(role_ids[i % len(role_ids)]), t))
    _insert(conn, dialect, "users", USER_COLUMNS, rows)
    _insert(conn, dialect, "user_roles", ["user_id", "role_id", "create_time"], assign)
    owner = uuid.UUID(s.user_ids[0])
    prows = []
    for name in ("Bench project", "Bench sink"):
        pid = _uuid7(int(BASE_TIME.timestamp() * 1000), rng)
        t = f.ts(BASE_TIME)
        prows.append((f.id(pid), name, f"{name} for bench/run", f.id(owner), "active", "high", "2025-01-01", "2026-12-31",
                      "1000.5" if dialect == "sqlite" else 1000.5, "EUR", f.b(False), t, t, 1, None))
        if not s.project_id:
            s.project_id = str(pid)
        else:
            s.sink_project_id = str(pid)
    _insert(conn, dialect, "projects", PROJECT_COLUMNS, prows)
    _commit(conn)
    s.queries = make_queries(rng)
    return s


def make_queries(rng: random.Random, n: int = 8) -> list[str]:
    return [f"{a} {b}" for a, b in (rng.sample(VOCABULARY, 2) for _ in range(n))]


def add_tasks(conn: Any, dialect: str, seeded: Seeded, count: int, rng: random.Random, *, chunk: int = 20_000,
              progress: Any = None) -> None:
    """Append `count` tasks to the benchmark project (every 10th depends on the task before it)."""
    f = Fmt(dialect)
    project = uuid.UUID(seeded.project_id)
    users = [uuid.UUID(u) for u in seeded.user_ids]
    words = VOCABULARY
    start = seeded.task_count
    done = 0
    prev: uuid.UUID | None = None
    sample_every = max(1, (start + count) // 4000)
    while done < count:
        n = min(chunk, count - done)
        rows, deps = [], []
        for k in range(n):
            i = start + done + k
            created = BASE_TIME + dt.timedelta(milliseconds=37 * i)
            tid = _uuid7(int(created.timestamp() * 1000), rng)
            status = STATUS_CYCLE[i % len(STATUS_CYCLE)]
            t = f.ts(created)
            title = " ".join(rng.choice(words) for _ in range(4))
            desc = " ".join(rng.choice(words) for _ in range(13))
            due = (BASE_TIME.date() + dt.timedelta(days=i % 500)).isoformat() if i % 3 else None
            rows.append((
                f.id(tid), f.id(project), title, desc, f.id(users[i % len(users)]), f.id(users[(i * 7) % len(users)]),
                status, PRIORITIES[i % 4], due, float(i % 13), float(i % 5),
                f.json(rng.sample(TAGS, 2)), t if status == "done" else None, t, t, 1, None,
            ))
            if i % 10 == 9 and prev is not None:
                deps.append((f.id(tid), f.id(prev), t))
            prev = tid
            if i % sample_every == 0 and len(seeded.task_ids) < 4000:
                seeded.task_ids.append(str(tid))
        _begin(conn, dialect)
        _insert(conn, dialect, "tasks", TASK_COLUMNS, rows)
        _insert(conn, dialect, "task_dependencies", ["task_id", "depends_on_id", "create_time"], deps)
        _commit(conn)
        done += n
        if progress:
            progress(start + done)
    seeded.task_count = start + count


def analyze(conn: Any, dialect: str) -> None:
    if dialect == "sqlite":
        conn.execute("ANALYZE")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return
    old = conn.autocommit
    conn.commit()
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE")
    conn.autocommit = old


def pick_update_tasks(seeded: Seeded, n_sets: int) -> list[list[str]]:
    """Disjoint task id sets, one per server run of UpdateTask (each starts from revision 1)."""
    ids = list(seeded.task_ids)
    size = len(ids) // n_sets
    return [ids[i * size:(i + 1) * size] for i in range(n_sets)]


if __name__ == "__main__":  # a quick manual check: python bench/benchdb.py sqlite /tmp/x.db 20000
    dialect, target, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rng = random.Random(1)
    c = connect(dialect, target)
    sd = seed_base(c, dialect, 1000, rng)
    add_tasks(c, dialect, sd, n, rng)
    analyze(c, dialect)
    print(json.dumps({k: v if not isinstance(v, list) else v[:3] for k, v in sd.to_json().items()}))
