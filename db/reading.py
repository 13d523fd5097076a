"""The read path: rows fetched with SQLAlchemy Core, their relations in one query per relation.

Get, BatchGet, List and Search answer from plain rows: the ORM's identity map, instance state
and selectin machinery cost more Python per row than the SQL does (bench/README.md). A `Loaded`
row carries the column values as attributes, as a mapped instance would, plus each relation the
output needs as a list of rows, so the same codecs turn either into a message.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, inspect, select
from sqlalchemy.orm import Session

from db.resource import ResourceSpec


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
    statement: Any  # parent id as column 0, then the target's columns; :ids is expanding
    join: Any  # (the parent table joined to the related rows, their columns, their order)

    def load(self, session: Session, ids: Sequence[Any]) -> dict[Any, list[Any]]:
        out: dict[Any, list[Any]] = {}
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
            columns, order = [target_fk.label("id")], [target_fk]
            stmt = select(parent_fk, *columns)
        else:
            # An alias, so a relation of a table to itself can join it a second time.
            target = rel.mapper.local_table.alias(f"related_{key}")
            target_pk = target.c[target_pk.key]
            columns = [target.c[name] for name in names]
            order = [target.c[name] for name in order_names]
            stmt = select(parent_fk, *columns).join_from(secondary, target, target_pk == target_fk)
            joined = joined.outerjoin(target, target_pk == target_fk)
        stmt = stmt.where(parent_fk.in_(bindparam("ids", expanding=True))).order_by(parent_fk, *order)
        out.append(RelationLoader(key, stmt, (joined, columns, order)))
    return tuple(out)


def load_one(session: Session, spec: ResourceSpec, *conditions: Any) -> Loaded | None:
    """The one row matching conditions (a primary-key lookup), with its relations.

    The first relation comes in the same query (an outer join: one result row per related
    row), the others with a query each: a Get is one round trip for most resources.
    """
    loaders = relation_loaders(spec)
    if not loaders:
        rows = load_rows(session, spec, select_rows(spec).where(*conditions))
        return rows[0] if rows else None
    first, rest = loaders[0], loaders[1:]
    joined, columns, order = first.join
    stmt = select(*spec.table.c, *columns).select_from(joined).where(*conditions).order_by(*order)
    result = session.connection().execute(stmt).all()
    if not result:
        return None
    width = len(spec.table.c)
    row = row_class(spec)(dict(zip([c.key for c in spec.table.c], result[0][:width])))
    names = [c.key for c in columns]
    setattr(row, first.key, [Loaded(dict(zip(names, r[width:]))) for r in result if r[width] is not None])
    for loader in rest:
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
    """The table's columns, in the order load_rows expects them."""
    return list(spec.table.c)


@functools.lru_cache(maxsize=None)
def select_rows(spec: ResourceSpec) -> Any:
    """SELECT of the table's columns, built once (statements are immutable; .where() copies)."""
    return select(*spec.table.c)
