"""Upserts by a resource's declared key (ResourceSpec.upsert_key): each row of the key is made as
Create makes it, or the one there replaced as Update with mask "*" replaces it (its id and
create_time stay; its etag moves when anything changed). One request or thousands take the same
path, in a constant number of statements whatever their number: the rows of the keys read and
locked (a statement per LOOKUP_KEYS keys), every new or changed row written by one INSERT that
overwrites the rows of the ids it names (db/bulk.write_many), their audit entries by one more.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic

from google.protobuf.message import Message
from sqlalchemy import bindparam, func, select, text, tuple_
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db import bulk, errors
from db.translate import unique_fields
from db.base import utcnow
from db.engine import audit, events, reading
from db.engine.call import Call
from db.engine.resource import M, ResourceSpec
from db.engine.rules import check_create_rule, check_field_rights, check_managed_together, denied, predicate
from db.engine.tables import AuditLogEntry
from db.engine.writes import (
    load_fields,
    _new_row,
    changed_row,
    check_references_together,
    check_visible_references,
    insert_values,
)
from db.unit import writing

# Upserts one call may carry: a source's re-ingestion in one atomic call.
MAX_UPSERT_BATCH = 10_000
# Keys per locking read: a tuple IN of this many pairs stays well within every driver's limits.
LOOKUP_KEYS = 1_000
# A concurrent Create may take a new key between the read and the write; the write then fails
# on the key's unique index and the upsert starts again, this many times at most. Each restart
# finds the keys taken meanwhile there (and locks them), so only a churn of creates and deletes
# of the same keys makes one lose again: 3 were seen running out under 10 such writers.
ATTEMPTS = 10


@dataclass
class _Upsert:
    """One upsert: its message, its fields' path in the request, its key."""

    message: Message
    prefix: str
    key: tuple[Any, ...]


@dataclass
class Upserted(Generic[M]):
    """What an upsert did to one row: its message, and whether it was made or replaced (and
    then whether anything changed)."""

    message: M
    created: bool
    changed: bool


def upsert(session: Session, spec: ResourceSpec[M], msg: Message, call: Call) -> tuple[M, bool]:
    """(the resource, created?) of one upsert: batch_upsert of one, its fields under
    `<singular_field>.` as in UpsertXRequest."""
    (done,) = batch_upsert(session, spec, [msg], call, prefixes=[f"{spec.singular_field}."])
    return done.message, done.created


def batch_upsert(
    session: Session,
    spec: ResourceSpec[M],
    messages: Sequence[Message],
    call: Call,
    prefixes: Sequence[str] | None = None,
    read_mask: list[str] | None = None,
) -> list[Upserted[M]]:
    """Upsert every message by spec.upsert_key, all or nothing, in request order. prefixes: each
    message's field path in the request (default requests[i].<singular_field>.). Two messages
    of one key: INVALID_ARGUMENT naming both. A key whose row the caller may not change:
    PERMISSION_DENIED, as Update answers it."""
    if not messages:
        raise errors.InvalidArgument.field("requests", "must hold at least one request", reason="REQUIRED_FIELD")
    if len(messages) > MAX_UPSERT_BATCH:
        raise errors.InvalidArgument.field("requests", f"at most {MAX_UPSERT_BATCH} per call", reason="BATCH_TOO_LARGE")
    if spec.relation_fields or spec.on_update is not None:
        # Neither is written by the rows' one INSERT: such a resource needs its own path first.
        raise TypeError(f"{spec.name}: an upsert writes neither relations nor what an on_update hook writes")
    if prefixes is None:
        prefixes = [f"requests[{i}].{spec.singular_field}." for i in range(len(messages))]
    upserts = [_keyed(spec, msg, prefix) for msg, prefix in zip(messages, prefixes, strict=True)]
    _refuse_repeated_keys(spec, upserts)
    _take_turns(session, spec, upserts)
    key_columns = set(spec.upsert_attrs)
    for _ in range(ATTEMPTS):
        try:
            with session.begin_nested():
                existing = _rows_of_keys(session, spec, [u.key for u in upserts], lock=True)
                return _write(session, spec, upserts, existing, call, read_mask)
        except IntegrityError as exc:
            # A new key made meanwhile by a write that is no upsert (a Create), or made and
            # removed again: read again, and make or replace its row. Any other violation is
            # not a race: it goes up as it is.
            if set(unique_fields(exc)) != key_columns:
                raise
    raise errors.Aborted(
        f"concurrent creates kept taking the same new keys of {spec.name}; retry", reason="CONCURRENT_MODIFICATION",
        metadata={"resource_type": spec.name},
    )


