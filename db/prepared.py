"""Statements compiled once and run on the DBAPI cursor.

SQLAlchemy's execution of a cached statement (the compiled-cache lookup, the execution context,
the result's metadata, the statement events) costs more than building the SQL did, and on a
write of one statement it is a large share of the unit of work (bench/README.md). A `Prepared` keeps what execution
needs from the one compilation: the SQL text, the bind parameters' names and their types' bind
processors. It runs the statement on the connection's DBAPI cursor and keeps SQLAlchemy's error
handling: a DBAPI error is wrapped as SQLAlchemy wraps it (so db/translate.py reads it the same
way) and a lost connection is invalidated. With DB_ECHO on, statements go through SQLAlchemy so
that they are logged, and so they do while they are traced (`through_sqlalchemy`).

Rows of a `processed` statement (a SELECT) go through its columns' result processors, made from
the driver's type codes of the first result; other rows come back as the driver answers them:
their callers use them only where the driver's value is the value (ints, JSON arrays the driver
or reading.RelationLoader parses, a row or none at all).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import DBAPIError, ResourceClosedError


# True while statements are traced (service/telemetry.py): every prepared statement then goes
# through SQLAlchemy's execution, as with DB_ECHO, so that the engine's events (and the tracing
# that listens to them) see it. Off, statements skip those events: the fast path.
through_sqlalchemy = False


def driver_connection(conn: Connection) -> DBAPIConnection:
    """conn's DBAPI connection. Connection.connection reconnects an invalidated Connection (or
    raises), so its pooled connection has one; None is a pooled connection invalidated behind the
    Connection's back, which is closed."""
    dbapi_conn = conn.connection.dbapi_connection
    if dbapi_conn is None:
        raise ResourceClosedError("the pooled connection was invalidated: it has no DBAPI connection")
    return dbapi_conn


def run_on_cursor(conn: Connection, sql: str, params: Any) -> tuple[Any, Sequence[Any]]:
    """Execute sql with params on conn's DBAPI cursor: (cursor.description, rows); errors
    wrapped and lost connections invalidated as SQLAlchemy's own execution does it."""
    dialect = conn.dialect
    dbapi_conn = driver_connection(conn)
    cursor = dbapi_conn.cursor()
    try:
        cursor.execute(sql, params)
        description = cursor.description
        return description, cursor.fetchall() if description is not None else []
    except dialect.loaded_dbapi.Error as exc:
        lost = dialect.is_disconnect(exc, dbapi_conn, cursor)
        if lost:
            conn.invalidate(exc)
        raise DBAPIError.instance(
            sql, params, exc, dialect.loaded_dbapi.Error, hide_parameters=True, connection_invalidated=lost, dialect=dialect
        ) from exc
    finally:
        cursor.close()


class Prepared:
    """One Core statement compiled for one dialect, run with its parameters by name."""

    def __init__(self, stmt: Any, dialect: Dialect, processed: bool = False) -> None:
        compiled = stmt.compile(dialect=dialect)
        if compiled.escaped_bind_names or getattr(compiled, "literal_execute_params", None) or getattr(compiled, "post_compile_params", None):
            raise ValueError("a statement with escaped or post-compile parameters is not prepared")
        self.stmt = stmt
        self.sql = compiled.string
        self.positional = tuple(compiled.positiontup) if compiled.positiontup else None
        self.names = frozenset(compiled.binds)
        self.processors = {
            name: processor
            for name, bind in compiled.binds.items()
            if (processor := bind.type.dialect_impl(dialect).bind_processor(dialect)) is not None
        }
        self.dialect = dialect
        self.types = tuple(c.type.dialect_impl(dialect) for c in stmt.selected_columns) if processed else None
        # The result processors need the driver's column type codes: made from the first result.
        self._result_processors: tuple[tuple[int, Any], ...] | None = None

    def rows(self, conn: Connection, params: dict[str, Any]) -> Sequence[Any]:
        """The statement's rows (or [] for none) for params, which must name every parameter."""
        if params.keys() != self.names:
            raise KeyError(f"parameters {sorted(params.keys() ^ self.names)} do not match the statement's")
        if through_sqlalchemy or conn.engine.echo:
            result = conn.execute(self.stmt, params)
            return result.all() if result.returns_rows else []
        processors = self.processors
        named = {name: (processors[name](value) if name in processors else value) for name, value in params.items()}
        bound: dict[str, Any] | tuple[Any, ...] = named if self.positional is None else tuple(named[name] for name in self.positional)
        description, rows = run_on_cursor(conn, self.sql, bound)
        if self.types is None:
            return rows
        if self._result_processors is None:
            codes = [d[1] for d in description]
            by_column = [t.result_processor(self.dialect, code) for t, code in zip(self.types, codes, strict=True)]
            # Only the columns that have one (timestamps, decimals…): most values pass as they are.
            self._result_processors = tuple((i, p) for i, p in enumerate(by_column) if p is not None)
        result_processors = self._result_processors
        if not result_processors:
            return rows
        out = []
        for r in rows:
            values = list(r)
            for i, process in result_processors:
                values[i] = process(values[i])
            out.append(values)
        return out


@functools.lru_cache(maxsize=4096)
def prepared(stmt: Any, dialect: Dialect, processed: bool = False) -> Prepared:
    """stmt compiled for dialect, once (stmt is itself built once per shape, so they are few)."""
    return Prepared(stmt, dialect, processed)
