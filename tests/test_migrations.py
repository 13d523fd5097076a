"""Alembic owns the schema: models and migrations agree, and migrations run both ways."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

import db.domains  # noqa: F401 - every table on the metadata
from db import migrate
from db.base import Base
from db.database import Database
from db.engine.resource import REGISTRY
from db.migrate import include_name
from service.config import Config
from service.server import create_server
from tests.conftest import BACKENDS, ServerThread, make_config
from tests.databases import fresh_postgres_database


@pytest.fixture(params=BACKENDS)
def empty_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'empty.db'}"
    else:
        with fresh_postgres_database("nexus_migr") as url:
            yield url


def _diff(url: str) -> list[object]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True, "include_name": include_name})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_models_and_migrations_agree(empty_url: str) -> None:
    database = Database(empty_url)
    migrate.upgrade(database.engine)
    database.dispose()
    assert _diff(empty_url) == []


def test_upgrade_downgrade_upgrade(empty_url: str) -> None:
    database = Database(empty_url)
    try:
        migrate.upgrade(database.engine)
        assert migrate.current_revision(database.engine) == migrate.head_revision()
        model_tables = set(Base.metadata.tables)
        assert model_tables <= _tables(empty_url)
        migrate.downgrade(database.engine, "base")
        assert migrate.current_revision(database.engine) is None
        assert _tables(empty_url) & model_tables == set()
        assert not {t for t in _tables(empty_url) if t.endswith("_fts")}, "search tables dropped too"
        migrate.upgrade(database.engine)
        assert migrate.current_revision(database.engine) == migrate.head_revision()
    finally:
        database.dispose()
    assert _diff(empty_url) == []


def test_search_index_exists_after_upgrade(empty_url: str) -> None:
    database = Database(empty_url)
    try:
        migrate.upgrade(database.engine)
        with database.engine.connect() as conn:
            searchable = [spec.table.name for spec in REGISTRY if spec.searchable]
            assert searchable
            if database.is_postgres:
                # each one a GIN index on the table's stored vector, which the database computes
                defs = dict(conn.execute(text("SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE '%_search'")).all())
                assert {t: defs.get(f"ix_{t}_search") for t in searchable} == {t: f"CREATE INDEX ix_{t}_search ON public.{t} USING gin (search_vector)" for t in searchable}
                generated = set(conn.execute(text(
                    "SELECT table_name FROM information_schema.columns WHERE column_name = 'search_vector' AND data_type = 'tsvector' AND is_generated = 'ALWAYS'"
                )).scalars())
                assert set(searchable) <= generated
            else:
                names = set(conn.execute(text("SELECT name FROM sqlite_master WHERE type='table' AND name LIKE '%_fts'")).scalars())
                assert {f"{t}_fts" for t in searchable} <= names
    finally:
        database.dispose()


def test_server_refuses_a_mismatched_schema_when_not_migrating(empty_url: str) -> None:
    config: Config = make_config(empty_url, migrate_on_start=False)
    with pytest.raises(migrate.SchemaMismatch, match="nexus-data migrate"):
        create_server(config)
    # With migration on (the default) the same database is brought to head and served. (Started
    # and stopped: a grpc.aio server made and never started cannot be shut down, and its core
    # server would stay in this process.)
    server = ServerThread(make_config(empty_url)).start()
    try:
        assert server.app is not None
        assert migrate.current_revision(server.app.db.engine) == migrate.head_revision()
    finally:
        server.stop()


def test_request_records_take_their_creators_principal(empty_url: str) -> None:
    """0005 keys request ids by caller: a record made before it takes the actor of the audit
    entry its create wrote, so that caller's retry still answers the first result."""
    import uuid

    database = Database(empty_url)
    try:
        migrate.upgrade(database.engine, "0004")
        key_id, row_id, other_row = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        uid = Base.metadata.tables["request_records"].c.id.type  # a Uuid, stored as each dialect stores it
        with database.engine.begin() as conn:
            store = uid.bind_processor(conn.dialect) or (lambda v: v)
            for rid, resource in (("r-1", row_id), ("r-2", other_row)):
                conn.execute(
                    text("INSERT INTO request_records (id, resource_type, request_id, resource_id, create_time) "
                         "VALUES (:id, 'Task', :rid, :res, CURRENT_TIMESTAMP)"),
                    {"id": store(uuid.uuid4()), "rid": rid, "res": store(resource)},
                )
            conn.execute(
                text("INSERT INTO audit_log_entries (id, actor_type, actor_id, action, resource_type, resource_id, request_id, changes, summary, create_time) "
                     "VALUES (:id, 'api_key', :actor, 'create', 'Task', :res, 'an x-request-id', '{}', '', CURRENT_TIMESTAMP)"),
                {"id": store(uuid.uuid4()), "actor": store(key_id), "res": store(row_id)},
            )
        migrate.upgrade(database.engine)
        with database.engine.connect() as conn:
            found = dict(conn.execute(text("SELECT request_id, principal FROM request_records")).all())
        assert found == {"r-1": f"api_key:{key_id}", "r-2": ""}
        migrate.downgrade(database.engine, "0004")
        migrate.upgrade(database.engine)
    finally:
        database.dispose()


