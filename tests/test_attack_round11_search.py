"""Round 11: a Search scored by its own row (SQLite: weight x occurrences counted with
highlight(); PostgreSQL: ts_rank of the stored `search_vector` of migration 0020), migration 0020
run by an operator on a bad day, and bench/search_window_text.py as a newcomer runs it.

Tests that failed on what the attack found say so in their docstring ("Finding"), each fixed
since (a query's words read alike on both databases, stop words left out; 0020 tolerant of
missing indexes and keeping the expression's index for a rollout; check-schema and search
rebuild finding and restoring a missing stored vector; the benchmark script's database
setting); the others are probes that held ("Holds"). The finding that every searchable table
stays locked until the whole of 0020 is done is answered by README, not by a test."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf import struct_pb2
from nexus.knowledge.v1 import knowledge_pb2 as kpb
from nexus.work.v1 import work_pb2 as wpb
from sqlalchemy.pool import NullPool

from db import migrate
from db.database import Database
from db.engine.search import rebuild_index
from tests.conftest import Client, ServerThread, connect, make_config
from tests.databases import fresh_postgres_database
from tests.support import new_project, new_task, new_user
from tests.test_access import Actor, actor  # noqa: F401 - the fixture

ROOT = Path(__file__).resolve().parent.parent
TASK_FIELDS = (("title", "A"), ("description", "B"))


def _migration_0020() -> Any:
    spec = importlib.util.spec_from_file_location("m0020", ROOT / "migrations" / "versions" / "0020_stored_search_vectors.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _word(prefix: str) -> str:
    """A unique word of letters only: the stemmers (porter on SQLite, snowball on PostgreSQL)
    leave a word with digits alone on one side and not the other."""
    return prefix + "".join(chr(ord("a") + int(c, 16) % 26) for c in uuid.uuid4().hex[:10])


def _sql(url: str, *statements: str) -> list[Any]:
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            out = []
            for s in statements:
                result = conn.exec_driver_sql(s)
                out.append(result.scalar() if result.returns_rows else None)
            return out
    finally:
        engine.dispose()


def _task_hits(c: Client, query: str, **kw: Any) -> list[tuple[str, float]]:
    page = c.work.SearchTasks(wpb.SearchTasksRequest(query=query, page_size=1000, **kw))
    return [(r.task.id, r.score) for r in page.results]


@pytest.fixture
def pg_url() -> Iterator[str]:
    with fresh_postgres_database("nexus_atk20") as url:
        yield url


# ------------------------------------------------------------------ SQLite's score, both databases


def test_sqlite_score_is_weight_times_occurrences_and_postgresql_ranks_alike(client: Client) -> None:
    """Holds: a task's score on SQLite is 10 x the query's words in its title + 4 x in its
    description (stems counted: "backups" finds "backup"; a word repeated in the query counts an
    occurrence once; punctuation is no word); every hit is positive; identical rows score alike;
    PostgreSQL puts the same first and last (it weighs a title word above three description
    words, SQLite below: README gives each database its own formula)."""
    w = _word("stoat")
    project = new_project(client)
    made = {
        "t1": new_task(client, project, title=f"{w}"),
        "t1b": new_task(client, project, title=f"{w}"),  # identical row
        "t1d1": new_task(client, project, title=f"{w}", description=f"{w}"),
        "d3": new_task(client, project, title="plain", description=f"{w}, {w}! ({w})"),
        "d1": new_task(client, project, title="plain", description=f"only one {w}s here"),
        "long": new_task(client, project, title="plain", description="lorem ipsum " * 5400 + w),
    }
    names = {t.id: n for n, t in made.items()}
    for query in (w, f"{w} {w}", f"{w}s", f"{w}!!", f'"{w}"', f"{w.upper()}"):
        hits = _task_hits(client, query)
        scores = {names[i]: s for i, s in hits}
        assert set(scores) == set(made), query
        assert all(s > 0 for s in scores.values()), (query, scores)
        assert scores["t1"] == scores["t1b"]
        order = [names[i] for i, _ in hits]
        assert order[0] == "t1d1" and order.index("t1") < order.index("d1") and order.index("d3") < order.index("d1"), (query, order)
        if client.backend == "sqlite":
            assert scores == {"t1": 10.0, "t1b": 10.0, "t1d1": 14.0, "d3": 12.0, "d1": 4.0, "long": 4.0}, (query, scores)


def test_scores_are_the_same_on_every_page_and_under_a_filter(client: Client) -> None:
    """Holds: a walk of one hit a page gives each hit the score it has on one big page, in
    (score desc, id) order, and a filter that keeps a hit leaves its score as it is."""
    w = _word("marten")
    project = new_project(client)
    for i in range(12):
        new_task(client, project, title=" ".join([w] * (i % 4 + 1)), description=f"{w} x" if i % 2 else "y")
    whole = dict(_task_hits(client, w))
    walked: list[tuple[str, float]] = []
    token = ""
    while True:
        page = client.work.SearchTasks(wpb.SearchTasksRequest(query=w, page_size=1, page_token=token))
        walked += [(r.task.id, r.score) for r in page.results]
        assert page.total_size == 12
        token = page.next_page_token
        if not token:
            break
    assert dict(walked) == whole and len(walked) == 12
    assert [(-s, i) for i, s in walked] == sorted((-s, i) for i, s in walked)
    filtered = _task_hits(client, w, filter=f'project_id = "{project.id}" AND title = "{w} {w}*"')
    assert filtered and all(whole[i] == s for i, s in filtered)


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(values)
    return s


def test_a_documents_json_content_scores_its_string_values_however_it_is_written(client: Client, actor: Callable[..., Actor]) -> None:
    """Holds: a Document's content is JSON stored with escapes (\\n, \\", \\\\), unicode, numbers,
    nested lists, and the word as a key. SQLite counts the word's occurrences in the string
    values only (4 each, field B): 3 in `three_*`, 2 in `two_*`, 1 in `one_*`, the key nothing;
    PostgreSQL ranks the three groups in the same order; identical contents score alike."""
    owner = actor()
    w = _word("quoll")
    contents = {
        "three_escapes": {"a": f"x\n{w}\n\"{w}\" \\\\ {w}"},
        "three_unicode": {"a": f"\u00e9\u00e9 {w} \u00fcn\u00ef {w} \u65e5\u672c\u8a9e \U0001F600{w}"},
        "three_nested": {"l": [[w, [w, {"k": w}]], 3, True, None], "n": 1.5},
        "three_after_many_keys": {**{f"k{i:03}": "\u00e9" for i in range(150)}, "zz": f"{w} {w} {w}"},
        "two_tabs": {"a": "\t\r\b\f" * 30 + f" {w} " + "\\" * 40 + f" {w}"},
        "two_tabs_again": {"a": "\t\r\b\f" * 30 + f" {w} " + "\\" * 40 + f" {w}"},
        "one_keyed": {w: f"the {w}", f"{w}{w}": 7},
        "one_numbers": {"m": [1, 2.5, -3e10], "s": w},
    }
    ids = {}
    for name, content in contents.items():
        document = kpb.Document(title="Plain title", kind=kpb.DOCUMENT_KIND_WORD, content=_struct(content))
        ids[owner.c.knowledge.CreateDocument(kpb.CreateDocumentRequest(document=document)).id] = name
    found = owner.c.knowledge.SearchDocuments(kpb.SearchDocumentsRequest(query=w, page_size=100))
    scores = {ids[r.document.id]: r.score for r in found.results}
    assert set(scores) == set(contents) and found.total_size == len(contents)
    assert all(s > 0 for s in scores.values())
    groups = {name: name.split("_")[0] for name in contents}
    for group in ("three", "two", "one"):
        assert len({s for n, s in scores.items() if groups[n] == group}) == 1, (group, scores)
    three, two, one = (next(s for n, s in scores.items() if groups[n] == g) for g in ("three", "two", "one"))
    assert three > two > one
    if client.backend == "sqlite":
        assert (three, two, one) == (12.0, 8.0, 4.0)


def test_a_common_word_in_the_query_does_not_outrank_the_rare_one(client: Client) -> None:
    """Finding (SQLite, new with this scoring): for the query "the <word>" a task holding <word>
    three times must rank above one holding it once, as PostgreSQL ranks them (its english
    configuration drops "the"). SQLite now adds every occurrence of "the" to the score at full
    weight (bm25 gave a word in every row almost none), so the task with five "the" and one
    <word> (60) outranks the one with three <word> (40): the ranking follows the filler word
    and differs between the databases for the same data."""
    w = _word("lynx")
    project = new_project(client)
    rare = new_task(client, project, title=f"the {w} {w} {w}")
    filler = new_task(client, project, title=f"the the the the the {w}")
    hits = _task_hits(client, f"the {w}")
    assert [i for i, _ in hits] == [rare.id, filler.id], hits


def test_every_hit_of_a_query_with_a_negated_word_scores_above_zero(client: Client) -> None:
    """Finding (PostgreSQL; pre-existing, not made by this change): websearch_to_tsquery reads
    `-word` as NOT word, so the query `-<word>` returns tasks that do NOT hold the word (every
    other task of the table, up to the window) each with score 0.0; SQLite reads the same
    query as <word> and returns the task holding it, score 4. A hit's score should be positive
    and the two databases should find the same rows for the same query."""
    w = _word("ermine")
    holder = new_task(client, title="plain", description=f"a {w}")
    new_task(client, title=_word("other"))
    hits = _task_hits(client, f"-{w}")
    assert all(s > 0 for _, s in hits), [s for _, s in hits][:5]
    assert [i for i, _ in hits] == [holder.id]


def test_search_documents_shows_a_reader_only_what_is_shared_and_scores_it_as_for_the_owner(client: Client, actor: Callable[..., Actor]) -> None:
    """Holds: a user searching documents sees, counts and scores only those shared with them,
    with the score the owner sees; a soft-deleted one is in neither's hits."""
    owner, reader = actor(), actor()
    w = _word("genet")
    made = [owner.c.knowledge.CreateDocument(kpb.CreateDocumentRequest(document=kpb.Document(
        title=f"{w} " * (i + 1), kind=kpb.DOCUMENT_KIND_WORD, content=_struct({"a": f"{w} text"})))) for i in range(4)]
    owner.c.knowledge.ShareDocument(kpb.ShareDocumentRequest(document_id=made[1].id, user_id=reader.id, level=kpb.DOCUMENT_SHARE_LEVEL_VIEW))
    owner.c.knowledge.DeleteDocument(kpb.DeleteDocumentRequest(id=made[3].id))
    mine = owner.c.knowledge.SearchDocuments(kpb.SearchDocumentsRequest(query=w))
    theirs = reader.c.knowledge.SearchDocuments(kpb.SearchDocumentsRequest(query=w))
    assert {r.document.id for r in mine.results} == {d.id for d in made[:3]} and mine.total_size == 3
    assert [r.document.id for r in theirs.results] == [made[1].id] and theirs.total_size == 1
    assert theirs.results[0].score == {r.document.id: r.score for r in mine.results}[made[1].id]


