"""Imports every domain module, so the resource registry and the metadata are complete."""
from db import audit, chat, identity, work  # noqa: F401
