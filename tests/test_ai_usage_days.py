"""GetAIUsageSummary's two paths and the daily sums behind one of them.

- The walk path (ai_usage_days for whole days, index walks for percentiles) answers exactly as
  the plain path (one pass over the rows) and as a count by hand: every grouping, ranges that
  cut days, fall inside one day or hold no row, pages.
- ai_usage_days always holds the sums of the interactions as they are: after batches, single
  creates, an admin's delete, a user deleted for good (their rows' user cleared), and on
  PostgreSQL after folding, also while writers append.
- Which path a summary takes, and that PostgreSQL's walks read the index they are meant to."""
from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nexus.ai.v1 import ai_pb2 as apb
from nexus.identity.v1 import identity_pb2 as ipb
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from db.domains import ai_usage
from db.engine.call import Call
from tests.conftest import Client, ServerThread, connect, make_config
from tests.support import new_user
from tests.test_ai_usage import MODEL, MODULE, USER, _batch, _hand_count, _random_interaction, _span, _ts, _written

GROUPINGS = [list(g) for n in range(4) for g in itertools.permutations([MODEL, MODULE, USER], n)]


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[Engine]:
    made = create_engine(database_url)
    yield made
    made.dispose()


def _dialect(engine: Engine) -> str:
    return engine.dialect.name


def _direct(engine: Engine, start: dt.datetime, end: dt.datetime, group_by: list[int], path: str | None, page_size: int = 0) -> list[apb.UsageGroup]:
    """Every group of the summary by the database function itself, on the path asked."""
    out: list[apb.UsageGroup] = []
    token = ""
    while True:
        request = apb.GetAIUsageSummaryRequest(start_time=_ts(start), end_time=_ts(end), group_by=group_by, page_size=page_size, page_token=token)
        with Session(engine) as session:
            page = ai_usage.usage_summary(session, request, Call(dialect=_dialect(engine)), path=path)
        out.extend(page.groups)
        token = page.next_page_token
        if not token:
            return out


