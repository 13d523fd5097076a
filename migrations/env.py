"""Alembic environment: the service's own metadata, batch mode for SQLite, FTS5 tables ignored."""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool

import db.domains  # noqa: F401 - every domain's tables on the metadata
from db.base import Base
from db.migrate import include_name

config = context.config
target_metadata = Base.metadata


def _url() -> str:
    """sqlalchemy.url when given (`alembic -x` or a config), else the database the service's own
    configuration names (DATABASE_URL, DB_*, NEXUS_DATA_DIR, or the default data directory), so
    the alembic CLI and `nexus-data migrate` work on the same database."""
    given = config.get_main_option("sqlalchemy.url")
    if given:
        return given
    from service.config import Config

    return Config.from_env().database_url


def _configure(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        include_name=include_name,
    )


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_url(), poolclass=pool.NullPool)
    with engine.begin() as conn:
        _configure(conn)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
