"""Which role may call which RPC: one table, checked by the call guard before any servicer runs.

Standard methods take their action from their name (Get/List/Search/BatchGet read; Create/Update/
Delete/Undelete/BatchCreate write), so a resource added later is covered with no new entry.
Custom methods are listed here; a method that is in neither is refused at start-up, so no RPC
can ship without a rule. Row-level rules (which rows a role sees or manages) are each resource's `access`
(db/engine/rules.py); `nexus-data policy` prints both tables.

Permissions: every method belongs to exactly one family, `<service>.<resource>.<action>`
(`work.tasks.read`, `work.tasks.write`, `identity.users.admin`): the service's package name, the
resource its name names (the longest name of a resource of its own package in it, or FAMILY_OF
for a method that names none) in snake case plural, and its action. A Role holds permissions; the four built-in roles
(admin, manager, user, guest) hold exactly the permissions their level allows, a custom Role
those it was given (unknown ones are refused when it is written). A caller is allowed a method
when its level allows the method's action and, when its user has Roles assigned, one of them
holds the method's permission: assigned roles narrow what a level allows, never widen it (the row
rules, admin-only fields and force deletes go by the level, so a permission above it would meet
rules written for a lower one).
"""
from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping

import db.domains  # noqa: F401 - every resource in the registry
from db import errors
from db.domains import identity
from db.domains.identity import KEY_SCOPES
from db.engine.resource import REGISTRY
from db.engine.rules import ROLE_RANK, ROLES


class Action(enum.Enum):
    READ = "guest"  # value: the least role allowed
    WRITE = "user"
    ADMIN = "admin"


STANDARD_PREFIXES = (
    ("BatchGet", Action.READ),
    ("BatchCreate", Action.WRITE),
    ("Undelete", Action.WRITE),
    ("Get", Action.READ),
    ("List", Action.READ),
    ("Search", Action.READ),
    ("Create", Action.WRITE),
    ("Update", Action.WRITE),
    ("Delete", Action.WRITE),
)

CUSTOM_METHODS: dict[str, Action] = {
    "nexus.identity.v1.IdentityService/LookupUser": Action.READ,
    "nexus.identity.v1.IdentityService/EnsureUser": Action.ADMIN,
    "nexus.identity.v1.IdentityService/AuthenticateUser": Action.ADMIN,
    "nexus.identity.v1.IdentityService/VerifyUserEmail": Action.ADMIN,
    "nexus.identity.v1.IdentityService/AssignRole": Action.ADMIN,
    "nexus.identity.v1.IdentityService/RevokeRole": Action.ADMIN,
    "nexus.identity.v1.IdentityService/RevokeApiKey": Action.WRITE,
    "nexus.work.v1.WorkService/AddProjectMember": Action.WRITE,
    "nexus.work.v1.WorkService/RemoveProjectMember": Action.WRITE,
    "nexus.work.v1.WorkService/GetProjectProgress": Action.READ,
    "nexus.work.v1.WorkService/AddTaskDependency": Action.WRITE,
    "nexus.work.v1.WorkService/RemoveTaskDependency": Action.WRITE,
    "nexus.chat.v1.ChatService/AddChannelMember": Action.WRITE,
    "nexus.chat.v1.ChatService/RemoveChannelMember": Action.WRITE,
    "nexus.chat.v1.ChatService/ArchiveConversation": Action.WRITE,
    "nexus.chat.v1.ChatService/StreamEvents": Action.READ,
    "nexus.knowledge.v1.KnowledgeService/UpsertKnowledgeChunk": Action.WRITE,
    "nexus.knowledge.v1.KnowledgeService/BatchUpsertKnowledgeChunks": Action.WRITE,
    "nexus.knowledge.v1.KnowledgeService/DeleteKnowledgeChunksBySource": Action.WRITE,
    "nexus.knowledge.v1.KnowledgeService/ListDocumentVersions": Action.READ,
    "nexus.knowledge.v1.KnowledgeService/GetDocumentVersion": Action.READ,
    "nexus.knowledge.v1.KnowledgeService/RestoreDocumentVersion": Action.WRITE,
    "nexus.knowledge.v1.KnowledgeService/ShareDocument": Action.WRITE,
    "nexus.knowledge.v1.KnowledgeService/UnshareDocument": Action.WRITE,
    "nexus.knowledge.v1.KnowledgeService/ListDocumentShares": Action.READ,
    "nexus.files.v1.FileService/UploadFile": Action.WRITE,
    "nexus.files.v1.FileService/DownloadFile": Action.READ,
    # Counting a download goes with downloading: whoever may read the file (a guest, a public one).
    "nexus.files.v1.FileService/RecordFileDownload": Action.READ,
    "nexus.mail.v1.MailService/SendEmail": Action.WRITE,
    "nexus.ai.v1.AIService/GetAIUsageSummary": Action.READ,
    "nexus.ai.v1.AIService/StartDataAnalysis": Action.WRITE,
    "nexus.ai.v1.AIService/CompleteDataAnalysis": Action.WRITE,
    "nexus.ai.v1.AIService/FailDataAnalysis": Action.WRITE,
    "nexus.ai.v1.AIService/WatchDataAnalysis": Action.READ,
    "nexus.ai.v1.AIService/StartToolGeneration": Action.WRITE,
    "nexus.ai.v1.AIService/CompleteToolGeneration": Action.WRITE,
    "nexus.ai.v1.AIService/FailToolGeneration": Action.WRITE,
    "nexus.ai.v1.AIService/WatchToolGeneration": Action.READ,
}

