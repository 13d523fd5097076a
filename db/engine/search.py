"""Full-text search: tsvector + GIN on PostgreSQL, FTS5 on SQLite, both kept in sync on write.

PostgreSQL keeps each searchable table's tsvector in a stored generated column,
`search_vector`, with a GIN index on it (migration 0020; before it, the GIN index was on the
expression, and ranking a hit rebuilt its tsvector from the text: 2.8 s for 300 hits of 42 KiB,
bench/search_window_text.py);
SQLite keeps an external-content FTS5 table up to date with triggers. Both are created by the
migrations through the DDL helpers below, and queried through `search_terms`; `rebuild_index`
(`nexus-data search rebuild`) builds either afresh from its table.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from collections.abc import Iterable
from typing import Any

from sqlalchemy import String, bindparam, column, func, literal_column, table, text
from sqlalchemy.engine import Engine
from sqlalchemy.sql.elements import ColumnClause, ColumnElement

from db.errors import InvalidArgument
from db.migrate import SEARCH_VECTOR

# The weight of a word found in a field of weight A..D: PostgreSQL's ts_rank applies its own
# {0.1, 0.2, 0.4, 1.0} to D..A; SQLite's score uses these (see _sqlite_score).
_SQLITE_WEIGHT = {"A": 10.0, "B": 4.0, "C": 2.0, "D": 1.0}
# PostgreSQL's English stop words (tsearch_data/english.stop, which the 'english' configuration
# drops from a query and from the text): SQLite's search leaves them out of a query too, so both
# databases match and score the same words.
STOP_WORDS = frozenset({
    "i", "me", "my", "myself", "we", "our", "ours", "ourselves", "you", "your", "yours",
    "yourself", "yourselves", "he", "him", "his", "himself", "she", "her", "hers", "herself", "it",
    "its", "itself", "they", "them", "their", "theirs", "themselves", "what", "which", "who",
    "whom", "this", "that", "these", "those", "am", "is", "are", "was", "were", "be", "been",
    "being", "have", "has", "had", "having", "do", "does", "did", "doing", "a", "an", "the", "and",
    "but", "if", "or", "because", "as", "until", "while", "of", "at", "by", "for", "with", "about",
    "against", "between", "into", "through", "during", "before", "after", "above", "below", "to",
    "from", "up", "down", "in", "out", "on", "off", "over", "under", "again", "further", "then",
    "once", "here", "there", "when", "where", "why", "how", "all", "any", "both", "each", "few",
    "more", "most", "other", "some", "such", "no", "nor", "not", "only", "own", "same", "so",
    "than", "too", "very", "s", "t", "can", "will", "just", "don", "should", "now",
})

MAX_QUERY_LENGTH = 1024


class JsonText(str):
    """A searchable column holding JSON (a Struct), by name: the words of its string values are
    searched, never its keys, numbers or punctuation. PostgreSQL indexes to_tsvector of the
    jsonb (which reads string values only); SQLite's triggers put the string values, taken with
    json_tree, into the FTS5 table."""


def _pg_vector_sql(fields: tuple[tuple[str, str], ...]) -> str:
    parts = []
    for col, weight in fields:
        source = f"coalesce({col}, '{{}}'::jsonb)" if isinstance(col, JsonText) else f"coalesce({col}, '')"
        parts.append(f"setweight(to_tsvector('english'::regconfig, {source}), '{weight}')")
    return " || ".join(parts)


def _sqlite_values(fields: tuple[tuple[str, str], ...], row: str) -> str:
    """What the FTS5 table holds of a row (row: "new", "old" or the table's name)."""
    values = []
    for col, _ in fields:
        if isinstance(col, JsonText):
            values.append(f"(SELECT group_concat(value, ' ') FROM json_tree({row}.{col}) WHERE type = 'text')")
        else:
            values.append(f"{row}.{col}")
    return ", ".join(values)


def pg_index_ddl(table_name: str) -> str:
    """The GIN index of the table's stored tsvector."""
    return f"CREATE INDEX ix_{table_name}_search ON {table_name} USING gin ({SEARCH_VECTOR})"


def pg_expression_index_ddl(table_name: str, fields: tuple[tuple[str, str], ...]) -> str:
    """The GIN index on the tsvector expression, as migrations before 0020 made it."""
    return f"CREATE INDEX ix_{table_name}_search ON {table_name} USING gin (({_pg_vector_sql(fields)}))"


def pg_vector_column_ddl(table_name: str, fields: tuple[tuple[str, str], ...]) -> str:
    """The stored tsvector column: computed by the database on each INSERT, and on each UPDATE of
    a column it is made from."""
    return f"ALTER TABLE {table_name} ADD COLUMN {SEARCH_VECTOR} tsvector GENERATED ALWAYS AS ({_pg_vector_sql(fields)}) STORED"


def sqlite_fts_ddl(table_name: str, fields: tuple[tuple[str, str], ...]) -> list[str]:
    """The FTS5 table and the triggers that keep it in sync with `table_name`.

    Trap: an external-content FTS5 table joins on rowid, and SQLite may renumber the implicit
    rowid of a table without an INTEGER PRIMARY KEY on VACUUM. After a VACUUM run
    `nexus-data search rebuild` (rebuild_index of each such table).
    """
    fts = f"{table_name}_fts"
    cols = [c for c, _ in fields]
    col_list = ", ".join(cols)
    new_vals = _sqlite_values(fields, "new")
    old_vals = _sqlite_values(fields, "old")
    return [
        f"CREATE VIRTUAL TABLE {fts} USING fts5({col_list}, content='{table_name}', content_rowid='rowid', tokenize='porter unicode61')",
        f"CREATE TRIGGER {fts}_ai AFTER INSERT ON {table_name} BEGIN "
        f"INSERT INTO {fts}(rowid, {col_list}) VALUES (new.rowid, {new_vals}); END",
        f"CREATE TRIGGER {fts}_ad AFTER DELETE ON {table_name} BEGIN "
        f"INSERT INTO {fts}({fts}, rowid, {col_list}) VALUES ('delete', old.rowid, {old_vals}); END",
        f"CREATE TRIGGER {fts}_au AFTER UPDATE OF {col_list} ON {table_name} BEGIN "
        f"INSERT INTO {fts}({fts}, rowid, {col_list}) VALUES ('delete', old.rowid, {old_vals}); "
        f"INSERT INTO {fts}(rowid, {col_list}) VALUES (new.rowid, {new_vals}); END",
        *sqlite_fts_rebuild(table_name, fields),
    ]


def sqlite_fts_drop(table_name: str) -> list[str]:
    fts = f"{table_name}_fts"
    return [f"DROP TRIGGER IF EXISTS {fts}_{s}" for s in ("ai", "ad", "au")] + [f"DROP TABLE IF EXISTS {fts}"]


def sqlite_fts_rebuild(table_name: str, fields: tuple[tuple[str, str], ...]) -> list[str]:
    """The statements that fill the FTS5 table afresh from its table: FTS5's own rebuild, which
    reads the columns as they are, or for a table with a JSON field the values its triggers
    write (a 'delete' must name what was inserted)."""
    fts = f"{table_name}_fts"
    if not any(isinstance(col, JsonText) for col, _ in fields):
        return [f"INSERT INTO {fts}({fts}) VALUES ('rebuild')"]
    col_list = ", ".join(col for col, _ in fields)
    return [
        f"INSERT INTO {fts}({fts}) VALUES ('delete-all')",
        f"INSERT INTO {fts}(rowid, {col_list}) SELECT rowid, {_sqlite_values(fields, table_name)} FROM {table_name}",
    ]


@dataclass(frozen=True)
class Rebuilt:
    """What rebuild_index did to one table's search index."""

    table_name: str
    index: str  # the FTS5 table (SQLite) or the GIN index (PostgreSQL)
    rows: int  # the table's rows, every one of them in the index now
    action: str  # "rebuilt", or "recreated" where the index (or its triggers) was missing


def rebuild_index(engine: Engine, table_name: str, fields: tuple[tuple[str, str], ...]) -> Rebuilt:
    """Build the search index of `table_name` afresh from the table's rows, whatever it holds now
    (emptied, stale after a VACUUM renumbered rowids, an index left invalid, or missing): the
    same index afterwards however often it runs.

    SQLite: FTS5's rebuild (for JSON fields: delete-all, then every row's values as the triggers
    write them), in one write transaction; the FTS5 table and its triggers are made anew where
    any of them is missing. PostgreSQL: REINDEX INDEX CONCURRENTLY (CREATE INDEX CONCURRENTLY
    where the index is missing): writes and searches go on meanwhile. Where the stored vector
    itself is missing (dropped by hand), it is added first, which rewrites the table under an
    exclusive lock: reads and writes of the table wait for it."""
    if engine.dialect.name == "postgresql":
        index = f"ix_{table_name}_search"
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            no_vector = f"{table_name}.{SEARCH_VECTOR}" in missing_search_objects(engine, table_name)
            if no_vector:  # missing, or not a generated tsvector: made afresh
                conn.execute(text(f"DROP INDEX IF EXISTS {index}"))
                conn.execute(text(f"ALTER TABLE {table_name} DROP COLUMN IF EXISTS {SEARCH_VECTOR}"))
                conn.execute(text(pg_vector_column_ddl(table_name, fields)))
            whole = _pg_index_of_vector(conn, table_name, usable=False)
            if whole:  # invalid or not ready, too: built afresh in place
                conn.execute(text(f"REINDEX INDEX CONCURRENTLY {index}"))
            else:  # missing, or an index of another form under its name
                conn.execute(text(f"DROP INDEX IF EXISTS {index}"))
                conn.execute(text(pg_index_ddl(table_name).replace("CREATE INDEX", "CREATE INDEX CONCURRENTLY", 1)))
            rows = conn.execute(text(f"SELECT count(*) FROM {table_name}")).scalar_one()
        return Rebuilt(table_name, index, rows, "rebuilt" if whole and not no_vector else "recreated")
    fts = f"{table_name}_fts"
    with engine.begin() as conn:
        whole = not _sqlite_missing(conn, table_name)
        statements = sqlite_fts_rebuild(table_name, fields) if whole else [*sqlite_fts_drop(table_name), *sqlite_fts_ddl(table_name, fields)]
        for statement in statements:
            conn.exec_driver_sql(statement)
        rows = conn.execute(text(f"SELECT count(*) FROM {table_name}")).scalar_one()
    return Rebuilt(table_name, fts, rows, "rebuilt" if whole else "recreated")


def missing_search_objects(engine: Engine, table_name: str) -> list[str]:
    """What of the table's search index is missing or unusable: SQLite's FTS5 table and its
    three triggers; PostgreSQL's stored vector (`<table>.search_vector`, a generated tsvector)
    and its GIN index on that column, valid and ready. Empty when the search index is whole."""
    with engine.connect() as conn:
        if engine.dialect.name != "postgresql":
            return _sqlite_missing(conn, table_name)
        missing = []
        vector = conn.execute(text(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = :table "
            "AND column_name = :column AND data_type = 'tsvector' AND is_generated = 'ALWAYS'"
        ), {"table": table_name, "column": SEARCH_VECTOR}).first()
        if vector is None:
            missing.append(f"{table_name}.{SEARCH_VECTOR}")
        index = f"ix_{table_name}_search"
        if not _pg_index_of_vector(conn, table_name, usable=True):
            missing.append(index)
        return missing


def _sqlite_missing(conn: Any, table_name: str) -> list[str]:
    """Which of the table's FTS5 table and its three triggers are missing (SQLite)."""
    fts = f"{table_name}_fts"
    names = set(conn.execute(text("SELECT name FROM sqlite_master WHERE name LIKE :prefix"), {"prefix": f"{fts}%"}).scalars())
    return sorted({fts, f"{fts}_ai", f"{fts}_ad", f"{fts}_au"} - names)


def _pg_index_of_vector(conn: Any, table_name: str, *, usable: bool) -> bool:
    """Whether ix_<table>_search is a GIN index of the table's search_vector column alone (no
    expression, no predicate; storage parameters such as fastupdate are the operator's), and
    if usable, valid and ready too."""
    return bool(conn.execute(text(
        "SELECT (NOT :usable OR (i.indisvalid AND i.indisready)) FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
        "WHERE i.indexrelid = to_regclass(:index) AND i.indrelid = to_regclass(:table) AND am.amname = 'gin' "
        "AND i.indnatts = 1 AND i.indexprs IS NULL AND i.indpred IS NULL AND a.attname = :column"
    ), {"index": f"ix_{table_name}_search", "table": table_name, "column": SEARCH_VECTOR, "usable": usable}).scalar())


@dataclass(frozen=True)
class SearchTerms:
    """What a search adds to a query: a join target (SQLite), a match condition and a score."""

    join: tuple[Any, ColumnElement[bool]] | None
    match: ColumnElement[bool]
    score: ColumnElement[float]


def search_terms(dialect: str, table_name: str, fields: tuple[tuple[str, str], ...]) -> SearchTerms:
    """Match condition and relevance score of a search, with the query as the parameter
    `search_query` (its value from search_query_value): the same expressions for every query,
    so a statement built from them is built and compiled once."""
    query = bindparam("search_query", type_=String())
    if dialect == "postgresql":
        vector: ColumnClause[Any] = literal_column(f"{table_name}.{SEARCH_VECTOR}")
        tsquery = func.plainto_tsquery(literal_column("'english'::regconfig"), query)
        return SearchTerms(None, vector.op("@@")(tsquery), func.ts_rank(vector, tsquery))
    fts_name = f"{table_name}_fts"
    fts = table(fts_name, column("rowid"))
    fts_ref: ColumnClause[Any] = literal_column(fts_name)
    return SearchTerms(
        (fts, literal_column(f"{table_name}.rowid") == fts.c.rowid),
        fts_ref.op("MATCH")(query),
        literal_column(f"({_sqlite_score(table_name, fields)})"),
    )


def _sqlite_score(table_name: str, fields: tuple[tuple[str, str], ...]) -> str:
    """SQLite's score of a matching row: each field's weight times the times the query's words
    occur in it. FTS5's highlight() marks each occurrence with one character, so a field's count
    is the length highlight() adds to it. The score is the row's own, as PostgreSQL's ts_rank
    is: nothing of the other rows enters it. FTS5's bm25() weighs each word by the rows in the
    whole table that hold it, and counting them walks every row of the word: a cost that grew
    with the table (4 ms of a 5 ms window at 1,000,000 tasks), and a score that moved when rows
    were added elsewhere. highlight() reads only the row's own text."""
    fts = f"{table_name}_fts"
    parts = [
        f"{_SQLITE_WEIGHT[weight]} * coalesce(length(highlight({fts}, {i}, char(1), '')) - length({table_name}.{col}), 0)"
        for i, (col, weight) in enumerate(fields)
    ]
    return " + ".join(parts)


def query_words(query: str) -> list[str]:
    """A query's words: runs of letters, digits and the marks that combine with them (the vowel
    signs of Devanagari, a combining accent), as they are written: everything else, the
    underscore included, parts them, and case is the index's to fold (lower-casing first would
    turn "İ" into "i" and a combining dot)."""
    words, word = [], []
    for ch in query:
        if unicodedata.category(ch)[0] in "LNM":
            word.append(ch)
        elif word:
            words.append("".join(word))
            word = []
    if word:
        words.append("".join(word))
    return words


def search_query_value(dialect: str, query: str) -> str:
    """The value of `search_query` for a client's query; INVALID_ARGUMENT for an empty one."""
    if len(query) > MAX_QUERY_LENGTH:
        raise InvalidArgument.field("query", f"must be at most {MAX_QUERY_LENGTH} characters")
    words = query_words(query)
    if not words:
        raise InvalidArgument.field("query", "must contain at least one word", reason="EMPTY_QUERY")
    if dialect == "postgresql":
        return query  # plainto_tsquery: its words, every one required, stop words left out
    # Each word quoted: user text never reaches FTS5's query syntax as operators. A query of stop
    # words only matches nothing, as on PostgreSQL: the empty phrase "" matches no row.
    return " ".join(f'"{w}"' for w in words if w.lower() not in STOP_WORDS) or '""'


def create_search_objects(op: Any, tables: dict[str, tuple[tuple[str, str], ...]], *, stored: bool) -> None:
    """For a migration: the search index of each table: on PostgreSQL the stored tsvector column
    and its GIN index (stored=True, every migration from 0020 on) or the GIN index on the
    expression (stored=False, the migrations before 0020, which made it so); on SQLite the FTS5
    table and its triggers either way."""
    dialect = op.get_bind().dialect.name
    for table_name, fields in tables.items():
        if dialect != "postgresql":
            statements = sqlite_fts_ddl(table_name, fields)
        elif stored:
            statements = [pg_vector_column_ddl(table_name, fields), pg_index_ddl(table_name)]
        else:
            statements = [pg_expression_index_ddl(table_name, fields)]
        for statement in statements:
            op.execute(statement)


def drop_search_objects(op: Any, table_names: Iterable[str]) -> None:
    dialect = op.get_bind().dialect.name
    for table_name in table_names:
        statements = [f"DROP INDEX IF EXISTS ix_{table_name}_search"] if dialect == "postgresql" else sqlite_fts_drop(table_name)
        for statement in statements:
            op.execute(statement)
