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

    def load(self, session: Session, ids: Sequence[Any]) -> dict[Any, list[Any]]:
        out: dict[Any, list[Any]] = {}
        if ids:
            for row in session.execute(self.statement, {"ids": list(ids)}):
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
        columns = spec.relation_columns.get(key, ("id",))
        target = rel.mapper.local_table
        order = list(rel.order_by or ())
        if columns == ("id",) and all(c is target.c.id for c in order):
            # Only the ids, ordered by id: the association table alone answers.
            stmt = select(parent_fk, target_fk.label("id")).order_by(parent_fk, target_fk)
        else:
            stmt = (
                select(parent_fk, *(target.c[name] for name in columns))
                .join_from(secondary, target, target_pk == target_fk)
                .order_by(parent_fk, *order)
            )
        stmt = stmt.where(parent_fk.in_(bindparam("ids", expanding=True)))
        out.append(RelationLoader(key, stmt))
    return tuple(out)


def load_rows(session: Session, spec: ResourceSpec, stmt: Any, extra: int = 0) -> list[Any]:
    """Execute stmt (the table's columns first, then `extra` more) and attach the relations.

    Returns Loaded rows, or (Loaded, extra values...) tuples when extra > 0.
    """
    result = session.execute(stmt)
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
