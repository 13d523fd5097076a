"""The standard methods (AIP-131..135, 154, 155, 158, 160, 164), written once for every resource.

Each function runs inside a unit of work (a Session in a transaction; the standard reads a
CoreReads on a bare read connection, see db/database.py) and returns protos; the service layer
only translates requests and awaits these through Database.run.
"""
from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterable, Sequence
from contextvars import ContextVar
from typing import Any

from google.protobuf import empty_pb2
from google.protobuf.message import Message
from sqlalchemy import Uuid, and_, bindparam, exists, func, insert, inspect, or_, select
from sqlalchemy import update as sa_update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db import bulk, errors, events, policy, reading
from db.base import UTCDateTime, utcnow, uuid4, uuid7
from db.codecs import parse_uuid
from db.prepared import prepared
from db.models import RequestRecord
from db.paging import (
    DEFAULT_PAGE_BYTES,
    SEARCH_RESULT_EXTRA,
    OrderKey,
    decode_token,
    encode_token,
    fingerprint,
    fitting,
    keyset_after,
    order_clauses,
    page_size,
    parse_order_by,
    read_page,
)
from db.resource import REGISTRY, ResourceSpec, etag_of
from db.search import search_query_value, search_terms

MAX_BATCH = 1000
MAX_REQUEST_ID = 128


class Call:
    """What the service knows about the RPC a unit of work serves: who calls, and which RPC.

    request_id None: one is made when first read (an audit entry, an error's details, a log
    line); most reads that succeed never need it, and making one costs the event loop more than
    the rest of the call's checks. "" means none (work outside an RPC)."""

    __slots__ = ("_request_id", "method", "dialect", "actor_type", "actor_id", "role", "actor_user_id")

    def __init__(
        self,
        request_id: str | None = "",
        method: str = "",
        dialect: str = "sqlite",
        actor_type: str = "system",  # "user" (JWT), "api_key", or "system" (the service itself, --insecure-dev)
        actor_id: uuid.UUID | None = None,
        role: str = "admin",
        actor_user_id: uuid.UUID | None = None,  # the user the caller acts for, if any
    ) -> None:
        self._request_id = request_id
        self.method = method
        self.dialect = dialect
        self.actor_type = actor_type
        self.actor_id = actor_id
        self.role = role
        self.actor_user_id = actor_user_id

    @property
    def request_id(self) -> str:
        request_id = self._request_id
        if request_id is None:
            request_id = self._request_id = str(uuid4())
        return request_id

    def __repr__(self) -> str:
        return f"Call(method={self.method!r}, actor={self.actor_type}:{self.actor_id}, role={self.role!r})"


# Set per RPC by the authentication interceptor; database threads see it (Database.run copies it).
CURRENT_CALL: ContextVar[Call] = ContextVar("nexus_call")


# ---------------------------------------------------------------- reading


def current_call() -> Call | None:
    return CURRENT_CALL.get(None)


def _predicate(spec: ResourceSpec, write: bool) -> Any:
    """The caller's row filter for spec (None: every row), from db/policy.py."""
    call = current_call()
    if call is None:
        return None
    if write:
        return policy.manage_predicate(spec.name, call.role, call.actor_user_id)
    return policy.read_predicate(spec.name, call.role, call.actor_user_id)


def _read_rule(spec: ResourceSpec, show_deleted: bool) -> Any:
    """The caller's read rule, and for a read that shows soft-deleted rows, those only where the
    caller manages the row (its author or owner, the resource's managers; admins: all)."""
    allowed = _predicate(spec, write=False)
    call = current_call()
    if not (show_deleted and spec.soft_delete and call is not None and call.role != "admin"):
        return allowed
    live_or_managed = or_(spec.table.c.delete_time.is_(None), _predicate(spec, write=True))
    return live_or_managed if allowed is None else and_(allowed, live_or_managed)


def denied(spec: ResourceSpec, raw_id: str, write: bool) -> errors.PermissionDenied:
    verb = "change" if write else "see"
    return errors.PermissionDenied(
        f"the caller may not {verb} {spec.name} {raw_id!r}",
        reason="ROW_ACCESS_DENIED",
        metadata={"resource_type": spec.name, "resource_id": raw_id},
    )


def fetch(
    session: Session, spec: ResourceSpec, raw_id: str, *, show_deleted: bool = False, field_path: str = "id", lock: bool = False,
) -> Any:
    """The row with that id, or NOT_FOUND with ResourceInfo (soft-deleted rows count as absent).

    lock=True means the caller is about to change the row: it takes the row lock (PostgreSQL) and
    applies the caller's manage rule instead of its read rule. A caller whose rule hides the row —
    or who asks for an id that does not exist — gets PERMISSION_DENIED, not NOT_FOUND (AIP-193:
    permission is checked before existence, so hidden ids do not leak).
    """
    row_id = parse_uuid(raw_id, field_path)
    stmt = select(spec.model).where(spec.table.c.id == row_id)
    allowed = _predicate(spec, write=True) if lock else _read_rule(spec, show_deleted)
    if allowed is not None:
        stmt = stmt.where(allowed)
    if spec.load_options:
        stmt = stmt.options(*spec.load_options)
    if lock and session.bind is not None and session.bind.dialect.name == "postgresql":
        stmt = stmt.with_for_update(of=spec.table)
    return found(spec, session.scalars(stmt).one_or_none(), raw_id, allowed, show_deleted=show_deleted, write=lock, field_path=field_path)


def found(spec: ResourceSpec, row: Any, raw_id: str, allowed: Any, *, show_deleted: bool, write: bool, field_path: str) -> Any:
    """row, if the lookup found it: else PERMISSION_DENIED when a row rule applies (hidden ids do
    not leak), NOT_FOUND otherwise; a soft-deleted row counts as absent unless show_deleted."""
    if row is None or (spec.soft_delete and row.delete_time is not None and not show_deleted):
        if allowed is not None and row is None:
            raise denied(spec, raw_id, write)
        raise errors.NotFound.resource(spec.name, raw_id, field_path)
    return row


def visible_id(session: Session, spec: ResourceSpec, raw_id: str, field_path: str = "id") -> uuid.UUID:
    """The id of a row the caller may see, without loading the row: fetch's checks, one small query."""
    row_id = parse_uuid(raw_id, field_path)
    assert row_id is not None
    stmt = select(spec.table.c.id).where(spec.table.c.id == row_id)
    if spec.soft_delete:
        stmt = stmt.where(spec.table.c.delete_time.is_(None))
    allowed = _predicate(spec, write=False)
    if allowed is not None:
        stmt = stmt.where(allowed)
    if session.scalar(stmt) is None:
        if allowed is not None:
            raise denied(spec, raw_id, False)
        raise errors.NotFound.resource(spec.name, raw_id, field_path)
    return row_id


