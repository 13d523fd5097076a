"""A Search's window at its edges: the hits, their pages and total_size around SEARCH_WINDOW
matches (0, 1, 299, 300, 301, 302), with and without a filter, for callers with row rules, with
NEXUS_EXACT_COUNT_LIMIT below and above the window, for odd queries, for soft-deleted rows and
rows deleted between pages; and migration 0019 (the live tasks index ending with delete_time)
run both ways over existing tasks. Both databases."""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.work.v1 import work_pb2 as wpb

from db import migrate
from db.database import Database
from db.engine.statements import SEARCH_WINDOW
from tests.conftest import Client, ServerThread, connect, make_config, unique
from tests.databases import fresh_postgres_database
from tests.support import new_project
from tests.test_access import Actor, actor  # noqa: F401 - the fixture

EDGES = (0, 1, SEARCH_WINDOW - 1, SEARCH_WINDOW, SEARCH_WINDOW + 1, SEARCH_WINDOW + 2)


# ------------------------------------------------------------------ helpers


def _search(c: Client, query: str, **kw: Any) -> wpb.SearchTasksResponse:
    return c.work.SearchTasks(wpb.SearchTasksRequest(query=query, **kw))


def _walk_pages(call: Callable[[str], Any]) -> list[Any]:
    pages: list[Any] = []
    token = ""
    while True:
        page = call(token)
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages
        assert len(pages) < 2000, "the pages never end"


def _task_ids(pages: list[Any]) -> list[str]:
    return [r.task.id for page in pages for r in page.results]


def _check_walk(pages: list[Any], expected: int, page_size: int, backend: str) -> None:
    """Every page's total_size is the same and never below the rows shown so far plus one
    while there is a next page; the pages hold the window without a duplicate."""
    ids = _task_ids(pages)
    assert len(ids) == len(set(ids)), "a hit on two pages"
    assert len(ids) == min(expected, SEARCH_WINDOW)
    shown = 0
    for i, page in enumerate(pages):
        assert len(page.results) <= page_size
        if page.next_page_token:
            assert len(page.results) == page_size
        shown += len(page.results)
        if expected <= SEARCH_WINDOW:
            assert page.total_size == expected, (i, page.total_size, expected)
        else:
            assert page.total_size > SEARCH_WINDOW, (i, page.total_size)
            if backend == "sqlite":
                assert page.total_size == SEARCH_WINDOW + 1
        assert page.total_size >= shown + int(bool(page.next_page_token))
    scores = [(-r.score, r.task.id) for page in pages for r in page.results]
    assert scores == sorted(scores), "the pages are not in (score desc, id) order"


@pytest.fixture(scope="module")
def edge_tasks(client: Client) -> tuple[str, wpb.Project, list[wpb.Task]]:
    """SEARCH_WINDOW + 2 tasks with one word, estimated_hours i (so a filter selects the first
    k of them), plus a soft-deleted one and a task in another project with the word."""
    word = unique("edge")
    project = new_project(client)
    requests = [
        wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} task {i}" + " more" * (i % 5), estimated_hours=float(i)))
        for i in range(SEARCH_WINDOW + 2)
    ]
    made = list(client.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=requests)).tasks)
    gone = client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} gone", estimated_hours=0.5)))
    client.work.DeleteTask(wpb.DeleteTaskRequest(id=gone.id))
    return word, project, made


def _edge_filter(project: wpb.Project, k: int) -> str:
    return f'project_id = "{project.id}" AND estimated_hours < {k}'


# ------------------------------------------------------------------ the window's edges


@pytest.mark.parametrize("k", EDGES)
def test_search_at_the_window_edges_with_a_filter(client: Client, edge_tasks: Any, k: int) -> None:
    word, project, made = edge_tasks
    filter_text = _edge_filter(project, k)
    whole = _search(client, word, filter=filter_text, page_size=1000)
    assert not whole.next_page_token
    assert len(whole.results) == min(k, SEARCH_WINDOW)
    assert {r.task.id for r in whole.results} <= {t.id for t in made[:k]}
    for page_size in (7, 50, SEARCH_WINDOW):
        pages = _walk_pages(lambda token, page_size=page_size: _search(client, word, filter=filter_text, page_size=page_size, page_token=token))
        _check_walk(pages, k, page_size, client.backend)
        assert _task_ids(pages) == [r.task.id for r in whole.results]


