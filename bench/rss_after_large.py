#!/usr/bin/env python3
"""Server memory after large requests: RSS before, at the peak and 10 s after a burst of
maximum-size requests, against a real `nexus-data serve` process on SQLite and PostgreSQL.

    .venv/bin/python bench/rss_after_large.py                       # both databases, ~2 min
    .venv/bin/python bench/rss_after_large.py --db sqlite --env MALLOC_ARENA_MAX=2

The burst, from --concurrency client threads, --rounds times over: CreateChatMessage with
content at its limit (65,536 characters) and 50 attachments, UpdateChatMessage to another such
content, CreateConversationMessage with content and role_metadata at their limits,
BatchCreateTasks of 200 tasks whose descriptions are at their limit, in 4 calls of 50 (~3.3 MiB a
request: an answer past the 4 MiB response limit is refused),
and ListChatMessages and ListTasks of 1,000 rows (pages cut at the 4 MiB response budget). No
Search: on PostgreSQL, tables this fresh have no statistics, and a sequential scan ranks every
long text of the table. RSS is
read from /proc/<pid>/status every 50 ms. Each --env variant (NAME=VALUE, repeatable, "-" for
none) runs on a fresh server and database.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import asyncio  # noqa: E402

import grpc  # noqa: E402
from google.protobuf import field_mask_pb2, struct_pb2  # noqa: E402
from nexus.chat.v1 import chat_pb2 as cpb  # noqa: E402
from nexus.chat.v1 import chat_pb2_grpc  # noqa: E402
from nexus.identity.v1 import identity_pb2 as ipb  # noqa: E402
from nexus.identity.v1 import identity_pb2_grpc  # noqa: E402
from nexus.work.v1 import work_pb2 as wpb  # noqa: E402
from nexus.work.v1 import work_pb2_grpc  # noqa: E402

import benchdb  # noqa: E402
from stream_fanout import ServerProcess, free_port, rss_mib, run_cleanups, wait_ready  # noqa: E402
from db.engine.codecs import DEFAULT_LIMITS  # noqa: E402

TEXT = DEFAULT_LIMITS["text"].chars or 0
JSON_BYTES = DEFAULT_LIMITS["json"].json_bytes or 0
WORDS = " ".join(benchdb.VOCABULARY)
TASKS_PER_BATCH = 50  # ~3.3 MiB of descriptions: the answer stays under the 4 MiB response limit


def text(seed: int, length: int = TEXT) -> str:
    """length characters of words, different for each seed."""
    head = f"{seed} "
    body = (WORDS + " ") * (length // len(WORDS) + 1)
    return (head + body)[:length]


def struct_of(size: int) -> struct_pb2.Struct:
    """A Struct whose compact JSON is `size` bytes."""
    return struct_pb2.Struct(fields={"k": struct_pb2.Value(string_value="v" * (size - 8))})


def attachments() -> list[cpb.Attachment]:
    return [cpb.Attachment(name=f"file-{i}.png", url=f"https://files.example.com/{i}/" + "p" * 1100, mime_type="image/png", size_bytes=i) for i in range(50)]


class Load:
    """The large requests, on one channel with an admin key."""

    def __init__(self, address: str, secret: str) -> None:
        self.channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
        self.metadata = (("authorization", f"Bearer {secret}"),)
        self.chat = chat_pb2_grpc.ChatServiceStub(self.channel)
        self.work = work_pb2_grpc.WorkServiceStub(self.channel)
        self.identity = identity_pb2_grpc.IdentityServiceStub(self.channel)
        user = self.identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(username="rss-bench", email="rss@example.com")), metadata=self.metadata)
        self.channel_id = self.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name="rss bench")), metadata=self.metadata).id
        conversation = cpb.Conversation(user_id=user.id, title="rss bench")
        self.conversation_id = self.chat.CreateConversation(cpb.CreateConversationRequest(conversation=conversation), metadata=self.metadata).id
        self.project_id = self.work.CreateProject(wpb.CreateProjectRequest(project=wpb.Project(name="rss bench", owner_id=user.id)), metadata=self.metadata).id

    def round(self, i: int) -> int:
        """One of each large request; returns the bytes sent and received."""
        md: dict[str, Any] = {"metadata": self.metadata, "timeout": 120}
        total = 0
        message = cpb.ChatMessage(channel_id=self.channel_id, content=text(i), attachments=attachments())
        made = self.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=message), **md)
        patch = cpb.ChatMessage(id=made.id, content=text(i + 1))
        total += message.ByteSize() + self.chat.UpdateChatMessage(cpb.UpdateChatMessageRequest(chat_message=patch, update_mask=field_mask_pb2.FieldMask(paths=["content"])), **md).ByteSize()
        said = cpb.ConversationMessage(conversation_id=self.conversation_id, sender_type=cpb.SENDER_TYPE_ASSISTANT, content=text(i), role_metadata=struct_of(JSON_BYTES))
        total += self.chat.CreateConversationMessage(cpb.CreateConversationMessageRequest(conversation_message=said), **md).ByteSize()
        # 200 tasks at the description limit, in calls whose answer fits the 4 MiB response
        # limit (the service refuses a batch whose answer would not: 200 such tasks are ~13 MiB).
        for first in range(0, 200, TASKS_PER_BATCH):
            tasks = [wpb.CreateTaskRequest(task=wpb.Task(project_id=self.project_id, title=f"task {i}.{k}", description=text(i * 1000 + k)))
                     for k in range(first, first + TASKS_PER_BATCH)]
            total += self.work.BatchCreateTasks(wpb.BatchCreateTasksRequest(requests=tasks), **md).ByteSize()
        total += self.chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=f'channel_id = "{self.channel_id}"', page_size=1000), **md).ByteSize()
        total += self.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{self.project_id}"', page_size=1000), **md).ByteSize()
        return total


class Sampler:
    """The server's RSS every 50 ms, in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid))
            self._stop.wait(0.05)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_case(db: str, env_extra: dict[str, str], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    pg_name = ""
    if db == "sqlite":
        url = benchdb.database_url("sqlite", str(work / f"rss-{time.monotonic_ns()}.db"))
    else:
        pg_name = benchdb.create_pg_database("nexus_rssbench")
        url = benchdb.database_url("postgresql", pg_name)
    server: ServerProcess | None = None
    try:
        benchdb.migrate(url)
        secret = benchdb.create_admin_key(url)
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"},
            "DATABASE_URL": url, "NEXUS_HOST": "127.0.0.1", "NEXUS_PORT": str(port),
            "NEXUS_HASH_TIME_COST": "1", "NEXUS_HASH_MEMORY_KIB": "1024", "NEXUS_DRAIN_SECONDS": "0",
            **env_extra,
        }
        server = ServerProcess(f"{db} server", [str(benchdb.NEXUS_DATA), "serve"], env, work / f"{db}-server.log")
        address = f"127.0.0.1:{port}"
        asyncio.run(wait_ready(address, server, 60))
        load = Load(address, secret)
        load.round(-1)  # every statement and code path once
        time.sleep(2)
        before = rss_mib(server.pid)
        started = time.monotonic()
        with Sampler(server.pid) as sampler, ThreadPoolExecutor(args.concurrency) as pool:
            moved = sum(pool.map(load.round, range(args.rounds)))
        seconds = time.monotonic() - started
        time.sleep(args.settle)
        after = rss_mib(server.pid)
        load.channel.close()
        return {"before": before, "peak": sampler.peak, "after": after, "seconds": seconds, "mib": moved / 2**20}
    finally:
        if server is not None:
            server.stop()
        if pg_name:
            benchdb.drop_pg_database(pg_name)


