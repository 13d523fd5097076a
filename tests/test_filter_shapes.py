"""Filters cached by their shape (engine/filtering.py): a filter's literals are parameters, so
filters that differ only in their values share one plan and one List / Search statement. Each
test runs a filter of a known shape with new values (the fast path: values only) and the same
text after the caches were emptied (the plain path: parsed and compiled afresh), and checks
that they answer alike, and what they answer, on SQLite and PostgreSQL."""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.common.v1 import common_pb2
from nexus.files.v1 import files_pb2 as fpb
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.work.v1 import work_pb2 as wpb

from db.engine import filtering, statements
from tests.conftest import Client, unique
from tests.support import expect_error, new_file, new_project, new_user, rich_error
from tests.test_access import Actor, actor  # noqa: F401 - the fixture

Code = grpc.StatusCode
SQL_LOOKING = "Robert'); DROP TABLE tasks;--"


def clear_caches() -> None:
    """Every filter and List / Search statement cache emptied: the next call parses afresh."""
    filtering.plans.cache_clear()
    statements.page_statements.cache_clear()
    statements.search_statements.cache_clear()


@dataclass
class World:
    project: wpb.Project
    tasks: dict[str, wpb.Task]  # by key


def _date(year: int, month: int, day: int) -> common_pb2.Date:
    return common_pb2.Date(year=year, month=month, day=day)


@pytest.fixture(scope="module")
def world(client: Client) -> World:
    project = new_project(client)
    assignee = new_user(client)
    T, P = wpb.TaskStatus, wpb.Priority
    rows: dict[str, dict[str, Any]] = {
        "a1": dict(title="alpha one", status=T.TASK_STATUS_TODO, priority=P.PRIORITY_HIGH, due_date=_date(2026, 1, 10),
                   estimated_hours=1.0, tags=["red", "x_y"]),
        "a2": dict(title="alpha two", status=T.TASK_STATUS_IN_PROGRESS, priority=P.PRIORITY_LOW, due_date=_date(2026, 2, 10),
                   estimated_hours=2.5, tags=["blue"]),
        "b1": dict(title="beta 50%_off", status=T.TASK_STATUS_DONE, priority=P.PRIORITY_MEDIUM, due_date=_date(2026, 3, 10),
                   estimated_hours=4.0),
        "b2": dict(title="Beta upper", status=T.TASK_STATUS_TODO, priority=P.PRIORITY_CRITICAL, estimated_hours=0.5,
                   tags=["red"], assignee_id=assignee.id),
        "g1": dict(title="gamma", status=T.TASK_STATUS_REVIEW, priority=P.PRIORITY_HIGH, due_date=_date(2026, 4, 1),
                   estimated_hours=8.0, tags=["green", "blue"]),
        "g2": dict(title="gamma deleted", status=T.TASK_STATUS_TODO, priority=P.PRIORITY_LOW, tags=["green"]),
        "r1": dict(title=SQL_LOOKING, status=T.TASK_STATUS_TODO, priority=P.PRIORITY_LOW, estimated_hours=0.25),
    }
    tasks = {}
    for key, fields in rows.items():
        fields.setdefault("description", "searchable words")
        tasks[key] = client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, **fields)))
    client.work.DeleteTask(wpb.DeleteTaskRequest(id=tasks["g2"].id))
    return World(project, tasks)


def all_tasks(client: Client) -> dict[str, wpb.Task]:
    """Every live task, read with filter-free Lists."""
    out: dict[str, wpb.Task] = {}
    token = ""
    while True:
        page = client.work.ListTasks(wpb.ListTasksRequest(page_size=1000, page_token=token))
        out.update((t.id, t) for t in page.tasks)
        token = page.next_page_token
        if not token:
            return out


def _one_of(*equal: tuple[str, str]) -> Callable[[wpb.Task], bool]:
    """Whether a task has any of these (field, value)."""
    return lambda task: any(getattr(task, name) == value for name, value in equal)