def check_managed(session: Session, spec: ResourceSpec, row: Any) -> None:
    """After a write: the caller must still manage the row it created or changed."""
    check_managed_together(session, spec, [row])


def check_managed_together(session: Session, spec: ResourceSpec, rows: list[Any]) -> None:
    """check_managed for many rows, with one query."""
    allowed = _predicate(spec, write=True)
    if allowed is None:
        return
    ids = [row.id for row in rows]
    managed = set(session.scalars(select(spec.table.c.id).where(spec.table.c.id.in_(ids), allowed)))
    for row in rows:
        if row.id not in managed:
            raise denied(spec, str(row.id), True)


def check_field_rights(spec: ResourceSpec, names: Iterable[str], prefix: str) -> None:
    call = current_call()
    if call is None or call.role == "admin":
        return
    forbidden = sorted(set(names) & policy.ADMIN_ONLY_FIELDS.get(spec.name, frozenset()))
    if forbidden:
        raise errors.PermissionDenied(
            f"only an admin may set {', '.join(prefix + f for f in forbidden)}",
            reason="FIELD_ACCESS_DENIED",
            metadata={"field": prefix + forbidden[0]},
        )


def read_mask_paths(spec: ResourceSpec, paths: Sequence[str]) -> list[str] | None:
    """Validated read_mask paths, None for the whole resource."""
    if not paths or list(paths) == ["*"]:
        return None
    unknown = [p for p in paths if p not in spec.codecs]
    if unknown:
        raise errors.InvalidArgument.field("read_mask", f"unknown field(s) {', '.join(unknown)} of {spec.name}", reason="INVALID_FIELD_MASK")
    return list(dict.fromkeys(paths))


def get(session: Session, spec: ResourceSpec, request: Any) -> Message:
    mask = read_mask_paths(spec, request.read_mask.paths)
    show_deleted = bool(getattr(request, "show_deleted", False))
    raw_id = request.id
    row_id = parse_uuid(raw_id, "id")
    allowed = _read_rule(spec, show_deleted)
    if allowed is None:
        row = reading.load_by_id(session, spec, row_id)
    else:
        row = reading.load_one(session, spec, spec.table.c.id == row_id, allowed)
    return spec.to_proto(found(spec, row, raw_id, allowed, show_deleted=show_deleted, write=False, field_path="id"), mask)


def batch_get(session: Session, spec: ResourceSpec, request: Any, max_bytes: int = DEFAULT_PAGE_BYTES) -> list[Message]:
    ids = list(request.ids)
    if not ids:
        raise errors.InvalidArgument.field("ids", "must name at least one id", reason="REQUIRED_FIELD")
    if len(ids) > MAX_BATCH:
        raise errors.InvalidArgument.field("ids", f"at most {MAX_BATCH} ids per call", reason="BATCH_TOO_LARGE")
    mask = read_mask_paths(spec, request.read_mask.paths)
    parsed = [parse_uuid(raw, f"ids[{i}]") for i, raw in enumerate(ids)]
    stmt = reading.select_rows(spec, reading.dialect_of(session)).where(spec.table.c.id.in_(set(parsed)))
    allowed = _predicate(spec, write=False)
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


def _conditions(spec: ResourceSpec, dialect: str, filter_text: str, show_deleted: bool, allowed: Any) -> list[Any]:
    """The WHERE of a List or Search: the filter, live rows unless show_deleted, the row rule."""
    conditions: list[Any] = []
    compiled = spec.filter_compiler(dialect).compile(filter_text)
    if compiled is not None:
        conditions.append(compiled)
    if spec.soft_delete and not show_deleted:
        conditions.append(spec.table.c.delete_time.is_(None))
    if allowed is not None:
        conditions.append(allowed)
    return conditions


def list_page(
    session: Session, spec: ResourceSpec, request: Any, call: Call, max_bytes: int = DEFAULT_PAGE_BYTES
) -> tuple[list[Message], str, int]:
    """One keyset page: (resources, next_page_token, total_size). The page ends early, with a
    token after its last row, where more rows would take the response past max_bytes."""
    size = page_size(request.page_size)
    show_deleted = bool(getattr(request, "show_deleted", False))
    keys = _order_keys(spec, request.order_by)
    query_fp = fingerprint(spec.name, request.filter, [(k.field, k.descending) for k in keys], show_deleted)
    after: list[Any] | None = None
    if request.page_token:
        payload = decode_token(request.page_token, query_fp, len(keys))
        if "k" not in payload:
            raise errors.InvalidArgument.field("page_token", "is not a page token of this method", reason="INVALID_PAGE_TOKEN")
        after = payload["k"]
    allowed = _read_rule(spec, show_deleted)
    columns = [spec.table.c[k.field] for k in keys]

    def fetch(read: int, counted: bool, last: Any, taken: int) -> tuple[list[Any], int | None]:
        start = after if last is None else [_key_value(last, column) for column in columns]
        nulls = None if start is None else tuple(v is None for v in start)
        if allowed is None:
            stmt, count = _page_statements(spec, call.dialect, request.filter, show_deleted, request.order_by, nulls, read, counted)
        else:  # the caller's row rule holds its own values: built for this call
            stmt, count = _build_page_statements(spec, call.dialect, request.filter, show_deleted, request.order_by, nulls, read, allowed, counted)
        params = {f"after_{i}": value for i, value in enumerate(start or ()) if value is not None}
        found = reading.load_rows(session, spec, stmt, extra=int(counted), params=params)
        if not counted:
            return found, None
        total = found[0][1] if found else session.connection().execute(count).scalar()
        return [row for row, _ in found], total

    rows, messages, more, total = read_page(size, max_bytes, fetch, spec.to_proto)
    next_token = encode_token(query_fp, after=[_key_value(rows[-1], column) for column in columns]) if more else ""
    return messages, next_token, total


def _order_keys(spec: ResourceSpec, order_by: str) -> list[OrderKey]:
    orderable = {name: spec.table.c[name] for name in (*spec.orderable, "id")}
    return parse_order_by(order_by, orderable, spec.default_order)


@functools.lru_cache(maxsize=1024)
def _page_statements(
    spec: ResourceSpec, dialect: str, filter_text: str, show_deleted: bool, order_by: str, nulls: tuple[bool, ...] | None, size: int,
    counted: bool = True,
) -> tuple[Any, Any]:
    """_build_page_statements without a row rule, built once per query shape: a statement
    object used again keeps its SQLAlchemy cache key, so it is neither rebuilt nor traversed.
    The values of the page token are parameters: after_<i>."""
    return _build_page_statements(spec, dialect, filter_text, show_deleted, order_by, nulls, size, None, counted)


