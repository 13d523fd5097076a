#!/usr/bin/env python3
"""The floor: the thinnest Python gRPC server answering the RPCs bench/run measures.

    .venv/bin/python bench/floor_server.py --db sqlite:/path/to.db|postgresql:DBNAME --port P [--threads 30]

Same service names and messages as `nexus-data serve` (the generated stubs in generated/nexus),
the same SQL statements against the same tables, but: raw psycopg2 / sqlite3, protos filled by
hand from row tuples, no ORM, no engine, no interceptors, no authentication (the authorization
header is ignored), no row policy, no idempotency keys, no deadline propagation.

Writes send the service's statements: the API makes every create and update write its audit entry
in the same transaction (API.md, AuditLogEntry), so any implementation pays for it. The entry is
the service's (same columns, same changed fields, checked by bench/run before it measures); its
actor is the newest API key (the floor does not authenticate). `--bare` drops the audit entry and
the reference check: one INSERT / one UPDATE in autocommit, the floor of earlier rounds.
grpc.aio on the event loop; every database call runs in a thread pool whose threads each own one
connection (psycopg2 in autocommit, or sqlite3 in WAL mode with synchronous=NORMAL like the
service). It is what any Python implementation of this API pays at least.

Implemented (everything else answers UNIMPLEMENTED):
  IdentityService/GetUser             one SELECT by primary key, role names in a subquery
  WorkService/GetTask                 one SELECT by primary key, dependency ids in a subquery
  WorkService/ListTasks               filter `project_id = "<uuid>" AND status = <STATUS>` only;
                                      keyset page (create_time, id) + dependencies + COUNT(*)
  WorkService/SearchTasks             the service's FTS SQL (PostgreSQL plainto_tsquery on
                                      the GIN expression; SQLite FTS5 MATCH, its score
                                      from highlight()) + COUNT(*)
  WorkService/CreateTask              PostgreSQL, autocommit: one INSERT with the audit entry and the
                                      project read FOR SHARE as CTEs guarding it; SQLite: BEGIN
                                      IMMEDIATE, the project check, the INSERT, the audit INSERT, COMMIT.
                                      The response is built from the inserted values
  WorkService/UpdateTask              update_mask title / status / description / priority: the row
                                      read, then (PostgreSQL, autocommit) one UPDATE at the revision
                                      read with the audit entry as a CTE selecting from it, or
                                      (SQLite) BEGIN IMMEDIATE, read, UPDATE ... RETURNING, audit
                                      INSERT, COMMIT
  WorkService/BatchCreateTasks        in one transaction: the project check, then psycopg2
                                      execute_values of the tasks and of their audit entries
                                      (PostgreSQL), executemany of both (SQLite)

Responses are meant to be identical to the service's for the same rows (bench/run checks this
before it measures).
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime as dt
import json
import math
import os
import re
import signal
import sqlite3
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "generated"))

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402
from nexus.identity.v1 import identity_pb2 as ipb  # noqa: E402
from nexus.identity.v1 import identity_pb2_grpc  # noqa: E402
from nexus.work.v1 import work_pb2 as wpb  # noqa: E402
from nexus.work.v1 import work_pb2_grpc  # noqa: E402

UTC = dt.UTC
EPOCH_NAIVE = dt.datetime(1970, 1, 1)
EPOCH_AWARE = dt.datetime(1970, 1, 1, tzinfo=UTC)
ONE_US = dt.timedelta(microseconds=1)
MAX_BATCH = 1000


def _enum_maps(enum: Any) -> tuple[dict[str, int], dict[int, str]]:
    prefix = enum.values_by_number[0].name[: -len("UNSPECIFIED")]
    to_number = {v.name[len(prefix):].lower(): v.number for v in enum.values if v.number}
    return to_number, {n: s for s, n in to_number.items()}


STATUS_NUM, STATUS_DB = _enum_maps(wpb.TaskStatus.DESCRIPTOR)
PRIORITY_NUM, PRIORITY_DB = _enum_maps(wpb.Priority.DESCRIPTOR)
ROLE_NUM, _ = _enum_maps(ipb.UserRole.DESCRIPTOR)
FILTER = re.compile(r'^\s*project_id\s*=\s*"([0-9a-fA-F-]{32,36})"\s+AND\s+status\s*=\s*(?:TASK_STATUS_)?([A-Z_]+)\s*$')
WORD = re.compile(r"\w+", re.UNICODE)
# A task's stored tsvector (the database computes it from the title, weight A, and the
# description, weight B), which the GIN index covers.
PG_VECTOR = "tasks.search_vector"
# A task's own score (the service's): title weight 10, description 4, times the words' occurrences.
SQLITE_SCORE = (
    "(10.0 * coalesce(length(highlight(tasks_fts, 0, char(1), '')) - length(tasks.title), 0) + "
    "4.0 * coalesce(length(highlight(tasks_fts, 1, char(1), '')) - length(tasks.description), 0))"
)


class Fail(Exception):
    """An RPC error raised in a database thread, turned into a status on the event loop."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def uuid7() -> uuid.UUID:
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | ((rand >> 62) & 0xFFF) << 64 | 0b10 << 62 | (rand & ((1 << 62) - 1))
    return uuid.UUID(int=value)


