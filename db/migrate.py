"""Schema migrations at run time: upgrade to head (or move to a revision), or check the schema is at head."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent
# Any fixed number: replicas starting together on PostgreSQL migrate one at a time.
_ADVISORY_LOCK_KEY = 7_340_221


# PostgreSQL's column of each searchable table's tsvector (migration 0020; db/engine/search.py):
# kept by the database, never declared on the models.
SEARCH_VECTOR = "search_vector"


class SchemaMismatch(RuntimeError):
    """The database is not at the schema this build expects."""


class UnknownRevision(ValueError):
    """A revision this build's migrations do not have."""


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Autogenerate's filter: full-text search objects (SQLite FTS5 tables and their shadow
    tables, PostgreSQL's stored search vectors and their GIN indexes) are made by migrations,
    not declared on models."""
    if name is None:
        return True
    if type_ == "table" and "_fts" in name:
        return False
    if type_ == "column" and name == SEARCH_VECTOR:
        return False
    return not (type_ == "index" and name.startswith("ix_") and name.endswith("_search"))


def alembic_config() -> AlembicConfig:
    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _migrating(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction, for migrations. On SQLite foreign keys are off meanwhile
    and checked before the commit: a batch migration rebuilds a table (a copy, the old one
    dropped, the copy renamed), and with them on, dropping a table that others reference would
    delete their rows (ON DELETE CASCADE) or fail. The pragma holds only outside a transaction,
    so it is set on the connection before the migration's BEGIN."""
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if sqlite:
            _pragma(conn, "PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                yield conn
                if sqlite:
                    broken = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"the migration left {len(broken)} row(s) whose references are missing, e.g. {tuple(broken[0])}")
        finally:
            if sqlite:
                _pragma(conn, "PRAGMA foreign_keys=ON")


def _pragma(conn: Connection, statement: str) -> None:
    """A pragma on the DBAPI connection itself, outside any transaction (the connection's
    pysqlite runs without implicit transactions: db/database.py)."""
    cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(statement)
    finally:
        cursor.close()


def upgrade(engine: Engine, target: str = "head") -> None:
    cfg = alembic_config()
    with _migrating(engine) as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_KEY})
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, target)


def downgrade(engine: Engine, target: str) -> None:
    cfg = alembic_config()
    with _migrating(engine) as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, target)


def migrate_to(engine: Engine, target: str) -> None:
    """Move the schema to target: "head", "base", or a revision of this build's migrations,
    upgrading when it is past the database's revision and downgrading when it is before it.
    UnknownRevision for any other name."""
    script = ScriptDirectory.from_config(alembic_config())
    known = {revision.revision for revision in script.walk_revisions()}
    if target not in known | {"head", "base"}:
        raise UnknownRevision(f"{target!r} is not a revision of this build: head, base, or one of {', '.join(sorted(known))}")
    current = current_revision(engine)
    behind = target == "base" or (current is not None and target in {r.revision for r in script.iterate_revisions(current, "base")})
    if behind and target != current:
        downgrade(engine, target)
    elif target != current:
        upgrade(engine, target)


def check(engine: Engine) -> None:
    """Raise SchemaMismatch unless the database is at this build's head revision."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise SchemaMismatch(
            f"database schema is at {current or 'nothing'}, this build needs {head}: run `nexus-data migrate`"
        )