def _build_page_statements(
    spec: ResourceSpec, dialect: str, filter_text: str, show_deleted: bool, order_by: str, nulls: tuple[bool, ...] | None,
    size: int, allowed: Any, counted: bool = True,
) -> tuple[Any, Any]:
    """(page statement, COUNT statement) of a List: the page's rows after the token's keys
    (nulls: which of them are NULL; None on the first page), with total_size as a column
    unless not counted (the later statements of a large page)."""
    keys = _order_keys(spec, order_by)
    conditions = _conditions(spec, dialect, filter_text, show_deleted, allowed)
    page_conditions = list(conditions)
    if nulls is not None:
        placeholders = [None if null else bindparam(f"after_{i}", type_=k.column.type) for i, (k, null) in enumerate(zip(keys, nulls))]
        page_conditions.append(keyset_after(keys, placeholders))
    count = select(func.count()).select_from(spec.table).where(*conditions).correlate(None)
    # total_size rides on the page's rows: an uncorrelated subquery, which both engines evaluate
    # once; one statement, one round trip, and on PostgreSQL's autocommit reads the count comes
    # from the page's own snapshot. An empty page counts on its own.
    stmt = reading.select_rows(spec, dialect)
    if counted:
        stmt = stmt.add_columns(count.scalar_subquery().label("total_size"))
    stmt = stmt.where(*page_conditions).order_by(*order_clauses(keys)).limit(size + 1)
    return stmt, count


def _key_value(row: Any, column: Any) -> Any:
    """row's value of an order key, as the column binds it (the read path has ids as text)."""
    value = getattr(row, column.key)
    return uuid.UUID(value) if isinstance(value, str) and isinstance(column.type, Uuid) else value


def search(
    session: Session, spec: ResourceSpec, request: Any, call: Call, max_bytes: int = DEFAULT_PAGE_BYTES
) -> tuple[list[tuple[Message, float]], str, int]:
    """Ranked full-text hits: ([(resource, score)], next_page_token, total_size); cut short
    within max_bytes as a List page is."""
    size = page_size(request.page_size)
    query = search_query_value(call.dialect, request.query)
    query_fp = fingerprint(spec.name, "search", request.query, request.filter)
    offset = 0
    if request.page_token:
        payload = decode_token(request.page_token, query_fp)
        if "o" not in payload:
            raise errors.InvalidArgument.field("page_token", "is not a page token of this method", reason="INVALID_PAGE_TOKEN")
        offset = payload["o"]
    allowed = _predicate(spec, write=False)

    def fetch(read: int, counted: bool, last: Any, taken: int) -> tuple[list[Any], int | None]:
        if allowed is None:
            stmt, count = _search_statements(spec, call.dialect, request.filter, read)
        else:  # the caller's row rule holds its own values: built for this call
            stmt, count = _build_search_statements(spec, call.dialect, request.filter, read, allowed)
        params = {"search_query": query, "search_offset": offset + taken}
        found = reading.load_rows(session, spec, stmt, extra=2, params=params)
        if not counted:
            return found, None
        return found, found[0][2] if found else session.connection().execute(count, params).scalar()

    hits, messages, more, total = read_page(size, max_bytes, fetch, lambda hit: spec.to_proto(hit[0]), SEARCH_RESULT_EXTRA)
    next_token = encode_token(query_fp, offset=offset + len(hits)) if more else ""
    return [(message, float(score)) for message, (_, score, _) in zip(messages, hits)], next_token, total


@functools.lru_cache(maxsize=1024)
def _search_statements(spec: ResourceSpec, dialect: str, filter_text: str, size: int) -> tuple[Any, Any]:
    """_build_search_statements without a row rule, built once per shape (see _page_statements)."""
    return _build_search_statements(spec, dialect, filter_text, size, None)


def _build_search_statements(spec: ResourceSpec, dialect: str, filter_text: str, size: int, allowed: Any) -> tuple[Any, Any]:
    """(page statement, COUNT statement) of a Search: the hits ranked by score from offset
    :search_offset, with the score and total_size as columns (the COUNT as in a List)."""
    terms = search_terms(dialect, spec.table.name, spec.search_fields)
    conditions = [*_conditions(spec, dialect, filter_text, False, allowed), terms.match]
    score = terms.score.label("score")
    count = select(func.count()).select_from(spec.table)
    stmt = select(*reading.columns(spec, dialect), score)
    if terms.join is not None:
        target, on = terms.join
        stmt = stmt.join_from(spec.table, target, on)
        count = count.join(target, on)
    count = count.where(*conditions).correlate(None)
    stmt = stmt.add_columns(count.scalar_subquery().label("total_size")).where(*conditions)
    stmt = stmt.order_by(score.desc(), spec.table.c.id).offset(bindparam("search_offset")).limit(size + 1)
    return stmt, count


# ---------------------------------------------------------------- writing


def _load_fields(spec: ResourceSpec, msg: Message, names: Iterable[str], prefix: str) -> dict[str, Any]:
    """Row values for the named fields; every violation is reported at once."""
    values: dict[str, Any] = {}
    violations = errors.Violations()
    for name in names:
        try:
            values.update(spec.codecs[name].load(msg))
        except errors.InvalidArgument as exc:
            for v in exc.violations:
                violations.add(prefix + v.field, v.description, v.reason)
    violations.raise_if_any()
    return values


def check_visible_references(session: Session, spec: ResourceSpec, loaded: list[tuple[dict[str, Any], str]]) -> None:
    """PERMISSION_DENIED naming the field when a row references a resource its caller may not
    see (a reply to a message of a hidden channel, a message in a hidden conversation): hidden
    and absent ids answer alike, as a Get of them would, so references are no existence oracle.
    One query per referencing field whose target has a read rule for the caller; none for admins."""
    for field_name, target_name in spec.references.items():
        target = REGISTRY[target_name]
        allowed = _predicate(target, write=False)
        attr = spec.codecs[field_name].attr
        if allowed is None or not attr:
            continue
        wanted = {values[attr] for values, _ in loaded if values.get(attr) is not None}
        if not wanted:
            continue
        ids = target.table.c.id
        seen = set(session.connection().execute(select(ids).where(ids.in_(wanted), allowed)).scalars())
        for values, prefix in loaded:
            value = values.get(attr)
            if value is not None and value not in seen:
                raise errors.PermissionDenied(
                    f"the caller may not see {target.name} {str(value)!r}",
                    reason="REFERENCE_ACCESS_DENIED",
                    metadata={"field": prefix + field_name, "resource_type": target.name, "resource_id": str(value)},
                )


def check_references(session: Session, spec: ResourceSpec, values: dict[str, Any], prefix: str = "") -> None:
    """NOT_FOUND naming the field when a referenced resource does not exist (or is deleted)."""
    check_references_together(session, spec, [(values, prefix)])