# ------------------------------------------------------------------ migration 0020 (PostgreSQL)


def _serve(url: str) -> tuple[ServerThread, Client]:
    server = ServerThread(make_config(url)).start()
    return server, connect("postgresql", url, server)


def test_0020_upgrades_a_database_restored_at_0019_without_its_search_indexes(pg_url: str) -> None:
    """Finding: README sends an operator whose restore came back without indexes to `nexus-data
    search rebuild`, which needs the schema at head. A database at 0019 without
    ix_tasks_search (a restore of the tables alone) cannot reach head: 0020 runs
    `DROP INDEX ix_tasks_search` (no IF EXISTS) and fails ("index ... does not exist"; the CLI
    says the database "cannot be used ... (DATABASE_URL)"), and rebuild refuses (not at head):
    no command of the service gets it out. The upgrade should build the stored vector and its
    index whether or not the old index is there."""
    database = Database(pg_url)
    try:
        migrate.upgrade(database.engine, "0019")
        _sql(pg_url, "DROP INDEX ix_tasks_search")
        migrate.upgrade(database.engine)
        assert migrate.current_revision(database.engine) == migrate.head_revision()
    finally:
        database.dispose()


def test_0020_downgrades_when_a_search_index_is_missing(pg_url: str) -> None:
    """Finding: at head with ix_tasks_search dropped (the case `search rebuild` repairs),
    `nexus-data migrate 0019` fails on 0020's `DROP INDEX ix_tasks_search` (no IF EXISTS), so a
    roll-back to the previous version is blocked until someone recreates the index by hand."""
    database = Database(pg_url)
    try:
        migrate.upgrade(database.engine)
        _sql(pg_url, "DROP INDEX ix_tasks_search")
        migrate.migrate_to(database.engine, "0019")
        assert migrate.current_revision(database.engine) == "0019"
    finally:
        database.dispose()


