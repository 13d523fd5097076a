"""The resource declaration: everything the generic engine needs to serve one resource."""
from __future__ import annotations

import copy
import datetime as dt
import functools
import keyword
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from sqlalchemy import JSON, Boolean, Date, Float, Integer, Numeric, String, Uuid, inspect
from sqlalchemy.orm import Session

from db.base import Base, UTCDateTime
from db.engine.codecs import (
    DEFAULT_LIMITS,
    DEFAULT_RELATION_ITEMS,
    DateCodec,
    EnumCodec,
    FieldCodec,
    OutputCodec,
    ScalarCodec,
    SizeLimit,
    StringListCodec,
    StructCodec,
    TimestampCodec,
    UuidCodec,
    enum_filter_names,
    enum_of,
)
from db.engine.filtering import FieldKind, FilterCompiler, FilterField
from db.engine.call import current_call
from db.engine.rules import Access

COMMON_OUTPUT_ONLY = frozenset({"id", "create_time", "update_time", "delete_time", "etag"})
# Hook signature: (session, row, changed field names, creating?, call) -> None; may raise NexusError.
# It validates and completes the row; it may read, never write (a Create may run in autocommit:
# engine/plans.plan_create).
WriteHook = Callable[[Session, Any, set[str], bool, Any], None]
# Hook signature: (session, old values, new values (both by column), call) -> None. Run when a
# standard Update changes a row, before the row is written: it may complete the new values (a
# document's version number) and write other rows through the engine, audited (the state the
# document leaves, kept as a version), in the update's transaction.
UpdateHook = Callable[[Session, dict[str, Any], dict[str, Any], Any], None]


def etag_of(row: Any) -> str:
    return f'W/"{row.revision}"'


# Column names that hold a secret by their look: a resource must declare each one it has in
# `secrets` (Registry.add refuses it otherwise), so that no secret reaches a read by oversight.
# Integer columns hold no secret (counts of a model's tokens: prompt_tokens).
SECRET_LOOKING = ("_hash", "secret", "password", "token")


@dataclass(frozen=True)
class ListReference:
    """The items of a repeated field reference target's rows: each item is an id, or (key) an
    object holding the id at key, absent or empty when the item names no row (an attachment by
    url only)."""

    target: str
    key: str | None = None


M = TypeVar("M", bound=Message)