def check_references_together(session: Session, spec: ResourceSpec, loaded: list[tuple[dict[str, Any], str]]) -> None:
    """check_references for many rows: one query per referencing field; NOT_FOUND names the
    first row (in request order) whose reference is missing."""
    for field_name, target_name in spec.references.items():
        attr = spec.codecs[field_name].attr
        wanted = {values[attr] for values, _ in loaded if attr and values.get(attr) is not None}
        if not wanted:
            continue
        target = REGISTRY[target_name]
        stmt = _reference_statement(target, len(wanted) == 1)
        conn = session.connection()
        if len(wanted) == 1:
            found = {row[0] for row in prepared(stmt, conn.dialect, processed=True).rows(conn, {"id": next(iter(wanted))})}
        else:  # an expanding IN: compiled per execution
            found = set(conn.execute(stmt, {"ids": list(wanted)}).scalars())
        if len(found) == len(wanted):
            continue
        for values, prefix in loaded:
            value = values.get(attr) if attr else None
            if value is not None and value not in found:
                raise errors.NotFound.resource(target.name, str(value), prefix + field_name)


@functools.lru_cache(maxsize=None)
def _reference_statement(target: ResourceSpec, one: bool) -> Any:
    """The live ids among :id (one) or :ids of target's rows (_live_targets). Built once."""
    ids = target.table.c.id
    return _live_targets(target, ids == bindparam("id", type_=ids.type) if one else ids.in_(bindparam("ids", expanding=True)))


def _live_targets(target: ResourceSpec, condition: Any) -> Any:
    """SELECT of the ids of target's live rows matching condition, FOR SHARE (PostgreSQL): a
    concurrent delete of a target waits for the write that references it to commit."""
    stmt = select(target.table.c.id).where(condition)
    if target.soft_delete:
        stmt = stmt.where(target.table.c.delete_time.is_(None))
    return stmt.with_for_update(read=True)


def _missing_required(spec: ResourceSpec, row: Any, prefix: str) -> None:
    violations = errors.Violations()
    for name in sorted(spec.required):
        attr = spec.codecs[name].attr
        if attr is not None and getattr(row, attr) in (None, ""):
            violations.add(prefix + name, "is required", "REQUIRED_FIELD")
    violations.raise_if_any()


def _apply_defaults(spec: ResourceSpec, row: Any) -> None:
    """Column defaults for attributes left None, so hooks and validation see the final values."""
    for key, value in _scalar_defaults(spec):
        if getattr(row, key, None) is None:
            setattr(row, key, value)


@functools.lru_cache(maxsize=None)
def _scalar_defaults(spec: ResourceSpec) -> tuple[tuple[str, Any], ...]:
    return tuple((c.key, c.default.arg) for c in spec.table.c if c.default is not None and c.default.is_scalar)


def validate_request_id(request_id: str, field_path: str = "request_id") -> str:
    if len(request_id) > MAX_REQUEST_ID or not request_id.isprintable():
        raise errors.InvalidArgument.field(field_path, f"must be at most {MAX_REQUEST_ID} printable characters (a UUID is best)")
    return request_id


def request_principal(call: Call) -> str:
    """Whose request ids these are: a request id is remembered per caller (the API key, the JWT's
    user, or the service itself), so another caller sending the same id makes a new request."""
    return f"{call.actor_type}:{call.actor_id or ''}"


def _earlier_result(session: Session, spec: ResourceSpec, request_id: str, call: Call) -> Message | None:
    """The result of this caller's earlier create with request_id, read as a Get would read it
    (the caller's read rule applies: PERMISSION_DENIED if it may no longer see the row)."""
    earlier = session.scalar(
        select(RequestRecord.resource_id).where(
            RequestRecord.resource_type == spec.name,
            RequestRecord.principal == request_principal(call),
            RequestRecord.request_id == request_id,
        )
    )
    if earlier is None:
        return None
    return spec.to_proto(fetch(session, spec, str(earlier), show_deleted=True))


def _claim_request_id(session: Session, spec: ResourceSpec, request_id: str, row_id: uuid.UUID, call: Call) -> Message | None:
    """Record request_id for row_id; if a concurrent call claimed it first, return that call's result."""
    try:
        # A savepoint: on PostgreSQL the insert waits for a concurrent claim to commit, then fails
        # here, and (READ COMMITTED) the next statement sees the winner's row.
        with session.begin_nested():
            session.add(
                RequestRecord(resource_type=spec.name, principal=request_principal(call), request_id=request_id, resource_id=row_id)
            )
            session.flush()
    except IntegrityError:
        result = _earlier_result(session, spec, request_id, call)
        if result is None:
            raise errors.Aborted("a concurrent call with the same request_id did not finish; retry", reason="REQUEST_IN_FLIGHT") from None
        return result
    return None


def _new_row(spec: ResourceSpec, msg: Message, call: Call, field_prefix: str) -> tuple[Any, dict[str, Any], list[str]]:
    """A validated new row from a create request's resource: (row, loaded values, set fields).

    The row is a plain object with the model's attributes (every column, None when unset), for
    insert_rows: a mapped instance would cost more to build and is never flushed.
    """
    names = [n for n in spec.creatable if spec.codecs[n].present(msg)]
    check_field_rights(spec, names, field_prefix)
    values = _load_fields(spec, msg, names, field_prefix)
    set_values = {k: v for k, v in values.items() if v is not None}
    row = reading.row_class(spec)({**_empty_row(spec), **set_values})
    row.id = uuid7()
    _apply_defaults(spec, row)
    if spec.owner_field:
        _own_row(spec, row, values, call, field_prefix)
    _missing_required(spec, row, field_prefix)
    return row, values, names


def _own_row(spec: ResourceSpec, row: Any, values: dict[str, Any], call: Call, field_prefix: str) -> None:
    """A new row's owner field is its caller: left unset, it becomes the caller's user; only an
    admin may name another owner (importing, making rows for others)."""
    owner = getattr(row, spec.owner_field)
    if owner is None and call.actor_user_id is not None:
        setattr(row, spec.owner_field, call.actor_user_id)
        values[spec.owner_field] = call.actor_user_id
    elif owner is not None and owner != call.actor_user_id and call.role != "admin":
        field = field_prefix + spec.owner_field
        raise errors.PermissionDenied(
            f"{field} is the caller: only an admin may set another", reason="FIELD_ACCESS_DENIED", metadata={"field": field}
        )


@functools.lru_cache(maxsize=None)
def _empty_row_values(spec: ResourceSpec) -> tuple[tuple[str, None], ...]:
    return tuple((c.key, None) for c in spec.table.c)


def _empty_row(spec: ResourceSpec) -> dict[str, Any]:
    return dict(_empty_row_values(spec))


def create(session: Session, spec: ResourceSpec, request: Any, call: Call, prefix: str = "") -> Message:
    request_id = validate_request_id(request.request_id, prefix + "request_id")
    if request_id:
        earlier = _earlier_result(session, spec, request_id, call)
        if earlier is not None:
            return earlier
    field_prefix = f"{prefix}{spec.singular_field}."
    row, values, names = _new_row(spec, getattr(request, spec.singular_field), call, field_prefix)
    check_visible_references(session, spec, [(values, field_prefix)])
    if spec.before_write is not None:
        spec.before_write(session, row, set(names), True, call)
    if request_id:
        winner = _claim_request_id(session, spec, request_id, row.id, call)
        if winner is not None:
            return winner
    return insert_rows(session, spec, [row], unchecked=(values, field_prefix))[0]


