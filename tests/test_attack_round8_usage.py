"""GetAIUsageSummary's walk and plain paths and ai_usage_days under hostile data and bad days.

Each test states what must hold; a failure is a defect:
- the far ends of the timestamp range, midnight and a microsecond either side, latencies of 0
  and 2**63 - 1, all-equal latencies, groups of one and groups with no latency: both paths
  answer as a hand count, and nothing answers INTERNAL;
- a caller who is not an admin sees only their own rows, a page token replayed included;
- the daily sums stay those of the rows after an operator's SQL (UPDATE of model and
  request_time, a row removed and written again, a row replaced), a migration run on a database
  that already holds interactions (and down and up again), and a TRUNCATE;
- PostgreSQL: folds on two servers at once while writers append keep the sums; a row appended
  by a writer that commits after a fold is folded later; the path choice does not trust
  statistics a bulk load left stale;
- NEXUS_USAGE_FOLD_SECONDS out of range is refused."""
from __future__ import annotations

import datetime as dt
import random
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2
from nexus.ai.v1 import ai_pb2 as apb
from sqlalchemy import create_engine, delete, insert, select, text, update
from sqlalchemy.engine import Engine

from db import migrate
from db.database import Database
from db.domains import ai_usage
from db.domains.ai_usage import AIInteraction
from service.config import Config, ConfigError, check_settings
from tests.conftest import Client, ServerThread, make_config
from tests.databases import fresh_postgres_database
from tests.support import new_user
from tests.test_access import Actor, actor  # noqa: F401 - the fixture
from tests.test_ai_usage import MODEL, MODULE, NANOS, USER, _batch, _hand_count, _random_interaction, _span, _summary, _ts, _written
from tests.test_ai_usage_days import GROUPINGS, _direct, _sums_differ, appending, engine  # noqa: F401 - the fixture

T = AIInteraction.__table__
LARGEST = 2**63 - 1


def _postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def _agree(engine: Engine, made: list[apb.AIInteraction], start: dt.datetime, end: dt.datetime, groupings: list[list[int]] = GROUPINGS) -> None:
    for group_by in groupings:
        expected = _hand_count(made, group_by, start, end)
        walked = _direct(engine, start, end, group_by, "walk", page_size=3)
        assert walked == _direct(engine, start, end, group_by, "plain", page_size=3), (start, end, group_by)
        assert walked == expected, (start, end, group_by)