def test_a_thousand_and_one_hundred_id_and_equality_filters_share_a_few_cache_entries(client: Client, world: World) -> None:
    everything = all_tasks(client)
    known = list(world.tasks.values())
    filters: list[tuple[str, Callable[[wpb.Task], bool]]] = []
    for i in range(1100):
        kind = i % 4
        nth = i // 4
        if kind == 0:  # an id: each of the module's tasks once, then ids of none
            wanted = known[nth].id if nth < len(known) else str(uuid.uuid4())
            filters.append((f'id = "{wanted}"', _one_of(("id", wanted))))
        elif kind == 1:  # a title: each of the module's once, then titles of none
            title = known[nth].title if nth < len(known) else f"{known[nth % len(known)].title} {i}"
            filters.append((f'title = "{title}"', _one_of(("title", title))))
        elif kind == 2:  # a project of none or a title
            project = str(uuid.uuid4())
            title = known[i % len(known)].title
            filters.append((f'project_id = "{project}" OR title = "{title}"', _one_of(("project_id", project), ("title", title))))
        else:  # an assignee of none or an id
            assignee, wanted = str(uuid.uuid4()), known[i % len(known)].id
            filters.append((f'assignee_id = "{assignee}" OR id = "{wanted}"', _one_of(("assignee_id", assignee), ("id", wanted))))
    assert len({text for text, _ in filters}) == 1100
    clear_caches()
    matched = 0
    for text, predicate in filters:
        page = client.work.ListTasks(wpb.ListTasksRequest(filter=text, page_size=100))
        expected = sorted(t.id for t in everything.values() if predicate(t))
        assert sorted(t.id for t in page.tasks) == expected, text
        assert page.total_size == len(expected)
        for task in page.tasks:  # as Get answers it
            assert task == client.work.GetTask(wpb.GetTaskRequest(id=task.id))
        matched += len(expected)
    assert matched > 400  # not a test of empty answers
    plans, pages = filtering.plans.cache_info(), statements.page_statements.cache_info()
    # Four shapes (two skeletons of the id filter's quoting are one): a handful, not 1,100.
    assert plans.currsize <= 6 and pages.currsize <= 6, (plans, pages)
    assert plans.hits >= 1090 and pages.hits >= 1090, (plans, pages)


# ------------------------------------------------------------------ the fast path is the plain path


def _fast_equals_plain(call: Callable[[str], Any], first: str, second: str, statement_cached: bool = True) -> Any:
    """`second` answered with the plan and statements `first` left (it must hit them), and
    answered again after the caches were emptied: the two answers must be equal, and differ
    from first's (so that reusing first's values would show). Returns second's answer."""
    clear_caches()
    answer_first = call(first)
    plans, statement_misses = filtering.plans.cache_info(), _statement_misses()
    fast = call(second)
    after = filtering.plans.cache_info()
    assert after.misses == plans.misses and after.hits > plans.hits, "the second filter has the first one's shape"
    fast_misses = _statement_misses() - statement_misses
    clear_caches()
    plain = call(second)
    assert fast == plain, (first, second)
    if statement_cached:  # its first page's statement, at least, was the first filter's
        assert fast_misses < _statement_misses(), "the second filter reuses the first one's statements"
    assert answer_first != fast, "the two literals must select different rows"
    return fast


def _statement_misses() -> int:
    return statements.page_statements.cache_info().misses + statements.search_statements.cache_info().misses


def _list_tasks(client: Client, world: World, **request: Any) -> Callable[[str], Any]:
    """The task ids and total_size of every page (page_size 2: the page token's values are
    parameters as well) of the filter, within the module's project."""

    def call(text: str) -> tuple[tuple[str, ...], int]:
        ids: list[str] = []
        token, total = "", -1
        while True:
            page = client.work.ListTasks(
                wpb.ListTasksRequest(filter=f'project_id = "{world.project.id}" AND ({text})', page_size=2, page_token=token, **request)
            )
            ids.extend(t.id for t in page.tasks)
            total = page.total_size
            token = page.next_page_token
            if not token:
                return tuple(ids), total

    return call


