"""The read path: rows fetched with SQLAlchemy Core, with their relations, in one statement.

Get, BatchGet, List and Search answer from plain rows: the ORM's identity map, instance state
and selectin machinery cost more Python per row than the SQL does (bench/README.md). A `Loaded`
row carries the column values as attributes, as a mapped instance would, plus each relation the
output needs as a list of rows, so the same codecs turn either into a message. Each relation
comes as one JSON array per row from a correlated subquery (RelationLoader.aggregate), so a Get,
a page (with its total_size) or a search is one statement. Ids come as text (`id_text`), the
form the messages carry; code that binds one back to a Uuid column parses it.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from sqlalchemy import String, Uuid, bindparam, func, inspect, literal_column, select
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import ColumnElement, FunctionElement
from sqlalchemy.types import NullType

from db.engine.resource import ResourceSpec
from db.prepared import prepared


class id_text(FunctionElement[str]):
    """A UUID column read as its canonical text ("0190a3c4-…"), the form the API sends.

    The database writes the text: psycopg2 would otherwise build a uuid.UUID per value (and
    SQLite's CHAR(32) would go through one) that the output turns straight back into a string,
    for every id of every row of a page (bench/README.md).
    """

    type = String()
    name = "id_text"
    inherit_cache = True


@compiles(id_text)
def _id_text_default(element: id_text, compiler: Any, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS VARCHAR)"


@compiles(id_text, "postgresql")
def _id_text_postgresql(element: id_text, compiler: Any, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS TEXT)"


@compiles(id_text, "sqlite")
def _id_text_sqlite(element: id_text, compiler: Any, **kw: Any) -> str:
    # Stored as 32 hex digits (SQLAlchemy's Uuid on SQLite): put the dashes in. NULL stays NULL.
    x = compiler.process(element.clauses, **kw)
    parts = " || '-' || ".join(f"substr({x}, {start}, {length})" for start, length in ((1, 8), (9, 4), (13, 4), (17, 4), (21, 12)))
    return f"({parts})"


class array_of(FunctionElement[Any]):
    """ARRAY(<select>) (PostgreSQL): the one column of a subquery's rows as an array, in the
    subquery's order. psycopg2 reads a text[] into a list in C."""

    type = NullType()  # the driver's list as it is: no result processing
    name = "array_of"
    inherit_cache = True


@compiles(array_of, "postgresql")
def _array_of_postgresql(element: array_of, compiler: Any, **kw: Any) -> str:
    (subquery,) = element.clauses
    return f"ARRAY({compiler.process(subquery.element, **kw)})"


def as_text_if_id(column: Any) -> Any:
    """column, or id_text(column) for a UUID column."""
    return id_text(column) if isinstance(column.type, Uuid) else column


def as_read(column: Any) -> Any:
    """column as the read path selects it: ids as text (id_text), labelled with its key."""
    return id_text(column).label(column.key) if isinstance(column.type, Uuid) else column


class Loaded:
    """One row read with Core: column values and loaded relations as attributes."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


@functools.cache
def row_class(spec: ResourceSpec) -> type[Loaded]:
    """Loaded plus the model's own computed attributes (properties, constants) for spec."""
    mapped = set(inspect(spec.model).all_orm_descriptors.keys())
    extras: dict[str, Any] = {}
    for klass in reversed(spec.model.__mro__):
        if klass is object or klass.__module__.startswith("sqlalchemy"):
            continue
        for name, value in vars(klass).items():
            if not name.startswith("_") and name not in mapped and isinstance(value, (property, bool, int, float, str)):
                extras[name] = value
    return type(f"Loaded{spec.name}", (Loaded,), extras)


@dataclass(frozen=True, eq=False)
class RelationLoader:
    """One many-to-many relation of a resource, read with the rows it belongs to (aggregate)."""

    key: str
    names: tuple[str, ...]  # the columns of a related row the output reads
    source: Any  # the association table, joined to the target table when its columns are read
    parent: tuple[Any, Any]  # (the parent's primary key, the association table's column for it)
    targets: tuple[Any, ...]  # the related rows' columns, as stored
    order: tuple[Any, ...]

    @functools.cache  # noqa: B019 - loaders live as long as the process
    def aggregate(self, dialect: str) -> Any:
        """The related rows of the enclosing statement's row as one JSON array of [column, ...]
        arrays: a correlated subquery, so rows and their relations come in one statement and,
        on PostgreSQL's autocommit reads, from one snapshot. SQLite (3.40) cannot order inside
        an aggregate; every output of a relation sorts its values itself. On PostgreSQL a
        relation of one column is an ARRAY of it (ids as text) instead: cheaper to plan and run
        than a JSON aggregate, and parsed in C (bench/README.md);
        on SQLite a JSON array of its values, not of one-value arrays."""
        parent_pk, parent_fk = self.parent
        if dialect == "postgresql" and len(self.targets) == 1:
            stmt = select(as_text_if_id(self.targets[0])).select_from(self.source).where(parent_fk == parent_pk).correlate(parent_pk.table).order_by(*self.order)
            return array_of(stmt.scalar_subquery()).label(f"{self.key}_rows")
        value: ColumnElement[Any]
        if dialect == "postgresql":
            # json_build_array writes a uuid as its canonical text.
            item = func.json_build_array(*self.targets)
            agg = func.json_agg(aggregate_order_by(item, *self.order)) if self.order else func.json_agg(item)
            value = func.coalesce(agg, literal_column("'[]'::json"))
        elif len(self.targets) == 1:  # SQLite, one column: a JSON array of its values
            value = func.json_group_array(as_text_if_id(self.targets[0]))
        else:
            value = func.json_group_array(func.json_array(*(as_text_if_id(c) for c in self.targets)))
        stmt = select(value).select_from(self.source).where(parent_fk == parent_pk).correlate(parent_pk.table)
        return stmt.scalar_subquery().label(f"{self.key}_rows")

    def rows(self, value: Any) -> list[Loaded]:
        """Loaded related rows from aggregate's value (parsed by psycopg2: a list of values or of
        [value, ...] lists; JSON text on SQLite)."""
        items = orjson.loads(value) if isinstance(value, str) else value or ()
        if items and not isinstance(items[0], list):
            (name,) = self.names
            return [Loaded({name: item}) for item in items]
        return [Loaded(dict(zip(self.names, item, strict=True))) for item in items]


def _key(column: ColumnElement[Any]) -> str:
    """A table column's key (a ColumnElement's is optional: an expression has none)."""
    if column.key is None:
        raise TypeError(f"{column} is not a table column")
    return column.key


@functools.cache
def relation_loaders(spec: ResourceSpec) -> tuple[RelationLoader, ...]:
    mapper = inspect(spec.model)
    out = []
    for key in spec.relation_fields:
        rel = mapper.relationships[key]
        secondary, secondary_pairs = rel.secondary, rel.secondary_synchronize_pairs
        if secondary is None or secondary_pairs is None:
            raise TypeError(f"{spec.name}.{key}: a relation field needs a many-to-many relationship (an association table)")
        ((parent_pk, parent_fk),) = rel.synchronize_pairs
        ((target_pk, target_fk),) = secondary_pairs
        names = spec.relation_columns.get(key, ("id",))
        order_names = [_key(c) for c in rel.order_by or ()]
        if names == ("id",) and order_names in ([], ["id"]):
            # Only the ids, ordered by id: the association table alone answers.
            source: Any = secondary
            targets, order = [target_fk], [target_fk]
        else:
            # An alias, so a relation of a table to itself can join it a second time.
            target = rel.mapper.local_table.alias(f"related_{key}")
            source = secondary.join(target, target.c[_key(target_pk)] == target_fk)
            targets = [target.c[name] for name in names]
            order = [target.c[name] for name in order_names]
        out.append(RelationLoader(key, tuple(names), source, (parent_pk, parent_fk), tuple(targets), tuple(order)))
    return tuple(out)


@functools.cache
def _get_statement(spec: ResourceSpec, dialect_name: str) -> Any:
    """load_one's primary-key statement (parameter pk), built once per dialect, so that it is
    compiled once (db/prepared.py runs it on the DBAPI cursor: the statement cache lookup and
    result setup of SQLAlchemy's execution cost more than the query on a Get)."""
    return select(*columns(spec, dialect_name)).where(spec.table.c.id == bindparam("pk", type_=spec.table.c.id.type))


def dialect_of(session: Session) -> str:
    bind = session.get_bind()
    return bind.dialect.name


def load_by_id(session: Session, spec: ResourceSpec, row_id: Any) -> Loaded | None:
    """load_one(spec.table.c.id == row_id), through the prepared statement."""
    conn = session.connection()
    statement = prepared(_get_statement(spec, conn.dialect.name), conn.dialect, processed=True)
    rows = _loaded(spec, statement.rows(conn, {"pk": row_id}))
    return rows[0] if rows else None


def load_one(session: Session, spec: ResourceSpec, *conditions: Any) -> Loaded | None:
    """The one row matching conditions (a primary-key lookup), with its relations: one statement."""
    rows = load_rows(session, spec, select_rows(spec, dialect_of(session)).where(*conditions))
    return rows[0] if rows else None


def _loaded(spec: ResourceSpec, rows: Sequence[Sequence[Any]]) -> list[Loaded]:
    """Loaded rows from result rows of `columns(spec, ...)`: the table's, then each relation's."""
    keys = read_keys(spec)
    width = len(keys)
    make = row_class(spec)
    loaded = [make(dict(zip(keys, row[:width], strict=True))) for row in rows]
    for i, loader in enumerate(relation_loaders(spec)):
        for item, row in zip(loaded, rows, strict=True):
            setattr(item, loader.key, loader.rows(row[width + i]))
    return loaded


def load_rows(session: Session, spec: ResourceSpec, stmt: Any, extra: int = 0, params: dict[str, Any] | None = None) -> list[Any]:
    """Execute stmt (`columns(spec, ...)` first, then `extra` more) with params: Loaded rows with
    their relations, or (Loaded, extra values...) tuples when extra > 0."""
    # Core statements on the session's connection: the ORM's execute path (autoflush, events,
    # ORM compile state) costs more than the query on a primary-key read.
    rows = session.connection().execute(stmt, params or None).all()
    loaded = _loaded(spec, rows)
    if extra:
        width = len(read_keys(spec)) + len(relation_loaders(spec))
        return [(item, *row[width:]) for item, row in zip(loaded, rows, strict=True)]
    return loaded


@functools.cache
def read_columns(spec: ResourceSpec) -> tuple[Any, ...]:
    """The table's columns a read selects: all but those holding secrets (ResourceSpec.secrets),
    which no output reads and which need not leave the database."""
    return tuple(c for c in spec.table.c if c.key not in spec.secrets)


@functools.cache
def read_keys(spec: ResourceSpec) -> tuple[str, ...]:
    """The keys of read_columns(spec), in order: the attributes of a Loaded row."""
    return tuple(c.key for c in read_columns(spec))


@functools.cache
def columns(spec: ResourceSpec, dialect: str) -> tuple[Any, ...]:
    """What the read path selects, in the order load_rows expects: the table's columns but its
    secrets (read_columns; ids as text), then each relation's rows as one aggregated value
    (RelationLoader.aggregate)."""
    return (*(as_read(c) for c in read_columns(spec)), *(loader.aggregate(dialect) for loader in relation_loaders(spec)))


@functools.cache
def select_rows(spec: ResourceSpec, dialect: str) -> Any:
    """SELECT of columns(spec, dialect), built once (statements are immutable; .where() copies)."""
    return select(*columns(spec, dialect))
