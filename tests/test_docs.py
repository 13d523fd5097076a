"""The repository's Markdown points only inside the repository: every link is a relative path to
a file it holds (and, with an anchor, to a heading or an `<a id>` there); no web addresses (local
endpoints in settings' examples aside), no absolute paths. No database, no server."""
from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = sorted(
    ROOT / name
    for name in subprocess.run(["git", "ls-files", "*.md"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
)
LINK = re.compile(r"\]\(([^)\s]*)\)")


@functools.cache
def anchors(path: Path) -> set[str]:
    """The anchors of a Markdown file: its `<a id>`s and its headings' GitHub slugs."""
    text = path.read_text()
    found = set(re.findall(r'<a id="([^"]+)"', text))
    for heading in re.findall(r"^#+ (.+)$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug)
    return found


def test_there_are_documents() -> None:
    assert ROOT / "README.md" in DOCUMENTS and ROOT / "docs" / "API.md" in DOCUMENTS


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_stay_inside_the_repository(document: Path) -> None:
    text = document.read_text()
    # Addresses of a machine the reader runs (an OTLP endpoint on localhost, a compose or cluster
    # service by its one-label name) are settings' values; anything on the web is not allowed.
    for scheme, host in re.findall(r"\b(https?|file)://([^/\s:)\"'`]*)", text):
        assert scheme != "file" and (host in ("localhost", "127.0.0.1", "0.0.0.0") or "." not in host), f"a web address: {scheme}://{host}"
    for target in LINK.findall(text):
        path, _, anchor = target.partition("#")
        assert not re.match(r"^[a-z][a-z0-9+.-]*:", path), f"{target}: not a path in the repository"
        assert not path.startswith("/"), f"{target}: an absolute path"
        linked = (document.parent / path).resolve() if path else document
        assert linked.is_relative_to(ROOT), f"{target}: outside the repository"
        assert linked.exists(), f"{target}: no such file"
        if anchor:
            assert anchor in anchors(linked), f"{target}: no such anchor in {linked.relative_to(ROOT)}"