TASK_CASES = [
    # string: equality, ordering, prefix (case-sensitive), its negation, contains (case-insensitive)
    ('title = "alpha one"', 'title = "gamma"', {"g1"}),
    # (among lower-case titles, which order alike under every collation)
    ('title < "b" AND status != TODO', 'title < "beta 9" AND status != TODO', {"a2", "b1"}),
    ('title = "alpha*"', 'title = "beta*"', {"b1"}),
    ('title != "alpha*"', 'title != "gamma*"', {"a1", "a2", "b1", "b2", "r1"}),
    ('title:"ALPHA"', 'title:"%_"', {"b1"}),
    ('title:"ALPHA"', 'title:"beta"', {"b1", "b2"}),
    # enum, by name as written or in full
    ("status = TODO", "status = REVIEW", {"g1"}),
    ('priority != "HIGH"', 'priority != "PRIORITY_LOW"', {"a1", "b1", "b2", "g1"}),
    # date, float
    ('due_date < "2026-02-01"', 'due_date < "2026-03-15"', {"a1", "a2", "b1"}),
    ("estimated_hours > 1.5", "estimated_hours > 3.9", {"b1", "g1"}),
    ("estimated_hours <= 2", "estimated_hours <= 0", set()),
    ("estimated_hours < 0.3 OR estimated_hours = 4", "estimated_hours < 0.6 OR estimated_hours = 8", {"r1", "b2", "g1"}),
    # null checks with a literal beside them
    ('assignee_id = null AND title = "alpha*"', 'assignee_id = null AND title = "Beta*"', set()),
    ('assignee_id != null OR title = "gamma"', 'assignee_id != null OR title = "alpha two"', {"a2", "b2"}),
    # repeated strings: has, presence, negation
    ('tags:"red"', 'tags:"blue"', {"a2", "g1"}),
    ('tags:"x_y"', 'tags:"x%"', set()),
    ('tags:* AND NOT tags:"red"', 'tags:* AND NOT tags:"green"', {"a1", "a2", "b2"}),
    ('-tags:"red"', '-tags:"blue"', {"a1", "b1", "b2", "r1"}),
    # NOT, OR, nesting
    ('NOT title = "alpha*"', 'NOT title = "gamma*"', {"a1", "a2", "b1", "b2", "r1"}),
    ("status = TODO OR priority = LOW", "status = DONE OR priority = CRITICAL", {"b1", "b2"}),
    ('(title = "alpha*" OR tags:"green") AND NOT (priority = HIGH)', '(title = "beta*" OR tags:"red") AND NOT (priority = CRITICAL)', {"a1", "b1"}),
    ('NOT (NOT (estimated_hours >= 4 OR (status = TODO AND title:"one")))', 'NOT (NOT (estimated_hours >= 8 OR (status = TODO AND title:"upper")))', {"b2", "g1"}),
]


@pytest.mark.parametrize(("first", "second", "expected"), TASK_CASES, ids=[c[1] for c in TASK_CASES])
def test_a_shape_reused_with_other_values_answers_as_a_fresh_parse(
    client: Client, world: World, first: str, second: str, expected: set[str]
) -> None:
    ids, total = _fast_equals_plain(_list_tasks(client, world), first, second)
    assert set(ids) == {world.tasks[k].id for k in expected} and total == len(ids)


def test_ids_and_timestamps_as_parameters(client: Client, world: World) -> None:
    t = world.tasks
    call = _list_tasks(client, world)
    ids, _ = _fast_equals_plain(call, f'id = "{t["a1"].id}"', f'id = "{t["g1"].id}"')
    assert ids == (t["g1"].id,)
    ids, _ = _fast_equals_plain(call, f'id != "{t["a1"].id}" AND id != "{t["a2"].id}"', f'id != "{t["g1"].id}" AND id != "{t["b1"].id}"')
    assert set(ids) == {t[k].id for k in ("a1", "a2", "b2", "r1")}
    after = t["b1"].create_time.ToJsonString()
    ids, _ = _fast_equals_plain(call, f'create_time > "{t["a1"].create_time.ToJsonString()}"', f'create_time > "{after}"')
    assert set(ids) == {t[k].id for k in ("b2", "g1", "r1")}
    # The same instant with an offset: timestamps are parsed, not compared as text.
    moment = t["b1"].create_time.ToDatetime()
    offset = moment.strftime("%Y-%m-%dT") + f"{(moment.hour + 2) % 24:02d}" + moment.strftime(":%M:%S.%f") + "+02:00"
    if moment.hour < 22:
        assert call(f'create_time > "{offset}"') == (ids, len(ids))
    ids, _ = _fast_equals_plain(call, f'assignee_id = "{uuid.uuid4()}"', f'assignee_id = "{t["b2"].assignee_id}"')
    assert ids == (t["b2"].id,)


def test_count_only_and_show_deleted(client: Client, world: World) -> None:
    t = world.tasks

    def counted(text: str) -> int:
        request = wpb.ListTasksRequest(filter=f'project_id = "{world.project.id}" AND ({text})', count_only=True)
        return int(client.work.ListTasks(request).total_size)

    assert _fast_equals_plain(counted, "status = TODO", "status = REVIEW") == 1
    assert _fast_equals_plain(counted, 'tags:"blue"', 'tags:"green"') == 1  # g2 is deleted
    shown = _list_tasks(client, world, show_deleted=True)
    ids, _ = _fast_equals_plain(shown, 'tags:"blue"', 'tags:"green"')
    assert set(ids) == {t["g1"].id, t["g2"].id}
    ids, _ = _fast_equals_plain(shown, 'title = "alpha*"', 'title = "gamma*"')
    assert set(ids) == {t["g1"].id, t["g2"].id}


