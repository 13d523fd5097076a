"""The standard writes (AIP-133, 134, 135, 164, 233): Create, BatchCreate, Update, Delete,
Undelete, and membership changes; each row's audit entry and change event go in with it.

How a write runs (one statement in autocommit, or a transaction) is decided once, before it
runs, by engine/plans.py; the plan reaches these functions with the unit of work (db/unit.py).
"""
from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

from google.protobuf import empty_pb2
from google.protobuf.message import Message
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db import bulk, errors
from db.base import UTCDateTime, utcnow, uuid7
from db.engine import audit, changes, events, reading, statements
from db.engine.call import Call, request_principal
from db.engine.cascade import remove_with_dependents
from db.engine.codecs import parse_uuid
from db.engine.paging import DEFAULT_PAGE_BYTES, fitting, refuse_unread_answer
from db.engine.reads import fetch
from db.engine.resource import REGISTRY, M, ResourceSpec, etag_of
from db.engine.rules import check_create_rule, check_field_rights, check_managed, check_managed_together, found, predicate
from db.engine.tables import AuditLogEntry, RequestRecord
from db.prepared import prepared
from db.unit import Mode, plan_of, writing

MAX_REQUEST_ID = 128


def load_fields(spec: ResourceSpec, msg: Message, names: Iterable[str], prefix: str) -> dict[str, Any]:
    """Row values for the named fields; every violation is reported at once."""
    values: dict[str, Any] = {}
    violations = errors.Violations()
    for name in names:
        try:
            values.update(spec.codecs[name].load(msg))
        except errors.InvalidArgument as exc:
            for v in exc.violations:
                violations.add(prefix + v.field, v.description, v.reason)
    violations.raise_if_any()
    return values


class Named(NamedTuple):
    """One reference a row makes: its field, the path errors name, the target and its id."""

    field: str
    path: str
    target: str
    value: Any


def named_references(spec: ResourceSpec, values: dict[str, Any], prefix: str, scalars: bool = True) -> list[Named]:
    """The references one row's loaded values make: its reference fields (unless not scalars),
    then each item of its list references. An item's id is checked as a UUID (INVALID_ARGUMENT
    naming the item) and kept in canonical form, in the loaded list itself (the row's)."""
    out = []
    if scalars:
        for name, target in spec.references.items():
            attr = spec.codecs[name].attr
            if attr and values.get(attr) is not None:
                out.append(Named(name, prefix + name, target, values[attr]))
    for name, ref in spec.list_references.items():
        items = values.get(spec.codecs[name].attr or name) or []
        for i, item in enumerate(items):
            path = f"{prefix}{name}[{i}]"
            if ref.key is None:
                value = parse_uuid(item, path)
                items[i] = str(value)
            elif isinstance(item, dict) and item.get(ref.key):
                path += "." + ref.key
                value = parse_uuid(item[ref.key], path)
                item[ref.key] = str(value)
            else:
                continue
            out.append(Named(name, path, ref.target, value))
    return out


def _by_field(spec: ResourceSpec, loaded: list[tuple[dict[str, Any], str]], scalars: bool = True) -> dict[str, list[Named]]:
    """The references of rows, by field (in the spec's order, then the rows')."""
    grouped: dict[str, list[Named]] = {}
    for values, prefix in loaded:
        for named in named_references(spec, values, prefix, scalars):
            grouped.setdefault(named.field, []).append(named)
    order = {name: i for i, name in enumerate((*spec.references, *spec.list_references))}
    return dict(sorted(grouped.items(), key=lambda item: order[item[0]]))


