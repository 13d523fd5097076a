"""AIP-160 filters: a tokenizer, a recursive-descent parser and a compiler to SQLAlchemy.

Supported grammar (a subset of https://google.aip.dev/160)::

    filter      := [expression]
    expression  := sequence { "AND" sequence }
    sequence    := factor { factor }                 (juxtaposition, means AND)
    factor      := term { "OR" term }
    term        := { "NOT" | "-" } simple
    simple      := restriction | "(" expression ")"
    restriction := path comparator arg
    comparator  := "=" | "!=" | "<" | "<=" | ">" | ">=" | ":"
    path        := IDENT { "." IDENT }               IDENT = [A-Za-z_][A-Za-z0-9_]*
    arg         := STRING | NUMBER | "true" | "false" | "null" | "*" | IDENT-or-path (a bare string)

Precedence is AIP-160's, which is NOT the usual one: OR binds tighter than AND (and than
juxtaposition), so ``a AND b OR c`` means ``a AND (b OR c)`` and ``a b OR c`` means
``a AND (b OR c)``. ``NOT`` / ``-`` bind tightest. Keywords are upper-case; ``and`` is a bare word.

Semantics that AIP-160 leaves open:
- Comparisons keep SQL three-valued logic: ``x != v`` and ``NOT x = v`` do not match rows where
  ``x`` is NULL (or, for JSON paths, missing or of another JSON type). Use ``x = null`` for those.
  The ``:`` tests other than string containment (has element, has key, ``:*``) are two-valued, so
  ``NOT tags:x`` also matches a NULL ``tags``, identically on SQLite and PostgreSQL.
- A string literal ending in an unescaped ``*`` is a case-sensitive prefix match with ``=`` (and its
  negation with ``!=``); ``\\*`` is a literal star. ``:`` on a string is case-insensitive substring.
- ``field:*`` means present: NOT NULL (strings: also non-empty; repeated: non-empty array; JSON
  path: key present; related ids: at least one). ``field = null`` / ``!= null`` is IS NULL / IS
  NOT NULL for every kind but related ids, which are never null.
- Related ids (ids of related rows kept in a link table: ``member_ids``) take ``:`` only, with a
  quoted UUID: ``member_ids:"<user id>"`` matches the rows that user is related to.
- JSON nested comparisons are typed by the literal: a string literal only matches JSON strings, a
  number only JSON numbers, true/false only JSON booleans; ``prefs.a:key`` means object has key.
- Timestamps are compared in UTC. UUID, timestamp and date literals must be quoted.
Limits: 2048 characters, nesting (parentheses and NOTs) 32 deep, 64 comparisons.
"""

from __future__ import annotations

import datetime as dt
import enum
import itertools
import math
import operator
import re
import threading
import unicodedata
import uuid
from collections import OrderedDict, namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Float,
    Integer,
    String,
    and_,
    bindparam,
    case,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    type_coerce,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.types import NullType

from db.errors import FieldViolation, InvalidArgument

__all__ = [
    "And",
    "Comparison",
    "FieldKind",
    "FilterCompiler",
    "FilterField",
    "FilterShape",
    "Literal",
    "LiteralKind",
    "Node",
    "Not",
    "Or",
    "parse_filter",
]

FILTER_FIELD = "filter"
MAX_LENGTH = 2048
MAX_DEPTH = 32
MAX_COMPARISONS = 64
_CACHE_SIZE = 512

INVALID_FILTER = "INVALID_FILTER"
UNKNOWN_FILTER_FIELD = "UNKNOWN_FILTER_FIELD"
INVALID_FILTER_VALUE = "INVALID_FILTER_VALUE"
UNSUPPORTED_FILTER_OPERATOR = "UNSUPPORTED_FILTER_OPERATOR"

_WHITESPACE = " \t\r\n"
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_PATH_RE = re.compile(rf"{_IDENT}(?:\.{_IDENT})*")
_NUMBER_RE = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_INT_RE = re.compile(r"-?[0-9]+")
_COMPARATORS = ("<=", ">=", "!=", "<", ">", "=", ":")
_ESCAPES = {"\\": "\\", '"': '"', "'": "'", "*": "*", "n": "\n", "t": "\t", "r": "\r"}
_KEYWORDS = ("AND", "OR", "NOT")
_DIGITS = frozenset("0123456789")
_INT64 = (-(2**63), 2**63 - 1)


def _error(reason: str, description: str) -> InvalidArgument:
    """The one way this module reports a problem: InvalidArgument on the `filter` field."""
    return InvalidArgument(
        f"invalid filter: {description}",
        reason=reason,
        violations=[FieldViolation(FILTER_FIELD, description, reason)],
        metadata={"field": FILTER_FIELD},
    )


def _quote(text: str, limit: int = 40) -> str:
    """A short, printable rendering of user text for error descriptions."""
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr(shown)


# --------------------------------------------------------------------------------------- tokens


class TokenType(enum.Enum):
    LPAREN = "'('"
    RPAREN = "')'"
    AND = "AND"
    OR = "OR"
    NOT = "NOT"
    MINUS = "'-'"
    COMPARATOR = "comparator"
    PATH = "name"
    STRING = "string"
    NUMBER = "number"
    STAR = "'*'"
    EOF = "end of filter"


