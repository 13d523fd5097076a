"""AI usage: AIInteraction (one call to a model, recorded by the service that made it, mostly in
bulk) and the usage summary over them (GetAIUsageSummary).

An interaction is a record: written once (Create, BatchCreate of up to 10,000), never updated,
removed for good by admins only. Its cost is kept as integers (units, nanos, currency) and its
latency as integer nanoseconds, so that the summary's sums are exact and its percentiles are
values that were written, on both databases."""
from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from google.protobuf.message import Message
from nexus.ai.v1 import ai_pb2 as pb
from nexus.common.v1 import common_pb2
from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, Integer, String, Text, Uuid, and_, case, cast, func, or_, select, true
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


class TokenCountCodec(FieldCodec):
    """A count of tokens: an int64 that is not negative."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.attr = name

    def present(self, msg: Message) -> bool:
        return getattr(msg, self.name) != 0

    def load(self, msg: Message) -> dict[str, Any]:
        value = getattr(msg, self.name)
        if value < 0:
            raise errors.InvalidArgument.field(self.name, f"must not be negative (got {value})")
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
        parts = max(msg.prompt_tokens, 0) + max(msg.completion_tokens, 0)  # pb: their own codecs refuse negatives
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
            "cost": MoneyPartsCodec("cost", "cost_units", "cost_nanos", "cost_currency"),
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
    keyset pages; total_size counts all groups."""
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

    # The keys: each grouped column, then the currency; never NULL ('' for no user, no cost),
    # so that they order and compare alike on both databases.
    def key_expression(name: str) -> Any:
        if name == "user_id":
            return func.coalesce(cast(t.c.user_id, String), "")
        return t.c[name]

    key_names = [*grouped, "currency"]
    keys = [key_expression(name).label(name) for name in grouped]
    keys.append(func.coalesce(t.c.cost_currency, "").label("currency"))
    base = select(
        *keys,
        case((t.c.status.in_(ERROR_STATUSES), 1), else_=0).label("is_error"),
        t.c.prompt_tokens, t.c.completion_tokens, t.c.total_tokens,
        t.c.cost_units, t.c.cost_nanos, t.c.latency_nanos,
    ).where(*conditions).cte("base")
    base_keys = [base.c[name] for name in key_names]
    sums = [
        func.count().label("call_count"),
        func.sum(base.c.is_error).label("error_count"),
        func.sum(base.c.prompt_tokens).label("prompt_tokens"),
        func.sum(base.c.completion_tokens).label("completion_tokens"),
        func.sum(base.c.total_tokens).label("total_tokens"),
        func.sum(base.c.cost_units).label("cost_units"),
        func.sum(base.c.cost_nanos).label("cost_nanos"),
    ]
    if postgres:
        percentiles = [
            func.percentile_disc(0.5).within_group(base.c.latency_nanos).label("p50"),
            func.percentile_disc(0.95).within_group(base.c.latency_nanos).label("p95"),
        ]
        groups = select(*base_keys, *sums, *percentiles).group_by(*base_keys).cte("groups")
        columns = [*groups.c]
        source: Any = groups
    else:
        # Nearest rank with window functions: the value at rank ceil(p * n) of the group's
        # latencies in order (ceil(n / 2), ceil(95 n / 100) in integers), as percentile_disc.
        rank = func.row_number().over(partition_by=base_keys, order_by=base.c.latency_nanos)
        count = func.count().over(partition_by=base_keys)
        ranked = select(*base_keys, base.c.latency_nanos, rank.label("rn"), count.label("n")).where(base.c.latency_nanos.is_not(None)).cte("ranked")
        pcts = select(
            *(ranked.c[name] for name in key_names),
            func.min(case((ranked.c.rn >= (ranked.c.n + 1) // 2, ranked.c.latency_nanos))).label("p50"),
            func.min(case((ranked.c.rn >= (ranked.c.n * 95 + 99) // 100, ranked.c.latency_nanos))).label("p95"),
        ).group_by(*(ranked.c[name] for name in key_names)).cte("percentiles")
        summed = select(*base_keys, *sums).group_by(*base_keys).cte("groups")
        joined = summed.outerjoin(pcts, and_(*(summed.c[name] == pcts.c[name] for name in key_names)))
        columns = [*summed.c, pcts.c.p50, pcts.c.p95]
        source = joined
        groups = summed

    def ordered(name: str) -> Any:
        column = groups.c[name]
        return column.collate("C") if postgres else column  # byte order, as SQLite's BINARY

    fp = paging.fingerprint("AIUsageSummary", start.isoformat(), end.isoformat(), key_names, request.filter)
    stmt = select(*columns, select(func.count()).select_from(groups).scalar_subquery().label("total")).select_from(source)
    if request.page_token:
        after = paging.decode_token(request.page_token, fp, len(key_names))["k"]
        if not all(isinstance(v, str) for v in after):
            raise errors.InvalidArgument.field("page_token", "is not a page token this query issued", reason="INVALID_PAGE_TOKEN")
        stmt = stmt.where(_after([ordered(name) for name in key_names], after))
    stmt = stmt.order_by(*(ordered(name) for name in key_names)).limit(size + 1)
    rows = session.connection().execute(stmt).all()

    if not rows and request.page_token:
        total = session.connection().execute(select(func.count()).select_from(groups)).scalar_one()
    else:
        total = rows[0].total if rows else 0
    response = pb.GetAIUsageSummaryResponse(total_size=total)
    for row in rows[:size]:
        response.groups.append(_group(row, grouped))
    if len(rows) > size:
        last = rows[size - 1]
        response.next_page_token = paging.encode_token(fp, after=[getattr(last, name) for name in key_names])
    return response


def _after(keys: list[Any], values: list[Any]) -> ColumnElement[bool]:
    """Rows whose keys come after values in order (keys never NULL)."""
    clauses = []
    for i, key in enumerate(keys):
        clauses.append(and_(*(keys[j] == values[j] for j in range(i)), key > values[i]) if i else key > values[i])
    return or_(*clauses) if clauses else true()


def _group(row: Any, grouped: list[str]) -> pb.UsageGroup:
    group = pb.UsageGroup(
        call_count=row.call_count,
        error_count=int(row.error_count or 0),
        prompt_tokens=int(row.prompt_tokens or 0),
        completion_tokens=int(row.completion_tokens or 0),
        total_tokens=int(row.total_tokens or 0),
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
    if row.p50 is not None:
        set_duration(group.latency_p50, row.p50)
        set_duration(group.latency_p95, row.p95)
    return group


# The resources of this module, served by service/ai.py.
RESOURCES: tuple[ResourceSpec, ...] = (AI_INTERACTIONS,)
