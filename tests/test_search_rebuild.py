"""`nexus-data search rebuild`: a search index damaged behind the service's back (emptied on
SQLite, stale on PostgreSQL, missing) finds nothing; the command builds it afresh from the rows,
search finds them again, and running it again changes nothing."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from google.protobuf import struct_pb2
from nexus.knowledge.v1 import knowledge_pb2 as kpb
from nexus.work.v1 import work_pb2 as wpb
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from service.cli import searchable_resources
from tests.conftest import BACKENDS, Client, ServerThread, connect, make_config, unique
from tests.databases import fresh_postgres_database
from tests.support import new_project, new_user

NEXUS_DATA = Path(sys.executable).parent / "nexus-data"


@pytest.fixture(scope="module", params=BACKENDS)
def own(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    """A server on a database of this module's own (its indexes are damaged here). On PostgreSQL
    its connections scan no table whole and use no plain index scan, so a search of projects or
    documents reads their GIN index, as it does on a large table, and a stale index shows."""
    def serve(url: str, backend: str) -> Iterator[Client]:
        server = ServerThread(make_config(url)).start()
        client = connect(backend, url, server)
        yield client
        client.channel.close()
        server.stop()

    if request.param == "sqlite":
        yield from serve(f"sqlite:///{tmp_path_factory.mktemp('rebuild') / 'nexus.db'}", "sqlite")
        return
    with fresh_postgres_database() as url:
        admin = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as conn:
            conn.exec_driver_sql(f'ALTER DATABASE "{make_url(url).database}" SET enable_seqscan = off')
            conn.exec_driver_sql(f'ALTER DATABASE "{make_url(url).database}" SET enable_indexscan = off')
        admin.dispose()
        yield from serve(url, "postgresql")


def _sql(c: Client, *statements: str) -> list[object]:
    engine = sa.create_engine(c.database_url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            return [conn.exec_driver_sql(s).scalar() if s.lstrip().upper().startswith("SELECT") else conn.exec_driver_sql(s) for s in statements]
    finally:
        engine.dispose()


def _rebuild(c: Client, *args: str) -> list[str]:
    done = subprocess.run(
        [str(NEXUS_DATA), "search", "rebuild", "--database-url", c.database_url, *args],
        capture_output=True, text=True, timeout=240, env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _found(c: Client, word: str) -> tuple[int, int]:
    """(projects, documents) a search for word finds."""
    projects = c.work.SearchProjects(wpb.SearchProjectsRequest(query=word, page_size=100))
    documents = c.knowledge.SearchDocuments(kpb.SearchDocumentsRequest(query=word, page_size=100))
    assert projects.total_size == len(projects.results) and documents.total_size == len(documents.results)
    return projects.total_size, documents.total_size


def _make(c: Client, word: str) -> None:
    for _ in range(3):
        new_project(c, name=f"{word} launch plan")
    owner = new_user(c)
    for _ in range(2):  # the word in the content's JSON: SQLite indexes its string values
        content = struct_pb2.Struct(fields={"body": struct_pb2.Value(string_value=f"notes on {word}")})
        c.knowledge.CreateDocument(kpb.CreateDocumentRequest(document=kpb.Document(title="report", kind=kpb.DOCUMENT_KIND_WORD, content=content, owner_id=owner.id)))


def _damage(c: Client, word: str) -> None:
    """The projects' and documents' indexes made to miss the rows made with word: SQLite's FTS5
    tables emptied after the rows are made; PostgreSQL's GIN indexes left out of the inserts (as
    an index that is not kept up is) before."""
    if c.backend == "sqlite":
        _make(c, word)
        _sql(c, "INSERT INTO projects_fts(projects_fts) VALUES ('delete-all')", "INSERT INTO documents_fts(documents_fts) VALUES ('delete-all')")
    else:
        _sql(c, "UPDATE pg_index SET indisready = false WHERE indexrelid IN ('ix_projects_search'::regclass, 'ix_documents_search'::regclass)")
        _make(c, word)


def test_rebuild_makes_a_damaged_index_find_the_rows_again(own: Client) -> None:
    word = unique("zq")
    _damage(own, word)
    assert _found(own, word) == (0, 0), "the damaged indexes find nothing"

    lines = _rebuild(own)
    projects, documents = (_sql(own, f"SELECT count(*) FROM {t}")[0] for t in ("projects", "documents"))
    assert f"Project: {projects} rows indexed" in "\n".join(lines) and f"Document: {documents} rows indexed" in "\n".join(lines)
    assert [line.split(":")[0] for line in lines[:-1]] == [spec.name for spec in searchable_resources()]
    assert lines[-1].startswith(f"search index rebuilt for {len(searchable_resources())} resources, ")
    assert _found(own, word) == (3, 2)

    # Idempotent: again, the same lines and the same results.
    assert _rebuild(own) == lines
    assert _found(own, word) == (3, 2)
    # New rows are indexed as before.
    new_project(own, name=f"{word} second plan")
    assert _found(own, word) == (4, 2)


def test_rebuild_of_one_resource_recreates_a_missing_index(own: Client) -> None:
    word = unique("zm")
    if own.backend == "sqlite":
        _make(own, word)
        _sql(own, "DROP TABLE projects_fts")
        assert _sql(own, "SELECT count(*) FROM sqlite_master WHERE name = 'projects_fts'") == [0]
        expected = "projects_fts recreated"
    else:
        _sql(own, "DROP INDEX ix_projects_search")
        _make(own, word)
        expected = "ix_projects_search recreated"
    lines = _rebuild(own, "--resource", "Project")
    assert len(lines) == 2 and lines[0].startswith("Project: ") and lines[0].endswith(f"({expected})"), lines
    assert lines[1].startswith("search index rebuilt for 1 resource, ")
    assert _found(own, word) == (3, 2)
    if own.backend == "postgresql":
        assert _sql(own, "SELECT indisvalid AND indisready FROM pg_index WHERE indexrelid = 'ix_projects_search'::regclass") == [True]
    assert _rebuild(own, "--resource", "projects")[0].endswith("rebuilt)")


def _check_schema(c: Client) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(NEXUS_DATA), "check-schema", "--database-url", c.database_url],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"},
    )


def test_check_schema_names_a_search_index_made_incomplete_and_rebuild_makes_it_whole(own: Client) -> None:
    """Search indexes are made by migrations and declared on no model, so the revision alone
    cannot vouch for them: with a part of one gone (SQLite: a trigger of the tasks' FTS5 table;
    PostgreSQL: the tasks' stored search_vector, and with it its index) check-schema exits 1
    naming what is missing, a search of tasks cannot answer, and after `search rebuild` the
    schema checks whole and tasks written meanwhile are found."""
    assert _check_schema(own).returncode == 0
    word = unique("zr")
    if own.backend == "sqlite":
        _sql(own, "DROP TRIGGER tasks_fts_ai")
        gone = "tasks_fts_ai"
    else:
        _sql(own, "ALTER TABLE tasks DROP COLUMN search_vector")
        gone = "tasks.search_vector, ix_tasks_search"
    try:
        project = new_project(own)
        own.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} made meanwhile")))
        checked = _check_schema(own)
        assert checked.returncode == 1, checked.stdout
        assert f"Task: search index incomplete, missing or unusable: {gone}" in checked.stderr
        assert "nexus-data search rebuild" in checked.stderr
    finally:
        lines = _rebuild(own, "--resource", "Task")
    assert lines[0].endswith("recreated)"), lines
    assert _check_schema(own).returncode == 0
    found = own.work.SearchTasks(wpb.SearchTasksRequest(query=word))
    assert found.total_size == 1 and len(found.results) == 1


def test_an_unknown_resource_is_refused_in_one_line(own: Client) -> None:
    done = subprocess.run(
        [str(NEXUS_DATA), "search", "rebuild", "--database-url", own.database_url, "--resource", "ApiKey"],
        capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "nexus-data search rebuild: --resource: 'ApiKey' is not a searchable resource (one of: "
        + ", ".join(spec.name for spec in searchable_resources()) + ")"
    ]
