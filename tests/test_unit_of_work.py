"""The unit of work: one transaction per call, nothing committed past the caller's deadline."""
from __future__ import annotations

import time
import uuid

import pytest
from sqlalchemy import func, insert, select

from db import errors
from db.database import Database
from db.models import Role
from tests.conftest import Client


def _count(database: Database, name: str) -> int:
    return int(database.run_sync(lambda s: s.scalar(select(func.count()).select_from(Role).where(Role.name == name)), write=False))


def test_nothing_commits_after_the_deadline(client: Client) -> None:
    database = Database(client.database_url)
    name = f"late{uuid.uuid4().hex[:8]}"
    try:
        def slow_write(session: object) -> None:
            session.execute(insert(Role).values(id=uuid.uuid4(), name=name, permissions=[]))  # type: ignore[attr-defined]
            time.sleep(0.3)

        with pytest.raises(errors.DeadlineExceeded):
            database.run_sync(slow_write, deadline=time.monotonic() + 0.1)
        assert _count(database, name) == 0
        database.run_sync(slow_write, deadline=time.monotonic() + 30)
        assert _count(database, name) == 1
    finally:
        database.dispose()
