"""db/bulk.insert_many and write_many write every column type as SQLAlchemy's own INSERT would (on PostgreSQL
it sends the rows as one JSON array)."""
from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import event, insert, select

from db import bulk, errors
from db.base import uuid7
from db.database import Database
from db.domains.identity import User
from db.domains.work import Project, Task
from db.unit import SESSION_READ
from tests.conftest import Client

TRICKY_TEXT = 'quote " apostrophe \' backslash \\ newline \n tab \t unicode é 中文 emoji 🚀 {"json": [1]} %(x)s ? :rows'
CEST = dt.timezone(dt.timedelta(hours=2))
NOW = dt.datetime(2026, 3, 4, 5, 6, 7, 890123, dt.UTC)


def _user(i: int, word: str) -> dict[str, Any]:
    return dict(
        id=uuid7(), username=f"{word}{i}", email=f"{word}{i}@example.com", external_id=None, full_name=TRICKY_TEXT,
        avatar_url=None, role="user", is_active=bool(i % 2), is_verified=False,
        preferences={"nested": {"list": [1, 2.5, None, True, "x"], "text": TRICKY_TEXT}, "empty": {}},
        password_hash="$argon2id$v=19$m=1024,t=1,p=1$c2FsdA$aGFzaA", last_login_time=dt.datetime(2026, 5, 1, 12, 30, 15, 123456, CEST),
        create_time=NOW, update_time=NOW, revision=1, delete_time=None,
    )


def _project(i: int, word: str, owner: uuid.UUID) -> dict[str, Any]:
    return dict(
        id=uuid7(), name=f"{word} {i}", description=TRICKY_TEXT if i else None, owner_id=owner, status="active",
        priority="high", start_date=dt.date(2026, 1, 31), end_date=dt.date(2026, 12, 31) if i else None,
        budget_amount=Decimal("123456789012345.123456789") if i else Decimal("-0.000000001"), budget_currency="EUR",
        archived=False, create_time=NOW, update_time=NOW, revision=3, delete_time=None,
    )


def _task(i: int, word: str, project: uuid.UUID) -> dict[str, Any]:
    return dict(
        id=uuid7(), project_id=project, title=f"{word} {i}", description=TRICKY_TEXT, assignee_id=None, creator_id=None,
        status="todo", priority="low", due_date=dt.date(2027, 2, 28), estimated_hours=0.1 * (i + 1), actual_hours=1e-7,
        tags=["a", TRICKY_TEXT, ""] if i else [], completed_time=None, create_time=dt.datetime(2026, 1, 1, 0, 0, 0, 1, CEST),
        update_time=NOW, revision=1, delete_time=NOW if i else None,
    )


def _read(database: Database, model: Any, ids: list[uuid.UUID]) -> list[dict[str, Any]]:
    def work(session: Any) -> list[dict[str, Any]]:
        rows = session.execute(select(model.__table__).where(model.__table__.c.id.in_(ids))).mappings().all()
        return sorted((dict(r) for r in rows), key=lambda r: ids.index(r["id"]))

    return database.run_sync(work, SESSION_READ)


def _write_both_ways(database: Database, model: Any, make: Any) -> uuid.UUID:
    """Three rows through insert_many, three through SQLAlchemy's INSERT; equal when read back."""
    ours, theirs = make("o"), make("t")
    statements: list[str] = []
    listener = lambda conn, cursor, statement, *args: statements.append(statement)  # noqa: E731
    event.listen(database.engine, "before_cursor_execute", listener)
    try:
        database.run_sync(lambda s: bulk.insert_many(s.connection(), model.__table__, ours))
    finally:
        event.remove(database.engine, "before_cursor_execute", listener)
    one_json_array = any("json_populate_recordset" in statement for statement in statements)
    assert one_json_array == database.is_postgres, statements
    database.run_sync(lambda s: s.connection().execute(insert(model.__table__), theirs))
    got_ours = _read(database, model, [r["id"] for r in ours])
    got_theirs = _read(database, model, [r["id"] for r in theirs])
    assert len(got_ours) == len(got_theirs) == 3
    for a, b in zip(got_ours, got_theirs, strict=True):
        differing = {k for k in a if k not in ("id", "username", "email", "name", "title") and a[k] != b[k]}
        assert not differing, {k: (a[k], b[k]) for k in differing}
    assert [r["create_time"] for r in got_ours] == [r["create_time"] for r in ours]
    return ours[0]["id"]


def test_rows_read_back_as_sqlalchemys_own_insert_writes_them(client: Client, uid: str) -> None:
    database = Database(client.database_url)
    try:
        owner = _write_both_ways(database, User, lambda w: [_user(i, f"b{uid}{w}") for i in range(3)])
        project = _write_both_ways(database, Project, lambda w: [_project(i, f"b{uid}{w}", owner) for i in range(3)])
        _write_both_ways(database, Task, lambda w: [_task(i, f"b{uid}{w}", project) for i in range(3)])
    finally:
        database.dispose()


def test_a_refused_row_refuses_the_whole_insert(client: Client, uid: str) -> None:
    database = Database(client.database_url)
    try:
        users = [_user(i, f"r{uid}") for i in range(3)]
        users[2]["username"] = users[0]["username"]  # unique
        with pytest.raises(errors.AlreadyExists):
            database.run_sync(lambda s: bulk.insert_many(s.connection(), User.__table__, users))
        assert _read(database, User, [u["id"] for u in users]) == []
    finally:
        database.dispose()


def test_write_many_overwrites_the_rows_of_its_ids_and_inserts_the_others(client: Client, uid: str) -> None:
    """What write_many leaves reads back as SQLAlchemy's own INSERT of the same values writes it:
    a row whose id is there is overwritten (every column), a new one inserted, others untouched."""
    database = Database(client.database_url)
    try:
        first = [_user(i, f"w{uid}") for i in range(3)]
        database.run_sync(lambda s: bulk.insert_many(s.connection(), User.__table__, first))
        untouched = _read(database, User, [first[2]["id"]])
        later = NOW + dt.timedelta(seconds=1)
        changed = [
            {**u, "full_name": f"changed {i} {TRICKY_TEXT}", "preferences": {"k": [i, None]}, "is_active": not u["is_active"],
             "last_login_time": None, "revision": 2, "update_time": later}
            for i, u in enumerate(first[:2])
        ]
        rows = changed + [_user(i, f"n{uid}") for i in range(2)]
        database.run_sync(lambda s: bulk.write_many(s.connection(), User.__table__, rows))
        theirs = [{**r, "id": uuid7(), "username": f"t{i}{uid}", "email": f"t{i}{uid}@example.com"} for i, r in enumerate(rows)]
        database.run_sync(lambda s: s.connection().execute(insert(User.__table__), theirs))
        got_ours = _read(database, User, [r["id"] for r in rows])
        got_theirs = _read(database, User, [r["id"] for r in theirs])
        assert len(got_ours) == len(got_theirs) == 4
        for a, b in zip(got_ours, got_theirs, strict=True):
            assert {k: v for k, v in a.items() if k not in ("id", "username", "email")} == {k: v for k, v in b.items() if k not in ("id", "username", "email")}
        assert [r["full_name"] for r in got_ours[:2]] == [r["full_name"] for r in changed]
        assert _read(database, User, [first[2]["id"]]) == untouched
    finally:
        database.dispose()