def test_a_search_vector_missing_at_head_is_found_by_check_schema_or_repaired_by_rebuild(pg_url: str) -> None:
    """Finding: with tasks.search_vector dropped (alembic still says 0020), `check-schema` says
    "schema at head" (migrate.check passes: include_name hides the column and only the revision
    is compared), `search rebuild` fails (CREATE INDEX CONCURRENTLY ... (search_vector): column
    does not exist; the CLI blames DATABASE_URL), `migrate 0019` fails (DROP INDEX), and
    `migrate` does nothing: every SearchTasks is INTERNAL and no command notices or repairs it.
    Either check should refuse the schema or rebuild should restore the column and index."""
    database = Database(pg_url)
    try:
        migrate.upgrade(database.engine)
        _sql(pg_url, "ALTER TABLE tasks DROP COLUMN search_vector")
        try:
            migrate.check(database.engine)
        except migrate.SchemaMismatch:
            return  # found: good enough
        rebuild_index(database.engine, "tasks", TASK_FIELDS)
    finally:
        database.dispose()
    server, c = _serve(pg_url)
    try:
        w = _word("civet")
        task = new_task(c, title=w)
        assert [i for i, _ in _task_hits(c, w)] == [task.id]
    finally:
        c.channel.close()
        server.stop()


def test_a_search_without_its_stored_vector_answers_at_once_with_an_error(pg_url: str) -> None:
    """Holds (noted): a Search of a table whose search_vector is gone answers within a second,
    never hangs; its status is INTERNAL ("internal error ... it has been logged"), while List and
    Create of the same table go on working."""
    migrate_db = Database(pg_url)
    try:
        migrate.upgrade(migrate_db.engine)
    finally:
        migrate_db.dispose()
    _sql(pg_url, "ALTER TABLE tasks DROP COLUMN search_vector")
    server, c = _serve(pg_url)
    try:
        new_task(c, title="still made")
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            c.work.SearchTasks(wpb.SearchTasksRequest(query="made"), timeout=10)
        assert time.monotonic() - start < 2
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert c.work.ListTasks(wpb.ListTasksRequest(count_only=True)).total_size == 1
    finally:
        c.channel.close()
        server.stop()