def test_search_walked_one_hit_a_page_over_more_than_the_window(client: Client, edge_tasks: Any) -> None:
    word, project, _ = edge_tasks
    filter_text = _edge_filter(project, SEARCH_WINDOW + 1)
    pages = _walk_pages(lambda token: _search(client, word, filter=filter_text, page_size=1, page_token=token))
    _check_walk(pages, SEARCH_WINDOW + 1, 1, client.backend)
    whole = _search(client, word, filter=filter_text, page_size=1000)
    assert _task_ids(pages) == [r.task.id for r in whole.results]


def test_search_without_a_filter_leaves_out_the_soft_deleted_task(client: Client, edge_tasks: Any) -> None:
    """The query alone matches SEARCH_WINDOW + 2 live tasks and one soft-deleted one: the window
    and its count never hold the deleted one."""
    word, _, made = edge_tasks
    whole = _search(client, word, page_size=1000)
    assert len(whole.results) == SEARCH_WINDOW and not whole.next_page_token
    assert {r.task.id for r in whole.results} <= {t.id for t in made}
    assert whole.total_size > SEARCH_WINDOW
    gone = _search(client, f"{word} gone", page_size=1000)
    assert gone.total_size == 0 and not gone.results


def test_deleting_tasks_of_the_window_lets_later_matches_in(client: Client) -> None:
    """SEARCH_WINDOW + 2 matches; three soft-deleted: the window is every remaining match,
    counted exactly, with no deleted task in it."""
    word = unique("del")
    project = new_project(client)
    requests = [wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} {i}")) for i in range(SEARCH_WINDOW + 2)]
    made = list(client.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=requests)).tasks)
    deleted = {made[0].id, made[150].id, made[-1].id}
    for task_id in deleted:
        client.work.DeleteTask(wpb.DeleteTaskRequest(id=task_id))
    whole = _search(client, word, page_size=1000)
    ids = {r.task.id for r in whole.results}
    assert whole.total_size == SEARCH_WINDOW - 1 and len(ids) == SEARCH_WINDOW - 1
    assert ids == {t.id for t in made} - deleted
    for page_size in (7, 50):
        pages = _walk_pages(lambda token, page_size=page_size: _search(client, word, page_size=page_size, page_token=token))
        _check_walk(pages, SEARCH_WINDOW - 1, page_size, client.backend)


def _walk_deleting_a_first_page_hit(client: Client) -> tuple[list[str], set[str]]:
    """Ten matches paged by four; a hit of the first page is soft-deleted before the second:
    (every hit the walk saw, the ids of the live matches)."""
    word = unique("gap")
    project = new_project(client)
    made = [client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} {i}"))) for i in range(10)]
    first = _search(client, word, page_size=4)
    assert first.total_size == 10 and len(first.results) == 4
    victim = first.results[0].task.id
    client.work.DeleteTask(wpb.DeleteTaskRequest(id=victim))
    seen = [r.task.id for r in first.results]
    token = first.next_page_token
    while token:
        page = _search(client, word, page_size=4, page_token=token)
        seen.extend(r.task.id for r in page.results)
        token = page.next_page_token
    return seen, {t.id for t in made} - {victim}


def test_a_hit_deleted_between_pages_repeats_no_hit(client: Client) -> None:
    seen, _ = _walk_deleting_a_first_page_hit(client)
    assert len(seen) == len(set(seen)), "a hit repeated"


def test_an_empty_page_past_the_end_after_deletes_counts_the_live_matches(client: Client) -> None:
    """A page token whose offset is past the matches that remain (rows deleted since): an empty
    page, counted by the separate limited count, not INTERNAL."""
    word = unique("past")
    project = new_project(client)
    made = [client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} {i}"))) for i in range(6)]
    first = _search(client, word, page_size=3)
    assert first.total_size == 6 and first.next_page_token
    for task in made[:4]:
        client.work.DeleteTask(wpb.DeleteTaskRequest(id=task.id))
    second = _search(client, word, page_size=3, page_token=first.next_page_token)
    assert not second.results and not second.next_page_token
    assert second.total_size == 2


# ------------------------------------------------------------------ NEXUS_EXACT_COUNT_LIMIT