def check_visible_references(session: Session, spec: ResourceSpec, loaded: list[tuple[dict[str, Any], str]]) -> None:
    """PERMISSION_DENIED naming the field when a row references a resource its caller may not
    see (a reply to a message of a hidden channel, a message in a hidden conversation, an
    attachment of a file of someone else's): hidden and absent ids answer alike, as a Get of them
    would, so references are no existence oracle. One query per referencing field whose target
    has a read rule for the caller; none for admins."""
    for refs in _by_field(spec, loaded).values():
        target = REGISTRY[refs[0].target]
        allowed = predicate(target, write=False)
        if allowed is None:
            continue
        ids = target.table.c.id
        wanted = {named.value for named in refs}
        seen = set(session.connection().execute(select(ids).where(ids.in_(wanted), allowed)).scalars())
        for named in refs:
            if named.value not in seen:
                raise errors.PermissionDenied(
                    f"the caller may not see {target.name} {str(named.value)!r}",
                    reason="REFERENCE_ACCESS_DENIED",
                    metadata={"field": named.path, "resource_type": target.name, "resource_id": str(named.value)},
                )


def _hold_list_references(session: Session, spec: ResourceSpec) -> None:
    """A write setting a list reference reads the rows it names FOR SHARE before it writes: a
    ONE_STATEMENT plan (autocommit) would not keep them until its commit, a bug of engine/plans.py
    (which chooses a transaction for a write setting one: plans.LIST_REFERENCES)."""
    if plan_of(session).mode is Mode.ONE_STATEMENT:
        raise AssertionError(f"{spec.name} rows name rows in lists, read FOR SHARE until the commit: the plan {plan_of(session)} cannot hold")


def check_references(session: Session, spec: ResourceSpec, values: dict[str, Any], prefix: str = "") -> None:
    """NOT_FOUND naming the field when a referenced resource does not exist (or is deleted)."""
    check_references_together(session, spec, [(values, prefix)])


def check_references_together(
    session: Session, spec: ResourceSpec, loaded: list[tuple[dict[str, Any], str]], scalars: bool = True
) -> None:
    """check_references for many rows: one query per referencing field; NOT_FOUND names the
    first row (in request order) whose reference is missing. scalars=False: list references only."""
    for refs in _by_field(spec, loaded, scalars).values():
        wanted = {named.value for named in refs}
        target = REGISTRY[refs[0].target]
        stmt = statements.reference_statement(target, len(wanted) == 1)
        conn = session.connection()
        if len(wanted) == 1:
            found = {row[0] for row in prepared(stmt, conn.dialect, processed=True).rows(conn, {"id": next(iter(wanted))})}
        else:  # an expanding IN: compiled per execution
            found = set(conn.execute(stmt, {"ids": list(wanted)}).scalars())
        if len(found) == len(wanted):
            continue
        for named in refs:
            if named.value not in found:
                raise errors.NotFound.resource(target.name, str(named.value), named.path)


def _missing_required(spec: ResourceSpec, row: Any, prefix: str) -> None:
    violations = errors.Violations()
    for name in sorted(spec.required):
        attr = spec.codecs[name].attr
        if attr is not None and getattr(row, attr) in (None, ""):
            violations.add(prefix + name, "is required", "REQUIRED_FIELD")
    violations.raise_if_any()


def _apply_defaults(spec: ResourceSpec, row: Any) -> None:
    """Column defaults for attributes left None, so hooks and validation see the final values."""
    for key, value in _scalar_defaults(spec):
        if getattr(row, key, None) is None:
            setattr(row, key, value)


@functools.cache
def _scalar_defaults(spec: ResourceSpec) -> tuple[tuple[str, Any], ...]:
    return tuple((c.key, c.default.arg) for c in spec.table.c if c.default is not None and c.default.is_scalar)


def validate_request_id(request_id: str, field_path: str = "request_id") -> str:
    if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        raise errors.InvalidArgument.field(field_path, f"must be at most {MAX_REQUEST_ID} printable characters (a UUID is best)")
    return request_id


def earlier_result(session: Session, spec: ResourceSpec[M], request_id: str, call: Call) -> M | None:
    """The result of this caller's earlier create with request_id, read as a Get would read it
    (the caller's read rule applies: PERMISSION_DENIED if it may no longer see the row)."""
    earlier = session.scalar(
        select(RequestRecord.resource_id).where(
            RequestRecord.resource_type == spec.name,
            RequestRecord.principal == request_principal(call),
            RequestRecord.request_id == request_id,
        )
    )
    if earlier is None:
        return None
    return spec.to_proto(fetch(session, spec, str(earlier), show_deleted=True))


