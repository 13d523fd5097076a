"""Page sizes, order_by parsing, opaque page tokens and keyset conditions."""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, false, or_, tuple_
from sqlalchemy.sql.elements import BindParameter, ColumnElement

from db.errors import InvalidArgument, ResourceExhausted

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# A List or Search response stays within this many bytes unless the server says otherwise
# (NEXUS_MAX_PAGE_BYTES): 4 MiB, the receive limit gRPC clients have by default.
DEFAULT_PAGE_BYTES = 4 * 1024 * 1024
# What a response holds besides its items: next_page_token, total_size.
_RESPONSE_OVERHEAD = 1024
# Rows the first statement of a List page reads; a larger page reads the rest with further
# statements, as many rows as its response has room for: a page of 1,000 large rows cut at
# 4 MiB reads a few MiB from the database, not 1,000 rows of them.
FIRST_READ = 100
# A search result wraps its resource: the resource's tag and length (at most 6 bytes below
# 4 GiB) and the double score (9).
SEARCH_RESULT_EXTRA = 6 + 9
_ORDER_TERM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)(?:\s+(asc|desc))?\s*$", re.IGNORECASE)


def page_size(requested: int, field_path: str = "page_size") -> int:
    """AIP-158: 0 means the default; negative is invalid; above the maximum is coerced down."""
    if requested < 0:
        raise InvalidArgument.field(field_path, f"must not be negative (got {requested})", reason="INVALID_PAGE_SIZE")
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def embedded_size(size: int) -> int:
    """Bytes a message of `size` bytes takes as a field of another (field numbers below 16):
    its tag, its length as a varint, itself."""
    return 1 + (size.bit_length() + 6) // 7 + size if size else 2


