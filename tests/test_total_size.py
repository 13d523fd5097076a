"""total_size is exact up to NEXUS_EXACT_COUNT_LIMIT matches and an estimate above it (never
below the limit + 1; count_only stays exact), and a Search ranks a window of its matches: every
match when they are fewer than the window, else the first SEARCH_WINDOW, paged without a
duplicate or a gap; its total_size is exact up to the window's size."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sqlalchemy as sa
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.work.v1 import work_pb2 as wpb

from db.engine.statements import SEARCH_WINDOW
from service.config import ConfigError
from tests.conftest import Client, ServerThread, connect, make_config, unique
from tests.databases import postgres_admin_url
from tests.support import new_project
from tests.test_access import Actor, actor  # noqa: F401 - the fixture

LIMIT = 5


@pytest.fixture
def counting(client: Client) -> Iterator[Client]:
    """A second server on the same database, counting exactly up to LIMIT matches."""
    server = ServerThread(make_config(client.database_url, exact_count_limit=LIMIT)).start()
    c = connect(client.backend, client.database_url, server)
    yield c
    c.channel.close()
    server.stop()


def _tasks(client: Client, n: int, word: str, **fields: Any) -> tuple[wpb.Project, list[wpb.Task]]:
    project = new_project(client)
    made: list[wpb.Task] = []
    while len(made) < n:
        k = min(1000, n - len(made))
        requests = [
            wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} task {len(made) + i}", **fields)) for i in range(k)
        ]
        made.extend(client.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=requests)).tasks)
    return project, made


def _list(c: Client, **kw: Any) -> wpb.ListTasksResponse:
    return c.work.ListTasks(wpb.ListTasksRequest(**kw))


def _count_only(c: Client, filter_text: str) -> int:
    return _list(c, filter=filter_text, count_only=True).total_size


def test_total_size_is_exact_up_to_the_limit(client: Client, counting: Client) -> None:
    project, _ = _tasks(client, LIMIT, unique("w"))
    filter_text = f'project_id = "{project.id}"'
    for c in (client, counting):
        page = _list(c, filter=filter_text, page_size=2)
        assert page.total_size == LIMIT and len(page.tasks) == 2 and page.next_page_token
    assert _count_only(counting, filter_text) == LIMIT


def test_above_the_limit_total_size_is_an_estimate_above_it_and_count_only_is_exact(client: Client, counting: Client) -> None:
    project, made = _tasks(client, 3 * LIMIT, unique("w"))
    filter_text = f'project_id = "{project.id}"'
    exact = _list(client, filter=filter_text, page_size=4)
    assert exact.total_size == 3 * LIMIT
    estimated = _list(counting, filter=filter_text, page_size=4)
    assert estimated.total_size > LIMIT
    if client.backend == "sqlite":  # no estimator: "more than the limit"
        assert estimated.total_size == LIMIT + 1
    # The page's rows and its token are the same; only total_size differs.
    assert list(estimated.tasks) == list(exact.tasks) and estimated.next_page_token
    second = _list(counting, filter=filter_text, page_size=4, page_token=estimated.next_page_token)
    assert list(second.tasks) == list(_list(client, filter=filter_text, page_size=4, page_token=exact.next_page_token).tasks)
    assert second.total_size > LIMIT
    assert _count_only(counting, filter_text) == 3 * LIMIT == len(made)
    # An empty page counts too (its count runs on its own), with the same bound.
    assert _list(counting, filter=f"{filter_text} AND estimated_hours > 1000").total_size == 0


def test_above_the_limit_each_database_answers_its_own_estimate(client: Client, counting: Client) -> None:
    """Above the limit PostgreSQL answers its planner's row estimate of the matches: after an
    ANALYZE, near the exact count of every live task (a constant limit + 1 would be far off).
    SQLite has no row estimator: it answers the limit + 1, "more than the limit"."""
    _tasks(client, 200, unique("w"))
    if client.backend == "postgresql":
        engine = sa.create_engine(client.database_url)
        try:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.exec_driver_sql("ANALYZE tasks")
        finally:
            engine.dispose()
    exact = _list(counting, count_only=True).total_size
    estimated = _list(counting, page_size=1).total_size
    assert exact >= 200
    if client.backend == "postgresql":
        assert abs(estimated - exact) <= 0.2 * exact, (estimated, exact)
    else:
        assert estimated == LIMIT + 1


def test_a_callers_row_rule_is_counted_and_estimated_too(client: Client, counting: Client, actor: Callable[..., Actor]) -> None:
    """A caller with a row rule gets statements built for the call, counted up to the limit and
    above it answered limit + 1 on both databases (never the planner's estimate, which grows
    with the rows the rule hides), call after call; count_only counts exactly."""
    alice = actor()
    as_alice = connect(client.backend, client.database_url, counting.server, secret=alice.key.secret)
    word = unique("rr")
    try:
        for i in range(3 * LIMIT):
            client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"{word} {i}", is_private=i % 2 == 0, creator_id=alice.id)))
        filter_text = f'name = "{word}*"'
        for _ in range(3):
            page = as_alice.chat.ListChannels(cpb.ListChannelsRequest(filter=filter_text, page_size=2))
            assert page.total_size == LIMIT + 1 and len(page.channels) == 2
            counted = as_alice.chat.ListChannels(cpb.ListChannelsRequest(filter=filter_text, count_only=True))
            assert counted.total_size == 3 * LIMIT
    finally:
        as_alice.channel.close()


def test_search_total_size_follows_the_limit(client: Client, counting: Client) -> None:
    word = unique("s")
    _tasks(client, 3 * LIMIT, word)
    assert client.work.SearchTasks(wpb.SearchTasksRequest(query=word)).total_size == 3 * LIMIT
    estimated = counting.work.SearchTasks(wpb.SearchTasksRequest(query=word, page_size=2))
    assert estimated.total_size > LIMIT and len(estimated.results) == 2
    if client.backend == "sqlite":
        assert estimated.total_size == LIMIT + 1


def test_the_limit_is_a_checked_setting() -> None:
    for bad in (0, -1, 2**31):
        with pytest.raises(ConfigError, match="NEXUS_EXACT_COUNT_LIMIT"):
            make_config("sqlite:///x.db", exact_count_limit=bad)


def _search(c: Client, query: str, **kw: Any) -> wpb.SearchTasksResponse:
    return c.work.SearchTasks(wpb.SearchTasksRequest(query=query, **kw))


def _ranked(results: Any) -> list[tuple[float, str]]:
    return [(-r.score, r.task.id) for r in results]


def _walk(c: Client, query: str, page_size: int) -> list[tuple[float, str]]:
    hits: list[tuple[float, str]] = []
    token = ""
    while True:
        page = _search(c, query, page_size=page_size, page_token=token)
        hits.extend(_ranked(page.results))
        token = page.next_page_token
        if not token:
            return hits


def test_a_search_with_fewer_matches_than_the_window_ranks_every_one(client: Client) -> None:
    """Fewer matches than the window: every match, by score then id, as a full ranking answers."""
    word = unique("s")
    project = new_project(client)
    titles = [f"{word} {word} first", f"{word} second", "third", f"{word} and more words in a longer title"]
    made = [
        client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=t, description=f"about {word}" if i == 2 else "")))
        for i, t in enumerate(titles)
    ]
    page = _search(client, word, page_size=50)
    assert page.total_size == len(made) and not page.next_page_token
    ranked = _ranked(page.results)
    assert {i for _, i in ranked} == {t.id for t in made}
    assert ranked == sorted(ranked)
    # The title match outranks the description's mention of the word.
    assert ranked[-1][1] == made[2].id
    assert _walk(client, word, 1) == ranked


def _full_window(c: Client, word: str) -> list[tuple[float, str]]:
    """The ranked hits of a search with more matches than the window, in one page: as many as
    the window, no next page, and total_size above the window (exact up to its size, an
    estimate above it; SQLite's is the window + 1)."""
    whole = _search(c, word, page_size=1000)
    assert whole.total_size > SEARCH_WINDOW
    if c.backend == "sqlite":
        assert whole.total_size == SEARCH_WINDOW + 1
    ranked = _ranked(whole.results)
    assert len(ranked) == SEARCH_WINDOW and not whole.next_page_token
    return ranked


def test_a_search_with_more_matches_than_the_window_pages_through_the_window(client: Client) -> None:
    word = unique("s")
    _, made = _tasks(client, SEARCH_WINDOW + 40, word)
    window = _full_window(client, word)
    assert window == sorted(window) and {i for _, i in window} <= {t.id for t in made}
    if client.backend == "sqlite":  # FTS5's order: the first rows added
        assert {i for _, i in window} == {t.id for t in made[:SEARCH_WINDOW]}
    # Paged: the same hits in the same order, no duplicate, no gap.
    for page_size in (7, 100):
        assert _walk(client, word, page_size) == window


def test_the_window_counts_its_own_matches_at_its_edge(client: Client) -> None:
    """The page's total_size comes from the window itself, which reads one match more than it
    ranks: exactly SEARCH_WINDOW matches are counted exactly and all ranked; one more is counted
    as more than the window (SQLite: SEARCH_WINDOW + 1) and is not ranked, whichever it is."""
    word = unique("e")
    project, made = _tasks(client, SEARCH_WINDOW, word)
    whole = _search(client, word, page_size=1000)
    assert whole.total_size == SEARCH_WINDOW and not whole.next_page_token
    assert {i for _, i in _ranked(whole.results)} == {t.id for t in made}
    extra = client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} {word} {word} best")))
    ids = {i for _, i in _full_window(client, word)}
    assert len(ids & ({t.id for t in made} | {extra.id})) == SEARCH_WINDOW
    if client.backend == "sqlite":  # FTS5's order: the last one added is the one left out
        assert extra.id not in ids