def one_statement_create(spec: ResourceSpec, request: Any, call: Call) -> bool:
    """Whether create() writes with one statement after which nothing fails, so that it may run
    in autocommit (Database.run_sync one_statement): on PostgreSQL the row goes in with its audit
    entry and its reference checks in one INSERT (insert_rows), and here nothing else writes — no
    request id to claim, no change event to append — and no row policy is checked after it.
    Such a create uses nothing of a Session but its connection: on SQLite it runs in one
    IMMEDIATE transaction on a bare connection (its statements are several)."""
    return (
        spec.audited
        and spec.stream_scope is None
        and not request.request_id
        and _predicate(spec, write=True) is None
    )


def one_statement_update(spec: ResourceSpec, request: Any, call: Call) -> bool:
    """Whether update() may run in autocommit (Database.run_sync one_statement): the row is read
    without a lock and changed by one UPDATE that goes in only at the revision read (its audit
    entry with it); a row changed in between makes it run again in a transaction (the row read
    FOR UPDATE). Not when it changes a reference (checked FOR SHARE, a lock autocommit would not
    keep), has a change event to append or a row policy to check after the UPDATE. On SQLite
    (one IMMEDIATE transaction on a bare connection: the write lock held from the read) the same
    updates use nothing of a Session but its connection either."""
    if not (spec.audited and spec.stream_scope is None and _predicate(spec, write=True) is None):
        return False
    msg = getattr(request, spec.singular_field)
    try:
        names = update_paths(spec, msg, request.update_mask.paths)
    except errors.NexusError:
        return False  # answered by update() itself
    return not set(names) & set(spec.references)


def _in_autocommit(conn: Any) -> bool:
    return conn.dialect.name == "postgresql" and bool(conn.connection.dbapi_connection.autocommit)


def batch_create(session: Session, spec: ResourceSpec, request: Any, call: Call, max_bytes: int = DEFAULT_PAGE_BYTES) -> list[Message]:
    """_batch_create, refused before it commits when its answer would pass max_bytes: a client
    that cannot read the answer would take a committed batch for a refused one."""
    made = _batch_create(session, spec, request, call)
    if fitting(made, max_bytes) < len(made):
        raise errors.ResourceExhausted(
            f"the answer to {len(made)} creates would take more than the response limit ({max_bytes} bytes): "
            "nothing was created; send fewer per call",
            reason="RESPONSE_TOO_LARGE",
            metadata={"field": "requests", "max_bytes": str(max_bytes)},
        )
    return made


def _batch_create(session: Session, spec: ResourceSpec, request: Any, call: Call) -> list[Message]:
    """All or nothing (AIP-233). Without request ids the rows are written together: validated
    one by one, then one reference query per referencing field and insert_rows (one INSERT for
    the rows, one for their audit entries, one check of the caller's rights)."""
    requests = list(request.requests)
    if not requests:
        raise errors.InvalidArgument.field("requests", "must hold at least one request", reason="REQUIRED_FIELD")
    if len(requests) > MAX_BATCH:
        raise errors.InvalidArgument.field("requests", f"at most {MAX_BATCH} per call", reason="BATCH_TOO_LARGE")
    if any(sub.request_id for sub in requests):
        # Each request id is claimed (or answered from an earlier call) row by row.
        return [create(session, spec, sub, call, prefix=f"requests[{i}].") for i, sub in enumerate(requests)]
    made = []
    for i, sub in enumerate(requests):
        field_prefix = f"requests[{i}].{spec.singular_field}."
        made.append((*_new_row(spec, getattr(sub, spec.singular_field), call, field_prefix), field_prefix))
    loaded = [(values, field_prefix) for _, values, _, field_prefix in made]
    check_visible_references(session, spec, loaded)
    rows = [row for row, _, _, _ in made]
    if spec.before_write is not None:
        for row, _, names, _ in made:
            spec.before_write(session, row, set(names), True, call)
    check_references_together(session, spec, loaded)
    return insert_rows(session, spec, rows)


def insert_rows(
    session: Session, spec: ResourceSpec, rows: list[Any], unchecked: tuple[dict[str, Any], str] | None = None
) -> list[Message]:
    """Insert new rows (plain objects from _new_row, validated) and answer their messages.

    One INSERT of plain column values for all of them (insertmanyvalues), their audit entries
    (INSERT_LISTENERS), the caller's rights on the result, their change events: the ORM's unit
    of work would cost more per row than the database does. The objects never join the
    session, so its flush does not see them; later statements in the transaction do.
    unchecked=(loaded values, field prefix): one row whose references are still to check.
    """
    now = utcnow()
    columns = [(c.key, _insert_default(c)) for c in spec.table.c]
    drafts = [{key: getattr(row, key) for key, _ in columns} for row in rows]
    values = [{key: _value_or_default(draft[key], default, now) for key, default in columns} for draft in drafts]
    companions = [extra for listener in INSERT_LISTENERS if (extra := listener(session, spec, drafts))]
    conn = session.connection()
    if len(values) == 1 and [len(r) for _, r in companions] == [1] and conn.dialect.name == "postgresql":
        # One statement, one round trip: the row, with its companion (the audit entry) as a
        # data-modifying CTE, inserted only if each row it references is there and live (read
        # FOR SHARE, as check_references reads them). (SQLite has no such CTEs; a batch keeps
        # insertmanyvalues.)
        ((table, (companion,)),) = companions
        params = {f"r_{key}": value for key, value in values[0].items()}
        params.update({f"c_{key}": value for key, value in companion.items()})
        references: tuple[tuple[str, str], ...] = ()
        if unchecked is not None:
            references = tuple(
                (field, target) for field, target in spec.references.items()
                if spec.codecs[field].attr and unchecked[0].get(spec.codecs[field].attr) is not None
            )
            params.update({f"ref_{i}": unchecked[0][spec.codecs[field].attr] for i, (field, _) in enumerate(references)})
        stmt = _insert_with(spec.table, table, tuple(values[0]), tuple(companion), references)
        if not prepared(stmt, conn.dialect).rows(conn, params):
            # A reference is missing: which one, as check_references reports it.
            check_references(session, spec, *unchecked)  # type: ignore[misc]
            raise errors.Aborted("a referenced resource changed during the call; retry", reason="REFERENCE_CHANGED")
    else:
        if _in_autocommit(conn):
            # A unit of work in autocommit (one_statement_create) must write with one statement.
            raise AssertionError(f"{spec.name} rows need more than one statement: not in autocommit")
        if unchecked is not None:
            check_references(session, spec, *unchecked)
        bulk.insert_many(conn, spec.table, values)
        for table, companion_rows in companions:
            bulk.insert_many(conn, table, companion_rows)
    for row, row_values in zip(rows, values):
        row.__dict__.update(row_values)
        for key in spec.relation_fields:
            setattr(row, key, [])
    check_managed_together(session, spec, rows)
    return [publish(session, spec, row, events.CREATED, spec.to_proto(row)) for row in rows]


