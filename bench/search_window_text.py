"""What scoring a Search's window costs as its hits' text grows, by the way each database scores.

    .venv/bin/python bench/search_window_text.py [--db sqlite,postgresql] [--hits 300] [--kib 1,8,42] [--rounds 5] [--pg-db postgres]

For each text size: a table of --hits rows, each a title and a body of about that many KiB of
words drawn from 2,000, every row matching the query word once in each field, indexed as the
service indexes a searchable table (PostgreSQL: the tsvector as a stored generated column with a
GIN index on it, and the GIN index on the expression that migrations before 0020 made; SQLite:
an external-content FTS5 table, `porter unicode61`). Then the window's statement, the matches
read and scored (LIMIT hits + 1), timed in each scoring form; the best of --rounds, ms:

- PostgreSQL: `ts_rank` of the stored vector (the service's, from migration 0020) and of the
  expression, rebuilt from the text for each hit (before);
- SQLite: the field weights times the words' occurrences, counted with `highlight()` (the
  service's), and `bm25()` (before), which reads the index alone.

PostgreSQL: a table is made and dropped in the database --pg-db (default NEXUS_BENCH_PG_DB, else
`postgres`) on 127.0.0.1:5432 as the user postgres without a password, as on the benchmark
machine (`--db sqlite` needs none); SQLite's lives in memory. Written to
bench/results/search_window_text.md, or --results.
"""
from __future__ import annotations

import argparse
import os
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "search_window_text.md"
WORDS = [f"w{i}" for i in range(2000)]
PG_VECTOR = "setweight(to_tsvector('english'::regconfig, coalesce(title, '')), 'A') || setweight(to_tsvector('english'::regconfig, coalesce(body, '')), 'B')"
SQLITE_SCORE = ("10.0 * coalesce(length(highlight(t_fts, 0, char(1), '')) - length(t.title), 0) + "
                "4.0 * coalesce(length(highlight(t_fts, 1, char(1), '')) - length(t.body), 0)")


def rows(hits: int, kib: int, rng: random.Random) -> list[tuple[str, str]]:
    words = kib * 1024 // 5  # "w123 " is about 5 characters
    return [("a needle title", " ".join(rng.choice(WORDS) for _ in range(words)) + " needle") for _ in range(hits)]


def best(run: Any, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return min(times)


def sqlite_case(data: list[tuple[str, str]], hits: int, rounds: int) -> dict[str, float]:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, title TEXT, body TEXT)")
    conn.execute("CREATE VIRTUAL TABLE t_fts USING fts5(title, body, content='t', content_rowid='id', tokenize='porter unicode61')")
    conn.executemany("INSERT INTO t (title, body) VALUES (?, ?)", data)
    conn.execute("INSERT INTO t_fts(t_fts) VALUES ('rebuild')")
    out = {}
    for name, score in (("highlight", SQLITE_SCORE), ("bm25", "-bm25(t_fts, 10.0, 4.0)")):
        sql = (f"SELECT t.id, {score} FROM t JOIN t_fts ON t.id = t_fts.rowid "
               f"WHERE t_fts MATCH '\"needle\"' ORDER BY t_fts.rowid LIMIT {hits + 1}")
        assert len(conn.execute(sql).fetchall()) == hits
        out[name] = best(lambda sql=sql: conn.execute(sql).fetchall(), rounds)
    conn.close()
    return out


def pg_case(data: list[tuple[str, str]], hits: int, rounds: int, dbname: str) -> dict[str, Any]:
    import psycopg2

    conn = psycopg2.connect(host="127.0.0.1", user="postgres", dbname=dbname, connect_timeout=10)
    conn.autocommit = True
    cur = conn.cursor()
    try:
        cur.execute("DROP TABLE IF EXISTS bench_search_window_text")
        cur.execute(f"CREATE TABLE bench_search_window_text (id serial PRIMARY KEY, title text, body text, "
                    f"search_vector tsvector GENERATED ALWAYS AS ({PG_VECTOR}) STORED)")
        cur.executemany("INSERT INTO bench_search_window_text (title, body) VALUES (%s, %s)", data)
        cur.execute("CREATE INDEX bench_swt_stored ON bench_search_window_text USING gin (search_vector)")
        cur.execute(f"CREATE INDEX bench_swt_expression ON bench_search_window_text USING gin (({PG_VECTOR}))")
        cur.execute("VACUUM ANALYZE bench_search_window_text")
        cur.execute("SET jit = off")
        query = "websearch_to_tsquery('english'::regconfig, 'needle')"
        out: dict[str, Any] = {}
        for name, vector in (("stored", "search_vector"), ("expression", f"({PG_VECTOR})")):
            sql = (f"SELECT id, ts_rank({vector}, {query}) FROM bench_search_window_text "
                   f"WHERE {vector} @@ {query} LIMIT {hits + 1}")
            cur.execute(sql)
            assert len(cur.fetchall()) == hits

            def run(sql: str = sql) -> None:
                cur.execute(sql)
                cur.fetchall()

            out[name] = best(run, rounds)
        cur.execute("SELECT pg_size_pretty(sum(pg_column_size(search_vector))), pg_size_pretty(sum(pg_column_size(body))) FROM bench_search_window_text")
        out["sizes"] = cur.fetchone()
        return out
    finally:
        cur.execute("DROP TABLE IF EXISTS bench_search_window_text")
        conn.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--db", default="sqlite,postgresql")
    p.add_argument("--hits", type=int, default=300)
    p.add_argument("--kib", default="1,8,42")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--pg-db", default=os.environ.get("NEXUS_BENCH_PG_DB", "postgres"), help="PostgreSQL database for the table (default NEXUS_BENCH_PG_DB, else postgres)")
    p.add_argument("--results", default=str(RESULTS), help=f"the table's file (default {RESULTS})")
    args = p.parse_args()
    dbs = [d.strip() for d in args.db.split(",") if d.strip()]
    lines = ["# Scoring a Search's window as its hits' text grows", "",
             f"`.venv/bin/python bench/search_window_text.py --db {args.db} --hits {args.hits} --kib {args.kib} --rounds {args.rounds}`, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {args.hits} hits, the window's statement, best of {args.rounds}, ms.", "",
             "| text per hit | " + " | ".join(
                 {"sqlite": "SQLite highlight() (now) | SQLite bm25() (before)",
                  "postgresql": "PostgreSQL stored vector (now) | PostgreSQL expression (before) | vectors / text, PostgreSQL"}[d] for d in dbs) + " |",
             "| ---: | " + " | ".join({"sqlite": "---: | ---:", "postgresql": "---: | ---: | ---:"}[d] for d in dbs) + " |"]
    rng = random.Random(1)
    for kib in (int(k) for k in args.kib.split(",")):
        data = rows(args.hits, kib, rng)
        cells = []
        for d in dbs:
            if d == "sqlite":
                lite = sqlite_case(data, args.hits, args.rounds)
                cells += [f"{lite['highlight']:.1f}", f"{lite['bm25']:.1f}"]
            else:
                pg = pg_case(data, args.hits, args.rounds, args.pg_db)
                cells += [f"{pg['stored']:.1f}", f"{pg['expression']:.1f}", f"{pg['sizes'][0]} / {pg['sizes'][1]}"]
        lines.append(f"| {kib} KiB | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    Path(args.results).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
