"""A delete for good, with what the database's ON DELETE rules would do done first, in the unit
of work: so that every row it removes or changes is audited and heard on its stream."""
from __future__ import annotations

from typing import Any

from google.protobuf.message import Message
from sqlalchemy import delete, func, inspect, literal, select
from sqlalchemy.orm import Session

from db import bulk, errors
from db.base import utcnow
from db.engine import audit, changes, events, reading
from db.engine.resource import REGISTRY, ResourceSpec
from db.engine.rules import predicate
from db.engine.tables import AuditLogEntry
from db.unit import writing


MAX_CASCADE_ROWS = 10_000


def remove_with_dependents(session: Session, spec: ResourceSpec, row: Any, last_state: Message) -> None:
    """Delete row for good, doing first in the unit of work what the database's ON DELETE rules
    would do behind its back, so that engine/changes.flush audits every row the deletion removes
    or changes and each one's stream hears of it: rows that reference it ON DELETE CASCADE are
    deleted (deepest first, so that none was already removed by the database), SET NULL
    references cleared and memberships in other resources' relations removed (both move the
    changed row's etag). A RESTRICT dependent: FAILED_PRECONDITION HAS_DEPENDENTS naming it; more
    than MAX_CASCADE_ROWS rows to change: TOO_MANY_DEPENDENTS; either way nothing changes."""
    counts: dict[str, int] = {}
    levels, changed = _cascade(session, spec, row, counts)
    if sum(counts.values()) > MAX_CASCADE_ROWS:
        named = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
        raise errors.FailedPrecondition(
            f"deleting {spec.name} {row.id} would remove or change {named}: more than {MAX_CASCADE_ROWS}; delete them first",
            reason="TOO_MANY_DEPENDENTS",
            metadata={"resource_type": spec.name, "dependents": named},
        )
    now = utcnow()
    for _, found in changed:
        found.update_time = now
    changes.flush(session)
    for dependent, found in changed:
        events.publish(session, dependent, found, events.UPDATED, dependent.to_proto(found))
    for dependent, rows in reversed(levels):
        for found in rows:
            events.publish_deleted(session, dependent, found, dependent.to_proto(found))
        _delete_leaves_first(session, dependent, rows)
    events.publish_deleted(session, spec, row, last_state)
    session.delete(row)
    changes.flush(session)


def _cascade(session: Session, spec: ResourceSpec, row: Any, counts: dict[str, int]) -> tuple[list[tuple[ResourceSpec, list[Any]]], list[tuple[ResourceSpec, Any]]]:
    """What deleting row does to other rows, breadth first (no recursion: a thread of replies may
    be deep): the levels of rows to delete, each referencing the level before, and the rows
    changed (a reference cleared, a member removed), changed in the session already."""
    levels: list[tuple[ResourceSpec, list[Any]]] = []
    changed: dict[Any, tuple[ResourceSpec, Any]] = {}
    seen = {(spec.name, row.id)}
    pending = [(spec, [row])]
    while pending and sum(counts.values()) <= MAX_CASCADE_ROWS:
        target, rows = pending.pop(0)
        ids = [r.id for r in rows]
        for dependent in REGISTRY:
            for fk in dependent.table.foreign_keys:
                if fk.column.table is target.table:
                    found = _dependents(session, target, dependent, fk, ids, seen)
                    counts[dependent.name] = counts.get(dependent.name, 0) + len(found)
                    if not found:
                        continue
                    if fk.ondelete == "CASCADE":
                        seen.update((dependent.name, o.id) for o in found)
                        levels.append((dependent, found))
                        pending.append((dependent, found))
                    else:  # SET NULL
                        key = inspect(dependent.model).get_property_by_column(fk.parent).key
                        for o in found:
                            setattr(o, key, None)
                            changed[o] = (dependent, o)
            for relation in inspect(dependent.model).relationships:
                if relation.secondary is None or relation.mapper.local_table is not target.table:
                    continue
                ((_, member_column),) = relation.secondary_synchronize_pairs
                ((_, parent_column),) = relation.synchronize_pairs
                parent_ids = select(parent_column).where(member_column.in_(ids))
                stmt = select(dependent.model).where(dependent.table.c.id.in_(parent_ids)).limit(MAX_CASCADE_ROWS + 1)
                parents = [p for p in session.scalars(stmt) if (dependent.name, p.id) not in seen]
                counts[dependent.name] = counts.get(dependent.name, 0) + len(parents)
                for parent in parents:
                    collection = getattr(parent, relation.key)
                    for member in [m for m in collection if m.id in ids]:
                        collection.remove(member)
                    changed[parent] = (dependent, parent)
    return levels, list(changed.values())