def _at(c: Client, when: dt.datetime, model: str, latency_nanos: int | None = None, **kw: Any) -> apb.AIInteraction:
    msg = apb.AIInteraction(module="edge", model=model, request_time=_ts(when), **kw)
    if latency_nanos is not None:
        msg.latency.CopyFrom(duration_pb2.Duration(seconds=latency_nanos // NANOS, nanos=latency_nanos % NANOS))
    return msg


@pytest.fixture
def fresh_url(database_url: str, tmp_path: Path) -> Iterator[str]:
    """An empty database of the same kind, for what must not touch the shared one."""
    if database_url.startswith("sqlite"):
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
    else:
        with fresh_postgres_database("nexus_r8") as url:
            yield url


def _rows(n: int, start: dt.datetime, days: int, seed: int) -> list[dict[str, Any]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, completion = rnd.randrange(0, 100), rnd.randrange(0, 100)
        currency = rnd.choice(["USD", "EUR", None])
        out.append(dict(
            id=uuid.uuid4(), module=rnd.choice(["a", "b"]), model=rnd.choice(["x", "y", "z"]),
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
            cost_units=rnd.randrange(0, 3) if currency else None, cost_nanos=rnd.randrange(0, NANOS) if currency else None, cost_currency=currency,
            latency_nanos=rnd.choice([None, rnd.randrange(0, 10**10)]), status=rnd.choice(["succeeded", "failed", "timed_out"]),
            request_time=start + dt.timedelta(seconds=rnd.randrange(0, days * 86400)),
            create_time=start, update_time=start, revision=1,
        ))
    return out


# ------------------------------------------------------------------ hostile data


def test_a_range_on_the_last_day_of_year_9999_is_answered(client: Client, actor: Any) -> None:
    """Any caller: a range starting after midnight of 9999-12-31 (the last day a timestamp may
    name) must be summed, not answered INTERNAL."""
    at = dt.datetime(9999, 12, 31, 1, 30, tzinfo=dt.UTC)
    user: Actor = actor()
    _batch(user.c, [_at(user.c, at, "far-future", 7)])
    start, end = dt.datetime(9999, 12, 31, 1, tzinfo=dt.UTC), dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)
    for c in (client, user.c):
        try:
            groups = _summary(c, start, end, [MODEL], filter='model = "far-future"')[0]
        except grpc.RpcError as exc:
            pytest.fail(f"{exc.code()}: {exc.details()}")
        assert [(g.model, g.call_count) for g in groups] == [("far-future", 1)]


def test_the_first_and_last_days_and_midnights_agree_on_both_paths(client: Client, engine: Engine) -> None:
    """Rows at midnight and a microsecond either side, on the first days of year 1 and the last
    of 9999; ranges cutting those days or holding them whole."""
    rows = []
    for day in (dt.datetime(1, 1, 2, tzinfo=dt.UTC), dt.datetime(9999, 12, 31, tzinfo=dt.UTC)):
        for i, offset in enumerate((-1, 0, 1)):
            rows.append(_at(client, day + dt.timedelta(microseconds=offset), f"edge-{i}", 1000 * i))
    rows.append(_at(client, dt.datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=dt.UTC), "first", 5))  # the first instant a timestamp may name
    rows.append(_at(client, dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC), "last", 366 * 86400 * NANOS))
    made = _batch(client, rows)
    # The row another test here may have written on the last day.
    made += client.ai.ListAIInteractions(apb.ListAIInteractionsRequest(filter='model = "far-future"', page_size=100)).ai_interactions
    assert _sums_differ(engine) == []
    y1, y9999 = dt.datetime(1, 1, 1, 0, 0, 0, 1, tzinfo=dt.UTC), dt.datetime(9999, 12, 30, tzinfo=dt.UTC)
    for start, end in [
        (y1, y1 + dt.timedelta(days=3)),
        (y1 + dt.timedelta(days=1, microseconds=-2), y1 + dt.timedelta(days=2)),
        (y1 + dt.timedelta(days=1, microseconds=-1), y1 + dt.timedelta(days=1)),
        (y9999, dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC)),
        (y9999 + dt.timedelta(hours=23, minutes=59, seconds=59, microseconds=999999), y9999 + dt.timedelta(days=1, microseconds=1)),
    ]:
        _agree(engine, made, start, end, [[], [MODEL], [USER, MODULE]])


