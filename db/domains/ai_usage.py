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
from sqlalchemy import BigInteger, CheckConstraint, Date, ForeignKey, Index, Integer, String, Text, Uuid, and_, case, cast, column, func, literal, literal_column, or_, select, true, union_all, values
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
        # The summary's walks to a percentile (PERCENTILE_WALKS): a group's latencies in order,
        # the range's bounds and the other grouped columns read from the index alone.
        Index("ix_ai_interactions_latency_by_currency", "cost_currency", "latency_nanos", "request_time"),
        Index("ix_ai_interactions_latency_by_model", "model", "cost_currency", "latency_nanos", "request_time", "module"),
        Index("ix_ai_interactions_latency_by_module", "module", "cost_currency", "latency_nanos", "request_time"),
        Index("ix_ai_interactions_latency_by_user", "user_id", "cost_currency", "latency_nanos", "request_time", "model", "module"),
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


class AIUsageDay(Base):
    """The sums of one UTC day's interactions per (model, module, user, currency), kept by the
    database's own triggers on ai_interactions (usage_days_ddl), in the transaction of every
    insert, update, delete or truncate, whoever writes (the service, COPY, an operator's SQL).
    The summary reads the whole days of its range here.

    PostgreSQL's triggers append one row per key and statement (negative for rows removed):
    writers never wait on each other's rows; the server folds them (fold_usage_days). SQLite's
    (one writer at a time) add to the key's row. A key's sums are those of all its rows."""

    __tablename__ = "ai_usage_days"
    __table_args__ = (
        Index("ix_ai_usage_days_day_keys", "day", "model", "module", "user_key", "currency"),
        Index("ix_ai_usage_days_xact", "xact"),
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    day: Mapped[dt.date] = mapped_column(Date, nullable=False)
    model: Mapped[str] = mapped_column(String(255), nullable=False)
    module: Mapped[str] = mapped_column(String(255), nullable=False)
    # The summary's keys: the user's id as the database writes it as text, '' for none; the
    # currency, '' for no cost.
    user_key: Mapped[str] = mapped_column(String(36), nullable=False)
    currency: Mapped[str] = mapped_column(String(3), nullable=False)
    call_count: Mapped[int] = mapped_column(BigInteger, nullable=False)
    timed: Mapped[int] = mapped_column(BigInteger, nullable=False)
    error_count: Mapped[int] = mapped_column(BigInteger, nullable=False)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cost_units: Mapped[int] = mapped_column(BigInteger, nullable=False)
    cost_nanos: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # PostgreSQL: the transaction that appended the row (its default there), which
    # fold_usage_days picks the days to fold by. SQLite: none.
    xact: Mapped[int | None] = mapped_column(BigInteger)


SUMS = ("call_count", "timed", "error_count", "prompt_tokens", "completion_tokens", "cost_units", "cost_nanos")
DAY_KEYS = ("day", "model", "module", "user_key", "currency")
_ERRORS_SQL = ", ".join(f"'{status}'" for status in ERROR_STATUSES)


def _day_sums_sql(dialect: str, source: str, sign: str = "") -> str:
    """SELECT of the ai_usage_days columns (but id) summed from the interactions of source."""
    day, user = (
        ("(request_time AT TIME ZONE 'UTC')::date", "user_id::text") if dialect == "postgresql" else ("substr(request_time, 1, 10)", "user_id")
    )
    return (
        f"SELECT {day}, model, module, coalesce({user}, ''), coalesce(cost_currency, ''), "
        f"{sign}count(*), {sign}count(latency_nanos), {sign}count(*) FILTER (WHERE status IN ({_ERRORS_SQL})), "
        f"{sign}coalesce(sum(prompt_tokens), 0), {sign}coalesce(sum(completion_tokens), 0), "
        f"{sign}coalesce(sum(cost_units), 0), {sign}coalesce(sum(cost_nanos), 0) "
        f"FROM {source} GROUP BY 1, 2, 3, 4, 5"
    )


def _sqlite_add_row(row: str, sign: str) -> str:
    """SQLite trigger statements adding (sign '') or taking away (sign '-') the interaction row
    (NEW or OLD) to its key's row of ai_usage_days, made if missing."""
    keys = f"day = substr({row}.request_time, 1, 10) AND model = {row}.model AND module = {row}.module AND user_key = coalesce({row}.user_id, '') AND currency = coalesce({row}.cost_currency, '')"
    values = {
        "call_count": "1",
        "timed": f"({row}.latency_nanos IS NOT NULL)",
        "error_count": f"({row}.status IN ({_ERRORS_SQL}))",
        "prompt_tokens": f"{row}.prompt_tokens",
        "completion_tokens": f"{row}.completion_tokens",
        "cost_units": f"coalesce({row}.cost_units, 0)",
        "cost_nanos": f"coalesce({row}.cost_nanos, 0)",
    }
    op = "-" if sign else "+"
    assignments = ", ".join(f"{name} = {name} {op} {value}" for name, value in values.items())
    inserted = ", ".join(f"{sign}{value}" for value in values.values())
    return (
        f"UPDATE ai_usage_days SET {assignments} WHERE {keys}; "
        f"INSERT INTO ai_usage_days ({', '.join(DAY_KEYS + SUMS)}) "
        f"SELECT substr({row}.request_time, 1, 10), {row}.model, {row}.module, coalesce({row}.user_id, ''), coalesce({row}.cost_currency, ''), {inserted} "
        f"WHERE NOT EXISTS (SELECT 1 FROM ai_usage_days WHERE {keys}); "
    )


# The interaction columns the sums read: an update of any other leaves them as they are.
_SUMMED_COLUMNS = "request_time, model, module, user_id, cost_currency, latency_nanos, status, prompt_tokens, completion_tokens, cost_units, cost_nanos"


def usage_days_ddl(dialect: str) -> list[str]:
    """The triggers that keep ai_usage_days, and the statement that fills it from the
    interactions already written (run once, when the table is made)."""
    columns = ", ".join(DAY_KEYS + SUMS)
    fill = f"INSERT INTO ai_usage_days ({columns}) {_day_sums_sql(dialect, 'ai_interactions')}"
    if dialect == "postgresql":
        return [
            "CREATE FUNCTION ai_usage_days_count() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "IF TG_OP = 'TRUNCATE' THEN TRUNCATE ai_usage_days; RETURN NULL; END IF; "
            f"IF TG_OP IN ('UPDATE', 'DELETE') THEN INSERT INTO ai_usage_days ({columns}) {_day_sums_sql(dialect, 'old_rows', '-')}; END IF; "
            f"IF TG_OP IN ('UPDATE', 'INSERT') THEN INSERT INTO ai_usage_days ({columns}) {_day_sums_sql(dialect, 'new_rows')}; END IF; "
            "RETURN NULL; END $$",
            "CREATE TRIGGER ai_usage_days_insert AFTER INSERT ON ai_interactions REFERENCING NEW TABLE AS new_rows "
            "FOR EACH STATEMENT EXECUTE FUNCTION ai_usage_days_count()",
            "CREATE TRIGGER ai_usage_days_update AFTER UPDATE ON ai_interactions REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
            "FOR EACH STATEMENT EXECUTE FUNCTION ai_usage_days_count()",
            "CREATE TRIGGER ai_usage_days_delete AFTER DELETE ON ai_interactions REFERENCING OLD TABLE AS old_rows "
            "FOR EACH STATEMENT EXECUTE FUNCTION ai_usage_days_count()",
            "CREATE TRIGGER ai_usage_days_truncate AFTER TRUNCATE ON ai_interactions FOR EACH STATEMENT EXECUTE FUNCTION ai_usage_days_count()",
            fill,
        ]
    return [
        f"CREATE TRIGGER ai_usage_days_insert AFTER INSERT ON ai_interactions BEGIN {_sqlite_add_row('NEW', '')}END",
        f"CREATE TRIGGER ai_usage_days_update AFTER UPDATE OF {_SUMMED_COLUMNS} ON ai_interactions BEGIN "
        f"{_sqlite_add_row('OLD', '-')}{_sqlite_add_row('NEW', '')}END",
        f"CREATE TRIGGER ai_usage_days_delete AFTER DELETE ON ai_interactions BEGIN {_sqlite_add_row('OLD', '-')}END",
        fill,
    ]


def usage_days_drop(dialect: str) -> list[str]:
    """usage_days_ddl undone (the table is the migration's)."""
    drops = [f"DROP TRIGGER IF EXISTS ai_usage_days_{what}" + (" ON ai_interactions" if dialect == "postgresql" else "") for what in ("insert", "update", "delete", "truncate")]
    return drops + (["DROP FUNCTION IF EXISTS ai_usage_days_count()"] if dialect == "postgresql" else [])


def fold_usage_days(conn: Any, after: int) -> tuple[int, int]:
    """PostgreSQL: fold into one row per key the days that got rows from transactions numbered
    after or later (each row's xact, the transaction that appended it), in one statement per
    call: a row its writer has not committed yet is not deleted. Returns (days folded, the
    number to pass next time): the oldest transaction still running as this fold began, so a
    writer that commits later, whatever ids it took, is among the next fold's. SQLite keeps
    one row per key already: nothing to do."""
    if conn.dialect.name != "postgresql":
        return 0, after
    running = int(conn.exec_driver_sql("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").scalar_one())
    d = AIUsageDay.__table__
    days = conn.execute(
        select(d.c.day).where(d.c.day.in_(select(d.c.day).where(d.c.xact >= after).distinct()))
        .group_by(d.c.day).having(func.count() > func.count(func.distinct(func.row(*(d.c[k] for k in DAY_KEYS[1:])))))
    ).scalars().all()
    if days:
        columns = ", ".join(DAY_KEYS + SUMS)
        summed = ", ".join(f"sum({name})" for name in SUMS)
        conn.exec_driver_sql(
            f"WITH gone AS (DELETE FROM ai_usage_days WHERE day = ANY(%(days)s) RETURNING {columns}) "
            f"INSERT INTO ai_usage_days ({columns}) SELECT {', '.join(DAY_KEYS)}, {summed} FROM gone "
            f"GROUP BY {', '.join(DAY_KEYS)} HAVING sum(call_count) <> 0",
            {"days": list(days)},
        )
    return len(days), running


def rebuild_usage_days(conn: Any) -> int:
    """ai_usage_days made afresh from the interactions (after SQL that went around the
    triggers: SQLite's INSERT OR REPLACE without recursive_triggers, triggers disabled, a
    restore of one table); the number of rows it then holds. The first statement of its
    transaction: on PostgreSQL it makes it REPEATABLE READ, so that the rows it deletes and the
    interactions it sums are of one snapshot while writers go on (a writer that commits later
    appended rows it does not delete, for interactions it does not sum)."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    conn.exec_driver_sql("DELETE FROM ai_usage_days")
    conn.exec_driver_sql(f"INSERT INTO ai_usage_days ({', '.join(DAY_KEYS + SUMS)}) {_day_sums_sql(conn.dialect.name, 'ai_interactions')}")
    return int(conn.exec_driver_sql("SELECT count(*) FROM ai_usage_days").scalar_one())


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


def usage_summary(session: Session, request: pb.GetAIUsageSummaryRequest, call: Call, path: str | None = None) -> pb.GetAIUsageSummaryResponse:
    """The interactions of [start_time, end_time) the caller may see (its read rule) and the
    filter picks, grouped by the asked columns and the currency of their cost, summed in SQL:
    counts, errors, tokens, exact cost (integer sums), latency percentiles by nearest rank (the
    smallest latency at least p% of the group's latencies do not exceed). Groups in key order,
    keyset pages; total_size counts all groups.

    Two ways to the same answer, in one snapshot, chosen by summary_path (path forces one):
    - "walk": the sums of the range's whole days from ai_usage_days and of its partial days
      from their rows; then each page group's percentiles by a walk of an index holding its
      latencies in order (_picked_latencies). Its cost follows the groups and the days, not
      the rows, but a walk reads the group's rows of every day: for ranges that hold much of
      the table, and callers who see every row without a filter.
    - "plain": one pass over the range's rows (_plain_groups: sums and latency buckets in one
      hash aggregate), then walks within the buckets found (_picked_latencies)."""
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
    key_names = [*grouped, "currency"]

    conn = session.connection()
    with _snapshot(conn, postgres):
        if path is None:
            path = summary_path(conn, start, end, narrowed is None and allowed is None)
        if path == "walk":
            groups, hist, bits = _walk_groups(start, end, grouped), None, 0  # bits: unused
        else:
            bits = BUCKET_BITS[len(grouped)]
            groups, hist = _plain_groups(conditions, grouped, bits)

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
        stmt: Any = select(*page.c)
        if hist is not None:
            stmt = _with_bucket_targets(page, hist, key_names)

        rows = conn.execute(stmt.order_by(*(ordered(page.c[name]) for name in key_names))).all()
        if not rows and request.page_token:
            total = conn.execute(select(func.count()).select_from(groups)).scalar_one()
        else:
            total = rows[0].total if rows else 0
        rows = rows[: size + 1]
        latencies = _picked_latencies(conn, conditions, grouped, rows[:size], None if path == "walk" else bits)

    response = pb.GetAIUsageSummaryResponse(total_size=total)
    for i, row in enumerate(rows[:size]):
        response.groups.append(_group(row, grouped, latencies.get((i, "p50")), latencies.get((i, "p95"))))
    if len(rows) > size:
        last = rows[size - 1]
        response.next_page_token = paging.encode_token(fp, after=[getattr(last, name) for name in key_names])
    return response


# A walk reads its group's latencies of every day in order (half of them for p50), the pass
# reads the range's rows once but hashes each (about four times the cost of a step of a walk):
# the walk is the cheaper once the range holds about a seventh of the table's rows. Taken from
# a fifth on (bench/ai_usage.py: 7 of 30 days, 0.23, walks in 39-99 ms, passes in 104-256).
WALK_FROM_SHARE = 0.2
# PostgreSQL: a walk reads the index alone only on pages VACUUM marked all-visible; on the
# others it reads the row too, and is then slower than the pass (a fresh bulk load: 4x). Below
# this share of such pages (pg_class.relallvisible, as VACUUM and ANALYZE last saw it) the
# summary takes the pass. Migration 0018 has autovacuum visit the table every 2 % of growth.
WALK_FROM_VISIBLE = 0.8


def summary_path(conn: Any, start: dt.datetime, end: dt.datetime, every_row: bool) -> str:
    """"walk" for a caller who sums every row (no filter, no row rule) over a range whose whole
    days hold at least WALK_FROM_SHARE of the table's rows (ai_usage_days against the table's
    size: PostgreSQL's estimate, pg_class.reltuples scaled to the pages there are now; SQLite's
    largest rowid), on PostgreSQL while at least WALK_FROM_VISIBLE of the table's pages are
    all-visible; else "plain". Only speed
    depends on it: both answer alike (tests/test_ai_usage_days.py)."""
    first, last = _whole_days(start, end)
    if not every_row or first >= last:
        return "plain"
    if conn.dialect.name == "postgresql":
        # relallvisible and reltuples are as the last VACUUM or ANALYZE saw them; the table's
        # pages now are its file's size. After a load since, most pages are not all-visible,
        # and the rows are scaled by the pages as the planner scales them.
        pages, seen_pages, visible, seen_rows = conn.exec_driver_sql(
            "SELECT pg_relation_size(oid) / current_setting('block_size')::int, relpages, relallvisible, reltuples "
            "FROM pg_class WHERE oid = 'ai_interactions'::regclass"
        ).one()
        if visible < WALK_FROM_VISIBLE * max(pages, 1):
            return "plain"
        size = max(float(seen_rows), 0.0) * pages / max(seen_pages, 1)
    else:
        size = conn.exec_driver_sql("SELECT max(rowid) FROM ai_interactions").scalar() or 0
    d = AIUsageDay.__table__
    held = conn.execute(select(func.coalesce(func.sum(d.c.call_count), 0)).where(d.c.day >= first, d.c.day < last)).scalar_one()
    return "walk" if int(held) >= WALK_FROM_SHARE * float(size) else "plain"


def _plain_groups(conditions: list[ColumnElement[bool]], grouped: list[str], bits: int) -> tuple[Any, Any]:
    """The plain path's groups and its histogram: the rows are summed per (group, latency bucket)
    in one hash aggregate (LATENCY_BUCKETS) on their raw columns (cheapest to hash), then folded
    into the groups."""
    t = AIInteraction.__table__
    raw = {name: t.c[name] for name in grouped}
    raw["currency"] = t.c.cost_currency
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
    hist_keys = [_key_of(hist, name) for name in [*grouped, "currency"]]
    groups = select(
        *(key.label(name) for key, name in zip(hist_keys, [*grouped, "currency"], strict=True)),
        # Counts summed stay integers (PostgreSQL's sum of a bigint is a numeric): the ranks are
        # integer divisions of them.
        *(cast(func.sum(hist.c[name]), BigInteger).label(name) for name in ("call_count", "error_count", "timed")),
        *(func.sum(hist.c[name]).label(name) for name in ("prompt_tokens", "completion_tokens", "cost_units", "cost_nanos")),
    ).group_by(*hist_keys).cte("groups")
    return groups, hist


def _key_of(source: Any, name: str) -> Any:
    """The answer's key of a grouped column (or currency) of the rows: never NULL ('' for no
    user, no cost), so that keys order and compare alike on both databases."""
    if name == "user_id":
        return func.coalesce(cast(source.c.user_id, String), "")
    if name == "currency":
        return func.coalesce(source.c.cost_currency if "cost_currency" in source.c else source.c.currency, "")
    return source.c[name]


def _with_bucket_targets(page: Any, hist: Any, key_names: list[str]) -> Any:
    """The page with, for each group, the bucket holding rank ceil(n / 2) and the one holding
    ceil(95 n / 100), with the count before each: each page group's buckets in order, with the
    count of its latencies up to each; the bucket of rank r is the first whose count reaches r,
    the count before it the largest below r (the counts grow with the bucket)."""
    hist_keys = [_key_of(hist, name) for name in key_names]
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
    return select(*page.c, *(targets.c[f"{what}_{p}"] for p in ranks for what in ("bucket", "before", "rank"))).select_from(
        page.outerjoin(targets, and_(*(page.c[name] == targets.c[name] for name in key_names)))
    )


def _whole_days(start: dt.datetime, end: dt.datetime) -> tuple[dt.date, dt.date]:
    """The UTC days [first, last) wholly inside [start, end) (first >= last: none; a start
    after midnight of the last day there is, 9999-12-31, has none)."""
    first, last = start.astimezone(dt.UTC).date(), end.astimezone(dt.UTC).date()
    if dt.datetime.combine(first, dt.time(), dt.UTC) < start:
        if first == dt.date.max:
            return last, last
        first += dt.timedelta(days=1)
    return first, last


def _walk_groups(start: dt.datetime, end: dt.datetime, grouped: list[str]) -> Any:
    """The walk path's groups: the sums of ai_usage_days over the range's whole days and of the
    rows of its partial days (at most one at each end), per group."""
    t, d = AIInteraction.__table__, AIUsageDay.__table__
    first, last = _whole_days(start, end)
    parts = []
    edges = [(start, end)]
    if first < last:
        parts.append(select(d.c.model, d.c.module, d.c.user_key.label("user_id"), d.c.currency, *(d.c[name] for name in SUMS)).where(d.c.day >= first, d.c.day < last))
        edges = [(start, dt.datetime.combine(first, dt.time(), dt.UTC)), (dt.datetime.combine(last, dt.time(), dt.UTC), end)]
    for low, high in edges:
        if low < high:
            parts.append(select(
                t.c.model, t.c.module, _key_of(t, "user_id").label("user_id"), _key_of(t, "currency").label("currency"),
                literal(1, BigInteger).label("call_count"),
                case((t.c.latency_nanos.is_not(None), 1), else_=0).label("timed"),
                case((t.c.status.in_(ERROR_STATUSES), 1), else_=0).label("error_count"),
                t.c.prompt_tokens, t.c.completion_tokens,
                func.coalesce(t.c.cost_units, 0).label("cost_units"), func.coalesce(t.c.cost_nanos, 0).label("cost_nanos"),
            ).where(t.c.request_time >= low, t.c.request_time < high))
    source = union_all(*parts).subquery("days")
    keys = [source.c[name] for name in [*grouped, "currency"]]
    return select(
        *keys,
        *(cast(func.sum(source.c[name]), BigInteger).label(name) for name in ("call_count", "error_count", "timed")),
        *(func.sum(source.c[name]).label(name) for name in ("prompt_tokens", "completion_tokens", "cost_units", "cost_nanos")),
    ).group_by(*keys).having(func.sum(source.c.call_count) > 0).cte("groups")


# The index each walk reads, by the grouped column that leads it (none: currency alone), and the
# index's columns before latency_nanos: the group's rows in latency order, the range and the other
# grouped columns checked in the index. The walk orders by those columns too (each one value in
# it): PostgreSQL infers the index's order from an equality, not from an IS NULL.
PERCENTILE_WALKS = {
    None: ("ix_ai_interactions_latency_by_currency", ("cost_currency",)),
    "model": ("ix_ai_interactions_latency_by_model", ("model", "cost_currency")),
    "module": ("ix_ai_interactions_latency_by_module", ("module", "cost_currency")),
    "user_id": ("ix_ai_interactions_latency_by_user", ("user_id", "cost_currency")),
}


def walk_lead(grouped: list[str]) -> str | None:
    """Which of PERCENTILE_WALKS serves the grouping: the user's (it holds model and module),
    else the model's (it holds module), else the module's, else the currency's."""
    return next((name for name in ("user_id", "model", "module") if name in grouped), None)