@pytest.fixture(params=[1, 5, SEARCH_WINDOW - 1, SEARCH_WINDOW + 1, 10_000])
def limited(request: pytest.FixtureRequest, client: Client) -> Iterator[tuple[Client, int]]:
    server = ServerThread(make_config(client.database_url, exact_count_limit=request.param)).start()
    c = connect(client.backend, client.database_url, server)
    yield c, request.param
    c.channel.close()
    server.stop()


def test_the_count_limit_caps_the_windows_exact_count(client: Client, edge_tasks: Any, limited: tuple[Client, int]) -> None:
    """total_size is exact up to min(limit, SEARCH_WINDOW) matches; above, more than that and
    never below the hits shown so far plus one while a next page follows."""
    c, limit = limited
    word, project, _ = edge_tasks
    bound = min(limit, SEARCH_WINDOW)
    for k in sorted({0, 1, bound - 1, bound, bound + 1, SEARCH_WINDOW, SEARCH_WINDOW + 1} - {-1}):
        if k > SEARCH_WINDOW + 2:
            continue
        filter_text = _edge_filter(project, k)
        for page_size in (1, 7, 1000):
            page = _search(c, word, filter=filter_text, page_size=page_size)
            assert len(page.results) == min(k, SEARCH_WINDOW, page_size)
            if k <= bound:
                assert page.total_size == k, (limit, k, page_size, page.total_size)
            else:
                assert page.total_size > bound, (limit, k, page_size, page.total_size)
                if client.backend == "sqlite" and page_size == 1:
                    assert page.total_size == bound + 1, (limit, k, page.total_size)
            assert page.total_size >= len(page.results) + int(bool(page.next_page_token)), (limit, k, page_size, page.total_size)
        # The last page of a walk: never below what the walk showed.
        pages = _walk_pages(lambda token, filter_text=filter_text: _search(c, word, filter=filter_text, page_size=97, page_token=token))
        shown = 0
        for page in pages:
            shown += len(page.results)
            assert page.total_size >= shown + int(bool(page.next_page_token)), (limit, k, shown, page.total_size)
        assert shown == min(k, SEARCH_WINDOW)


# ------------------------------------------------------------------ row rules


def _message(c: Client, channel_id: str, content: str) -> cpb.ChatMessage:
    return c.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel_id, content=content)))


def _search_messages(c: Client, query: str, **kw: Any) -> cpb.SearchChatMessagesResponse:
    return c.chat.SearchChatMessages(cpb.SearchChatMessagesRequest(query=query, **kw))


@pytest.fixture(scope="module")
def hidden_first(client: Client) -> tuple[str, cpb.Channel, cpb.Channel, list[cpb.ChatMessage], list[cpb.ChatMessage]]:
    """SEARCH_WINDOW + 5 messages with one word in a private channel, added first (so the
    first in the index's order), then 4 in a public channel."""
    word = unique("rr")
    private = client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"private {word}", is_private=True)))
    public = client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"public {word}", is_private=False)))
    hidden = [_message(client, private.id, f"{word} hidden {i}") for i in range(SEARCH_WINDOW + 5)]
    shown = [_message(client, public.id, f"{word} shown {i}" + " x" * i) for i in range(4)]
    return word, private, public, hidden, shown


def test_a_member_of_no_private_channel_sees_only_public_hits_and_their_count(
    client: Client, hidden_first: Any, actor: Callable[..., Actor]
) -> None:
    word, private, public, hidden, shown = hidden_first
    alice = actor()
    for page_size in (1, 3, 50, 1000):
        pages = _walk_pages(lambda token, page_size=page_size: _search_messages(alice.c, word, page_size=page_size, page_token=token))
        ids = [r.chat_message.id for page in pages for r in page.results]
        assert sorted(ids) == sorted(m.id for m in shown), (page_size, len(ids))
        assert {page.total_size for page in pages} == {len(shown)}, [page.total_size for page in pages]
    # With a filter too, and a query whose only matches are hidden ones.
    filtered = _search_messages(alice.c, word, filter=f'channel_id = "{private.id}"')
    assert not filtered.results and filtered.total_size == 0
    only_hidden = _search_messages(alice.c, f"{word} hidden")
    assert not only_hidden.results and only_hidden.total_size == 0
    # The admin sees the window of every message: more than the window.
    whole = _search_messages(client, word, page_size=1000)
    assert len(whole.results) == SEARCH_WINDOW and whole.total_size > SEARCH_WINDOW