# Methods an API key may call beyond its role when it holds the scope (KEY_SCOPES): the services
# that own identities elsewhere make users without being admins. Only the method is opened:
# everything else the key does, and the rows it sees and changes, its role decides.
SCOPED_METHODS: dict[str, str] = {
    "nexus.identity.v1.IdentityService/EnsureUser": "identity.users.ensure",
}
if set(SCOPED_METHODS.values()) != set(KEY_SCOPES):
    raise RuntimeError("service/policy.py SCOPED_METHODS and db/domains/identity.py KEY_SCOPES name different scopes")

# Services no role below this may call at all (the audit trail is for admins).
SERVICE_MINIMUM: dict[str, Action] = {"nexus.security.v1.SecurityService": Action.ADMIN}


# Methods whose names name no resource: the family they belong to.
FAMILY_OF: dict[str, str] = {
    "nexus.chat.v1.ChatService/StreamEvents": "events",
    "nexus.ai.v1.AIService/GetAIUsageSummary": "ai_interactions",
}


def _snake(name: str) -> str:
    """"AIInteractions" -> "ai_interactions", "ApiKeys" -> "api_keys"."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def family_for(full_method: str) -> str:
    """The resource part of a method's permission: "tasks" for WorkService/ListTasks."""
    key = full_method.lstrip("/")
    if key in FAMILY_OF:
        return FAMILY_OF[key]
    service, _, method = key.partition("/")
    package = service.rpartition(".")[0] + "."
    named = [
        (len(word), spec.plural)
        for spec in REGISTRY
        if spec.message.DESCRIPTOR.full_name.startswith(package)  # its own service's resources
        for word in (spec.name, spec.plural)
        if word in method
    ]
    if not named:
        raise KeyError(f"{key} names no resource: give it a family in service/policy.py FAMILY_OF")
    return _snake(max(named)[1])


def permission_for(full_method: str) -> str:
    """The one permission that allows a method: "work.tasks.read" for /nexus.work.v1.WorkService/GetTask."""
    key = full_method.lstrip("/")
    package = key.partition("/")[0].split(".")
    service = package[1] if len(package) > 2 else package[0]
    return f"{service}.{family_for(key)}.{action_for(key).name.lower()}"


def permission_catalog(full_methods: Iterable[str]) -> dict[str, str]:
    """Every permission of the served methods, with the least built-in role that holds it."""
    return {permission_for(m): action_for(m).value for m in full_methods}


def install_permissions(full_methods: Iterable[str]) -> dict[str, str]:
    """The permission catalog of the served methods, made the one Roles are checked against;
    raises if a method has no permission (the server then refuses to start)."""
    catalog = permission_catalog(full_methods)
    identity.install_permissions(catalog)
    return catalog


def built_in_holders(permission: str, catalog: Mapping[str, str]) -> list[str]:
    """The built-in roles that hold a permission, highest first."""
    least = ROLE_RANK[catalog[permission]]
    return [role for role in reversed(ROLES) if ROLE_RANK[role] >= least]


def held_permissions(assigned: Iterable[tuple[str, Iterable[str] | None]]) -> frozenset[str] | None:
    """The permissions a user's assigned roles hold together, from (name, stored permissions)
    pairs: a built-in role's are those of its level, whatever is stored; a custom role's are
    those it holds that the catalog knows. None when no role is assigned: the level decides."""
    assigned = list(assigned)
    if not assigned:
        return None
    held: set[str] = set()
    for name, permissions in assigned:
        if name in ROLE_RANK:
            held.update(identity.built_in_permissions(name))
        else:
            held.update(identity.known_permissions(permissions or ()))
    return frozenset(held)


def action_for(full_method: str) -> Action:
    """The action of "/pkg.Service/Method" (or "pkg.Service/Method"); KeyError if it has no rule."""
    key = full_method.lstrip("/")
    service, _, method = key.partition("/")
    action: Action | None
    if key in CUSTOM_METHODS:
        action = CUSTOM_METHODS[key]
    else:
        action = next((a for prefix, a in STANDARD_PREFIXES if method.startswith(prefix)), None)
        if action is None:
            raise KeyError(f"{key} has no access rule in service/policy.py")
    floor = SERVICE_MINIMUM.get(service)
    if floor is not None and ROLE_RANK[floor.value] > ROLE_RANK[action.value]:
        return floor
    return action


def check_all_covered(full_methods: Iterable[str]) -> dict[str, Action]:
    """The table for every served method; raises if one has no rule (the server then refuses to start)."""
    return {m: action_for(m) for m in full_methods}


def authorize(
    role: str, action: Action, full_method: str, permission: str | None = None, held: frozenset[str] | None = None, scopes: frozenset[str] = frozenset()
) -> None:
    """Refuse a caller of level `role` whose assigned roles hold `held` (None: no role assigned)
    and whose API key holds `scopes` a method of `action` that needs `permission`:
    PERMISSION_DENIED naming what is missing. A key scope (SCOPED_METHODS) opens its method
    whatever the level; such keys act for no user, so no assigned role narrows them."""
    method = full_method.lstrip("/")
    if ROLE_RANK.get(role, -1) < ROLE_RANK[action.value]:
        scope = SCOPED_METHODS.get(method)
        if scope is not None and scope in scopes:
            return
        also = f", or an API key with the scope {scope!r}" if scope is not None else ""
        raise errors.PermissionDenied(
            f"role {role!r} may not call {method} (needs {action.value} or above{also})",
            reason="ROLE_FORBIDS_METHOD",
            metadata={"role": role, "required_role": action.value, "method": method},
        )
    if held is not None and permission is not None and permission not in held:
        raise errors.PermissionDenied(
            f"no role assigned to the caller holds {permission!r}, which {method} needs",
            reason="ROLE_LACKS_PERMISSION",
            metadata={"role": role, "permission": permission, "method": method},
        )
