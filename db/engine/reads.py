"""The standard reads (AIP-131, 132, 158, 231, and Search): Get, BatchGet, List, Search, and
the row lookups writes share (fetch, visible_id).

Each function runs on a unit of work (a Session, or CoreReads on a bare read connection, see
db/unit.py) and returns protos; the caller's row rule (engine/rules.py) is part of every query.
"""
from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Sequence
from typing import Any

from google.protobuf.message import Message
from sqlalchemy import Uuid, select
from sqlalchemy.orm import Session

from db import errors
from db.engine import reading, statements
from db.engine.call import Call
from db.engine.codecs import parse_uuid
from db.engine.paging import DEFAULT_PAGE_BYTES, FIRST_READ, SEARCH_RESULT_EXTRA, decode_token, encode_token, fingerprint, fitting, page_size, read_page
from db.engine.resource import M, ResourceSpec
from db.engine.rules import denied, found, predicate, read_rule
from db.engine.search import search_query_value
from db.unit import one_snapshot

# Ids one BatchGet takes at most (a BatchCreate's creates: ResourceSpec.batch_create_limit).
MAX_BATCH = 1000
# A List's or Search's total_size is exact up to this many matches, an estimate above it
# (NEXUS_EXACT_COUNT_LIMIT; total_of says which estimate).
DEFAULT_COUNT_LIMIT = 10_000
# total_size is an int32.
MAX_TOTAL_SIZE = 2**31 - 1


def fetch(
    session: Session, spec: ResourceSpec, raw_id: str, *, show_deleted: bool = False, field_path: str = "id", lock: bool = False,
    deleting: bool = False,
) -> Any:
    """The row with that id, or NOT_FOUND with ResourceInfo (soft-deleted rows count as absent).

    lock=True means the caller is about to change the row: it takes the row lock (PostgreSQL) and
    applies the caller's manage rule instead of its read rule. A caller whose rule hides the row —
    or who asks for an id that does not exist — gets PERMISSION_DENIED, not NOT_FOUND (AIP-193:
    permission is checked before existence, so hidden ids do not leak). deleting=True (with
    lock) applies the caller's delete rule instead: the row is about to be deleted or undeleted.
    """
    row_id = parse_uuid(raw_id, field_path)
    stmt = select(spec.model).where(spec.table.c.id == row_id)
    allowed = predicate(spec, write=True, deleting=deleting) if lock else read_rule(spec, show_deleted)
    if allowed is not None:
        stmt = stmt.where(allowed)
    if spec.load_options:
        stmt = stmt.options(*spec.load_options)
    if lock and session.bind is not None and session.bind.dialect.name == "postgresql":
        stmt = stmt.with_for_update(of=spec.table)
    return found(spec, session.scalars(stmt).one_or_none(), raw_id, allowed, show_deleted=show_deleted, write=lock, field_path=field_path)


def visible_id(session: Session, spec: ResourceSpec, raw_id: str, field_path: str = "id") -> uuid.UUID:
    """The id of a row the caller may see, without loading the row: fetch's checks, one small query."""
    row_id = parse_uuid(raw_id, field_path)
    stmt = select(spec.table.c.id).where(spec.table.c.id == row_id)
    if spec.soft_delete:
        stmt = stmt.where(spec.table.c.delete_time.is_(None))
    allowed = predicate(spec, write=False)
    if allowed is not None:
        stmt = stmt.where(allowed)
    if session.scalar(stmt) is None:
        if allowed is not None:
            raise denied(spec, raw_id, False)
        raise errors.NotFound.resource(spec.name, raw_id, field_path)
    return row_id


def read_mask_paths(spec: ResourceSpec, paths: Sequence[str]) -> list[str] | None:
    """Validated read_mask paths, None for the whole resource."""
    if not paths or list(paths) == ["*"]:
        return None
    unknown = [p for p in paths if p not in spec.codecs]
    if unknown:
        raise errors.InvalidArgument.field("read_mask", f"unknown field(s) {', '.join(unknown)} of {spec.name}", reason="INVALID_FIELD_MASK")
    return list(dict.fromkeys(paths))


def get(session: Session, spec: ResourceSpec[M], request: Any) -> M:
    mask = read_mask_paths(spec, request.read_mask.paths)
    show_deleted = bool(getattr(request, "show_deleted", False))
    raw_id = request.id
    row_id = parse_uuid(raw_id, "id")
    allowed = read_rule(spec, show_deleted)
    if allowed is None:
        row = reading.load_by_id(session, spec, row_id)
    else:
        row = reading.load_one(session, spec, spec.table.c.id == row_id, allowed)
    return spec.to_proto(found(spec, row, raw_id, allowed, show_deleted=show_deleted, write=False, field_path="id"), mask)


