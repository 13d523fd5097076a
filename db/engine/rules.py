"""Who may see and change which rows: the row rules every resource declares
(ResourceSpec.access), applied by the generic engine.

Roles rank guest < user < manager < admin. Admin sees and manages everything. For the others a
resource declares two rules over its table, built for the calling user:

- `read`:   rows the caller may see (List and Search filter by it; Get of any other id is
            PERMISSION_DENIED, checked before existence, so ids of hidden rows do not leak);
- `manage`: rows the caller may create, change or delete (checked on the row before a change
            and on the row after it, so nobody can move a row out of their own reach);
- `delete`: optional, rows the caller may delete, undelete and see once soft-deleted, where
            fewer than it manages (a document's editors change it, only its owner deletes it).

A rule's predicate None means "every row". Which RPCs a role may call at all is
service/policy.py's table; `nexus-data policy` prints both.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, false, or_, select, true
from sqlalchemy.sql.elements import ColumnElement

from db import errors
from db.engine.call import current_call

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from db.engine.resource import ResourceSpec


ROLES = ("guest", "user", "manager", "admin")
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}
Build = Callable[[uuid.UUID | None, str], ColumnElement[bool] | None]


@dataclass(frozen=True)
class Rule:
    """A row rule: the SQL predicate for a caller (its user id and role; None: every row), and in
    words which rows it lets through (`says`, for a role: the policy table an operator prints)."""

    build: Build
    says: str | Callable[[str], str]

    def __call__(self, user_id: uuid.UUID | None, role: str) -> ColumnElement[bool] | None:
        return self.build(user_id, role)

    def describe(self, role: str) -> str:
        return self.says if isinstance(self.says, str) else self.says(role)


EVERY_ROW = Rule(lambda user_id, role: None, "all")
NO_ROW = Rule(lambda user_id, role: false(), "none")


def is_caller(column: Any, user_id: uuid.UUID | None) -> ColumnElement[bool]:
    """column holds the calling user. Never true for a caller without a user (a key made
    without one): `column == None` would render IS NULL and match every row whose owner is
    unset or was hard-deleted."""
    return column == user_id if user_id is not None else false()


def mine(column: Any, says: str | None = None) -> Rule:
    """Rows whose column holds the calling user."""
    return Rule(lambda user_id, role: is_caller(column, user_id), says or f"own ({column.key})")


@dataclass(frozen=True)
class CreateRule:
    """What a non-admin's new rows must meet beyond `manage`, checked by the engine before they
    are written, once for all the rows of a call: check(conn, rows, call, field prefixes)
    raises PERMISSION_DENIED naming the field of the first row that fails (it reads through
    the connection, so a one-statement create can run it). `says` is it in words, for the
    policy table."""

    says: str
    check: Callable[[Any, list[Any], Any, list[str]], None]


@dataclass(frozen=True)
class Access:
    """A resource's row rules. The default: everyone sees every row, only admins change them."""

    read: Rule = EVERY_ROW
    manage: Rule = NO_ROW
    # Fields only an admin may set, whoever may otherwise change the row.
    admin_only: frozenset[str] = frozenset()
    # What else a non-admin's new rows must meet (a task goes only into the caller's projects).
    create: CreateRule | None = None
    # Rows the caller may delete, undelete and see once soft-deleted, when fewer than `manage`
    # (None: those it manages).
    delete: Rule | None = None


def read_predicate(spec: ResourceSpec, role: str, user_id: uuid.UUID | None) -> ColumnElement[bool] | None:
    """None when the caller sees every row of the resource."""
    if role == "admin":
        return None
    return spec.access.read(user_id, role)


def manage_predicate(spec: ResourceSpec, role: str, user_id: uuid.UUID | None) -> ColumnElement[bool] | None:
    """None when the caller may change every row of the resource."""
    if role == "admin":
        return None
    if role == "guest":
        return false()
    built = spec.access.manage(user_id, role)
    return true() if built is None else built


def delete_predicate(spec: ResourceSpec, role: str, user_id: uuid.UUID | None) -> ColumnElement[bool] | None:
    """None when the caller may delete every row of the resource; the manage rule unless the
    resource declares a delete rule, and then both."""
    managed = manage_predicate(spec, role, user_id)
    if managed is None or spec.access.delete is None or role == "guest":
        return managed
    built = spec.access.delete(user_id, role)
    return managed if built is None else and_(managed, built)


