"""The audit trail: every change to every audited resource, recorded in the transaction that
makes it, by the write that makes it.

One diff (`changes`) turns a row's column values before and after a change into the entry's
changed fields, under their API names, secrets masked, long values bounded. Every write path
calls it directly: the Core Create and Update (engine/writes.py: `created`, `updated`, whose
entries go in with the row, on PostgreSQL in the same statement) and the ORM's changes of the
custom methods, memberships, deletes and cascades (`pending`, from engine/changes.flush, the one
way the engine and the domains flush a Session). Nothing here is per resource: the registry's
codecs map columns back to API field names.
"""
from __future__ import annotations

import datetime as dt
import functools
import uuid
from decimal import Decimal
from typing import Any

from sqlalchemy import inspect
from sqlalchemy.orm import Session

from db.base import utcnow, uuid7
from db.database import CREDENTIALS_CHANGED_KEY, json_text
from db.engine.call import current_call
from db.engine.codecs import InputCodec, OutputCodec
from db.engine.resource import ResourceSpec
from db.engine.tables import AuditLogEntry

MASK = "***"
# A changed value longer than this many characters (a dict or list: of JSON) is kept as its
# first AUDIT_VALUE_CHARS characters and a marker saying how long it was, so that entries stay
# small whatever the field limits allow (engine/codecs.DEFAULT_LIMITS).
AUDIT_VALUE_CHARS = 1024
# Bookkeeping columns every change touches: not news in an audit entry.
_NOISE = {"update_time", "revision"}

_AS_IS = frozenset({int, float, bool, type(None)})


def _plain(value: Any) -> Any:
    """A JSON-safe form of a column value, bounded (_bounded)."""
    kind = type(value)
    if kind in _AS_IS:  # most values of a row: asked first (a batch of creates reports every column)
        return value
    if kind is str:
        return value if len(value) <= AUDIT_VALUE_CHARS else _bounded(value)
    if isinstance(value, Decimal):  # one form, whatever scale the value was read with
        return format(value.normalize(), "f")
    if isinstance(value, uuid.UUID):
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
        text = json_text(value)  # compact, as stored
        if len(text) > AUDIT_VALUE_CHARS:
            return f"{text[:AUDIT_VALUE_CHARS]}…[truncated: {len(text.encode())} bytes of JSON]"
    return value


@functools.cache
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


@functools.cache
def _column_keys(spec: ResourceSpec) -> tuple[str, ...]:
    return tuple(attr.key for attr in inspect(spec.model).column_attrs)


@functools.cache
def _reported_columns(spec: ResourceSpec) -> tuple[tuple[str, str, bool], ...]:
    """(column key, API field, secret?) of the columns an entry reports, in the mapper's order:
    bookkeeping left out, secrets under their field name."""
    fields = _field_names(spec)
    reported = []
    for key in _column_keys(spec):
        if key in _NOISE:
            continue
        if key in spec.secrets:
            reported.append((key, spec.secrets[key], True))
        elif key in fields:
            reported.append((key, fields[key], False))
    return tuple(reported)