class PageBudget:
    """The bytes a response may still take, as its items are added a chunk at a time."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = _RESPONSE_OVERHEAD
        self.items = 0

    def take(self, messages: list[Any], extra: int = 0, whole: bool = False) -> int:
        """How many of messages, in order, still fit; each item takes a message's embedded
        size plus `extra` (a search result's wrapper and score). RESOURCE_EXHAUSTED when the
        response's first item alone does not fit: field limits keep any row far below the
        smallest sane limit, so it means the server's limit is set below them; with whole=True
        (a BatchGet, all or nothing) also when any does not."""
        for i, message in enumerate(messages):
            size = embedded_size(message.ByteSize() + extra)
            if self.used + size > self.max_bytes:
                if whole:
                    raise ResourceExhausted(
                        f"the {len(messages)} resources asked for take more than the response limit ({self.max_bytes} bytes); ask for fewer",
                        reason="RESPONSE_TOO_LARGE",
                        metadata={"field": "ids", "max_bytes": str(self.max_bytes)},
                    )
                if self.items == 0:
                    raise ResourceExhausted(
                        f"the resource {message.id} alone is larger than the response limit ({self.max_bytes} bytes)",
                        reason="RESPONSE_TOO_LARGE",
                        metadata={"resource_id": message.id, "max_bytes": str(self.max_bytes)},
                    )
                return i
            self.used += size
            self.items += 1
        return len(messages)

    def rows_left(self) -> int:
        """About how many more items of the average size so far fit (at least 1)."""
        if not self.items:
            return MAX_PAGE_SIZE
        average = (self.used - _RESPONSE_OVERHEAD) / self.items
        return max(1, int((self.max_bytes - self.used) / average) + 1)


def refuse_unread_answer(size: int, max_bytes: int, what: str) -> None:
    """RESOURCE_EXHAUSTED (RESPONSE_TOO_LARGE) before a write commits when its answer, `size`
    bytes, would pass max_bytes: a client that cannot read the answer would take a committed
    write for a refused one. what: the write in words ("1000 creates"), and what to do."""
    if size > max_bytes:
        raise ResourceExhausted(
            f"the answer to {what} would take more than the response limit ({max_bytes} bytes): nothing was written",
            reason="RESPONSE_TOO_LARGE",
            metadata={"field": "requests", "max_bytes": str(max_bytes)},
        )


def fitting(messages: list[Any], max_bytes: int, extra: int = 0, whole: bool = False) -> int:
    """PageBudget(max_bytes).take(messages, extra, whole): how many of messages one response holds."""
    return PageBudget(max_bytes).take(messages, extra, whole)


def read_page(
    size: int, max_bytes: int, fetch: Callable[[int, bool, Any, int], tuple[list[Any], int | None]],
    to_message: Callable[[Any], Any], extra: int = 0,
) -> tuple[list[Any], list[Any], bool, int]:
    """A page of at most `size` rows whose response stays within max_bytes, read in as few
    statements as that allows: the first reads min(size, FIRST_READ) rows, each later one about
    as many as the response still has room for. fetch(n, counted, last row taken or None, rows
    taken) answers up to n + 1 rows in order after those taken, and total_size when counted
    (the first); to_message makes a row's message. Returns (rows, their messages, whether more
    rows follow the last, total_size)."""
    budget = PageBudget(max_bytes)
    rows_taken: list[Any] = []
    messages: list[Any] = []
    total: int | None = None
    read = min(size, FIRST_READ)
    while True:
        rows, counted = fetch(read, total is None, rows_taken[-1] if rows_taken else None, len(rows_taken))
        if total is None:
            total = counted
        take = rows[:min(read, size - len(messages))]
        chunk = [to_message(row) for row in take]
        kept = budget.take(chunk, extra)
        messages.extend(chunk[:kept])
        rows_taken.extend(take[:kept])
        if kept < len(chunk) or (len(rows) > len(chunk) and len(messages) >= size):
            return rows_taken, messages, True, int(total or 0)
        if len(rows) <= len(chunk):
            return rows_taken, messages, False, int(total or 0)
        read = next_read(size - len(messages), budget.rows_left())


def next_read(need: int, room: int) -> int:
    """Rows the next statement of a page reads: what the page still needs, no more than about
    fits, as a power of two (few statement shapes to build and cache)."""
    n = max(1, min(need, room))
    return min(1 << (n - 1).bit_length(), MAX_PAGE_SIZE)


@dataclass(frozen=True)
class OrderKey:
    field: str
    column: Any
    descending: bool


def parse_order_by(text: str, columns: dict[str, Any], default: tuple[tuple[str, bool], ...]) -> list[OrderKey]:
    """"a desc, b" -> keys, always ending with the id tiebreaker so the order is total."""
    keys: list[OrderKey] = []
    if text.strip():
        seen: set[str] = set()
        for term in text.split(","):
            match = _ORDER_TERM.match(term)
            if not match:
                raise InvalidArgument.field("order_by", f"cannot parse {term.strip()!r}; use 'field [asc|desc], ...'", reason="INVALID_ORDER_BY")
            name, direction = match.group(1), (match.group(2) or "asc").lower()
            if name not in columns:
                allowed = ", ".join(sorted(columns))
                raise InvalidArgument.field("order_by", f"cannot order by {name!r}; orderable fields: {allowed}", reason="INVALID_ORDER_BY")
            if name in seen:
                raise InvalidArgument.field("order_by", f"{name!r} appears twice", reason="INVALID_ORDER_BY")
            seen.add(name)
            keys.append(OrderKey(name, columns[name], direction == "desc"))
    else:
        keys = [OrderKey(name, columns[name], desc) for name, desc in default]
    if not any(k.field == "id" for k in keys):
        keys.append(OrderKey("id", columns["id"], keys[-1].descending if keys else False))
    return keys


def _nullable(column: Any) -> bool:
    return bool(getattr(column, "nullable", True)) and not getattr(column, "primary_key", False)


def order_clauses(keys: list[OrderKey]) -> list[Any]:
    # NULLs sort last ascending and first descending on both engines, matching keyset_after. A
    # NOT NULL column gets a plain ASC / DESC, which an index on it can serve (on SQLite an
    # explicit NULLS LAST differs from the index order and forces a sort).
    out = []
    for k in keys:
        if not _nullable(k.column):
            out.append(k.column.desc() if k.descending else k.column.asc())
        else:
            out.append(k.column.desc().nulls_first() if k.descending else k.column.asc().nulls_last())
    return out


def keyset_after(keys: list[OrderKey], values: list[Any]) -> ColumnElement[bool]:
    """Rows strictly after the row whose order-key values are `values`, NULL-aware.

    When every key is NOT NULL and all go one way, a row-value comparison
    `(create_time, id) > (:t, :id)`, which both engines answer from an index range.
    """
    if len({k.descending for k in keys}) == 1 and all(not _nullable(k.column) and v is not None for k, v in zip(keys, values, strict=True)):
        columns = tuple_(*(k.column for k in keys))
        bound = tuple_(*(v if isinstance(v, BindParameter) else bindparam(None, v, type_=k.column.type) for k, v in zip(keys, values, strict=True)))
        return columns < bound if keys[0].descending else columns > bound
    clauses = []
    for i, key in enumerate(keys):
        prefix = [_equal(keys[j].column, values[j]) for j in range(i)]
        clauses.append(and_(*prefix, _after(key, values[i])))
    return or_(*clauses)


def _equal(column: Any, value: Any) -> ColumnElement[bool]:
    return column.is_(None) if value is None else column == value


def _after(key: OrderKey, value: Any) -> ColumnElement[bool]:
    col = key.column
    if key.descending:  # NULLS FIRST, then values descending
        return col.is_not(None) if value is None else col < value
    if value is None:  # NULLS LAST: nothing after a NULL but other NULLs, ordered by later keys
        return false()
    return or_(col > value, col.is_(None)) if _nullable(col) else col > value


def _encode_value(value: Any) -> list[Any]:
    if value is None:
        return ["n"]
    if isinstance(value, bool):
        return ["b", value]
    if isinstance(value, dt.datetime):
        return ["t", value.isoformat()]
    if isinstance(value, dt.date):
        return ["d", value.isoformat()]
    if isinstance(value, uuid.UUID):
        return ["u", str(value)]
    if isinstance(value, (int, float, str)):
        return ["v", value]
    return ["s", str(value)]


def _decode_value(item: list[Any]) -> Any:
    tag = item[0]
    if tag == "n":
        return None
    raw = item[1]
    if tag == "t":
        return dt.datetime.fromisoformat(raw)
    if tag == "d":
        return dt.date.fromisoformat(raw)
    if tag == "u":
        return uuid.UUID(raw)
    if tag in ("b", "v", "s"):
        return raw
    raise ValueError(tag)


def fingerprint(*parts: Any) -> str:
    """Ties a token to the query it was made for, so it cannot be replayed against another."""
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def encode_token(query_fingerprint: str, *, after: list[Any] | None = None, offset: int | None = None, served: int | None = None) -> str:
    """served: the rows the pages before the next one returned (a keyset token's; an offset
    token's is its offset), so that an estimated total_size is never below them."""
    payload: dict[str, Any] = {"q": query_fingerprint}
    if after is not None:
        payload["k"] = [_encode_value(v) for v in after]
    if served:
        payload["n"] = served
    if offset is not None:
        payload["o"] = offset
    raw = json.dumps(payload, separators=(",", ":")).encode()
    check = hashlib.sha256(raw).digest()[:6]
    return base64.urlsafe_b64encode(check + raw).decode().rstrip("=")


def decode_token(token: str, query_fingerprint: str, key_count: int | None = None) -> dict[str, Any]:
    """The payload of a page token; INVALID_ARGUMENT if it is corrupt or for another query."""
    bad = InvalidArgument.field("page_token", "is not a page token this query issued", reason="INVALID_PAGE_TOKEN")
    try:
        blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        check, raw = blob[:6], blob[6:]
        if hashlib.sha256(raw).digest()[:6] != check:
            raise bad
        payload = json.loads(raw)
        if payload.get("q") != query_fingerprint:
            raise InvalidArgument.field(
                "page_token",
                "was issued for a different filter, order_by or show_deleted; keep them unchanged between pages",
                reason="INVALID_PAGE_TOKEN",
            )
        if "k" in payload:
            payload["k"] = [_decode_value(v) for v in payload["k"]]
            if key_count is not None and len(payload["k"]) != key_count:
                raise bad
        if "o" in payload and (not isinstance(payload["o"], int) or payload["o"] < 0):
            raise bad
        return payload
    except InvalidArgument:
        raise
    except Exception:  # noqa: BLE001 - any decoding failure is the same client error
        raise bad from None