@functools.lru_cache(maxsize=None)
def _insert_with(
    table: Any, companion: Any, keys: tuple[str, ...], companion_keys: tuple[str, ...], references: tuple[tuple[str, str], ...]
) -> Any:
    """INSERT of one row into table with one row into companion as a CTE, built once (so it is
    compiled once): parameters r_<column> and c_<column>. With references ((field, target
    resource), ...): the row goes in only if each target row ref_<i> exists and is live, read
    FOR SHARE; it answers the new id, or nothing."""
    row = [bindparam(f"r_{k}", type_=table.c[k].type) for k in keys]
    guards = []
    for i, (_, target_name) in enumerate(references):
        ids = REGISTRY[target_name].table.c.id
        reference = _live_targets(REGISTRY[target_name], ids == bindparam(f"ref_{i}", type_=ids.type))
        guards.append(exists(reference.cte(f"reference_{i}").select()))
    source = select(*row).where(*guards)
    return insert(table).from_select(list(keys), source).add_cte(_companion_cte(companion, companion_keys, guards)).returning(table.c.id)


def _companion_cte(companion: Any, keys: tuple[str, ...], guards: Sequence[Any] = (), after: Any = None) -> Any:
    """INSERT of one companion row (an audit entry; parameters c_<column>) as a CTE: only where
    the guards all hold, and with after (a CTE of the change) only if that changed a row. A
    data-modifying CTE runs whether or not the statement's own change happens, so the companion
    carries that change's conditions (the statement may be its own transaction)."""
    source = select(*(bindparam(f"c_{k}", type_=companion.c[k].type) for k in keys)).where(*guards)
    if after is not None:
        source = source.select_from(after)
    return insert(companion).from_select(list(keys), source).cte("companion")


# Called as listener(session, spec, column values of each row) when insert_rows inserts rows
# with Core instead of the ORM; returns rows to insert with them, as (table, rows), or None:
# db/audit.py answers their audit entries, as the flush would have written them. The values are
# those a flush would see: before the column defaults computed at INSERT time.
INSERT_LISTENERS: list[Callable[[Session, ResourceSpec, list[dict[str, Any]]], tuple[Any, list[dict[str, Any]]] | None]] = []
_NOW = object()


def _insert_default(column: Any) -> Any:
    default = column.default
    if default is None:
        return None
    if default.is_scalar:
        return default.arg
    if default.is_callable:
        # Every timestamp default of one call is the same instant; others (ids, JSON) per row.
        return _NOW if isinstance(column.type, UTCDateTime) else default.arg
    return None


def _value_or_default(value: Any, default: Any, now: Any) -> Any:
    if value is not None or default is None:
        return value
    if default is _NOW:
        return now
    return default(None) if callable(default) else default


def update_paths(spec: ResourceSpec, msg: Message, paths: Sequence[str]) -> list[str]:
    """The fields an update changes: the mask, "*" for every updatable field, or the set fields."""
    if not paths:
        return [n for n in spec.updatable if spec.codecs[n].present(msg)]
    if list(paths) == ["*"]:
        return list(spec.updatable)
    violations = errors.Violations()
    for path in paths:
        if path not in spec.codecs:
            violations.add("update_mask", f"{path!r} is not a field of {spec.name}", "INVALID_FIELD_MASK")
        elif path in spec.all_output_only:
            violations.add("update_mask", f"{path!r} is output only", "INVALID_FIELD_MASK")
        elif path in spec.immutable:
            violations.add("update_mask", f"{path!r} cannot change after creation", "IMMUTABLE_FIELD")
    violations.raise_if_any()
    return list(dict.fromkeys(paths))


def check_etag(row: Any, etag: str, field_path: str) -> None:
    if etag and etag != etag_of(row):
        raise errors.Aborted(
            f"etag {etag!r} is stale: the resource is now at {etag_of(row)!r}; read it again",
            reason="ETAG_MISMATCH",
            metadata={"field": field_path, "current_etag": etag_of(row)},
        )


def update(session: Session, spec: ResourceSpec, request: Any, call: Call) -> Message:
    """The standard Update, with Core statements: the row locked and read, one UPDATE (which
    also answers the row's relations, read under the lock), one audit INSERT (UPDATE_LISTENERS).
    Without a change nothing is written, as a flush would write nothing."""
    msg = getattr(request, spec.singular_field)
    field_prefix = f"{spec.singular_field}."
    names = update_paths(spec, msg, request.update_mask.paths)
    check_field_rights(spec, names, field_prefix)
    conn = session.connection()
    one_statement = _in_autocommit(conn)  # one_statement_update: no lock, a revision guard
    before = _fetch_for_update(session, spec, msg.id, field_prefix + "id", lock=not one_statement)
    check_etag(before, msg.etag, field_prefix + "etag")
    values = _load_fields(spec, msg, names, field_prefix)
    row = reading.row_class(spec)(dict(before.__dict__))
    for key, value in values.items():
        setattr(row, key, value)
    _apply_defaults_for_cleared(spec, row, values)
    _missing_required(spec, row, field_prefix)
    check_visible_references(session, spec, [(values, field_prefix)])
    check_references(session, spec, values, field_prefix)
    if spec.before_write is not None:
        spec.before_write(session, row, set(names), False, call)
    keys = [c.key for c in spec.table.c]
    old = {key: getattr(before, key) for key in keys}
    new = {key: getattr(row, key) for key in keys}
    changed = {key: value for key, value in new.items() if value != old[key]}
    loaders = reading.relation_loaders(spec)
    table = spec.table
    if changed:
        changed["update_time"] = new["update_time"] = row.update_time = utcnow()
        changed["revision"] = new["revision"] = row.revision = before.revision + 1
        companions = [extra for listener in UPDATE_LISTENERS if (extra := listener(session, spec, before.id, old, new))]
        params = {f"v_{key}": value for key, value in changed.items()}
        params.update(row_id=before.id, old_revision=before.revision)
        companion = None
        if [len(r) for _, r in companions] == [1] and call.dialect == "postgresql":
            # One statement: the audit entry goes in with the UPDATE as a data-modifying CTE.
            ((companion, (entry,)),) = companions
            params.update({f"c_{key}": value for key, value in entry.items()})
            companions = []
        stmt = _update_statement(spec, call.dialect, tuple(changed), companion, tuple(entry) if companion is not None else ())
        answers = prepared(stmt, conn.dialect).rows(conn, params)
        answered = answers[0] if answers else None
        if answered is None and one_statement:
            raise errors.NeedsTransaction  # changed since it was read (nothing written): again, locked
        if answered is None:  # what the ORM reports as StaleDataError; the row lock prevents it
            raise errors.Aborted(
                "the resource changed while it was being updated; read it again and retry",
                reason="CONCURRENT_MODIFICATION",
                metadata={"resource_type": spec.name},
            )
        for companion_table, companion_rows in companions:
            bulk.insert_many(conn, companion_table, companion_rows)
        relation_values = answered[1:]
    elif loaders:
        relations = select(*(loader.aggregate(call.dialect) for loader in loaders)).where(table.c.id == before.id)
        relation_values = conn.execute(relations).one()
    else:
        relation_values = ()
    for loader, value in zip(loaders, relation_values):
        setattr(row, loader.key, loader.rows(value))
    check_managed(session, spec, row)
    return publish(session, spec, row, events.UPDATED, spec.to_proto(row))


