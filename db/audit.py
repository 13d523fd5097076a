"""The audit trail: every change to every resource, recorded in the transaction that makes it.

A `before_flush` listener on every session sees all new, changed and deleted resource rows —
whatever code path changed them (standard methods, custom methods, the seed) — and writes one
AuditLogEntry per row per flush, with the changed fields' old and new values, secrets masked.
New rows of the standard Create / BatchCreate are inserted with Core, not flushed
(crud.insert_rows): `record_inserted` writes their entries, the same ones, in one INSERT; the
standard Update changes its row with a Core UPDATE (crud.update): `record_updated` writes its entry.
Nothing here is per resource: the registry's codecs map columns back to API field names.
"""
from __future__ import annotations

import datetime as dt
import functools
import json
import uuid
from decimal import Decimal
from typing import Any

from nexus.security.v1 import security_pb2 as pb
from sqlalchemy import event, insert, inspect
from sqlalchemy.orm import Session

from db import crud
from db.base import utcnow, uuid7
from db.codecs import InputCodec, OutputCodec, TimestampCodec
from db.database import CREDENTIALS_CHANGED_KEY
from db.models import AuditLogEntry
from db.resource import REGISTRY, SECRET_COLUMNS, ResourceSpec

MASK = "***"
# A changed value longer than this many characters (a dict or list: of JSON) is kept as its
# first AUDIT_VALUE_CHARS characters and a marker saying how long it was, so that entries stay
# small whatever the field limits allow (db/codecs.DEFAULT_LIMITS).
AUDIT_VALUE_CHARS = 1024
# Changes to these make cached credentials stale (a revoked key, a deactivated user).
_CREDENTIAL_RESOURCES = {"ApiKey", "User"}
# Bookkeeping columns every change touches: not news in an audit entry.
_NOISE = {"update_time", "revision"}

AUDIT_LOG_ENTRIES = REGISTRY.add(
    ResourceSpec(
        name="AuditLogEntry",
        plural="AuditLogEntries",
        model=AuditLogEntry,
        message=pb.AuditLogEntry,
        singular_field="audit_log_entry",
        extra_codecs={
            "update_time": TimestampCodec(pb.AuditLogEntry.DESCRIPTOR.fields_by_name["update_time"], "create_time"),
            "changes": OutputCodec("changes", lambda r: [_change_proto(c) for c in r.changes or ()], repeated=True),
        },
        orderable=("create_time",),
        search_fields=(("summary", "A"),),
        read_only=True,
        audited=False,
    )
)


def _change_proto(change: dict[str, Any]) -> pb.FieldChange:
    out = pb.FieldChange(field=change["field"])
    for key in ("old_value", "new_value"):
        value = change.get(key)
        target = getattr(out, key)
        if value is None:
            target.null_value = 0
        elif isinstance(value, bool):
            target.bool_value = value
        elif isinstance(value, (int, float)):
            target.number_value = value
        elif isinstance(value, str):
            target.string_value = value
        elif isinstance(value, list):
            target.list_value.SetInParent()  # an empty list is still a list, not "unset"
            target.list_value.extend(value)
        elif isinstance(value, dict):
            target.struct_value.SetInParent()
            target.struct_value.update(value)
    return out


def _plain(value: Any) -> Any:
    """A JSON-safe form of a column value, bounded (_bounded)."""
    if isinstance(value, (uuid.UUID, Decimal)):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    return _bounded(value)


def _bounded(value: Any) -> Any:
    """value, or when longer than AUDIT_VALUE_CHARS its beginning and a marker: a string as
    "<first characters>…[truncated: N characters]", a dict or list as the beginning of its JSON
    text and "…[truncated: N bytes of JSON]"."""
    if isinstance(value, str):
        if len(value) <= AUDIT_VALUE_CHARS:
            return value
        return f"{value[:AUDIT_VALUE_CHARS]}…[truncated: {len(value)} characters]"
    if isinstance(value, (dict, list)) and value:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        if len(text) > AUDIT_VALUE_CHARS:
            return f"{text[:AUDIT_VALUE_CHARS]}…[truncated: {len(text.encode())} bytes of JSON]"
    return value