def batch_get(session: Session, spec: ResourceSpec[M], request: Any, max_bytes: int = DEFAULT_PAGE_BYTES) -> list[M]:
    ids = list(request.ids)
    if not ids:
        raise errors.InvalidArgument.field("ids", "must name at least one id", reason="REQUIRED_FIELD")
    if len(ids) > MAX_BATCH:
        raise errors.InvalidArgument.field("ids", f"at most {MAX_BATCH} ids per call", reason="BATCH_TOO_LARGE")
    mask = read_mask_paths(spec, request.read_mask.paths)
    parsed = [parse_uuid(raw, f"ids[{i}]") for i, raw in enumerate(ids)]
    stmt = reading.select_rows(spec, reading.dialect_of(session)).where(spec.table.c.id.in_(set(parsed)))
    allowed = predicate(spec, write=False)
    if allowed is not None:
        stmt = stmt.where(allowed)
    rows = {row.id: row for row in reading.load_rows(session, spec, stmt)}  # ids as text
    out = []
    for i, row_id in enumerate(parsed):
        row = rows.get(str(row_id))
        if row is None and allowed is not None:
            raise denied(spec, ids[i], False)
        if row is None or (spec.soft_delete and row.delete_time is not None):
            raise errors.NotFound.resource(spec.name, ids[i], f"ids[{i}]")
        out.append(spec.to_proto(row, mask))
    fitting(out, max_bytes, whole=True)
    return out


def list_page(
    session: Session, spec: ResourceSpec, request: Any, call: Call, max_bytes: int = DEFAULT_PAGE_BYTES,
    count_limit: int = DEFAULT_COUNT_LIMIT,
) -> tuple[list[Message], str, int]:
    """One keyset page: (resources, next_page_token, total_size). The page ends early, with a
    token after its last row, where more rows would take the response past max_bytes.
    total_size is exact up to count_limit matches, an estimate above (total_of). With
    count_only: ([], "", total_size), one exact COUNT under the List's own filter and row rule."""
    size = page_size(request.page_size)
    show_deleted = bool(getattr(request, "show_deleted", False))
    keys = statements.order_keys(spec, request.order_by)
    if getattr(request, "count_only", False):
        return [], "", count_rows(session, spec, request, call, show_deleted)
    query_fp = fingerprint(spec.name, request.filter, [(k.field, k.descending) for k in keys], show_deleted)
    after: list[Any] | None = None
    served = 0
    if request.page_token:
        payload = decode_token(request.page_token, query_fp, len(keys))
        if "k" not in payload:
            raise errors.InvalidArgument.field("page_token", "is not a page token of this method", reason="INVALID_PAGE_TOKEN")
        after = payload["k"]
        served = payload.get("n", 0)
        if not isinstance(served, int) or isinstance(served, bool) or not 0 <= served <= MAX_TOTAL_SIZE:
            raise errors.InvalidArgument.field("page_token", "is not a page token this query issued", reason="INVALID_PAGE_TOKEN")
    allowed = read_rule(spec, show_deleted)
    columns = [spec.table.c[k.field] for k in keys]
    shape, filter_params = spec.filter_compiler(call.dialect).bind(request.filter)

    def fetch(read: int, counted: bool, last: Any, taken: int) -> tuple[list[Any], int | None]:
        start = after if last is None else [_key_value(last, column) for column in columns]
        nulls = None if start is None else tuple(v is None for v in start)
        if allowed is None:
            stmt, count = statements.page_statements(spec, call.dialect, shape, show_deleted, request.order_by, nulls, read, counted)
        else:  # the caller's row rule holds its own values: built for this call
            stmt, count = statements.build_page_statements(spec, call.dialect, shape, show_deleted, request.order_by, nulls, read, allowed, counted)
        params = {**filter_params, **{f"after_{i}": value for i, value in enumerate(start or ()) if value is not None}}
        if counted:
            params["count_limit"] = count_limit + 1
        found = reading.load_rows(session, spec, stmt, extra=int(counted), params=params)
        if not counted:
            return found, None
        limited = found[0][1] if found else session.connection().execute(count.limited, params).scalar()
        return [row for row, _ in found], total_of(session, call.dialect, count, params, limited, count_limit, allowed is not None)

    with one_snapshot(session) if size > FIRST_READ else contextlib.nullcontext():
        rows, messages, more, total = read_page(size, max_bytes, fetch, spec.to_proto)
    shown = served + len(rows)
    next_token = encode_token(query_fp, after=[_key_value(rows[-1], column) for column in columns], served=shown) if more else ""
    return messages, next_token, at_least_shown(total, count_limit, shown, more)


def at_least_shown(total: int, count_limit: int, shown: int, more: bool) -> int:
    """An estimated total_size (above count_limit) is never below the rows the pages up to this
    one returned, and one more when there is a next page: a planner's estimate can be far below
    the matches (SQLite's limit + 1 always is, past the limit)."""
    if total <= count_limit:
        return total
    return min(max(total, shown + int(more)), MAX_TOTAL_SIZE)