def test_a_member_of_the_private_channel_is_counted_as_more_than_the_window_never_estimated(
    client: Client, hidden_first: Any, actor: Callable[..., Actor]
) -> None:
    word, private, public, hidden, shown = hidden_first
    bob = actor()
    client.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=private.id, user_id=bob.id))
    try:
        page = _search_messages(bob.c, word, page_size=10)
        assert len(page.results) == 10 and page.next_page_token
        assert page.total_size == SEARCH_WINDOW + 1
        whole = _search_messages(bob.c, word, page_size=1000)
        assert len(whole.results) == SEARCH_WINDOW and whole.total_size == SEARCH_WINDOW + 1 and not whole.next_page_token
        ids = [r.chat_message.id for r in whole.results]
        assert len(set(ids)) == SEARCH_WINDOW
        assert set(ids) <= {m.id for m in hidden} | {m.id for m in shown}
    finally:
        client.chat.RemoveChannelMember(cpb.RemoveChannelMemberRequest(channel_id=private.id, user_id=bob.id))
    after = _search_messages(bob.c, word, page_size=1000)
    assert sorted(r.chat_message.id for r in after.results) == sorted(m.id for m in shown) and after.total_size == len(shown)


def test_private_channels_in_the_window_are_not_counted_by_search_channels(client: Client, actor: Callable[..., Actor]) -> None:
    word = unique("ch")
    for i in range(12):
        client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"{word} {i}", is_private=i < 9)))
    alice = actor()
    for page_size in (1, 2, 50):
        pages = _walk_pages(lambda token, page_size=page_size: alice.c.chat.SearchChannels(cpb.SearchChannelsRequest(query=word, page_size=page_size, page_token=token)))
        names = [r.channel.name for page in pages for r in page.results]
        assert sorted(names) == sorted(f"{word} {i}" for i in range(9, 12))
        assert {page.total_size for page in pages} == {3}


# ------------------------------------------------------------------ odd queries

ODD_QUERIES = [
    "the", "the and of a", "to be or not to be", '"', '""', '"unterminated', "a -b", "-", "--x", "or", "OR OR", "and",
    "foo:*", "foo & bar | !baz", "(x)", "x <-> y", "!!!", "NEAR(a b)", "a* b*", "___", "_", "ñandú 日本語 𝔘𝔫𝔦", "🦀 crab",
    "\u200b zero\u200bwidth", "e\u0301", "Ω", "'; DROP TABLE tasks; --", "\\", "%_%", "a" * 1024, "word " * 204,
    " ".join(f"w{i}" for i in range(200)), "\x00", "x\x00y", "\t\n", "ǅ ǈ", "ⅷ ²",
]


@pytest.mark.parametrize("query", ODD_QUERIES, ids=range(len(ODD_QUERIES)))
def test_odd_queries_answer_ok_or_invalid_argument(client: Client, query: str) -> None:
    calls = [
        lambda: client.work.SearchTasks(wpb.SearchTasksRequest(query=query, page_size=5)),
        lambda: client.work.SearchTasks(wpb.SearchTasksRequest(query=query, page_size=5, filter='status != "TASK_STATUS_DONE"')),
        lambda: client.chat.SearchChatMessages(cpb.SearchChatMessagesRequest(query=query, page_size=5)),
        lambda: client.chat.SearchChannels(cpb.SearchChannelsRequest(query=query, page_size=5)),
    ]
    for call in calls:
        try:
            page = call()
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (query[:40], exc.code(), exc.details())
            continue
        assert page.total_size >= len(page.results) + int(bool(page.next_page_token))


def test_a_query_of_stop_words_matches_nothing_and_counts_zero(client: Client) -> None:
    """'the', 'of', 'and' are stop words on both databases (PostgreSQL's 'english' list): a query
    of them only finds and counts nothing, though a task holds them all, and neither database
    fails; with another word they are left out, and a task without them is found too."""
    word = unique("stop")
    project = new_project(client)
    client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"the of and {word}")))
    client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"plain {word}")))
    page = _search(client, "the of and", filter=f'project_id = "{project.id}"')
    assert not page.results and page.total_size == 0
    both = _search(client, f"the {word}", filter=f'project_id = "{project.id}"')
    assert len(both.results) == 2 and both.total_size == 2
    assert both.results[0].score == both.results[1].score, "a stop word in the text adds nothing"