def _fetch_for_update(session: Session, spec: ResourceSpec, raw_id: str, field_path: str, lock: bool = True) -> Any:
    """fetch(lock=True) without the ORM: the row's column values (ids as uuid.UUID) as a plain
    row, locked on PostgreSQL (unless lock=False); PERMISSION_DENIED or NOT_FOUND as fetch
    answers them."""
    row_id = parse_uuid(raw_id, field_path)
    table = spec.table
    stmt = _locked_row_statement(spec, lock and session.get_bind().dialect.name == "postgresql")
    allowed = _predicate(spec, write=True)
    if allowed is not None:
        stmt = stmt.where(allowed)
    conn = session.connection()
    if allowed is None:
        found_rows = prepared(stmt, conn.dialect, processed=True).rows(conn, {"row_id": row_id})
        found_row = found_rows[0] if found_rows else None
    else:  # a statement per caller's predicate: not one to keep
        found_row = conn.execute(stmt, {"row_id": row_id}).first()
    row = None if found_row is None else reading.row_class(spec)(dict(zip([c.key for c in table.c], found_row)))
    return found(spec, row, raw_id, allowed, show_deleted=False, write=True, field_path=field_path)


@functools.lru_cache(maxsize=None)
def _locked_row_statement(spec: ResourceSpec, lock: bool) -> Any:
    """SELECT of the row row_id's columns, FOR UPDATE if lock (PostgreSQL); built once."""
    table = spec.table
    stmt = select(*table.c).where(table.c.id == bindparam("row_id", type_=table.c.id.type))
    return stmt.with_for_update(of=table) if lock else stmt


@functools.lru_cache(maxsize=1024)
def _update_statement(spec: ResourceSpec, dialect: str, keys: tuple[str, ...], companion: Any, companion_keys: tuple[str, ...]) -> Any:
    """UPDATE of the columns `keys` (parameters v_<column>) of the row row_id at old_revision,
    answering its revision and relations; with one companion row (parameters c_<column>), the
    UPDATE is a CTE the companion's INSERT selects from: the entry goes in only if the row did.
    Built once per shape, so compiled once."""
    table = spec.table
    stmt = (
        sa_update(table)
        .where(table.c.id == bindparam("row_id", type_=table.c.id.type), table.c.revision == bindparam("old_revision", type_=table.c.revision.type))
        .values({key: bindparam(f"v_{key}", type_=table.c[key].type) for key in keys})
        .returning(table.c.revision, *(loader.aggregate(dialect) for loader in reading.relation_loaders(spec)))
    )
    if companion is None:
        return stmt
    updated = stmt.cte("updated")
    return select(*updated.c).add_cte(_companion_cte(companion, companion_keys, after=updated))


# Called as listener(session, spec, row id, column values before, column values after) when
# update changes a row with Core; returns rows to insert with the change, as (table, rows), or
# None: db/audit.py answers the audit entry, as the flush would have written it.
UPDATE_LISTENERS: list[Callable[[Session, ResourceSpec, Any, dict[str, Any], dict[str, Any]], tuple[Any, list[dict[str, Any]]] | None]] = []


def _apply_defaults_for_cleared(spec: ResourceSpec, row: Any, values: dict[str, Any]) -> None:
    """A masked enum or flag cleared to its zero value goes back to the column default."""
    for key, value in values.items():
        col = spec.table.c.get(key)
        if value is None and col is not None and not col.nullable and col.default is not None and col.default.is_scalar:
            setattr(row, key, col.default.arg)


def delete(session: Session, spec: ResourceSpec, request: Any, call: Call) -> Message:
    force = bool(getattr(request, "force", False))
    if force and call.role != "admin":
        raise errors.PermissionDenied(
            "only an admin may delete for good (force): ask for a soft delete instead",
            reason="FORCE_DELETE_ADMIN_ONLY",
            metadata={"field": "force", "resource_type": spec.name},
        )
    row = fetch(session, spec, request.id, show_deleted=force, lock=True)
    check_etag(row, request.etag, "etag")
    if spec.soft_delete and not force:
        row.delete_time = utcnow()
        session.flush()
        return publish_deleted(session, spec, row, spec.to_proto(row))
    last_state = spec.to_proto(row)
    remove_with_dependents(session, spec, row, last_state)
    return last_state if spec.soft_delete else empty_pb2.Empty()


MAX_CASCADE_ROWS = 10_000


def remove_with_dependents(session: Session, spec: ResourceSpec, row: Any, last_state: Message) -> None:
    """Delete row for good, doing first in the unit of work what the database's ON DELETE rules
    would do behind its back, so that the audit listener records every row the deletion removes
    or changes and each one's stream hears of it: rows that reference it ON DELETE CASCADE are
    deleted (deepest first, so that none was already removed by the database), SET NULL
    references cleared and memberships in other resources' relations removed (both move the
    changed row's etag). A RESTRICT dependent: FAILED_PRECONDITION HAS_DEPENDENTS naming it; more
    than MAX_CASCADE_ROWS rows to change: TOO_MANY_DEPENDENTS; either way nothing changes."""
    counts: dict[str, int] = {}
    levels, changed = _cascade(session, spec, row, counts)
    if sum(counts.values()) > MAX_CASCADE_ROWS:
        named = ", ".join(f"{n} {name}" for name, n in sorted(counts.items()))
        raise errors.FailedPrecondition(
            f"deleting {spec.name} {row.id} would remove or change {named}: more than {MAX_CASCADE_ROWS}; delete them first",
            reason="TOO_MANY_DEPENDENTS",
            metadata={"resource_type": spec.name, "dependents": named},
        )
    now = utcnow()
    for dependent, found in changed:
        found.update_time = now
    session.flush()
    for dependent, found in changed:
        publish(session, dependent, found, events.UPDATED, dependent.to_proto(found))
    for dependent, rows in reversed(levels):
        for found in rows:
            publish_deleted(session, dependent, found, dependent.to_proto(found))
        _delete_leaves_first(session, dependent, rows)
    publish_deleted(session, spec, row, last_state)
    session.delete(row)
    session.flush()