@dataclass(frozen=True)
class Token:
    type: TokenType
    text: str  # source text; for STRING the unescaped value
    position: int
    wildcard: bool = False  # STRING ending in an unescaped '*'

    def describe(self) -> str:
        """How an error message names this token."""
        if self.type is TokenType.EOF:
            return "end of filter"
        if self.type is TokenType.STRING:
            return f"string {_quote(self.text)}"
        return _quote(self.text)


def _check_characters(text: str) -> None:
    """Rejects control characters (except ordinary whitespace) and lone surrogates."""
    for position, char in enumerate(text):
        if char in _WHITESPACE or char.isprintable():
            continue
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise _error(INVALID_FILTER, f"control character U+{ord(char):04X} at position {position} is not allowed")


class _Tokenizer:
    """Splits filter text into tokens in one linear pass."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._pos = 0

    def tokens(self) -> list[Token]:
        result: list[Token] = []
        while True:
            token = self._next()
            result.append(token)
            if token.type is TokenType.EOF:
                return result

    def _next(self) -> Token:
        text = self._text
        while self._pos < len(text) and text[self._pos] in _WHITESPACE:
            self._pos += 1
        start = self._pos
        if start >= len(text):
            return Token(TokenType.EOF, "", start)
        char = text[start]
        if char in "()":
            self._pos += 1
            return Token(TokenType.LPAREN if char == "(" else TokenType.RPAREN, char, start)
        if char in "\"'":
            return self._string(char)
        if char == "*":
            self._pos += 1
            return Token(TokenType.STAR, char, start)
        for comparator in _COMPARATORS:
            if text.startswith(comparator, start):
                self._pos += len(comparator)
                return Token(TokenType.COMPARATOR, comparator, start)
        if char in _DIGITS or (char == "-" and text[start + 1 : start + 2] in _DIGITS):
            return self._number()
        if char == "-":
            self._pos += 1
            return Token(TokenType.MINUS, char, start)
        match = _PATH_RE.match(text, start)
        if match:
            return self._path(match)
        raise _error(INVALID_FILTER, f"unexpected character {char!r} at position {start}")

    def _string(self, quote: str) -> Token:
        text, start = self._text, self._pos
        chars: list[str] = []
        escaped_last = False
        pos = start + 1
        while pos < len(text):
            char = text[pos]
            if char == quote:
                self._pos = pos + 1
                wildcard = bool(chars) and chars[-1] == "*" and not escaped_last
                return Token(TokenType.STRING, "".join(chars), start, wildcard)
            if char == "\\":
                escape = text[pos + 1 : pos + 2]
                if escape not in _ESCAPES:
                    shown = repr("\\" + escape) if escape else "'\\' at end of filter"
                    raise _error(INVALID_FILTER, f"invalid escape {shown} at position {pos}")
                chars.append(_ESCAPES[escape])
                escaped_last = True
                pos += 2
                continue
            chars.append(char)
            escaped_last = False
            pos += 1
        raise _error(INVALID_FILTER, f"unterminated string starting at position {start}")

    def _number(self) -> Token:
        start = self._pos
        match = _NUMBER_RE.match(self._text, start)
        assert match is not None  # the caller saw a digit
        end = match.end()
        following = self._text[end : end + 1]
        if following and (following.isalnum() or following in "._"):
            bad = re.match(r"[^\s()]*", self._text[start:])
            raise _error(INVALID_FILTER, f"invalid number {_quote(bad.group() if bad else '')} at position {start}")
        self._pos = end
        return Token(TokenType.NUMBER, match.group(), start)

    def _path(self, match: re.Match[str]) -> Token:
        start, end = match.start(), match.end()
        if self._text[end : end + 1] == ".":
            bad = _quote(self._text[start : end + 1])
            raise _error(INVALID_FILTER, f"invalid field path {bad} at position {start}")
        word = match.group()
        self._pos = end
        if word in _KEYWORDS:
            return Token(TokenType[word], word, start)
        return Token(TokenType.PATH, word, start)


# ------------------------------------------------------------------------------------------ AST


class LiteralKind(enum.Enum):
    STRING = "string"  # quoted
    TEXT = "text"  # bare word, used as a string
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    NULL = "null"
    STAR = "*"


@dataclass(frozen=True)
class Literal:
    """A comparison's right-hand side; `text` is the unescaped string or the source text."""

    kind: LiteralKind
    text: str
    position: int
    wildcard: bool = False

    def describe(self) -> str:
        """How an error message names this literal."""
        if self.kind is LiteralKind.STRING:
            return f"string {_quote(self.text)}"
        return _quote(self.text)


@dataclass(frozen=True)
class Comparison:
    """`path op value`, e.g. `preferences.theme = "dark"` is (("preferences", "theme"), "=", ...)."""

    path: tuple[str, ...]
    op: str
    value: Literal
    position: int
    op_position: int

    @property
    def name(self) -> str:
        return ".".join(self.path)


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class And:
    operands: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    operands: tuple[Node, ...]


Node: TypeAlias = "Comparison | Not | And | Or"


