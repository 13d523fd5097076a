"""AIService's methods over AIInteractions beyond the standard ones (GetAIUsageSummary)."""
from __future__ import annotations


class UsageMethods:
    """Mixed into service/ai.AIService."""