def _take_turns(session: Session, spec: ResourceSpec, upserts: list[_Upsert]) -> None:
    """On PostgreSQL, upserts of the same keys take turns: each takes, until its transaction
    ends, an advisory lock per TURN_BUCKETS bucket of its keys' first field (a chunk's source),
    in order. Its read of the keys' rows then comes after the commit of the one before it, and
    sees its new rows: without the turn they are outside the read's snapshot and the insert
    fails on the key's unique index. (SQLite's writes take turns already.)"""
    conn = session.connection()
    if conn.dialect.name != "postgresql":
        return
    names = sorted({f"{spec.table.name}:{u.key[0]}" for u in upserts})
    conn.execute(_TURNS, {"names": names, "space": _TURN_SPACE, "buckets": TURN_BUCKETS - 1})


# The advisory locks of _take_turns: (a number of their own, the bucket); a bucket is the
# leading key's hash masked to TURN_BUCKETS (a power of two) values, so a transaction holds at
# most that many, whatever its keys (the lock table is shared and bounded).
TURN_BUCKETS = 64
_TURN_SPACE = 5_170_311
_TURNS = text(
    "SELECT count(pg_advisory_xact_lock(:space, bucket)) FROM "
    "(SELECT DISTINCT hashtext(name) & :buckets AS bucket FROM unnest(CAST(:names AS text[])) AS name ORDER BY bucket) AS turns"
)


def _keyed(spec: ResourceSpec, msg: Message, prefix: str) -> _Upsert:
    """msg with its key read (required, and valid as the key's fields are); the rest of it is
    validated once it is known whether it makes a row or replaces one (_write)."""
    violations = errors.Violations()
    for name in spec.upsert_key:
        if not spec.codecs[name].present(msg):
            violations.add(prefix + name, f"is required: ({', '.join(spec.upsert_key)}) is the {spec.name}'s key", "REQUIRED_FIELD")
    violations.raise_if_any()
    values = load_fields(spec, msg, spec.upsert_key, prefix)
    return _Upsert(msg, prefix, tuple(values[attr] for attr in spec.upsert_attrs))


def _refuse_repeated_keys(spec: ResourceSpec, upserts: list[_Upsert]) -> None:
    first: dict[tuple[Any, ...], str] = {}
    for u in upserts:
        earlier = first.setdefault(u.key, u.prefix)
        if earlier is not u.prefix:
            key_field = spec.upsert_key[-1]
            violations = errors.Violations()
            said = f"({', '.join(spec.upsert_key)}) {u.key!r} is given twice in one call: at {earlier.rstrip('.')} and {u.prefix.rstrip('.')}"
            violations.add(earlier + key_field, said, "DUPLICATE_KEY")
            violations.add(u.prefix + key_field, said, "DUPLICATE_KEY")
            violations.raise_if_any()


def _rows_of_keys(session: Session, spec: ResourceSpec, keys: list[tuple[Any, ...]], lock: bool) -> dict[tuple[Any, ...], Any]:
    """The rows holding keys, as plain rows by key; locked (FOR UPDATE, in id order, so that
    concurrent upserts lock alike) on PostgreSQL when lock. On PostgreSQL one statement whose
    keys travel as one array per key column; elsewhere a tuple IN per LOOKUP_KEYS keys."""
    if not keys:
        return {}
    table = spec.table
    names = [c.key for c in table.c]
    positions = [names.index(attr) for attr in spec.upsert_attrs]
    conn = session.connection()
    if conn.dialect.name == "postgresql":
        params = {f"key_{i}": [key[i] for key in keys] for i in range(len(positions))}
        found = conn.execute(_keys_statement(spec, lock), params).all()
    else:
        found = []
        for start in range(0, len(keys), LOOKUP_KEYS):
            found += conn.execute(_keys_statement(spec, None).where(_key_columns(spec).in_(keys[start:start + LOOKUP_KEYS]))).all()
    loaded = reading.row_class(spec)
    return {tuple(values[i] for i in positions): loaded(dict(zip(names, values, strict=True))) for values in found}


def _key_columns(spec: ResourceSpec) -> Any:
    return tuple_(*(spec.table.c[attr] for attr in spec.upsert_attrs))


