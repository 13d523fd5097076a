"""The layers, kept apart: the infrastructure (db/*.py) knows nothing of the engine or the
domains, the engine (db/engine/) nothing of any domain, and nothing under db/ knows the service.

Read from the source with ast, so an import inside a function counts as much as one at the top.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DB = ROOT / "db"
# db/seed.py is the sample-data command: it fills the domains' resources, above them.
INFRASTRUCTURE = sorted(p for p in DB.glob("*.py") if p.name not in ("seed.py",))
ENGINE = sorted((DB / "engine").glob("*.py"))
DOMAINS = sorted((DB / "domains").glob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module path imports (a `from pkg import name` counts as pkg.name too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offending(path: Path, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(name for name in imported(path) if any(name == f or name.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("path", ENGINE, ids=lambda p: p.name)
def test_the_engine_imports_no_domain(path: Path) -> None:
    assert not offending(path, ("db.domains", "service", "nexus")), f"db/engine/{path.name} imports {offending(path, ('db.domains', 'service', 'nexus'))}"


@pytest.mark.parametrize("path", INFRASTRUCTURE, ids=lambda p: p.name)
def test_the_infrastructure_imports_neither_engine_nor_domains(path: Path) -> None:
    found = offending(path, ("db.engine", "db.domains", "service", "nexus"))
    assert not found, f"db/{path.name} imports {found}"


@pytest.mark.parametrize("path", sorted(DB.rglob("*.py")), ids=lambda p: str(p.relative_to(DB)))
def test_nothing_under_db_imports_the_service(path: Path) -> None:
    assert not offending(path, ("service",)), f"{path.relative_to(ROOT)} imports {offending(path, ('service',))}"


@pytest.mark.parametrize("path", DOMAINS, ids=lambda p: p.name)
def test_a_domain_is_one_module_beside_the_others(path: Path) -> None:
    """A domain may use another's tables (a task's assignee is a user), never the service."""
    assert not offending(path, ("service",))


def test_the_rule_sees_an_import_inside_a_function(tmp_path: Path) -> None:
    """The check itself: an import hidden in a function body is found."""
    module = tmp_path / "hidden.py"
    module.write_text("def f():\n    from db.domains import chat\n    import service.rpc\n")
    assert offending(module, ("db.domains", "service")) == ["db.domains", "db.domains.chat", "service.rpc"]


def test_every_engine_and_domain_module_is_checked() -> None:
    assert {p.name for p in ENGINE} >= {"reads.py", "writes.py", "statements.py", "rules.py", "audit.py", "plans.py"}
    assert {p.name for p in DOMAINS} >= {"identity.py", "work.py", "chat.py", "security.py"}
    assert "database.py" in {p.name for p in INFRASTRUCTURE}


def test_every_package_is_a_regular_package() -> None:
    """`pip install .` (the image) finds packages by their __init__.py: a folder of modules
    without one would be left out of the installed service."""
    folders = {p.parent for top in ("db", "service") for p in (ROOT / top).rglob("*.py")}
    missing = sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").exists())
    assert not missing, f"no __init__.py in {missing}"


# Calls that fork the calling process: the pytest worker runs the session's servers (gRPC's
# threads and fork handlers, the databases' threads), which a fork of it does not survive
# reliably. A test that needs a fork runs it in a fresh interpreter (tests/test_ids.py).
FORKING = {("os", "fork"), ("os", "forkpty"), ("multiprocessing", "Process"), ("multiprocessing", "Pool"), ("", "fork"), ("", "forkpty")}


def forks(path: Path) -> list[str]:
    """Calls of os.fork, os.forkpty, multiprocessing.Process or Pool (which fork on Linux) and
    get_context("fork") in path, as "line: name"; code in strings (a child interpreter's script)
    is not code here."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute):
            owner, name = (func.value.id if isinstance(func.value, ast.Name) else "?"), func.attr
        else:
            owner, name = "", getattr(func, "id", "")
        if (owner, name) in FORKING or (name == "get_context" and any(isinstance(a, ast.Constant) and a.value == "fork" for a in node.args)):
            found.append(f"{node.lineno}: {name}")
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "tests").glob("*.py")), ids=lambda p: p.name)
def test_no_test_forks_the_test_process(path: Path) -> None:
    assert not forks(path), f"tests/{path.name} forks the pytest worker at {forks(path)}"


def test_the_fork_rule_sees_a_fork(tmp_path: Path) -> None:
    module = tmp_path / "forking.py"
    module.write_text(
        'import os, multiprocessing, psutil\ndef f():\n    pid = os.fork()\n    multiprocessing.get_context("fork")\n'
        '    multiprocessing.Process(target=f)\n    psutil.Process(1)\n    s = "os.fork()"\n'
    )
    assert forks(module) == ["3: fork", "4: get_context", "5: Process"]
