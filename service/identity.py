"""nexus.identity.v1.IdentityService: standard methods from the engine, custom ones below."""
from __future__ import annotations

import grpc
from nexus.identity.v1 import identity_pb2 as pb
from nexus.identity.v1 import identity_pb2_grpc

from db.domains import identity
from db.unit import SESSION_READ
from service.rpc import DomainServicer


class IdentityService(DomainServicer, identity_pb2_grpc.IdentityServiceServicer):
    resources = (identity.USERS, identity.ROLES, identity.API_KEYS)
    service_descriptor = pb.DESCRIPTOR.services_by_name["IdentityService"]

    async def LookupUser(self, request: pb.LookupUserRequest, context: grpc.aio.ServicerContext) -> pb.User:
        return await self.run(context, lambda s: identity.lookup_user(s, request), SESSION_READ, resource_type="User")

    async def EnsureUser(self, request: pb.EnsureUserRequest, context: grpc.aio.ServicerContext) -> pb.EnsureUserResponse:
        call = self.run.call(context)
        return await self.run(context, lambda s: identity.ensure_user(s, request, call), resource_type="User")

    async def AuthenticateUser(
        self, request: pb.AuthenticateUserRequest, context: grpc.aio.ServicerContext
    ) -> pb.AuthenticateUserResponse:
        return await self.run(context, lambda s: identity.authenticate_user(s, request), resource_type="User")

    async def VerifyUserEmail(self, request: pb.VerifyUserEmailRequest, context: grpc.aio.ServicerContext) -> pb.User:
        return await self.run(context, lambda s: identity.verify_user_email(s, request), resource_type="User")

    async def AssignRole(self, request: pb.AssignRoleRequest, context: grpc.aio.ServicerContext) -> pb.User:
        return await self.run(context, lambda s: identity.assign_role(s, request), resource_type="User")

    async def RevokeRole(self, request: pb.RevokeRoleRequest, context: grpc.aio.ServicerContext) -> pb.User:
        return await self.run(context, lambda s: identity.revoke_role(s, request), resource_type="User")

    async def RevokeApiKey(self, request: pb.RevokeApiKeyRequest, context: grpc.aio.ServicerContext) -> pb.ApiKey:
        return await self.run(context, lambda s: identity.revoke_api_key(s, request), resource_type="ApiKey")