def _combine(cls: type[And] | type[Or], parts: list[Node]) -> Node:
    """One node for several operands, flattening nested nodes of the same class."""
    if len(parts) == 1:
        return parts[0]
    flat: list[Node] = []
    for part in parts:
        flat.extend(part.operands if isinstance(part, cls) else (part,))
    return cls(tuple(flat))


# --------------------------------------------------------------------------------------- parser

_TERM_START = frozenset({TokenType.LPAREN, TokenType.PATH, TokenType.NOT, TokenType.MINUS})
_LITERAL_WORDS = {"true": LiteralKind.BOOL, "false": LiteralKind.BOOL, "null": LiteralKind.NULL}


class _Parser:
    """Recursive descent over the grammar in the module docstring; depth is bounded by MAX_DEPTH."""

    def __init__(self, tokens: list[Token]) -> None:
        self._tokens = tokens
        self._index = 0
        self._depth = 0
        self._comparisons = 0

    def parse(self) -> Node:
        node = self._expression()
        token = self._peek()
        if token.type is not TokenType.EOF:
            raise _error(INVALID_FILTER, f"unexpected {token.describe()} at position {token.position}")
        return node

    def _peek(self) -> Token:
        return self._tokens[self._index]

    def _advance(self) -> Token:
        token = self._tokens[self._index]
        if token.type is not TokenType.EOF:
            self._index += 1
        return token

    def _accept(self, kind: TokenType) -> bool:
        if self._peek().type is kind:
            self._advance()
            return True
        return False

    def _enter(self, token: Token) -> None:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise _error(INVALID_FILTER, f"filter nested deeper than {MAX_DEPTH} levels at position {token.position}")

    def _expression(self) -> Node:
        parts = [self._sequence()]
        while self._accept(TokenType.AND):
            parts.append(self._sequence())
        return _combine(And, parts)

    def _sequence(self) -> Node:
        parts = [self._factor()]
        while self._peek().type in _TERM_START:
            parts.append(self._factor())
        return _combine(And, parts)

    def _factor(self) -> Node:
        parts = [self._term()]
        while self._accept(TokenType.OR):
            parts.append(self._term())
        return _combine(Or, parts)

    def _term(self) -> Node:
        negations = 0
        while self._peek().type in (TokenType.NOT, TokenType.MINUS):
            self._enter(self._advance())
            negations += 1
        node = self._simple()
        for _ in range(negations):
            node = Not(node)
        self._depth -= negations
        return node

    def _simple(self) -> Node:
        token = self._peek()
        if token.type is TokenType.LPAREN:
            self._enter(self._advance())
            node = self._expression()
            closing = self._peek()
            if closing.type is not TokenType.RPAREN:
                raise _error(
                    INVALID_FILTER,
                    f"expected ')' to close '(' at position {token.position}, "
                    f"found {closing.describe()} at position {closing.position}",
                )
            self._advance()
            self._depth -= 1
            return node
        if token.type is TokenType.PATH:
            return self._restriction()
        raise _error(
            INVALID_FILTER, f"expected a field name or '(' but found {token.describe()} at position {token.position}"
        )

    def _restriction(self) -> Comparison:
        field = self._advance()
        comparator = self._peek()
        if comparator.type is not TokenType.COMPARATOR:
            raise _error(
                INVALID_FILTER,
                f"expected a comparison operator after {_quote(field.text)} at position {comparator.position}, "
                f"found {comparator.describe()}",
            )
        self._advance()
        value = self._literal(comparator)
        self._comparisons += 1
        if self._comparisons > MAX_COMPARISONS:
            raise _error(
                INVALID_FILTER,
                f"filter has more than {MAX_COMPARISONS} comparisons (the one at position {field.position})",
            )
        return Comparison(tuple(field.text.split(".")), comparator.text, value, field.position, comparator.position)

    def _literal(self, comparator: Token) -> Literal:
        token = self._advance()
        kind = _literal_kind(token)
        if kind is None:
            raise _error(
                INVALID_FILTER,
                f"expected a value after {_quote(comparator.text)} at position {token.position}, found {token.describe()}",
            )
        return Literal(kind, token.text, token.position, token.wildcard)


def _literal_kind(token: Token) -> LiteralKind | None:
    """The kind of literal a token after a comparator is (None: it is none)."""
    if token.type is TokenType.STRING:
        return LiteralKind.STRING
    if token.type is TokenType.NUMBER:
        return LiteralKind.INT if _INT_RE.fullmatch(token.text) is not None else LiteralKind.FLOAT
    if token.type is TokenType.STAR:
        return LiteralKind.STAR
    if token.type is TokenType.PATH:
        return _LITERAL_WORDS.get(token.text, LiteralKind.TEXT)
    return None


def _tokens(text: str) -> list[Token]:
    """The tokens of a non-empty filter, after the checks of its text as a whole."""
    if not isinstance(text, str):
        raise _error(INVALID_FILTER, "filter must be a string")
    if len(text) > MAX_LENGTH:
        raise _error(INVALID_FILTER, f"filter is {len(text)} characters long; the maximum is {MAX_LENGTH}")
    _check_characters(text)
    tokens = _Tokenizer(text).tokens()
    if tokens[0].type is TokenType.EOF:
        raise _error(INVALID_FILTER, "filter is empty")
    return tokens