def test_a_query_longer_than_the_limit_is_invalid_argument(client: Client) -> None:
    with pytest.raises(grpc.RpcError) as info:
        _search(client, "a" * 1025)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_page_token_of_another_query_or_filter_is_invalid_argument(client: Client, edge_tasks: Any) -> None:
    word, project, _ = edge_tasks
    page = _search(client, word, page_size=5)
    assert page.next_page_token
    for other in (dict(query=f"{word} x"), dict(query=word, filter=f'project_id = "{project.id}"')):
        with pytest.raises(grpc.RpcError) as info:
            client.work.SearchTasks(wpb.SearchTasksRequest(page_size=5, page_token=page.next_page_token, **other))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # A different page size with the same token is a later page of the same window.
    later = _search(client, word, page_size=1000, page_token=page.next_page_token)
    assert len(later.results) == SEARCH_WINDOW - 5 and not later.next_page_token


# ------------------------------------------------------------------ migration 0019

INDEX = "ix_tasks_live_project_status_create_time"


@pytest.fixture(params=["sqlite", "postgresql"])
def migrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
    else:
        with fresh_postgres_database("nexus_m19") as url:
            yield url


def _index(url: str) -> dict[str, Any]:
    engine = sa.create_engine(url)
    try:
        found = [i for i in sa.inspect(engine).get_indexes("tasks") if i["name"] == INDEX]
        assert len(found) == 1, found
        index = found[0]
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                sql = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = ?", (INDEX,)).scalar()
            else:
                sql = conn.exec_driver_sql("SELECT indexdef FROM pg_indexes WHERE indexname = %s", (INDEX,)).scalar()
        index["sql"] = sql
        return index
    finally:
        engine.dispose()


def _counts(url: str) -> tuple[int, int]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            live = conn.exec_driver_sql("SELECT count(*) FROM tasks WHERE delete_time IS NULL").scalar()
            gone = conn.exec_driver_sql("SELECT count(*) FROM tasks WHERE delete_time IS NOT NULL").scalar()
        return int(live), int(gone)
    finally:
        engine.dispose()


def test_migration_0019_runs_both_ways_over_existing_tasks(migrated_url: str) -> None:
    backend = "postgresql" if migrated_url.startswith("postgresql") else "sqlite"
    server = ServerThread(make_config(migrated_url)).start()
    c = connect(backend, migrated_url, server)
    word = unique("mig")
    try:
        project = new_project(c)
        requests = [wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} {i}")) for i in range(40)]
        made = list(c.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=requests)).tasks)
        for task in made[:7]:
            c.work.DeleteTask(wpb.DeleteTaskRequest(id=task.id))
    finally:
        c.channel.close()
        server.stop()
    head = _index(migrated_url)
    assert head["column_names"] == ["project_id", "status", "create_time", "id", "delete_time"]
    assert "delete_time IS NULL" in head["sql"].replace("(", "").replace(")", ""), head["sql"]
    database = Database(migrated_url)
    try:
        migrate.downgrade(database.engine, "0018")
        assert migrate.current_revision(database.engine) == "0018"
        down = _index(migrated_url)
        assert down["column_names"] == ["project_id", "status", "create_time", "id"]
        assert "delete_time IS NULL" in down["sql"].replace("(", "").replace(")", ""), down["sql"]
        assert _counts(migrated_url) == (33, 7)
        migrate.upgrade(database.engine)
        assert migrate.current_revision(database.engine) == migrate.head_revision()
        # Twice more, each way.
        migrate.migrate_to(database.engine, "0018")
        migrate.migrate_to(database.engine, "head")
    finally:
        database.dispose()
    again = _index(migrated_url)
    assert again["column_names"] == head["column_names"] and again["sql"] == head["sql"]
    assert _counts(migrated_url) == (33, 7)
    server = ServerThread(make_config(migrated_url)).start()
    c = connect(backend, migrated_url, server)
    try:
        page = c.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"', page_size=5))
        assert page.total_size == 33 and len(page.tasks) == 5
        hits = _search(c, word, page_size=1000)
        assert hits.total_size == 33 and {r.task.id for r in hits.results} == {t.id for t in made[7:]}
        deleted = c.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"', show_deleted=True, page_size=100))
        assert len(deleted.tasks) == 40
    finally:
        c.channel.close()
        server.stop()


# ------------------------------------------------------------------ more edges