def parse_id(value: str, field: str) -> uuid.UUID:
    if not value:
        raise Fail(grpc.StatusCode.INVALID_ARGUMENT, f"{field} is required")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise Fail(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {value[:80]!r} is not a valid id") from None


def _set_ts(target: Any, micros: int) -> None:
    target.seconds, rem = divmod(micros, 1_000_000)
    target.nanos = rem * 1000


# ======================================================================== dialects


class Dialect:
    """SQL text and value conversions of one database."""

    name = ""
    ph = "?"

    def uid_out(self, v: Any) -> str: ...
    def uid_in(self, u: uuid.UUID) -> Any: ...
    def ts_micros(self, v: Any) -> int: ...
    def ts_in(self, t: dt.datetime) -> Any: ...
    def json_out(self, v: Any) -> Any: ...
    def json_in(self, v: Any) -> Any: ...
    def date_out(self, v: Any) -> tuple[int, int, int]: ...


class SQLite(Dialect):
    name = "sqlite"
    ph = "?"
    task_deps = (
        "(SELECT json_group_array(depends_on_id) FROM (SELECT depends_on_id FROM task_dependencies d "
        "WHERE d.task_id = tasks.id ORDER BY depends_on_id))"
    )
    user_roles = (
        "(SELECT json_group_array(name) FROM (SELECT roles.name FROM user_roles JOIN roles ON roles.id = user_roles.role_id "
        "WHERE user_roles.user_id = users.id ORDER BY roles.name))"
    )
    limit = "LIMIT ? OFFSET ?"

    @staticmethod
    def uid_out(h: str) -> str:
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    @staticmethod
    def uid_in(u: uuid.UUID) -> str:
        return u.hex

    @staticmethod
    def ts_micros(s: str) -> int:
        return (dt.datetime.fromisoformat(s) - EPOCH_NAIVE) // ONE_US

    @staticmethod
    def ts_in(t: dt.datetime) -> str:
        return t.replace(tzinfo=None).isoformat(sep=" ", timespec="microseconds")

    @staticmethod
    def json_out(v: Any) -> Any:
        return json.loads(v) if v is not None else None

    @staticmethod
    def json_in(v: Any) -> str:
        return json.dumps(v)

    @staticmethod
    def date_out(v: str) -> tuple[int, int, int]:
        return int(v[:4]), int(v[5:7]), int(v[8:10])

    def list_deps(self, v: str | None) -> list[str]:
        return [self.uid_out(h) for h in json.loads(v)] if v else []

    @staticmethod
    def plain(v: Any) -> Any:
        """A column value as the service's audit entry holds it (timestamps ISO 8601 in UTC)."""
        if isinstance(v, str) and len(v) == 26 and v[4] == "-" and v[10] == " ":
            return v.replace(" ", "T") + "+00:00"
        return v

    def list_names(self, v: str | None) -> list[str]:
        return json.loads(v) if v else []


class Postgres(Dialect):
    name = "postgresql"
    ph = "%s"
    task_deps = "ARRAY(SELECT d.depends_on_id::text FROM task_dependencies d WHERE d.task_id = tasks.id ORDER BY d.depends_on_id)"
    user_roles = (
        "ARRAY(SELECT roles.name FROM user_roles JOIN roles ON roles.id = user_roles.role_id "
        "WHERE user_roles.user_id = users.id ORDER BY roles.name)"
    )
    limit = "LIMIT %s OFFSET %s"

    @staticmethod
    def uid_out(v: str) -> str:
        return v

    @staticmethod
    def uid_in(u: uuid.UUID) -> str:
        return str(u)

    @staticmethod
    def ts_micros(v: dt.datetime) -> int:
        return (v - EPOCH_AWARE) // ONE_US

    @staticmethod
    def ts_in(t: dt.datetime) -> dt.datetime:
        return t

    @staticmethod
    def json_out(v: Any) -> Any:
        return v

    @staticmethod
    def json_in(v: Any) -> str:
        return json.dumps(v)

    @staticmethod
    def date_out(v: dt.date) -> tuple[int, int, int]:
        return v.year, v.month, v.day

    @staticmethod
    def list_deps(v: list[str] | None) -> list[str]:
        return v or []

    @staticmethod
    def plain(v: Any) -> Any:
        """A column value as the service's audit entry holds it (timestamps ISO 8601)."""
        return v.isoformat() if isinstance(v, dt.datetime) else v

    @staticmethod
    def list_names(v: list[str] | None) -> list[str]:
        return v or []


TASK_COLS = (
    "tasks.id, tasks.project_id, tasks.title, tasks.description, tasks.assignee_id, tasks.creator_id, tasks.status, "
    "tasks.priority, tasks.due_date, tasks.estimated_hours, tasks.actual_hours, tasks.tags, tasks.completed_time, "
    "tasks.create_time, tasks.update_time, tasks.revision, tasks.delete_time"
)
INSERT_COLS = [
    "id", "project_id", "title", "description", "assignee_id", "creator_id", "status", "priority", "due_date",
    "estimated_hours", "actual_hours", "tags", "completed_time", "create_time", "update_time", "revision",
]
AUDIT_COLS = ["id", "create_time", "actor_type", "actor_id", "action", "resource_type", "resource_id", "changes",
              "request_id", "method", "summary"]
WORK = "/nexus.work.v1.WorkService/"
# Casts of the INSERT ... SELECT forms (PostgreSQL types parameters of a SELECT list as text).
PG_TASK_CASTS = ["::uuid", "::uuid", "", "", "::uuid", "::uuid", "", "", "::date", "", "", "::jsonb", "::timestamptz",
                 "::timestamptz", "::timestamptz", ""]
PG_AUDIT_CASTS = ["::uuid", "::timestamptz", "", "::uuid", "", "", "::uuid", "::jsonb", "", "", ""]
# The fields of a task an update may change, as the audit entry names them, with their column in a TASK_COLS row.
UPDATED_FIELDS = (("title", 2), ("description", 3), ("status", 6), ("priority", 7), ("completed_time", 12))

PROJECT_CHECK = "SELECT projects.id FROM projects WHERE projects.id = {ph} AND projects.delete_time IS NULL{lock}"
SQLITE_AUDIT_INSERT = f"INSERT INTO audit_log_entries ({', '.join(AUDIT_COLS)}) VALUES ({', '.join('?' for _ in AUDIT_COLS)})"
# The service's single-statement Create on PostgreSQL: the project read FOR SHARE guards the task
# and its audit entry (both or neither).
PG_CREATE = (
    "WITH reference_0 AS (SELECT projects.id FROM projects WHERE projects.id = %s::uuid AND projects.delete_time IS NULL FOR SHARE), "
    f"companion AS (INSERT INTO audit_log_entries ({', '.join(AUDIT_COLS)}) "
    f"SELECT {', '.join('%s' + c for c in PG_AUDIT_CASTS)} WHERE EXISTS (SELECT 1 FROM reference_0)) "
    f"INSERT INTO tasks ({', '.join(INSERT_COLS)}) SELECT {', '.join('%s' + c for c in PG_TASK_CASTS)} "
    "WHERE EXISTS (SELECT 1 FROM reference_0) RETURNING tasks.id"
)


USER_COLS = (
    "users.id, users.username, users.email, users.external_id, users.full_name, users.avatar_url, users.role, "
    "users.is_active, users.is_verified, users.preferences, users.last_login_time, users.create_time, "
    "users.update_time, users.revision, users.delete_time"
)


# ======================================================================== row -> proto


def task_from_row(d: Dialect, r: tuple, deps: list[str]) -> wpb.Task:
    t = wpb.Task(
        id=d.uid_out(r[0]),
        project_id=d.uid_out(r[1]),
        title=r[2],
        status=STATUS_NUM[r[6]],
        priority=PRIORITY_NUM[r[7]],
        estimated_hours=r[9],
        actual_hours=r[10],
        etag=f'W/"{r[15]}"',
    )
    if r[3] is not None:
        t.description = r[3]
    if r[4] is not None:
        t.assignee_id = d.uid_out(r[4])
    if r[5] is not None:
        t.creator_id = d.uid_out(r[5])
    if r[8] is not None:
        t.due_date.year, t.due_date.month, t.due_date.day = d.date_out(r[8])
    tags = d.json_out(r[11])
    if tags:
        t.tags.extend(tags)
    if r[12] is not None:
        _set_ts(t.completed_time, d.ts_micros(r[12]))
    if deps:
        t.dependency_ids.extend(deps)
    _set_ts(t.create_time, d.ts_micros(r[13]))
    _set_ts(t.update_time, d.ts_micros(r[14]))
    if r[16] is not None:
        _set_ts(t.delete_time, d.ts_micros(r[16]))
    return t


def user_from_row(d: Dialect, r: tuple) -> ipb.User:
    u = ipb.User(id=d.uid_out(r[0]), username=r[1], email=r[2], role=ROLE_NUM[r[6]], is_active=bool(r[7]),
                 is_verified=bool(r[8]), etag=f'W/"{r[13]}"')
    if r[3] is not None:
        u.external_id = r[3]
    if r[4] is not None:
        u.full_name = r[4]
    if r[5] is not None:
        u.avatar_url = r[5]
    prefs = d.json_out(r[9])
    if prefs is not None:
        u.preferences.update(prefs)
    if r[10] is not None:
        _set_ts(u.last_login_time, d.ts_micros(r[10]))
    _set_ts(u.create_time, d.ts_micros(r[11]))
    _set_ts(u.update_time, d.ts_micros(r[12]))
    if r[14] is not None:
        _set_ts(u.delete_time, d.ts_micros(r[14]))
    names = d.list_names(r[15])
    if names:
        u.role_names.extend(names)
    return u


# ======================================================================== the database side


class Store:
    """Blocking database work; each pool thread has its own connection."""

    def __init__(self, target: str, threads: int, audit: bool = True) -> None:
        kind, _, rest = target.partition(":")
        self.d: Dialect = SQLite() if kind == "sqlite" else Postgres()
        self.target = rest
        self.local = threading.local()
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="floor-db")
        self.audit = audit
        # The actor of the audit entries: the newest API key (the floor does not authenticate).
        cur = self.cursor()
        cur.execute("SELECT id FROM api_keys ORDER BY create_time DESC LIMIT 1")
        key = cur.fetchone()
        self.actor = ("api_key", key[0]) if key else ("system", None)
        self.conn().close()
        self.local.conn = None

    # ---------------------------------------------------------------- connections

    def conn(self) -> Any:
        c = getattr(self.local, "conn", None)
        if c is None:
            if self.d.name == "sqlite":
                c = sqlite3.connect(self.target, timeout=10.0, isolation_level=None, check_same_thread=True)
                c.execute("PRAGMA foreign_keys=ON")
                c.execute("PRAGMA busy_timeout=10000")
                c.execute("PRAGMA journal_mode=WAL")
                c.execute("PRAGMA synchronous=NORMAL")
            else:
                import psycopg2

                c = psycopg2.connect(host="127.0.0.1", port=5432, user="postgres", dbname=self.target,
                                     connect_timeout=10, application_name="nexus-floor")
                c.autocommit = True
            self.local.conn = c
        return c

    def cursor(self) -> Any:
        return self.conn().cursor()

    def begin(self, cur: Any, write: bool) -> None:
        if self.d.name == "sqlite":
            cur.execute("BEGIN IMMEDIATE" if write else "BEGIN DEFERRED")

    def commit(self, cur: Any) -> None:
        if self.d.name == "sqlite":
            cur.execute("COMMIT")

    def rollback(self, cur: Any) -> None:
        if self.d.name == "sqlite":
            try:
                cur.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    @contextlib.contextmanager
    def write_transaction(self, cur: Any) -> Iterator[None]:
        """A transaction of several write statements (the PostgreSQL connection is in autocommit)."""
        cur.execute("BEGIN IMMEDIATE" if self.d.name == "sqlite" else "BEGIN")
        try:
            yield
        except BaseException:
            try:
                cur.execute("ROLLBACK")
            except Exception:  # noqa: BLE001 - the connection may be gone: the error that got here is the one to report
                pass
            raise
        cur.execute("COMMIT")

    # ---------------------------------------------------------------- reads

    def get_user(self, req: ipb.GetUserRequest) -> ipb.User:
        d = self.d
        uid = parse_id(req.id, "id")
        cur = self.cursor()
        cur.execute(f"SELECT {USER_COLS}, {d.user_roles} FROM users WHERE users.id = {d.ph}", (d.uid_in(uid),))
        row = cur.fetchone()
        if row is None or row[14] is not None:
            raise Fail(grpc.StatusCode.NOT_FOUND, f"User {req.id!r} not found")
        return user_from_row(d, row)

    def get_task(self, req: wpb.GetTaskRequest) -> wpb.Task:
        d = self.d
        tid = parse_id(req.id, "id")
        cur = self.cursor()
        cur.execute(f"SELECT {TASK_COLS}, {d.task_deps} FROM tasks WHERE tasks.id = {d.ph}", (d.uid_in(tid),))
        row = cur.fetchone()
        if row is None or (row[16] is not None and not req.show_deleted):
            raise Fail(grpc.StatusCode.NOT_FOUND, f"Task {req.id!r} not found")
        return task_from_row(d, row, d.list_deps(row[17]))

    def _deps(self, cur: Any, ids: list[Any]) -> dict[Any, list[str]]:
        """Dependency ids of a page of tasks, in one query (what a selectin load does)."""
        if not ids:
            return {}
        d = self.d
        marks = ", ".join(d.ph for _ in ids)
        cur.execute(
            f"SELECT task_id, depends_on_id FROM task_dependencies WHERE task_id IN ({marks}) ORDER BY depends_on_id", ids
        )
        out: dict[Any, list[str]] = {}
        for task_id, dep in cur.fetchall():
            out.setdefault(task_id, []).append(d.uid_out(dep))
        return out

    def list_tasks(self, req: wpb.ListTasksRequest) -> wpb.ListTasksResponse:
        d, ph = self.d, self.d.ph
        m = FILTER.match(req.filter)
        if not m or m.group(2).lower() not in STATUS_NUM or req.order_by or req.show_deleted:
            raise Fail(grpc.StatusCode.UNIMPLEMENTED, "the floor only serves filter 'project_id = \"<id>\" AND status = <STATUS>'")
        if req.page_size < 0:
            raise Fail(grpc.StatusCode.INVALID_ARGUMENT, "page_size must not be negative")
        size = min(req.page_size or 50, 1000)
        project = d.uid_in(parse_id(m.group(1), "filter"))
        status = m.group(2).lower()
        where = f"tasks.project_id = {ph} AND tasks.status = {ph} AND tasks.delete_time IS NULL"
        params: list[Any] = [project, status]
        page_where, page_params = where, list(params)
        fp = f"{project}|{status}"
        if req.page_token:
            try:
                tok = json.loads(base64.urlsafe_b64decode(req.page_token + "=" * (-len(req.page_token) % 4)))
                assert tok["f"] == fp
                after_ts = tok["t"] if d.name == "sqlite" else dt.datetime.fromisoformat(tok["t"])
                after_id = tok["i"]
            except Exception:  # noqa: BLE001
                raise Fail(grpc.StatusCode.INVALID_ARGUMENT, "page_token is not a page token this query issued") from None
            # The service's NULL-aware keyset condition, verbatim.
            page_where += (
                f" AND (tasks.create_time > {ph} OR tasks.create_time IS NULL OR "
                f"tasks.create_time = {ph} AND (tasks.id > {ph} OR tasks.id IS NULL))"
            )
            page_params += [after_ts, after_ts, after_id]
        limit = "LIMIT ? OFFSET ?" if d.name == "sqlite" else "LIMIT %s"
        page_params += [size + 1, 0] if d.name == "sqlite" else [size + 1]
        cur = self.cursor()
        self.begin(cur, False)
        try:
            cur.execute(
                f"SELECT {TASK_COLS} FROM tasks WHERE {page_where} "
                f"ORDER BY tasks.create_time ASC NULLS LAST, tasks.id ASC NULLS LAST {limit}",
                page_params,
            )
            rows = cur.fetchall()
            token = ""
            if len(rows) > size:
                rows = rows[:size]
                last = rows[-1]
                t = last[13] if d.name == "sqlite" else last[13].isoformat()
                raw = json.dumps({"f": fp, "t": t, "i": last[0]}, separators=(",", ":")).encode()
                token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
            deps = self._deps(cur, [r[0] for r in rows])
            cur.execute(f"SELECT count(*) FROM tasks WHERE {where}", params)
            total = cur.fetchone()[0]
            self.commit(cur)
        except BaseException:
            self.rollback(cur)
            raise
        resp = wpb.ListTasksResponse(next_page_token=token, total_size=total)
        resp.tasks.extend([task_from_row(d, r, deps.get(r[0], [])) for r in rows])
        return resp

    def search_tasks(self, req: wpb.SearchTasksRequest) -> wpb.SearchTasksResponse:
        d = self.d
        if req.filter:
            raise Fail(grpc.StatusCode.UNIMPLEMENTED, "the floor serves SearchTasks without a filter only")
        words = WORD.findall(req.query.lower())
        if not words or len(req.query) > 1024:
            raise Fail(grpc.StatusCode.INVALID_ARGUMENT, "query must contain at least one word")
        size = min(req.page_size or 50, 1000)
        offset = 0
        if req.page_token:
            try:
                offset = int(base64.urlsafe_b64decode(req.page_token + "=" * (-len(req.page_token) % 4)).decode())
            except Exception:  # noqa: BLE001
                raise Fail(grpc.StatusCode.INVALID_ARGUMENT, "bad page_token") from None
        if d.name == "sqlite":
            match = " ".join(f'"{w}"' for w in words)
            page_sql = (
                f"SELECT {TASK_COLS}, {SQLITE_SCORE} AS score FROM tasks JOIN tasks_fts ON tasks.rowid = tasks_fts.rowid "
                "WHERE tasks.delete_time IS NULL AND (tasks_fts MATCH ?) ORDER BY score DESC, tasks.id LIMIT ? OFFSET ?"
            )
            page_params: list[Any] = [match, size + 1, offset]
            count_sql = (
                "SELECT count(*) FROM tasks JOIN tasks_fts ON tasks.rowid = tasks_fts.rowid "
                "WHERE tasks.delete_time IS NULL AND (tasks_fts MATCH ?)"
            )
            count_params: list[Any] = [match]
        else:
            q = "plainto_tsquery('english'::regconfig, %s)"
            page_sql = (
                f"SELECT {TASK_COLS}, ts_rank({PG_VECTOR}, {q}) AS score FROM tasks "
                f"WHERE tasks.delete_time IS NULL AND {PG_VECTOR} @@ {q} ORDER BY score DESC, tasks.id LIMIT %s OFFSET %s"
            )
            page_params = [req.query, req.query, size + 1, offset]
            count_sql = f"SELECT count(*) FROM tasks WHERE tasks.delete_time IS NULL AND {PG_VECTOR} @@ {q}"
            count_params = [req.query]
        cur = self.cursor()
        self.begin(cur, False)
        try:
            cur.execute(page_sql, page_params)
            rows = cur.fetchall()
            token = ""
            if len(rows) > size:
                rows = rows[:size]
                token = base64.urlsafe_b64encode(str(offset + size).encode()).decode().rstrip("=")
            deps = self._deps(cur, [r[0] for r in rows])
            cur.execute(count_sql, count_params)
            total = cur.fetchone()[0]
            self.commit(cur)
        except BaseException:
            self.rollback(cur)
            raise
        resp = wpb.SearchTasksResponse(next_page_token=token, total_size=total)
        for r in rows:
            resp.results.add(task=task_from_row(d, r, deps.get(r[0], [])), score=float(r[17]))
        return resp

    # ---------------------------------------------------------------- writes

    def _new_row(self, msg: wpb.Task, now: dt.datetime, field: str) -> tuple[tuple, wpb.Task, list[dict[str, Any]]]:
        """Validated insert values for one task, the Task the service would return, and the
        changes its audit entry reports (every set field, in the order of the table's columns)."""
        d = self.d
        if not msg.title:
            raise Fail(grpc.StatusCode.INVALID_ARGUMENT, f"{field}.title is required")
        if len(msg.title) > 255:
            raise Fail(grpc.StatusCode.INVALID_ARGUMENT, f"{field}.title must be at most 255 characters")
        project = parse_id(msg.project_id, f"{field}.project_id")
        assignee = parse_id(msg.assignee_id, f"{field}.assignee_id") if msg.assignee_id else None
        creator = parse_id(msg.creator_id, f"{field}.creator_id") if msg.creator_id else None
        if msg.estimated_hours < 0 or msg.actual_hours < 0 or not math.isfinite(msg.estimated_hours + msg.actual_hours):
            raise Fail(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: hours must be finite and not negative")
        status = STATUS_DB.get(msg.status, "todo") if msg.status else "todo"
        priority = PRIORITY_DB.get(msg.priority, "medium") if msg.priority else "medium"
        tags = list(dict.fromkeys(msg.tags))
        due = None
        if msg.HasField("due_date"):
            due = dt.date(msg.due_date.year, msg.due_date.month, msg.due_date.day)
        tid = uuid7()
        ts = d.ts_in(now)
        completed = ts if status == "done" else None
        row = (
            d.uid_in(tid), d.uid_in(project), msg.title, msg.description or None,
            d.uid_in(assignee) if assignee else None, d.uid_in(creator) if creator else None,
            status, priority, due.isoformat() if due and d.name == "sqlite" else due,
            float(msg.estimated_hours), float(msg.actual_hours), d.json_in(tags), completed, ts, ts, 1,
        )
        micros = (now - EPOCH_AWARE) // ONE_US
        out = wpb.Task(
            id=str(tid), project_id=str(project), title=msg.title, status=STATUS_NUM[status], priority=PRIORITY_NUM[priority],
            estimated_hours=msg.estimated_hours, actual_hours=msg.actual_hours, etag='W/"1"',
        )
        if msg.description:
            out.description = msg.description
        if assignee:
            out.assignee_id = str(assignee)
        if creator:
            out.creator_id = str(creator)
        if due:
            out.due_date.CopyFrom(msg.due_date)
        if tags:
            out.tags.extend(tags)
        if completed is not None:
            _set_ts(out.completed_time, micros)
        _set_ts(out.create_time, micros)
        _set_ts(out.update_time, micros)
        changes: list[dict[str, Any]] = []
        if self.audit:
            plain = (
                ("project_id", str(project)), ("title", msg.title), ("description", msg.description or None),
                ("assignee_id", str(assignee) if assignee else None), ("creator_id", str(creator) if creator else None),
                ("status", status), ("priority", priority), ("due_date", due.isoformat() if due else None),
                ("estimated_hours", float(msg.estimated_hours)), ("actual_hours", float(msg.actual_hours)),
                ("tags", tags or None), ("completed_time", now.isoformat() if completed is not None else None), ("id", str(tid)),
            )
            changes = [{"field": f, "old_value": None, "new_value": v} for f, v in plain if v is not None]
        return row, out, changes

    def _audit_row(self, task_id: Any, action: str, method: str, changes: list[dict[str, Any]], now: dt.datetime) -> tuple:
        """One audit_log_entries row, as the service writes it (request id: a fresh one per call)."""
        d = self.d
        summary = " ".join([action, "Task", *(c["field"] for c in changes)])
        return (d.uid_in(uuid7()), d.ts_in(now), self.actor[0], self.actor[1], action, "Task", task_id,
                json.dumps(changes), str(uuid.uuid4()), WORK + method, summary)

    def _fk_error(self, exc: Exception) -> Fail | None:
        text = str(exc).lower()
        if "foreign key" in text:
            return Fail(grpc.StatusCode.NOT_FOUND, "a referenced project or user does not exist")
        return None

    def create_task(self, req: wpb.CreateTaskRequest) -> wpb.Task:
        d = self.d
        now = dt.datetime.now(UTC)
        row, out, changes = self._new_row(req.task, now, "task")
        marks = ", ".join(d.ph for _ in INSERT_COLS)
        cur = self.cursor()
        try:
            if not self.audit:
                cur.execute(f"INSERT INTO tasks ({', '.join(INSERT_COLS)}) VALUES ({marks})", row)
                return out
            audit = self._audit_row(row[0], "create", "CreateTask", changes, now)
            if d.name == "postgresql":
                cur.execute(PG_CREATE, (row[1], *audit, *row))
                if cur.fetchone() is None:
                    raise Fail(grpc.StatusCode.NOT_FOUND, f"Project {req.task.project_id!r} not found")
                return out
            with self.write_transaction(cur):
                cur.execute(PROJECT_CHECK.format(ph=d.ph, lock=""), (row[1],))
                if cur.fetchone() is None:
                    raise Fail(grpc.StatusCode.NOT_FOUND, f"Project {req.task.project_id!r} not found")
                cur.execute(f"INSERT INTO tasks ({', '.join(INSERT_COLS)}) VALUES ({marks})", row)
                cur.execute(SQLITE_AUDIT_INSERT, audit)
        except Fail:
            raise
        except Exception as exc:  # noqa: BLE001
            raise (self._fk_error(exc) or exc) from None
        return out

    def batch_create_tasks(self, req: wpb.BatchCreateTasksRequest) -> wpb.BatchCreateTasksResponse:
        d = self.d
        n = len(req.requests)
        if n == 0 or n > MAX_BATCH:
            raise Fail(grpc.StatusCode.INVALID_ARGUMENT, f"requests must hold 1 to {MAX_BATCH} requests")
        now = dt.datetime.now(UTC)
        rows, outs, audits = [], [], []
        for i, sub in enumerate(req.requests):
            row, out, changes = self._new_row(sub.task, now, f"requests[{i}].task")
            rows.append(row)
            outs.append(out)
            if self.audit:
                audits.append(self._audit_row(row[0], "create", "BatchCreateTasks", changes, now))
        cols = ", ".join(INSERT_COLS)
        cur = self.cursor()
        try:
            if d.name == "postgresql" and not self.audit:
                from psycopg2.extras import execute_values

                # One statement for up to 1000 rows: atomic without an explicit transaction.
                execute_values(cur, f"INSERT INTO tasks ({cols}) VALUES %s", rows, page_size=MAX_BATCH)
            else:
                with self.write_transaction(cur):
                    if self.audit:
                        lock = " FOR SHARE" if d.name == "postgresql" else ""
                        for project in dict.fromkeys(r[1] for r in rows):
                            cur.execute(PROJECT_CHECK.format(ph=d.ph, lock=lock), (project,))
                            if cur.fetchone() is None:
                                raise Fail(grpc.StatusCode.NOT_FOUND, f"Project {d.uid_out(project)!r} not found")
                    if d.name == "postgresql":
                        from psycopg2.extras import execute_values

                        execute_values(cur, f"INSERT INTO tasks ({cols}) VALUES %s", rows, page_size=MAX_BATCH)
                        execute_values(cur, f"INSERT INTO audit_log_entries ({', '.join(AUDIT_COLS)}) VALUES %s", audits,
                                       page_size=MAX_BATCH)
                    else:
                        cur.executemany(f"INSERT INTO tasks ({cols}) VALUES ({', '.join('?' for _ in INSERT_COLS)})", rows)
                        if audits:
                            cur.executemany(SQLITE_AUDIT_INSERT, audits)
        except Fail:
            raise
        except Exception as exc:  # noqa: BLE001
            raise (self._fk_error(exc) or exc) from None
        resp = wpb.BatchCreateTasksResponse()
        resp.tasks.extend(outs)
        return resp

    def update_task(self, req: wpb.UpdateTaskRequest) -> wpb.Task:
        d, ph = self.d, self.d.ph
        msg = req.task
        tid = parse_id(msg.id, "task.id")
        paths = list(req.update_mask.paths) or [p for p in ("title", "status", "description", "priority") if getattr(msg, p)]
        values: dict[str, Any] = {}
        for p in paths:
            if p == "title":
                if not msg.title or len(msg.title) > 255:
                    raise Fail(grpc.StatusCode.INVALID_ARGUMENT, "task.title is required, at most 255 characters")
                values[p] = msg.title
            elif p == "description":
                values[p] = msg.description or None
            elif p == "status":
                values[p] = STATUS_DB.get(msg.status, "todo") if msg.status else "todo"
            elif p == "priority":
                values[p] = PRIORITY_DB.get(msg.priority, "medium") if msg.priority else "medium"
            else:
                raise Fail(grpc.StatusCode.UNIMPLEMENTED, f"the floor does not update {p!r}")
        expected = None
        if msg.etag:
            m = re.fullmatch(r'W/"(\d+)"', msg.etag)
            if not m:
                raise Fail(grpc.StatusCode.ABORTED, f"etag {msg.etag!r} is stale")
            expected = int(m.group(1))
        if self.audit:
            return self._update_audited(msg, tid, values, expected)
        sets = [f"{p} = {ph}" for p in values]
        params: list[Any] = list(values.values())
        new_status_sql = ph if "status" in values else "tasks.status"
        status = values.get("status")
        now = d.ts_in(dt.datetime.now(UTC))
        # completed_time follows the status, as the service's _task_rules does.
        sets.append(f"completed_time = CASE WHEN {new_status_sql} = 'done' THEN coalesce(completed_time, {ph}) ELSE NULL END")
        if new_status_sql == ph:
            params.append(status)  # the new status, compared in the CASE
        params.append(now)
        sets.append(f"update_time = {ph}")
        params.append(now)
        sets.append("revision = revision + 1")
        where = f"tasks.id = {ph} AND tasks.delete_time IS NULL"
        params.append(d.uid_in(tid))
        if expected is not None:
            where += f" AND tasks.revision = {ph}"
            params.append(expected)
        cur = self.cursor()
        cur.execute(f"UPDATE tasks SET {', '.join(sets)} WHERE {where} RETURNING {TASK_COLS}, {d.task_deps}", params)
        row = cur.fetchone()
        if row is None:
            cur.execute(f"SELECT revision FROM tasks WHERE id = {ph} AND delete_time IS NULL", (d.uid_in(tid),))
            if cur.fetchone() is None:
                raise Fail(grpc.StatusCode.NOT_FOUND, f"Task {msg.id!r} not found")
            raise Fail(grpc.StatusCode.ABORTED, f"etag {msg.etag!r} is stale")
        return task_from_row(d, row, d.list_deps(row[17]))

    def _update_audited(self, msg: wpb.Task, tid: uuid.UUID, values: dict[str, Any], expected: int | None) -> wpb.Task:
        """The service's Update: the row read, the changed fields written at the revision read,
        with their audit entry (PostgreSQL: one statement in autocommit, the entry a CTE selecting
        from the UPDATE; SQLite: one IMMEDIATE transaction). A row changed in between is read again."""
        d, ph = self.d, self.d.ph
        cur = self.cursor()
        for _ in range(5):
            with self.write_transaction(cur) if d.name == "sqlite" else contextlib.nullcontext():
                cur.execute(f"SELECT {TASK_COLS} FROM tasks WHERE tasks.id = {ph}", (d.uid_in(tid),))
                old = cur.fetchone()
                if old is None or old[16] is not None:
                    raise Fail(grpc.StatusCode.NOT_FOUND, f"Task {msg.id!r} not found")
                if expected is not None and old[15] != expected:
                    raise Fail(grpc.StatusCode.ABORTED, f"etag {msg.etag!r} is stale")
                now = dt.datetime.now(UTC)
                new = dict(values)
                # completed_time follows the status, as the service's _task_rules does.
                done = new.get("status", old[6]) == "done"
                new["completed_time"] = (old[12] if old[12] is not None else d.ts_in(now)) if done else None
                changed = [(f, i) for f, i in UPDATED_FIELDS if f in new and new[f] != old[i]]
                if not changed:
                    return task_from_row(d, old, self._deps(cur, [old[0]]).get(old[0], []))
                changes = [{"field": f, "old_value": d.plain(old[i]), "new_value": d.plain(new[f])} for f, i in changed]
                sets = ", ".join([f"{f} = {ph}" for f, _ in changed] + [f"update_time = {ph}", f"revision = {ph}"])
                params = [new[f] for f, _ in changed] + [d.ts_in(now), old[15] + 1, old[0], old[15]]
                audit = self._audit_row(old[0], "update", "UpdateTask", changes, now)
                update = f"UPDATE tasks SET {sets} WHERE tasks.id = {ph} AND tasks.revision = {ph} RETURNING {TASK_COLS}, {d.task_deps}"
                if d.name == "postgresql":
                    cur.execute(
                        f"WITH updated AS ({update}), companion AS (INSERT INTO audit_log_entries ({', '.join(AUDIT_COLS)}) "
                        f"SELECT {', '.join('%s' + c for c in PG_AUDIT_CASTS)} FROM updated) SELECT * FROM updated",
                        params + list(audit),
                    )
                    row = cur.fetchone()
                    if row is None:
                        continue  # changed since the read: read it again
                else:
                    cur.execute(update, params)
                    row = cur.fetchone()
                    cur.execute(SQLITE_AUDIT_INSERT, audit)
                return task_from_row(d, row, d.list_deps(row[17]))
        raise Fail(grpc.StatusCode.ABORTED, f"Task {msg.id!r} kept changing")


# ======================================================================== gRPC side


class Floor:
    def __init__(self, store: Store) -> None:
        self.store = store

    async def call(self, fn: Callable[[Any], Any], request: Any, context: grpc.aio.ServicerContext) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self.store.executor, fn, request)
        except Fail as exc:
            await context.abort(exc.code, exc.message)


