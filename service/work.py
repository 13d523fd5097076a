"""nexus.work.v1.WorkService: standard methods from the engine, custom ones below."""
from __future__ import annotations

import grpc
from nexus.work.v1 import work_pb2 as pb
from nexus.work.v1 import work_pb2_grpc

from db.domains import work
from db.unit import SESSION_READ
from service.rpc import DomainServicer


class WorkService(DomainServicer, work_pb2_grpc.WorkServiceServicer):
    resources = (work.PROJECTS, work.TASKS)
    service_descriptor = pb.DESCRIPTOR.services_by_name["WorkService"]

    async def AddProjectMember(self, request: pb.AddProjectMemberRequest, context: grpc.aio.ServicerContext) -> pb.Project:
        return await self.run(context, lambda s: work.add_project_member(s, request), resource_type="Project")

    async def RemoveProjectMember(
        self, request: pb.RemoveProjectMemberRequest, context: grpc.aio.ServicerContext
    ) -> pb.Project:
        return await self.run(context, lambda s: work.remove_project_member(s, request), resource_type="Project")

    async def GetProjectProgress(
        self, request: pb.GetProjectProgressRequest, context: grpc.aio.ServicerContext
    ) -> pb.ProjectProgress:
        return await self.run(context, lambda s: work.project_progress(s, request), SESSION_READ, resource_type="Project")

    async def AddTaskDependency(self, request: pb.AddTaskDependencyRequest, context: grpc.aio.ServicerContext) -> pb.Task:
        return await self.run(context, lambda s: work.add_task_dependency(s, request), resource_type="Task")

    async def RemoveTaskDependency(
        self, request: pb.RemoveTaskDependencyRequest, context: grpc.aio.ServicerContext
    ) -> pb.Task:
        return await self.run(context, lambda s: work.remove_task_dependency(s, request), resource_type="Task")
