"""AIService's methods over analyses and tool generations beyond the standard ones: their
lifecycle (Start, Complete, Fail) and Watch streams.

How a Watch follows its job: through the change log the chat streams use. Each job is a stream
scope of its own (ResourceSpec.stream_scope, "data_analyses/<id>"), so every write of it (Create,
Update, the lifecycle methods, Delete) appends its new state to the log in the same transaction
(db/engine/events.py). The log is gap-free and in commit order per scope, across replicas and
restarts, so a Watch sends each state the job went through, in order, even when Start and
Complete follow each other faster than the stream is read; re-reading the row on a wake-up would
send only the latest state and skip the ones between. The ChangeHub (service/streams.py) is only
the alarm clock: it wakes the Watch on a commit of this process, another replica's NOTIFY, its
poll, at the server's shutdown, and with a heartbeat every recheck interval when nothing happens.

On each wake-up the Watch reads, in one unit of work of its own (no connection is held while it
waits), the next state after its position together with the caller's right to see the row
(db/domains/ai_jobs.watch_next): each message it sends was allowed by a read made just before it.
A deleted row ends the stream with NOT_FOUND, a row the caller may no longer see (or a credential
that no longer holds) with PERMISSION_DENIED (UNAUTHENTICATED), the shutdown with UNAVAILABLE;
the state COMPLETED or FAILED ends it normally, once sent. The hub follows these scopes as the
service itself (its rights check is the chat domain's, for channels and conversations): the
Watch checks its caller's rights itself, on every message."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from nexus.ai.v1 import ai_pb2 as pb

from db import errors
from db.domains import ai_jobs
from db.domains.ai_jobs import COMPLETE, DATA_ANALYSES, FAIL, START, TOOL_GENERATIONS
from db.engine.call import Call
from db.engine.resource import ResourceSpec
from db.unit import SESSION_READ
from service import streams


class JobMethods:
    """Mixed into service/ai.AIService."""

    run: Any
    hub: Any
    # How often a quiet Watch re-reads its job and its caller's rights (None: the hub's recheck
    # interval), catching what no commit of its scope announces: a revoked key, a lowered role.
    watch_recheck_seconds: float | None = None

    async def _move(self, context: grpc.aio.ServicerContext, spec: ResourceSpec, request: Any, method: str) -> Any:
        call = self.run.call(context)
        return await self.run(context, lambda s: ai_jobs.transition(s, spec, request, method, call), resource_type=spec.name)

    async def StartDataAnalysis(self, request: pb.StartDataAnalysisRequest, context: grpc.aio.ServicerContext) -> pb.DataAnalysis:
        return await self._move(context, DATA_ANALYSES, request, START)

    async def CompleteDataAnalysis(self, request: pb.CompleteDataAnalysisRequest, context: grpc.aio.ServicerContext) -> pb.DataAnalysis:
        return await self._move(context, DATA_ANALYSES, request, COMPLETE)

    async def FailDataAnalysis(self, request: pb.FailDataAnalysisRequest, context: grpc.aio.ServicerContext) -> pb.DataAnalysis:
        return await self._move(context, DATA_ANALYSES, request, FAIL)

    async def StartToolGeneration(self, request: pb.StartToolGenerationRequest, context: grpc.aio.ServicerContext) -> pb.ToolGeneration:
        return await self._move(context, TOOL_GENERATIONS, request, START)

    async def CompleteToolGeneration(
        self, request: pb.CompleteToolGenerationRequest, context: grpc.aio.ServicerContext
    ) -> pb.ToolGeneration:
        return await self._move(context, TOOL_GENERATIONS, request, COMPLETE)

    async def FailToolGeneration(self, request: pb.FailToolGenerationRequest, context: grpc.aio.ServicerContext) -> pb.ToolGeneration:
        return await self._move(context, TOOL_GENERATIONS, request, FAIL)

    async def WatchDataAnalysis(self, request: pb.WatchDataAnalysisRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DataAnalysis]:
        async for message in self._watch(context, DATA_ANALYSES, request.id):
            yield message

    async def WatchToolGeneration(
        self, request: pb.WatchToolGenerationRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ToolGeneration]:
        async for message in self._watch(context, TOOL_GENERATIONS, request.id):
            yield message

    async def _watch(self, context: grpc.aio.ServicerContext, spec: ResourceSpec, raw_id: str) -> AsyncIterator[Any]:
        """The job now, then each state it goes through, until a final one (module docstring)."""
        call: Call = self.run.call(context)
        hub: streams.ChangeHub = self.hub
        current, row_id, position = await self.run(context, lambda s: ai_jobs.watch_start(s, spec, raw_id), SESSION_READ, resource_type=spec.name)
        if ai_jobs.finished(current):
            yield current
            return
        # Subscribed before the first send: a change committed from now on wakes the stream.
        scope = ai_jobs.scope_of(spec, row_id)
        # Re-checked by watch_next, not by the hub; counted with the caller's other streams.
        watcher = streams.Caller("system", call.actor_id, "admin", None, counted_as=(call.actor_type, call.actor_id))
        sub = await hub.subscribe({scope: position}, self.watch_recheck_seconds or hub.settings.recheck_seconds, watcher)
        try:
            yield current
            sent = ai_jobs.revision_of(current)
            while True:
                watched = await self.run(
                    context, lambda s: ai_jobs.watch_next(s, spec, row_id, position, call), SESSION_READ, resource_type=spec.name  # noqa: B023 - run and awaited within this iteration
                )
                if watched.gone:
                    raise errors.NotFound.resource(spec.name, str(row_id), "id")
                position = watched.position
                for state in watched.states:
                    if ai_jobs.revision_of(state) <= sent:
                        continue  # not newer than what was sent (the first state read after its position)
                    sent = ai_jobs.revision_of(state)
                    sub.last_sent = asyncio.get_running_loop().time()
                    yield state
                    if ai_jobs.finished(state):
                        return
                if watched.states:
                    continue  # more may wait in the log: read on before sleeping
                if sub.closing or hub.closed:
                    raise _shutting_down()
                await sub.queue.get()
                while not sub.queue.empty():  # one read answers every wake-up that came meanwhile
                    sub.queue.get_nowait()
                sub.overflowed = False
                if sub.closing:
                    raise _shutting_down()
        finally:
            hub.unsubscribe(sub)


def _shutting_down() -> errors.Unavailable:
    return errors.Unavailable("the server is shutting down; watch again to resume from the state then", reason="SERVER_SHUTTING_DOWN")