@dataclass(eq=False)
class ResourceSpec(Generic[M]):
    """Declares one resource: its model, message and field rules. Built codecs are cached."""

    name: str
    plural: str
    model: type[Base]
    message: type[M]
    singular_field: str
    output_only: frozenset[str] = frozenset()
    immutable: frozenset[str] = frozenset()
    required: frozenset[str] = frozenset()
    extra_codecs: dict[str, FieldCodec] = field(default_factory=dict)
    # field -> name of the resource it references; checked before writing (NOT_FOUND naming it).
    references: dict[str, str] = field(default_factory=dict)
    # Repeated field -> the resource its items reference (email attachments naming Files), checked
    # as references are, item by item (the field path names the item).
    list_references: dict[str, ListReference] = field(default_factory=dict)
    orderable: tuple[str, ...] = ("create_time", "update_time")
    default_order: tuple[tuple[str, bool], ...] = (("create_time", False),)
    search_fields: tuple[tuple[str, str], ...] = ()  # (column, weight A-D), best weight first
    filter_exclude: frozenset[str] = frozenset()
    extra_filters: dict[str, FilterField] = field(default_factory=dict)
    batch_create: bool = False
    # Creates one BatchCreate takes at most (INVALID_ARGUMENT naming `requests` beyond it).
    batch_create_limit: int = 1000
    batch_get: bool = False
    before_write: WriteHook | None = None
    # What a change of a row does beyond it (UpdateHook); its updates then run in a transaction.
    on_update: UpdateHook | None = None
    # Options a servicer may load eagerly with every row (relationships the output needs).
    load_options: tuple[Any, ...] = ()
    # For streamed resources: the scope ("channels/<id>") whose event log a change goes to.
    stream_scope: Callable[[Any], str] | None = None
    # Relationship -> (API field, label of one related row), for audit diffs of memberships.
    relation_fields: dict[str, tuple[str, Callable[[Any], str]]] = field(default_factory=dict)
    # Relationship -> columns of the related rows the output reads (engine/reading.py); default ("id",).
    relation_columns: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The field naming the user who owns a new row; defaults to the caller when left empty.
    owner_field: str | None = None
    # Served with Get / List / Search only (written by the service itself).
    read_only: bool = False
    # Whether Create (and BatchCreate) are served: False for rows the service makes itself
    # through a custom method (a File, by its upload), which the other standard methods serve.
    create_rpc: bool = True
    # Whether Update is served: False for a record, written once and never changed (an AI
    # interaction); Delete is still served as its access says.
    update_rpc: bool = True
    # The fields whose values name one row, for engine/upserts (a unique index holds them; on
    # PostgreSQL concurrent upserts take turns by the first one's value).
    upsert_key: tuple[str, ...] = ()
    # Whether changes are recorded in the audit trail.
    audited: bool = True
    # Columns that hold secrets (write-only: never in a response, a list, an export or an audit
    # entry: masked there), with the API field they are written through. Reads leave them in
    # the database.
    secrets: dict[str, str] = field(default_factory=dict)
    # Whether its changes make cached credentials stale (a revoked key, a deactivated user).
    credentials: bool = False
    # Who sees and changes which rows (engine/rules.py); the default: everyone sees every row,
    # only admins change them.
    access: Access = field(default_factory=Access)
    # For a resource whose rows are themselves streams: the kind of scope ("channels") a
    # StreamEvents call follows by its ids; its stream_scope is "<kind>/<id>".
    stream_kind: str | None = None
    # Whether its changes can change who may see a stream (a channel's members, its privacy):
    # open streams of its scopes are re-authorised on them.
    changes_stream_access: bool = False
    # Field -> its maximum size, instead of the default of its kind (codecs.DEFAULT_LIMITS); a
    # column with a length allows no more than that length. A relation field (member_ids) takes
    # items only.
    size_limits: dict[str, SizeLimit] = field(default_factory=dict)
    # Fields shown only to the row's owner (owner_field) and admins: every message of a row
    # (Get, List, Search, BatchGet, a write's answer, a replayed request id) is made by to_proto,
    # which leaves them out for anyone else; they can be neither filtered nor ordered by, so a
    # filter cannot tell others what they hold (a bcc list).
    private_fields: frozenset[str] = frozenset()

    @property
    def soft_delete(self) -> bool:
        return hasattr(self.model, "delete_time")

    @property
    def searchable(self) -> bool:
        return bool(self.search_fields)

    @functools.cached_property
    def descriptor(self) -> Descriptor:
        """The message's descriptor. Message types DESCRIPTOR as either implementation's (pure
        Python or upb); upb's passes isinstance for descriptor.Descriptor, the public type."""
        descriptor = self.message.DESCRIPTOR
        if not isinstance(descriptor, Descriptor):
            raise TypeError(f"{self.name}: {descriptor!r} is not a message descriptor")
        return descriptor

    @functools.cached_property
    def table(self) -> Any:
        return self.model.__table__

    @functools.cached_property
    def codecs(self) -> dict[str, FieldCodec]:
        """One codec per message field, in field order."""
        out: dict[str, FieldCodec] = {}
        mapper = inspect(self.model)
        columns = {c.key: c for c in mapper.columns}
        for fd in self.descriptor.fields:
            if fd.name in self.extra_codecs:
                # A copy: the limit set below belongs to this resource's field.
                out[fd.name] = copy.copy(self.extra_codecs[fd.name])
            elif fd.name == "etag":
                out[fd.name] = OutputCodec("etag", etag_of)
            elif fd.name in columns:
                out[fd.name] = _codec_for(fd, columns[fd.name])
            else:
                raise TypeError(f"{self.name}.{fd.name}: no column and no codec declared")
            out[fd.name].limit = self._size_limit(fd.name, out[fd.name])
        unknown = set(self.size_limits) - set(out)
        if unknown:
            raise TypeError(f"{self.name}: size_limits names no field: {', '.join(sorted(unknown))}")
        return out

    @functools.cached_property
    def upsert_attrs(self) -> tuple[str, ...]:
        """The model attribute of each field of upsert_key, in its order."""
        attrs = tuple(self.codecs[name].attr for name in self.upsert_key)
        for name, attr in zip(self.upsert_key, attrs, strict=True):
            if attr is None:
                raise TypeError(f"{self.name}.{name}: an upsert_key field maps to one column; this one has none")
        return tuple(attr for attr in attrs if attr is not None)

    def _size_limit(self, name: str, codec: FieldCodec) -> SizeLimit | None:
        """The one place that decides how large a field may be: the resource's declaration, else
        the column's length, else the default of the field's kind; None for a field its type
        bounds (or one never written)."""
        if codec.size_kind is None or not codec.writable:
            return None
        length = getattr(codec, "column_length", None)
        declared = self.size_limits.get(name)
        if declared is None:
            return SizeLimit(chars=length) if length is not None else DEFAULT_LIMITS[codec.size_kind]
        if length is not None and (declared.chars is None or declared.chars > length):
            raise TypeError(f"{self.name}.{name}: its column holds at most {length} characters; the limit cannot be larger")
        return declared

    def relation_limit(self, key: str) -> int:
        """How many related rows the relationship `key` (one of relation_fields) may hold."""
        declared = self.size_limits.get(self.relation_fields[key][0])
        items = declared.items if declared is not None else None
        return items if items is not None else DEFAULT_RELATION_ITEMS

    @functools.cached_property
    def all_output_only(self) -> frozenset[str]:
        computed = {n for n, c in self.codecs.items() if not c.writable}
        return COMMON_OUTPUT_ONLY | self.output_only | computed

    @functools.cached_property
    def creatable(self) -> tuple[str, ...]:
        return tuple(n for n in self.codecs if n not in self.all_output_only)

    @functools.cached_property
    def updatable(self) -> tuple[str, ...]:
        return tuple(n for n in self.creatable if n not in self.immutable)

    @functools.cached_property
    def filter_fields(self) -> dict[str, FilterField]:
        """Filterable fields: every column-backed field of the message, minus exclusions and the
        columns holding secrets (a field written straight into one, a User's password_hash: a
        filter on it would tell what the secret is)."""
        fields: dict[str, FilterField] = {}
        columns = self.table.c
        for fd in self.descriptor.fields:
            if fd.name in self.filter_exclude or fd.name in self.private_fields or fd.name not in columns or fd.name in self.secrets:
                continue
            kind = _filter_kind(fd, columns[fd.name])
            if kind is None:
                continue
            enum_values = enum_filter_names(enum_of(fd)) if kind is FieldKind.ENUM else None
            fields[fd.name] = FilterField(kind, columns[fd.name], enum_values)
        fields.update(self.extra_filters)
        return fields

    @functools.lru_cache(maxsize=4)  # noqa: B019 - one per dialect, specs live for the process
    def filter_compiler(self, dialect: str) -> FilterCompiler:
        return FilterCompiler(self.filter_fields, dialect)

    def to_proto(self, row: Any, read_mask: Iterable[str] | None = None) -> M:
        """The message for a row (mapped or Core): every field, or those of read_mask."""
        if read_mask is None:
            msg = self.dumper(row)
        else:
            msg = self.message()
            codecs = self.codecs
            for name in read_mask:
                codecs[name].dump(row, msg)
        if self.private_fields and not self.shows_private(row):
            for name in self.private_fields:
                msg.ClearField(name)
        return msg

    def shows_private(self, row: Any) -> bool:
        """Whether the caller may see the row's private_fields: admins (and the service itself,
        outside a call), and the row's owner."""
        call = current_call()
        if call is None or call.role == "admin":
            return True
        owner = getattr(row, self.owner_field) if self.owner_field else None
        return owner is not None and call.actor_user_id is not None and str(owner) == str(call.actor_user_id)

    @functools.cached_property
    def dumper(self) -> Callable[[Any], M]:
        """to_proto of the whole resource, as one generated function (see compile_dumper)."""
        return compile_dumper(self.message, self.codecs)


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


