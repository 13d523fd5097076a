"""AI usage: AIInteraction (one call to a model, recorded by the service that made it, mostly in
bulk) and the usage summary over them (GetAIUsageSummary).

An interaction is a record: written once (Create, BatchCreate of up to 10,000), never updated,
removed for good by admins only. Its cost is kept as integers (units, nanos, currency) and its
latency as integer nanoseconds, so that the summary's sums are exact and its percentiles are
values that were written, on both databases."""
from __future__ import annotations

import contextlib
import datetime as dt
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from google.protobuf.message import Message
from nexus.ai.v1 import ai_pb2 as pb
from nexus.common.v1 import common_pb2
from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, Integer, String, Text, Uuid, and_, case, cast, func, literal, literal_column, or_, select, true, union_all
from sqlalchemy.orm import Mapped, Session, mapped_column
from sqlalchemy.sql.elements import ColumnElement

from db import errors
from db.base import Base, ResourceMixin, json_object, one_of, timestamp, utcnow
from db.domains.identity import User  # noqa: F401 - the users table the foreign key names
from db.engine import paging
from db.engine.call import Call
from db.engine.codecs import DurationCodec, FieldCodec, MoneyPartsCodec, SizeLimit, TimestampCodec, set_duration
from db.engine.resource import REGISTRY, ResourceSpec
from db.engine.rules import NO_ROW, Access, mine, predicate

# ---------------------------------------------------------------- tables

STATUSES = ("succeeded", "failed", "timed_out")
# The statuses a summary counts as errors.
ERROR_STATUSES = ("failed", "timed_out")
# Creates one BatchCreateAIInteractions takes at most.
BATCH_LIMIT = 10_000


class AIInteraction(ResourceMixin, Base):
    __tablename__ = "ai_interactions"
    __table_args__ = (
        one_of("status", STATUSES),
        CheckConstraint("prompt_tokens >= 0 AND completion_tokens >= 0 AND total_tokens = prompt_tokens + completion_tokens", name="tokens_valid"),
        CheckConstraint("cost_units IS NULL OR (cost_units >= 0 AND cost_nanos >= 0 AND cost_nanos < 1000000000 AND cost_currency IS NOT NULL)", name="cost_valid"),
        CheckConstraint("latency_nanos IS NULL OR latency_nanos >= 0", name="latency_valid"),
        Index("ix_ai_interactions_create_time_id", "create_time", "id"),
        # The summary's range (an admin's, over everyone) and a user's (their own rows).
        Index("ix_ai_interactions_request_time", "request_time"),
        Index("ix_ai_interactions_user_id_request_time", "user_id", "request_time"),
    )

    # Cleared (the record kept for admins' sums) if the user is deleted for good.
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, ForeignKey("users.id", ondelete="SET NULL"))
    module: Mapped[str] = mapped_column(String(255), nullable=False)
    model: Mapped[str] = mapped_column(String(255), nullable=False)
    prompt: Mapped[str | None] = mapped_column(Text)
    response: Mapped[str | None] = mapped_column(Text)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    total_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    # Money as integers (MoneyPartsCodec): sums in SQL are exact on SQLite too.
    cost_units: Mapped[int | None] = mapped_column(BigInteger)
    cost_nanos: Mapped[int | None] = mapped_column(Integer)
    cost_currency: Mapped[str | None] = mapped_column(String(3))
    latency_nanos: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default="succeeded")
    error: Mapped[str | None] = mapped_column(Text)
    request_metadata: Mapped[json_object]
    # When the call was made: the creation time unless the writer says (the same instant).
    request_time: Mapped[timestamp] = mapped_column(default=utcnow)


# ---------------------------------------------------------------- codecs


# The most tokens one call may count (a thousand times the largest context of any model): the
# summary's sums of billions of such rows stay within 64 bits, on both databases.
MAX_TOKENS = 10**9


