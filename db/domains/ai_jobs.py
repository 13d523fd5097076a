"""AI jobs: DataAnalysis and ToolGeneration (PENDING -> RUNNING -> COMPLETED | FAILED, moved by
their own methods, which stamp the times) and AnalysisFile (a File linked to an analysis)."""
from __future__ import annotations

from db.engine.resource import ResourceSpec

# The resources of this module, served by service/ai.py.
RESOURCES: tuple[ResourceSpec, ...] = ()
