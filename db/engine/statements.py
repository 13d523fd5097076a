"""The statements of the standard methods, built once per shape and cached.

A statement object used again keeps its SQLAlchemy cache key, so it is neither rebuilt nor
traversed, and db/prepared.py compiles it once. Values are parameters, a filter's literals too:
List and Search statements are keyed by the filter's shape (engine/filtering.FilterShape), and
its values (filter_<i>) come with each execution. A statement that holds a caller's row rule
(values of that caller) is built per call by the same functions.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, exists, func, insert, literal, select
from sqlalchemy import update as sa_update
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import ClauseElement, Executable

from db.engine import reading
from db.engine.filtering import FilterShape
from db.engine.paging import OrderKey, keyset_after, order_clauses, parse_order_by
from db.engine.resource import REGISTRY, ResourceSpec
from db.engine.search import search_terms


def companion_ctes(dialect: str) -> bool:
    """Whether the database takes a data-modifying CTE, so that a row's write and its audit
    entry go in as one statement (PostgreSQL; SQLite has none)."""
    return dialect == "postgresql"


def where_clauses(spec: ResourceSpec, shape: FilterShape | None, show_deleted: bool, allowed: Any) -> list[Any]:
    """The WHERE of a List or Search: the filter (its shape; None: none), live rows unless
    show_deleted, the row rule."""
    conditions: list[Any] = []
    if shape is not None:
        conditions.append(shape.clause)
    if spec.soft_delete and not show_deleted:
        conditions.append(spec.table.c.delete_time.is_(None))
    if allowed is not None:
        conditions.append(allowed)
    return conditions


def order_keys(spec: ResourceSpec, order_by: str) -> list[OrderKey]:
    orderable = {name: spec.table.c[name] for name in (*spec.orderable, "id")}
    return parse_order_by(order_by, orderable, spec.default_order)


@functools.lru_cache(maxsize=1024)
def page_statements(
    spec: ResourceSpec, dialect: str, shape: FilterShape | None, show_deleted: bool, order_by: str, nulls: tuple[bool, ...] | None, size: int,
    counted: bool = True,
) -> tuple[Any, Any]:
    """_build_page_statements without a row rule, built once per query shape: a statement
    object used again keeps its SQLAlchemy cache key, so it is neither rebuilt nor traversed.
    The values of the page token are parameters: after_<i>."""
    return build_page_statements(spec, dialect, shape, show_deleted, order_by, nulls, size, None, counted)


def build_page_statements(
    spec: ResourceSpec, dialect: str, shape: FilterShape | None, show_deleted: bool, order_by: str, nulls: tuple[bool, ...] | None,
    size: int, allowed: Any, counted: bool = True,
) -> tuple[Any, Any]:
    """(page statement, Count) of a List: the page's rows after the token's keys (nulls: which
    of them are NULL; None on the first page), with the limited count (Count.limited, parameter
    count_limit) as the column total_size unless not counted (the later statements of a large
    page)."""
    keys = order_keys(spec, order_by)
    conditions = where_clauses(spec, shape, show_deleted, allowed)
    page_conditions = list(conditions)
    if nulls is not None:
        placeholders = [None if null else bindparam(f"after_{i}", type_=k.column.type) for i, (k, null) in enumerate(zip(keys, nulls, strict=True))]
        page_conditions.append(keyset_after(keys, placeholders))
    count = Count.of(select(literal(1)).select_from(spec.table).where(*conditions))
    # total_size rides on the page's rows: an uncorrelated subquery, which both engines evaluate
    # once; one statement, one round trip, and on PostgreSQL's autocommit reads the count comes
    # from the page's own snapshot. An empty page counts on its own.
    stmt = reading.select_rows(spec, dialect)
    if counted:
        stmt = stmt.add_columns(count.limited.scalar_subquery().label("total_size"))
    stmt = stmt.where(*page_conditions).order_by(*order_clauses(keys)).limit(size + 1)
    return stmt, count


# The matches a Search ranks: the first SEARCH_WINDOW in the order the search index yields them
# (see build_search_statements), so a search costs what its window costs however many rows match.
SEARCH_WINDOW = 300


@functools.lru_cache(maxsize=1024)
def search_statements(spec: ResourceSpec, dialect: str, shape: FilterShape | None, size: int) -> tuple[Any, Any]:
    """_build_search_statements without a row rule, built once per shape (see _page_statements)."""
    return build_search_statements(spec, dialect, shape, size, None)


def build_search_statements(spec: ResourceSpec, dialect: str, shape: FilterShape | None, size: int, allowed: Any) -> tuple[Any, Any]:
    """(page statement, Count) of a Search: the hits from offset :search_offset, with the score
    and total_size (the matches in the window, at most SEARCH_WINDOW + 1) as columns. The Count
    serves a page with no hits (its limited count) and the estimate above the window.

    Only a window is ranked: the first SEARCH_WINDOW matches in the search index's own order,
    which needs no sort of the matches (SQLite: FTS5's rowid order, the order rows were added;
    PostgreSQL: the order of the scan its plan chooses, with no ORDER BY at all: the GIN
    bitmap's, the table's storage order, unless a filter's index is cheaper, and a plan chosen
    after new statistics may read another window; README "One page, one moment"). The
    window is scored, ordered by (score desc, id), and cut at the page; only the page's rows are
    joined back for their columns and relations. A match beyond the window is neither ranked
    nor returned; a query matching fewer rows than the window ranks every one of them.

    The window reads one match more than it ranks, and total_size counts what it read: up to
    SEARCH_WINDOW that is every match, and SEARCH_WINDOW + 1 says there are more. So the
    matches are looked up once (PostgreSQL: one GIN bitmap, the cost that grows with the words'
    rows) for both the page and its count. Each read match carries its place in the index's
    order (`n`), by which the extra one is left out of the ranking."""
    terms = search_terms(dialect, spec.table.name, spec.search_fields)
    table = spec.table
    conditions = [*where_clauses(spec, shape, False, allowed), terms.match]
    matches = select(literal(1)).select_from(table)
    if terms.join is not None:
        target, on = terms.join
        place = target.c.rowid
        window = select(table.c.id.label("id"), terms.score.label("score"), place.label("n")).select_from(table).join(target, on).order_by(place)
        matches = matches.join(target, on)
    else:  # row_number() over () numbers the rows in the order the scan yields them, as it goes
        window = select(table.c.id.label("id"), terms.score.label("score"), func.row_number().over().label("n")).select_from(table)
    read = window.where(*conditions).limit(SEARCH_WINDOW + 1).cte("search_window")
    ranked = select(read.c.id, read.c.score).order_by(read.c.n).limit(SEARCH_WINDOW).subquery("search_ranked")
    hits = (
        select(ranked.c.id, ranked.c.score)
        .order_by(ranked.c.score.desc(), ranked.c.id)
        .offset(bindparam("search_offset"))
        .limit(size + 1)
        .subquery("search_hits")
    )
    in_window = select(func.count()).select_from(read).scalar_subquery()
    stmt = (
        select(*reading.columns(spec, dialect), hits.c.score.label("score"), in_window.label("total_size"))
        .join_from(table, hits, table.c.id == hits.c.id)
        .order_by(hits.c.score.desc(), table.c.id)
    )
    return stmt, Count.of(matches.where(*conditions))


@dataclass(frozen=True)
class Count:
    """The statements of a List's or Search's total_size over one select of its matches:
    `limited` counts at most :count_limit of them (SELECT count(*) FROM (SELECT 1 ... LIMIT
    :count_limit)), so its cost is bounded whatever the table holds; `exact` counts them all
    (count_only); `estimate` is EXPLAIN (FORMAT JSON) of the matches, whose top plan node's
    "Plan Rows" is PostgreSQL's row estimate for them."""

    limited: Any
    exact: Any
    estimate: Any

    @classmethod
    def of(cls, matches: Any) -> Count:
        matches = matches.correlate(None)
        limited = select(func.count()).select_from(matches.limit(bindparam("count_limit")).subquery("counted")).correlate(None)
        exact = select(func.count()).select_from(matches.subquery("counted")).correlate(None)
        return cls(limited, exact, Explain(matches))


