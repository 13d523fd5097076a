"""Proto field <-> row attribute conversion, one codec per field kind.

The resource declaration (engine/resource.py) picks a codec for every field of the message from the
field's descriptor and the model's column, so conversion is written once for every resource.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, Protocol, overload

import orjson
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from db.errors import InvalidArgument

_MIN_TS = dt.datetime(1, 1, 1, tzinfo=dt.UTC)
NANOS = Decimal(1_000_000_000)


@dataclass(frozen=True)
class SizeLimit:
    """How large one field's value may be; each measure that is set is checked."""

    chars: int | None = None  # characters of a string, or of each item of a repeated string
    json_bytes: int | None = None  # UTF-8 bytes of the value as compact JSON (a Struct, repeated messages)
    items: int | None = None  # items of a repeated field


# Related rows a message lists, unless its resource declares another number.
DEFAULT_RELATION_ITEMS = 1000
# The maximum size of each kind of field, unless its resource declares another for it
# (ResourceSpec.size_limits) or its column has a length (String(n): n characters, on SQLite
# too). ResourceSpec.codecs decides, once, which applies to each field; the codecs check it.
DEFAULT_LIMITS: dict[str, SizeLimit] = {
    "string": SizeLimit(chars=4096),  # a string field with no column of its own (a password)
    "text": SizeLimit(chars=65536),  # a TEXT column: content, description
    "json": SizeLimit(json_bytes=65536),  # a google.protobuf.Struct
    "strings": SizeLimit(items=100, chars=255),  # a repeated string (tags, permissions)
    "messages": SizeLimit(items=50, json_bytes=65536),  # a repeated message (attachments)
    "relation": SizeLimit(items=DEFAULT_RELATION_ITEMS),  # related rows a message lists (members, dependencies, roles)
}


class FieldCodec:
    """Moves one proto field between a message and a row."""

    name: str
    attr: str | None = None  # the model attribute it maps to, when there is exactly one
    writable = True
    # The DEFAULT_LIMITS kind that bounds the field, None when its type bounds it (ids, enums,
    # numbers, times); `limit` is set by the resource (ResourceSpec.codecs) and checked by load.
    size_kind: str | None = None
    limit: SizeLimit | None = None

    def present(self, msg: Message) -> bool:
        """Whether the client set the field (proto3: a non-default value, or presence)."""
        raise NotImplementedError

    def load(self, msg: Message) -> dict[str, Any]:
        """Row attribute values for the field's value in msg; raises InvalidArgument."""
        raise NotImplementedError

    def dump(self, row: Any, msg: Message) -> None:
        """Set the field on msg from row."""
        raise NotImplementedError


class ScalarCodec(FieldCodec):
    """string, bool, int and double fields stored in a column of the same kind."""

    def __init__(self, fd: FieldDescriptor, attr: str, nullable: bool, column_length: int | None) -> None:
        self.name = fd.name
        self.attr: str = attr
        self.nullable = nullable
        self.column_length = column_length  # String(n): the database holds at most n characters
        self.has_presence = fd.has_presence
        self.is_string = fd.type == FieldDescriptor.TYPE_STRING
        self.is_float = fd.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT)
        self.default = fd.default_value
        if self.is_string:
            self.size_kind = "string" if column_length is not None else "text"

    def present(self, msg: Message) -> bool:
        if self.has_presence:
            return msg.HasField(self.name)
        return getattr(msg, self.name) != self.default

    def load(self, msg: Message) -> dict[str, Any]:
        value = getattr(msg, self.name)
        if self.is_string:
            check_chars(value, self.limit, self.name)
            check_text(value, self.name)
            if value == "" and self.nullable:
                value = None
        elif self.is_float and not math.isfinite(value):
            raise InvalidArgument.field(self.name, f"must be a finite number (got {value})")
        return {self.attr: value}

    def dump(self, row: Any, msg: Message) -> None:
        value = getattr(row, self.attr)
        if value is not None:
            setattr(msg, self.name, value)


class UuidCodec(FieldCodec):
    """A string id field stored as a UUID column; the empty string is NULL."""

    def __init__(self, fd: FieldDescriptor, attr: str) -> None:
        self.name = fd.name
        self.attr: str = attr

    def present(self, msg: Message) -> bool:
        return getattr(msg, self.name) != ""

    def load(self, msg: Message) -> dict[str, Any]:
        return {self.attr: parse_uuid(getattr(msg, self.name), self.name, allow_empty=True)}

    def dump(self, row: Any, msg: Message) -> None:
        value = getattr(row, self.attr)
        if value is not None:
            setattr(msg, self.name, str(value))