def _claim_request_id(session: Session, spec: ResourceSpec[M], request_id: str, row_id: uuid.UUID, call: Call) -> M | None:
    """Record request_id for row_id; if a concurrent call claimed it first, return that call's result."""
    try:
        # A savepoint: on PostgreSQL the insert waits for a concurrent claim to commit, then fails
        # here, and (READ COMMITTED) the next statement sees the winner's row.
        with session.begin_nested():
            session.add(
                RequestRecord(resource_type=spec.name, principal=request_principal(call), request_id=request_id, resource_id=row_id)
            )
            changes.flush(session)
    except IntegrityError:
        result = earlier_result(session, spec, request_id, call)
        if result is None:
            raise errors.Aborted("a concurrent call with the same request_id did not finish; retry", reason="REQUEST_IN_FLIGHT") from None
        return result
    return None


def _new_row(spec: ResourceSpec, msg: Message, call: Call, field_prefix: str) -> tuple[Any, dict[str, Any], list[str]]:
    """A validated new row from a create request's resource: (row, loaded values, set fields).

    The row is a plain object with the model's attributes (every column, None when unset), for
    insert_rows: a mapped instance would cost more to build and is never flushed.
    """
    names = [n for n in spec.creatable if spec.codecs[n].present(msg)]
    check_field_rights(spec, names, field_prefix)
    values = load_fields(spec, msg, names, field_prefix)
    set_values = {k: v for k, v in values.items() if v is not None}
    row: Any = reading.row_class(spec)({**_empty_row(spec), **set_values})  # a Loaded with the model's attributes
    row.id = uuid7()
    _apply_defaults(spec, row)
    if spec.owner_field:
        _own_row(spec, spec.owner_field, row, values, call, field_prefix)
    _missing_required(spec, row, field_prefix)
    return row, values, names


def _own_row(spec: ResourceSpec, owner_field: str, row: Any, values: dict[str, Any], call: Call, field_prefix: str) -> None:
    """A new row's owner field (spec.owner_field) is its caller: left unset, it becomes the
    caller's user; only an admin may name another owner (importing, making rows for others)."""
    owner = getattr(row, owner_field)
    if owner is None and call.actor_user_id is not None:
        setattr(row, owner_field, call.actor_user_id)
        values[owner_field] = call.actor_user_id
    elif owner is None and owner_field in spec.required and call.role != "admin":
        # Asking for the field would send the caller after one it may not set (below).
        field = field_prefix + owner_field
        raise errors.PermissionDenied(
            f"the caller acts for no user, so it cannot own a {spec.name}: only an admin may make one for a user",
            reason="NO_USER_TO_OWN", metadata={"field": field, "resource_type": spec.name},
        )
    elif owner is not None and owner != call.actor_user_id and call.role != "admin":
        field = field_prefix + owner_field
        raise errors.PermissionDenied(
            f"{field} is the caller: only an admin may set another", reason="FIELD_ACCESS_DENIED", metadata={"field": field}
        )


@functools.cache
def _empty_row_values(spec: ResourceSpec) -> tuple[tuple[str, None], ...]:
    return tuple((c.key, None) for c in spec.table.c)


def _empty_row(spec: ResourceSpec) -> dict[str, Any]:
    return dict(_empty_row_values(spec))


def create(
    session: Session, spec: ResourceSpec[M], request: Any, call: Call, prefix: str = "", server_values: dict[str, Any] | None = None
) -> M:
    """A new row from a create request. server_values: output-only columns the service itself
    computed for the row (a file's sha256 and size), set after the request's fields are checked."""
    request_id = validate_request_id(request.request_id, prefix + "request_id")
    if request_id:
        earlier = earlier_result(session, spec, request_id, call)
        if earlier is not None:
            return earlier
    field_prefix = f"{prefix}{spec.singular_field}."
    row, values, names = _new_row(spec, getattr(request, spec.singular_field), call, field_prefix)
    for name, value in (server_values or {}).items():
        setattr(row, name, value)
    check_visible_references(session, spec, [(values, field_prefix)])
    check_create_rule(session, spec, [row], [field_prefix])
    if spec.before_write is not None:
        spec.before_write(session, row, set(names), True, call)
    if request_id:
        winner = _claim_request_id(session, spec, request_id, row.id, call)
        if winner is not None:
            return winner
    if set(names) & set(spec.list_references):  # insert_rows checks the others with its INSERT
        _hold_list_references(session, spec)
        check_references_together(session, spec, [(values, field_prefix)], scalars=False)
    return insert_rows(session, spec, [row], unchecked=(values, field_prefix))[0]


