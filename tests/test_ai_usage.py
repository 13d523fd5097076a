"""AIService's AI interactions: GetAIUsageSummary against a count made by hand from what was
written (every grouping, a cut range, a filter, a user's own rows, pages, money to the nano),
BatchCreateAIInteractions of 10,000 (all or nothing), and the checks of one interaction.

The standard methods of AIInteraction are covered by the registry-driven suites
(tests/test_standard_methods.py, test_access_matrix.py, ...) through its sample."""
from __future__ import annotations

import datetime as dt
import itertools
import math
import random
import uuid
from collections.abc import Callable, Iterable
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, timestamp_pb2
from nexus.ai.v1 import ai_pb2 as apb
from nexus.common.v1 import common_pb2
from nexus.identity.v1 import identity_pb2 as ipb

from db.domains.ai_usage import MAX_TOKENS
from tests.conftest import Client, unique
from tests.support import expect_error, new_user
from tests.test_access import Actor, actor  # noqa: F401 - the fixture

Code = grpc.StatusCode
MODEL, MODULE, USER = apb.USAGE_GROUPING_MODEL, apb.USAGE_GROUPING_MODULE, apb.USAGE_GROUPING_USER
FIELD_OF = {MODEL: "model", MODULE: "module", USER: "user_id"}
ERRORS = (apb.AI_INTERACTION_STATUS_FAILED, apb.AI_INTERACTION_STATUS_TIMED_OUT)
NANOS = 1_000_000_000


# ------------------------------------------------------------------ helpers