def test_rebuild_makes_an_invalid_or_dropped_index_on_the_stored_vector_valid(pg_url: str) -> None:
    """Holds: an ix_tasks_search marked invalid (a failed CREATE INDEX CONCURRENTLY) or dropped is
    rebuilt on the stored column, valid, and Search finds the rows."""
    database = Database(pg_url)
    try:
        migrate.upgrade(database.engine)
        _sql(pg_url, "UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'ix_tasks_search'::regclass")
        assert rebuild_index(database.engine, "tasks", TASK_FIELDS).action == "rebuilt"
        _sql(pg_url, "DROP INDEX ix_tasks_search")
        assert rebuild_index(database.engine, "tasks", TASK_FIELDS).action == "recreated"
    finally:
        database.dispose()
    assert _sql(pg_url, "SELECT indisvalid AND indisready FROM pg_index WHERE indexrelid = 'ix_tasks_search'::regclass") == [True]
    assert _sql(pg_url, "SELECT indexdef FROM pg_indexes WHERE indexname = 'ix_tasks_search'") == [
        "CREATE INDEX ix_tasks_search ON public.tasks USING gin (search_vector)"]


def test_an_operators_insert_select_star_is_refused_as_the_readme_says(pg_url: str) -> None:
    """Holds: at head `INSERT INTO users SELECT * FROM ...` is refused with README's words."""
    database = Database(pg_url)
    try:
        migrate.upgrade(database.engine)
    finally:
        database.dispose()
    with pytest.raises(sa.exc.DBAPIError) as caught:
        _sql(pg_url, "INSERT INTO users SELECT * FROM users WHERE false")
    assert 'cannot insert a non-DEFAULT value into column "search_vector"' in str(caught.value.orig)