def batch_create(session: Session, spec: ResourceSpec[M], request: Any, call: Call, max_bytes: int = DEFAULT_PAGE_BYTES) -> list[M]:
    """_batch_create, refused before it commits when its answer would pass max_bytes: a client
    that cannot read the answer would take a committed batch for a refused one."""
    made = _batch_create(session, spec, request, call)
    if fitting(made, max_bytes) < len(made):
        refuse_unread_answer(max_bytes + 1, max_bytes, f"{len(made)} creates; send fewer per call")
    return made


def _batch_create(session: Session, spec: ResourceSpec[M], request: Any, call: Call) -> list[M]:
    """All or nothing (AIP-233). Without request ids the rows are written together: validated
    one by one, then one reference query per referencing field and insert_rows (one INSERT for
    the rows, one for their audit entries, one check of the caller's rights)."""
    requests = list(request.requests)
    if not requests:
        raise errors.InvalidArgument.field("requests", "must hold at least one request", reason="REQUIRED_FIELD")
    if len(requests) > spec.batch_create_limit:
        raise errors.InvalidArgument.field("requests", f"at most {spec.batch_create_limit} per call", reason="BATCH_TOO_LARGE")
    if any(sub.request_id for sub in requests):
        # Each request id is claimed (or answered from an earlier call) row by row.
        return [create(session, spec, sub, call, prefix=f"requests[{i}].") for i, sub in enumerate(requests)]
    made = []
    for i, sub in enumerate(requests):
        field_prefix = f"requests[{i}].{spec.singular_field}."
        made.append((*_new_row(spec, getattr(sub, spec.singular_field), call, field_prefix), field_prefix))
    loaded = [(values, field_prefix) for _, values, _, field_prefix in made]
    check_visible_references(session, spec, loaded)
    rows = [row for row, _, _, _ in made]
    check_create_rule(session, spec, rows, [field_prefix for _, _, _, field_prefix in made])
    if spec.before_write is not None:
        for row, _, names, _ in made:
            spec.before_write(session, row, set(names), True, call)
    check_references_together(session, spec, loaded)
    return insert_rows(session, spec, rows)