class Explain(Executable, ClauseElement):
    """EXPLAIN (FORMAT JSON) of a select (PostgreSQL): one row, the plan as JSON. Compiled on
    each use, never from SQLAlchemy's cache: a cached compilation run for another statement
    object would have its result adapted to that object's columns, which an EXPLAIN has none of."""

    inherit_cache = False

    def __init__(self, statement: Any) -> None:
        self.statement = statement


@compiles(Explain, "postgresql")
def _explain(element: Explain, compiler: Any, **kw: Any) -> str:
    return f"EXPLAIN (FORMAT JSON) {compiler.process(element.statement, **kw)}"


@functools.cache
def locked_row_statement(spec: ResourceSpec, lock: bool) -> Any:
    """SELECT of the row row_id's columns, FOR UPDATE if lock (PostgreSQL); built once."""
    table = spec.table
    stmt = select(*table.c).where(table.c.id == bindparam("row_id", type_=table.c.id.type))
    return stmt.with_for_update(of=table) if lock else stmt


@functools.lru_cache(maxsize=1024)
def update_statement(spec: ResourceSpec, dialect: str, keys: tuple[str, ...], companion: Any, companion_keys: tuple[str, ...]) -> Any:
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
    return select(*updated.c).add_cte(companion_cte(companion, companion_keys, after=updated))


@functools.cache
def reference_statement(target: ResourceSpec, one: bool) -> Any:
    """The live ids among :id (one) or :ids of target's rows (_live_targets). Built once."""
    ids = target.table.c.id
    return live_targets(target, ids == bindparam("id", type_=ids.type) if one else ids.in_(bindparam("ids", expanding=True)))


def live_targets(target: ResourceSpec, condition: Any) -> Any:
    """SELECT of the ids of target's live rows matching condition, FOR SHARE (PostgreSQL): a
    concurrent delete of a target waits for the write that references it to commit."""
    stmt = select(target.table.c.id).where(condition)
    if target.soft_delete:
        stmt = stmt.where(target.table.c.delete_time.is_(None))
    return stmt.with_for_update(read=True)


@functools.cache
def insert_with(
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
        reference = live_targets(REGISTRY[target_name], ids == bindparam(f"ref_{i}", type_=ids.type))
        guards.append(exists(reference.cte(f"reference_{i}").select()))
    source = select(*row).where(*guards)
    return insert(table).from_select(list(keys), source).add_cte(companion_cte(companion, companion_keys, guards)).returning(table.c.id)


def companion_cte(companion: Any, keys: tuple[str, ...], guards: Sequence[Any] = (), after: Any = None) -> Any:
    """INSERT of one companion row (an audit entry; parameters c_<column>) as a CTE: only where
    the guards all hold, and with after (a CTE of the change) only if that changed a row. A
    data-modifying CTE runs whether or not the statement's own change happens, so the companion
    carries that change's conditions (the statement may be its own transaction)."""
    source = select(*(bindparam(f"c_{k}", type_=companion.c[k].type) for k in keys)).where(*guards)
    if after is not None:
        source = source.select_from(after)
    return insert(companion).from_select(list(keys), source).cte("companion")
