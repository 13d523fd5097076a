"""Attacks on total_size above NEXUS_EXACT_COUNT_LIMIT and on Search's offset page tokens."""
from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from typing import Any

import grpc
import pytest
import sqlalchemy as sa
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.work.v1 import work_pb2 as wpb

from db.engine.paging import fingerprint
from tests.conftest import Client, connect, unique
from tests.support import new_project
from tests.test_access import Actor, actor  # noqa: F401 - the fixture
from tests.test_total_size import LIMIT, counting  # noqa: F401 - the fixture: a server counting exactly up to LIMIT


def _analyze(client: Client, table: str) -> None:
    if client.backend != "postgresql":
        return
    engine = sa.create_engine(client.database_url)
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"ANALYZE {table}")
    finally:
        engine.dispose()


def test_total_size_is_never_below_the_rows_the_pages_return(client: Client, counting: Client) -> None:
    """Above the limit total_size is an estimate (AIP-158), which may be far below the matches
    (SQLite's limit + 1 always is): still, no page says fewer than the rows the pages up to it
    returned, and one more while there is a next page, so the last page's is never below what
    the client was handed."""
    project = new_project(client)
    word = unique("under")
    n = 40
    requests = [wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} {i}")) for i in range(n)]
    client.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=requests))
    filter_text = f'project_id = "{project.id}"'
    seen, token, totals = 0, "", []
    while True:
        page = counting.work.ListTasks(wpb.ListTasksRequest(filter=filter_text, page_size=10, page_token=token))
        seen += len(page.tasks)
        totals.append(page.total_size)
        token = page.next_page_token
        assert page.total_size >= seen + (1 if token else 0), f"total_size {totals} after {seen} rows"
        if not token:
            break
    assert seen == n
    assert totals[-1] >= seen, f"total_size {totals} while the pages returned {seen} rows"


def test_the_estimate_does_not_count_rows_the_caller_may_not_see(
    client: Client, counting: Client, actor: Callable[..., Actor]
) -> None:
    """Bob sees the public channels only. Adding private channels he is no member of (same
    name prefix) must not move his total_size: else it reveals how many hidden rows exist."""
    bob = actor()
    as_bob = connect(client.backend, client.database_url, counting.server, secret=bob.key.secret)
    word = unique("leak")
    try:
        for i in range(3 * LIMIT):
            client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"{word} pub {i}", is_private=False)))
        filter_text = f'name = "{word}*"'
        _analyze(client, "channels")
        before = as_bob.chat.ListChannels(cpb.ListChannelsRequest(filter=filter_text, page_size=2)).total_size
        exact = as_bob.chat.ListChannels(cpb.ListChannelsRequest(filter=filter_text, count_only=True)).total_size
        assert exact == 3 * LIMIT
        hidden = 1500
        for i in range(hidden):
            client.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"{word} priv {i}", is_private=True)))
        _analyze(client, "channels")
        after = as_bob.chat.ListChannels(cpb.ListChannelsRequest(filter=filter_text, page_size=2)).total_size
        assert as_bob.chat.ListChannels(cpb.ListChannelsRequest(filter=filter_text, count_only=True)).total_size == exact
        # Bob can see 15 rows; his total_size should not grow with the 1,500 he cannot.
        assert after <= max(before, exact) * 2, f"bob's total_size went {before} -> {after} after {hidden} hidden channels"
    finally:
        as_bob.channel.close()


def _forge(query_fp: str, offset: Any) -> str:
    raw = json.dumps({"q": query_fp, "o": offset}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(hashlib.sha256(raw).digest()[:6] + raw).decode().rstrip("=")


@pytest.mark.parametrize("offset", [2**63 - 1, 2**63, 2**70])
def test_a_forged_search_offset_is_invalid_argument_not_internal(client: Client, offset: int) -> None:
    """Page tokens carry an unkeyed checksum: anyone can mint one. An offset no database takes
    must be INVALID_ARGUMENT, never INTERNAL / UNKNOWN."""
    word = unique("forge")
    project = new_project(client)
    client.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} one")))
    token = _forge(fingerprint("task", "search", word, ""), offset)
    try:
        page = client.work.SearchTasks(wpb.SearchTasksRequest(query=word, page_token=token))
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
    else:
        assert len(page.results) == 0 and not page.next_page_token