class EnumCodec(FieldCodec):
    """An enum stored as its short lower-case name ("in_progress" for TASK_STATUS_IN_PROGRESS)."""

    def __init__(self, fd: FieldDescriptor, attr: str) -> None:
        self.name = fd.name
        self.attr: str = attr
        self.to_db, self.to_number = enum_maps(enum_of(fd))

    def present(self, msg: Message) -> bool:
        return getattr(msg, self.name) != 0

    def load(self, msg: Message) -> dict[str, Any]:
        number = getattr(msg, self.name)
        if number == 0:
            return {self.attr: None}
        if number not in self.to_db:
            raise InvalidArgument.field(self.name, f"unknown enum value {number}")
        return {self.attr: self.to_db[number]}

    def dump(self, row: Any, msg: Message) -> None:
        value = getattr(row, self.attr)
        if value is not None:
            setattr(msg, self.name, self.to_number[value])


class TimestampCodec(FieldCodec):
    def __init__(self, fd: FieldDescriptor, attr: str) -> None:
        self.name = fd.name
        self.attr: str = attr

    def present(self, msg: Message) -> bool:
        return msg.HasField(self.name)

    def load(self, msg: Message) -> dict[str, Any]:
        if not msg.HasField(self.name):
            return {self.attr: None}
        ts: timestamp_pb2.Timestamp = getattr(msg, self.name)
        try:
            value = ts.ToDatetime(tzinfo=dt.UTC)
        except (ValueError, OverflowError) as exc:
            raise InvalidArgument.field(self.name, f"not a valid timestamp: {exc}") from None
        if value <= _MIN_TS:
            raise InvalidArgument.field(self.name, "must be after year 1")
        return {self.attr: value}

    def dump(self, row: Any, msg: Message) -> None:
        value = getattr(row, self.attr)
        if value is not None:
            getattr(msg, self.name).FromDatetime(value)


class DateCodec(FieldCodec):
    """nexus.common.v1.Date <-> DATE."""

    def __init__(self, fd: FieldDescriptor, attr: str) -> None:
        self.name = fd.name
        self.attr: str = attr

    def present(self, msg: Message) -> bool:
        return msg.HasField(self.name)

    def load(self, msg: Message) -> dict[str, Any]:
        if not msg.HasField(self.name):
            return {self.attr: None}
        d = getattr(msg, self.name)
        try:
            return {self.attr: dt.date(d.year, d.month, d.day)}
        except ValueError as exc:
            raise InvalidArgument.field(self.name, f"not a valid date ({d.year}-{d.month}-{d.day}): {exc}") from None

    def dump(self, row: Any, msg: Message) -> None:
        value = getattr(row, self.attr)
        if value is not None:
            d = getattr(msg, self.name)
            d.year, d.month, d.day = value.year, value.month, value.day


class StructCodec(FieldCodec):
    """google.protobuf.Struct <-> JSON object column."""

    size_kind = "json"

    def __init__(self, fd: FieldDescriptor, attr: str) -> None:
        self.name = fd.name
        self.attr: str = attr

    def present(self, msg: Message) -> bool:
        return msg.HasField(self.name)

    def load(self, msg: Message) -> dict[str, Any]:
        if not msg.HasField(self.name):
            return {self.attr: None}
        value = struct_value(getattr(msg, self.name), self.name)
        check_json_text(value, self.name, self.limit)
        return {self.attr: value}

    def dump(self, row: Any, msg: Message) -> None:
        value = getattr(row, self.attr)
        if value is not None:
            target: struct_pb2.Struct = getattr(msg, self.name)
            target.update(value)


# How deep a Struct may nest (objects and lists in one another): every response that carries it
# (a search result wraps the resource once more) must stay within what protobuf decoders accept
# (100 message levels; each JSON level is three: Struct, its map entry, Value).
MAX_JSON_DEPTH = 20


def struct_value(struct: struct_pb2.Struct, field_path: str) -> dict[str, Any]:
    """The JSON object a Struct holds, as json_format.MessageToDict makes it (numbers as
    floats), in one walk that refuses (INVALID_ARGUMENT) what JSON cannot hold (a NaN or
    infinite number) and nesting deeper than MAX_JSON_DEPTH. (MessageToDict and a separate
    check took three times as long: a batch of thousands of chunks each carries one.)"""
    return _object_value(struct, 1, field_path)


def _object_value(struct: struct_pb2.Struct, depth: int, field_path: str) -> dict[str, Any]:
    if depth > MAX_JSON_DEPTH:
        raise InvalidArgument.field(field_path, f"nests deeper than {MAX_JSON_DEPTH} levels", reason="FIELD_TOO_LARGE")
    return {key: _json_value(value, depth, field_path) for key, value in struct.fields.items()}