def count_rows(session: Session, spec: ResourceSpec, request: Any, call: Call, show_deleted: bool) -> int:
    """The total_size of a List without its page (count_only): the COUNT statement a page's
    total_size comes from, so the same filter, soft-delete and row rule apply. A page_token is
    INVALID_ARGUMENT: a count has no pages."""
    if request.page_token:
        raise errors.InvalidArgument.field(
            "page_token", "must be empty with count_only: a count covers every page", reason="INVALID_PAGE_TOKEN"
        )
    allowed = read_rule(spec, show_deleted)
    shape, filter_params = spec.filter_compiler(call.dialect).bind(request.filter)
    if allowed is None:
        _, count = statements.page_statements(spec, call.dialect, shape, show_deleted, request.order_by, None, 1, False)
    else:  # the caller's row rule holds its own values: built for this call
        _, count = statements.build_page_statements(spec, call.dialect, shape, show_deleted, request.order_by, None, 1, allowed, False)
    return int(session.connection().execute(count.exact, filter_params).scalar() or 0)


def total_of(session: Session, dialect: str, count: statements.Count, params: dict[str, Any], limited: Any, limit: int, restricted: bool) -> int:
    """total_size from the limited count (at most limit + 1): exact up to limit matches; above,
    an estimate never below limit + 1. PostgreSQL: its planner's row estimate of the matches
    (EXPLAIN of count.estimate: the statistics ANALYZE keeps, no row read), for callers with no
    row rule. A caller with one (restricted) gets limit + 1: the planner's estimate of its rule
    grows with the rows it may not see (1,500 private channels took a member's estimate from 15
    to 765), which would tell it how many there are. SQLite has no estimator: limit + 1, a lower
    bound ("more than limit"). count_only counts exactly."""
    if int(limited or 0) <= limit:
        return int(limited or 0)
    if dialect != "postgresql" or restricted:
        return limit + 1
    plan: Any = session.connection().execute(count.estimate, params).scalar()
    if isinstance(plan, str):
        plan = json.loads(plan)
    return max(limit + 1, min(int(plan[0]["Plan"]["Plan Rows"]), MAX_TOTAL_SIZE))


def _key_value(row: Any, column: Any) -> Any:
    """row's value of an order key, as the column binds it (the read path has ids as text)."""
    value = getattr(row, column.key)
    return uuid.UUID(value) if isinstance(value, str) and isinstance(column.type, Uuid) else value


def search(
    session: Session, spec: ResourceSpec, request: Any, call: Call, max_bytes: int = DEFAULT_PAGE_BYTES,
    count_limit: int = DEFAULT_COUNT_LIMIT,
) -> tuple[list[tuple[Message, float]], str, int]:
    """Ranked full-text hits: ([(resource, score)], next_page_token, total_size); cut short
    within max_bytes as a List page is. The hits are the ranked window of the matches
    (statements.build_search_statements); total_size is exact up to the window's size (or
    count_limit, if lower) and an estimate above it (total_of): counting the matches beyond the
    window would cost more than ranking the window does."""
    size = page_size(request.page_size)
    query = search_query_value(call.dialect, request.query)
    query_fp = fingerprint(spec.name, "search", request.query, request.filter)
    offset = 0
    if request.page_token:
        payload = decode_token(request.page_token, query_fp)
        if "o" not in payload:
            raise errors.InvalidArgument.field("page_token", "is not a page token of this method", reason="INVALID_PAGE_TOKEN")
        offset = payload["o"]
    allowed = predicate(spec, write=False)
    count_limit = min(count_limit, statements.SEARCH_WINDOW)
    shape, filter_params = spec.filter_compiler(call.dialect).bind(request.filter)

    def fetch(read: int, counted: bool, last: Any, taken: int) -> tuple[list[Any], int | None]:
        if allowed is None:
            stmt, count = statements.search_statements(spec, call.dialect, shape, read)
        else:  # the caller's row rule holds its own values: built for this call
            stmt, count = statements.build_search_statements(spec, call.dialect, shape, read, allowed)
        params = {**filter_params, "search_query": query, "search_offset": offset + taken, "count_limit": count_limit + 1}
        found = reading.load_rows(session, spec, stmt, extra=2, params=params)
        if not counted:
            return found, None
        # The window's count (at most SEARCH_WINDOW + 1) stops at count_limit + 1 as a List's does.
        limited = min(found[0][2], count_limit + 1) if found else session.connection().execute(count.limited, params).scalar()
        return found, total_of(session, call.dialect, count, params, limited, count_limit, allowed is not None)

    with one_snapshot(session) if size > FIRST_READ else contextlib.nullcontext():
        hits, messages, more, total = read_page(size, max_bytes, fetch, lambda hit: spec.to_proto(hit[0]), SEARCH_RESULT_EXTRA)
    total = at_least_shown(total, count_limit, offset + len(hits), more)
    next_token = encode_token(query_fp, offset=offset + len(hits)) if more else ""
    return [(message, float(score)) for message, (_, score, _) in zip(messages, hits, strict=True)], next_token, total