@functools.lru_cache(maxsize=None)
def _field_names(spec: ResourceSpec) -> dict[str, str]:
    """Column attribute -> the API field it appears as."""
    names: dict[str, str] = {}
    for name, codec in spec.codecs.items():
        if isinstance(codec, (InputCodec, OutputCodec)):
            continue
        attrs = [codec.attr] if codec.attr else [getattr(codec, "amount_attr", None), getattr(codec, "currency_attr", None)]
        for attr in attrs:
            if attr:
                names[attr] = name
    return names


@functools.lru_cache(maxsize=None)
def _column_keys(spec: ResourceSpec) -> tuple[str, ...]:
    return tuple(attr.key for attr in inspect(spec.model).column_attrs)


def _created_changes(spec: ResourceSpec, values: dict[str, Any]) -> list[dict[str, Any]]:
    """The changes of a new row: every set column, under its API field, secrets masked."""
    merged: dict[str, dict[str, Any]] = {}
    for key, field_name, secret in _reported_columns(spec):
        new = values.get(key)
        if new is None or field_name in merged:  # Money: one field of two columns
            continue
        merged[field_name] = {"field": field_name, "old_value": None, "new_value": MASK if secret else _plain(new)}
    return list(merged.values())


@functools.lru_cache(maxsize=None)
def _reported_columns(spec: ResourceSpec) -> tuple[tuple[str, str, bool], ...]:
    """(column key, API field, secret?) of the columns an entry reports, in the mapper's order
    (whichever path made the values): bookkeeping left out, secrets under their field name."""
    fields = _field_names(spec)
    reported = []
    for key in _column_keys(spec):
        if key in _NOISE:
            continue
        if key in SECRET_COLUMNS:
            reported.append((key, SECRET_COLUMNS[key], True))
        elif key in fields:
            reported.append((key, fields[key], False))
    return tuple(reported)


def _column_changes(spec: ResourceSpec, columns: list[tuple[str, Any, Any, bool]], mode: str) -> dict[str, dict[str, Any]]:
    """The changed fields from (column key, old, new, changed?) in the mapper's order, keyed by
    API field: bookkeeping left out, secrets masked, a field of two columns (Money) once."""
    fields = _field_names(spec)
    merged: dict[str, dict[str, Any]] = {}
    for key, old, new, changed in columns:
        if key in _NOISE or not changed:
            continue
        if key in SECRET_COLUMNS:
            merged[SECRET_COLUMNS[key]] = {"field": SECRET_COLUMNS[key], "old_value": MASK if old is not None else None,
                                            "new_value": MASK if new is not None else None}
            continue
        field_name = fields.get(key)
        if field_name is None:
            continue
        if field_name in merged:  # a field made of several columns (Money): report it once
            continue
        if old == new and mode == "update":
            continue
        merged[field_name] = {"field": field_name, "old_value": _plain(old), "new_value": _plain(new)}
    return merged