@pytest.fixture
def small_pages(client: Client) -> Iterator[Client]:
    """A second server on the same database whose responses hold at most 4096 bytes."""
    server = ServerThread(make_config(client.database_url, max_page_bytes=4096)).start()
    c = connect(client.backend, client.database_url, server)
    yield c
    c.channel.close()
    server.stop()


def test_pages_cut_short_by_their_size_cover_the_window(client: Client, small_pages: Client) -> None:
    """SEARCH_WINDOW + 2 matches of about 700 bytes each, 1000 asked a page: each page is cut
    short by NEXUS_MAX_PAGE_BYTES (several statements a page, at later offsets); the pages
    together are the window, without a duplicate or a gap, and every page's total_size agrees."""
    word = unique("big")
    project = new_project(client)
    requests = [
        wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} {i}", description=("lorem ipsum " * 60) + str(i)))
        for i in range(SEARCH_WINDOW + 2)
    ]
    client.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=requests))
    whole = _search(client, word, page_size=1000)
    pages = _walk_pages(lambda token: _search(small_pages, word, page_size=1000, page_token=token))
    assert len(pages) > 10
    ids = _task_ids(pages)
    assert len(ids) == len(set(ids)) == SEARCH_WINDOW
    assert ids == [r.task.id for r in whole.results]
    shown = 0
    for page in pages:
        shown += len(page.results)
        assert page.total_size > SEARCH_WINDOW and page.total_size >= shown + int(bool(page.next_page_token))
        if client.backend == "sqlite":
            assert page.total_size == SEARCH_WINDOW + 1


def test_a_row_rule_caller_under_a_low_count_limit(client: Client, hidden_first: Any, actor: Callable[..., Actor]) -> None:
    """With NEXUS_EXACT_COUNT_LIMIT 2, a caller seeing 4 of SEARCH_WINDOW + 9 matches is told
    3 (limit + 1) or more, never anything that grows with the hidden ones, and never below the
    hits shown plus one while there is a next page."""
    word, private, public, hidden, shown = hidden_first
    server = ServerThread(make_config(client.database_url, exact_count_limit=2)).start()
    alice = actor()
    c = connect(client.backend, client.database_url, server, secret=alice.key.secret)
    try:
        for page_size in (1, 2, 3, 4, 50):
            pages = _walk_pages(lambda token, page_size=page_size: _search_messages(c, word, page_size=page_size, page_token=token))
            ids = [r.chat_message.id for page in pages for r in page.results]
            assert sorted(ids) == sorted(m.id for m in shown)
            total = 0
            for page in pages:
                total += len(page.results)
                assert 3 <= page.total_size <= 4, (page_size, page.total_size)
                assert page.total_size >= total + int(bool(page.next_page_token))
    finally:
        c.channel.close()
        server.stop()


def _search_methods(client: Client) -> list[tuple[str, Any, Any]]:
    """(name, stub method, request class) of every Search* RPC the server serves."""
    from google.protobuf import descriptor_pool, message_factory

    found = []
    for full_name, stub in client.stubs.items():
        service = descriptor_pool.Default().FindServiceByName(full_name)
        for method in service.methods:
            if method.name.startswith("Search"):
                found.append((method.name, getattr(stub, method.name), message_factory.GetMessageClass(method.input_type)))
    return found


@pytest.mark.parametrize("query", ["the", "\x00", '"a -b" or', "ñandú", "w " * 300, "zzqq"], ids=range(6))
def test_every_search_rpc_answers_odd_queries_and_pages(client: Client, query: str) -> None:
    methods = _search_methods(client)
    assert len(methods) >= 10
    for name, call, request_class in methods:
        for page_size in (0, 1, 1000, 1001):
            try:
                page = call(request_class(query=query, page_size=page_size))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, page_size, exc.code(), exc.details())
                continue
            assert page.total_size >= len(page.results) + int(bool(page.next_page_token)), (name, page.total_size)
        with pytest.raises(grpc.RpcError) as info:
            call(request_class(query=query, page_size=-1))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, info.value.code())