def _json_value(value: struct_pb2.Value, depth: int, field_path: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise InvalidArgument.field(field_path, f"holds the number {number}, which JSON cannot hold")
        return number
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _object_value(value.struct_value, depth + 1, field_path)
    if kind == "list_value":
        if depth + 1 > MAX_JSON_DEPTH:
            raise InvalidArgument.field(field_path, f"nests deeper than {MAX_JSON_DEPTH} levels", reason="FIELD_TOO_LARGE")
        return [_json_value(item, depth + 1, field_path) for item in value.list_value.values]
    return None  # null_value, or no kind set: JSON null, as MessageToDict says


class StringListCodec(FieldCodec):
    """repeated string <-> JSON array column."""

    size_kind = "strings"

    def __init__(self, fd: FieldDescriptor, attr: str) -> None:
        self.name = fd.name
        self.attr: str = attr

    def present(self, msg: Message) -> bool:
        return len(getattr(msg, self.name)) > 0

    def load(self, msg: Message) -> dict[str, Any]:
        items = list(getattr(msg, self.name))
        check_items(items, self.limit, self.name)
        for i, item in enumerate(items):
            if not item:
                raise InvalidArgument.field(f"{self.name}[{i}]", "must not be empty")
            check_chars(item, self.limit, f"{self.name}[{i}]")
            check_text(item, f"{self.name}[{i}]")
        # Duplicates carry no meaning in a set of labels; keep the first of each, in order.
        return {self.attr: list(dict.fromkeys(items))}

    def dump(self, row: Any, msg: Message) -> None:
        value = getattr(row, self.attr)
        if value:
            getattr(msg, self.name).extend(value)


class MessageListCodec(FieldCodec):
    """repeated SomeMessage <-> JSON array of objects (attachments and the like)."""

    size_kind = "messages"

    def __init__(self, name: str, attr: str, message_type: type[Message]) -> None:
        self.name = name
        self.attr: str = attr
        self.message_type = message_type

    def present(self, msg: Message) -> bool:
        return len(getattr(msg, self.name)) > 0

    def load(self, msg: Message) -> dict[str, Any]:
        items = getattr(msg, self.name)
        check_items(items, self.limit, self.name)
        out = []
        size = len(items) + 1  # the brackets and commas of the JSON array
        for i, item in enumerate(items):
            value = json_format.MessageToDict(item, preserving_proto_field_name=True)
            size += json_size(value, f"{self.name}[{i}]")
            out.append(value)
        check_json_size(size, self.limit, self.name)
        return {self.attr: out}

    def dump(self, row: Any, msg: Message) -> None:
        target = getattr(msg, self.name)
        for value in getattr(row, self.attr) or ():
            json_format.ParseDict(value, target.add(), ignore_unknown_fields=True)


class Money(Protocol):
    """What the codecs read of a nexus.common.v1.Money (the engine imports no API message)."""

    currency_code: str
    units: int
    nanos: int


def currency_code(money: Money, field_name: str) -> str:
    """The Money's currency code: three upper-case ASCII letters (ISO 4217's shape; "ÄÖÜ" is
    alphabetic and upper-case too, so ASCII is checked), INVALID_ARGUMENT naming it otherwise."""
    code = money.currency_code
    if len(code) != 3 or not code.isascii() or not code.isalpha() or not code.isupper():
        raise InvalidArgument.field(f"{field_name}.currency_code", "must be a three-letter upper-case ISO 4217 code")
    return code


class MoneyCodec(FieldCodec):
    """nexus.common.v1.Money <-> NUMERIC amount column + currency column."""

    def __init__(self, name: str, amount_attr: str, currency_attr: str) -> None:
        self.name = name
        self.amount_attr = amount_attr
        self.currency_attr = currency_attr

    def present(self, msg: Message) -> bool:
        return msg.HasField(self.name)

    def load(self, msg: Message) -> dict[str, Any]:
        if not msg.HasField(self.name):
            return {self.amount_attr: None, self.currency_attr: None}
        money = getattr(msg, self.name)
        code = currency_code(money, self.name)
        if abs(money.nanos) >= 1_000_000_000:
            raise InvalidArgument.field(f"{self.name}.nanos", "must be between -999,999,999 and 999,999,999")
        if (money.units > 0 and money.nanos < 0) or (money.units < 0 and money.nanos > 0):
            raise InvalidArgument.field(f"{self.name}.nanos", "must have the same sign as units")
        amount = Decimal(money.units) + Decimal(money.nanos) / NANOS
        return {self.amount_attr: amount, self.currency_attr: code}

    def dump(self, row: Any, msg: Message) -> None:
        amount = getattr(row, self.amount_attr)
        if amount is None:
            return
        money = getattr(msg, self.name)
        amount = Decimal(amount)
        units = int(amount)
        money.currency_code = getattr(row, self.currency_attr) or ""
        money.units = units
        money.nanos = int((amount - units) * NANOS)


class MoneyPartsCodec(FieldCodec):
    """nexus.common.v1.Money <-> three columns: whole units and nanos (integers) and the currency.
    Integers sum exactly in SQL on both databases (SQLite's NUMERIC is a float): a sum of units
    and a sum of nanos make the exact total. Not negative; at most max_units per value, so that
    sums of many stay far within 64 bits."""

    def __init__(self, name: str, units_attr: str, nanos_attr: str, currency_attr: str, max_units: int = 10**12) -> None:
        self.name = name
        self.units_attr = units_attr
        self.nanos_attr = nanos_attr
        self.currency_attr = currency_attr
        self.max_units = max_units

    def present(self, msg: Message) -> bool:
        return msg.HasField(self.name)

    def load(self, msg: Message) -> dict[str, Any]:
        if not msg.HasField(self.name):
            return {self.units_attr: None, self.nanos_attr: None, self.currency_attr: None}
        money = getattr(msg, self.name)
        code = currency_code(money, self.name)
        if money.units < 0 or money.nanos < 0:
            raise InvalidArgument.field(f"{self.name}.units" if money.units < 0 else f"{self.name}.nanos", "must not be negative")
        if money.nanos >= 1_000_000_000:
            raise InvalidArgument.field(f"{self.name}.nanos", "must be between 0 and 999,999,999")
        if money.units > self.max_units:
            raise InvalidArgument.field(f"{self.name}.units", f"must be at most {self.max_units:,}")
        return {self.units_attr: money.units, self.nanos_attr: money.nanos, self.currency_attr: code}

    def dump(self, row: Any, msg: Message) -> None:
        units = getattr(row, self.units_attr)
        if units is None:
            return
        money = getattr(msg, self.name)
        money.currency_code = getattr(row, self.currency_attr) or ""
        money.units = units
        money.nanos = getattr(row, self.nanos_attr) or 0
        money.SetInParent()


class DurationCodec(FieldCodec):
    """google.protobuf.Duration <-> an integer column of nanoseconds (exact; orders and sums in
    SQL). Not negative; at most max_seconds."""

    def __init__(self, name: str, attr: str, max_seconds: int = 366 * 86400) -> None:
        self.name = name
        self.attr: str = attr
        self.max_seconds = max_seconds

    def present(self, msg: Message) -> bool:
        return msg.HasField(self.name)

    def load(self, msg: Message) -> dict[str, Any]:
        if not msg.HasField(self.name):
            return {self.attr: None}
        d = getattr(msg, self.name)
        if abs(d.nanos) >= 1_000_000_000 or (d.seconds > 0 and d.nanos < 0) or (d.seconds < 0 and d.nanos > 0):
            raise InvalidArgument.field(f"{self.name}.nanos", "must be between -999,999,999 and 999,999,999, of the sign of seconds")
        if d.seconds < 0 or d.nanos < 0:
            raise InvalidArgument.field(self.name, "must not be negative")
        if d.seconds > self.max_seconds or (d.seconds == self.max_seconds and d.nanos):
            raise InvalidArgument.field(f"{self.name}.seconds", f"must be at most {self.max_seconds} seconds")
        return {self.attr: d.seconds * 1_000_000_000 + d.nanos}

    def dump(self, row: Any, msg: Message) -> None:
        value = getattr(row, self.attr)
        if value is not None:
            set_duration(getattr(msg, self.name), value)


def set_duration(target: Any, nanos: int) -> None:
    """A Duration message set to `nanos` nanoseconds (not negative)."""
    target.seconds, target.nanos = divmod(int(nanos), 1_000_000_000)
    target.SetInParent()


class OutputCodec(FieldCodec):
    """An output-only field computed from the row (relationship ids, etag...)."""

    writable = False

    def __init__(self, name: str, compute: Callable[[Any], Any], repeated: bool = False) -> None:
        self.name = name
        self.compute = compute
        self.repeated = repeated

    def present(self, msg: Message) -> bool:
        return False

    def load(self, msg: Message) -> dict[str, Any]:
        return {}

    def dump(self, row: Any, msg: Message) -> None:
        value = self.compute(row)
        if self.repeated:
            getattr(msg, self.name).extend(value)
        elif value is not None:
            setattr(msg, self.name, value)


class InputCodec(FieldCodec):
    """A write-only field (a password): loaded through a transform, never dumped."""

    size_kind = "string"

    def __init__(self, name: str, transform: Callable[[str], dict[str, Any]]) -> None:
        self.name = name
        self.transform = transform

    def present(self, msg: Message) -> bool:
        return getattr(msg, self.name) != ""

    def load(self, msg: Message) -> dict[str, Any]:
        value = getattr(msg, self.name)
        if not value:
            return {}
        check_chars(value, self.limit, self.name)
        check_text(value, self.name)
        return self.transform(value)

    def dump(self, row: Any, msg: Message) -> None:
        return None


def check_text(value: str, field_path: str) -> None:
    """Text both databases can store: PostgreSQL refuses NUL characters."""
    if "\x00" in value:
        raise InvalidArgument.field(field_path, "must not contain NUL characters")


def check_json_text(value: Any, field_path: str, limit: SizeLimit | None = None) -> None:
    """check_text for every string inside a JSON value (PostgreSQL's JSONB refuses \\u0000 too),
    and the limit's json_bytes."""
    check_json_size(json_size(value, field_path), limit, field_path)


def json_size(value: Any, field_path: str) -> int:
    """The size of value as compact JSON, in UTF-8 bytes; INVALID_ARGUMENT if a string in it
    holds a NUL character."""
    try:
        raw = orjson.dumps(value)  # compact UTF-8, a tenth of json.dumps' time
    except TypeError:  # what orjson does not write (an integer past 64 bits, a lone surrogate)
        raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
    if b"\\u0000" in raw:
        raise InvalidArgument.field(field_path, "must not contain NUL characters")
    return len(raw)


def check_json_size(size: int, limit: SizeLimit | None, field_path: str) -> None:
    """The limit's json_bytes for a value of `size` bytes as JSON."""
    if limit is not None and limit.json_bytes is not None and size > limit.json_bytes:
        raise too_large(field_path, f"must be at most {limit.json_bytes} bytes as JSON (got {size})")


def check_chars(value: str, limit: SizeLimit | None, field_path: str) -> None:
    """The limit's chars for one string."""
    if limit is not None and limit.chars is not None and len(value) > limit.chars:
        raise too_large(field_path, f"must be at most {limit.chars} characters (got {len(value)})")


def check_items(items: Any, limit: SizeLimit | None, field_path: str) -> None:
    """The limit's items for a repeated field."""
    if limit is not None and limit.items is not None and len(items) > limit.items:
        raise too_large(field_path, f"must have at most {limit.items} items (got {len(items)})")


def too_large(field_path: str, description: str) -> InvalidArgument:
    return InvalidArgument.field(field_path, description, reason="FIELD_TOO_LARGE")


@overload
def parse_uuid(value: str, field_path: str, allow_empty: Literal[False] = False) -> uuid.UUID: ...
@overload
def parse_uuid(value: str, field_path: str, allow_empty: bool) -> uuid.UUID | None: ...
def parse_uuid(value: str, field_path: str, allow_empty: bool = False) -> uuid.UUID | None:
    """Parse a client-supplied id; INVALID_ARGUMENT naming the field when it is not a UUID."""
    if value == "":
        if allow_empty:
            return None
        raise InvalidArgument.field(field_path, "is required", reason="REQUIRED_FIELD")
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument.field(field_path, f"{value[:80]!r} is not a valid id (a UUID)") from None


def enum_of(fd: FieldDescriptor) -> EnumDescriptor:
    """The enum type of an enum field (TypeError for a field of another type)."""
    if fd.enum_type is None:
        raise TypeError(f"{fd.full_name} is not an enum field")
    return fd.enum_type


def enum_maps(enum: EnumDescriptor) -> tuple[dict[int, str], dict[str, int]]:
    """number -> stored short name, and back, for an AIP enum (PREFIX_UNSPECIFIED = 0)."""
    prefix = enum.values_by_number[0].name[: -len("UNSPECIFIED")]
    to_db = {v.number: v.name[len(prefix):].lower() for v in enum.values if v.number != 0}
    return to_db, {name: number for number, name in to_db.items()}


def enum_filter_names(enum: EnumDescriptor) -> dict[str, str]:
    """Names a filter may use for each stored value: full (TASK_STATUS_DONE) and short (DONE)."""
    prefix = enum.values_by_number[0].name[: -len("UNSPECIFIED")]
    names: dict[str, str] = {}
    for v in enum.values:
        if v.number == 0:
            continue
        short = v.name[len(prefix):]
        names[v.name] = short.lower()
        names[short] = short.lower()
    return names