def describe(spec: ResourceSpec, role: str) -> tuple[str, str]:
    """(sees, manages) of a role on a resource, in words: a row of the policy table."""
    sees = "all" if role == "admin" else spec.access.read.describe(role)
    if spec.private_fields and role != "admin" and sees != "none":
        sees += f" ({', '.join(sorted(spec.private_fields))}: only of their own)"
    if spec.read_only:
        manages = "none (written by the service)"
    elif role == "admin":
        manages = "all"
    elif role == "guest":
        manages = "none"
    else:
        manages = spec.access.manage.describe(role)
        if spec.access.admin_only and manages != "none":
            manages += f" (not {', '.join(sorted(spec.access.admin_only))}: admins only)"
        if spec.access.create is not None and manages != "none":
            manages += f"; new ones only {spec.access.create.says}"
        if spec.access.delete is not None and manages != "none":
            manages += f"; deletes only {spec.access.delete.describe(role)}"
    return sees, manages


def predicate(spec: ResourceSpec, write: bool, deleting: bool = False) -> Any:
    """The caller's row filter for spec (None: every row), from its declared access: the read
    rule, the manage rule (write), or the delete rule (deleting)."""
    call = current_call()
    if call is None:
        return None
    if deleting:
        return delete_predicate(spec, call.role, call.actor_user_id)
    if write:
        return manage_predicate(spec, call.role, call.actor_user_id)
    return read_predicate(spec, call.role, call.actor_user_id)


def read_rule(spec: ResourceSpec, show_deleted: bool) -> Any:
    """The caller's read rule, and for a read that shows soft-deleted rows, those only where the
    caller may delete the row, and so undelete it (its author or owner, the resource's
    managers; admins: all)."""
    allowed = predicate(spec, write=False)
    call = current_call()
    if not (show_deleted and spec.soft_delete and call is not None and call.role != "admin"):
        return allowed
    live_or_managed = or_(spec.table.c.delete_time.is_(None), predicate(spec, write=True, deleting=True))
    return live_or_managed if allowed is None else and_(allowed, live_or_managed)


def denied(spec: ResourceSpec, raw_id: str, write: bool) -> errors.PermissionDenied:
    verb = "change" if write else "see"
    return errors.PermissionDenied(
        f"the caller may not {verb} {spec.name} {raw_id!r}",
        reason="ROW_ACCESS_DENIED",
        metadata={"resource_type": spec.name, "resource_id": raw_id},
    )


def found(spec: ResourceSpec, row: Any, raw_id: str, allowed: Any, *, show_deleted: bool, write: bool, field_path: str) -> Any:
    """row, if the lookup found it: else PERMISSION_DENIED when a row rule applies (hidden ids do
    not leak), NOT_FOUND otherwise; a soft-deleted row counts as absent unless show_deleted."""
    if row is None or (spec.soft_delete and row.delete_time is not None and not show_deleted):
        if allowed is not None and row is None:
            raise denied(spec, raw_id, write)
        raise errors.NotFound.resource(spec.name, raw_id, field_path)
    return row


def check_create_rule(session: Session, spec: ResourceSpec, rows: list[Any], prefixes: list[str]) -> None:
    """Before new rows are written: a caller other than an admin must meet the resource's
    create rule (Access.create), for every row, with one check for them all."""
    call = current_call()
    rule = spec.access.create
    if rule is None or call is None or call.role == "admin":
        return
    rule.check(session.connection(), rows, call, prefixes)


def check_managed(session: Session, spec: ResourceSpec, row: Any) -> None:
    """After a write: the caller must still manage the row it created or changed."""
    check_managed_together(session, spec, [row])


def check_managed_together(session: Session, spec: ResourceSpec, rows: list[Any], new: frozenset[Any] = frozenset()) -> None:
    """check_managed for many rows, with one query. new: the ids of rows this call made, whose
    refusal names the rule, not an id the caller never got (the write is undone)."""
    allowed = predicate(spec, write=True)
    if allowed is None:
        return
    ids = [row.id for row in rows]
    managed = set(session.scalars(select(spec.table.c.id).where(spec.table.c.id.in_(ids), allowed)))
    for row in rows:
        if row.id in managed:
            continue
        if row.id in new:
            call = current_call()
            rule = spec.access.manage.describe(call.role) if call is not None else ""
            raise errors.PermissionDenied(
                f"the caller may not make this {spec.name}: it would not be among those it may change ({rule})",
                reason="ROW_ACCESS_DENIED",
                metadata={"resource_type": spec.name},
            )
        raise denied(spec, str(row.id), True)


def check_field_rights(spec: ResourceSpec, names: Iterable[str], prefix: str) -> None:
    call = current_call()
    if call is None or call.role == "admin":
        return
    forbidden = sorted(set(names) & spec.access.admin_only)
    if forbidden:
        raise errors.PermissionDenied(
            f"only an admin may set {', '.join(prefix + f for f in forbidden)}",
            reason="FIELD_ACCESS_DENIED",
            metadata={"field": prefix + forbidden[0]},
        )
