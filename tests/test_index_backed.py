"""On PostgreSQL, with tables of tens of thousands of rows and fresh statistics, the page of a
List is read through an index, never a Seq Scan of the table: for every orderable field of
tasks, projects and users (both directions) and for the filterable fields of tasks a page is
commonly cut by. The statements are the service's own (statements.build_page_statements), the
plans PostgreSQL's (EXPLAIN after ANALYZE); the rows go in with plain SQL."""
from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

import db.domains  # noqa: F401 - registers the resources
from db import migrate
from db.engine import statements
from db.engine.resource import REGISTRY
from tests.databases import fresh_postgres_database

USERS, PROJECTS, TASKS = 20_000, 20_000, 40_000
BASE = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def _fill(conn: sa.Connection) -> None:
    run = lambda sql: conn.exec_driver_sql(sql.replace("%", "%%"))  # noqa: E731 - modulo, not a parameter
    run(f"""
        INSERT INTO users (id, username, email, role, is_active, is_verified, create_time, update_time, revision)
        SELECT md5('u' || i)::uuid, 'user' || i, 'user' || i || '@example.com', 'user', true, true,
               timestamptz '2025-01-01' + i * interval '1 minute', timestamptz '2025-01-01' + (i * 7 % {USERS}) * interval '1 minute', 1
        FROM generate_series(1, {USERS}) AS i""")
    run(f"""
        INSERT INTO projects (id, name, owner_id, status, priority, archived, start_date, end_date, create_time, update_time, revision)
        SELECT md5('p' || i)::uuid, 'project ' || i, md5('u' || (1 + i % {USERS}))::uuid,
               (ARRAY['planning', 'active', 'on_hold', 'completed', 'cancelled'])[1 + i % 5],
               (ARRAY['low', 'medium', 'high', 'critical'])[1 + i % 4], false,
               date '2025-01-01' + (i % 365), date '2026-01-01' + (i % 365),
               timestamptz '2025-01-01' + i * interval '1 minute', timestamptz '2025-01-01' + (i * 7 % {PROJECTS}) * interval '1 minute', 1
        FROM generate_series(1, {PROJECTS}) AS i""")
    run(f"""
        INSERT INTO tasks (id, project_id, title, description, assignee_id, creator_id, status, priority, due_date,
                           estimated_hours, actual_hours, tags, completed_time, create_time, update_time, revision)
        SELECT md5('t' || i)::uuid, md5('p' || (1 + i % 200))::uuid, 'task ' || i, 'about task ' || i,
               md5('u' || (1 + i % 2000))::uuid, md5('u' || (1 + (i * 7) % 2000))::uuid,
               (ARRAY['todo', 'in_progress', 'review', 'done', 'blocked'])[1 + i % 5],
               (ARRAY['low', 'medium', 'high', 'critical'])[1 + i % 4], date '2025-01-01' + (i % 365),
               i % 13, 0, '["x"]'::json,
               CASE WHEN i % 5 = 3 THEN timestamptz '2025-01-01' + i * interval '2 minute' END,
               timestamptz '2025-01-01' + i * interval '1 minute', timestamptz '2025-01-01' + (i * 7 % {TASKS}) * interval '1 minute', 1
        FROM generate_series(1, {TASKS}) AS i""")


@pytest.fixture(scope="module")
def engine() -> Iterator[sa.Engine]:
    with fresh_postgres_database("nexus_index") as url:
        engine = sa.create_engine(url)
        try:
            migrate.upgrade(engine)
            with engine.begin() as conn:
                _fill(conn)
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("ANALYZE users, projects, tasks")
            yield engine
        finally:
            engine.dispose()