def test_search_filters_are_shapes_too(client: Client, world: World) -> None:
    def searched(text: str) -> list[str]:
        ids: list[str] = []
        token = ""
        while True:
            request = wpb.SearchTasksRequest(query="searchable", filter=f'project_id = "{world.project.id}" AND ({text})', page_size=2, page_token=token)
            page = client.work.SearchTasks(request)
            ids.extend(r.task.id for r in page.results)
            token = page.next_page_token
            if not token:
                return sorted(ids)

    assert _fast_equals_plain(searched, "status = TODO", "status = REVIEW") == [world.tasks["g1"].id]
    assert _fast_equals_plain(searched, 'title:"ALPHA"', 'title:"BETA"') == sorted([world.tasks["b1"].id, world.tasks["b2"].id])


def test_ints_bools_and_json_paths(client: Client, world: World) -> None:
    word = unique("fs")
    sizes = {new_file(client, data=b"x" * n, name=f"{word}-{n}.txt", is_public=n % 2 == 0).id: n for n in (2, 5, 12, 20)}

    def files(text: str) -> list[str]:
        page = client.files.ListFiles(fpb.ListFilesRequest(filter=f'name = "{word}*" AND ({text})'))
        return sorted(f.id for f in page.files)

    assert _fast_equals_plain(files, "size_bytes > 3", "size_bytes > 10") == sorted(i for i, n in sizes.items() if n > 10)
    assert _fast_equals_plain(files, "size_bytes <= -1 OR size_bytes = 5", "size_bytes <= 2 OR size_bytes = 20") == sorted(
        i for i, n in sizes.items() if n in (2, 20)
    )
    assert _fast_equals_plain(files, "is_public = true", "is_public = false") == sorted(i for i, n in sizes.items() if n % 2)

    prefs: dict[str, dict[str, Any]] = {
        "dark": {"theme": "dark", "size": 3, "beta": True},
        "light": {"theme": "light", "size": 5, "beta": False},
        "bare": {"size": "5"},
    }
    users = {}
    for name, values in prefs.items():
        struct = struct_pb2.Struct()
        struct.update(values)
        users[name] = new_user(client, username=f"{word}{name}", preferences=struct).id

    def listed(text: str) -> list[str]:
        page = client.identity.ListUsers(ipb.ListUsersRequest(filter=f'username = "{word}*" AND ({text})'))
        return sorted(u.id for u in page.users)

    def of(*names: str) -> list[str]:
        return sorted(users[n] for n in names)

    assert _fast_equals_plain(listed, 'preferences.theme = "dark"', 'preferences.theme = "light"') == of("light")
    assert _fast_equals_plain(listed, "preferences.size > 2", "preferences.size > 4") == of("light")  # "5" is a string
    assert _fast_equals_plain(listed, "preferences.beta = true", "preferences.beta = false") == of("light")
    assert _fast_equals_plain(listed, "preferences:theme AND preferences.size < 9", "preferences:beta AND preferences.size < 4") == of("dark")
    assert _fast_equals_plain(listed, "preferences.theme = null AND preferences:beta", "preferences.theme = null AND preferences:size") == of("bare")


def test_member_ids_and_the_row_rules_of_a_caller(client: Client, world: World, actor: Callable[..., Actor]) -> None:
    word = unique("fm")
    members = [new_user(client), new_user(client)]
    projects = [new_project(client, name=f"{word} {i}") for i in range(3)]
    for project, member in ((projects[0], members[0]), (projects[1], members[1]), (projects[2], members[1])):
        client.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=member.id))

    def listed(text: str) -> list[str]:
        page = client.work.ListProjects(wpb.ListProjectsRequest(filter=f'name = "{word}*" AND {text}'))
        return sorted(p.id for p in page.projects)

    assert _fast_equals_plain(listed, f'member_ids:"{members[0].id}"', f'member_ids:"{members[1].id}"') == sorted(p.id for p in projects[1:])

    # A non-admin caller: the row rule is the caller's own (its statement is built per call),
    # the filter's plan is still the shape's.
    alice, bob = actor(), actor()
    names = {w: unique("ch") for w in ("x", "y")}
    visible: dict[str, set[str]] = {"x": set(), "y": set()}
    for key, name in names.items():
        for who, private in ((alice, True), (alice, False), (bob, True), (bob, False)):
            made = who.c.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"{name} {unique()}", is_private=private, creator_id=who.id)))
            if who is alice or not private:
                visible[key].add(made.id)

    def channels(text: str) -> list[str]:
        page = alice.c.chat.ListChannels(cpb.ListChannelsRequest(filter=text))
        assert page.total_size == len(page.channels)
        return sorted(c.id for c in page.channels)

    seen = _fast_equals_plain(channels, f'name = "{names["x"]}*"', f'name = "{names["y"]}*"', statement_cached=False)
    assert seen == sorted(visible["y"]) and len(seen) == 3


