"""tests/databases.py: fresh_postgres_database() yields a usable database and drops it after."""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from tests.databases import fresh_postgres_database, postgres_admin_url


def _database_exists(name: str) -> bool:
    admin = sa.create_engine(postgres_admin_url(), poolclass=NullPool)
    try:
        with admin.connect() as conn:
            return bool(
                conn.execute(
                    sa.text("SELECT count(*) FROM pg_database WHERE datname = :name"),
                    {"name": name},
                ).scalar_one()
            )
    finally:
        admin.dispose()


def test_fresh_database_is_usable_and_dropped_afterwards() -> None:
    with fresh_postgres_database(prefix="nexus_selftest") as url:
        name = make_url(url).database
        assert name is not None and name.startswith("nexus_selftest_")
        assert _database_exists(name)

        engine = sa.create_engine(url)
        with engine.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE probe (id integer PRIMARY KEY, label text NOT NULL)")
            conn.exec_driver_sql("INSERT INTO probe VALUES (1, 'héllo')")
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT label FROM probe").scalar_one() == "héllo"
            assert conn.exec_driver_sql("SHOW server_encoding").scalar_one() == "UTF8"
        # The pool still holds an open connection: the drop must terminate it, not fail.

    assert not _database_exists(name)
    engine.dispose()


def test_fresh_databases_are_distinct() -> None:
    with fresh_postgres_database() as first, fresh_postgres_database() as second:
        assert make_url(first).database != make_url(second).database
        assert make_url(first).database.startswith("nexus_test_")