def parse_filter(text: str) -> Node:
    """Parses a non-empty AIP-160 filter into an AST; raises InvalidArgument on any problem."""
    return _Parser(_tokens(text)).parse()


# --------------------------------------------------------------------------------------- shapes
#
# A filter's SHAPE is what decides its SQL: its fields, operators, AND / OR / NOT, the kind of
# each literal (string, number, true, null, '*'...) and a string's trailing wildcard. Its
# literals are not: they are bind parameters (filter_0, filter_1, ... in the order of the text),
# typed as their comparison needs. `id = "a"` and `id = "b"` are one shape: one plan here, one
# List statement (engine/statements.py), one compiled form. Two caches, both bounded by shapes:
#
# - plans, by (compiler, skeleton): a skeleton is the filter's tokens with each literal's text
#   and every position left out. A plan is made from a text whose whole compile succeeded (a
#   refused text caches nothing), so a text of a known skeleton only has its literals converted,
#   in the order of the text: the first refused value is the error the whole compile gives.
# - the SQL of a shape, one clause per plan (FilterShape.clause).


@dataclass(frozen=True)
class FilterShape:
    """A filter without its literals: `key` (equal keys, equal SQL) and `clause`, its SQL with
    the literals as the bind parameters filter_<i>, which every execution must supply."""

    key: tuple[Any, ...]
    clause: ColumnElement[bool] = field(compare=False, repr=False)


@dataclass(frozen=True)
class _Slot:
    """A comparison with values: its literal's number in the text, its shape, its field's name
    as written and its literal's kind."""

    ordinal: int
    descriptor: tuple[Any, ...]
    name: str
    kind: LiteralKind


@dataclass(frozen=True)
class _Plan:
    shape: FilterShape
    slots: tuple[_Slot, ...]


_CacheInfo = namedtuple("_CacheInfo", ["hits", "misses", "maxsize", "currsize"])


class _PlanCache:
    """The plans by (compiler, skeleton), the least recently used dropped past maxsize; with
    cache_info() as functools.lru_cache has it (service/metrics.py reads it)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._plans: OrderedDict[Any, _Plan] = OrderedDict()
        self._lock = threading.Lock()
        self._hits = self._misses = 0

    def get(self, key: Any) -> _Plan | None:
        with self._lock:
            plan = self._plans.get(key)
            if plan is None:
                self._misses += 1
            else:
                self._hits += 1
                self._plans.move_to_end(key)
            return plan

    def put(self, key: Any, plan: _Plan) -> None:
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.maxsize:
                self._plans.popitem(last=False)

    def cache_info(self) -> _CacheInfo:
        with self._lock:
            return _CacheInfo(self._hits, self._misses, self.maxsize, len(self._plans))

    def cache_clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self._hits = self._misses = 0


plans = _PlanCache(_CACHE_SIZE)


def _skeleton(tokens: list[Token]) -> tuple[tuple[Any, ...], list[Token]]:
    """(the tokens without their literals' text and without positions, the literal tokens in
    order). A literal is what follows a comparator; its kind and wildcard stay in the skeleton."""
    out: list[tuple[Any, ...]] = []
    literals: list[Token] = []
    after_comparator = False
    for token in tokens:
        kind = _literal_kind(token) if after_comparator else None
        if kind is None:
            out.append((token.type, token.text))
        else:
            out.append((kind, token.wildcard))
            literals.append(token)
        after_comparator = token.type is TokenType.COMPARATOR
    return tuple(out), literals


def _like_escaped(text: str) -> str:
    """text for LIKE ... ESCAPE '/' (what SQLAlchemy's autoescape does to a literal string)."""
    return text.replace("/", "//").replace("%", "/%").replace("_", "/_")


# ------------------------------------------------------------------------------------- compiler


class FieldKind(enum.Enum):
    STRING = "string"
    UUID = "uuid"
    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    TIMESTAMP = "timestamp"
    DATE = "date"
    ENUM = "enum"
    REPEATED_STRING = "repeated_string"
    JSON = "json"
    RELATED_IDS = "related ids"  # ids of related rows, kept in a link table (a project's member_ids)


@dataclass(frozen=True)
class FilterField:
    """One filterable field: its kind, its column and, for enums, accepted names -> stored value.

    RELATED_IDS: `column` is the row's id, `link` the link table's (column naming the row, column
    naming the related row): `member_ids:"<id>"` is `id IN (SELECT row FROM link WHERE related =
    <id>)`, which the index on the link table's related column serves on both engines."""

    kind: FieldKind
    column: Any
    enum_values: Mapping[str, str] | None = None
    link: tuple[Any, Any] | None = None


_OPERATORS: dict[str, Callable[[Any, Any], ColumnElement[bool]]] = {
    "=": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_EQUALITY = frozenset({"=", "!="})
_ORDERING = frozenset(_OPERATORS)
_ALLOWED_OPERATORS: dict[FieldKind, frozenset[str]] = {
    FieldKind.STRING: _ORDERING | {":"},
    FieldKind.UUID: _EQUALITY,
    FieldKind.INT: _ORDERING,
    FieldKind.FLOAT: _ORDERING,
    FieldKind.BOOL: _EQUALITY,
    FieldKind.TIMESTAMP: _ORDERING,
    FieldKind.DATE: _ORDERING,
    FieldKind.ENUM: _EQUALITY,
    FieldKind.REPEATED_STRING: frozenset({":"}),
    FieldKind.JSON: frozenset({":"}),
    FieldKind.RELATED_IDS: frozenset({":"}),
}
_JSON_PATH_OPERATORS = _ORDERING | {":"}

_TIMESTAMP_RE = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]+))?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))?"
)
_DATE_RE = re.compile(r"([0-9]{4})-([0-9]{2})-([0-9]{2})")
_STRINGISH = frozenset({LiteralKind.STRING, LiteralKind.TEXT})
_SCALAR_TEXT = frozenset({LiteralKind.STRING, LiteralKind.TEXT, LiteralKind.INT, LiteralKind.FLOAT, LiteralKind.BOOL})
# Bind types a comparison names itself; the others take the compared column's type.
_BIND_TYPES: dict[FieldKind, Any] = {
    # BIGINT: PostgreSQL casts the parameter to its type, and INTEGER would overflow.
    FieldKind.INT: BigInteger(),
    FieldKind.FLOAT: Float(),
}


