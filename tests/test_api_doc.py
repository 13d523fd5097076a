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


@pytest.fixture(scope="module")
def document() -> object:
    spec = importlib.util.spec_from_file_location("nexus_api_document_elements", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _elements(document: object) -> list[tuple[str, str, str]]:
    """(kind, full name, one-line comment) of every service, RPC, message, field, enum and enum
    value of the nexus protos, the comment as the guide prints it: a paragraph under the heading
    of a service, message or enum, a table cell for the others."""
    d: object = document
    found = []
    for f in d.compile_descriptors().file:  # type: ignore[attr-defined]
        if not f.package.startswith("nexus."):
            continue
        comments = {tuple(loc.path): loc for loc in f.source_code_info.location}

        def note(kind: str, name: str, path: tuple[int, ...], comments: dict = comments) -> None:
            comment = d._comment(comments, path)  # type: ignore[attr-defined]
            found.append((kind, name, comment if kind in ("service", "message", "enum") else d._cell(comment)))  # type: ignore[attr-defined]

        for si, service in enumerate(f.service):
            note("service", f"{f.package}.{service.name}", (d._FILE_SERVICE, si))  # type: ignore[attr-defined]
            for mi, method in enumerate(service.method):
                note("rpc", f"{f.package}.{service.name}.{method.name}", (d._FILE_SERVICE, si, d._SERVICE_METHOD, mi))  # type: ignore[attr-defined]
        for (message, path), name in d.Renderer._walk_messages(f.package, f.message_type):  # type: ignore[attr-defined]
            if message.options.map_entry:
                continue
            note("message", name, path)
            for fi, field in enumerate(message.field):
                note("field", f"{name}.{field.name}", (*path, d._MSG_FIELD, fi))  # type: ignore[attr-defined]
        for (enum, path), name in d.Renderer._walk_enums(d.Renderer, f):  # type: ignore[attr-defined]
            note("enum", name, path)
            for vi, value in enumerate(enum.value):
                note("enum value", f"{name}.{value.name}", (*path, d._ENUM_VALUE, vi))  # type: ignore[attr-defined]
    return found


def test_every_element_has_its_comment_in_the_guide(document: object) -> None:
    """A reference, not a list of names: every service, RPC, message, field, enum and enum value
    of the protos has a comment, and the guide shows it."""
    text = DOC.read_text()
    elements = _elements(document)
    assert {kind for kind, _, _ in elements} == {"service", "rpc", "message", "field", "enum", "enum value"}
    uncommented = [f"{kind} {name}" for kind, name, comment in elements if not comment]
    assert uncommented == [], "elements without a comment in the protos"
    missing = [f"{kind} {name}" for kind, name, comment in elements if comment not in text]
    assert missing == [], "comments docs/API.md does not show"


def test_the_guide_points_nowhere_outside_the_repository() -> None:
    """No web address (the API is gRPC: no HTTP routes to list either) and no path out of it."""
    text = DOC.read_text()
    assert not re.findall(r"https?://", text)
    assert "google.api.http" not in text
    for target in re.findall(r"\]\(([^)]*)\)", text):
        assert target.startswith("#"), f"docs/API.md links to {target}: only its own sections"
