"""nexus.security.v1.SecurityService: the read-only audit trail."""
from __future__ import annotations

from nexus.security.v1 import security_pb2 as pb
from nexus.security.v1 import security_pb2_grpc

from db.domains import security
from service.rpc import DomainServicer


class SecurityService(DomainServicer, security_pb2_grpc.SecurityServiceServicer):
    resources = (security.AUDIT_LOG_ENTRIES,)
    service_descriptor = pb.DESCRIPTOR.services_by_name["SecurityService"]
