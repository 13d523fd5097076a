"""Database.release_connections (the memory trimmer's, after a burst) while calls are in flight:
every call must still succeed, and a transaction must not be broken by it."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from google.protobuf import field_mask_pb2
from nexus.work.v1 import work_pb2 as wpb

from tests.conftest import Client, ServerThread, connect, make_config, unique
from tests.support import new_project

INTERVAL = float(os.environ.get("ATTACK_RELEASE_INTERVAL", "0.1"))


@pytest.fixture
def own_server(client: Client) -> Iterator[tuple[ServerThread, Client]]:
    server = ServerThread(make_config(client.database_url)).start()
    c = connect(client.backend, client.database_url, server)
    yield server, c
    c.channel.close()
    server.stop()


def test_calls_in_flight_survive_repeated_connection_releases(own_server: tuple[ServerThread, Client]) -> None:
    server, c = own_server
    assert server.app is not None
    db = server.app.db
    project = new_project(c)
    word = unique("rel")
    failures: list[str] = []
    stop = threading.Event()
    done = [0]

    def worker(n: int) -> None:
        task = c.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} w{n}")))
        i = 0
        while not stop.is_set():
            i += 1
            try:
                kind = i % 4
                if kind == 0:
                    c.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"', page_size=50))
                elif kind == 1:
                    requests = [wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title=f"{word} {n} {i} {k}")) for k in range(20)]
                    c.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=requests))
                elif kind == 2:
                    task = c.work.UpdateTask(wpb.UpdateTaskRequest(
                        task=wpb.Task(id=task.id, title=f"{word} w{n} {i}"), update_mask=field_mask_pb2.FieldMask(paths=["title"])))
                else:
                    c.work.SearchTasks(wpb.SearchTasksRequest(query=word, page_size=20))
                done[0] += 1
            except grpc.RpcError as e:
                failures.append(f"{kind}: {e.code().name} {e.details()}")

    def releaser() -> None:
        while not stop.is_set():
            db.release_connections()
            stop.wait(INTERVAL)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)] + [threading.Thread(target=releaser)]
    for t in threads:
        t.start()
    time.sleep(6)
    stop.set()
    for t in threads:
        t.join(60)
    assert done[0] > 50
    assert not failures, f"{len(failures)} failed of {done[0] + len(failures)}: {sorted(set(failures))[:5]}"
    # And the server still answers on its renewed connections.
    assert c.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"', count_only=True)).total_size > 6
