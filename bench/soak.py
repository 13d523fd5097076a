"""Soak: a mixed load for minutes, the server's RSS sampled, its slope in the second half.

    .venv/bin/python bench/soak.py [--db sqlite,postgresql] [--minutes 12] [--clients 4]
                                   [--sample-seconds 30] [--project-src DIR --tag NAME]

For each database: a fresh one (PostgreSQL: created on `postgres` and dropped afterwards;
SQLite: a temporary file), `nexus-data migrate`, an admin key, `nexus-data serve` with its
metrics endpoint, a project, a channel and 8 users made through the API. Then --clients
threads, each on its own channel, call for --minutes:

    CreateTask 10 %, UpdateTask 6 %, GetTask 10 %, ListTasks 20 % (an `id = "<id>"` filter of a
    task made earlier or of none, every filter text new), ListTasks 4 % (`project_id = ... AND
    status = ...`), SearchTasks 5 % (a word, filtered by project and assignee); and the same on
    chat messages: CreateChatMessage 10 %, UpdateChatMessage 5 %, GetChatMessage 10 %,
    ListChatMessages 15 % (`id = ...` or `author_id = ... AND content = "<word>*"`),
    SearchChatMessages 5 %.

Every --sample-seconds: the server's RSS (its process and any workers, /proc), the calls made
and the misses of its filter and statement caches (nexus_cache_misses_total from /metrics).
Printed: RSS per minute (the last sample of each minute) and the least-squares slope (MB/min)
of the samples in the second half of the run, the target being <= 0.2 MB/min. Written to
bench/results/soak_<db>.md (soak_<db>_<tag>.md with --tag). --project-src runs another
checkout of the service (e.g. the code before a change) with this venv's packages.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import random
import re
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import grpc

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "generated"))
import benchdb  # noqa: E402
import rpc_bench  # noqa: E402
from google.protobuf import field_mask_pb2  # noqa: E402
from nexus.chat.v1 import chat_pb2 as cpb  # noqa: E402
from nexus.chat.v1 import chat_pb2_grpc  # noqa: E402
from nexus.identity.v1 import identity_pb2 as ipb  # noqa: E402
from nexus.identity.v1 import identity_pb2_grpc  # noqa: E402
from nexus.work.v1 import work_pb2 as wpb  # noqa: E402
from nexus.work.v1 import work_pb2_grpc  # noqa: E402

WORDS = benchdb.VOCABULARY
STATUSES = ("TODO", "IN_PROGRESS", "REVIEW", "DONE")
# (operation, weight): the mix every client draws from.
MIX = (
    ("CreateTask", 10), ("UpdateTask", 6), ("GetTask", 10), ("ListTasks id", 20), ("ListTasks status", 4), ("SearchTasks", 5),
    ("CreateChatMessage", 10), ("UpdateChatMessage", 5), ("GetChatMessage", 10), ("ListChatMessages", 15), ("SearchChatMessages", 5),
)
KEEP = 2000  # ids of recent rows each kind keeps to read and update


class World:
    """What the clients share: the seeded rows and the ids of the rows made so far."""

    def __init__(self, project: str, channel: str, users: list[str]) -> None:
        self.project, self.channel, self.users = project, channel, users
        self.tasks: list[str] = []
        self.messages: list[str] = []
        self.lock = threading.Lock()
        self.calls = 0
        self.errors: dict[str, int] = {}

    def remember(self, ids: list[str], new: str) -> None:
        with self.lock:
            ids.append(new)
            if len(ids) > KEEP:
                del ids[: len(ids) - KEEP]

    def pick(self, ids: list[str], rng: random.Random) -> str | None:
        with self.lock:
            return rng.choice(ids) if ids else None


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def client(port: int, key: str, world: World, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    work = work_pb2_grpc.WorkServiceStub(channel)
    chat = chat_pb2_grpc.ChatServiceStub(channel)
    md = (("authorization", f"Bearer {key}"),)
    names, weights = zip(*MIX, strict=True)
    try:
        while not stop.is_set():
            op = rng.choices(names, weights)[0]
            try:
                call(op, work, chat, md, world, rng)
            except grpc.RpcError as exc:
                with world.lock:
                    name = f"{op}: {exc.code().name}"
                    world.errors[name] = world.errors.get(name, 0) + 1
            with world.lock:
                world.calls += 1
    finally:
        channel.close()


def call(op: str, work: Any, chat: Any, md: Any, world: World, rng: random.Random) -> None:
    # A filter on an id: a row's about half the time, else one of none; every text new either way.
    some_id = lambda ids: (world.pick(ids, rng) if rng.random() < 0.5 else None) or str(uuid.uuid4())  # noqa: E731
    if op == "CreateTask":
        task = wpb.Task(project_id=world.project, title=sentence(rng, 4), description=sentence(rng, 20),
                        assignee_id=rng.choice(world.users), tags=[rng.choice(WORDS)])
        world.remember(world.tasks, work.CreateTask(wpb.CreateTaskRequest(task=task), metadata=md).id)
    elif op == "UpdateTask":
        if (task_id := world.pick(world.tasks, rng)) is not None:
            change = wpb.Task(id=task_id, title=sentence(rng, 4), description=sentence(rng, 20))
            work.UpdateTask(wpb.UpdateTaskRequest(task=change, update_mask=field_mask_pb2.FieldMask(paths=["title", "description"])), metadata=md)
    elif op == "GetTask":
        if (task_id := world.pick(world.tasks, rng)) is not None:
            work.GetTask(wpb.GetTaskRequest(id=task_id), metadata=md)
    elif op == "ListTasks id":
        work.ListTasks(wpb.ListTasksRequest(filter=f'id = "{some_id(world.tasks)}"'), metadata=md)
    elif op == "ListTasks status":
        text = f'project_id = "{world.project}" AND status = {rng.choice(STATUSES)}'
        work.ListTasks(wpb.ListTasksRequest(filter=text, page_size=20), metadata=md)
    elif op == "SearchTasks":
        text = f'project_id = "{world.project}" AND assignee_id = "{rng.choice(world.users)}"'
        work.SearchTasks(wpb.SearchTasksRequest(query=rng.choice(WORDS), filter=text, page_size=10), metadata=md)
    elif op == "CreateChatMessage":
        message = cpb.ChatMessage(channel_id=world.channel, author_id=rng.choice(world.users), content=sentence(rng, 15))
        world.remember(world.messages, chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=message), metadata=md).id)
    elif op == "UpdateChatMessage":
        if (message_id := world.pick(world.messages, rng)) is not None:
            edit = cpb.ChatMessage(id=message_id, content=sentence(rng, 15))
            chat.UpdateChatMessage(cpb.UpdateChatMessageRequest(chat_message=edit, update_mask=field_mask_pb2.FieldMask(paths=["content"])), metadata=md)
    elif op == "GetChatMessage":
        if (message_id := world.pick(world.messages, rng)) is not None:
            chat.GetChatMessage(cpb.GetChatMessageRequest(id=message_id), metadata=md)
    elif op == "ListChatMessages":
        if rng.random() < 0.6:
            text = f'id = "{some_id(world.messages)}"'
        else:
            text = f'author_id = "{rng.choice(world.users)}" AND content = "{rng.choice(WORDS)}*"'
        chat.ListChatMessages(cpb.ListChatMessagesRequest(filter=text, page_size=20), metadata=md)
    elif op == "SearchChatMessages":
        text = f'channel_id = "{world.channel}" AND author_id = "{rng.choice(world.users)}"'
        chat.SearchChatMessages(cpb.SearchChatMessagesRequest(query=rng.choice(WORDS), filter=text, page_size=10), metadata=md)


def cache_misses(metrics_port: int) -> dict[str, float]:
    """nexus_cache_misses_total by cache (filters, statements, compiled), from /metrics."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for match in re.finditer(r'^nexus_cache_misses_total\{cache="(\w+)"\} ([0-9.e+]+)$', text, re.M):
        out[match.group(1)] = float(match.group(2))
    return out


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points."""
    n = len(points)
    if n < 2:
        return float("nan")
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else float("nan")


def soak(dialect: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    target = benchdb.create_pg_database("nexus_soakbench") if dialect == "postgresql" else str(work / f"soak-{dialect}.db")
    url = benchdb.database_url(dialect, target)
    try:
        benchdb.migrate(url)
        key = benchdb.create_admin_key(url)
        metrics_port = rpc_bench.free_port()
        os.environ["NEXUS_METRICS_PORT"] = str(metrics_port)
        ns = argparse.Namespace(max_rpcs=100, pool_size=5, max_overflow=5, workers=1, project_src=args.project_src)
        server = rpc_bench.start_project(dialect, url, work, ns, dialect)
        try:
            return drive(server, key, metrics_port, dialect, args)
        finally:
            server.stop()
    finally:
        os.environ.pop("NEXUS_METRICS_PORT", None)
        if dialect == "postgresql":
            benchdb.drop_pg_database(target)


def drive(server: Any, key: str, metrics_port: int, dialect: str, args: argparse.Namespace) -> dict[str, Any]:
    md = (("authorization", f"Bearer {key}"),)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        identity = identity_pb2_grpc.IdentityServiceStub(channel)
        users = [
            identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(username=f"soak{i}", email=f"soak{i}@example.com", full_name=f"Soak {i}")), metadata=md).id
            for i in range(8)
        ]
        project = work_pb2_grpc.WorkServiceStub(channel).CreateProject(
            wpb.CreateProjectRequest(project=wpb.Project(name="soak", owner_id=users[0])), metadata=md
        ).id
        chat_channel = chat_pb2_grpc.ChatServiceStub(channel).CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name="soak")), metadata=md).id
    world = World(project, chat_channel, users)
    stop = threading.Event()
    threads = [threading.Thread(target=client, args=(server.port, key, world, stop, i), daemon=True) for i in range(args.clients)]
    start = time.monotonic()
    samples: list[dict[str, Any]] = []

    def sample() -> None:
        minute = (time.monotonic() - start) / 60
        rss = rpc_bench.tree_status_kib(server.pid, "VmRSS")
        with world.lock:
            calls, errors = world.calls, sum(world.errors.values())
        samples.append({"minute": minute, "rss": rss, "calls": calls, "errors": errors, "misses": cache_misses(metrics_port)})
        rpc_bench.log(f"{dialect} {minute:5.1f} min: RSS {rss:6.1f} MiB, {calls:,} calls, {errors} errors")

    sample()
    for t in threads:
        t.start()
    end = start + args.minutes * 60
    while (now := time.monotonic()) < end:
        time.sleep(min(args.sample_seconds - (now - start) % args.sample_seconds, end - now))
        sample()
    stop.set()
    for t in threads:
        t.join(30)
    half = args.minutes / 2
    second_half = [(s["minute"], s["rss"]) for s in samples if s["minute"] >= half - 1e-6]
    return {"db": dialect, "samples": samples, "slope": slope(second_half), "errors": dict(world.errors), "minutes": args.minutes}


def report(result: dict[str, Any], args: argparse.Namespace, load: str) -> str:
    samples = result["samples"]
    by_minute: dict[int, dict[str, Any]] = {}
    for s in samples:
        by_minute[round(s["minute"])] = s  # the last sample of each (rounded) minute
    code = f"the code of {args.project_src}" if args.project_src else "this checkout"
    lines = [
        f"# Soak on {result['db']} ({dt.date.today()}, {os.cpu_count()} cores, load {load} at start, {code})",
        "",
        f"`{' '.join(['bench/soak.py', *sys.argv[1:]])}`: {args.clients} clients, {result['minutes']} minutes, RSS every {args.sample_seconds} s.",
        "",
        "| minute | RSS (MiB) | calls | calls/s since the last row | filter cache misses | statement cache misses |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    previous: dict[str, Any] | None = None
    for minute in sorted(by_minute):
        s = by_minute[minute]
        rate = (s["calls"] - previous["calls"]) / ((s["minute"] - previous["minute"]) * 60) if previous and s["minute"] > previous["minute"] else 0.0
        misses = s["misses"]
        lines.append(
            f"| {minute} | {s['rss']:.1f} | {s['calls']:,} | {rate:,.0f} | {misses.get('filters', float('nan')):,.0f} | {misses.get('statements', float('nan')):,.0f} |"
        )
        previous = s
    verdict = "meets" if result["slope"] <= 0.2 else "misses"
    lines += [
        "",
        f"RSS slope over the second half (least squares of its samples): **{result['slope']:.3f} MiB/min** ({verdict} the target of <= 0.2).",
    ]
    if result["errors"]:
        lines += ["", "Errors: " + ", ".join(f"{name} x{count}" for name, count in sorted(result["errors"].items()))]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--db", default="sqlite,postgresql")
    p.add_argument("--minutes", type=float, default=12)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--sample-seconds", type=float, default=30)
    p.add_argument("--project-src", default=None, help="run the service of another checkout (with this venv's packages)")
    p.add_argument("--tag", default="", help="appended to the results' file names (soak_<db>_<tag>.md)")
    args = p.parse_args()
    if args.project_src:
        os.environ["PYTHONDONTWRITEBYTECODE"] = "1"  # leave the other checkout as it is
    load = rpc_bench.loadavg()
    rpc_bench.RESULTS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="nexus-soak-") as tmp:
        for dialect in args.db.split(","):
            result = soak(dialect, args, Path(tmp))
            text = report(result, args, load)
            print(text)
            name = f"soak_{dialect}{'_' + args.tag if args.tag else ''}.md"
            (rpc_bench.RESULTS / name).write_text(text)
            load = rpc_bench.loadavg()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
