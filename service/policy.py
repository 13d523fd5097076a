"""Which role may call which RPC: one table, checked by the call guard before any servicer runs.

Standard methods take their action from their name (Get/List/Search/BatchGet read; Create/Update/
Delete/Undelete/BatchCreate write), so a resource added later is covered with no new entry.
Custom methods are listed here; a method that is in neither is refused at start-up, so no RPC
can ship without a rule. Row-level rules (which rows a role sees or manages) are each resource's `access`
(db/engine/rules.py); `nexus-data policy` prints both tables.
"""
from __future__ import annotations

import enum
from collections.abc import Iterable

from db import errors
from db.domains.identity import KEY_SCOPES
from db.engine.rules import ROLE_RANK


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


def action_for(full_method: str) -> Action:
    """The action of "/pkg.Service/Method" (or "pkg.Service/Method"); KeyError if it has no rule."""
    key = full_method.lstrip("/")
    service, _, method = key.partition("/")
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


def authorize(role: str, action: Action, full_method: str, scopes: frozenset[str] = frozenset()) -> None:
    if ROLE_RANK.get(role, -1) < ROLE_RANK[action.value]:
        scope = SCOPED_METHODS.get(full_method.lstrip("/"))
        if scope is not None and scope in scopes:
            return
        also = f", or an API key with the scope {scope!r}" if scope is not None else ""
        raise errors.PermissionDenied(
            f"role {role!r} may not call {full_method.lstrip('/')} (needs {action.value} or above{also})",
            reason="ROLE_FORBIDS_METHOD",
            metadata={"role": role, "required_role": action.value, "method": full_method.lstrip("/")},
        )