_LARGEST_LATENCY = 2**63 - 1


def _picked_latencies(conn: Any, conditions: list[ColumnElement[bool]], grouped: list[str], rows: Sequence[Any], bits: int | None) -> dict[tuple[int, str], int]:
    """The exact latency of each (page row, percentile), by walks of the group's timed rows that
    conditions keep, in latency order, all in one statement:
    - bits None (the walk path): from the smallest to rank ceil(n / 2) for p50; from the
      largest to rank ceil(95 n / 100) for p95 (a short walk from the end it is near);
    - else (the plain path): within the bucket of bits its first statement found, to the
      (rank - count before)-th."""
    walks: list[tuple[int, str, dict[str, str], int, int, int, bool]] = []  # (row, p, keys, low, high, offset, descending)
    for i, row in enumerate(rows):
        timed = int(row.timed)
        if not timed:
            continue
        keys = {name: getattr(row, name) for name in [*grouped, "currency"]}
        for p, rank in (("p50", (timed + 1) // 2), ("p95", (timed * 95 + 99) // 100)):
            if bits is None:
                descending = p == "p95"
                walks.append((i, p, keys, 0, _LARGEST_LATENCY, timed - rank if descending else rank - 1, descending))
                continue
            bucket = getattr(row, f"bucket_{p}")
            if bucket is not None:
                low, high = bucket_range(int(bucket), bits)
                walks.append((i, p, keys, low, high - 1, int(getattr(row, f"rank_{p}")) - int(getattr(row, f"before_{p}")) - 1, False))
    if not walks:
        return {}
    build = _lateral_walks if conn.dialect.name == "postgresql" else _literal_walks
    found = conn.execute(build(conditions, grouped, walks)).all()
    return {walks[target][:2]: value for target, value in found}


def _walk_conditions(grouped: list[str], keys: dict[str, Any], conditions: list[ColumnElement[bool]], low: Any, high: Any) -> tuple[list[Any], list[Any]]:
    """A walk's WHERE (the group's timed rows of [low, high] that conditions keep; '' keys are
    NULLs) and its ascending ORDER BY: the walk index's columns before latency_nanos (each one
    value here), then latency_nanos."""
    t = AIInteraction.__table__
    same = [*conditions, t.c.latency_nanos.is_not(None), t.c.latency_nanos >= low, t.c.latency_nanos <= high]
    for name in [*grouped, "currency"]:
        column = t.c.cost_currency if name == "currency" else t.c[name]
        value = keys[name]
        if isinstance(value, str) and value == "" and name in ("user_id", "currency"):
            same.append(column.is_(None))
        else:
            same.append(column == value)
    leading = [t.c[name] for name in PERCENTILE_WALKS[walk_lead(grouped)][1]]
    return same, [*leading, t.c.latency_nanos]


def _literal_walks(conditions: list[ColumnElement[bool]], grouped: list[str], walks: list[Any]) -> Any:
    """SQLite (a LIMIT or OFFSET may not name an outer column there): one subquery per walk,
    its values literal. SQLite plans each in microseconds."""
    t = AIInteraction.__table__
    parts = []
    for n, (_, _, keys, low, high, offset, descending) in enumerate(walks):
        values = {**keys, **({"user_id": uuid.UUID(keys["user_id"])} if keys.get("user_id") else {})}
        same, order = _walk_conditions(grouped, values, conditions, low, high)
        walk = (
            select(literal(n, Integer).label("target"), t.c.latency_nanos).where(*same)
            .order_by(*(c.desc() if descending else c.asc() for c in order)).limit(1).offset(offset).subquery()
        )
        parts.append(select(walk.c.target, walk.c.latency_nanos))
    return union_all(*parts)


def _lateral_walks(conditions: list[ColumnElement[bool]], grouped: list[str], walks: list[Any]) -> Any:
    """PostgreSQL: the walks as rows of a VALUES list, each joined LATERAL to one walk statement
    taking its keys, bounds and offset from the row: planned once, not once per walk (a
    hundred literal walks took 50 ms to plan, 3 to run). One statement for each direction and
    each pattern of NULL keys (an IS NULL, unlike an equality, is not a parameter)."""
    t = AIInteraction.__table__
    names = [*grouped, "currency"]
    shapes: dict[tuple[bool, tuple[bool, ...]], list[tuple[int, Any]]] = {}
    for n, walk in enumerate(walks):
        keys, descending = walk[2], walk[6]
        nulls = tuple(keys[name] == "" and name in ("user_id", "currency") for name in names)
        shapes.setdefault((descending, nulls), []).append((n, walk))
    parts = []
    for (descending, nulls), members in shapes.items():
        given = [name for name, null in zip(names, nulls, strict=True) if not null]
        v = values(
            column("target", Integer), *(column(name, String) for name in given),
            column("low", BigInteger), column("high", BigInteger), column("skip", BigInteger), name="walks",
        ).data([(n, *(walk[2][name] for name in given), walk[3], walk[4], walk[5]) for n, walk in members])
        keys = {name: (cast(v.c[name], Uuid) if name == "user_id" else v.c[name]) if name in given else "" for name in names}
        same, order = _walk_conditions(grouped, keys, conditions, v.c.low, v.c.high)
        walk = (
            select(t.c.latency_nanos).where(*same)
            .order_by(*(c.desc() if descending else c.asc() for c in order)).limit(1).offset(v.c.skip).lateral("walk")
        )
        parts.append(select(v.c.target, walk.c.latency_nanos).select_from(v.join(walk, true())))
    return union_all(*parts)


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
