"""Declarative base, portable column types and the mixins every resource table shares."""
from __future__ import annotations

import datetime as dt
import os
import threading
import time
import uuid
from decimal import Decimal
from typing import Annotated, Any, ClassVar

from sqlalchemy import JSON, CheckConstraint, Column, DateTime, ForeignKey, Index, Integer, MetaData, Numeric, String, Table, TypeDecorator, Uuid
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class _Entropy(threading.local):
    """Random bytes from the operating system's CSPRNG, read 4 KiB at a time by each thread.

    os.urandom is one getrandom system call, and CPython releases the GIL around it: on a busy
    server the calling thread then waits for the GIL to come back, on the event loop far longer
    than the call itself takes (bench/README.md). One call per 4 KiB makes that once per few
    hundred ids. A forked child starts with a fresh buffer,
    never the parent's bytes."""

    generation = -1

    def __init__(self) -> None:
        self.buffer = b""
        self.position = 0


_entropy = _Entropy()
_fork_generation = 0


def _after_fork() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork)


def random_bytes(n: int) -> bytes:
    """n (at most 4096) bytes from the OS's CSPRNG, as os.urandom(n)."""
    local = _entropy
    position = local.position
    if position + n > len(local.buffer) or local.generation != _fork_generation:
        local.buffer, position, local.generation = os.urandom(4096), 0, _fork_generation
    local.position = position + n
    return local.buffer[position:position + n]


def uuid4() -> uuid.UUID:
    """A random UUID (v4), as uuid.uuid4() but from random_bytes."""
    return uuid.UUID(bytes=random_bytes(16), version=4)


def uuid7() -> uuid.UUID:
    """A time-ordered UUID (RFC 9562 v7): new rows land at the right edge of the primary-key index."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(random_bytes(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= ((rand >> 62) & 0xFFF) << 64
    value |= 0b10 << 62
    value |= rand & ((1 << 62) - 1)
    return uuid.UUID(int=value)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """Timezone-aware timestamps on every engine.

    SQLite has no timestamp type and SQLAlchemy stores naive text there; this stores UTC and hands
    back aware datetimes, so comparisons in filters and page tokens agree on both engines.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        if dialect.name != "sqlite":
            return super().result_processor(dialect, coltype)
        # SQLite hands back the stored text ("2026-12-02 14:46:18.618202", UTC). SQLAlchemy's
        # DATETIME parses it and this decorator then adds the zone: datetime.fromisoformat does
        # both for less per value, and a page of tasks has many (bench/README.md). The zone goes
        # in as text: parsing "...+00:00" takes 0.08 µs, parsing and then replace(tzinfo=) 0.64.
        # Only the stored forms take it (19 or 26 characters ending in a digit: "+00:00" after
        # a trailing space or "z" would parse); text with a zone fails that parse, and a date
        # parses without its zone: both take the plain path.
        utc = dt.UTC
        parse = dt.datetime.fromisoformat

        def plain(value: Any) -> dt.datetime:
            parsed = parse(value) if isinstance(value, str) else value
            return parsed.replace(tzinfo=utc) if parsed.tzinfo is None else parsed.astimezone(utc)

        def process(value: Any) -> dt.datetime | None:
            if value is None:
                return None
            if isinstance(value, str) and len(value) in (19, 26) and value[-1].isdigit():  # as stored
                try:
                    parsed = parse(value + "+00:00")
                except ValueError:
                    pass
                else:
                    if parsed.tzinfo is utc:  # not date-only text, whose zone fromisoformat drops
                        return parsed
            return plain(value)

        process.plain = plain  # type: ignore[attr-defined]  # the test compares the two
        return process


class ExactDecimal(TypeDecorator[Decimal]):
    """NUMERIC(24, 9) on PostgreSQL; exact decimal text on SQLite, whose NUMERIC goes through float."""

    impl = Numeric(24, 9)
    cache_ok = True

    def load_dialect_impl(self, dialect: Any) -> Any:
        return dialect.type_descriptor(String(40) if dialect.name == "sqlite" else Numeric(24, 9))

    def process_bind_param(self, value: Decimal | None, dialect: Any) -> Any:
        if value is None or dialect.name != "sqlite":
            return value
        return format(Decimal(value), "f")

    def process_result_value(self, value: Any, dialect: Any) -> Decimal | None:
        return None if value is None else Decimal(value)


# JSONB where it matters (PostgreSQL: indexable, containment operators), JSON text on SQLite.
# An unset value is SQL NULL whichever way it is written (SQLAlchemy's bound parameters would
# write JSON null, db/bulk's JSON arrays SQL NULL): filters see one "absent".
PortableJSON = JSON(none_as_null=True).with_variant(postgresql.JSONB(none_as_null=True), "postgresql")

uuid_pk = Annotated[uuid.UUID, mapped_column(Uuid, primary_key=True, default=uuid7)]
timestamp = Annotated[dt.datetime, mapped_column(UTCDateTime, nullable=False)]
optional_timestamp = Annotated[dt.datetime | None, mapped_column(UTCDateTime, nullable=True)]
json_object = Annotated[dict[str, Any] | None, mapped_column(PortableJSON, nullable=True)]
json_list = Annotated[list[Any], mapped_column(PortableJSON, nullable=False, default=list)]
short_text = Annotated[str, mapped_column(String(255), nullable=False)]


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    # Every model is mapped to a Table of its own (none to a join or a select), which
    # DeclarativeBase types as the FromClause any mapping could have.
    __table__: ClassVar[Table]


class ResourceMixin:
    """id, create/update times and the revision behind the etag, for every resource table."""

    id: Mapped[uuid_pk]
    create_time: Mapped[timestamp] = mapped_column(default=utcnow)
    update_time: Mapped[timestamp] = mapped_column(default=utcnow, onupdate=utcnow)
    # Optimistic concurrency: SQLAlchemy adds "AND revision = :old" to every UPDATE, so two
    # writers that read the same etag cannot both win.
    revision: Mapped[int] = mapped_column(Integer, nullable=False, default=1)

    @declared_attr.directive
    def __mapper_args__(cls) -> dict[str, Any]:  # noqa: N805
        return {"version_id_col": cls.revision}


class SoftDeleteMixin:
    """delete_time marks a soft-deleted row; Undelete clears it."""

    delete_time: Mapped[optional_timestamp]


def one_of(column: str, values: tuple[str, ...]) -> CheckConstraint:
    """A CHECK that column holds one of values (an enum stored as text)."""
    listed = ", ".join(f"'{v}'" for v in values)
    return CheckConstraint(f"{column} IN ({listed})", name=f"{column}_valid")


def link_table(name: str, first: tuple[str, str], second: tuple[str, str], *extra: Any) -> Table:
    """A many-to-many relation: two ids, (column, "table.id") each, ON DELETE CASCADE, that are
    its primary key; when the link was made; and an index on the second id (the first leads
    the primary key)."""
    (first_column, first_target), (second_column, second_target) = first, second
    return Table(
        name,
        Base.metadata,
        Column(first_column, Uuid, ForeignKey(first_target, ondelete="CASCADE"), primary_key=True),
        Column(second_column, Uuid, ForeignKey(second_target, ondelete="CASCADE"), primary_key=True),
        Column("create_time", UTCDateTime, nullable=False, default=utcnow),
        Index(f"ix_{name}_{second_column}", second_column),
        *extra,
    )