def _dependents(session: Session, target: ResourceSpec, dependent: ResourceSpec, fk: Any, ids: list[Any], seen: set[Any]) -> list[Any]:
    """The rows of dependent whose fk references one of ids (not already on the way out);
    FAILED_PRECONDITION naming them when the database would refuse the delete for them."""
    if fk.ondelete not in ("CASCADE", "SET NULL"):
        held = session.scalar(select(func.count()).select_from(dependent.table).where(fk.parent.in_(ids)))
        if held:
            named = f"{held} {dependent.name} ({fk.parent.name})"
            raise errors.FailedPrecondition(
                f"{target.name} {ids[0]} is still referenced by {named}: delete or change them first",
                reason="HAS_DEPENDENTS",
                metadata={"resource_type": target.name, "resource_id": str(ids[0]), "dependents": named},
            )
        return []
    stmt = select(dependent.model).where(fk.parent.in_(ids)).limit(MAX_CASCADE_ROWS + 1)
    rows: list[Any] = list(session.scalars(stmt))  # instances of a resource's model: each has an id
    return [o for o in rows if (dependent.name, o.id) not in seen]


def _delete_leaves_first(session: Session, spec: ResourceSpec, rows: list[Any]) -> None:
    """Delete rows of one level, those no other of them references (ON DELETE CASCADE) first: a
    channel's messages before the messages they reply to, which the database would take with them."""
    keys = [
        inspect(spec.model).get_property_by_column(fk.parent).key
        for fk in spec.table.foreign_keys if fk.column.table is spec.table and fk.ondelete == "CASCADE"
    ]
    remaining = {r.id: r for r in rows}
    while remaining:
        referenced = {getattr(r, key) for r in remaining.values() for key in keys}
        leaves = [r for row_id, r in remaining.items() if row_id not in referenced] or list(remaining.values())
        for r in leaves:
            session.delete(r)
            del remaining[r.id]
        changes.flush(session)


# Rows one delete_matching may remove: their audit entries are built in memory.
MAX_MATCHING_ROWS = 100_000


def delete_matching(session: Session, spec: ResourceSpec, conditions: list[Any], validate_only: bool) -> int:
    """Delete for good the rows meeting conditions that the caller sees, in one statement, and
    answer how many (validate_only: how many would go, nothing deleted). Each row gets its
    audit entry as a Delete of it would (its last state): the trail of every row stays complete,
    whatever way it went. PERMISSION_DENIED when the caller sees a matching row it may not
    delete, FAILED_PRECONDITION when more than MAX_MATCHING_ROWS match; either way nothing goes.
    For resources nothing references and without soft delete (nothing to cascade, nothing to
    keep)."""
    if spec.soft_delete or _referenced(spec):
        raise TypeError(f"{spec.name}: delete_matching is for resources without soft delete that nothing references")
    table = spec.table
    visible = predicate(spec, write=False)
    managed = predicate(spec, write=True)
    if visible is not None:
        conditions = [*conditions, visible]
    conn = session.connection()
    refusing = literal(0) if managed is None else func.count().filter(~managed)
    total, refused = conn.execute(select(func.count(), refusing).select_from(table).where(*conditions)).one()
    if refused:
        raise errors.PermissionDenied(
            f"{refused} of the {total} matching {spec.plural} may not be deleted by the caller",
            reason="ROW_ACCESS_DENIED",
            metadata={"resource_type": spec.name, "refused": str(refused)},
        )
    if total > MAX_MATCHING_ROWS:
        raise errors.FailedPrecondition(
            f"{total} {spec.plural} match: at most {MAX_MATCHING_ROWS} go in one call; narrow the filter",
            reason="TOO_MANY_ROWS",
            metadata={"resource_type": spec.name, "matching": str(total), "max_rows": str(MAX_MATCHING_ROWS)},
        )
    if validate_only or not total:
        return total
    writing(session)
    names = [c.key for c in table.c]
    gone = [dict(zip(names, values, strict=True)) for values in conn.execute(delete(table).where(*conditions).returning(*table.c))]
    bulk.insert_many(conn, AuditLogEntry.__table__, audit.deleted(session, spec, gone))
    loaded = reading.row_class(spec)
    for values in gone:
        row = loaded(values)
        events.publish_deleted(session, spec, row, spec.to_proto(row))
    return len(gone)


def _referenced(spec: ResourceSpec) -> bool:
    """Whether a row of another resource can reference a row of spec (a foreign key or a
    membership relation): deleting its rows would have to cascade."""
    for other in REGISTRY:
        if any(fk.column.table is spec.table for fk in other.table.foreign_keys):
            return True
        if any(r.secondary is not None and r.mapper.local_table is spec.table for r in inspect(other.model).relationships):
            return True
    return False