def _ts(value: dt.datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


_SPANS = itertools.count(random.randrange(0, 1000))


def _span() -> dt.datetime:
    """The start of 30 days no other test writes in (summaries are over request_time): each
    call's own, in the 20th century, where the generic suites' interactions (made now) are not."""
    return dt.datetime(1900, 1, 1, tzinfo=dt.UTC) + dt.timedelta(days=next(_SPANS) * 30, seconds=random.randrange(0, 1000))


def _batch(c: Client, interactions: Iterable[apb.AIInteraction]) -> list[apb.AIInteraction]:
    request = apb.BatchCreateAIInteractionsRequest(requests=[apb.CreateAIInteractionRequest(ai_interaction=i) for i in interactions])
    return list(c.ai.BatchCreateAIInteractions(request, timeout=120).ai_interactions)


def _random_interaction(rnd: random.Random, start: dt.datetime, days: int, user_ids: list[str]) -> apb.AIInteraction:
    msg = apb.AIInteraction(
        module=rnd.choice(["chat", "analysis", "search"]),
        model=rnd.choice(["gpt-4o", "claude-3", "llama-3", "mistral"]),
        prompt="what is the weather",
        prompt_tokens=rnd.randrange(0, 5000),
        completion_tokens=rnd.randrange(0, 2000),
        status=rnd.choice([0, 1, 1, 1, 2, 3]),
        request_time=_ts(start + dt.timedelta(seconds=rnd.randrange(0, days * 86400), microseconds=rnd.randrange(0, 1_000_000))),
    )
    user = rnd.choice(user_ids)
    if user:
        msg.user_id = user
    currency = rnd.choice(["USD", "USD", "EUR", "JPY", None])
    if currency:
        msg.cost.CopyFrom(common_pb2.Money(currency_code=currency, units=rnd.randrange(0, 4), nanos=rnd.randrange(0, NANOS)))
    if rnd.random() < 0.9:
        msg.latency.CopyFrom(duration_pb2.Duration(seconds=rnd.randrange(0, 20), nanos=rnd.randrange(0, NANOS)))
    return msg


def _nearest_rank(values: list[int], p: int) -> int:
    """The smallest value at least p% of values do not exceed."""
    ordered = sorted(values)
    return ordered[math.ceil(p * len(ordered) / 100) - 1]


def _hand_count(rows: list[apb.AIInteraction], group_by: list[int], start: dt.datetime, end: dt.datetime, keep: Callable[[apb.AIInteraction], bool] = lambda r: True) -> list[apb.UsageGroup]:
    """The summary computed in Python from the written interactions, in key order."""
    groups: dict[tuple[str, ...], list[apb.AIInteraction]] = {}
    for row in rows:
        at = row.request_time.ToDatetime(tzinfo=dt.UTC)
        if not (start <= at < end) or not keep(row):
            continue
        key = tuple(getattr(row, FIELD_OF[g]) for g in group_by) + (row.cost.currency_code if row.HasField("cost") else "",)
        groups.setdefault(key, []).append(row)
    out = []
    for key in sorted(groups):
        members = groups[key]
        group = apb.UsageGroup(
            call_count=len(members),
            error_count=sum(r.status in ERRORS for r in members),
            prompt_tokens=sum(r.prompt_tokens for r in members),
            completion_tokens=sum(r.completion_tokens for r in members),
            total_tokens=sum(r.total_tokens for r in members),
        )
        for g, value in zip(group_by, key, strict=False):
            setattr(group, FIELD_OF[g], value)
        if key[-1]:
            nanos = sum(r.cost.units * NANOS + r.cost.nanos for r in members)
            group.cost.CopyFrom(common_pb2.Money(currency_code=key[-1], units=nanos // NANOS, nanos=nanos % NANOS))
        latencies = [r.latency.seconds * NANOS + r.latency.nanos for r in members if r.HasField("latency")]
        if latencies:
            for field, p in (("latency_p50", 50), ("latency_p95", 95)):
                value = _nearest_rank(latencies, p)
                getattr(group, field).CopyFrom(duration_pb2.Duration(seconds=value // NANOS, nanos=value % NANOS))
        out.append(group)
    return out


def _summary(c: Client, start: dt.datetime, end: dt.datetime, group_by: list[int], page_size: int = 0, **kw: Any) -> tuple[list[apb.UsageGroup], int, int]:
    """Every group, page after page: (groups, total_size of the first page, pages)."""
    groups: list[apb.UsageGroup] = []
    token, pages, total = "", 0, -1
    while True:
        page = c.ai.GetAIUsageSummary(apb.GetAIUsageSummaryRequest(
            start_time=_ts(start), end_time=_ts(end), group_by=group_by, page_size=page_size, page_token=token, **kw))
        pages += 1
        assert pages <= 1000, "the pages end"
        total = page.total_size if total < 0 else total
        assert page.total_size == total, "total_size is the same on every page"
        groups.extend(page.groups)
        token = page.next_page_token
        if not token:
            return groups, total, pages


def _written(c: Client, rnd: random.Random, start: dt.datetime, days: int, count: int, user_ids: list[str]) -> list[apb.AIInteraction]:
    sent = [_random_interaction(rnd, start, days, user_ids) for _ in range(count)]
    made = _batch(c, sent)
    assert len(made) == count
    return made


# ------------------------------------------------------------------ the summary


GROUPINGS = [[MODEL], [MODULE], [USER], [MODEL, MODULE, USER], [USER, MODEL], []]


def test_the_summary_equals_a_hand_count_for_every_grouping(client: Client) -> None:
    rnd = random.Random(20260101)
    start, days = _span(), 10
    users = [new_user(client).id for _ in range(4)]
    made = _written(client, rnd, start, days, 1000, users)
    end = start + dt.timedelta(days=days)
    for group_by in GROUPINGS:
        expected = _hand_count(made, group_by, start, end)
        got, total, pages = _summary(client, start, end, group_by, page_size=7)
        assert got == expected, group_by
        assert total == len(expected) and pages == math.ceil(len(expected) / 7) or (pages == 1 and not expected)
    assert sum(g.call_count for g in _hand_count(made, [], start, end)) == 1000


def test_a_range_that_cuts_the_data_and_a_filter_narrow_the_summary(client: Client) -> None:
    rnd = random.Random(7)
    start, days = _span(), 10
    users = [new_user(client).id for _ in range(3)]
    made = _written(client, rnd, start, days, 1000, users)
    # A range within the data: its ends cut through it (end exclusive, start inclusive).
    inner_start = made[17].request_time.ToDatetime(tzinfo=dt.UTC)
    inner_end = made[42].request_time.ToDatetime(tzinfo=dt.UTC)
    if inner_end < inner_start:
        inner_start, inner_end = inner_end, inner_start
    for group_by in ([MODEL, USER], [MODULE], []):
        expected = _hand_count(made, group_by, inner_start, inner_end)
        assert 0 < sum(g.call_count for g in expected) < 1000
        assert _summary(client, inner_start, inner_end, group_by, page_size=1000)[0] == expected
    filtered = 'model = "claude-3" OR status = TIMED_OUT'
    keep = lambda r: r.model == "claude-3" or r.status == apb.AI_INTERACTION_STATUS_TIMED_OUT  # noqa: E731
    end = start + dt.timedelta(days=days)
    for group_by in ([MODEL], [USER, MODULE], []):
        expected = _hand_count(made, group_by, start, end, keep)
        assert _summary(client, start, end, group_by, page_size=3, filter=filtered)[0] == expected
    only_errors = _summary(client, start, end, [], filter="status = FAILED OR status = TIMED_OUT")[0]
    assert sum(g.call_count for g in only_errors) == sum(g.error_count for g in only_errors) == sum(r.status in ERRORS for r in made)


def test_a_users_summary_counts_only_their_own_rows(client: Client, actor: Callable[..., Actor]) -> None:
    rnd = random.Random(11)
    start, days = _span(), 5
    ann, bob = actor(), actor()
    others = _written(client, rnd, start, days, 300, [bob.id, new_user(client).id])
    # Ann's own, written by Ann (the caller by default).
    own = _batch(ann.c, [_random_interaction(rnd, start, days, [""]) for _ in range(200)])
    assert {r.user_id for r in own} == {ann.id}
    end = start + dt.timedelta(days=days)
    for group_by in ([USER], [MODEL], []):
        assert _summary(ann.c, start, end, group_by)[0] == _hand_count(own, group_by, start, end)
        assert _summary(client, start, end, group_by)[0] == _hand_count(own + others, group_by, start, end), "admins sum all"
    bobs = [r for r in others if r.user_id == bob.id]
    assert _summary(bob.c, start, end, [MODEL])[0] == _hand_count(bobs, [MODEL], start, end)
    # A filter naming another user's rows cannot reach past the read rule.
    assert _summary(ann.c, start, end, [], filter=f'user_id = "{bob.id}"')[0] == []


def test_money_sums_are_exact_to_the_nano(client: Client) -> None:
    start = _span()
    nanos = [999_999_999, 1, 333_333_333, 666_666_667, 999_999_999]
    rows = [
        apb.AIInteraction(module="m", model="exact", request_time=_ts(start + dt.timedelta(seconds=i)),
                          cost=common_pb2.Money(currency_code="EUR", units=10**9 - i, nanos=n))
        for i, n in enumerate(nanos)
    ]
    _batch(client, rows)
    [group] = _summary(client, start, start + dt.timedelta(hours=1), [MODEL])[0]
    total = sum((10**9 - i) * NANOS + n for i, n in enumerate(nanos))
    assert (group.model, group.cost.currency_code, group.cost.units, group.cost.nanos) == ("exact", "EUR", total // NANOS, total % NANOS)
    assert group.cost.nanos == 999_999_999 and group.cost.units == 5 * 10**9 - 10 + 2


def test_percentiles_are_nearest_rank_values_that_were_written(client: Client) -> None:
    start = _span()
    latencies = [5, 1, 4, 2, 3, 100, 7, 6, 9, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19]  # twenty, in seconds
    _batch(client, [
        apb.AIInteraction(module="m", model="timed", request_time=_ts(start + dt.timedelta(seconds=i)), latency=duration_pb2.Duration(seconds=s))
        for i, s in enumerate(latencies)
    ])
    [group] = _summary(client, start, start + dt.timedelta(hours=1), [])[0]
    # Rank ceil(0.5 * 20) = 10 and ceil(0.95 * 20) = 19 of 1..19, 100.
    assert (group.latency_p50.seconds, group.latency_p95.seconds) == (10, 19)
    [first_three] = _summary(client, start, start + dt.timedelta(seconds=3), [])[0]  # 5, 1, 4
    assert (first_three.latency_p50.seconds, first_three.latency_p95.seconds) == (4, 5)


def test_percentiles_are_exact_at_bucket_edges_in_groups_of_one_and_over_hours(client: Client) -> None:
    """The summary counts latencies in buckets on a log scale (a power of two cut in equal
    parts) and then picks the exact value inside one: equal values at a power of two and
    either side of it, a group of one row, latencies of 0 and of hours, a p95 in another
    bucket than the p50, under every grouping (each its own bucket width)."""
    start = _span()
    edge, hour = 1 << 30, 3600 * NANOS
    latencies = {
        # 30 on the last value below the power of two, 50 on it, 20 on the last value of its
        # bucket (2**24 wide where a power of two has 64) and 1 on the first of the next.
        "edge": [edge - 1] * 30 + [edge] * 50 + [edge + (1 << 24) - 1] * 20 + [edge + (1 << 24)],
        "one": [5 * hour + 7],
        # p50 among zeros, p95 among hours: far apart buckets, and the smallest and large values.
        "spread": [0] * 11 + [1, 2, 3] + [hour * h + h for h in range(1, 7)],
        "close": [edge + i for i in range(40)],
    }
    rows = []
    for model, values in latencies.items():
        for i, value in enumerate(values):
            rows.append(apb.AIInteraction(
                module=("a", "b")[i % 2], model=model, request_time=_ts(start + dt.timedelta(seconds=len(rows))),
                latency=duration_pb2.Duration(seconds=value // NANOS, nanos=value % NANOS)))
    made = _batch(client, rows)
    end = start + dt.timedelta(days=1)
    for group_by in ([], [MODEL], [MODEL, MODULE], [MODEL, MODULE, USER]):
        assert _summary(client, start, end, group_by, page_size=2)[0] == _hand_count(made, group_by, start, end), group_by

    def nanos(d: duration_pb2.Duration) -> int:
        return d.seconds * NANOS + d.nanos

    by_model = {g.model: (nanos(g.latency_p50), nanos(g.latency_p95)) for g in _summary(client, start, end, [MODEL])[0]}
    assert by_model["edge"] == (edge, edge + (1 << 24) - 1)  # ranks 51 and 96 of 101
    assert by_model["one"] == (5 * hour + 7, 5 * hour + 7)
    assert by_model["spread"] == (0, 5 * hour + 5)  # rank 10 of 20, rank 19 of 20
    assert by_model["close"] == (edge + 19, edge + 37)


def test_a_summary_refuses_bad_requests_naming_the_field(client: Client) -> None:
    start = _span()
    end = start + dt.timedelta(days=1)

    def refused(field: str, **kw: Any) -> None:
        err = expect_error(Code.INVALID_ARGUMENT, client.ai.GetAIUsageSummary, apb.GetAIUsageSummaryRequest(**kw))
        assert [v.field for v in err.violations] == [field], err.message

    refused("start_time", end_time=_ts(end))
    refused("end_time", start_time=_ts(start))
    refused("end_time", start_time=_ts(start), end_time=_ts(start))
    refused("end_time", start_time=_ts(end), end_time=_ts(start))
    refused("group_by[1]", start_time=_ts(start), end_time=_ts(end), group_by=[MODEL, MODEL])
    refused("group_by[0]", start_time=_ts(start), end_time=_ts(end), group_by=[apb.USAGE_GROUPING_UNSPECIFIED])
    refused("group_by[2]", start_time=_ts(start), end_time=_ts(end), group_by=[USER, MODULE, 99])
    refused("page_size", start_time=_ts(start), end_time=_ts(end), page_size=-1)
    refused("page_token", start_time=_ts(start), end_time=_ts(end), page_token="not-a-token")
    refused("filter", start_time=_ts(start), end_time=_ts(end), filter="no_such_field = 1")
    # A token of one query is refused by another.
    _batch(client, [apb.AIInteraction(module="m", model=f"model-{i}", request_time=_ts(start)) for i in range(3)])
    page = client.ai.GetAIUsageSummary(apb.GetAIUsageSummaryRequest(start_time=_ts(start), end_time=_ts(end), group_by=[MODEL], page_size=1))
    assert page.next_page_token and page.total_size == 3
    refused("page_token", start_time=_ts(start), end_time=_ts(end), group_by=[MODULE], page_size=1, page_token=page.next_page_token)


def test_a_guest_may_sum_but_sees_no_rows(client: Client, actor: Callable[..., Actor]) -> None:
    start = _span()
    _batch(client, [apb.AIInteraction(module="m", model="seen", request_time=_ts(start))])
    guest = actor(ipb.USER_ROLE_GUEST)
    assert _summary(guest.c, start, start + dt.timedelta(days=1), [MODEL])[0] == []


# ------------------------------------------------------------------ batches and one interaction


def test_a_batch_of_ten_thousand_is_written_in_one_call(client: Client) -> None:
    module = unique("bulk")
    start = _span()
    made = _batch(client, [
        apb.AIInteraction(module=module, model="gpt-4o", prompt_tokens=i % 50, completion_tokens=1, request_time=_ts(start))
        for i in range(10_000)
    ])
    assert len(made) == 10_000 and len({m.id for m in made}) == 10_000
    assert [m.total_tokens for m in made[:3]] == [1, 2, 3], "in request order, totals computed"
    listed = client.ai.ListAIInteractions(apb.ListAIInteractionsRequest(filter=f'module = "{module}"', page_size=1))
    assert listed.total_size == 10_000
    [group] = _summary(client, start, start + dt.timedelta(seconds=1), [MODULE])[0]
    assert (group.module, group.call_count, group.total_tokens) == (module, 10_000, sum(i % 50 + 1 for i in range(10_000)))


def test_a_batch_over_ten_thousand_or_with_a_bad_row_writes_nothing(client: Client) -> None:
    module = unique("refused")

    def row(i: int, **kw: Any) -> apb.AIInteraction:
        return apb.AIInteraction(module=module, model="gpt-4o", **kw)

    def count() -> int:
        return client.ai.ListAIInteractions(apb.ListAIInteractionsRequest(filter=f'module = "{module}"', page_size=1)).total_size

    err = expect_error(Code.INVALID_ARGUMENT, _batch, client, [row(i) for i in range(10_001)])
    assert [v.field for v in err.violations] == ["requests"] and "10000" in err.message
    bad = [row(i) for i in range(5000)]
    bad[4321] = row(4321, prompt_tokens=-1)
    err = expect_error(Code.INVALID_ARGUMENT, _batch, client, bad)
    assert [v.field for v in err.violations] == ["requests[4321].ai_interaction.prompt_tokens"]
    bad[4321] = row(4321, prompt_tokens=3, completion_tokens=4, total_tokens=8)
    err = expect_error(Code.INVALID_ARGUMENT, _batch, client, bad)
    assert [v.field for v in err.violations] == ["requests[4321].ai_interaction.total_tokens"]
    bad[4321] = apb.AIInteraction(model="no module")
    err = expect_error(Code.INVALID_ARGUMENT, _batch, client, bad)
    assert [v.field for v in err.violations] == ["requests[4321].ai_interaction.module"]
    bad[4321] = row(4321, user_id=str(uuid.uuid4()))
    err = expect_error(Code.NOT_FOUND, _batch, client, bad)
    assert err.info.metadata["field"] == "requests[4321].ai_interaction.user_id" or err.resource is not None
    assert count() == 0, "all or nothing"


def _create(c: Client, **fields: Any) -> apb.AIInteraction:
    return c.ai.CreateAIInteraction(apb.CreateAIInteractionRequest(ai_interaction=apb.AIInteraction(module="chat", model="gpt-4o", **fields)))


def test_one_interaction_is_checked_field_by_field(client: Client) -> None:
    made = _create(client, prompt_tokens=7, completion_tokens=5)
    assert made.total_tokens == 12 and made.status == apb.AI_INTERACTION_STATUS_SUCCEEDED
    assert made.request_time == made.create_time, "the creation time when unset"
    assert _create(client, prompt_tokens=7, completion_tokens=5, total_tokens=12).total_tokens == 12
    cases = {
        "ai_interaction.total_tokens": {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 11},
        "ai_interaction.completion_tokens": {"completion_tokens": -5},
        "ai_interaction.cost.units": {"cost": common_pb2.Money(currency_code="USD", units=-1)},
        "ai_interaction.cost.nanos": {"cost": common_pb2.Money(currency_code="USD", nanos=1_000_000_000)},
        "ai_interaction.cost.currency_code": {"cost": common_pb2.Money(currency_code="usd", units=1)},
        "ai_interaction.latency": {"latency": duration_pb2.Duration(seconds=-1)},
        "ai_interaction.status": {"status": 42},
    }
    for field, fields in cases.items():
        err = expect_error(Code.INVALID_ARGUMENT, _create, client, **fields)
        assert [v.field for v in err.violations] == [field], (field, err.message)
    kept = _create(client, cost=common_pb2.Money(currency_code="JPY", units=3, nanos=5), latency=duration_pb2.Duration(seconds=2, nanos=7))
    got = client.ai.GetAIInteraction(apb.GetAIInteractionRequest(id=kept.id))
    assert (got.cost.units, got.cost.nanos, got.latency.seconds, got.latency.nanos) == (3, 5, 2, 7)


def test_a_user_records_their_own_interactions_and_only_admins_delete(client: Client, actor: Callable[..., Actor]) -> None:
    ann, bob = actor(), actor()
    mine = _create(ann.c, prompt="ann's question")
    assert mine.user_id == ann.id
    err = expect_error(Code.PERMISSION_DENIED, _create, ann.c, user_id=bob.id)
    assert err.info.metadata["field"] == "ai_interaction.user_id"
    expect_error(Code.PERMISSION_DENIED, bob.c.ai.GetAIInteraction, apb.GetAIInteractionRequest(id=mine.id))
    expect_error(Code.PERMISSION_DENIED, ann.c.ai.DeleteAIInteraction, apb.DeleteAIInteractionRequest(id=mine.id))
    assert not hasattr(ann.c.ai, "UpdateAIInteraction"), "a record: no Update"
    client.ai.DeleteAIInteraction(apb.DeleteAIInteractionRequest(id=mine.id))
    expect_error(Code.NOT_FOUND, client.ai.GetAIInteraction, apb.GetAIInteractionRequest(id=mine.id))


@pytest.mark.parametrize("query", ["weather", "forecast"])
def test_search_ranks_prompt_before_response(client: Client, query: str) -> None:
    word = unique("w")
    in_response = _create(client, prompt="something else", response=f"{word} {query}")
    in_prompt = _create(client, prompt=f"{word} {query}", response="an answer")
    hits = client.ai.SearchAIInteractions(apb.SearchAIInteractionsRequest(query=f"{word} {query}", page_size=10)).results
    assert [h.ai_interaction.id for h in hits] == [in_prompt.id, in_response.id]


def test_counts_and_costs_past_their_bounds_are_refused_naming_the_field(client: Client, actor: Callable[..., Actor]) -> None:
    """Token counts past MAX_TOKENS and costs past a billion units are refused where they are
    written (their sums over billions of rows then fit the summary's 64-bit fields on both
    databases); rows at the bounds are summed exactly, and the server stays SERVING."""
    from tests.test_server import SERVING, health_of

    user = actor()
    huge = [
        (["prompt_tokens", "completion_tokens"], apb.AIInteraction(module="m", model="huge", prompt_tokens=2**62, completion_tokens=2**62)),
        (["completion_tokens"], apb.AIInteraction(module="m", model="huge", completion_tokens=MAX_TOKENS + 1)),
        (["cost.units"], apb.AIInteraction(module="m", model="huge", cost=common_pb2.Money(currency_code="USD", units=10**9 + 1))),
    ]
    for fields, row in huge:
        err = expect_error(Code.INVALID_ARGUMENT, user.c.ai.CreateAIInteraction, apb.CreateAIInteractionRequest(ai_interaction=row))
        assert [v.field for v in err.violations] == [f"ai_interaction.{f}" for f in fields], err.message
        request = apb.BatchCreateAIInteractionsRequest(requests=[apb.CreateAIInteractionRequest(ai_interaction=apb.AIInteraction(module="m", model="ok")),
                                                                 apb.CreateAIInteractionRequest(ai_interaction=row)])
        err = expect_error(Code.INVALID_ARGUMENT, user.c.ai.BatchCreateAIInteractions, request)
        assert [v.field for v in err.violations] == [f"requests[1].ai_interaction.{f}" for f in fields], err.message
    start = _span()
    at_bounds = apb.AIInteraction(module="m", model="at the bounds", prompt_tokens=MAX_TOKENS, completion_tokens=MAX_TOKENS,
                                  cost=common_pb2.Money(currency_code="USD", units=10**9, nanos=999_999_999))
    rows = []
    for i in range(3):
        row = apb.AIInteraction()
        row.CopyFrom(at_bounds)
        row.request_time.CopyFrom(_ts(start + dt.timedelta(seconds=i)))
        rows.append(row)
    _batch(user.c, rows)
    [group] = _summary(user.c, start, start + dt.timedelta(hours=1), [])[0]
    assert (group.call_count, group.prompt_tokens, group.total_tokens) == (3, 3 * MAX_TOKENS, 6 * MAX_TOKENS)
    assert (group.cost.units, group.cost.nanos) == (3 * 10**9 + 2, 999_999_997)
    assert health_of(client.channel, "readiness") == SERVING