# --------------------------------------------------------------------------- literals are values


def test_literals_that_look_like_sql_are_values(client: Client, world: World) -> None:
    call = _list_tasks(client, world)
    before = call("estimated_hours >= 0")
    escaped = SQL_LOOKING.replace('"', '\\"')
    assert call(f'title = "{escaped}"')[0] == (world.tasks["r1"].id,)
    assert call(f"title = '{SQL_LOOKING.replace(chr(39), chr(92) + chr(39))}'")[0] == (world.tasks["r1"].id,)
    for text in (
        "title = \"x' OR '1'='1\"",
        "title = \"' OR 1=1 --\"",
        'title = "%"',
        'title = "%*"',
        'title = "_*"',
        "title:\"'; DELETE FROM tasks; --\"",
        'tags:"red\') OR (\'1\'=\'1"',
        'title < "\'"',
    ):
        assert call(text) == ((), 0), text
    assert call('title:"%_"')[0] == (world.tasks["b1"].id,)  # LIKE's wildcards are characters
    assert call('title = "Robert\')*"')[0] == (world.tasks["r1"].id,)
    assert call("estimated_hours >= 0") == before  # nothing was dropped or deleted


# ------------------------------------------------------------------------ errors are as before


def _error_of(client: Client, text: str) -> tuple[Any, ...]:
    with pytest.raises(grpc.RpcError) as caught:
        client.work.ListTasks(wpb.ListTasksRequest(filter=text))
    err = rich_error(caught.value)
    return err.code, err.message, err.info.reason, [(v.field, v.description, v.reason) for v in err.violations]


@pytest.mark.parametrize(
    ("good", "bad", "reason", "fragment"),
    [
        ('due_date < "2026-02-01"', 'due_date < "2026-13-45"', "INVALID_FILTER_VALUE", "invalid value string '2026-13-45' at position 11"),
        ("status = TODO", "status = SOON", "INVALID_FILTER_VALUE", "invalid value 'SOON' at position 9 for field 'status'"),
        (f'id = "{uuid.UUID(int=1)}"', "id = \"1' OR '1'='1\"", "INVALID_FILTER_VALUE", "invalid value string \"1' OR '1'='1\" at position 5"),
        ("estimated_hours > 1.5", "estimated_hours > 1e999", "INVALID_FILTER_VALUE", "expected a finite number"),
        ('title = "a" AND status = TODO', 'title = "b" AND status = LATER', "INVALID_FILTER_VALUE", "at position 25 for field 'status'"),
        # The first problem in the text is the error: a bad value before an unknown field.
        ('due_date < "2026-02-01"', 'due_date < "soon" AND nosuch = 1', "INVALID_FILTER_VALUE", "at position 11 for field 'due_date'"),
        ('due_date < "2026-02-01"', 'nosuch = 1 AND due_date < "soon"', "UNKNOWN_FILTER_FIELD", "unknown field 'nosuch' at position 0"),
    ],
)
def test_a_bad_value_in_a_known_shape_is_refused_as_a_fresh_parse_refuses_it(
    client: Client, world: World, good: str, bad: str, reason: str, fragment: str
) -> None:
    clear_caches()
    client.work.ListTasks(wpb.ListTasksRequest(filter=good))
    plans = filtering.plans.cache_info().currsize
    fast = _error_of(client, bad)
    assert filtering.plans.cache_info().currsize == plans, "a refused filter is not cached"
    clear_caches()
    plain = _error_of(client, bad)
    assert fast == plain
    code, message, got_reason, violations = fast
    assert code == Code.INVALID_ARGUMENT and got_reason == reason and violations[0][0] == "filter"
    assert fragment in message, message
    # A refused text leaves nothing behind: the good filter still answers.
    assert expect_error(Code.INVALID_ARGUMENT, client.work.ListTasks, wpb.ListTasksRequest(filter=bad)).violations
    client.work.ListTasks(wpb.ListTasksRequest(filter=good))


@pytest.fixture(autouse=True)
def _empty_caches_after() -> Iterator[None]:
    yield
    clear_caches()