def insert_rows(
    session: Session, spec: ResourceSpec[M], rows: list[Any], unchecked: tuple[dict[str, Any], str] | None = None
) -> list[M]:
    """Insert new rows (plain objects from _new_row, validated) and answer their messages.

    One INSERT of plain column values for all of them (insertmanyvalues), their audit entries
    (engine/audit.created), the caller's rights on the result, their change events: the ORM's unit
    of work would cost more per row than the database does. The objects never join the
    session, so its flush does not see them; later statements in the transaction do.
    unchecked=(loaded values, field prefix): one row whose references are still to check.
    """
    drafts, values = insert_values(spec, rows)
    entries = audit.created(session, spec, drafts)
    conn = session.connection()
    if len(values) == 1 and len(entries) == 1 and statements.companion_ctes(conn.dialect.name):
        # One statement, one round trip: the row, with its audit entry as a data-modifying CTE,
        # inserted only if each row it references is there and live (read FOR SHARE, as
        # check_references reads them). (A batch keeps insertmanyvalues.)
        (entry,) = entries
        params = {f"r_{key}": value for key, value in values[0].items()}
        params.update({f"c_{key}": value for key, value in entry.items()})
        references: tuple[tuple[str, str], ...] = ()
        if unchecked is not None:
            # (field, target resource, the value it names) of each reference the row makes.
            made = [
                (field, target, value) for field, target in spec.references.items()
                if (attr := spec.codecs[field].attr) and (value := unchecked[0].get(attr)) is not None
            ]
            references = tuple((field, target) for field, target, _ in made)
            params.update({f"ref_{i}": value for i, (_, _, value) in enumerate(made)})
        stmt = statements.insert_with(spec.table, AuditLogEntry.__table__, tuple(values[0]), tuple(entry), references)
        writing(session)
        if not prepared(stmt, conn.dialect).rows(conn, params):
            # A reference is missing: which one, as check_references reports it.
            if unchecked is not None:
                check_references(session, spec, *unchecked)
            raise errors.Aborted("a referenced resource changed during the call; retry", reason="REFERENCE_CHANGED")
    else:
        if plan_of(session).mode is Mode.ONE_STATEMENT and statements.companion_ctes(conn.dialect.name):
            # On PostgreSQL a one-statement create is its own commit: a plan that admitted one
            # needing several statements is a bug of engine/plans.py.
            raise AssertionError(f"{spec.name} rows need more than one statement: the plan {plan_of(session)} cannot hold")
        if unchecked is not None:
            check_references(session, spec, *unchecked)
        bulk.insert_many(conn, spec.table, values)
        if entries:
            bulk.insert_many(conn, AuditLogEntry.__table__, entries)
    for row, row_values in zip(rows, values, strict=True):
        row.__dict__.update(row_values)
        for key in spec.relation_fields:
            setattr(row, key, [])
    check_managed_together(session, spec, rows, new=frozenset(row.id for row in rows))
    return [events.publish(session, spec, row, events.CREATED, spec.to_proto(row)) for row in rows]


