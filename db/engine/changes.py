"""The one way the engine and the domains flush a Session's changes: engine/changes.flush.

Sessions of Database.run do not flush on their own (autoflush is off, and a transaction that
ends with changes not flushed is refused), so every ORM change goes through here: checked
against its relation limits, audited (engine/audit.pending), then flushed.
"""
from __future__ import annotations

from sqlalchemy import inspect
from sqlalchemy.orm import Session

from db.engine import audit
from db.engine.resource import REGISTRY, ResourceSpec
from db.errors import ResourceExhausted


def flush(session: Session) -> None:
    """Flush the Session's changes, with their audit entries, after checking relation sizes."""
    specs = REGISTRY.models()
    check_relation_sizes(session, specs)
    session.add_all(audit.pending(session, specs))
    session.flush()


def check_relation_sizes(session: Session, specs: dict[type, ResourceSpec]) -> None:
    """A relation that grew past its limit (ResourceSpec.relation_limit) stops the flush:
    RESOURCE_EXHAUSTED naming the field, whichever method added to it (AddProjectMember,
    AddChannelMember, AddTaskDependency, AssignRole). specs: the resources by model."""
    for obj in session.dirty:
        spec = specs.get(type(obj))
        if spec is None or not spec.relation_fields:
            continue
        state = inspect(obj)
        for key, (field_name, _) in spec.relation_fields.items():
            if not state.attrs[key].history.added:
                continue
            limit, count = spec.relation_limit(key), len(getattr(obj, key))
            if count > limit:
                raise ResourceExhausted(
                    f"{spec.name} {obj.id} may have at most {limit} {field_name} (it would have {count})",
                    reason="TOO_MANY_RELATED",
                    metadata={"field": field_name, "limit": str(limit), "resource_id": str(obj.id)},
                )