class IdentityFloor(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(self, floor: Floor) -> None:
        self.f = floor

    async def GetUser(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self.f.call(self.f.store.get_user, request, context)


class WorkFloor(work_pb2_grpc.WorkServiceServicer):
    def __init__(self, floor: Floor) -> None:
        self.f = floor

    async def GetTask(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self.f.call(self.f.store.get_task, request, context)

    async def ListTasks(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self.f.call(self.f.store.list_tasks, request, context)

    async def SearchTasks(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self.f.call(self.f.store.search_tasks, request, context)

    async def CreateTask(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self.f.call(self.f.store.create_task, request, context)

    async def UpdateTask(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self.f.call(self.f.store.update_task, request, context)

    async def BatchCreateTasks(self, request: Any, context: Any) -> Any:  # noqa: N802
        return await self.f.call(self.f.store.batch_create_tasks, request, context)


class GenericOnly:
    """Stands in for the server while a servicer registers: its methods are served through the
    generic handler only, as the service serves its own (service/interceptors.py). grpc.aio waits
    on one pending future per registered method for every incoming call."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: Any) -> None:
        """Not registered: the generic handler answers them."""


async def serve(target: str, host: str, port: int, threads: int, max_rpcs: int, audit: bool = True) -> None:
    store = Store(target, threads, audit)
    floor = Floor(store)
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ],
        maximum_concurrent_rpcs=max_rpcs,
    )
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(IdentityFloor(floor), GenericOnly(server))
    work_pb2_grpc.add_WorkServiceServicer_to_server(WorkFloor(floor), GenericOnly(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise SystemExit(f"floor: cannot bind {host}:{port}")
    await server.start()
    await health_servicer.set("readiness", health_pb2.HealthCheckResponse.SERVING)
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    print(f"floor serving {target} on {host}:{port} with {threads} database threads, "
          f"{'with audit entries' if audit else 'bare (no audit entries, no reference checks)'}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)
    store.executor.shutdown(wait=False, cancel_futures=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--db", required=True, help="sqlite:/path/file.db or postgresql:DBNAME (127.0.0.1:5432, user postgres)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--threads", type=int, default=30, help="database threads = connections (default 30, the service's 10 + 20)")
    p.add_argument("--max-concurrent-rpcs", type=int, default=1000)
    p.add_argument("--bare", action="store_true",
                   help="writes without their audit entry and reference check: one INSERT / UPDATE in autocommit")
    a = p.parse_args()
    asyncio.run(serve(a.db, a.host, a.port, a.threads, a.max_concurrent_rpcs, audit=not a.bare))


if __name__ == "__main__":
    main()
