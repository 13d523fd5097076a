"""Two `nexus-data serve` processes on one database behave as one service: a write answered by
one replica is seen by the other's very next read, and its event reaches the other's streams."""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.chat.v1 import chat_pb2_grpc
from nexus.work.v1 import work_pb2 as wpb
from nexus.work.v1 import work_pb2_grpc

from tests.conftest import Client, authed_channel, unique
from tests.support import new_channel, new_project
from tests.test_server import SERVING, _free_port, health_of, serve_process, wait_for
from tests.test_streams import EventReader, contents

ITERATIONS = 300


class Replica:
    """One server process of its own, and stubs that call it with the admin key."""

    def __init__(self, database_url: str, secret: str, log: IO[str]) -> None:
        self.port = _free_port()
        # A short poll: on SQLite, with no NOTIFY, another process's events are found by it.
        self.proc = serve_process(database_url, self.port, log, NEXUS_DRAIN_SECONDS="0", NEXUS_GRACE_SECONDS="1", NEXUS_STREAM_POLL_SECONDS="0.2")
        probe = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        try:
            grpc.channel_ready_future(probe).result(timeout=60)
            assert wait_for(lambda: health_of(probe, "readiness") == SERVING, timeout=30)
        finally:
            probe.close()
        self.channel = authed_channel(f"127.0.0.1:{self.port}", secret)
        self.work = work_pb2_grpc.WorkServiceStub(self.channel)
        self.chat = chat_pb2_grpc.ChatServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except Exception:  # noqa: BLE001 - it is killed instead
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def replicas(client: Client, tmp_path: Path) -> Iterator[tuple[Replica, Replica]]:
    log = (tmp_path / "replicas.log").open("w+")
    started: list[Replica] = []
    try:
        started.append(Replica(client.database_url, client.admin_secret, log))
        started.append(Replica(client.database_url, client.admin_secret, log))
        yield started[0], started[1]
    finally:
        for replica in started:
            replica.stop()
        log.close()


def test_a_write_answered_by_one_replica_is_read_by_the_other_at_once(client: Client, replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    project = new_project(client)
    for i in range(ITERATIONS):
        title = f"task {i} {unique()}"
        created = a.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=title)))
        assert b.work.GetTask(wpb.GetTaskRequest(id=created.id)) == created, i
        updated = a.work.UpdateTask(
            wpb.UpdateTaskRequest(task=wpb.Task(id=created.id, title=f"{title} done"), update_mask=field_mask_pb2.FieldMask(paths=["title"]))
        )
        seen = b.work.GetTask(wpb.GetTaskRequest(id=created.id))
        assert seen == updated and seen.title == f"{title} done", i
        listed = b.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"', order_by="create_time desc", page_size=1))
        assert listed.total_size == i + 1 and list(listed.tasks) == [updated], i


def test_a_chat_message_posted_on_one_replica_is_listed_by_the_other_at_once(client: Client, replicas: tuple[Replica, Replica]) -> None:
    a, b = replicas
    channel = new_channel(client)
    for i in range(ITERATIONS):
        posted = a.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel.id, content=f"m{i}")))
        listed = b.chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=f'channel_id = "{channel.id}"', order_by="create_time desc", page_size=1))
        assert listed.total_size == i + 1 and list(listed.chat_messages) == [posted], i


def test_events_committed_on_one_replica_reach_the_streams_of_the_other(client: Client, replicas: tuple[Replica, Replica]) -> None:
    """Every event, once and in order, to a stream on the other replica and one on the writer's own."""
    a, b = replicas
    channel = new_channel(client)
    far = EventReader(b.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
    near = EventReader(a.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
    time.sleep(0.5)  # both streams are open (a stream sends nothing before its first event)
    try:
        for i in range(50):
            a.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel.id, content=f"e{i}")))
        for reader in (far, near):
            got = reader.take(50, timeout=30)
            assert contents(got) == [f"e{i}" for i in range(50)]
            assert [e.sequence for e in got] == list(range(got[0].sequence, got[0].sequence + 50))
            assert reader.quiet(0.5) == []
    finally:
        far.cancel()
        near.cancel()