def _cascade(session: Session, spec: ResourceSpec, row: Any, counts: dict[str, int]) -> tuple[list[tuple[ResourceSpec, list[Any]]], list[tuple[ResourceSpec, Any]]]:
    """What deleting row does to other rows, breadth first (no recursion: a thread of replies may
    be deep): the levels of rows to delete, each referencing the level before, and the rows
    changed (a reference cleared, a member removed), changed in the session already."""
    levels: list[tuple[ResourceSpec, list[Any]]] = []
    changed: dict[Any, tuple[ResourceSpec, Any]] = {}
    seen = {(spec.name, row.id)}
    pending = [(spec, [row])]
    while pending and sum(counts.values()) <= MAX_CASCADE_ROWS:
        target, rows = pending.pop(0)
        ids = [r.id for r in rows]
        for dependent in REGISTRY:
            for fk in dependent.table.foreign_keys:
                if fk.column.table is target.table:
                    found = _dependents(session, target, dependent, fk, ids, seen)
                    counts[dependent.name] = counts.get(dependent.name, 0) + len(found)
                    if not found:
                        continue
                    if fk.ondelete == "CASCADE":
                        seen.update((dependent.name, o.id) for o in found)
                        levels.append((dependent, found))
                        pending.append((dependent, found))
                    else:  # SET NULL
                        key = inspect(dependent.model).get_property_by_column(fk.parent).key
                        for o in found:
                            setattr(o, key, None)
                            changed[o] = (dependent, o)
            for relation in inspect(dependent.model).relationships:
                if relation.secondary is None or relation.mapper.local_table is not target.table:
                    continue
                ((_, member_column),) = relation.secondary_synchronize_pairs
                ((_, parent_column),) = relation.synchronize_pairs
                parent_ids = select(parent_column).where(member_column.in_(ids))
                stmt = select(dependent.model).where(dependent.table.c.id.in_(parent_ids)).limit(MAX_CASCADE_ROWS + 1)
                parents = [p for p in session.scalars(stmt) if (dependent.name, p.id) not in seen]
                counts[dependent.name] = counts.get(dependent.name, 0) + len(parents)
                for parent in parents:
                    collection = getattr(parent, relation.key)
                    for member in [m for m in collection if m.id in ids]:
                        collection.remove(member)
                    changed[parent] = (dependent, parent)
    return levels, list(changed.values())


def _dependents(session: Session, target: ResourceSpec, dependent: ResourceSpec, fk: Any, ids: list[Any], seen: set[Any]) -> list[Any]:
    """The rows of dependent whose fk references one of ids (not already on the way out);
    FAILED_PRECONDITION naming them when the database would refuse the delete for them."""
    if fk.ondelete not in ("CASCADE", "SET NULL"):
        held = session.scalar(select(func.count()).select_from(dependent.table).where(fk.parent.in_(ids)))
        if held:
            named = f"{held} {dependent.name} ({fk.parent.name})"
            raise errors.FailedPrecondition(
                f"{target.name} {ids[0]} is still referenced by {named}: delete or change them first",
                reason="HAS_DEPENDENTS",
                metadata={"resource_type": target.name, "resource_id": str(ids[0]), "dependents": named},
            )
        return []
    stmt = select(dependent.model).where(fk.parent.in_(ids)).limit(MAX_CASCADE_ROWS + 1)
    return [o for o in session.scalars(stmt) if (dependent.name, o.id) not in seen]


def _delete_leaves_first(session: Session, spec: ResourceSpec, rows: list[Any]) -> None:
    """Delete rows of one level, those no other of them references (ON DELETE CASCADE) first: a
    channel's messages before the messages they reply to, which the database would take with them."""
    keys = [
        inspect(spec.model).get_property_by_column(fk.parent).key
        for fk in spec.table.foreign_keys if fk.column.table is spec.table and fk.ondelete == "CASCADE"
    ]
    remaining = {r.id: r for r in rows}
    while remaining:
        referenced = {getattr(r, key) for r in remaining.values() for key in keys}
        leaves = [r for row_id, r in remaining.items() if row_id not in referenced] or list(remaining.values())
        for r in leaves:
            session.delete(r)
            del remaining[r.id]
        session.flush()


def undelete(session: Session, spec: ResourceSpec, request: Any, call: Call) -> Message:
    row = fetch(session, spec, request.id, show_deleted=True, lock=True)
    if row.delete_time is None:
        raise errors.FailedPrecondition(f"{spec.name} {request.id!r} is not deleted", reason="NOT_DELETED")
    row.delete_time = None
    session.flush()
    return publish(session, spec, row, events.UPDATED, spec.to_proto(row))


def publish(session: Session, spec: ResourceSpec, row: Any, event_type: str, msg: Message) -> Message:
    """Append the change to the resource's stream, in this transaction; returns msg."""
    if spec.stream_scope is not None:
        events.emit(session, spec.stream_scope(row), event_type, spec.name, row.id, msg)
    return msg


# What a deleted resource's events keep: what names it and places it, not what it said.
KEPT_WHEN_DELETED = frozenset({"id", "create_time", "update_time", "delete_time", "etag"})


def publish_deleted(session: Session, spec: ResourceSpec, row: Any, msg: Message) -> Message:
    """Append a deleted row's event: its message without content (KEPT_WHEN_DELETED and its
    references), and the row's earlier events in the log lose their content too, so that no
    resume from before the delete brings back what a Get no longer shows. Returns msg whole."""
    if spec.stream_scope is None:
        return msg
    left = type(msg)()
    left.CopyFrom(msg)
    for field, _ in msg.ListFields():
        if field.name not in KEPT_WHEN_DELETED and field.name not in spec.references:
            left.ClearField(field.name)
    events.redact(session, spec.name, row.id, left)
    events.emit(session, spec.stream_scope(row), events.DELETED, spec.name, row.id, left)
    return msg


def change_membership(session: Session, spec: ResourceSpec, parent_id: str, user_id: str, *, add: bool, parent_field: str) -> Message:
    """Add or remove a user in a resource's `members`; idempotent; a real change moves the etag."""
    parent = fetch(session, spec, parent_id, field_path=parent_field, lock=True)
    if add:
        user = fetch(session, REGISTRY["User"], user_id, field_path="user_id")
        changed = user not in parent.members
        if changed:
            parent.members.append(user)
    else:
        member_id = parse_uuid(user_id, "user_id")
        kept = [u for u in parent.members if u.id != member_id]
        changed = len(kept) != len(parent.members)
        if changed:
            parent.members = kept
    if not changed:
        return spec.to_proto(parent)
    parent.update_time = utcnow()
    session.flush()
    return publish(session, spec, parent, events.UPDATED, spec.to_proto(parent))