def test_search_page_tokens_of_other_methods_and_garbage_are_invalid_argument(client: Client, edge_tasks: Any) -> None:
    word, project, _ = edge_tasks
    listed = client.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"', page_size=2))
    searched_messages = client.chat.SearchChatMessages(cpb.SearchChatMessagesRequest(query=word, page_size=1))
    tokens = [listed.next_page_token, "garbage", "AAAA", "x" * 5000, listed.next_page_token[:-2] + "zz"]
    if searched_messages.next_page_token:
        tokens.append(searched_messages.next_page_token)
    for token in tokens:
        with pytest.raises(grpc.RpcError) as info:
            _search(client, word, page_size=5, page_token=token)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (token[:20], info.value.code(), info.value.details())


def test_searches_while_matches_are_written_answer_consistent_pages(client: Client) -> None:
    """Searches run while another caller adds and deletes matches around the window's edge:
    every answer is OK, holds no duplicate, at most the page, and a total_size that is exact (the
    hits on a last page of one page) or above the window."""
    import threading

    word = unique("cc")
    project = new_project(client)
    requests = [wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} {i}")) for i in range(SEARCH_WINDOW - 20)]
    client.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=requests))
    stop = threading.Event()
    problems: list[str] = []

    def writer() -> None:
        n = 0
        while not stop.is_set() and n < 8:
            made = client.work.BatchCreateTasks(
                wpb.BatchCreateTasksRequest(requests=[wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} w{n} {j}")) for j in range(15)])
            ).tasks
            for task in made[:10]:
                client.work.DeleteTask(wpb.DeleteTaskRequest(id=task.id))
            n += 1

    def reader() -> None:
        for _ in range(15):
            for page_size in (SEARCH_WINDOW, 1000):
                try:
                    page = _search(client, word, page_size=page_size)
                except grpc.RpcError as exc:
                    problems.append(f"{exc.code()}: {exc.details()}")
                    continue
                ids = [r.task.id for r in page.results]
                if len(ids) != len(set(ids)) or len(ids) > SEARCH_WINDOW:
                    problems.append(f"{len(ids)} hits, {len(set(ids))} distinct")
                if page.total_size <= SEARCH_WINDOW and page.total_size != len(ids) and not page.next_page_token:
                    problems.append(f"total_size {page.total_size} with {len(ids)} hits on the only page")
                if page.total_size < len(ids) + int(bool(page.next_page_token)):
                    problems.append(f"total_size {page.total_size} below {len(ids)} hits")

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join(60)
    stop.set()
    threads[0].join(60)
    assert not problems, problems[:5]


def test_one_search_page_read_in_several_statements_is_one_ranking(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page of 150 is read in two statements (the first reads 100); the second re-ranks the
    window and skips the 100 hits taken. A hit of the first part soft-deleted between the two
    (another caller's delete, made here at that moment): the page still holds every match that
    was there when it began, or at least every live one; it never skips a live match."""
    from db.engine import paging, reads

    word = unique("two")
    project = new_project(client)
    requests = [wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} {i}")) for i in range(150)]
    made = list(client.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=requests)).tasks)
    engine = sa.create_engine(client.database_url)
    first_ids: list[str] = []

    def read_page(size: int, max_bytes: int, fetch: Any, to_message: Any, extra: int = 0) -> Any:
        calls = [0]

        def fetch_with_a_delete_between(read: int, counted: bool, last: Any, taken: int) -> Any:
            calls[0] += 1
            if calls[0] == 2 and first_ids:
                with engine.begin() as conn:
                    deleted = conn.execute(
                        sa.text("UPDATE tasks SET delete_time = CURRENT_TIMESTAMP WHERE id = :id").bindparams(sa.bindparam("id", type_=sa.Uuid())),
                        {"id": uuid.UUID(first_ids[0])},
                    )
                    assert deleted.rowcount == 1
            rows, total = fetch(read, counted, last, taken)
            if calls[0] == 1 and not first_ids:
                first_ids.extend(str(to_message(row).id) for row in rows[:1])
            return rows, total

        return paging.read_page(size, max_bytes, fetch_with_a_delete_between, to_message, extra)

    monkeypatch.setattr(reads, "read_page", read_page)
    try:
        page = _search(client, word, page_size=150)
    finally:
        monkeypatch.undo()
        engine.dispose()
    assert first_ids, "the page was read in one statement"
    ids = [r.task.id for r in page.results]
    assert len(ids) == len(set(ids)), "a hit twice on one page"
    live = {t.id for t in made} - set(first_ids)
    missing = live - set(ids)
    assert not missing, f"{len(missing)} live match(es) left out of the page (total_size {page.total_size}, {len(ids)} hits)"
