"""Many rows into one table in one statement.

On PostgreSQL the rows travel as one JSON array (serialized by orjson, which writes UUIDs,
datetimes and dates itself), unpacked by `json_populate_recordset` into the table's own row type:
the driver quotes one string instead of adapting every value of every row (SQLAlchemy's
insertmanyvalues renders one placeholder per value), and the server parses one literal instead
of a VALUES list of thousands: on a large BatchCreateTasks both the service and PostgreSQL
spend less CPU (bench/README.md). Elsewhere
(SQLite: executemany in C), and for a table with a column type JSON cannot carry, it is
SQLAlchemy's multi-row INSERT.
"""
from __future__ import annotations

import functools
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import JSON, Boolean, Date, DateTime, Float, Integer, Numeric, String, Uuid, bindparam, insert, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from db.base import ExactDecimal, UTCDateTime
from db.prepared import prepared

# Column types whose values JSON carries and PostgreSQL reads back from their JSON form: UUIDs,
# timestamps (RFC 3339 with offset), dates and decimals as text; the rest as JSON values
# (JSON / JSONB columns take the nested value as it is).
_CARRIED = (Uuid, UTCDateTime, DateTime, Date, ExactDecimal, Numeric, Float, JSON, String, Integer, Boolean)


def insert_many(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    """INSERT rows (dicts with the same keys, column values as the model takes them)."""
    if not rows:
        return
    keys = tuple(rows[0])
    if len(rows) == 1:
        # One row: a statement compiled once, run on the DBAPI cursor (db/prepared.py).
        prepared(_one_row_insert(table, keys), conn.dialect).rows(conn, {f"p_{key}": value for key, value in rows[0].items()})
        return
    if conn.dialect.name != "postgresql" or not _carried(table, keys):
        conn.execute(insert(table), rows)
        return
    # OPT_NAIVE_UTC: a naive datetime is UTC, as UTCDateTime stores it (it never reaches here:
    # every timestamp the service makes is aware).
    payload = orjson.dumps(rows, default=_decimal_text, option=orjson.OPT_NAIVE_UTC).decode()
    conn.execute(_recordset_insert(table, keys), {"rows": payload})


def write_many(conn: Connection, table: Any, rows: list[dict[str, Any]]) -> None:
    """insert_many, except that a row whose id is there already overwrites that row's other
    columns (INSERT ... ON CONFLICT (id) DO UPDATE): new rows and replaced ones in one
    statement, which on PostgreSQL takes them as one JSON array as insert_many does."""
    if not rows:
        return
    keys = tuple(rows[0])
    if conn.dialect.name == "postgresql" and _carried(table, keys):
        payload = orjson.dumps(rows, default=_decimal_text, option=orjson.OPT_NAIVE_UTC).decode()
        conn.execute(_recordset_write(table, keys), {"rows": payload})
        return
    conn.execute(_overwriting_insert(table, keys, conn.dialect.name), rows)


def _decimal_text(value: Any) -> str:
    if isinstance(value, Decimal):
        return str(value)  # exact; NUMERIC reads it back as it is
    raise TypeError(f"{type(value).__name__} is not a column value insert_many can write")


@functools.cache
def _carried(table: Any, keys: tuple[str, ...]) -> bool:
    return all(isinstance(table.c[key].type, _CARRIED) for key in keys)


@functools.cache
def _one_row_insert(table: Any, keys: tuple[str, ...]) -> Any:
    """INSERT of one row's keys, parameters p_<column> (a bind named as its column is reserved)."""
    return insert(table).values({key: bindparam(f"p_{key}", type_=table.c[key].type) for key in keys})


@functools.cache
def _recordset_insert(table: Any, keys: tuple[str, ...]) -> Any:
    quote = postgresql.dialect().identifier_preparer.quote
    name = quote(table.name)
    columns = ", ".join(quote(key) for key in keys)
    return text(f"INSERT INTO {name} ({columns}) SELECT {columns} FROM json_populate_recordset(NULL::{name}, :rows)")


@functools.cache
def _recordset_write(table: Any, keys: tuple[str, ...]) -> Any:
    quote = postgresql.dialect().identifier_preparer.quote
    overwritten = ", ".join(f"{quote(key)} = EXCLUDED.{quote(key)}" for key in keys if key != "id")
    return text(f"{_recordset_insert(table, keys).text} ON CONFLICT (id) DO UPDATE SET {overwritten}")


@functools.cache
def _overwriting_insert(table: Any, keys: tuple[str, ...], dialect: str) -> Any:
    make = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = make(table)
    return stmt.on_conflict_do_update(index_elements=[table.c.id], set_={key: stmt.excluded[key] for key in keys if key != "id"})
