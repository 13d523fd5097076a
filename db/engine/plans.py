"""How each standard write runs, decided once, before it runs: one statement, or a transaction.

The answer is a Plan (db/unit.py) with why it was chosen. Database.run executes it and hands it
to the write with its unit of work (db/unit.plan_of); nothing after this looks at the
connection or the dialect to decide again. Every other write (Delete, Undelete, BatchCreate,
the custom methods) is a transaction (unit.TRANSACTION).

A ONE_STATEMENT write uses nothing of a Session but its connection. On PostgreSQL its one
statement is its commit, in autocommit, without BEGIN and COMMIT: a Create's row goes in with
its audit entry and its reference checks in one INSERT (engine/writes.insert_rows), an Update's
change with its audit entry in one UPDATE at the revision it read. On SQLite it runs in one
IMMEDIATE transaction on a bare connection (its statements are several, the write lock held
from the first). docs/ARCHITECTURE.md lists the fast paths with their tests.
"""
from __future__ import annotations

from typing import Any

from db import errors
from db.engine.call import Call
from db.engine.resource import ResourceSpec
from db.engine.rules import predicate
from db.engine.writes import update_paths
from db.unit import TRANSACTION, Mode, Plan

ONE_STATEMENT_CREATE = Plan(Mode.ONE_STATEMENT, "a create with nothing to write or check after its INSERT")
ONE_STATEMENT_UPDATE = Plan(Mode.ONE_STATEMENT, "an update with nothing to write or check after its UPDATE")
# The ids of a list reference are checked before the write, not in its statement.
LIST_REFERENCES = Plan(Mode.TRANSACTION, "the items of its list references are read FOR SHARE until its commit")


def _needs_transaction(spec: ResourceSpec) -> Plan | None:
    """Why any write of spec needs a transaction, or None."""
    if not spec.audited:
        return Plan(Mode.TRANSACTION, f"{spec.name} is not audited: its write is not the one statement plans count on")
    if spec.stream_scope is not None:
        return Plan(Mode.TRANSACTION, f"{spec.name} appends a change event with each write")
    if predicate(spec, write=True) is not None:
        return Plan(Mode.TRANSACTION, "the caller's manage rule is checked after the write")
    return None


def plan_create(spec: ResourceSpec, request: Any, call: Call) -> Plan:
    """A Create: one statement unless it has more to write (a request id to claim, a change
    event) or to check after its INSERT (the caller's row rule)."""
    if request.request_id:
        return Plan(Mode.TRANSACTION, "its request id is claimed with it")
    needs = _needs_transaction(spec)
    if needs is not None:
        return needs
    msg = getattr(request, spec.singular_field)
    if any(spec.codecs[name].present(msg) for name in spec.list_references):
        return LIST_REFERENCES
    return ONE_STATEMENT_CREATE


def plan_update(spec: ResourceSpec, request: Any, call: Call) -> Plan:
    """An Update: one statement under the same conditions as a Create, and unless it changes a
    reference (checked FOR SHARE, a lock autocommit would not keep). The row is read without a
    lock; one changed in between makes it run again in a transaction (unit.FALLBACK)."""
    needs = _needs_transaction(spec)
    if needs is not None:
        return needs
    if spec.on_update is not None:
        return Plan(Mode.TRANSACTION, f"a change of a {spec.name} writes more rows (its on_update)")
    msg = getattr(request, spec.singular_field)
    try:
        names = update_paths(spec, msg, request.update_mask.paths)
    except errors.NexusError:
        return Plan(Mode.TRANSACTION, "its update mask is refused (by the update itself)")
    if set(names) & set(spec.references):
        return Plan(Mode.TRANSACTION, "it changes a reference, read FOR SHARE until its commit")
    if set(names) & set(spec.list_references):
        return LIST_REFERENCES
    return ONE_STATEMENT_UPDATE


__all__ = ["TRANSACTION", "plan_create", "plan_update"]