def updated_changes(spec: ResourceSpec, old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """The changes of an update from the row's column values before and after it."""
    columns = [(key, old.get(key), new.get(key), old.get(key) != new.get(key)) for key in _column_keys(spec)]
    return list(_column_changes(spec, columns, "update").values())


def _changes(spec: ResourceSpec, obj: Any, mode: str) -> list[dict[str, Any]]:
    state = inspect(obj)
    if mode == "create":
        return _created_changes(spec, {attr.key: getattr(obj, attr.key) for attr in state.mapper.column_attrs})
    columns = []
    for attr in state.mapper.column_attrs:
        key = attr.key
        if mode == "delete":
            columns.append((key, getattr(obj, key), None, True))
            continue
        history = state.attrs[key].history
        old = history.deleted[0] if history.deleted else (history.unchanged[0] if history.unchanged else None)
        new = history.added[0] if history.added else getattr(obj, key)
        columns.append((key, old, new, history.has_changes()))
    merged = _column_changes(spec, columns, mode)
    if mode == "update":
        for key, (field_name, label) in spec.relation_fields.items():
            history = state.attrs[key].history
            if not (history.added or history.deleted):
                continue
            now = [label(o) for o in getattr(obj, key)]
            before = [label(o) for o in (*history.unchanged, *history.deleted)]
            merged[field_name] = {"field": field_name, "old_value": _bounded(sorted(before)), "new_value": _bounded(sorted(now))}
    return list(merged.values())


def _entry_values(spec: ResourceSpec, resource_id: Any, action: str, changes: list[dict[str, Any]]) -> dict[str, Any]:
    call = crud.CURRENT_CALL.get(None)
    return dict(
        actor_type=call.actor_type if call else "system",
        actor_id=call.actor_id if call else None,
        action=action,
        resource_type=spec.name,
        resource_id=resource_id,
        changes=changes,
        request_id=(call.request_id or None) if call else None,
        method=(call.method or None) if call else None,
        summary=" ".join([action, spec.name, *(c["field"] for c in changes)]),
    )


def _entry(spec: ResourceSpec, obj: Any, action: str, changes: list[dict[str, Any]]) -> AuditLogEntry:
    return AuditLogEntry(**_entry_values(spec, obj.id, action, changes))


def record_inserted(session: Session, spec: ResourceSpec, rows: list[dict[str, Any]]) -> tuple[Any, list[dict[str, Any]]] | None:
    """The audit entries of rows crud.insert_rows inserts without the ORM, for it to insert with
    them (one statement on PostgreSQL for one row, else one INSERT for all the entries)."""
    if not spec.audited or not rows:
        return None
    now = utcnow()
    entries = [
        {**_entry_values(spec, values["id"], "create", _created_changes(spec, values)), "id": uuid7(), "create_time": now}
        for values in rows
    ]
    if spec.name in _CREDENTIAL_RESOURCES:
        session.info[CREDENTIALS_CHANGED_KEY] = True
    return AuditLogEntry.__table__, entries


crud.INSERT_LISTENERS.append(record_inserted)


def record_updated(
    session: Session, spec: ResourceSpec, row_id: Any, old: dict[str, Any], new: dict[str, Any]
) -> tuple[Any, list[dict[str, Any]]] | None:
    """The audit entry of a row crud.update changes with Core (the entry the flush would have
    written), for it to insert with the change."""
    if not spec.audited:
        return None
    changes = updated_changes(spec, old, new)
    if not changes:
        return None
    action = "update"
    deleted = next((c for c in changes if c["field"] == "delete_time"), None)
    if deleted is not None:
        action = "delete" if deleted["new_value"] is not None else "undelete"
    if spec.name in _CREDENTIAL_RESOURCES:
        session.info[CREDENTIALS_CHANGED_KEY] = True
    return AuditLogEntry.__table__, [{**_entry_values(spec, row_id, action, changes), "id": uuid7(), "create_time": utcnow()}]


crud.UPDATE_LISTENERS.append(record_updated)


_audited: dict[type, ResourceSpec] = {}


def _specs_by_model() -> dict[type, ResourceSpec]:
    if len(_audited) != sum(1 for spec in REGISTRY if spec.audited):
        _audited.clear()
        _audited.update({spec.model: spec for spec in REGISTRY if spec.audited})
    return _audited


@event.listens_for(Session, "before_flush")
def _record(session: Session, flush_context: Any, instances: Any) -> None:
    specs = _specs_by_model()
    entries: list[AuditLogEntry] = []
    for obj in session.new:
        spec = specs.get(type(obj))
        if spec is not None:
            entries.append(_entry(spec, obj, "create", _changes(spec, obj, "create")))
    for obj in session.dirty:
        spec = specs.get(type(obj))
        if spec is None or not session.is_modified(obj, include_collections=True):
            continue
        changes = _changes(spec, obj, "update")
        if not changes:
            continue
        action = "update"
        deleted = next((c for c in changes if c["field"] == "delete_time"), None)
        if deleted is not None:
            action = "delete" if deleted["new_value"] is not None else "undelete"
        entries.append(_entry(spec, obj, action, changes))
    for obj in session.deleted:
        spec = specs.get(type(obj))
        if spec is not None:
            entries.append(_entry(spec, obj, "delete", _changes(spec, obj, "delete")))
    for entry in entries:
        session.add(entry)
    if any(e.resource_type in _CREDENTIAL_RESOURCES for e in entries):
        session.info[CREDENTIALS_CHANGED_KEY] = True
