"""The read path: rows fetched with SQLAlchemy Core, their relations in one query per relation.

Get, BatchGet, List and Search answer from plain rows: the ORM's identity map, instance state
and selectin machinery cost more Python per row than the SQL does (bench/README.md). A `Loaded`
row carries the column values as attributes, as a mapped instance would, plus each relation the
output needs as a list of rows, so the same codecs turn either into a message. Ids come as text
(`id_text`), the form the messages carry; code that binds one back to a Uuid column parses it.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import String, Uuid, bindparam, inspect, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import FunctionElement

from db.resource import ResourceSpec


class id_text(FunctionElement[str]):
    """A UUID column read as its canonical text ("0190a3c4-…"), the form the API sends.

    The database writes the text: psycopg2 would otherwise build a uuid.UUID per value (and
    SQLite's CHAR(32) would go through one) that the output turns straight back into a string,
    about 2 µs a value, 200 values on a page of tasks.
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


# Bound parameters that carry ids as text: the relation loaders' parent ids.
ID_TEXT = Uuid(as_uuid=False)


def as_read(column: Any) -> Any:
    """column as the read path selects it: ids as text (id_text), labelled with its key."""
    return id_text(column).label(column.key) if isinstance(column.type, Uuid) else column


class Loaded:
    """One row read with Core: column values and loaded relations as attributes."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)


@functools.lru_cache(maxsize=None)
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


@dataclass(frozen=True)
class RelationLoader:
    """Loads one many-to-many relation for a set of parent ids, in the relationship's order."""

    key: str
    statement: Any  # parent id (text) as column 0, then the target's columns; :ids is expanding
    join: Any  # (the parent table joined to the related rows, their columns (ids as text), their order)

    def load(self, session: Session, ids: Sequence[str]) -> dict[str, list[Any]]:
        """The related rows of each parent, by the parent's id as text (as Loaded rows carry it)."""
        out: dict[str, list[Any]] = {}
        if ids:
            for row in session.connection().execute(self.statement, {"ids": list(ids)}):
                out.setdefault(row[0], []).append(row)
        return out


@functools.lru_cache(maxsize=None)
def relation_loaders(spec: ResourceSpec) -> tuple[RelationLoader, ...]:
    mapper = inspect(spec.model)
    out = []
    for key in spec.relation_fields:
        rel = mapper.relationships[key]
        secondary = rel.secondary
        ((parent_pk, parent_fk),) = rel.synchronize_pairs
        ((target_pk, target_fk),) = rel.secondary_synchronize_pairs
        names = spec.relation_columns.get(key, ("id",))
        order_names = [c.key for c in rel.order_by or ()]
        joined = spec.table.outerjoin(secondary, parent_pk == parent_fk)
        if names == ("id",) and order_names in ([], ["id"]):
            # Only the ids, ordered by id: the association table alone answers.
            columns, order = [id_text(target_fk).label("id")], [target_fk]
            stmt = select(id_text(parent_fk), *columns)
        else:
            # An alias, so a relation of a table to itself can join it a second time.
            target = rel.mapper.local_table.alias(f"related_{key}")
            target_pk = target.c[target_pk.key]
            columns = [as_read(target.c[name]) for name in names]
            order = [target.c[name] for name in order_names]
            stmt = select(id_text(parent_fk), *columns).join_from(secondary, target, target_pk == target_fk)
            joined = joined.outerjoin(target, target_pk == target_fk)
        stmt = stmt.where(parent_fk.in_(bindparam("ids", type_=ID_TEXT, expanding=True))).order_by(parent_fk, *order)
        out.append(RelationLoader(key, stmt, (joined, columns, order)))
    return tuple(out)


@dataclass(frozen=True)
class PreparedGet:
    """load_one's primary-key statement compiled once per dialect: its SQL text, how to bind
    the id, how to convert each result column. Run with exec_driver_sql, it skips the
    statement cache lookup and result setup that cost more than the query on a Get."""

    sql: str
    bind_names: tuple[str, ...]  # positional order (qmark), or () for named parameters
    id_processor: Any
    dialect: Any
    types: tuple[Any, ...]  # of the selected columns, for this dialect
    # Result processors need the driver's column type codes: made from the first result.
    processors: list[tuple[Any, ...]] = field(default_factory=list)

    def process(self, result: Any) -> list[tuple[Any, ...]]:
        if not self.processors:
            codes = [d[1] for d in result.cursor.description]
            self.processors.append(tuple(t.result_processor(self.dialect, code) for t, code in zip(self.types, codes)))
        processors = self.processors[0]
        return [tuple(p(v) if p else v for p, v in zip(processors, r)) for r in result.all()]

    def params(self, row_id: Any) -> Any:
        value = self.id_processor(row_id) if self.id_processor else row_id
        return tuple(value for _ in self.bind_names) if self.bind_names else {"pk": value}


_PREPARED: dict[tuple[int, str], PreparedGet] = {}


def prepared_get(spec: ResourceSpec, dialect: Any) -> PreparedGet:
    key = (id(spec), dialect.name)
    prepared = _PREPARED.get(key)
    if prepared is None:
        id_type = spec.table.c.id.type
        stmt, selected = _get_statement(spec, spec.table.c.id == bindparam("pk", type_=id_type))
        compiled = stmt.compile(dialect=dialect)
        prepared = PreparedGet(
            sql=str(compiled),
            bind_names=tuple(compiled.positiontup or ()) if compiled.positional else (),
            id_processor=id_type.dialect_impl(dialect).bind_processor(dialect),
            types=tuple(c.type.dialect_impl(dialect) for c in selected),
            dialect=dialect,
        )
        _PREPARED[key] = prepared
    return prepared


def _get_statement(spec: ResourceSpec, *conditions: Any) -> tuple[Any, list[Any]]:
    """The statement of load_one and the columns it selects (the table's, then the first relation's)."""
    loaders = relation_loaders(spec)
    if not loaders:
        return select_rows(spec).where(*conditions), columns(spec)
    joined, related, order = loaders[0].join
    selected = [*columns(spec), *related]
    return select(*selected).select_from(joined).where(*conditions).order_by(*order), selected


def load_by_id(session: Session, spec: ResourceSpec, row_id: Any) -> Loaded | None:
    """load_one(spec.table.c.id == row_id), through the prepared statement."""
    conn = session.connection()
    prepared = prepared_get(spec, conn.dialect)
    result = prepared.process(conn.exec_driver_sql(prepared.sql, prepared.params(row_id)))
    return _assemble(session, spec, result)


def load_one(session: Session, spec: ResourceSpec, *conditions: Any) -> Loaded | None:
    """The one row matching conditions (a primary-key lookup), with its relations.

    The first relation comes in the same query (an outer join: one result row per related
    row), the others with a query each: a Get is one round trip for most resources.
    """
    stmt, _ = _get_statement(spec, *conditions)
    return _assemble(session, spec, session.connection().execute(stmt).all())


def _assemble(session: Session, spec: ResourceSpec, result: Sequence[Sequence[Any]]) -> Loaded | None:
    """The Loaded row from load_one's result rows (one per row of the joined relation)."""
    if not result:
        return None
    width = len(spec.table.c)
    row = row_class(spec)(dict(zip([c.key for c in spec.table.c], result[0][:width])))
    loaders = relation_loaders(spec)
    if loaders:
        first = loaders[0]
        names = [c.key for c in first.join[1]]
        setattr(row, first.key, [Loaded(dict(zip(names, r[width:]))) for r in result if r[width] is not None])
        for loader in loaders[1:]:
            setattr(row, loader.key, loader.load(session, [row.id]).get(row.id, []))
    return row


def load_rows(session: Session, spec: ResourceSpec, stmt: Any, extra: int = 0) -> list[Any]:
    """Execute stmt (the table's columns first, then `extra` more) and attach the relations.

    Returns Loaded rows, or (Loaded, extra values...) tuples when extra > 0.
    """
    # Core statements on the session's connection: the ORM's execute path (autoflush, events,
    # ORM compile state) costs more than the query on a primary-key read.
    result = session.connection().execute(stmt)
    keys = [c.key for c in spec.table.c]
    width = len(keys)
    rows = result.all()
    make = row_class(spec)
    loaded = [make(dict(zip(keys, row[:width]))) for row in rows]
    loaders = relation_loaders(spec)
    if loaders and loaded:
        ids = [row.id for row in loaded]
        for loader in loaders:
            related = loader.load(session, ids)
            for row in loaded:
                setattr(row, loader.key, related.get(row.id, []))
    if extra:
        return [(item, *row[width:]) for item, row in zip(loaded, rows)]
    return loaded


def columns(spec: ResourceSpec) -> list[Any]:
    """The table's columns as the read path selects them (ids as text), in the order load_rows
    expects them."""
    return [as_read(c) for c in spec.table.c]


@functools.lru_cache(maxsize=None)
def select_rows(spec: ResourceSpec) -> Any:
    """SELECT of the table's columns, built once (statements are immutable; .where() copies)."""
    return select(*columns(spec))