class TokenCountCodec(FieldCodec):
    """A count of tokens: an int64 that is not negative."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.attr: str = name

    def present(self, msg: Message) -> bool:
        return getattr(msg, self.name) != 0

    def load(self, msg: Message) -> dict[str, Any]:
        value = getattr(msg, self.name)
        if value < 0:
            raise errors.InvalidArgument.field(self.name, f"must not be negative (got {value})")
        if value > MAX_TOKENS:
            raise errors.InvalidArgument.field(self.name, f"must be at most {MAX_TOKENS:,} (got {value})")
        return {self.attr: value}

    def dump(self, row: Any, msg: Message) -> None:
        value = getattr(row, self.attr)
        if value:
            setattr(msg, self.name, value)


class TotalTokensCodec(TokenCountCodec):
    """total_tokens: prompt_tokens + completion_tokens, computed when unset (so always loaded),
    INVALID_ARGUMENT naming it when it is set to another number."""

    def present(self, msg: Message) -> bool:
        return True

    def load(self, msg: Message) -> dict[str, Any]:
        given = getattr(msg, self.name)
        # Their own codecs refuse negatives and counts past MAX_TOKENS (named as theirs).
        parts = sum(min(max(getattr(msg, name), 0), MAX_TOKENS) for name in ("prompt_tokens", "completion_tokens"))
        if given and given != parts:
            raise errors.InvalidArgument.field(
                self.name, f"must be prompt_tokens + completion_tokens ({parts}), or unset to be computed (got {given})"
            )
        return {self.attr: parts}


# ---------------------------------------------------------------- resources

AI_INTERACTIONS = REGISTRY.add(
    ResourceSpec(
        name="AIInteraction",
        plural="AIInteractions",
        model=AIInteraction,
        message=pb.AIInteraction,
        singular_field="ai_interaction",
        required=frozenset({"module", "model"}),
        immutable=frozenset({"user_id"}),
        extra_codecs={
            "prompt_tokens": TokenCountCodec("prompt_tokens"),
            "completion_tokens": TokenCountCodec("completion_tokens"),
            "total_tokens": TotalTokensCodec("total_tokens"),
            # At most a billion units a call, as MAX_TOKENS: sums of billions of rows fit 64 bits.
            "cost": MoneyPartsCodec("cost", "cost_units", "cost_nanos", "cost_currency", max_units=10**9),
            "latency": DurationCodec("latency", "latency_nanos"),
        },
        references={"user_id": "User"},
        orderable=("create_time", "update_time", "request_time", "model", "module"),
        search_fields=(("prompt", "A"), ("response", "B")),
        batch_create=True,
        batch_create_limit=BATCH_LIMIT,
        batch_get=True,
        update_rpc=False,
        owner_field="user_id",
        # What went wrong, in a few lines: prompt, response and request_metadata at their limits
        # (64 Ki characters, 64 KiB) leave room below the 1 MiB every message stays within.
        size_limits={"error": SizeLimit(chars=4096)},
        access=Access(
            read=mine(AIInteraction.user_id, "their own"),
            manage=mine(AIInteraction.user_id, "their own"),
            delete=NO_ROW,
        ),
    )
)


# ---------------------------------------------------------------- the usage summary

# UsageGrouping -> the column it groups by.
GROUPINGS = {pb.USAGE_GROUPING_MODEL: "model", pb.USAGE_GROUPING_MODULE: "module", pb.USAGE_GROUPING_USER: "user_id"}
_BOUNDS = {name: TimestampCodec(pb.GetAIUsageSummaryRequest.DESCRIPTOR.fields_by_name[name], name) for name in ("start_time", "end_time")}


def _range(request: pb.GetAIUsageSummaryRequest) -> tuple[dt.datetime, dt.datetime]:
    """[start_time, end_time), both required, end after start."""
    bounds = []
    for name in ("start_time", "end_time"):
        if not request.HasField(name):
            raise errors.InvalidArgument.field(name, "is required", reason="REQUIRED_FIELD")
        bounds.append(_BOUNDS[name].load(request)[name])
    start, end = bounds
    if end <= start:
        raise errors.InvalidArgument.field("end_time", "must be after start_time")
    return start, end


def _groupings(request: pb.GetAIUsageSummaryRequest) -> list[str]:
    """The grouped columns, in the order asked; each once, none UNSPECIFIED."""
    names: list[str] = []
    for i, grouping in enumerate(request.group_by):
        name = GROUPINGS.get(grouping)
        if name is None:
            raise errors.InvalidArgument.field(f"group_by[{i}]", "must be MODEL, MODULE or USER")
        if name in names:
            raise errors.InvalidArgument.field(f"group_by[{i}]", f"groups by {pb.UsageGrouping.Name(grouping)} a second time")
        names.append(name)
    return names


def usage_summary(session: Session, request: pb.GetAIUsageSummaryRequest, call: Call) -> pb.GetAIUsageSummaryResponse:
    """The interactions of [start_time, end_time) the caller may see (its read rule) and the
    filter picks, grouped by the asked columns and the currency of their cost, summed in SQL:
    counts, errors, tokens, exact cost (integer sums), latency percentiles by nearest rank (the
    smallest latency at least p% of the group's latencies do not exceed). Groups in key order,
    keyset pages; total_size counts all groups.

    Two statements in one snapshot, the same on both databases: the first sums each (group,
    latency bucket) in one hash aggregate (LATENCY_BUCKETS), folds them into the groups, takes
    the page, and finds for each group of the page the bucket holding rank ceil(n / 2) and the
    one holding ceil(95 n / 100), with the count before each; the second reads only the rows of
    those groups' buckets and takes the (rank - count before)-th latency of each in order. No
    sort of every row, and each answer is a latency that was written."""
    start, end = _range(request)
    grouped = _groupings(request)
    size = paging.page_size(request.page_size)
    postgres = call.dialect == "postgresql"
    t = AIInteraction.__table__

    conditions: list[ColumnElement[bool]] = [t.c.request_time >= start, t.c.request_time < end]
    narrowed = AI_INTERACTIONS.filter_compiler(call.dialect).compile(request.filter)
    if narrowed is not None:
        conditions.append(narrowed)
    allowed = predicate(AI_INTERACTIONS, write=False)
    if allowed is not None:
        conditions.append(allowed)

    # The rows are grouped on their raw columns (cheapest to hash); the keys the answer orders
    # and pages by are made of those sums' few rows: never NULL ('' for no user, no cost), so
    # that they order and compare alike on both databases.
    raw = {name: t.c[name] for name in grouped}
    raw["currency"] = t.c.cost_currency
    key_names = [*grouped, "currency"]
    bits = BUCKET_BITS[len(grouped)]
    bucket = latency_bucket(t.c.latency_nanos, bits)
    hist = select(
        *(column.label(name) for name, column in raw.items()),
        bucket.label("bucket"),
        func.count().label("call_count"),
        func.count(t.c.latency_nanos).label("timed"),
        func.sum(case((t.c.status.in_(ERROR_STATUSES), 1), else_=0)).label("error_count"),
        func.sum(t.c.prompt_tokens).label("prompt_tokens"),
        func.sum(t.c.completion_tokens).label("completion_tokens"),
        func.sum(t.c.cost_units).label("cost_units"),
        func.sum(t.c.cost_nanos).label("cost_nanos"),
    ).where(*conditions).group_by(*raw.values(), bucket).cte("histogram")

    def key_of(source: Any, name: str) -> Any:
        if name == "user_id":
            return func.coalesce(cast(source.c.user_id, String), "")
        if name == "currency":
            return func.coalesce(source.c.currency, "")
        return source.c[name]

    hist_keys = [key_of(hist, name) for name in key_names]
    groups = select(
        *(key.label(name) for key, name in zip(hist_keys, key_names, strict=True)),
        # Counts summed stay integers (PostgreSQL's sum of a bigint is a numeric): the ranks are
        # integer divisions of them.
        *(cast(func.sum(hist.c[name]), BigInteger).label(name) for name in ("call_count", "error_count", "timed")),
        *(func.sum(hist.c[name]).label(name) for name in ("prompt_tokens", "completion_tokens", "cost_units", "cost_nanos")),
    ).group_by(*hist_keys).cte("groups")

    def ordered(column: Any) -> Any:
        return column.collate("C") if postgres else column  # byte order, as SQLite's BINARY

    fp = paging.fingerprint("AIUsageSummary", start.isoformat(), end.isoformat(), key_names, request.filter)
    page_rows = select(*groups.c, select(func.count()).select_from(groups).scalar_subquery().label("total"))
    if request.page_token:
        after = paging.decode_token(request.page_token, fp, len(key_names))["k"]
        if not all(isinstance(v, str) for v in after):
            raise errors.InvalidArgument.field("page_token", "is not a page token this query issued", reason="INVALID_PAGE_TOKEN")
        page_rows = page_rows.where(_after([ordered(groups.c[name]) for name in key_names], after))
    page = page_rows.order_by(*(ordered(groups.c[name]) for name in key_names)).limit(size + 1).cte("page")

    # Each page group's buckets in order, with the count of its latencies up to each; the
    # bucket of rank r is the first whose count reaches r, the count before it the largest
    # below r (the counts grow with the bucket).
    ranks = {"p50": (page.c.timed + 1) // 2, "p95": (page.c.timed * 95 + 99) // 100}
    upto = func.sum(hist.c.timed).over(partition_by=[page.c[name] for name in key_names], order_by=hist.c.bucket)
    cumulative = (
        select(*(page.c[name] for name in key_names), hist.c.bucket, upto.label("upto"), *(rank.label(f"rank_{p}") for p, rank in ranks.items()))
        .select_from(page.join(hist, and_(*(page.c[name] == key for name, key in zip(key_names, hist_keys, strict=True)))))
        .where(hist.c.bucket.is_not(None))
        .cte("cumulative")
    )
    c = cumulative.c
    targets = select(
        *(c[name] for name in key_names),
        *(func.min(case((c.upto >= c[f"rank_{p}"], c.bucket))).label(f"bucket_{p}") for p in ranks),
        *(func.coalesce(func.max(case((c.upto < c[f"rank_{p}"], c.upto))), 0).label(f"before_{p}") for p in ranks),
        *(func.min(c[f"rank_{p}"]).label(f"rank_{p}") for p in ranks),
    ).group_by(*(c[name] for name in key_names)).cte("targets")
    stmt = (
        select(*page.c, *(targets.c[f"{what}_{p}"] for p in ranks for what in ("bucket", "before", "rank")))
        .select_from(page.outerjoin(targets, and_(*(page.c[name] == targets.c[name] for name in key_names))))
        .order_by(*(ordered(page.c[name]) for name in key_names))
    )

    conn = session.connection()
    with _snapshot(conn, postgres):
        rows = conn.execute(stmt).all()
        if not rows and request.page_token:
            total = conn.execute(select(func.count()).select_from(groups)).scalar_one()
        else:
            total = rows[0].total if rows else 0
        rows = rows[: size + 1]
        latencies = _ranked_latencies(conn, conditions, key_names, rows[:size], bits)

    response = pb.GetAIUsageSummaryResponse(total_size=total)
    for i, row in enumerate(rows[:size]):
        response.groups.append(_group(row, grouped, latencies.get((i, "p50")), latencies.get((i, "p95"))))
    if len(rows) > size:
        last = rows[size - 1]
        response.next_page_token = paging.encode_token(fp, after=[getattr(last, name) for name in key_names])
    return response


# ---------------------------------------------------------------- latency buckets

# Latencies (integer nanoseconds, 0 to 2**63 - 1) are counted in buckets on a log scale of
# integers: below 2**(bits + 1) each value is its own bucket; above, each power of two is
# cut into 2**bits buckets of equal width (so a bucket spans at most 1/2**bits of its values).
# Buckets grow with the latency, so the bucket holding a rank is found from counts
# alone. No float anywhere: the buckets are shifts and comparisons of integers, alike on both
# databases, and only choose which rows the exact pick reads.
#
# BUCKET_BITS by the number of grouped columns: fine buckets where groups are few and large (the
# rows the exact pick reads are few), coarse where they are many and small (the aggregate keeps
# one entry per group and bucket). Only speed depends on it, never the answer. PostgreSQL cannot
# guess how many buckets there are: migration 0014 gives it statistics on each of these
# expressions (without them it plans a sort of every row); a change here needs a new migration.
BUCKET_BITS = {0: 6, 1: 6, 2: 3, 3: 2}
_LARGEST_POWER = 62  # of a bigint that is not negative


def latency_bucket(x: Any, bits: int) -> Any:
    """The bucket of x (an integer column) as SQL: which power of two x is in, by a binary search
    of CASEs (six comparisons), then its top `bits` bits below the leading one."""
    m = bits

    def number(value: int) -> Any:
        return literal_column(str(value), BigInteger)

    def leaf(e: int) -> Any:  # 2**e <= x < 2**(e + 1), e > m
        return number((e - m) << m) + x.op(">>")(number(e - m))

    def search(low: int, high: int) -> Any:  # the power is in [low, high]; low == m means x < 2**(m + 1)
        if low == high:
            return x if low == m else leaf(low)
        mid = (low + high + 1) // 2
        return case((x < number(1 << mid), search(low, mid - 1)), else_=search(mid, high))

    return search(m, _LARGEST_POWER)


def bucket_range(bucket: int, bits: int) -> tuple[int, int]:
    """The latencies [low, high) of a bucket: the inverse of latency_bucket."""
    m = bits
    if bucket < 1 << (m + 1):
        return bucket, bucket + 1
    shift = (bucket >> m) - 1  # the power of two less m
    low = (bucket - (shift << m)) << shift
    return low, low + (1 << shift)


@contextlib.contextmanager
def _snapshot(conn: Any, postgres: bool) -> Iterator[None]:
    """The two statements of a summary see the same rows (the ranks of the first are counts
    the second reads). PostgreSQL: a REPEATABLE READ transaction on the autocommit read
    connection, and for it alone no JIT (its compile costs a tenth of the summary and saves
    nothing over a million rows of hash aggregate) and work_mem enough for the aggregate to
    stay in memory. SQLite: a read transaction (WAL: one snapshot)."""
    if postgres:
        conn.exec_driver_sql("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        conn.exec_driver_sql("SET LOCAL jit = off")
        conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
    else:
        conn.exec_driver_sql("BEGIN")
    try:
        yield
    except BaseException:
        conn.exec_driver_sql("ROLLBACK")
        raise
    conn.exec_driver_sql("COMMIT")


def _ranked_latencies(conn: Any, conditions: list[ColumnElement[bool]], key_names: list[str], rows: Sequence[Any], bits: int) -> dict[tuple[int, str], int]:
    """The exact latency of each (page row, percentile): the (rank - count before)-th in order
    of the rows of that group whose latency is in the bucket its first statement found."""
    t = AIInteraction.__table__
    wanted = []
    for i, row in enumerate(rows):
        for p in ("p50", "p95"):
            bucket = getattr(row, f"bucket_{p}")
            if bucket is not None:
                low, high = bucket_range(int(bucket), bits)
                wanted.append((i, p, [getattr(row, name) for name in key_names], low, high, int(getattr(row, f"rank_{p}")) - int(getattr(row, f"before_{p}"))))
    if not wanted:
        return {}
    targets = union_all(*(
        select(
            literal(n, Integer).label("target"),
            *(literal(value, String).label(name) for name, value in zip(key_names, keys, strict=True)),
            literal(low, BigInteger).label("low"), literal(high, BigInteger).label("high"), literal(k, BigInteger).label("k"),
        )
        for n, (_, _, keys, low, high, k) in enumerate(wanted)
    )).cte("targets")
    # Only the rows in the buckets' latency ranges (merged where they meet) reach the join.
    spans: list[list[int]] = []
    for low, high in sorted({(w[3], w[4]) for w in wanted}):
        if spans and low <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], high)
        else:
            spans.append([low, high])
    latency = t.c.latency_nanos
    in_spans = or_(*(and_(latency >= low, latency < high) for low, high in spans))

    def key_of(name: str) -> Any:
        if name == "user_id":
            return func.coalesce(cast(t.c.user_id, String), "")
        if name == "currency":
            return func.coalesce(t.c.cost_currency, "")
        return t.c[name]

    picked = (
        select(targets.c.target, targets.c.k, latency, func.row_number().over(partition_by=targets.c.target, order_by=latency).label("n"))
        .select_from(t.join(targets, and_(*(key_of(name) == targets.c[name] for name in key_names), latency >= targets.c.low, latency < targets.c.high)))
        .where(*conditions, in_spans)
        .subquery()
    )
    found = conn.execute(select(picked.c.target, picked.c.latency_nanos).where(picked.c.n == picked.c.k)).all()
    return {(wanted[n][0], wanted[n][1]): value for n, value in found}


def _after(keys: list[Any], values: list[Any]) -> ColumnElement[bool]:
    """Rows whose keys come after values in order (keys never NULL)."""
    clauses = []
    for i, key in enumerate(keys):
        clauses.append(and_(*(keys[j] == values[j] for j in range(i)), key > values[i]) if i else key > values[i])
    return or_(*clauses) if clauses else true()


def _group(row: Any, grouped: list[str], p50: int | None, p95: int | None) -> pb.UsageGroup:
    group = pb.UsageGroup(
        call_count=int(row.call_count),
        error_count=int(row.error_count or 0),
        prompt_tokens=int(row.prompt_tokens or 0),
        completion_tokens=int(row.completion_tokens or 0),
        # total_tokens = prompt_tokens + completion_tokens in every row (tokens_valid).
        total_tokens=int(row.prompt_tokens or 0) + int(row.completion_tokens or 0),
    )
    if "model" in grouped:
        group.model = row.model
    if "module" in grouped:
        group.module = row.module
    if "user_id" in grouped and row.user_id:
        group.user_id = str(uuid.UUID(row.user_id))
    if row.currency:
        nanos = int(row.cost_units or 0) * 1_000_000_000 + int(row.cost_nanos or 0)
        group.cost.CopyFrom(common_pb2.Money(currency_code=row.currency, units=nanos // 1_000_000_000, nanos=nanos % 1_000_000_000))
    if p50 is not None and p95 is not None:
        set_duration(group.latency_p50, p50)
        set_duration(group.latency_p95, p95)
    return group


# The resources of this module, served by service/ai.py.
RESOURCES: tuple[ResourceSpec, ...] = (AI_INTERACTIONS,)
