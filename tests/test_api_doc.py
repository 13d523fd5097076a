"""docs/API.md is the API guide protos/document.py writes from the protos: the committed file must
be what the script writes today (a proto changed without re-running it fails here), and it must
name every RPC the server serves. No database, no server."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from service.server import DOMAIN_SERVICES

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "protos" / "document.py"
DOC = ROOT / "docs" / "API.md"


@pytest.fixture(scope="module")
def rendered() -> str:
    spec = importlib.util.spec_from_file_location("nexus_api_document", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.render()


def test_committed_guide_is_what_the_protos_say(rendered: str) -> None:
    assert DOC.read_text() == rendered, "docs/API.md is stale: run python protos/document.py"


def test_rendering_is_deterministic(rendered: str) -> None:
    spec = importlib.util.spec_from_file_location("nexus_api_document_again", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.render() == rendered


def test_every_served_rpc_is_documented() -> None:
    """Each service the server registers has its section, with each RPC's request and response."""
    text = DOC.read_text()
    rows: dict[str, dict[str, str]] = {}  # service -> RPC name -> its table row
    for block in re.split(r"^### Service `", text, flags=re.M)[1:]:
        name, body = block.split("`", 1)
        table = body.split("\n### ", 1)[0]
        rows[name] = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", table, flags=re.M)}
    for servicer_cls, _, full_name in DOMAIN_SERVICES:
        assert full_name in rows, f"{full_name} has no section in docs/API.md"
        for method in servicer_cls.service_descriptor.methods:
            row = rows[full_name].get(method.name)
            assert row, f"{full_name}/{method.name} is not in docs/API.md"
            assert f"`{method.input_type.full_name}`" in row and f"`{method.output_type.full_name}`" in row, row
