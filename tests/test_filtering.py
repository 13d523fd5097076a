"""db/filtering.py: parser, compiler run against real SQLite and PostgreSQL, errors, fuzzing.

PostgreSQL comes from tests/databases.py like everywhere else (TEST_DATABASE_URL, or a throwaway
embedded server); the table lives in a throw-away schema.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.pool import StaticPool

from db.engine import filtering
from db.errors import InvalidArgument
from db.engine.filtering import (
    And,
    Comparison,
    FieldKind,
    FilterCompiler,
    FilterField,
    LiteralKind,
    Node,
    Not,
    Or,
    parse_filter,
)

BACKENDS = ["sqlite", "postgresql"]
REASONS = {"INVALID_FILTER", "UNKNOWN_FILTER_FIELD", "INVALID_FILTER_VALUE", "UNSUPPORTED_FILTER_OPERATOR"}
UTC = dt.UTC


# ---------------------------------------------------------------------------------------- parser


def render(node: Node) -> str:
    """An s-expression of the AST, without positions: `(AND (= a int:1) (NOT ...))`."""
    if isinstance(node, And):
        return "(AND " + " ".join(render(n) for n in node.operands) + ")"
    if isinstance(node, Or):
        return "(OR " + " ".join(render(n) for n in node.operands) + ")"
    if isinstance(node, Not):
        return f"(NOT {render(node.operand)})"
    assert isinstance(node, Comparison)
    return f"({node.op} {node.name} {node.value.kind.value}:{node.value.text})"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # AIP-160: OR binds tighter than AND and than juxtaposition.
        ("a=1 AND b=2 OR c=3", "(AND (= a int:1) (OR (= b int:2) (= c int:3)))"),
        ("a=1 OR b=2 AND c=3", "(AND (OR (= a int:1) (= b int:2)) (= c int:3))"),
        ("a=1 b=2 OR c=3", "(AND (= a int:1) (OR (= b int:2) (= c int:3)))"),
        ("a=1 OR b=2 c=3", "(AND (OR (= a int:1) (= b int:2)) (= c int:3))"),
        ("a=1 b=2 AND c=3", "(AND (= a int:1) (= b int:2) (= c int:3))"),
        ("a=1 OR b=2 OR c=3", "(OR (= a int:1) (= b int:2) (= c int:3))"),
        ("(a=1 AND b=2) OR c=3", "(OR (AND (= a int:1) (= b int:2)) (= c int:3))"),
        ("((a=1))", "(= a int:1)"),
        ("NOT a=1 OR b=2", "(OR (NOT (= a int:1)) (= b int:2))"),
        ("NOT (a=1 OR b=2)", "(NOT (OR (= a int:1) (= b int:2)))"),
        ("NOT(a=1)", "(NOT (= a int:1))"),
        ("-a=1", "(NOT (= a int:1))"),
        ("-(a=1 b=2)", "(NOT (AND (= a int:1) (= b int:2)))"),
        ("a=1 -b=2", "(AND (= a int:1) (NOT (= b int:2)))"),
        ("NOT -a=1", "(NOT (NOT (= a int:1)))"),
        ("a = -1", "(= a int:-1)"),
        ("a\t=\n1\r\n", "(= a int:1)"),
        # every comparator, with and without spaces
        (
            "a<1 a<=1 a>1 a>=1 a=1 a!=1 a:1",
            "(AND (< a int:1) (<= a int:1) (> a int:1) (>= a int:1) (= a int:1) (!= a int:1) (: a int:1))",
        ),
        ("a != 1", "(!= a int:1)"),
        # literals
        ('a = "x y"', "(= a string:x y)"),
        ("a = 'x y'", "(= a string:x y)"),
        ('a = ""', "(= a string:)"),
        ("a = 42", "(= a int:42)"),
        ("a = 2.5", "(= a float:2.5)"),
        ("a = -1.5e3", "(= a float:-1.5e3)"),
        ("a = 1E-2", "(= a float:1E-2)"),
        ("a = true", "(= a bool:true)"),
        ("a = false", "(= a bool:false)"),
        ("a = null", "(= a null:null)"),
        ("a = DONE", "(= a text:DONE)"),
        ("a = and", "(= a text:and)"),
        ("a = b.c", "(= a text:b.c)"),
        ('a = "true"', "(= a string:true)"),
        ("a:*", "(: a *:*)"),
        # escapes
        (r'a = "q\"q"', '(= a string:q"q)'),
        (r"a = 'it\'s'", "(= a string:it's)"),
        (r'a = "back\\slash"', "(= a string:back\\slash)"),
        (r'a = "tab\tnl\ncr\r"', "(= a string:tab\tnl\ncr\r)"),
        ("a = 'say \"hi\"'", '(= a string:say "hi")'),
        # dotted paths
        ("preferences.theme = 'dark'", "(= preferences.theme string:dark)"),
        ("preferences.ui.size > 3", "(> preferences.ui.size int:3)"),
        ("_x.y_2:z", "(: _x.y_2 text:z)"),
    ],
)
def test_parse(text: str, expected: str) -> None:
    assert render(parse_filter(text)) == expected


def test_parse_keeps_paths_positions_and_kinds() -> None:
    node = parse_filter('x=1  preferences.ui.size >= "3"')
    assert isinstance(node, And)
    second = node.operands[1]
    assert isinstance(second, Comparison)
    assert second.path == ("preferences", "ui", "size")
    assert (second.position, second.op_position, second.value.position) == (5, 25, 28)
    assert second.value.kind is LiteralKind.STRING


@pytest.mark.parametrize(
    ("text", "wildcard"),
    [('a = "alp*"', True), ("a = 'alp*'", True), (r'a = "alp\*"', False), ('a = "*x"', False), ('a = "x"', False)],
)
def test_parse_trailing_wildcard(text: str, wildcard: bool) -> None:
    node = parse_filter(text)
    assert isinstance(node, Comparison)
    assert node.value.wildcard is wildcard
    assert node.value.text.endswith("*") or not wildcard


def test_plans_are_cached_by_shape() -> None:
    compiler = FilterCompiler({"a": FilterField(FieldKind.INT, sa.column("a", sa.Integer))}, "sqlite")
    compiler.compile(f"a = {uuid.uuid4().int % 1000}")
    hits = filtering.plans.cache_info().hits
    compiler.compile(f"a = {uuid.uuid4().int % 1000}")  # another value, the same shape
    assert filtering.plans.cache_info().hits == hits + 1
    assert filtering.plans.cache_info().maxsize == 512


# -------------------------------------------------------------------------------- parse errors


def assert_invalid(exc: InvalidArgument, reason: str, *fragments: str) -> None:
    assert exc.code is grpc.StatusCode.INVALID_ARGUMENT
    assert exc.reason == reason
    assert exc.metadata == {"field": "filter"}
    assert len(exc.violations) == 1
    violation = exc.violations[0]
    assert violation.field == "filter"
    assert violation.reason == reason
    for fragment in fragments:
        assert fragment in violation.description, violation.description
    assert exc.message.startswith("invalid filter: ")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("a =", ("end of filter",)),
        ("a", ("after 'a'", "position 1")),
        ("a 1", ("after 'a'", "'1'")),
        ("(a=1", ("expected ')'", "position 0", "end of filter")),
        ("a=1)", ("unexpected ')'", "position 3")),
        ('a = "abc', ("unterminated string", "position 4")),
        (r'a = "\q"', ("invalid escape", "\\\\q", "position 5")),
        ('a = "x\\', ("invalid escape",)),
        ("a == 1", ("after '='", "position 3", "'='")),
        ("a = 1x", ("invalid number '1x'", "position 4")),
        ("a = 1.2.3", ("invalid number '1.2.3'",)),
        ("a. = 1", ("invalid field path 'a.'", "position 0")),
        ("a.1 = 1", ("invalid field path",)),
        ("a = 1 AND", ("end of filter",)),
        ("AND a = 1", ("'AND'", "position 0")),
        ("a = 1 OR OR b = 2", ("'OR'", "position 9")),
        ("a & b", ("unexpected character '&'", "position 2")),
        ("a = 1 ; DROP TABLE x", ("unexpected character ';'",)),
        ("a ! 1", ("unexpected character '!'",)),
        ('"a" = 1', ("string 'a'", "position 0")),
        ("a = (1)", ("after '='", "'('")),
        ("a = 1 = 2", ("'='", "position 6")),
        ("a = é", ("unexpected character 'é'",)),
        ('a = "x\x00"', ("U+0000", "position 6")),
        ("a = 1\x1b", ("U+001B", "position 5")),
        ("a = '\x7f'", ("U+007F",)),
        ("a = '\ud800'", ("U+D800",)),
        ("a=1 " * 512 + "a", ("2049 characters", "2048")),
        ("(" * 33 + "a=1" + ")" * 33, ("deeper than 32", "position 32")),
        ("NOT " * 33 + "a=1", ("deeper than 32",)),
        ("-" * 20 + "(" * 13 + "a=1" + ")" * 13, ("deeper than 32",)),
        (" ".join(["a=1"] * 65), ("more than 64 comparisons", "position 256")),
        ("", ("empty",)),
        ("  ", ("empty",)),
    ],
)
def test_parse_errors(text: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_filter(text)
    assert_invalid(info.value, "INVALID_FILTER", *fragments)


@pytest.mark.parametrize(
    "text",
    [
        "(" * 32 + "a=1" + ")" * 32,
        "NOT " * 32 + "a=1",
        " ".join(["a=1"] * 64),
        " OR ".join(["a=1"] * 64),
        "a = '" + "x" * 2000 + "'",
    ],
)
def test_parse_accepts_inputs_at_the_limits(text: str) -> None:
    parse_filter(text)


@pytest.mark.parametrize(
    "text",
    [
        "(" * 10_000,
        "(" * 2048,
        "NOT " * 512,
        "-" * 2047 + "a",
        "a=1 " * 2500,
        "x" * 10_000,
        "a = '" + "\\" * 2040,
        "(" * 1000 + "a=1" + ")" * 1000,
    ],
)
def test_hostile_inputs_fail_fast_with_invalid_argument(text: str) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidArgument) as info:
        parse_filter(text)
    assert info.value.reason == "INVALID_FILTER"
    assert time.perf_counter() - started < 1.0


# ---------------------------------------------------------------------------------- database

TASK_STATUS = {
    "TASK_STATUS_TODO": "todo",
    "TODO": "todo",
    "TASK_STATUS_IN_PROGRESS": "in_progress",
    "IN_PROGRESS": "in_progress",
    "TASK_STATUS_DONE": "done",
    "DONE": "done",
    "TASK_STATUS_CANCELLED": "cancelled",
    "CANCELLED": "cancelled",
}


def ts(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def row_id(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


COLUMNS = ("n", "name", "status", "hours", "count", "active", "created", "due", "tags", "prefs")
# fmt: off
ROWS: list[dict[str, Any]] = [dict(zip(COLUMNS, values, strict=True)) for values in [
    (1, "alpha", "todo", 1.5, 1, True, ts("2026-01-01T00:00:00"), dt.date(2026, 2, 1),
     ["urgent", "backend"], {"theme": "dark", "ui": {"size": 3}, "beta": True}),
    (2, "alphabet", "done", 2.0, 2, False, ts("2026-01-02T12:00:00"), dt.date(2026, 2, 2),
     ["frontend"], {"theme": "light", "ui": {"size": 5}}),
    (3, "Alpine", "in_progress", 0.0, 0, True, ts("2026-01-03T00:00:00.500000"), None,
     [], {"theme": 5, "beta": False}),
    (4, "gamma_ray", "done", None, 10, None, ts("2025-12-31T23:59:59"), dt.date(2026, 3, 1),
     ["urgent"], {}),
    (5, "gammaXray", "todo", 7.25, -3, False, ts("2026-01-05T00:00:00"), dt.date(2026, 1, 15),
     ["a%b", "x_y"], {"theme": "dark", "ui": {"size": "big"}}),
    (6, "100%_off", "cancelled", 3.0, 5, True, ts("2026-02-01T00:00:00"), dt.date(2026, 2, 1),
     ["URGENT"], {"ui": None}),
    # tags: JSON null (not SQL NULL); prefs: an array, not an object
    (7, "O'Brien \"q\" \\ back", "todo", 4.5, 100, True, ts("2026-01-04T00:00:00"), dt.date(2026, 2, 10),
     sa.JSON.NULL, [1, 2]),
    (8, None, None, None, None, None, None, None, sa.null(), sa.null()),
]]
# fmt: on
ALL = {row["n"] for row in ROWS}


def make_table(metadata: sa.MetaData, name: str, schema: str | None) -> sa.Table:
    json_type = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    return sa.Table(
        name,
        metadata,
        sa.Column("id", sa.Uuid, primary_key=True),
        sa.Column("name", sa.String),
        sa.Column("status", sa.String),
        sa.Column("hours", sa.Float),
        sa.Column("count", sa.Integer),
        sa.Column("active", sa.Boolean),
        sa.Column("created", sa.DateTime(timezone=True)),
        sa.Column("due", sa.Date),
        sa.Column("tags", json_type),
        sa.Column("prefs", json_type),
        schema=schema,
    )


def make_fields(table: sa.Table) -> dict[str, FilterField]:
    c = table.c
    return {
        "id": FilterField(FieldKind.UUID, c.id),
        "name": FilterField(FieldKind.STRING, c.name),
        "status": FilterField(FieldKind.ENUM, c.status, TASK_STATUS),
        # status as a plain string: lower-case values order the same under every collation
        "status_text": FilterField(FieldKind.STRING, c.status),
        "hours": FilterField(FieldKind.FLOAT, c.hours),
        "count": FilterField(FieldKind.INT, c.count),
        "active": FilterField(FieldKind.BOOL, c.active),
        "created": FilterField(FieldKind.TIMESTAMP, c.created),
        "due": FilterField(FieldKind.DATE, c.due),
        "tags": FilterField(FieldKind.REPEATED_STRING, c.tags),
        "prefs": FilterField(FieldKind.JSON, c.prefs),
    }


@dataclass
class Db:
    engine: sa.Engine
    table: sa.Table
    compiler: FilterCompiler

    def ids(self, text: str) -> set[int]:
        expr = self.compiler.compile(text)
        query = sa.select(self.table.c.id)
        if expr is not None:
            query = query.where(expr)
        with self.engine.connect() as conn:
            return {row.id.int for row in conn.execute(query)}

    def row_count(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(self.table)).scalar_one()

    def table_exists(self) -> bool:
        return sa.inspect(self.engine).has_table(self.table.name, schema=self.table.schema)


def _engine(backend: str) -> sa.Engine:
    if backend == "sqlite":
        return sa.create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    from tests.databases import postgres_admin_url

    return sa.create_engine(postgres_admin_url())


@pytest.fixture(scope="module", params=BACKENDS)
def db(request: pytest.FixtureRequest) -> Iterator[Db]:
    backend: str = request.param
    engine = _engine(backend)
    schema = f"filter_test_{uuid.uuid4().hex[:12]}" if backend == "postgresql" else None
    metadata = sa.MetaData()
    table = make_table(metadata, f"filter_items_{uuid.uuid4().hex[:8]}", schema)
    with engine.begin() as conn:
        if schema:
            conn.execute(sa.schema.CreateSchema(schema))
        metadata.create_all(conn)
        conn.execute(table.insert(), [{"id": row_id(r["n"]), **{k: v for k, v in r.items() if k != "n"}} for r in ROWS])
    try:
        yield Db(engine, table, FilterCompiler(make_fields(table), engine.dialect.name))
    finally:
        with engine.begin() as conn:
            if schema:
                conn.execute(sa.schema.DropSchema(schema, cascade=True))
            else:
                metadata.drop_all(conn)
        engine.dispose()


CASES: list[tuple[str, set[int]]] = [
    # STRING
    ('name = "alpha"', {1}),
    ("name = alpha", {1}),
    ('name != "alpha"', ALL - {1, 8}),
    ('name = "alp*"', {1, 2}),
    ('name = "Alp*"', {3}),
    ('name != "alp*"', {3, 4, 5, 6, 7}),
    ('name = "gamma_*"', {4}),
    ('name = "100%*"', {6}),
    ('name = "100%_*"', {6}),
    ('name = "*"', ALL - {8}),
    (r'name = "alp\*"', set()),
    ('name:"ALP"', {1, 2, 3}),
    ("name:ray", {4, 5}),
    ('name:"%"', {6}),
    ('name:"_"', {4, 6}),
    ('name:"\'"', {7}),
    (r'name:"\""', {7}),
    (r'name:"\\"', {7}),
    (r'name = "O\'Brien \"q\" \\ back"', {7}),
    ("name:*", ALL - {8}),
    ("name = null", {8}),
    ("name != null", ALL - {8}),
    ('name = "x\'; DROP TABLE filter_items; --"', set()),
    ("name:\"' OR '1'='1\"", set()),
    ('status_text < "done"', {6}),
    ('status_text >= "in"', {1, 3, 5, 7}),
    ('status_text <= "done"', {2, 4, 6}),
    ('status_text > "todo"', set()),
    # UUID
    ('id = "00000000-0000-0000-0000-000000000003"', {3}),
    ("id = '00000000000000000000000000000003'", {3}),
    ('id != "00000000-0000-0000-0000-000000000003"', ALL - {3}),
    ("id:*", ALL),
    # INT
    ("count = 2", {2}),
    ("count > 2", {4, 6, 7}),
    ("count >= -3", ALL - {8}),
    ("count < 0", {5}),
    ('count <= "1"', {1, 3, 5}),
    ("count != 0", {1, 2, 4, 5, 6, 7}),
    ("count > 99999999999", set()),
    ("count > -9223372036854775808", ALL - {8}),
    ("count = null", {8}),
    # FLOAT
    ("hours > 2", {5, 6, 7}),
    ("hours >= 2.0", {2, 5, 6, 7}),
    ("hours < 1.5e0", {3}),
    ("hours = 7.25", {5}),
    ('hours = "4.5"', {7}),
    ("hours <= -1", set()),
    ("hours:*", ALL - {4, 8}),
    ("hours = null", {4, 8}),
    # BOOL
    ("active = true", {1, 3, 6, 7}),
    ("active = false", {2, 5}),
    ("active != true", {2, 5}),
    ('active = "TRUE"', {1, 3, 6, 7}),
    ("NOT active = true", {2, 5}),
    ("active = null", {4, 8}),
    # TIMESTAMP
    ('created > "2026-01-02T00:00:00Z"', {2, 3, 5, 6, 7}),
    ('created >= "2026-01-02T13:00:00+01:00"', {2, 3, 5, 6, 7}),
    ('created > "2026-01-02T13:00:00+01:00"', {3, 5, 6, 7}),
    ('created < "2026-01-01T00:00:00Z"', {4}),
    ('created <= "2025-12-31T19:00:00-05:00"', {1, 4}),
    ('created = "2026-01-03T00:00:00.5Z"', {3}),
    ('created = "2026-01-03T00:00:00.500000000Z"', {3}),
    ('created = "2026-01-01t00:00:00z"', {1}),
    ('created != "2026-01-01T00:00:00Z"', ALL - {1, 8}),
    ("created:*", ALL - {8}),
    # DATE
    ('due = "2026-02-01"', {1, 6}),
    ('due > "2026-02-01"', {2, 4, 7}),
    ('due < "2026-02-01"', {5}),
    ('due != "2026-02-01"', {2, 4, 5, 7}),
    ('due >= "2026-02-02" due <= "2026-02-10"', {2, 7}),
    ("due:*", ALL - {3, 8}),
    # ENUM
    ("status = DONE", {2, 4}),
    ("status = done", {2, 4}),
    ('status = "task_status_done"', {2, 4}),
    ("status = TASK_STATUS_DONE", {2, 4}),
    ("status != TODO", {2, 3, 4, 6}),
    ("status = IN_PROGRESS OR status = CANCELLED", {3, 6}),
    ("status = null", {8}),
    ("status:*", ALL - {8}),
    # REPEATED_STRING
    ("tags:urgent", {1, 4}),
    ('tags:"URGENT"', {6}),
    ('tags:"a%b"', {5}),
    ('tags:"a%"', set()),
    ('tags:"x_y"', {5}),
    ('tags:"urg"', set()),
    ("tags:*", {1, 2, 4, 5, 6}),
    ("NOT tags:*", {3, 7, 8}),
    ("-tags:urgent", ALL - {1, 4}),
    ("tags:urgent OR tags:frontend", {1, 2, 4}),
    ("tags = null", {8}),
    # JSON
    ("prefs:theme", {1, 2, 3, 5}),
    ("prefs:ui", {1, 2, 5, 6}),
    ('prefs:"0"', set()),
    ("-prefs:theme", {4, 6, 7, 8}),
    ("prefs.ui:size", {1, 2, 5}),
    ("prefs.theme:dark", set()),
    ('prefs.theme = "dark"', {1, 5}),
    ("prefs.theme = dark", {1, 5}),
    ('prefs.theme != "dark"', {2}),
    ("prefs.theme = 5", {3}),
    ('prefs.theme = "5"', set()),
    ('prefs.theme > "k"', {2}),
    ("prefs.ui.size > 3", {2}),
    ("prefs.ui.size >= 3", {1, 2}),
    ("prefs.ui.size < 1e1", {1, 2}),
    ('prefs.ui.size = "big"', {5}),
    ("prefs.beta = true", {1}),
    ("prefs.beta = false", {3}),
    ("prefs.beta != true", {3}),
    ('prefs.beta = "true"', set()),  # quoted: a JSON string, and beta is a JSON boolean
    ("prefs.ui = null", {3, 4, 6, 7, 8}),
    ("prefs.ui != null", {1, 2, 5}),
    ("prefs.ui:*", {1, 2, 5, 6}),
    ("prefs.ui.size:*", {1, 2, 5}),
    ("prefs.nope.deeper = 1", set()),
    ("prefs:*", ALL - {8}),
    ("prefs = null", {8}),
    # combinations and precedence
    ("count = 1 OR status = DONE AND active = false", {2}),
    ("(count = 1 OR status = DONE) AND active = false", {2}),
    ("count = 1 OR (status = DONE AND active = false)", {1, 2}),
    ("status = TODO hours > 2", {5, 7}),
    ("status = TODO AND hours > 2 OR count = 1", {1, 5, 7}),
    ("NOT status = TODO", {2, 3, 4, 6}),
    ("-(status = TODO OR status = DONE)", {3, 6}),
    ("-name:alp AND count >= 0", {4, 6, 7}),
    ("NOT NOT active = true", {1, 3, 6, 7}),
    ("   ", ALL),
]


@pytest.mark.parametrize(("text", "expected"), CASES, ids=[case[0] for case in CASES])
def test_filter_returns_expected_rows(db: Db, text: str, expected: set[int]) -> None:
    assert db.ids(text) == expected


def test_empty_filter_compiles_to_none() -> None:
    compiler = FilterCompiler({"a": FilterField(FieldKind.INT, sa.column("a", sa.Integer))}, "postgresql")
    assert compiler.compile("") is None
    assert compiler.compile(" \t\r\n ") is None


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.dialect()], ids=["sqlite", "postgresql"])
def test_literals_are_bound_parameters(dialect: Any) -> None:
    table = make_table(sa.MetaData(), "t", None)
    compiler = FilterCompiler(make_fields(table), dialect.name)
    texts = [
        'name = "x\'; DROP TABLE t; --"',
        'name:"\'; DROP TABLE t; --"',
        'name = "evil\'; DROP TABLE t; --*"',
        'tags:"\'; DROP TABLE t; --"',
        'prefs:"\'; DROP TABLE t; --"',
        'prefs.ui:"\'; DROP TABLE t; --"',
        'prefs.theme = "\'; DROP TABLE t; --"',
    ]
    for text in texts:
        expr = compiler.compile(text)
        assert expr is not None
        compiled = sa.select(table.c.id).where(expr).compile(dialect=dialect)
        assert "DROP" not in str(compiled)
        assert any("DROP" in str(value) for value in compiled.params.values())


# ------------------------------------------------------------------------------ compile errors


@pytest.fixture(scope="module")
def compiler() -> FilterCompiler:
    return FilterCompiler(make_fields(make_table(sa.MetaData(), "t", None)), "sqlite")


@pytest.mark.parametrize(
    ("text", "reason", "fragments"),
    [
        ("nope = 1", "UNKNOWN_FILTER_FIELD", ("'nope'", "position 0", "name")),
        ("count = 1 AND Name = 'x'", "UNKNOWN_FILTER_FIELD", ("'Name'", "position 14")),
        ('name.first = "x"', "UNKNOWN_FILTER_FIELD", ("'name.first'", "no subfields")),
        ("tags.x:y", "UNKNOWN_FILTER_FIELD", ("'tags.x'",)),
        ("count = 1.5", "INVALID_FILTER_VALUE", ("'1.5'", "'count'", "position 8", "integer")),
        ('count = "abc"', "INVALID_FILTER_VALUE", ("string 'abc'", "'count'")),
        ("count = 99999999999999999999", "INVALID_FILTER_VALUE", ("'99999999999999999999'", "64-bit")),
        ("count = true", "INVALID_FILTER_VALUE", ("'true'",)),
        ('hours = "abc"', "INVALID_FILTER_VALUE", ("string 'abc'", "'hours'", "number")),
        ("hours = 1e999", "INVALID_FILTER_VALUE", ("'1e999'", "finite")),
        ('hours = "nan"', "INVALID_FILTER_VALUE", ("string 'nan'",)),
        ("active = 3", "INVALID_FILTER_VALUE", ("'3'", "'active'", "true or false")),
        ("active = yes", "INVALID_FILTER_VALUE", ("'yes'",)),
        ("created > 5", "INVALID_FILTER_VALUE", ("'5'", "'created'", "RFC 3339")),
        ('created > "2026-01-02T03:04:05"', "INVALID_FILTER_VALUE", ("'2026-01-02T03:04:05'", "time zone")),
        ('created > "garbage"', "INVALID_FILTER_VALUE", ("'garbage'",)),
        ('created > "2026-13-01T00:00:00Z"', "INVALID_FILTER_VALUE", ("2026-13-01",)),
        ('created > "2026-01-01T00:00:60Z"', "INVALID_FILTER_VALUE", ("00:00:60",)),
        ('created > "2026-01-01T00:00:00+24:00"', "INVALID_FILTER_VALUE", ("+24:00",)),
        ('created > "0001-01-01T00:00:00+01:00"', "INVALID_FILTER_VALUE", ("0001-01-01",)),
        ('due = "2026-02-30"', "INVALID_FILTER_VALUE", ("'2026-02-30'", "'due'", "date")),
        ('due = "20260201"', "INVALID_FILTER_VALUE", ("'20260201'",)),
        ("status = BOGUS", "INVALID_FILTER_VALUE", ("'BOGUS'", "'status'", "DONE", "TASK_STATUS_DONE")),
        ("status = 1", "INVALID_FILTER_VALUE", ("'1'",)),
        ('id = "not-a-uuid"', "INVALID_FILTER_VALUE", ("'not-a-uuid'", "'id'", "UUID")),
        ("id = 5", "INVALID_FILTER_VALUE", ("'5'",)),
        ("name = *", "INVALID_FILTER_VALUE", ("'*'", "position 7", "':'")),
        ("status < DONE", "UNSUPPORTED_FILTER_OPERATOR", ("'<'", "position 7", "'status'", "= !=")),
        ('id > "00000000-0000-0000-0000-000000000003"', "UNSUPPORTED_FILTER_OPERATOR", ("'>'", "'id'")),
        ("active >= true", "UNSUPPORTED_FILTER_OPERATOR", ("'>='", "'active'")),
        ("count:1", "UNSUPPORTED_FILTER_OPERATOR", ("':'", "'count'")),
        ("status:DONE", "UNSUPPORTED_FILTER_OPERATOR", ("':'", "'status'")),
        ('tags = "x"', "UNSUPPORTED_FILTER_OPERATOR", ("'='", "'tags'", ":")),
        ('prefs = "x"', "UNSUPPORTED_FILTER_OPERATOR", ("'='", "'prefs'")),
        ("prefs.beta > true", "UNSUPPORTED_FILTER_OPERATOR", ("'>'", "'prefs.beta'")),
        ("name > null", "UNSUPPORTED_FILTER_OPERATOR", ("'>'", "null")),
        ("tags:null", "UNSUPPORTED_FILTER_OPERATOR", ("':'", "null")),
    ],
)
def test_compile_errors(compiler: FilterCompiler, text: str, reason: str, fragments: tuple[str, ...]) -> None:
    with pytest.raises(InvalidArgument) as info:
        compiler.compile(text)
    assert_invalid(info.value, reason, *fragments)


def test_compiler_rejects_bad_configuration() -> None:
    column = sa.column("a", sa.String)
    with pytest.raises(ValueError, match="dialect"):
        FilterCompiler({}, "mysql")
    with pytest.raises(ValueError, match="enum_values"):
        FilterCompiler({"a": FilterField(FieldKind.ENUM, column)}, "sqlite")


def test_compile_rejects_non_string() -> None:
    compiler = FilterCompiler({}, "sqlite")
    with pytest.raises(InvalidArgument) as info:
        compiler.compile(b"a = 1")  # type: ignore[arg-type]
    assert_invalid(info.value, "INVALID_FILTER")


# ------------------------------------------------------------------------------------- fuzzing

FIELD_WORDS = [
    "name",
    "status",
    "status_text",
    "hours",
    "count",
    "active",
    "created",
    "due",
    "tags",
    "prefs",
    "id",
    "prefs.theme",
    "prefs.ui.size",
    "prefs.beta",
    "prefs.ui",
    "nope",
    "name.x",
    "NAME",
]
OPERATORS = ["=", "!=", "<", "<=", ">", ">=", ":"]
VALUES = [
    '"alpha"',
    "'alp*'",
    '"Alp*"',
    "DONE",
    "done",
    "TASK_STATUS_TODO",
    "urgent",
    "theme",
    "ui",
    "size",
    "1",
    "-2.5",
    "1e3",
    "0",
    "99999999999999999999",
    "-9223372036854775809",
    "1e999",
    '"1e999"',
    '"nan"',
    "true",
    "false",
    "null",
    "*",
    '"TRUE"',
    '""',
    '"%"',
    '"_"',
    r'"\\"',
    r'"\*"',
    r'"\""',
    "'\\''",
    '"2026-01-02T00:00:00Z"',
    '"2026-01-02T00:00:00"',
    '"2026-01-02T00:00:00+05:30"',
    '"2026-01-02"',
    '"9999-12-31T23:59:59-23:59"',
    '"0001-01-01T00:00:00Z"',
    '"00000000-0000-0000-0000-000000000001"',
    '"x\'; DROP TABLE filter_items; --"',
    "\"' OR '1'='1\"",
    '"Robert\'); DROP TABLE t;--"',
    '"😀"',
    '"é"',
    '"\u202e"',
    '"a\\nb"',
]
TOKENS = [
    "(",
    ")",
    "AND",
    "OR",
    "NOT",
    "-",
    "*",
    ".",
    "!",
    "\\",
    '"',
    "'",
    ";",
    "--",
    "/*",
    "\x00",
    "\ud800",
    "\x1b",
    "é",
    "😀",
    "\u202e",
    "\t",
    "\n",
    "$",
    "?",
    "%",
    "%s",
    "{",
    "}",
    "[",
    "]",
    *OPERATORS,
    *FIELD_WORDS,
    *VALUES,
]


def _comparisons() -> st.SearchStrategy[str]:
    parts = st.tuples(
        st.sampled_from(FIELD_WORDS), st.sampled_from(OPERATORS), st.sampled_from(VALUES), st.sampled_from([" ", ""])
    )
    return parts.map(lambda p: f"{p[0]}{p[3]}{p[1]}{p[3]}{p[2]}")


def _combine(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.one_of(
        st.tuples(children, st.sampled_from([" AND ", " OR ", " "]), children).map("".join),
        children.map(lambda c: f"NOT {c}"),
        children.map(lambda c: f"-{c}"),
        children.map(lambda c: f"({c})"),
    )


GRAMMAR = st.recursive(_comparisons(), _combine, max_leaves=16)
TOKEN_SOUP = st.tuples(st.lists(st.sampled_from(TOKENS), max_size=40), st.sampled_from([" ", ""])).map(
    lambda p: p[1].join(p[0])
)
NESTING = st.tuples(st.integers(0, 3000), st.sampled_from(["(", "NOT ", "-", "(-", "NOT ("])).map(
    lambda p: p[1] * p[0] + "name = 1" + ")" * p[0]
)
LONG = st.tuples(st.integers(1, 10_000), st.sampled_from(["x", "a=1 ", "(", '"', "é", "name = 1 OR ", "\\"])).map(
    lambda p: p[1] * p[0]
)
HOSTILE = st.one_of(
    GRAMMAR,
    GRAMMAR,
    GRAMMAR,
    TOKEN_SOUP,
    TOKEN_SOUP,
    st.text(max_size=300),
    st.tuples(GRAMMAR, st.text(max_size=20), GRAMMAR).map(" ".join),
    NESTING,
    LONG,
)


def test_fuzz_compile_never_fails_otherwise(db: Db) -> None:
    outcomes = {"compiled": 0, "rejected": 0}

    @settings(
        max_examples=300,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
    )
    @given(text=HOSTILE)
    def run(text: str) -> None:
        try:
            expr = db.compiler.compile(text)
        except InvalidArgument as exc:
            assert exc.reason in REASONS
            assert exc.violations
            assert all(v.field == "filter" and v.description for v in exc.violations)
            outcomes["rejected"] += 1
            return
        if expr is None:
            assert not text.strip(" \t\r\n")
            return
        with db.engine.connect() as conn:
            conn.execute(sa.select(db.table.c.id).where(expr)).all()
        outcomes["compiled"] += 1

    run()
    assert db.table_exists()
    assert db.row_count() == len(ROWS)
    assert db.ids("") == ALL
    assert outcomes["compiled"] > 20 and outcomes["rejected"] > 20, outcomes