class FilterCompiler:
    """Compiles filter text into a SQLAlchemy boolean expression over an allow-list of fields.

    Three steps per comparison, in the order of the text: _describe (its shape: field, operator,
    kind of literal; refuses unknown fields and operators), _values (its literal as typed
    parameters; refuses bad values) and _sql (the SQL of a shape, with bind parameters)."""

    def __init__(self, fields: Mapping[str, FilterField], dialect_name: str) -> None:
        if dialect_name not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported dialect {dialect_name!r}")
        self._fields = dict(fields)
        self._postgres = dialect_name == "postgresql"
        self._enum_names: dict[str, dict[str, str]] = {}
        for name, spec in self._fields.items():
            if spec.kind is FieldKind.ENUM:
                if not spec.enum_values:
                    raise ValueError(f"enum filter field {name!r} needs enum_values")
                self._enum_names[name] = {key.upper(): value for key, value in spec.enum_values.items()}
            if spec.kind is FieldKind.RELATED_IDS and spec.link is None:
                raise ValueError(f"related ids filter field {name!r} needs its link columns")

    def bind(self, text: str) -> tuple[FilterShape | None, dict[str, Any]]:
        """(shape, its parameters) of filter text: (None, {}) for an empty / whitespace-only
        filter; raises InvalidArgument otherwise on any problem."""
        if not isinstance(text, str):
            raise _error(INVALID_FILTER, "filter must be a string")
        if not text.strip(_WHITESPACE):
            return None, {}
        tokens = _tokens(text)
        skeleton, literals = _skeleton(tokens)
        key = (self, skeleton)
        plan = plans.get(key)
        values: list[Any] = []
        if plan is None:
            plan = self._plan(_Parser(tokens).parse(), values)
            plans.put(key, plan)
        else:
            for slot in plan.slots:
                token = literals[slot.ordinal]
                values.extend(self._values(slot.descriptor, Literal(slot.kind, token.text, token.position, token.wildcard), slot.name))
        return plan.shape, {f"filter_{i}": value for i, value in enumerate(values)}

    def compile(self, text: str) -> ColumnElement[bool] | None:
        """bind(text) as one expression holding its values (None for an empty filter), built
        for this call: for statements that are not cached by shape."""
        shape, params = self.bind(text)
        return None if shape is None else self._clause(shape.key, list(params.values()))

    # -- tree

    def _plan(self, node: Node, values: list[Any]) -> _Plan:
        """The plan of a parsed filter, its values appended to values: each comparison described
        and its literal converted in the order of the text, so the first problem is the error."""
        slots: list[_Slot] = []
        ordinal = 0

        def shape_of(node: Node) -> tuple[Any, ...]:
            nonlocal ordinal
            if isinstance(node, (And, Or)):
                return ("and" if isinstance(node, And) else "or", tuple(shape_of(operand) for operand in node.operands))
            if isinstance(node, Not):
                return ("not", shape_of(node.operand))
            descriptor = self._describe(node)
            converted = self._values(descriptor, node.value, node.name)
            if converted:
                slots.append(_Slot(ordinal, descriptor, node.name, node.value.kind))
                values.extend(converted)
            ordinal += 1
            return descriptor

        key = shape_of(node)
        clause = self._clause(key)
        return _Plan(FilterShape(key, clause), tuple(slots))

    def _clause(self, key: tuple[Any, ...], values: list[Any] | None = None) -> ColumnElement[bool]:
        """The SQL of a shape: its literals as the required parameters filter_0, filter_1, ...,
        or, given their values, as parameters holding them."""
        count = itertools.count()

        def bind(type_: Any = None) -> Any:
            i = next(count)
            if values is not None:  # untyped: typed as the compared expression, not by the value
                return bindparam(f"filter_{i}", values[i], type_=type_ or NullType(), unique=True)
            return bindparam(f"filter_{i}", type_=type_, required=True)

        def build(key: tuple[Any, ...]) -> ColumnElement[bool]:
            if key[0] == "and":
                return and_(*(build(operand) for operand in key[1]))
            if key[0] == "or":
                return or_(*(build(operand) for operand in key[1]))
            if key[0] == "not":
                return not_(build(key[1]))
            return self._sql(key, bind)

        return build(key)

    # -- shapes

    def _describe(self, node: Comparison) -> tuple[Any, ...]:
        """A comparison's shape, ("tag", field, ...); refuses unknown fields and operators."""
        spec = self._field(node)
        field_name, subpath, op, kind = node.path[0], node.path[1:], node.op, node.value.kind
        if kind is LiteralKind.NULL:
            if op not in _EQUALITY:
                raise _error(
                    UNSUPPORTED_FILTER_OPERATOR,
                    f"operator {_quote(op)} at position {node.op_position} cannot compare "
                    f"{_quote(node.name)} with null; use = or !=",
                )
            if spec.kind is FieldKind.RELATED_IDS:
                raise _error(
                    UNSUPPORTED_FILTER_OPERATOR,
                    f"{_quote(node.name)} at position {node.position} is never null; "
                    f"{node.name}:* matches rows with any, NOT {node.name}:* rows with none",
                )
            return ("null", field_name, subpath, op)
        if kind is LiteralKind.STAR:
            if op != ":":
                raise _error(
                    INVALID_FILTER_VALUE,
                    f"'*' at position {node.value.position} is only allowed after ':' (as in {node.name}:*)",
                )
            return ("present", field_name, subpath)
        if subpath:
            self._check_operator(node, FieldKind.JSON, _JSON_PATH_OPERATORS)
            if op == ":":
                return ("json_key", field_name, subpath)
            if kind is LiteralKind.BOOL:
                self._check_operator(node, FieldKind.BOOL, _EQUALITY)
                return ("json_path", field_name, subpath, op, "bool")
            return ("json_path", field_name, subpath, op, "number" if kind in (LiteralKind.INT, LiteralKind.FLOAT) else "string")
        self._check_operator(node, spec.kind, _ALLOWED_OPERATORS[spec.kind])
        if spec.kind is FieldKind.STRING and op == ":":
            return ("contains", field_name)
        if spec.kind is FieldKind.STRING and op in _EQUALITY and node.value.wildcard:
            return ("prefix", field_name, op)
        if spec.kind is FieldKind.REPEATED_STRING:
            return ("element", field_name)
        if spec.kind is FieldKind.JSON:
            return ("json_key", field_name, ())
        if spec.kind is FieldKind.RELATED_IDS:
            return ("related", field_name)
        return ("compare", field_name, op)

    def _field(self, node: Comparison) -> FilterField:
        spec = self._fields.get(node.path[0])
        if spec is None:
            allowed = ", ".join(sorted(self._fields)) or "none"
            raise _error(
                UNKNOWN_FILTER_FIELD,
                f"unknown field {_quote(node.path[0])} at position {node.position}; filterable fields: {allowed}",
            )
        if len(node.path) > 1 and spec.kind is not FieldKind.JSON:
            raise _error(
                UNKNOWN_FILTER_FIELD,
                f"unknown field {_quote(node.name)} at position {node.position}: "
                f"{_quote(node.path[0])} has no subfields",
            )
        return spec

    def _check_operator(self, node: Comparison, kind: FieldKind, allowed: frozenset[str]) -> None:
        if node.op not in allowed:
            ops = " ".join(op for op in (*_OPERATORS, ":") if op in allowed)
            raise _error(
                UNSUPPORTED_FILTER_OPERATOR,
                f"operator {_quote(node.op)} at position {node.op_position} is not supported on "
                f"{kind.value} field {_quote(node.name)}; use one of: {ops}",
            )

    # -- values

    def _values(self, descriptor: tuple[Any, ...], literal_: Literal, name: str) -> tuple[Any, ...]:
        """The parameters of a comparison of this shape, in the order _sql binds them; refuses
        a literal its field cannot take (INVALID_FILTER_VALUE naming it)."""
        tag = descriptor[0]
        if tag in ("null", "present"):
            return ()
        if tag == "json_path":
            json_type = descriptor[4]
            if json_type == "bool":
                return (self._boolean(literal_, name),)
            return (self._number(literal_, name),) if json_type == "number" else (literal_.text,)
        if tag == "contains":
            return (_like_escaped(self._text(literal_, name)),)
        if tag == "prefix":
            prefix = self._text(literal_, name)[:-1]
            return (_like_escaped(prefix), prefix, len(prefix))
        if tag == "element":
            value = self._text(literal_, name)
            return ([value],) if self._postgres else (value,)
        if tag == "json_key":
            return (self._text(literal_, name),)
        if tag == "related":
            if literal_.wildcard:
                raise self._bad_value(literal_, name, _UUID_EXPECTED)
            return (self._uuid(literal_, name),)
        return (_CONVERTERS[self._fields[descriptor[1]].kind](self, literal_, name),)

    def _uuid(self, literal_: Literal, name: str) -> uuid.UUID:
        try:
            if literal_.kind not in _STRINGISH:
                raise ValueError
            return uuid.UUID(literal_.text)
        except ValueError:
            raise self._bad_value(literal_, name, _UUID_EXPECTED) from None

    def _int(self, literal_: Literal, name: str) -> int:
        if literal_.kind not in (LiteralKind.INT, LiteralKind.STRING) or not _INT_RE.fullmatch(literal_.text):
            raise self._bad_value(literal_, name, "an integer")
        value = int(literal_.text)
        if not _INT64[0] <= value <= _INT64[1]:
            raise self._bad_value(literal_, name, "an integer in the 64-bit range")
        return value

    def _timestamp(self, literal_: Literal, name: str) -> dt.datetime:
        match = _TIMESTAMP_RE.fullmatch(literal_.text) if literal_.kind in _STRINGISH else None
        expected = 'an RFC 3339 timestamp such as "2026-01-02T03:04:05Z"'
        if match is None:
            raise self._bad_value(literal_, name, expected)
        year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
        if not zulu and not sign:
            raise self._bad_value(literal_, name, f"{expected} with a time zone offset (Z or +hh:mm)")
        try:
            offset = dt.timedelta(hours=int(off_h), minutes=int(off_m)) if sign else dt.timedelta(0)
            tz = dt.timezone(-offset if sign == "-" else offset)
            micros = int((fraction or "0")[:6].ljust(6, "0"))
            value = dt.datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micros, tz)
            # SQLite stores naive UTC text: compare in UTC on every engine.
            return value.astimezone(dt.UTC)
        except (ValueError, OverflowError):
            raise self._bad_value(literal_, name, expected) from None

    def _date(self, literal_: Literal, name: str) -> dt.date:
        match = _DATE_RE.fullmatch(literal_.text) if literal_.kind in _STRINGISH else None
        try:
            if match is None:
                raise ValueError
            return dt.date(*(int(part) for part in match.groups()))
        except ValueError:
            raise self._bad_value(literal_, name, 'a date such as "2026-01-02"') from None

    def _enum(self, literal_: Literal, name: str) -> str:
        names = self._enum_names[name]
        stored = names.get(literal_.text.upper()) if literal_.kind in _STRINGISH else None
        if stored is None:
            raise self._bad_value(literal_, name, "one of: " + ", ".join(sorted(names)))
        return stored

    def _bad_value(self, literal_: Literal, name: str, expected: str) -> InvalidArgument:
        return _error(
            INVALID_FILTER_VALUE,
            f"invalid value {literal_.describe()} at position {literal_.position} "
            f"for field {_quote(name)}: expected {expected}",
        )

    def _text(self, literal_: Literal, name: str) -> str:
        if literal_.kind not in _SCALAR_TEXT:
            raise self._bad_value(literal_, name, "a string")
        return literal_.text

    def _number(self, literal_: Literal, name: str) -> float:
        numeric = literal_.kind in (LiteralKind.INT, LiteralKind.FLOAT) or (
            literal_.kind is LiteralKind.STRING and _NUMBER_RE.fullmatch(literal_.text)
        )
        value = float(literal_.text) if numeric else math.nan
        if not math.isfinite(value):
            raise self._bad_value(literal_, name, "a finite number")
        return value

    def _boolean(self, literal_: Literal, name: str) -> bool:
        if literal_.kind in (LiteralKind.BOOL, *_STRINGISH) and literal_.text.lower() in ("true", "false"):
            return literal_.text.lower() == "true"
        raise self._bad_value(literal_, name, "true or false")

    # -- SQL

    def _sql(self, descriptor: tuple[Any, ...], bind: Callable[..., Any]) -> ColumnElement[bool]:
        """The SQL of a comparison's shape; bind(type_=None) makes its next parameter (a type of
        None: the compared expression's)."""
        tag, spec = descriptor[0], self._fields[descriptor[1]]
        column: Any = spec.column
        if tag == "null":
            return self._null_check(spec, descriptor[2], descriptor[3])
        if tag == "present":
            return self._presence(spec, descriptor[2])
        if tag == "json_path":
            return self._json_path(column, descriptor[2], descriptor[3], descriptor[4], bind)
        if tag == "json_key":
            return self._has_key(column, descriptor[2], bind)
        if tag == "contains":
            return column.icontains(bind(), escape="/")
        if tag == "prefix":
            escaped, prefix, length = bind(), bind(String()), bind(Integer())
            like = column.startswith(escaped, escape="/")
            if not self._postgres:
                # SQLite's LIKE ignores ASCII case; the prefix match must be as case-sensitive as '='.
                like = and_(like, func.substr(column, 1, length) == prefix)
            return like if descriptor[2] == "=" else not_(like)
        if tag == "element":
            if self._postgres:
                # Two-valued like SQLite's EXISTS, so that NOT agrees on both engines for NULL columns.
                return case((func.jsonb_typeof(column) == "array", self._jsonb(column).contains(bind())), else_=false())
            elements = func.json_each(column).table_valued("value")
            return exists(select(literal(1)).select_from(elements).where(elements.c.value == bind(String())))
        if tag == "related":
            assert spec.link is not None
            row, related = spec.link
            # Two-valued (a row id is never NULL), so NOT member_ids:"<id>" is every other row.
            return column.in_(select(row).where(related == bind()))
        return _OPERATORS[descriptor[2]](column, bind(_BIND_TYPES.get(spec.kind)))

    def _null_check(self, spec: FilterField, subpath: tuple[str, ...], op: str) -> ColumnElement[bool]:
        if spec.kind is FieldKind.JSON and not subpath:
            absent = self._json_absent(spec.column)
            return absent if op == "=" else not_(absent)
        # JSON paths: missing keys and JSON null both extract as SQL NULL on both engines.
        target: ColumnElement[Any] = spec.column[subpath].as_string() if subpath else spec.column
        return target.is_(None) if op == "=" else target.is_not(None)

    def _json_absent(self, column: Any) -> ColumnElement[bool]:
        """A JSON column that holds nothing: SQL NULL, or JSON null (as rows written before every
        path wrote SQL NULL hold it)."""
        kind = func.jsonb_typeof(self._jsonb(column)) if self._postgres else func.json_type(column)
        return or_(column.is_(None), kind == "null")

    def _presence(self, spec: FilterField, subpath: tuple[str, ...]) -> ColumnElement[bool]:
        column: ColumnElement[Any] = spec.column
        if subpath:
            if self._postgres:
                return self._jsonb(column)[subpath].is_not(None)
            return func.json_type(column, _sqlite_json_path(subpath)).is_not(None)
        if spec.kind is FieldKind.STRING:
            return and_(column.is_not(None), column != "")
        if spec.kind is FieldKind.REPEATED_STRING:
            length: ColumnElement[Any]
            if self._postgres:
                # jsonb_array_length raises on non-arrays; CASE keeps it from being evaluated there.
                length = case((func.jsonb_typeof(column) == "array", func.jsonb_array_length(column)), else_=0)
            else:
                length = func.json_array_length(column)
            return and_(column.is_not(None), length > 0)
        if spec.kind is FieldKind.JSON:
            return not_(self._json_absent(column))
        if spec.kind is FieldKind.RELATED_IDS:
            assert spec.link is not None
            row, _ = spec.link
            # Correlated to the filtered row, whichever statement holds the filter.
            return exists(select(literal(1)).where(row == column).correlate_except(row.table))
        return column.is_not(None)

    def _json_path(self, column: Any, subpath: tuple[str, ...], op: str, json_type: str, bind: Callable[..., Any]) -> ColumnElement[bool]:
        extracted: Any
        json_types: tuple[str, tuple[str, ...]]
        if json_type == "bool":
            extracted, value = column[subpath].as_boolean(), bind()
            json_types = ("boolean", ("true", "false"))
        elif json_type == "number":
            extracted, value = column[subpath].as_float(), bind(Float())
            json_types = ("number", ("integer", "real"))
        else:
            extracted, value = column[subpath].as_string(), bind()
            json_types = ("string", ("text",))
        # The casts raise on PostgreSQL for a value of another JSON type; CASE guards them.
        guarded = case((self._json_type_in(column, subpath, *json_types), extracted))
        return _OPERATORS[op](guarded, value)

    def _json_type_in(
        self, column: Any, subpath: tuple[str, ...], postgres_type: str, sqlite_types: tuple[str, ...]
    ) -> ColumnElement[bool]:
        if self._postgres:
            return func.jsonb_typeof(self._jsonb(column)[subpath]) == postgres_type
        return func.json_type(column, _sqlite_json_path(subpath)).in_(sqlite_types)

    def _has_key(self, column: Any, subpath: tuple[str, ...], bind: Callable[..., Any]) -> ColumnElement[bool]:
        if self._postgres:
            target = self._jsonb(column)[subpath] if subpath else self._jsonb(column)
            return case((func.jsonb_typeof(target) == "object", target.has_key(bind(String()))), else_=false())
        # json_each compares the key as a bound value: no JSON-path quoting of user text.
        args = (column, _sqlite_json_path(subpath)) if subpath else (column,)
        entries = func.json_each(*args).table_valued("key")
        return exists(select(literal(1)).select_from(entries).where(entries.c.key == bind(String())))

    @staticmethod
    def _jsonb(column: Any) -> Any:
        return type_coerce(column, postgresql.JSONB())


_UUID_EXPECTED = 'a UUID such as "123e4567-e89b-12d3-a456-426614174000"'

# How the literal of a plain comparison becomes its parameter, by the field's kind.
_CONVERTERS: dict[FieldKind, Callable[[FilterCompiler, Literal, str], Any]] = {
    FieldKind.STRING: FilterCompiler._text,
    FieldKind.UUID: FilterCompiler._uuid,
    FieldKind.INT: FilterCompiler._int,
    FieldKind.FLOAT: FilterCompiler._number,
    FieldKind.BOOL: FilterCompiler._boolean,
    FieldKind.TIMESTAMP: FilterCompiler._timestamp,
    FieldKind.DATE: FilterCompiler._date,
    FieldKind.ENUM: FilterCompiler._enum,
}


def _sqlite_json_path(subpath: tuple[str, ...]) -> str:
    """`$."a"."b"`; safe to build as text because path segments are identifiers."""
    return "$" + "".join(f'."{segment}"' for segment in subpath)
