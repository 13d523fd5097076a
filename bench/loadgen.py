#!/usr/bin/env python3
"""Closed-loop gRPC load generator for one RPC against one server (its own process).

    .venv/bin/python bench/loadgen.py --target 127.0.0.1:PORT --rpc GetUser --spec spec.json \
        [--concurrency 32] [--seconds 10] [--warmup 1] [--auth] [--out result.json]

C workers share one grpc.aio channel; each keeps exactly one call in flight (closed loop: a new
call leaves when the previous one returned), so C calls are in flight at all times. The first
--warmup seconds are not measured. Then, for --seconds:

* throughput = calls completed per second of the window, where each successful call counts
  with the share of its duration that lies inside the window (so calls longer than the window,
  such as large batches, still count); for BatchCreateTasks also rows/s (calls x batch size);
* latency = every successful call that overlaps the window, nearest-rank p50 / p90 / p99 / max
  in ms, measured on the client (it includes the client's own queueing).

After the window no new call starts; calls in flight finish (each has a --timeout deadline).
With --auth the metadata `authorization: Bearer $NEXUS_BENCH_KEY` is sent (the project's
server); without it no metadata (the floor). Requests are otherwise identical for both.

RPCs: GetUser, GetTask, ListTasks (page 1, page_size 50, filter `project_id = "<p>" AND status =
<S>` with S rotating over the spec's statuses), ListTasksDeep (follows next_page_token
--deep-pages deep once, timing each page, then repeats the request for that last page under
load), SearchTasks (queries from the spec, page 1), CreateTask (into the sink project),
UpdateTask (update_mask title,status with the etag of the last response: each worker owns a
disjoint slice of the spec's update_ids), BatchCreateTasks (--batch-size tasks per call).

Prints one JSON object (also written to --out).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from array import array
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "generated"))

import grpc  # noqa: E402
from google.protobuf import field_mask_pb2  # noqa: E402
from nexus.identity.v1 import identity_pb2 as ipb  # noqa: E402
from nexus.identity.v1 import identity_pb2_grpc  # noqa: E402
from nexus.work.v1 import work_pb2 as wpb  # noqa: E402
from nexus.work.v1 import work_pb2_grpc  # noqa: E402

RPCS = ("GetUser", "GetTask", "ListTasks", "ListTasksDeep", "SearchTasks", "CreateTask", "UpdateTask", "BatchCreateTasks")
UPDATE_STATUSES = (wpb.TASK_STATUS_IN_PROGRESS, wpb.TASK_STATUS_REVIEW, wpb.TASK_STATUS_DONE, wpb.TASK_STATUS_TODO)
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(-(-p * len(sorted_values) // 100)) - 1))
    return sorted_values[k]


class Workload:
    """Builds the requests of one RPC; identical for both servers (given the same spec)."""

    def __init__(self, rpc: str, spec: dict[str, Any], concurrency: int, batch_size: int, seed: int) -> None:
        self.rpc = rpc
        self.spec = spec
        self.rng = random.Random(seed)
        self.items_per_call = batch_size if rpc == "BatchCreateTasks" else 1
        self.project = spec["project_id"]
        self.sink = spec.get("sink_project_id") or self.project
        statuses = spec.get("statuses") or ["TODO"]
        self.filters = [f'project_id = "{self.project}" AND status = {s}' for s in statuses]
        self.deep_request: wpb.ListTasksRequest | None = None
        self.total_sizes: dict[str, int] = {}  # SearchTasks: query -> the total_size it answered
        if rpc == "UpdateTask":
            ids = spec["update_ids"]
            if len(ids) < concurrency:
                raise SystemExit(f"UpdateTask needs at least {concurrency} update_ids, got {len(ids)}")
            self.owned = [ids[w::concurrency] for w in range(concurrency)]
            self.etags: dict[str, str] = {}
        if rpc == "BatchCreateTasks":
            self.batch = wpb.BatchCreateTasksRequest(
                requests=[wpb.CreateTaskRequest(task=self._new_task(i)) for i in range(batch_size)]
            )

    def _new_task(self, i: int) -> wpb.Task:
        words = self.rng.sample(WORDS, 4)
        return wpb.Task(
            project_id=self.sink,
            title=f"bench task {i} {' '.join(words[:2])}",
            description=" ".join(words),
            status=wpb.TASK_STATUS_TODO,
            priority=wpb.PRIORITY_HIGH,
            tags=["bench", words[0]],
            estimated_hours=float(i % 8),
        )

    def request(self, worker: int, i: int) -> Any:
        rpc, spec = self.rpc, self.spec
        if rpc == "GetUser":
            return ipb.GetUserRequest(id=self.rng.choice(spec["user_ids"]))
        if rpc == "GetTask":
            return wpb.GetTaskRequest(id=self.rng.choice(spec["task_ids"]))
        if rpc == "ListTasks":
            return wpb.ListTasksRequest(page_size=50, filter=self.filters[(worker + i) % len(self.filters)])
        if rpc == "ListTasksDeep":
            assert self.deep_request is not None
            return self.deep_request
        if rpc == "SearchTasks":
            queries = spec["queries"]
            return wpb.SearchTasksRequest(query=queries[(worker + i) % len(queries)], page_size=50)
        if rpc == "CreateTask":
            return wpb.CreateTaskRequest(task=self._new_task(i))
        if rpc == "UpdateTask":
            ids = self.owned[worker]
            tid = ids[i % len(ids)]
            return wpb.UpdateTaskRequest(
                task=wpb.Task(id=tid, title=f"updated {worker}.{i}", status=UPDATE_STATUSES[i % 4],
                              etag=self.etags.get(tid, 'W/"1"')),
                update_mask=field_mask_pb2.FieldMask(paths=["title", "status"]),
            )
        if rpc == "BatchCreateTasks":
            return self.batch
        raise ValueError(rpc)

    def done(self, request: Any, response: Any) -> None:
        if self.rpc == "UpdateTask":
            self.etags[response.id] = response.etag
        if self.rpc == "SearchTasks":
            self.total_sizes[request.query] = response.total_size


def method(channel: grpc.aio.Channel, rpc: str) -> Any:
    if rpc == "GetUser":
        return identity_pb2_grpc.IdentityServiceStub(channel).GetUser
    name = "ListTasks" if rpc == "ListTasksDeep" else rpc
    return getattr(work_pb2_grpc.WorkServiceStub(channel), name)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    spec = json.loads(Path(args.spec).read_text())  # noqa: ASYNC240 - read once, before any call starts
    metadata: tuple[tuple[str, str], ...] = ()
    if args.auth:
        key = os.environ.get("NEXUS_BENCH_KEY", "")
        if not key:
            raise SystemExit("--auth needs NEXUS_BENCH_KEY in the environment")
        metadata = (("authorization", f"Bearer {key}"),)
    work = Workload(args.rpc, spec, args.concurrency, args.batch_size, args.seed)
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024), ("grpc.max_send_message_length", 64 * 1024 * 1024)]
    result: dict[str, Any] = {"rpc": args.rpc, "target": args.target, "concurrency": args.concurrency,
                              "seconds": args.seconds, "warmup": args.warmup, "items_per_call": work.items_per_call}
    # --channels K: K connections (own subchannel pools, so they are not shared), so that a
    # server of several processes on one port (SO_REUSEPORT) gets calls on each of them.
    extra = [grpc.aio.insecure_channel(args.target, options=[*options, ("grpc.use_local_subchannel_pool", 1)]) for _ in range(args.channels - 1)]
    async with grpc.aio.insecure_channel(args.target, options=[*options, ("grpc.use_local_subchannel_pool", 1)]) as channel:
        await asyncio.wait_for(channel.channel_ready(), 15)
        for other in extra:
            await asyncio.wait_for(other.channel_ready(), 15)
        calls = [method(c, args.rpc) for c in (channel, *extra)]
        call = calls[0]

        if args.rpc == "ListTasksDeep":
            token, walk = "", []
            for page in range(1, args.deep_pages + 1):
                req = wpb.ListTasksRequest(page_size=50, filter=work.filters[0], page_token=token)
                t0 = time.perf_counter_ns()
                resp = await call(req, metadata=metadata, timeout=args.timeout)
                walk.append((time.perf_counter_ns() - t0) / 1e6)
                if page < args.deep_pages:
                    if not resp.next_page_token:
                        break
                    token = resp.next_page_token
            work.deep_request = req
            result["deep_walk_ms"] = walk
            result["deep_page"] = len(walk)
            result["deep_last_page_ms"] = walk[-1]
            result["total_size"] = resp.total_size

        latencies = array("d")
        errors: Counter[str] = Counter()
        completed_in_window = 0
        work_in_window = 0.0
        total_calls = 0
        first_error = ""
        loop_start = time.perf_counter()
        warm_end = loop_start + args.warmup
        end = warm_end + args.seconds
        cpu0 = time.process_time()

        async def worker(w: int) -> None:
            nonlocal completed_in_window, work_in_window, total_calls, first_error
            i = 0
            while True:
                t0 = time.perf_counter()
                if t0 >= end:
                    return
                request = work.request(w, i)
                i += 1
                try:
                    response = await calls[w % len(calls)](request, metadata=metadata, timeout=args.timeout)
                except grpc.aio.AioRpcError as exc:
                    errors[exc.code().name] += 1
                    if not first_error:
                        first_error = f"{exc.code().name}: {exc.details()}"
                    await asyncio.sleep(0.01)  # no hot loop against a failing server
                    continue
                t1 = time.perf_counter()
                total_calls += 1
                work.done(request, response)
                if warm_end <= t1 <= end:
                    completed_in_window += 1
                # The share of this call's duration that lies inside the window: summed over all
                # calls and divided by the window, the closed-loop throughput, also when single
                # calls last longer than the window (large batches). Latency: every call that
                # overlaps the window.
                overlap = min(t1, end) - max(t0, warm_end)
                if overlap > 0:
                    work_in_window += overlap / max(t1 - t0, 1e-9)
                    latencies.append((t1 - t0) * 1000.0)

        await asyncio.wait_for(
            asyncio.gather(*(worker(w) for w in range(args.concurrency))),
            timeout=args.warmup + args.seconds + args.timeout + 30,
        )
        wall = time.perf_counter() - loop_start
        cpu = time.process_time() - cpu0
        for other in extra:
            await other.close()

    lat = sorted(latencies)
    if work.total_sizes:
        result["total_sizes"] = work.total_sizes
    rps = work_in_window / args.seconds
    result.update(
        calls_in_window=completed_in_window,
        calls_total=total_calls,
        errors=dict(errors),
        first_error=first_error,
        rps=rps,
        items_per_s=rps * work.items_per_call,
        p50_ms=percentile(lat, 50),
        p90_ms=percentile(lat, 90),
        p99_ms=percentile(lat, 99),
        max_ms=lat[-1] if lat else float("nan"),
        mean_ms=sum(lat) / len(lat) if lat else float("nan"),
        samples=len(lat),
        wall_s=wall,
        loadgen_cpu_s=cpu,
    )
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, help="host:port")
    p.add_argument("--rpc", required=True, choices=RPCS)
    p.add_argument("--spec", required=True, help="JSON: user_ids, task_ids, update_ids, project_id, sink_project_id, queries, statuses")
    p.add_argument("--concurrency", type=int, default=32, help="calls in flight (default 32)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured window (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before the window (default 1)")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each call, s (default 30)")
    p.add_argument("--batch-size", type=int, default=1000, help="tasks per BatchCreateTasks call (default 1000)")
    p.add_argument("--deep-pages", type=int, default=20, help="ListTasksDeep: the page measured (default 20)")
    p.add_argument("--channels", type=int, default=1, help="connections to the target; worker w uses connection w mod K (default 1)")
    p.add_argument("--auth", action="store_true", help="send authorization: Bearer $NEXUS_BENCH_KEY")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", help="also write the JSON result here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(run(args))
    text = json.dumps(result)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