def _timestamp_into(ts: Any, value: dt.datetime) -> None:
    """Timestamp.FromDatetime without its time-tuple round trip (naive values are UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    delta = value - _EPOCH
    seconds, nanos = delta.days * 86400 + delta.seconds, delta.microseconds * 1000
    if seconds or nanos:
        ts.seconds, ts.nanos = seconds, nanos
    else:
        ts.SetInParent()


def compile_dumper(message: type[M], codecs: dict[str, FieldCodec]) -> Callable[[Any], M]:
    """One straight-line function that fills every field of `message` from a row.

    The same as calling each codec's dump in turn, without a method call and a getattr per
    field: scalars, ids, enums and timestamps are inlined; other codecs are called as they are.
    """
    lines = ["def dump(row):", "    m = _message()"]
    env: dict[str, Any] = {"_message": message, "_str": str, "_timestamp_into": _timestamp_into}
    for i, (name, codec) in enumerate(codecs.items()):
        attr = codec.attr
        plain = attr is not None and attr.isidentifier() and not keyword.iskeyword(attr) and name.isidentifier() and not keyword.iskeyword(name)
        if plain and type(codec) is ScalarCodec:
            lines += [f"    v = row.{attr}", f"    if v is not None: m.{name} = v"]
        elif plain and type(codec) is UuidCodec:
            lines += [f"    v = row.{attr}", f"    if v is not None: m.{name} = _str(v)"]
        elif plain and type(codec) is EnumCodec:
            env[f"_enum{i}"] = codec.to_number
            lines += [f"    v = row.{attr}", f"    if v is not None: m.{name} = _enum{i}[v]"]
        elif plain and type(codec) is TimestampCodec:
            lines += [f"    v = row.{attr}", f"    if v is not None: _timestamp_into(m.{name}, v)"]
        else:
            env[f"_codec{i}"] = codec
            lines.append(f"    _codec{i}.dump(row, m)")
    lines.append("    return m")
    exec(compile("\n".join(lines), f"<dumper of {message.DESCRIPTOR.full_name}>", "exec"), env)  # noqa: S102 - our own code
    return env["dump"]


def _codec_for(fd: FieldDescriptor, column: Any) -> FieldCodec:
    ctype = column.type
    attr = column.key
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return EnumCodec(fd, attr)
    if fd.message_type is not None:  # a message field
        full = fd.message_type.full_name
        if full == "google.protobuf.Timestamp":
            return TimestampCodec(fd, attr)
        if full == "google.protobuf.Struct":
            return StructCodec(fd, attr)
        if full == "nexus.common.v1.Date":
            return DateCodec(fd, attr)
        raise TypeError(f"{fd.full_name}: message type {full} needs a declared codec")
    if fd.is_repeated:
        if fd.type == FieldDescriptor.TYPE_STRING and isinstance(ctype, JSON):
            return StringListCodec(fd, attr)
        raise TypeError(f"{fd.full_name}: repeated field needs a declared codec")
    if isinstance(ctype, Uuid):
        return UuidCodec(fd, attr)
    length = getattr(ctype, "length", None) if isinstance(ctype, String) else None
    return ScalarCodec(fd, attr, bool(column.nullable), length)


def _filter_kind(fd: FieldDescriptor, column: Any) -> FieldKind | None:
    ctype = column.type
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return FieldKind.ENUM
    if isinstance(ctype, UTCDateTime):
        return FieldKind.TIMESTAMP
    if isinstance(ctype, Date):
        return FieldKind.DATE
    if isinstance(ctype, Uuid):
        return FieldKind.UUID
    if isinstance(ctype, JSON):
        return FieldKind.REPEATED_STRING if fd.is_repeated else FieldKind.JSON
    if isinstance(ctype, Boolean):
        return FieldKind.BOOL
    if isinstance(ctype, Integer):
        return FieldKind.INT
    if isinstance(ctype, (Float, Numeric)):
        return FieldKind.FLOAT
    if isinstance(ctype, String):
        return FieldKind.STRING
    return None


class Registry:
    """Every served resource, by name; tests iterate it so none is forgotten."""

    def __init__(self) -> None:
        self._specs: dict[str, ResourceSpec] = {}
        self._by_model: dict[type, ResourceSpec] = {}

    def add(self, spec: ResourceSpec) -> ResourceSpec:
        if spec.name in self._specs:
            raise ValueError(f"resource {spec.name} registered twice")
        undeclared = [
            c.key for c in spec.table.c
            if any(mark in c.key for mark in SECRET_LOOKING) and c.key not in spec.secrets and not isinstance(c.type, Integer)
        ]
        if undeclared:
            raise TypeError(f"{spec.name}: column(s) {', '.join(undeclared)} look like secrets: declare them in `secrets` (or rename them)")
        if spec.private_fields and (spec.owner_field is None or spec.private_fields & (set(spec.orderable) | {c for c, _ in spec.search_fields})):
            raise TypeError(f"{spec.name}: private_fields need an owner_field and may be neither orderable nor searched")
        self._specs[spec.name] = spec
        return spec

    def __getitem__(self, name: str) -> ResourceSpec:
        return self._specs[name]

    def __iter__(self):
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def by_model(self, model: type) -> ResourceSpec:
        spec = self.models().get(model)
        if spec is None:
            raise KeyError(model)
        return spec

    def models(self) -> dict[type, ResourceSpec]:
        """Model -> its resource (rebuilt when one is added)."""
        if len(self._by_model) != len(self._specs):
            self._by_model = {spec.model: spec for spec in self._specs.values()}
        return self._by_model


REGISTRY = Registry()
