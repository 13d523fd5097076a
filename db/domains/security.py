"""Security domain: the audit trail, served read-only (its entries are written by the engine,
engine/audit.py, into its table, engine/tables.py)."""
from __future__ import annotations

from typing import Any

from nexus.security.v1 import security_pb2 as pb

from db.engine.codecs import OutputCodec, TimestampCodec
from db.engine.resource import REGISTRY, ResourceSpec
from db.engine.rules import NO_ROW, Access
from db.engine.tables import AuditLogEntry


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
        access=Access(read=NO_ROW),  # and SecurityService is for admins only (service/policy.py)
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