def _nodes(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield plan
    for child in plan.get("Plans", ()):
        yield from _nodes(child)


def _seq_scans(engine: sa.Engine, resource: str, filter_text: str = "", order_by: str = "") -> list[str]:
    """The Seq Scans of the resource's own table in the page statement of that List (EXPLAIN);
    a small table a relation reads (a user's roles) may be scanned."""
    spec = REGISTRY[resource]
    shape, params = spec.filter_compiler("postgresql").bind(filter_text)
    stmt, _ = statements.build_page_statements(spec, "postgresql", shape, False, order_by, None, 51, None, False)
    with engine.connect() as conn:
        plan = conn.execute(statements.Explain(stmt), params).scalar()
    return [n["Relation Name"] for n in _nodes(plan[0]["Plan"]) if n["Node Type"] == "Seq Scan" and n.get("Relation Name") == spec.table.name]


ORDERED = [(name, f"{field}{direction}") for name in ("Task", "Project", "User") for field in REGISTRY[name].orderable for direction in ("", " desc")]


@pytest.mark.parametrize(("resource", "order_by"), ORDERED, ids=[f"{r}-{o}" for r, o in ORDERED])
def test_every_order_of_a_page_is_read_through_an_index(engine: sa.Engine, resource: str, order_by: str) -> None:
    assert _seq_scans(engine, resource, order_by=order_by) == []


def _task_filters() -> list[str]:
    user, project = "md5('u' || 17)", "md5('p' || 17)"
    with_ids = {"user": _uuid_of(user), "project": _uuid_of(project)}
    later = (BASE + dt.timedelta(minutes=TASKS - 100)).isoformat().replace("+00:00", "Z")
    return [
        f'project_id = "{with_ids["project"]}"',
        f'assignee_id = "{with_ids["user"]}"',
        f'creator_id = "{with_ids["user"]}"',
        "status = BLOCKED",
        "priority = CRITICAL",
        'due_date = "2025-03-01"',
        f'completed_time > "{(BASE + dt.timedelta(minutes=2 * TASKS - 200)).isoformat().replace("+00:00", "Z")}"',
        f'create_time > "{later}"',
        f'update_time > "{later}"',
    ]


def _uuid_of(md5_sql: str) -> str:
    import hashlib
    import uuid

    text = md5_sql.split("'")[1] + md5_sql.split("|| ")[1].rstrip(")")
    return str(uuid.UUID(hashlib.md5(text.encode()).hexdigest()))


@pytest.mark.parametrize("filter_text", _task_filters())
def test_every_task_filter_is_read_through_an_index(engine: sa.Engine, filter_text: str) -> None:
    assert _seq_scans(engine, "Task", filter_text=filter_text) == []


def test_sqlite_counts_a_task_page_from_the_live_index_alone(tmp_path: Any) -> None:
    """SQLite: the common task page (live tasks of a project in a status) and its count are read
    through the live tasks index, the count from the index alone (a covering index: the
    delete_time its partial WHERE names is one of its columns). Without the column SQLite counted
    through (project_id, status), reading every matching row for its delete_time."""
    import uuid

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'tasks.db'}")
    try:
        migrate.upgrade(engine)
        users = [uuid.uuid4().hex for _ in range(50)]
        projects = [uuid.uuid4().hex for _ in range(20)]
        with engine.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO users (id, username, email, role, is_active, is_verified, create_time, update_time, revision) "
                "VALUES (?, ?, ?, 'user', 1, 1, '2025-01-01 00:00:00', '2025-01-01 00:00:00', 1)",
                [(u, f"user{i}", f"user{i}@example.com") for i, u in enumerate(users)],
            )
            conn.exec_driver_sql(
                "INSERT INTO projects (id, name, owner_id, status, priority, archived, create_time, update_time, revision) "
                "VALUES (?, ?, ?, 'active', 'medium', 0, '2025-01-01 00:00:00', '2025-01-01 00:00:00', 1)",
                [(p, f"project {i}", users[i % len(users)]) for i, p in enumerate(projects)],
            )
            conn.exec_driver_sql(
                "INSERT INTO tasks (id, project_id, title, creator_id, status, priority, estimated_hours, actual_hours, tags, create_time, update_time, revision, delete_time) "
                "VALUES (?, ?, ?, ?, ?, 'low', 0, 0, '[]', ?, ?, 1, ?)",
                [
                    (uuid.uuid4().hex, projects[i % len(projects)], f"task {i}", users[i % len(users)], ("todo", "done", "blocked")[i % 3],
                     f"2025-01-01 00:{i // 600 % 60:02d}:{i // 10 % 60:02d}", "2025-01-01 00:00:00", "2025-02-01 00:00:00" if i % 50 == 0 else None)
                    for i in range(6_000)
                ],
            )
            conn.exec_driver_sql("ANALYZE")
        spec = REGISTRY["Task"]
        shape, params = spec.filter_compiler("sqlite").bind(f'project_id = "{uuid.UUID(projects[3])}" AND status = TODO')
        stmt, _ = statements.build_page_statements(spec, "sqlite", shape, False, "", None, 51, None, True)
        bound = {**params, "count_limit": 10_001}
        compiled = stmt.compile(dialect=engine.dialect)
        values = compiled.construct_params(bound)
        # SQLite holds ids as 32 hex digits (the Uuid type's own binding).
        args = tuple(v.hex if isinstance(v, uuid.UUID) else v for v in (values[name] for name in compiled.positiontup or ()))
        with engine.connect() as conn:
            plan = [row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), args)]
            found = conn.execute(stmt, bound).all()
    finally:
        engine.dispose()
    live = "ix_tasks_live_project_status_create_time"
    assert f"SEARCH tasks USING INDEX {live} (project_id=? AND status=?)" in plan, plan
    assert f"SEARCH tasks USING COVERING INDEX {live} (project_id=? AND status=?)" in plan, plan
    assert not any("ix_tasks_project_id_status" in step for step in plan), plan
    # And it answers: 6,000 tasks over 20 projects, a third of each project's in TODO, the deleted left out.
    assert found and found[0][-1] == sum(1 for i in range(6_000) if i % 20 == 3 and i % 3 == 0 and i % 50)