def test_scores_and_hits_are_the_same_after_0019_and_back(pg_url: str) -> None:
    """Holds: tasks and documents written at head, the schema taken to 0019 and back to head
    (migrate_to, what `nexus-data migrate 0019` / `migrate` run): the same hits with the same
    scores, from stored vectors the rewrite computed again."""
    w = _word("dhole")
    server, c = _serve(pg_url)
    try:
        project = new_project(c)
        owner = new_user(c)
        for i in range(5):
            new_task(c, project, title=" ".join([w] * (i + 1)), description=f"{w} and more" if i % 2 else "")
        for i in range(3):
            c.knowledge.CreateDocument(kpb.CreateDocumentRequest(document=kpb.Document(
                title="doc", kind=kpb.DOCUMENT_KIND_WORD, owner_id=owner.id, content=_struct({"a": [w] * (i + 1), w: "key"}))))
        before = (_task_hits(c, w), [(r.document.id, r.score) for r in c.knowledge.SearchDocuments(kpb.SearchDocumentsRequest(query=w)).results])
    finally:
        c.channel.close()
        server.stop()
    database = Database(pg_url)
    try:
        migrate.migrate_to(database.engine, "0019")
        assert _sql(pg_url, "SELECT count(*) FROM information_schema.columns WHERE column_name = 'search_vector'") == [0]
        migrate.migrate_to(database.engine, "head")
    finally:
        database.dispose()
    server, c = _serve(pg_url)
    try:
        after = (_task_hits(c, w), [(r.document.id, r.score) for r in c.knowledge.SearchDocuments(kpb.SearchDocumentsRequest(query=w)).results])
    finally:
        c.channel.close()
        server.stop()
    assert after == before and len(before[0]) == 5 and len(before[1]) == 3


def test_the_previous_versions_search_keeps_an_index_while_the_rollout_runs(pg_url: str) -> None:
    """Finding: deploy/kubernetes/README.md: the migration Job runs first, the old servers keep
    serving until the new ones are ready, and "Schema changes must keep the previous version
    working on the new schema while the rollout runs (expand, then contract in a later
    version)". 0020 expands and contracts at once: it drops the GIN index on the tsvector
    expression that the previous version's Search matches on. From the Job's end until the
    rollout ends, every Search of an old server is a sequential scan computing to_tsvector of
    each row (measured: 300,000 audit entries, a word with no match: 1.3 s against 6 ms; at
    1,000,000 tasks with descriptions, past any deadline). Here: EXPLAIN of the previous
    version's match, with sequential scans off, finds no index for it on any searchable table."""
    m = _migration_0020()
    database = Database(pg_url)
    try:
        migrate.upgrade(database.engine)
    finally:
        database.dispose()
    from db.engine.search import _pg_vector_sql

    without_index = []
    engine = sa.create_engine(pg_url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET enable_seqscan = off")
            for table, fields in m.SEARCH.items():
                plan = "\n".join(r[0] for r in conn.exec_driver_sql(
                    f"EXPLAIN SELECT id FROM {table} WHERE ({_pg_vector_sql(fields)}) @@ websearch_to_tsquery('english'::regconfig, 'zebra') LIMIT 301"))
                if f"ix_{table}_expression_search" not in plan:
                    without_index.append(table)
    finally:
        engine.dispose()
    assert without_index == [], f"the previous version's Search scans these tables whole: {without_index}"


# ------------------------------------------------------------------ bench/search_window_text.py


def test_search_window_text_honours_nexus_bench_pg_db(tmp_path: Path) -> None:
    """Finding (newcomer): the script's docstring says its PostgreSQL table is made "in the
    database `postgres` on 127.0.0.1 (NEXUS_BENCH_PG_DB to choose another)", but the script
    reads no such variable (it has a `--pg-db` flag the docstring's usage line leaves out): with
    NEXUS_BENCH_PG_DB naming a database that does not exist, it still runs in `postgres` and
    succeeds. (Run on a copy: the script overwrites bench/results/search_window_text.md with
    whatever partial run it makes, the README's `--kib 1 --rounds 1` included.)"""
    copy = tmp_path / "bench"
    (copy / "results").mkdir(parents=True)
    shutil.copy(ROOT / "bench" / "search_window_text.py", copy / "search_window_text.py")
    env = {**os.environ, "NEXUS_BENCH_PG_DB": f"nexus_atk20_missing_{uuid.uuid4().hex[:8]}"}
    done = subprocess.run([sys.executable, str(copy / "search_window_text.py"), "--db", "postgresql", "--hits", "5", "--kib", "1", "--rounds", "1"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0, "NEXUS_BENCH_PG_DB was ignored: the table was made in `postgres`"