def test_postgresql_connections_read_without_synchronized_scans() -> None:
    """The window a Search ranks is the first matches of a statement without an order: a
    synchronized scan would start it wherever another scan of the table is, and its pages would
    change from one call to the next. Every connection the service makes to PostgreSQL has them
    off (SQLite has no such scans)."""
    from db.database import Database

    database = Database(postgres_admin_url())
    try:
        for engine in database.engines:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SHOW synchronize_seqscans").scalar() == "off"
                # A later transaction on the same connection keeps it (the SET was committed).
                conn.rollback()
                assert conn.exec_driver_sql("SHOW synchronize_seqscans").scalar() == "off"
    finally:
        database.dispose()


def test_a_list_page_read_in_two_statements_is_of_one_moment(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page larger than the first read (FIRST_READ rows) is read in more statements, all in one
    snapshot: a task another caller adds between them, in the part the second statement reads,
    is neither on the page nor counted, so total_size and the rows agree. Without the snapshot
    the page held 151 tasks and total_size said 150."""
    import uuid

    from db.engine import paging, reads

    project = new_project(client)
    made = client.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=[
        wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"task {i}")) for i in range(150)
    ])).tasks
    engine = sa.create_engine(client.database_url)
    statements = [0]

    def read_page(size: int, max_bytes: int, fetch: Any, to_message: Any, extra: int = 0) -> Any:
        def fetch_with_a_write_between(read: int, counted: bool, last: Any, taken: int) -> Any:
            statements[0] += 1
            if statements[0] == 2:  # another caller's task, sorting last (its id the largest): the second statement's part
                with engine.begin() as conn:
                    conn.execute(sa.text(
                        "INSERT INTO tasks (id, project_id, title, creator_id, status, priority, estimated_hours, actual_hours, tags, "
                        "create_time, update_time, revision) SELECT :id, project_id, 'late', creator_id, status, priority, 0, 0, tags, "
                        "update_time, update_time, 1 FROM tasks WHERE id = :last"
                    ).bindparams(sa.bindparam("id", type_=sa.Uuid()), sa.bindparam("last", type_=sa.Uuid())),
                        {"id": uuid.UUID(f"ffffffff-ffff-7fff-bfff-{uuid.uuid4().hex[:12]}"), "last": uuid.UUID(made[-1].id)})
            return fetch(read, counted, last, taken)

        return paging.read_page(size, max_bytes, fetch_with_a_write_between, to_message, extra)

    monkeypatch.setattr(reads, "read_page", read_page)
    try:
        page = _list(client, filter=f'project_id = "{project.id}"', page_size=200)
    finally:
        monkeypatch.undo()
        engine.dispose()
    assert statements[0] == 2, "the page was read in one statement"
    assert page.total_size == len(page.tasks) == 150 and not page.next_page_token
    assert {t.id for t in page.tasks} == {t.id for t in made}
    # The task is there for the next read.
    assert _list(client, filter=f'project_id = "{project.id}"', page_size=200).total_size == 151