def test_every_row_stays_searchable_across_0020_both_ways(empty_url: str) -> None:
    """0020 moves PostgreSQL's search index from the tsvector expression onto a stored column:
    a row written before it is found after it (the rewrite computes every row's vector), and a
    row written after it is found again below it. Each step searches as that revision's index
    does (SQLite's FTS5 table, which 0020 leaves as it is)."""
    import uuid

    database = Database(empty_url)
    word = f"wombat{uuid.uuid4().hex[:8]}"
    uid = Base.metadata.tables["audit_log_entries"].c.id.type

    def write(summary: str) -> None:
        with database.engine.begin() as conn:
            store = uid.bind_processor(conn.dialect) or (lambda v: v)
            conn.execute(
                text("INSERT INTO audit_log_entries (id, actor_type, actor_id, action, resource_type, resource_id, request_id, changes, summary, create_time) "
                     "VALUES (:id, 'system', NULL, 'create', 'Task', :res, '', '{}', :summary, CURRENT_TIMESTAMP)"),
                {"id": store(uuid.uuid4()), "res": store(uuid.uuid4()), "summary": summary},
            )

    def found(stored: bool) -> set[str]:
        if not database.is_postgres:
            sql = "SELECT e.summary FROM audit_log_entries e JOIN audit_log_entries_fts f ON e.rowid = f.rowid WHERE audit_log_entries_fts MATCH :q"
        elif stored:
            sql = "SELECT summary FROM audit_log_entries WHERE search_vector @@ websearch_to_tsquery('english', :q)"
        else:
            sql = ("SELECT summary FROM audit_log_entries "
                   "WHERE setweight(to_tsvector('english'::regconfig, coalesce(summary, '')), 'A') @@ websearch_to_tsquery('english', :q)")
        with database.engine.connect() as conn:
            return set(conn.execute(text(sql), {"q": word}).scalars())

    try:
        migrate.upgrade(database.engine, "0019")
        write(f"before the {word}")
        assert found(stored=False) == {f"before the {word}"}
        migrate.upgrade(database.engine)
        assert found(stored=True) == {f"before the {word}"}
        write(f"after the {word}")
        assert found(stored=True) == {f"before the {word}", f"after the {word}"}
        migrate.downgrade(database.engine, "0019")
        assert found(stored=False) == {f"before the {word}", f"after the {word}"}
        if database.is_postgres:
            with database.engine.connect() as conn:
                assert conn.execute(text("SELECT count(*) FROM information_schema.columns WHERE column_name = 'search_vector'")).scalar() == 0
        migrate.upgrade(database.engine)
        assert found(stored=True) == {f"before the {word}", f"after the {word}"}
    finally:
        database.dispose()
