"""AIService's methods over analyses and tool generations beyond the standard ones: their
lifecycle (Start, Complete, Fail) and Watch streams."""
from __future__ import annotations


class JobMethods:
    """Mixed into service/ai.AIService."""