def _aware(value: Any) -> dt.datetime:
    """A timestamp a bare SELECT read: SQLite hands back text, naive UTC either way."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _sums_differ(engine: Engine) -> list[Any]:
    """Keys whose ai_usage_days sums are not those of the interactions: empty when they agree."""
    dialect = _dialect(engine)
    keys = ", ".join(ai_usage.DAY_KEYS)
    kept = f"SELECT {keys}, {', '.join(f'sum({s}) AS {s}' for s in ai_usage.SUMS)} FROM ai_usage_days GROUP BY {keys} HAVING sum(call_count) <> 0"
    fresh = ai_usage._day_sums_sql(dialect, "ai_interactions")
    with engine.connect() as conn:
        a = {tuple(str(v) for v in row[:5]): tuple(int(v) for v in row[5:]) for row in conn.execute(text(kept))}
        b = {tuple(str(v) for v in row[:5]): tuple(int(v) for v in row[5:]) for row in conn.execute(text(fresh))}
    return sorted((k, a.get(k), b.get(k)) for k in set(a) | set(b) if a.get(k) != b.get(k))


@contextlib.contextmanager
def appending(client: Client, rnd: random.Random, start: dt.datetime, users: list[str], size: int) -> Iterator[None]:
    """A writer thread appending batches of size interactions to two days from start while the
    block runs; on leaving, it is stopped and whatever it raised fails the test."""
    stop = threading.Event()
    failures: list[BaseException] = []

    def write() -> None:
        try:
            while not stop.is_set():
                _written(client, rnd, start, 2, size, users)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join()
    assert not failures, failures


def test_the_walk_answers_as_the_plain_path_and_the_hand_count(client: Client, engine: Engine) -> None:
    rnd = random.Random(20)
    start = _span()
    users = [new_user(client).id for _ in range(3)] + [""]
    made = _written(client, rnd, start, 6, 900, users)
    # Rows at the very edges of days, and a day with a single row.
    edges = []
    for day in (1, 2, 5):
        midnight = dt.datetime.combine((start + dt.timedelta(days=day)).date(), dt.time(), dt.UTC)
        for at in (midnight - dt.timedelta(microseconds=1), midnight):
            row = _random_interaction(rnd, start, 1, users)
            row.request_time.CopyFrom(_ts(at))
            edges.append(row)
    made += _batch(client, edges)
    midnight = dt.datetime.combine((start + dt.timedelta(days=1)).date(), dt.time(), dt.UTC)
    ranges = [
        (start, start + dt.timedelta(days=7)),  # everything, cut at both ends
        (midnight, midnight + dt.timedelta(days=3)),  # whole days only
        (midnight - dt.timedelta(microseconds=1), midnight + dt.timedelta(days=4, microseconds=1)),  # a microsecond of each edge day
        (midnight + dt.timedelta(hours=5), midnight + dt.timedelta(hours=17)),  # inside one day
        (start - dt.timedelta(days=3), start),  # nothing
    ]
    for (low, high), group_by in itertools.product(ranges, GROUPINGS):
        expected = _hand_count(made, group_by, low, high)
        walked = _direct(engine, low, high, group_by, "walk", page_size=5)
        assert walked == _direct(engine, low, high, group_by, "plain", page_size=5), (low, high, group_by)
        assert walked == expected, (low, high, group_by)


def test_the_days_hold_the_sums_of_the_rows_through_every_write(client: Client, engine: Engine) -> None:
    rnd = random.Random(21)
    start = _span()
    gone = new_user(client)
    users = [new_user(client).id, gone.id, ""]
    made = _written(client, rnd, start, 3, 300, users)
    one = client.ai.CreateAIInteraction(apb.CreateAIInteractionRequest(ai_interaction=_random_interaction(rnd, start, 3, users)))
    assert _sums_differ(engine) == []
    client.ai.DeleteAIInteraction(apb.DeleteAIInteractionRequest(id=made[0].id))
    client.ai.DeleteAIInteraction(apb.DeleteAIInteractionRequest(id=one.id))
    assert _sums_differ(engine) == []
    client.identity.DeleteUser(ipb.DeleteUserRequest(id=gone.id, force=True))
    assert _sums_differ(engine) == []
    # The summary answers with the user cleared: their rows are in the '' group.
    kept = [m for m in made[1:] if m.user_id != gone.id]
    cleared = [apb.AIInteraction(**{**{f.name: v for f, v in m.ListFields()}, "user_id": ""}) for m in made[1:] if m.user_id == gone.id]
    end = start + dt.timedelta(days=4)
    assert _direct(engine, start, end, [USER], "walk") == _hand_count(kept + cleared, [USER], start, end)


def test_folding_keeps_the_sums_while_writers_append(client: Client, engine: Engine) -> None:
    if _dialect(engine) != "postgresql":
        with engine.begin() as conn:
            assert ai_usage.fold_usage_days(conn, 0) == (0, 0), "SQLite keeps one row per key: nothing to fold"
        return
    rnd = random.Random(22)
    start = _span()
    users = [new_user(client).id, ""]
    _written(client, rnd, start, 2, 200, users)
    _written(client, rnd, start, 2, 200, users)
    mark, folded = 0, 0
    with appending(client, rnd, start, users, 50):
        for _ in range(5):
            with engine.begin() as conn:
                days, mark = ai_usage.fold_usage_days(conn, mark)
                folded += days
    assert folded >= 2, "the two days of many appended rows were folded"
    assert _sums_differ(engine) == []
    with engine.begin() as conn:
        ai_usage.fold_usage_days(conn, 0)
    assert _repeated_keys(engine) == 0, "with no writer, a fold leaves one row per key"
    assert _sums_differ(engine) == []


def test_the_rebuild_command_puts_damaged_sums_right(client: Client, engine: Engine, database_url: str) -> None:
    """`nexus-data usage rebuild` after the sums went wrong behind the triggers' back (rows of
    ai_usage_days deleted and one changed by hand): the sums are the rows' again."""
    _written(client, random.Random(27), _span(), 2, 100, [new_user(client).id, ""])
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM ai_usage_days WHERE id IN (SELECT id FROM ai_usage_days ORDER BY id LIMIT 5)"))
        conn.execute(text("UPDATE ai_usage_days SET call_count = call_count + 7 WHERE id = (SELECT max(id) FROM ai_usage_days)"))
    assert _sums_differ(engine) != []
    done = subprocess.run(
        [str(Path(sys.executable).parent / "nexus-data"), "usage", "rebuild", "--database-url", database_url],
        capture_output=True, text=True, timeout=120, env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("AI usage daily sums rebuilt: "), done.stdout
    assert _sums_differ(engine) == []
    # Rebuilt while a writer appends: each interaction counted once.
    with appending(client, random.Random(28), _span(), [""], 40):
        for _ in range(5):
            with engine.begin() as conn:
                ai_usage.rebuild_usage_days(conn)
    assert _sums_differ(engine) == []


def _repeated_keys(engine: Engine) -> int:
    keys = ", ".join(ai_usage.DAY_KEYS)
    with engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM (SELECT {keys} FROM ai_usage_days GROUP BY {keys} HAVING count(*) > 1) x")).scalar_one())


def test_the_server_folds_what_writers_appended(database_url: str, engine: Engine) -> None:
    """A server with a short NEXUS_USAGE_FOLD_SECONDS leaves one row per day and key soon after
    writes (PostgreSQL's triggers append; SQLite's never repeat a key)."""
    server = ServerThread(make_config(database_url, usage_fold_seconds=0.1)).start()
    try:
        c = connect(_dialect(engine), database_url, server)
        rnd = random.Random(24)
        start = _span()
        users = [new_user(c).id, ""]
        for _ in range(3):
            _written(c, rnd, start, 2, 100, users)
        c.channel.close()
        deadline = time.monotonic() + 10
        while _repeated_keys(engine) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _repeated_keys(engine) == 0
        assert _sums_differ(engine) == []
    finally:
        server.stop()


def test_the_walk_serves_ranges_holding_much_of_the_table(client: Client, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    postgres = _dialect(engine) == "postgresql"
    start = _span()
    _written(client, random.Random(25), start, 3, 200, [""])
    _written(client, random.Random(26), _span(), 3, 1000, [""])  # whatever else is here: under a fifth
    if postgres:  # as autovacuum does: the pages written so far all-visible, the table's size known
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE ai_interactions"))
    with engine.connect() as conn:
        first, last = conn.execute(text("SELECT min(request_time), max(request_time) FROM ai_interactions")).one()
        first, last = (_aware(v) - dt.timedelta(days=1) for v in (first, last))
        everything = (first, last + dt.timedelta(days=3))
        assert ai_usage.summary_path(conn, *everything, True) == "walk"
        assert ai_usage.summary_path(conn, *everything, False) == "plain", "a filter or a row rule: plain"
        assert ai_usage.summary_path(conn, start, start + dt.timedelta(hours=23), True) == "plain", "no whole day"
        assert ai_usage.summary_path(conn, start, start + dt.timedelta(days=4), True) == "plain", "a small share of the rows"
        monkeypatch.setattr(ai_usage, "WALK_FROM_SHARE", 0.0)
        assert ai_usage.summary_path(conn, start, start + dt.timedelta(days=4), True) == "walk"
        visible = conn.execute(text("SELECT relallvisible::float8 / greatest(relpages, 1) FROM pg_class WHERE relname = 'ai_interactions'")).scalar_one() if postgres else 1.0
        monkeypatch.setattr(ai_usage, "WALK_FROM_VISIBLE", visible + 0.01)
        expected = "plain" if postgres else "walk"  # SQLite reads no visibility map
        assert ai_usage.summary_path(conn, *everything, True) == expected, "too few all-visible pages: the pass"


def test_each_walk_reads_its_index(client: Client, engine: Engine) -> None:
    """The plan of the walks the summary sends, with their own parameters: on PostgreSQL, with
    sequential scans and sorts priced out (the table here is small), the index named in
    PERCENTILE_WALKS serves them in latency order; SQLite searches an index, never every row."""
    rnd = random.Random(23)
    start = _span()
    _written(client, rnd, start, 2, 100, [new_user(client).id, ""])
    end = start + dt.timedelta(days=3)
    postgres = _dialect(engine) == "postgresql"
    sent: list[tuple[str, Any]] = []

    def keep(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if "latency_nanos ASC" in statement:
            sent.append((statement, parameters))

    for group_by in GROUPINGS:
        index = ai_usage.PERCENTILE_WALKS[ai_usage.walk_lead([ai_usage.GROUPINGS[g] for g in group_by])][0]
        sent.clear()
        event.listen(engine, "before_cursor_execute", keep)
        try:
            request = apb.GetAIUsageSummaryRequest(start_time=_ts(start), end_time=_ts(end), group_by=group_by)
            with Session(engine) as session:
                assert ai_usage.usage_summary(session, request, Call(dialect=_dialect(engine)), path="walk").groups
        finally:
            event.remove(engine, "before_cursor_execute", keep)
        assert len(sent) == 1, ("the walks go in one statement", group_by)
        statement, parameters = sent[0]
        with engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            cursor = raw.cursor()
            if postgres:
                cursor.execute("SET enable_seqscan = off")
                cursor.execute("SET enable_sort = off")
                cursor.execute("SET enable_incremental_sort = off")
                cursor.execute("EXPLAIN " + statement, parameters)
            else:
                cursor.execute("EXPLAIN QUERY PLAN " + statement, parameters)
            plan = "\n".join(str(row) for row in cursor.fetchall())
            cursor.close()
            conn.rollback()
        if postgres:
            # Grouped by one column or none: that column's index. By more: one of them in the
            # same order (the planner's choice, on a small table).
            assert (index in plan or len(group_by) > 1) and plan.count("_latency_by_") == plan.count("Limit") and "Sort" not in plan, (group_by, plan)
        else:  # SQLite's own choice (it may sort a user's few rows of the range): never every row
            assert "SEARCH ai_interactions USING" in plan and "SCAN ai_interactions" not in plan, (group_by, plan)
