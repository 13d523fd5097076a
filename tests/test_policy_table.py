"""`nexus-data policy`: the policy table an operator prints, built from the resources' declared
row rules, agrees with the rules the engine applies (tests/test_access_matrix.py checks those
rules against every RPC)."""
from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from sqlalchemy.sql.elements import False_

import db.domains  # noqa: F401 - every resource in the registry
from db.engine import rules
from db.engine.resource import REGISTRY

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "service.cli", "policy", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_the_table_has_every_resource_and_role() -> None:
    done = _cli()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["RESOURCE", "ROLE", "SEES", "MANAGES"]
    rows = lines[1:lines.index("")]  # the method table follows the first blank line
    listed = {tuple(line.split()[:2]) for line in rows}
    assert listed == {(spec.name, role) for spec in REGISTRY for role in rules.ROLES}


def test_the_method_table_names_each_method_its_permission_and_the_built_in_roles_holding_it() -> None:
    from service import policy
    from service.server import DOMAIN_SERVICES

    done = _cli()
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    start = lines.index("") + 1
    assert lines[start].split() == ["METHOD", "PERMISSION", "BUILT-IN", "ROLES"]
    printed = {}
    for line in lines[start + 1:]:
        if not line:
            break
        method, permission, holders = line.split()
        printed[method] = (permission, holders.split(","))
    served = [f"{full}/{m.name}" for cls, _, full in DOMAIN_SERVICES for m in cls.service_descriptor.methods]
    assert set(printed) == set(served)
    assert printed["nexus.work.v1.WorkService/ListTasks"] == ("work.tasks.read", ["admin", "manager", "user", "guest"])
    assert printed["nexus.work.v1.WorkService/CreateTask"] == ("work.tasks.write", ["admin", "manager", "user"])
    assert printed["nexus.identity.v1.IdentityService/EnsureUser"] == ("identity.users.admin", ["admin"])
    assert printed["nexus.security.v1.SecurityService/ListAuditLogEntries"] == ("security.audit_log_entries.admin", ["admin"])
    for method, (permission, holders) in printed.items():
        # A built-in role holds a method's permission exactly when its level may call the method.
        assert permission == policy.permission_for(method), method
        least = policy.action_for(method).value
        assert holders == [r for r in reversed(rules.ROLES) if rules.ROLE_RANK[r] >= rules.ROLE_RANK[least]], method


def _kind(predicate: object) -> str:
    if predicate is None:
        return "all"
    if isinstance(predicate, False_):
        return "none"
    return "some"


@pytest.fixture(scope="module")
def table() -> dict[tuple[str, str], dict[str, str]]:
    done = _cli("--json")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    least = printed["least_role_by_method"]
    assert least["nexus.work.v1.WorkService/CreateTask"] == "user" and least["nexus.security.v1.SecurityService/GetAuditLogEntry"] == "admin"
    return {(row["resource"], row["role"]): row for row in printed["rows"]}


@pytest.mark.parametrize("role", rules.ROLES)
def test_its_words_say_what_the_rules_do(table: dict[tuple[str, str], dict[str, str]], role: str) -> None:
    """"all" exactly where the rule lets every row through, "none" exactly where it lets none,
    for a caller with a user: a rule changed without its words (or the reverse) fails here."""
    user = uuid.uuid4()
    for spec in REGISTRY:
        row = table[(spec.name, role)]
        sees = _kind(rules.read_predicate(spec, role, user))
        assert (row["sees"] == "all") == (sees == "all") and (row["sees"] == "none") == (sees == "none"), (spec.name, role, row, sees)
        if spec.private_fields and sees == "some":
            # Fields shown to fewer callers than the row: the words name them.
            assert all(name in row["sees"] for name in spec.private_fields), (spec.name, role, row)
        if spec.read_only:
            assert row["manages"].startswith("none"), (spec.name, role, row)
            continue
        manages = _kind(rules.manage_predicate(spec, role, user))
        assert (row["manages"] == "all") == (manages == "all"), (spec.name, role, row, manages)
        assert (row["manages"] == "none") == (manages == "none"), (spec.name, role, row, manages)
        if spec.access.admin_only and manages == "some":
            assert all(name in row["manages"] for name in spec.access.admin_only), (spec.name, role, row)
        if spec.access.delete is not None and manages == "some":
            # Fewer rows deleted than managed: the words say which.
            assert f"deletes only {spec.access.delete.describe(role)}" in row["manages"], (spec.name, role, row)
            assert _kind(rules.delete_predicate(spec, role, user)) == "some", (spec.name, role, row)
