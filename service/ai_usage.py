"""AIService's methods over AIInteractions beyond the standard ones (GetAIUsageSummary)."""
from __future__ import annotations

from typing import Any

import grpc
from nexus.ai.v1 import ai_pb2 as pb

from db.domains import ai_usage
from db.unit import SESSION_READ


class UsageMethods:
    """Mixed into service/ai.AIService."""

    run: Any  # the servicer's Runner (service/rpc.DomainServicer)

    async def GetAIUsageSummary(self, request: pb.GetAIUsageSummaryRequest, context: grpc.aio.ServicerContext) -> Any:
        call = self.run.call(context)
        return await self.run(context, lambda s: ai_usage.usage_summary(s, request, call), SESSION_READ, resource_type="AIInteraction")