def insert_values(spec: ResourceSpec, rows: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(drafts, values) of new rows: their column values as set (what their audit entries
    report), and with the column defaults filled in (what is inserted; every timestamp default
    of one call the same instant)."""
    now = utcnow()
    columns = [(c.key, _insert_default(c)) for c in spec.table.c]
    drafts = [{key: getattr(row, key) for key, _ in columns} for row in rows]
    return drafts, [{key: _value_or_default(draft[key], default, now) for key, default in columns} for draft in drafts]


_NOW = object()


def _insert_default(column: Any) -> Any:
    default = column.default
    if default is None:
        return None
    if default.is_scalar:
        return default.arg
    if default.is_callable:
        # Every timestamp default of one call is the same instant; others (ids, JSON) per row.
        return _NOW if isinstance(column.type, UTCDateTime) else default.arg
    return None


def _value_or_default(value: Any, default: Any, now: Any) -> Any:
    if value is not None or default is None:
        return value
    if default is _NOW:
        return now
    return default(None) if callable(default) else default


def update_paths(spec: ResourceSpec, msg: Message, paths: Sequence[str]) -> list[str]:
    """The fields an update changes: the mask, "*" for every updatable field, or the set fields."""
    if not paths:
        return [n for n in spec.updatable if spec.codecs[n].present(msg)]
    if list(paths) == ["*"]:
        return list(spec.updatable)
    violations = errors.Violations()
    for path in paths:
        if path not in spec.codecs:
            violations.add("update_mask", f"{path!r} is not a field of {spec.name}", "INVALID_FIELD_MASK")
        elif path in spec.all_output_only:
            violations.add("update_mask", f"{path!r} is output only", "INVALID_FIELD_MASK")
        elif path in spec.immutable:
            violations.add("update_mask", f"{path!r} cannot change after creation", "IMMUTABLE_FIELD")
    violations.raise_if_any()
    return list(dict.fromkeys(paths))


def check_etag(row: Any, etag: str, field_path: str) -> None:
    if etag and etag != etag_of(row):
        raise errors.Aborted(
            f"etag {etag!r} is stale: the resource is now at {etag_of(row)!r}; read it again",
            reason="ETAG_MISMATCH",
            metadata={"field": field_path, "current_etag": etag_of(row)},
        )


def update(session: Session, spec: ResourceSpec[M], request: Any, call: Call) -> M:
    """The standard Update, with Core statements: the row locked and read, one UPDATE (which
    also answers the row's relations, read under the lock), its audit entry (engine/audit.updated)
    with it. Without a change nothing is written, as a flush would write nothing.

    Under a ONE_STATEMENT plan (engine/plans.py) the row is read without a lock and the UPDATE
    goes in only at the revision read; a row changed in between raises NeedsTransaction, and
    Database runs the update again in a transaction."""
    msg = getattr(request, spec.singular_field)
    field_prefix = f"{spec.singular_field}."
    names = update_paths(spec, msg, request.update_mask.paths)
    check_field_rights(spec, names, field_prefix)
    conn = session.connection()
    one_statement = plan_of(session).mode is Mode.ONE_STATEMENT  # no lock: a revision guard
    before = _fetch_for_update(session, spec, msg.id, field_prefix + "id", lock=not one_statement)
    check_etag(before, msg.etag, field_prefix + "etag")
    row, values = changed_row(spec, before, msg, names, field_prefix)
    if set(names) & set(spec.list_references):
        _hold_list_references(session, spec)
    check_visible_references(session, spec, [(values, field_prefix)])
    check_references(session, spec, values, field_prefix)
    if spec.before_write is not None:
        spec.before_write(session, row, set(names), False, call)
    keys = [c.key for c in spec.table.c]
    old = {key: getattr(before, key) for key in keys}
    new = {key: getattr(row, key) for key in keys}
    changed = {key: value for key, value in new.items() if value != old[key]}
    if changed and spec.on_update is not None:
        if one_statement:  # its rows and this one would commit apart: a bug of engine/plans.py
            raise AssertionError(f"a change of a {spec.name} writes more rows (on_update): the plan {plan_of(session)} cannot hold")
        spec.on_update(session, old, new, call)
        changed = {key: value for key, value in new.items() if value != old[key]}
        for key, value in changed.items():
            setattr(row, key, value)
    loaders = reading.relation_loaders(spec)
    table = spec.table
    if changed:
        changed["update_time"] = new["update_time"] = row.update_time = utcnow()
        changed["revision"] = new["revision"] = row.revision = before.revision + 1
        entry = audit.updated(session, spec, before.id, old, new)
        params = {f"v_{key}": value for key, value in changed.items()}
        params.update(row_id=before.id, old_revision=before.revision)
        # One statement where the database can: the audit entry goes in with the UPDATE as a
        # data-modifying CTE.
        companion_entry = entry if entry is not None and statements.companion_ctes(call.dialect) else None
        together = companion_entry is not None
        if companion_entry is not None:
            params.update({f"c_{key}": value for key, value in companion_entry.items()})
        companion = AuditLogEntry.__table__ if together else None
        stmt = statements.update_statement(spec, call.dialect, tuple(changed), companion, tuple(companion_entry or ()))
        writing(session)
        answers = prepared(stmt, conn.dialect).rows(conn, params)
        answered = answers[0] if answers else None
        if answered is None and one_statement:
            raise errors.NeedsTransaction  # changed since it was read (nothing written): again, locked
        if answered is None:  # what the ORM reports as StaleDataError; the row lock prevents it
            raise errors.Aborted(
                "the resource changed while it was being updated; read it again and retry",
                reason="CONCURRENT_MODIFICATION",
                metadata={"resource_type": spec.name},
            )
        if entry is not None and not together:
            bulk.insert_many(conn, AuditLogEntry.__table__, [entry])
        relation_values = answered[1:]
    elif loaders:
        relations = select(*(loader.aggregate(call.dialect) for loader in loaders)).where(table.c.id == before.id)
        relation_values = conn.execute(relations).one()
    else:
        relation_values = ()
    for loader, value in zip(loaders, relation_values, strict=True):
        setattr(row, loader.key, loader.rows(value))
    check_managed(session, spec, row)
    return events.publish(session, spec, row, events.UPDATED, spec.to_proto(row))


def changed_row(spec: ResourceSpec, before: Any, msg: Message, names: list[str], field_prefix: str) -> tuple[Any, dict[str, Any]]:
    """(the row as an update of the named fields of msg leaves it, the loaded values): a new
    plain row, `before` untouched; validated as an update validates it (references apart)."""
    values = load_fields(spec, msg, names, field_prefix)
    row = reading.row_class(spec)(dict(before.__dict__))
    for key, value in values.items():
        setattr(row, key, value)
    _apply_defaults_for_cleared(spec, row, values)
    _missing_required(spec, row, field_prefix)
    return row, values


def _fetch_for_update(session: Session, spec: ResourceSpec, raw_id: str, field_path: str, lock: bool = True) -> Any:
    """fetch(lock=True) without the ORM: the row's column values (ids as uuid.UUID) as a plain
    row, locked on PostgreSQL (unless lock=False); PERMISSION_DENIED or NOT_FOUND as fetch
    answers them."""
    row_id = parse_uuid(raw_id, field_path)
    table = spec.table
    stmt = statements.locked_row_statement(spec, lock and session.get_bind().dialect.name == "postgresql")
    allowed = predicate(spec, write=True)
    if allowed is not None:
        stmt = stmt.where(allowed)
    conn = session.connection()
    if allowed is None:
        found_rows = prepared(stmt, conn.dialect, processed=True).rows(conn, {"row_id": row_id})
        found_row = found_rows[0] if found_rows else None
    else:  # a statement per caller's predicate: not one to keep
        found_row = conn.execute(stmt, {"row_id": row_id}).first()
    row = None if found_row is None else reading.row_class(spec)(dict(zip([c.key for c in table.c], found_row, strict=True)))
    return found(spec, row, raw_id, allowed, show_deleted=False, write=True, field_path=field_path)


def _apply_defaults_for_cleared(spec: ResourceSpec, row: Any, values: dict[str, Any]) -> None:
    """A masked enum or flag cleared to its zero value goes back to the column default."""
    for key, value in values.items():
        col = spec.table.c.get(key)
        if value is None and col is not None and not col.nullable and col.default is not None and col.default.is_scalar:
            setattr(row, key, col.default.arg)


def delete(session: Session, spec: ResourceSpec[M], request: Any, call: Call) -> M | empty_pb2.Empty:
    force = bool(getattr(request, "force", False))
    if force and call.role != "admin":
        raise errors.PermissionDenied(
            "only an admin may delete for good (force): ask for a soft delete instead",
            reason="FORCE_DELETE_ADMIN_ONLY",
            metadata={"field": "force", "resource_type": spec.name},
        )
    row = fetch(session, spec, request.id, show_deleted=force, lock=True, deleting=True)
    check_etag(row, request.etag, "etag")
    if spec.soft_delete and not force:
        row.delete_time = utcnow()
        changes.flush(session)
        return events.publish_deleted(session, spec, row, spec.to_proto(row))
    last_state = spec.to_proto(row)
    remove_with_dependents(session, spec, row, last_state)
    return last_state if spec.soft_delete else empty_pb2.Empty()


def undelete(session: Session, spec: ResourceSpec[M], request: Any, call: Call) -> M:
    row = fetch(session, spec, request.id, show_deleted=True, lock=True, deleting=True)
    if row.delete_time is None:
        raise errors.FailedPrecondition(f"{spec.name} {request.id!r} is not deleted", reason="NOT_DELETED")
    row.delete_time = None
    changes.flush(session)
    return events.publish(session, spec, row, events.UPDATED, spec.to_proto(row))


def change_membership(session: Session, spec: ResourceSpec[M], parent_id: str, user_id: str, *, add: bool, parent_field: str) -> M:
    """Add or remove a user in a resource's `members`; idempotent; a real change moves the etag."""
    parent = fetch(session, spec, parent_id, field_path=parent_field, lock=True)
    if add:
        user = fetch(session, REGISTRY["User"], user_id, field_path="user_id")
        changed = user not in parent.members
        if changed:
            parent.members.append(user)
    else:
        member_id = parse_uuid(user_id, "user_id")
        kept = [u for u in parent.members if u.id != member_id]
        changed = len(kept) != len(parent.members)
        if changed:
            parent.members = kept
    if not changed:
        return spec.to_proto(parent)
    parent.update_time = utcnow()
    changes.flush(session)
    return events.publish(session, spec, parent, events.UPDATED, spec.to_proto(parent))