@functools.cache
def _keys_statement(spec: ResourceSpec, lock: bool | None) -> Any:
    """SELECT of the rows by key, in id order. lock None: without the keys' condition, added
    per call; else (PostgreSQL) of the keys in the arrays key_0, key_1, ... (unnested
    together), FOR UPDATE if lock. Built once."""
    table = spec.table
    stmt = select(*table.c).order_by(table.c.id)
    if lock is None:
        return stmt
    columns = [table.c[attr] for attr in spec.upsert_attrs]
    arrays = [bindparam(f"key_{i}", type_=postgresql.ARRAY(column.type)) for i, column in enumerate(columns)]
    given = func.unnest(*arrays).table_valued(*(f"key_{i}" for i in range(len(columns)))).render_derived()
    stmt = stmt.where(tuple_(*columns).in_(select(*given.c)))
    return stmt.with_for_update(of=table) if lock else stmt


def _write(
    session: Session, spec: ResourceSpec, upserts: list[_Upsert], existing: dict[tuple[Any, ...], Any], call: Call, read_mask: list[str] | None
) -> list[Upserted]:
    """The upserts, given the rows of their keys there now (locked): a new row validated as
    Create validates it, a replaced one as Update with mask "*" (an id or etag sent is ignored:
    neither is a field either takes)."""
    _check_may_replace(session, spec, upserts, existing)
    names = list(spec.updatable)
    rows: list[Any] = []
    loaded: list[tuple[dict[str, Any], str]] = []
    fresh: list[tuple[_Upsert, Any]] = []
    for u in upserts:
        before = existing.get(u.key)
        if before is None:
            row, values, given = _new_row(spec, u.message, call, u.prefix)
            fresh.append((u, row))
        else:
            check_field_rights(spec, names, u.prefix)
            row, values = changed_row(spec, before, u.message, names, u.prefix)
            given = names
        if spec.before_write is not None:
            spec.before_write(session, row, set(given), before is None, call)
        rows.append(row)
        loaded.append((values, u.prefix))
    check_create_rule(session, spec, [row for _, row in fresh], [u.prefix for u, _ in fresh])
    check_visible_references(session, spec, loaded)
    check_references_together(session, spec, loaded)
    drafts, inserted = insert_values(spec, [row for _, row in fresh])
    entries = audit.created(session, spec, drafts)
    written = dict(zip((u.key for u, _ in fresh), inserted, strict=True))
    now = utcnow()
    keys = [c.key for c in spec.table.c]
    changed_keys = set()
    for u, row in zip(upserts, rows, strict=True):
        before = existing.get(u.key)
        if before is None:
            row.__dict__.update(written[u.key])
            continue
        old = {key: getattr(before, key) for key in keys}
        new = {key: getattr(row, key) for key in keys}
        if new == old:
            continue  # as Update: nothing changed, nothing written, the etag stays
        row.update_time, row.revision = now, before.revision + 1
        new.update(update_time=now, revision=row.revision)
        entry = audit.updated(session, spec, before.id, old, new)
        if entry is not None:
            entries.append(entry)
        written[u.key] = new
        changed_keys.add(u.key)
    conn = session.connection()
    writing(session)
    # In key order: two upserts writing the same new keys wait on each other in one order.
    bulk.write_many(conn, spec.table, [written[key] for key in sorted(written, key=repr)])
    bulk.insert_many(conn, AuditLogEntry.__table__, entries)
    check_managed_together(session, spec, [row for u, row in zip(upserts, rows, strict=True) if u.key in written], new=frozenset(row.id for _, row in fresh))
    done = []
    for u, row in zip(upserts, rows, strict=True):
        made = u.key not in existing
        if spec.stream_scope is not None and (made or u.key in changed_keys):
            events.publish(session, spec, row, events.CREATED if made else events.UPDATED, spec.to_proto(row))
        done.append(Upserted(spec.to_proto(row, read_mask), made, made or u.key in changed_keys))
    return done


def _check_may_replace(session: Session, spec: ResourceSpec, upserts: list[_Upsert], existing: dict[tuple[Any, ...], Any]) -> None:
    """PERMISSION_DENIED for the first upsert whose key's row the caller may not change."""
    allowed = predicate(spec, write=True)
    if allowed is None or not existing:
        return
    ids = [row.id for row in existing.values()]
    managed = set(session.connection().execute(select(spec.table.c.id).where(spec.table.c.id.in_(ids), allowed)).scalars())
    for u in upserts:
        row = existing.get(u.key)
        if row is not None and row.id not in managed:
            raise denied(spec, str(row.id), True)