def changes(spec: ResourceSpec, old: dict[str, Any] | None, new: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The one diff: the changed fields of a row from its column values before (None: created)
    and after (None: deleted) the change, in the mapper's order; a field of two columns (Money)
    once. A new row reports its set columns; a deleted one every column, as it was; an update
    the columns whose values differ."""
    if old is None and new is not None:
        return _created(spec, new)
    merged: dict[str, dict[str, Any]] = {}
    for key, field_name, secret in _reported_columns(spec):
        before = None if old is None else old.get(key)
        after = None if new is None else new.get(key)
        if field_name in merged:  # Money: one field of two columns
            continue
        if old is None and after is None:
            continue
        if old is not None and new is not None and before == after:
            continue
        if secret:
            merged[field_name] = {"field": field_name, "old_value": MASK if before is not None else None, "new_value": MASK if after is not None else None}
        else:
            merged[field_name] = {"field": field_name, "old_value": _plain(before), "new_value": _plain(after)}
    return list(merged.values())


def _created(spec: ResourceSpec, new: dict[str, Any]) -> list[dict[str, Any]]:
    """changes(spec, None, new) in fewer steps (a batch of creates asks it of every row): the set
    columns, a field of two columns once."""
    found, seen = [], set()
    for key, field_name, secret in _reported_columns(spec):
        after = new.get(key)
        if after is None or field_name in seen:
            continue
        seen.add(field_name)
        found.append({"field": field_name, "old_value": None, "new_value": MASK if secret else _plain(after)})
    return found


def _action(action: str, found: list[dict[str, Any]]) -> str:
    """An update that sets or clears delete_time is a (soft) delete or an undelete."""
    deleted = next((c for c in found if c["field"] == "delete_time"), None)
    if action == "update" and deleted is not None:
        return "delete" if deleted["new_value"] is not None else "undelete"
    return action


def _entry(session: Session, spec: ResourceSpec, resource_id: Any, action: str, found: list[dict[str, Any]]) -> dict[str, Any]:
    """An audit entry's column values, for the caller of this unit of work."""
    if spec.credentials:
        session.info[CREDENTIALS_CHANGED_KEY] = True  # cached credentials are stale
    call = current_call()
    return dict(
        id=uuid7(),
        create_time=utcnow(),
        actor_type=call.actor_type if call else "system",
        actor_id=call.actor_id if call else None,
        action=action,
        resource_type=spec.name,
        resource_id=resource_id,
        changes=found,
        request_id=(call.request_id or None) if call else None,
        method=(call.method or None) if call else None,
        summary=" ".join([action, spec.name, *(c["field"] for c in found)]),
    )


def created(session: Session, spec: ResourceSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of new rows (their column values before the defaults computed at INSERT
    time, as a flush would see them), for the write to insert with them."""
    if not spec.audited:
        return []
    return [_entry(session, spec, values["id"], "create", changes(spec, None, values)) for values in rows]


def updated(session: Session, spec: ResourceSpec, row_id: Any, old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any] | None:
    """The entry of a changed row, for the write to insert with the change; None when nothing
    an entry reports changed."""
    if not spec.audited:
        return None
    found = changes(spec, old, new)
    if not found:
        return None
    return _entry(session, spec, row_id, _action("update", found), found)


def deleted(session: Session, spec: ResourceSpec, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The entries of rows deleted by a Core statement (their column values as they were), for
    the write to insert with the deletion."""
    if not spec.audited:
        return []
    return [_entry(session, spec, values["id"], "delete", changes(spec, values, None)) for values in rows]


def pending(session: Session, specs: dict[type, ResourceSpec]) -> list[AuditLogEntry]:
    """The entries of the changes a Session is about to flush: its new, changed and deleted
    rows of audited resources (specs: by model), relations included."""
    entries = []
    for obj in session.new:
        spec = specs.get(type(obj))
        if spec is not None and spec.audited:
            entries.append(_entry(session, spec, obj.id, "create", changes(spec, None, _values(obj))))
    for obj in session.dirty:
        spec = specs.get(type(obj))
        if spec is None or not spec.audited or not session.is_modified(obj, include_collections=True):
            continue
        found = _orm_update(spec, obj)
        if found:
            entries.append(_entry(session, spec, obj.id, _action("update", found), found))
    for obj in session.deleted:
        spec = specs.get(type(obj))
        if spec is not None and spec.audited:
            entries.append(_entry(session, spec, obj.id, "delete", changes(spec, _values(obj), None)))
    return [AuditLogEntry(**entry) for entry in entries]


def _values(obj: Any) -> dict[str, Any]:
    return {attr.key: getattr(obj, attr.key) for attr in inspect(obj).mapper.column_attrs}


def _orm_update(spec: ResourceSpec, obj: Any) -> list[dict[str, Any]]:
    """changes() of a mapped row from its attribute history, and its changed relations."""
    state = inspect(obj)
    old, new = {}, {}
    for attr in state.mapper.column_attrs:
        history = state.attrs[attr.key].history
        old[attr.key] = history.deleted[0] if history.deleted else (history.unchanged[0] if history.unchanged else None)
        new[attr.key] = history.added[0] if history.added else getattr(obj, attr.key)
    found = changes(spec, old, new)
    for key, (field_name, label) in spec.relation_fields.items():
        history = state.attrs[key].history
        if not (history.added or history.deleted):
            continue
        now = [label(o) for o in getattr(obj, key)]
        before = [label(o) for o in (*history.unchanged, *history.deleted)]
        found = [c for c in found if c["field"] != field_name]
        found.append({"field": field_name, "old_value": _bounded(sorted(before)), "new_value": _bounded(sorted(now))})
    return found
