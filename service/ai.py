"""nexus.ai.v1.AIService: AI interactions and their usage summary (service/ai_usage.py), data
analyses with their files and tool generations (service/ai_jobs.py)."""
from __future__ import annotations

from nexus.ai.v1 import ai_pb2 as pb
from nexus.ai.v1 import ai_pb2_grpc

from db.domains import ai_jobs, ai_usage
from service.ai_jobs import JobMethods
from service.ai_usage import UsageMethods
from service.rpc import DomainServicer


class AIService(UsageMethods, JobMethods, DomainServicer, ai_pb2_grpc.AIServiceServicer):
    resources = (*ai_usage.RESOURCES, *ai_jobs.RESOURCES)
    service_descriptor = pb.DESCRIPTOR.services_by_name["AIService"]