def parse_env(items: list[str]) -> list[dict[str, str]]:
    variants: list[dict[str, str]] = []
    for item in items or ["-"]:
        if item == "-":
            variants.append({})
        else:
            name, _, value = item.partition("=")
            variants.append({name: value})
    return variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--rounds", type=int, default=16, help="rounds of the large requests (default 16)")
    parser.add_argument("--concurrency", type=int, default=8, help="client threads (default 8)")
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to wait before the last reading (default 10)")
    parser.add_argument("--env", action="append", help="NAME=VALUE for the server (a variant per --env; '-' for none)")
    args = parser.parse_args(argv)
    dbs = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    work = Path(tempfile.mkdtemp(prefix="nexus-rss-"))
    rows: list[list[str]] = []
    try:
        for db in dbs:
            for variant in parse_env(args.env):
                label = ", ".join(f"{k}={v}" for k, v in variant.items()) or "default"
                print(f"{db} / {label}: {args.rounds} rounds from {args.concurrency} threads...", flush=True)
                r = run_case(db, variant, args, work)
                rows.append([db, label, f"{r['before']:.0f}", f"{r['peak']:.0f}", f"{r['after']:.0f}", f"{r['mib']:.0f}", f"{r['seconds']:.1f}"])
                print("    " + " | ".join(rows[-1]), flush=True)
    finally:
        run_cleanups()
        shutil.rmtree(work, ignore_errors=True)
    header = ["database", "server environment", "RSS before (MiB)", "peak (MiB)", f"{args.settle:g} s after (MiB)", "MiB moved", "burst (s)"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
