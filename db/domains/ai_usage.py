"""AI usage: AIInteraction (one call to a model, recorded by the service that made it, mostly in
bulk) and the usage summary over them (GetAIUsageSummary)."""
from __future__ import annotations

from db.engine.resource import ResourceSpec

# The resources of this module, served by service/ai.py.
RESOURCES: tuple[ResourceSpec, ...] = ()