def test_extreme_latencies_agree_on_both_paths(client: Client, engine: Engine) -> None:
    """Latencies of 0 and 2**63 - 1 nanoseconds (written by SQL: the API stops at a year), all
    equal in a group, a group of one, a group with no latency, in a range of whole days."""
    start = _span()
    day = dt.datetime.combine(start.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
    plan = {"zeros": [0] * 7, "largest": [LARGEST] * 5, "mixed": [0, LARGEST, 0, LARGEST, 1, LARGEST - 1], "one": [LARGEST], "untimed": [None, None]}
    rows, wanted = [], []
    for model, latencies in plan.items():
        for i, value in enumerate(latencies):
            rows.append(_at(client, day + dt.timedelta(hours=i), model, 1 if value is not None else None))
            wanted.append(value)
    made = _batch(client, rows)
    with engine.begin() as conn:
        for row, value in zip(made, wanted, strict=True):
            if value is not None:
                conn.execute(update(T).where(T.c.id == uuid.UUID(row.id)).values(latency_nanos=value))
                row.latency.CopyFrom(duration_pb2.Duration(seconds=value // NANOS, nanos=value % NANOS))
    assert _sums_differ(engine) == []
    _agree(engine, made, day - dt.timedelta(days=1), day + dt.timedelta(days=2), [[], [MODEL], [MODEL, MODULE, USER]])
    _agree(engine, made, day + dt.timedelta(hours=1), day + dt.timedelta(days=1), [[MODEL]])


def test_a_user_sees_only_their_rows_whatever_the_path_and_token(client: Client, actor: Any) -> None:
    """Over whole days where an admin's summary takes the walk, a user's counts their own rows
    only; an admin's page token replayed by the user reaches no one else's group."""
    rnd = random.Random(81)
    start = _span()
    ann: Actor = actor()
    others = _written(client, rnd, start, 3, 300, [new_user(client).id, ""])
    own = _batch(ann.c, [_random_interaction(rnd, start, 3, [""]) for _ in range(40)])
    low, high = start - dt.timedelta(days=1), start + dt.timedelta(days=5)
    assert _summary(client, low, high, [USER])[0] == _hand_count(own + others, [USER], low, high)
    for group_by in ([USER], [MODEL], []):
        assert _summary(ann.c, low, high, group_by, page_size=2)[0] == _hand_count(own, group_by, low, high)
    page = client.ai.GetAIUsageSummary(apb.GetAIUsageSummaryRequest(start_time=_ts(low), end_time=_ts(high), group_by=[USER], page_size=1))
    assert page.next_page_token
    try:
        replayed = ann.c.ai.GetAIUsageSummary(apb.GetAIUsageSummaryRequest(start_time=_ts(low), end_time=_ts(high), group_by=[USER], page_token=page.next_page_token))
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    else:
        assert {g.user_id for g in replayed.groups} <= {ann.id}


# ------------------------------------------------------------------ an operator's SQL


def test_the_days_follow_an_operators_updates_and_rewrites(client: Client, engine: Engine) -> None:
    """UPDATE of model and of request_time (to another day), a row deleted and inserted again
    with its id: the daily sums stay those of the rows, and both paths answer alike."""
    rnd = random.Random(82)
    start = _span()
    made = _written(client, rnd, start, 3, 120, [new_user(client).id, ""])
    ids = [uuid.UUID(m.id) for m in made]
    with engine.begin() as conn:
        conn.execute(update(T).where(T.c.id.in_(ids[:10])).values(model="renamed"))
        for m in made[10:20]:
            moved = m.request_time.ToDatetime(tzinfo=dt.UTC) + dt.timedelta(days=1)
            conn.execute(update(T).where(T.c.id == uuid.UUID(m.id)).values(request_time=moved))
        kept = [dict(r._mapping) for r in conn.execute(select(T).where(T.c.id.in_(ids[20:25])))]
        conn.execute(delete(T).where(T.c.id.in_(ids[20:25])))
        conn.execute(insert(T), kept)
    assert _sums_differ(engine) == []
    for m in made[:10]:
        m.model = "renamed"
    for m in made[10:20]:
        m.request_time.CopyFrom(_ts(m.request_time.ToDatetime(tzinfo=dt.UTC) + dt.timedelta(days=1)))
    _agree(engine, made, start - dt.timedelta(days=1), start + dt.timedelta(days=6), [[], [MODEL], [USER, MODEL]])


def test_a_row_replaced_in_place_is_counted_once(fresh_url: str) -> None:
    """A row written again over itself by its id: PostgreSQL's INSERT ... ON CONFLICT DO UPDATE
    runs the update triggers; SQLite's INSERT OR REPLACE runs the delete triggers only with
    recursive_triggers on (as README says for an operator's SQL), and without it the rebuild
    (`nexus-data usage rebuild`) puts the sums right. Then one call in the daily sums and the
    summary, on both paths."""
    database = Database(fresh_url)
    engine = create_engine(fresh_url)
    try:
        migrate.upgrade(database.engine)
        start = dt.datetime(1955, 6, 1, 3, tzinfo=dt.UTC)
        rows = _rows(20, start, 1, 5)
        with engine.begin() as conn:
            conn.execute(insert(T), rows)
        rid = rows[0]["id"]
        if _postgres(engine):
            columns = ", ".join(T.c.keys())  # not *: the stored search vector is the database's to write
            with engine.begin() as conn:
                conn.execute(text(
                    f"INSERT INTO ai_interactions ({columns}) SELECT {columns} FROM ai_interactions WHERE id = :id "
                    "ON CONFLICT (id) DO UPDATE SET model = excluded.model, revision = ai_interactions.revision + 1"), {"id": rid})
        else:
            replace = text("INSERT OR REPLACE INTO ai_interactions SELECT * FROM ai_interactions WHERE id = :id")
            with engine.begin() as conn:
                conn.exec_driver_sql("PRAGMA recursive_triggers = ON")
                conn.execute(replace, {"id": rid.hex})
                conn.exec_driver_sql("PRAGMA recursive_triggers = OFF")
            assert _sums_differ(engine) == []
            with engine.begin() as conn:
                conn.execute(replace, {"id": rid.hex})
            assert _sums_differ(engine) != [], "SQLite's REPLACE fires no delete trigger without recursive_triggers"
            with engine.begin() as conn:
                ai_usage.rebuild_usage_days(conn)
        assert _sums_differ(engine) == []
        day = dt.datetime.combine(start.date(), dt.time(), dt.UTC)
        walked = _direct(engine, day, day + dt.timedelta(days=2), [], "walk")
        assert sum(g.call_count for g in walked) == 20
        assert walked == _direct(engine, day, day + dt.timedelta(days=2), [], "plain")
    finally:
        engine.dispose()
        database.dispose()


def test_the_backfill_down_and_up_again_and_a_truncate(fresh_url: str) -> None:
    """The migration run on a database that already holds interactions fills the daily sums;
    down and up again with rows written between refills them; TRUNCATE (SQLite: a DELETE of
    every row) empties them; both paths answer alike throughout."""
    database = Database(fresh_url)
    engine = create_engine(fresh_url)
    try:
        migrate.upgrade(database.engine, "0017")
        start = dt.datetime(1950, 3, 1, 7, tzinfo=dt.UTC)
        with engine.begin() as conn:
            conn.execute(insert(T), _rows(400, start, 4, 1))
        migrate.upgrade(database.engine)
        assert _sums_differ(engine) == []
        span = (start - dt.timedelta(days=1), start + dt.timedelta(days=6))
        for group_by in ([], [MODEL, MODULE]):
            assert _direct(engine, *span, group_by, "walk") == _direct(engine, *span, group_by, "plain")
        migrate.downgrade(database.engine, "0017")
        with engine.begin() as conn:
            conn.execute(insert(T), _rows(200, start, 4, 2))
            conn.execute(update(T).where(T.c.model == "x").values(model="w"))
        migrate.upgrade(database.engine)
        assert _sums_differ(engine) == []
        total = sum(g.call_count for g in _direct(engine, *span, [], "walk"))
        assert total == 600
        for group_by in ([], [MODEL, USER]):
            assert _direct(engine, *span, group_by, "walk") == _direct(engine, *span, group_by, "plain")
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE ai_interactions CASCADE" if _postgres(engine) else "DELETE FROM ai_interactions"))
        assert _sums_differ(engine) == []
        with engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM ai_usage_days WHERE call_count <> 0")).scalar_one() == 0
        assert _direct(engine, *span, [], "walk") == _direct(engine, *span, [], "plain") == []
    finally:
        engine.dispose()
        database.dispose()


# ------------------------------------------------------------------ folding (PostgreSQL)


def _repeated(engine: Engine, days: list[dt.date]) -> int:
    keys = ", ".join(ai_usage.DAY_KEYS)
    with engine.connect() as conn:
        return int(conn.execute(text(
            f"SELECT count(*) FROM (SELECT {keys} FROM ai_usage_days WHERE day = ANY(:days) GROUP BY {keys} HAVING count(*) > 1) x"), {"days": days}).scalar_one())


def test_a_row_committed_after_a_fold_is_folded_by_the_next(client: Client, engine: Engine) -> None:
    """A writer that commits after a fold appended a row with an id below the mark that fold
    returned: the folds after it, passing their marks on as the server does, still fold its day
    (one row per key), even when no other row comes to that day."""
    if not _postgres(engine):
        with engine.begin() as conn:
            assert ai_usage.fold_usage_days(conn, 0) == (0, 0)
        return
    start = _span()
    late_day = dt.datetime.combine(start.date() + dt.timedelta(days=2), dt.time(), dt.UTC)
    _batch(client, [_at(client, late_day + dt.timedelta(hours=1), "late", 5)])
    with engine.begin() as conn:
        _, mark = ai_usage.fold_usage_days(conn, 0)
    slow = engine.connect()
    try:
        tx = slow.begin()
        slow.execute(insert(T), [dict(id=uuid.uuid4(), module="edge", model="late", prompt_tokens=0, completion_tokens=0, total_tokens=0,
                                      status="succeeded", latency_nanos=6, request_time=late_day + dt.timedelta(hours=2),
                                      create_time=late_day, update_time=late_day, revision=1)])
        _batch(client, [_at(client, start + dt.timedelta(hours=1), "meanwhile", 5)])  # a later id, committed first
        with engine.begin() as conn:
            _, mark = ai_usage.fold_usage_days(conn, mark)
        tx.commit()
    finally:
        slow.close()
    for _ in range(3):
        with engine.begin() as conn:
            _, mark = ai_usage.fold_usage_days(conn, mark)
    assert _sums_differ(engine) == []
    assert _repeated(engine, [late_day.date()]) == 0, "the late writer's day is never folded again"


def test_two_servers_folding_at_once_while_writers_append_keep_the_sums(client: Client, engine: Engine) -> None:
    rnd = random.Random(84)
    start = _span()
    users = [new_user(client).id, ""]
    failures: list[BaseException] = []

    def fold() -> None:
        mark = 0
        try:
            for _ in range(15):
                with engine.begin() as conn:
                    _, mark = ai_usage.fold_usage_days(conn, mark)
        except BaseException as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    with appending(client, rnd, start, users, 40):
        folders = [threading.Thread(target=fold) for _ in range(2)]
        for f in folders:
            f.start()
        for f in folders:
            f.join()
    assert not failures, failures
    assert _sums_differ(engine) == []
    end = start + dt.timedelta(days=3)
    assert _direct(engine, start, end, [USER], "walk") == _direct(engine, start, end, [USER], "plain")


def test_the_path_choice_reads_the_table_as_it_is_after_a_bulk_load(fresh_url: str) -> None:
    """PostgreSQL with autovacuum off: VACUUM ANALYZE on a small table, then a bulk load ten
    times its size. Few of the table's pages are now all-visible, so the summary must take the
    pass (summary_path's rule: at least WALK_FROM_VISIBLE of the table all-visible), not walks
    that read the heap for nearly every row."""
    database = Database(fresh_url)
    engine = create_engine(fresh_url)
    try:
        migrate.upgrade(database.engine)
        postgres = _postgres(engine)
        start = dt.datetime(1960, 1, 1, 5, tzinfo=dt.UTC)
        with engine.begin() as conn:
            if postgres:
                conn.execute(text("ALTER TABLE ai_interactions SET (autovacuum_enabled = false)"))
            conn.execute(insert(T), _rows(1000, start, 3, 3))
        if postgres:
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                conn.execute(text("VACUUM ANALYZE ai_interactions"))
        with engine.begin() as conn:
            for seed in range(4, 14):
                conn.execute(insert(T), _rows(1000, start + dt.timedelta(days=10), 3, seed))
        everything = (start - dt.timedelta(days=1), start + dt.timedelta(days=20))
        with engine.connect() as conn:
            if postgres:
                visible, pages = conn.execute(text(
                    "SELECT relallvisible, pg_relation_size('ai_interactions') / current_setting('block_size')::int FROM pg_class WHERE relname = 'ai_interactions'")).one()
                share = visible / max(pages, 1)
            else:
                share = 1.0  # SQLite reads no visibility map
            assert share < ai_usage.WALK_FROM_VISIBLE or not postgres
            expected = "plain" if share < ai_usage.WALK_FROM_VISIBLE else "walk"
            assert ai_usage.summary_path(conn, *everything, True) == expected, f"{share:.0%} of the pages all-visible"
    finally:
        engine.dispose()
        database.dispose()


# ------------------------------------------------------------------ the setting


def test_the_fold_setting_out_of_range_is_refused_and_in_range_serves(database_url: str) -> None:
    for raw in ("-1", "abc", "nan", "-0.5"):
        with pytest.raises(ConfigError, match="NEXUS_USAGE_FOLD_SECONDS"):
            check_settings(Config.from_env({"NEXUS_USAGE_FOLD_SECONDS": raw, "DATABASE_URL": database_url}))
    for raw, value in (("0", 0.0), ("1e9", 1e9)):
        config = Config.from_env({"NEXUS_USAGE_FOLD_SECONDS": raw, "DATABASE_URL": database_url})
        check_settings(config)
        assert config.usage_fold_seconds == value
    server = ServerThread(make_config(database_url, usage_fold_seconds=1e9)).start()
    server.stop()
