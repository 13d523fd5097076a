"""Realistic sample data for the identity, work, chat and knowledge domains (`nexus-data seed`).

Every row goes through the code paths the API uses: the proto Create*Request messages and
`writes.create` with all its validation, the domain functions for memberships, role
assignments, e-mail verification, task dependencies, archiving a conversation, sharing a
document and restoring one of its versions, `writes.update` and `writes.delete` for documents'
edits and soft deletes (made on behalf of their seeded users, _acting_for), and
`knowledge.upsert_knowledge_chunk` (UpsertKnowledgeChunk's path) for knowledge chunks. A plan of steps is drawn
from one random generator first (deterministic when `rng_seed` is given, for a given database
and day: dates are relative to today), then run in transactions of BATCH_STEPS rows.

What is seeded, in order (COUNT_KINDS): users with their roles and API keys; projects with
members, tasks and dependencies; chat channels (some in projects) with members and messages,
some of them replies; AI conversations of users (some archived) with their turns; knowledge
chunks of several sources; documents of users (Word, Excel, PowerPoint, other) shared at each
level, some edited by their owners and edit-sharers through the standard Update (the engine
keeps each version, by its author), one or two restored to an earlier version, a few
soft-deleted; AI interactions of users (calls to models over the thirty days before today,
their cost from their tokens), each made on its user's behalf; data analyses of users in every status (started, completed with a result or
failed through their lifecycle methods), with input and output files when a blob store is given
(the CLI's), and tool generations likewise.

Seeding twice into the same database never collides: usernames and e-mails carry a number past
the users already stored, role rows that exist are reused, API key names follow usernames, and
a document's versions and shares are those of a new document.
Knowledge chunks have a natural key, (source, external_id) as "path/to/file.md#3": a chunk whose
key is stored already is replaced, as re-indexing a source replaces it, and counted apart
(knowledge_chunks_replaced), so every other count is the number of rows the seed added.
"""
from __future__ import annotations

import copy
import datetime as dt
import random
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import duration_pb2, field_mask_pb2, struct_pb2, timestamp_pb2
from nexus.ai.v1 import ai_pb2 as apb
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.common.v1 import common_pb2
from nexus.files.v1 import files_pb2 as fpb
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.knowledge.v1 import knowledge_pb2 as kpb
from nexus.work.v1 import work_pb2 as wpb
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session
from tqdm import tqdm

import db.domains  # noqa: F401 - the audit trail records seeded rows too
from db.blobs import BlobStore
from db.database import Database
from db.domains import ai_jobs, ai_usage, chat, files, identity, knowledge, work
from db.domains.documents import DOCUMENTS, restore_document_version, share_document
from db.domains.identity import Role, User
from db.engine import writes
from db.engine.call import Call
from db.unit import SESSION_READ

BATCH_STEPS = 250  # rows written per transaction
PASSWORD_USERS = 3  # argon2 is deliberately slow: only the first users can sign in
SAMPLE_PASSWORD = "password123!"
COUNT_KINDS = (
    "users",
    "roles",
    "role_assignments",
    "api_keys",
    "projects",
    "project_members",
    "tasks",
    "task_dependencies",
    "channels",
    "channel_members",
    "chat_messages",
    "conversations",
    "conversation_messages",
    "knowledge_chunks",
    "knowledge_chunks_replaced",  # upserted chunks whose (source, external_id) was stored already
    "documents",
    "document_versions",  # kept by the engine as an edit or a restore changes a document
    "document_shares",
    "ai_interactions",
    "data_analyses",
    "analysis_files",
    "tool_generations",
)

# The built-in roles, one per platform role: their permissions are those of their level, fixed
# by the service (db/domains/identity.py), so a sample row states none.
ROLES: dict[str, str] = {
    "admin": "Administers the platform: users, roles, keys and every project.",
    "manager": "Runs projects: members, plans and tasks of the projects it owns.",
    "user": "Works on tasks of the projects it is a member of.",
    "guest": "Reads projects and tasks it is invited to.",
}
PLATFORM_ROLE = {
    "admin": ipb.USER_ROLE_ADMIN,
    "manager": ipb.USER_ROLE_MANAGER,
    "user": ipb.USER_ROLE_USER,
    "guest": ipb.USER_ROLE_GUEST,
}
ROLE_WEIGHTS = {"admin": 4, "manager": 18, "user": 66, "guest": 12}

FIRST_NAMES = (
    "Ada", "Alan", "Amara", "Ana", "Ben", "Carla", "Chen", "Daniel", "Diego", "Elena", "Emma", "Farah",
    "Felix", "Grace", "Hana", "Hugo", "Ines", "Ivan", "Jonas", "Julia", "Kai", "Lara", "Leo", "Lina",
    "Marco", "Maya", "Mei", "Nadia", "Noah", "Olga", "Omar", "Paula", "Priya", "Rafael", "Sara", "Sofia",
    "Tariq", "Tom", "Yuki", "Zoe",
)
LAST_NAMES = (
    "Abbott", "Alvarez", "Bauer", "Becker", "Costa", "Dubois", "Evans", "Fischer", "Garcia", "Hansen",
    "Ito", "Jansen", "Kim", "Kowalski", "Larsen", "Lopez", "Meyer", "Moreau", "Nakamura", "Novak",
    "Okafor", "Olsen", "Patel", "Petrov", "Quinn", "Rossi", "Schmidt", "Silva", "Singh", "Tanaka",
    "Torres", "Vogel", "Wagner", "Walsh", "Weber", "Wong", "Yilmaz", "Young", "Zhang", "Ziegler",
)
EMAIL_DOMAINS = ("example.com", "example.org", "example.net")
LANGUAGES = ("en", "en", "en", "de", "fr", "es", "pt", "it", "nl", "ja")
TIMEZONES = ("UTC", "Europe/Berlin", "Europe/London", "America/New_York", "America/Sao_Paulo", "Asia/Tokyo")

PROJECT_CODENAMES = (
    "Apollo", "Atlas", "Aurora", "Borealis", "Cobalt", "Falcon", "Helios", "Meridian", "Nimbus", "Orion",
    "Phoenix", "Quasar", "Sierra", "Titan", "Vega", "Zephyr",
)
PROJECT_AREAS = (
    "Customer Portal", "Billing Platform", "Mobile App", "Data Warehouse", "Onboarding Flow", "Search Service",
    "Design System", "Analytics Dashboard", "Payments Gateway", "Identity Service", "Release Pipeline",
    "Support Center",
)
PROJECT_VERBS = ("Rebuild", "Modernise", "Launch", "Consolidate", "Scale", "Redesign")
PROJECT_GOALS = (
    "cut support tickets by a third", "halve page load times", "reach the new enterprise customers",
    "retire the legacy stack", "meet the new compliance rules", "make releases weekly",
)
PROJECT_STATUS_WEIGHTS = {"planning": 15, "active": 45, "on_hold": 10, "completed": 20, "cancelled": 10}
PROJECT_STATUS = {
    "planning": wpb.PROJECT_STATUS_PLANNING,
    "active": wpb.PROJECT_STATUS_ACTIVE,
    "on_hold": wpb.PROJECT_STATUS_ON_HOLD,
    "completed": wpb.PROJECT_STATUS_COMPLETED,
    "cancelled": wpb.PROJECT_STATUS_CANCELLED,
}
PRIORITY = {"low": wpb.PRIORITY_LOW, "medium": wpb.PRIORITY_MEDIUM, "high": wpb.PRIORITY_HIGH, "critical": wpb.PRIORITY_CRITICAL}
PRIORITY_WEIGHTS = {"low": 20, "medium": 45, "high": 25, "critical": 10}
CURRENCIES = ("EUR", "EUR", "USD", "USD", "GBP", "CHF")

TASK_VERBS = (
    "Implement", "Design", "Review", "Test", "Document", "Refactor", "Fix", "Migrate", "Benchmark", "Deploy",
    "Prototype", "Audit",
)
TASK_OBJECTS = (
    "login page", "REST endpoints", "database schema", "caching layer", "CI pipeline", "error handling",
    "user settings", "search indexing", "notification e-mails", "access control", "billing reports",
    "onboarding checklist", "API rate limits", "audit logging", "dark mode", "export to CSV",
)
TASK_DETAILS = (
    "Coordinate with the design team before starting.",
    "Cover the edge cases QA found in the last release.",
    "Keep the change behind a feature flag.",
    "Update the runbook afterwards.",
    "Pair with the on-call engineer for the rollout.",
    "Measure before and after; attach the numbers.",
    "Split into smaller pull requests if it grows.",
)
TAGS = ("backend", "frontend", "infra", "docs", "qa", "security", "ux", "performance", "bug", "feature", "tech-debt")
HOURS = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 40.0)
# Task status mix by project status.
TASK_STATUS_WEIGHTS = {
    "planning": {"todo": 85, "in_progress": 10, "blocked": 5},
    "active": {"todo": 30, "in_progress": 25, "review": 10, "done": 30, "blocked": 5},
    "on_hold": {"todo": 40, "in_progress": 15, "done": 20, "blocked": 25},
    "completed": {"done": 100},
    "cancelled": {"todo": 50, "done": 30, "blocked": 20},
}
TASK_STATUS = {
    "todo": wpb.TASK_STATUS_TODO,
    "in_progress": wpb.TASK_STATUS_IN_PROGRESS,
    "review": wpb.TASK_STATUS_REVIEW,
    "done": wpb.TASK_STATUS_DONE,
    "blocked": wpb.TASK_STATUS_BLOCKED,
}

PUBLIC_CHANNELS = (
    ("general", "Company-wide news and questions."),
    ("random", "Everything that is not work."),
    ("announcements", "Releases, launches and office news."),
    ("help-desk", "Ask IT and the platform team for help."),
    ("engineering", "Architecture, tooling and reviews across teams."),
    ("releases", "What ships when; release notes and rollbacks."),
    ("design-review", "Mock-ups and critique, every Thursday."),
    ("incidents", "Live incidents and their follow-ups."),
    ("til", "Today I learned: short tips worth sharing."),
)
PRIVATE_CHANNELS = (
    ("leads", "Team leads: staffing, planning and escalations."),
    ("hiring", "Candidates, interview loops and offers."),
    ("security-response", "Vulnerability reports under embargo."),
    ("budget-planning", "Next year's budget, line by line."),
)
PROJECT_CHANNEL_SUFFIXES = ("team", "dev", "design", "release", "support")
CHAT_LINES = (
    "Deployed {version} to staging; smoke tests are green.",
    "Can someone review my pull request for the {obj}? It is small, I promise.",
    "Standup moves to {time} tomorrow because of the all-hands.",
    "Heads-up: the {obj} will be read-only for ten minutes tonight during the migration.",
    "I wrote up the findings on the {obj}; comments welcome before Friday.",
    "@{member} do you have the numbers from last week's load test?",
    "The nightly build failed on the {obj} tests again, looking into it.",
    "Reminder: demo of the {obj} at {time}, bring questions.",
    "We hit the error budget for the {obj} this month; let's slow down releases a little.",
    "Who owns the {obj} now that the team was split?",
    "Release {version} is out. Changelog is in the wiki.",
    "Pairing on the {obj} this afternoon if anyone wants to join.",
    "Customer feedback on the {obj} is mostly positive, two bug reports filed.",
    "Lunch at {time}? The new place around the corner.",
)
CHAT_REPLIES = (
    "Thanks, looking now.",
    "+1, ship it.",
    "I can take this after lunch.",
    "Done, left a few comments.",
    "Can we move it to {time}? I have a clash.",
    "Same here, it started after {version}.",
    "@{member} knows this part best.",
    "Good catch, I will add a test for it.",
    "Not yet, will have them by end of day.",
    "Works for me.",
)
CHAT_TIMES = ("9:30", "10:00", "11:15", "13:00", "14:30", "16:00")

CONVERSATION_SYSTEM_PROMPT = (
    "You are Nexus Assistant. Answer from the team's documentation and handbook, cite the pages you used, "
    "and say so when you are not sure."
)
ASSISTANT_MODELS = ("nexus-assistant-1", "nexus-assistant-1", "nexus-assistant-2-preview")
# (title, what the user says, what the assistant answers): turns alternate through both lists.
CONVERSATION_TOPICS = (
    (
        "Paging through tasks",
        ("How do I list all tasks of a project, more than a thousand of them?",
         "And if tasks are added while I page?",
         "Can I sort by due date instead?"),
        ("Call ListTasks with a filter on project_id and page_size up to 1000, then pass each response's "
         "next_page_token until it is empty.",
         "Pages are keyset pages: new tasks after your position show up on a later page, none is repeated or skipped.",
         'Yes: set order_by to "due_date"; the page token remembers the order it was made for.'),
    ),
    (
        "Rotating API keys",
        ("Our CI uses an API key that expires next month. How do I rotate it without downtime?",
         "Does revoking the old key end open streams?",
         "Who can create keys for other users?"),
        ("Create a second key with the same role, switch the CI secret to it, check that calls succeed, "
         "then revoke the old one.",
         "Yes: a stream re-checks its credential and ends with UNAUTHENTICATED once the key is revoked.",
         "Admins only; a manager can create keys for itself with at most its own role."),
    ),
    (
        "Drafting release notes",
        ("Summarise what changed in the billing platform since the last release.",
         "Make it shorter, for customers.",
         "Add a line about the CSV export."),
        ("Since the last release: invoices render faster, failed payments are retried twice, and the "
         "reports page gained filters by currency.",
         "Faster invoices, automatic payment retries and currency filters in reports.",
         "Added: you can now export any report to CSV from its menu."),
    ),
    (
        "Debugging a flaky test",
        ("The search indexing test fails about one run in twenty. Where do I start?",
         "It only fails on PostgreSQL.",
         "That was it, thanks."),
        ("Run it in a loop with a fixed seed and print the rows it compares; flaky tests usually depend on order or time.",
         "Then compare the ORDER BY: without a tie-breaker PostgreSQL may return equal rows in any order.",
         "Glad it helped. Consider adding the id as the last sort key everywhere you page."),
    ),
    (
        "Planning the onboarding week",
        ("A new engineer starts on Monday. What should the first week look like?",
         "Who sets up their accounts?",
         "Put that into a checklist."),
        ("Day one: accounts, laptop and a walk through the architecture; then a small bug fix to ship by Wednesday, "
         "and pairing with the on-call engineer on Friday.",
         "The help desk creates the accounts; the team lead adds them to projects and channels.",
         "1. Accounts and laptop. 2. Architecture tour. 3. First bug fix. 4. On-call shadowing. 5. Retro with the lead."),
    ),
    (
        "Budget questions",
        ("How much of the Atlas budget is spent?",
         "And how many hours are estimated for what is left?"),
        ("I cannot see invoices, but the project's tasks have 312 actual hours logged against 480 estimated.",
         "The open tasks are estimated at 168 hours; GetProjectProgress gives the exact figures."),
    ),
)
CLIENTS = ("web", "web", "ios", "android", "cli")

KNOWLEDGE_MODULES = ("identity", "work", "chat", "knowledge", "security", "billing", "search", "streams")
# source -> (path patterns, topics as (slug, English title, German title)); "{module}", "{topic}"
# fill a pattern. Only GERMAN_SOURCES have German pages.
KNOWLEDGE_SOURCES: dict[str, tuple[tuple[str, ...], tuple[tuple[str, str, str], ...]]] = {
    "docs": (
        ("guides/{module}/{topic}.md", "concepts/{module}/{topic}.md", "operations/{module}/{topic}.md"),
        (("getting-started", "Getting started", "Erste Schritte"), ("configuration", "Configuration", "Konfiguration"),
         ("pagination", "Pagination", "Seitenweises Lesen"), ("filtering", "Filtering", "Filtern"),
         ("errors", "Error handling", "Fehlerbehandlung"), ("authentication", "Authentication", "Authentifizierung"),
         ("rate-limits", "Rate limits", "Ratenbegrenzung"), ("backups", "Backups", "Datensicherung")),
    ),
    "handbook": (
        ("engineering/{topic}.md", "people/{topic}.md", "security/{topic}.md", "support/{topic}.md"),
        (("on-call", "On-call", "Rufbereitschaft"), ("code-review", "Code review", "Code-Review"),
         ("releases", "Releases", "Releases"), ("incident-response", "Incident response", "Störungsbehebung"),
         ("onboarding", "Onboarding", "Einarbeitung"), ("vacation", "Vacation", "Urlaub"),
         ("expenses", "Expenses", "Spesen"), ("remote-work", "Remote work", "Mobiles Arbeiten")),
    ),
    "api-reference": (
        ("nexus/{module}/v1/{topic}.md",),
        (("get", "Get methods", ""), ("list", "List methods", ""), ("create", "Create methods", ""),
         ("update", "Update methods", ""), ("delete", "Delete methods", ""), ("search", "Search methods", ""),
         ("batch", "Batch methods", "")),
    ),
    "runbooks": (
        ("alerts/{module}-{topic}.md",),
        (("high-latency", "High latency", "Hohe Latenz"), ("error-rate", "Error rate", "Fehlerquote"),
         ("disk-full", "Disk full", "Volle Festplatte"), ("failover", "Database failover", "Datenbank-Failover"),
         ("certificate-expiry", "Certificate expiry", "Ablaufende Zertifikate")),
    ),
}
GERMAN_SOURCES = ("docs", "handbook")  # the others are written in English only
GERMAN_SHARE = 0.2
KNOWLEDGE_SECTIONS = {
    "en": ("Overview", "Prerequisites", "Configuration", "Examples", "Troubleshooting", "Limits", "FAQ"),
    "de": ("Überblick", "Voraussetzungen", "Konfiguration", "Beispiele", "Fehlerbehebung", "Grenzen", "Häufige Fragen"),
}
KNOWLEDGE_SENTENCES = {
    "en": (
        "This section covers {topic} for the {module} service.",
        "Most teams start with the defaults and revisit {topic} after their first month in production.",
        "Requests that fail validation return INVALID_ARGUMENT and name the offending field.",
        "Pages hold at most 1000 items; pass next_page_token to read the next one.",
        "Check the {module} dashboards before and after every change.",
        "Escalate to the on-call engineer if the error rate stays above {number} percent for ten minutes.",
        "Every change is recorded in the audit trail with the caller and the request id.",
        "Settings are read at start-up; restart the service after changing them.",
        "Timeouts default to {number} seconds and can be shortened per call with a deadline.",
        "Admins see every row; other roles see only the rows their rules allow.",
        "Write down what you changed and why, so the next person does not have to guess.",
        "The {module} team reviews questions about {topic} every Tuesday.",
    ),
    "de": (
        "Dieser Abschnitt beschreibt {topic} im Modul {module}.",
        "Die meisten Teams beginnen mit den Standardwerten und prüfen {topic} nach dem ersten Monat im Betrieb.",
        "Ungültige Anfragen werden mit INVALID_ARGUMENT abgelehnt; das fehlerhafte Feld wird genannt.",
        "Prüfen Sie vor und nach jeder Änderung die Dashboards von {module}.",
        "Bleibt die Fehlerquote zehn Minuten über {number} Prozent, verständigen Sie die Rufbereitschaft.",
        "Jede Änderung steht mit Aufrufer und Request-ID im Audit-Protokoll.",
        "Einstellungen werden beim Start gelesen; starten Sie den Dienst nach einer Änderung neu.",
        "Das Team {module} beantwortet Fragen zu {topic} jeden Dienstag.",
    ),
}

DOCUMENT_KIND = {
    "word": kpb.DOCUMENT_KIND_WORD,
    "excel": kpb.DOCUMENT_KIND_EXCEL,
    "powerpoint": kpb.DOCUMENT_KIND_POWERPOINT,
    "other": kpb.DOCUMENT_KIND_OTHER,
}
DOCUMENT_KIND_WEIGHTS = {"word": 40, "excel": 25, "powerpoint": 20, "other": 15}
SHARE_LEVEL = {"view": kpb.DOCUMENT_SHARE_LEVEL_VIEW, "comment": kpb.DOCUMENT_SHARE_LEVEL_COMMENT, "edit": kpb.DOCUMENT_SHARE_LEVEL_EDIT}
SHARE_LEVEL_WEIGHTS = {"view": 50, "comment": 25, "edit": 25}
# kind -> title patterns; "{area}", "{obj}", "{quarter}" fill them.
DOCUMENT_TITLES = {
    "word": ("{area} requirements", "Architecture decision: {obj}", "Post-mortem: {obj} outage", "Onboarding guide for the {area}",
             "Meeting notes: {area} sync"),
    "excel": ("{area} budget {quarter}", "Capacity plan {quarter}", "Bug triage: {obj}", "{area} release checklist"),
    "powerpoint": ("{area} kickoff", "Quarterly review {quarter}", "Design review: {obj}", "{area} roadmap"),
    "other": ("{obj} notes", "Release notes {quarter}", "Runbook draft: {obj}"),
}
DOCUMENT_RETITLES = (" (draft)", " (reviewed)", " v2", " - final", " (for comments)")
DOCUMENT_QUARTERS = ("Q1 2026", "Q2 2026", "Q3 2026", "Q4 2026", "Q1 2027")
DOCUMENT_HEADINGS = ("Background", "Goals", "Scope", "Decisions", "Risks", "Open questions", "Next steps")
DOCUMENT_SENTENCES = (
    "The {area} team owns the {obj} from here on.",
    "We agreed to ship the {obj} behind a feature flag first.",
    "Load tests of the {obj} passed at twice the current traffic.",
    "Customers asked for the {obj} in three of the last five reviews.",
    "Work on the {obj} waits for the identity service upgrade.",
    "Costs stay within the {area} budget if we reuse the existing cluster.",
    "Open point: who signs off the {obj} before the release?",
    "Support needs a week of notice before any change to the {obj}.",
)
# sheet name -> (its columns, the range of its numbers); a row is a task object, a first name, then numbers.
DOCUMENT_SHEETS = {
    "Budget": (("Item", "Owner", "Planned", "Spent"), (500, 50_000)),
    "Estimates": (("Task", "Assignee", "Hours", "Days left"), (1, 80)),
    "Risks": (("Risk", "Owner", "Likelihood", "Impact"), (1, 5)),
}

Ids = dict[Any, str]  # plan key, e.g. ("user", 3), -> id of the created resource
# A step returns the kind it counted in, when that is known only once written (an upsert).
StepFn = Callable[[Session, Call, Ids], str | None]


@dataclass(frozen=True)
class Step:
    """One row to write: `kind` names the count it adds to (unless its run returns another);
    "" is a step that adds no row (a role that exists, archiving a conversation, soft-deleting a
    document)."""

    kind: str
    run: StepFn


@dataclass(frozen=True)
class UserPlan:
    role: str
    message: ipb.User
    verified: bool


@dataclass(frozen=True)
class ProjectPlan:
    status: str
    message: wpb.Project  # without owner_id, which is known only once the owner exists
    owner: int
    members: tuple[int, ...]  # owner first


@dataclass(frozen=True)
class ChatLine:
    author: int
    content: str
    parent: int | None  # index of an earlier message of the same channel


@dataclass(frozen=True)
class ChannelPlan:
    message: cpb.Channel  # without project_id and creator_id, known only once they exist
    project: int | None
    members: tuple[int, ...]  # creator first
    lines: tuple[ChatLine, ...]


@dataclass(frozen=True)
class ConversationPlan:
    user: int
    title: str
    archived: bool  # archived after its turns: an archived conversation takes no more
    turns: tuple[cpb.ConversationMessage, ...]  # without conversation_id


@dataclass(frozen=True)
class DocumentEdit:
    """A change of a document by its owner or an edit-sharer: always of its content (one more
    paragraph, row, slide or line, so no state repeats an earlier one), sometimes of its title."""

    editor: int
    title: str
    content: struct_pb2.Struct
    paths: tuple[str, ...]


@dataclass(frozen=True)
class DocumentPlan:
    message: kpb.Document  # without owner_id, known only once the owner exists
    owner: int
    shares: tuple[tuple[int, str], ...]  # (user, level), never the owner
    edits: tuple[DocumentEdit, ...]
    restore: tuple[int, int] | None  # (by whom, which version), after the edits
    deleted: bool  # soft-deleted last


# ------------------------------------------------------------------ entry point


def seed(
    database: Database,
    *,
    users: int = 50,
    projects: int = 20,
    tasks_per_project: int = 25,
    channels: int = 10,
    messages_per_channel: int = 30,
    conversations: int = 20,
    messages_per_conversation: int = 8,
    knowledge_chunks: int = 150,
    documents: int = 20,
    ai_interactions: int = 200,
    analyses: int = 12,
    tool_generations: int = 12,
    blobs: BlobStore | None = None,
    progress: bool = True,
    rng_seed: int | None = None,
) -> dict[str, int]:
    """Write sample users, roles, API keys, projects, members, tasks, dependencies, channels with
    members and messages, conversations with their messages, knowledge chunks, and documents with
    their versions and shares, AI jobs of users (without users: none; their files only with
    blobs, where the files' bytes go); return the counts by kind (COUNT_KINDS)."""
    sizes = {
        "users": users, "projects": projects, "tasks_per_project": tasks_per_project, "channels": channels,
        "messages_per_channel": messages_per_channel, "conversations": conversations,
        "messages_per_conversation": messages_per_conversation, "knowledge_chunks": knowledge_chunks,
        "documents": documents, "ai_interactions": ai_interactions, "analyses": analyses, "tool_generations": tool_generations,
    }
    if min(sizes.values()) < 0:
        raise ValueError(f"{', '.join(sizes)} must not be negative")
    if projects and not users:
        raise ValueError("projects need at least one user to own them")
    if (channels or conversations or documents or ai_interactions) and not users:
        raise ValueError("channels, conversations, documents and AI interactions need at least one user to have them")
    rng = random.Random(rng_seed)
    today = dt.date.today()
    stems = [_name_stem(rng) for _ in range(users)]
    existing_roles, offset = database.run_sync(lambda s: _database_state(s, stems), SESSION_READ)
    user_plans = [_user_plan(rng, i, first, last, domain, offset + i + 1) for i, (first, last, domain) in enumerate(stems)]
    project_plans = [_project_plan(rng, user_plans, today) for _ in range(projects)]
    steps = [
        *_role_steps(existing_roles),
        *_user_steps(user_plans),
        *_api_key_steps(user_plans, today),
        *_project_steps(project_plans),
        *_task_steps(rng, project_plans, user_plans, tasks_per_project),
    ]
    # Drawn after the work domain's plan, so a seed number's users, projects and tasks stay what they were.
    names: set[str] = set()
    steps += _channel_steps([_channel_plan(rng, user_plans, project_plans, messages_per_channel, names) for _ in range(channels)])
    steps += _conversation_steps([_conversation_plan(rng, user_plans, messages_per_conversation) for _ in range(conversations)])
    steps += _knowledge_steps(_knowledge_chunks(rng, knowledge_chunks))
    steps += _document_steps([_document_plan(rng, d, user_plans) for d in range(documents)])
    steps += _ai_interaction_steps([_ai_interaction_plan(rng, len(user_plans), today) for _ in range(ai_interactions)])
    if user_plans:  # a job is a user's: none without users
        steps += _job_steps(rng, user_plans, analyses, tool_generations, blobs)
    return _execute(database, steps, progress)


def _database_state(session: Session, stems: Sequence[tuple[str, str, str]]) -> tuple[dict[str, str], int]:
    """(ids of the sample roles that exist already, first user number free for every planned name)."""
    roles = {name: str(role_id) for name, role_id in session.execute(select(Role.name, Role.id).where(Role.name.in_(ROLES)))}
    offset = session.scalar(select(func.count()).select_from(User)) or 0
    while _names_taken(session, stems, offset):
        offset += max(1, len(stems))
    return roles, offset


def _names_taken(session: Session, stems: Sequence[tuple[str, str, str]], offset: int) -> bool:
    names = [_username(first, last, offset + i + 1) for i, (first, last, _) in enumerate(stems)]
    emails = [f"{name}@{domain}" for name, (_, _, domain) in zip(names, stems, strict=True)]
    for start in range(0, len(names), 500):
        chunk = or_(User.username.in_(names[start : start + 500]), User.email.in_(emails[start : start + 500]))
        if session.scalar(select(func.count()).select_from(User).where(chunk)):
            return True
    return False


# ------------------------------------------------------------------ planning


def _weighted(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _date(day: dt.date) -> common_pb2.Date:
    return common_pb2.Date(year=day.year, month=day.month, day=day.day)


def _struct(values: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(values)
    return out


def _name_stem(rng: random.Random) -> tuple[str, str, str]:
    return rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES), rng.choice(EMAIL_DOMAINS)


def _username(first: str, last: str, number: int) -> str:
    return f"{first}.{last}{number}".lower()


def _user_role(rng: random.Random, index: int) -> str:
    """The first users are an admin, a manager and a user (the ones with a password); then a mix."""
    fixed = ("admin", "manager", "user")
    return fixed[index] if index < len(fixed) else _weighted(rng, ROLE_WEIGHTS)


def _user_plan(rng: random.Random, index: int, first: str, last: str, domain: str, number: int) -> UserPlan:
    role = _user_role(rng, index)
    username = _username(first, last, number)
    preferences = _struct(
        {
            "theme": rng.choice(("dark", "light")),
            "language": rng.choice(LANGUAGES),
            "timezone": rng.choice(TIMEZONES),
            "notifications": {"email": rng.random() < 0.8, "digest": rng.choice(("daily", "weekly", "never"))},
        }
    )
    message = ipb.User(
        username=username,
        email=f"{username}@{domain}",
        full_name=f"{first} {last}",
        role=PLATFORM_ROLE[role],
        is_active=index < PASSWORD_USERS or rng.random() < 0.95,
        preferences=preferences,
    )
    if rng.random() < 0.6:
        message.avatar_url = f"https://avatars.example.com/{username}.png"
    if rng.random() < 0.5:
        message.external_id = f"sso|{username}"
    if index < PASSWORD_USERS:
        message.password = SAMPLE_PASSWORD
    return UserPlan(role, message, verified=index < PASSWORD_USERS or rng.random() < 0.8)


def _project_dates(rng: random.Random, status: str, today: dt.date) -> tuple[dt.date, dt.date]:
    if status == "planning":
        start = today + dt.timedelta(days=rng.randint(7, 90))
    elif status == "completed":
        start = today - dt.timedelta(days=rng.randint(180, 540))
    else:
        start = today - dt.timedelta(days=rng.randint(14, 240))
    end = start + dt.timedelta(days=rng.randint(60, 300))
    if status == "completed" and end >= today:
        end = today - dt.timedelta(days=rng.randint(1, 30))
    return start, max(start, end)


def _budget(rng: random.Random) -> common_pb2.Money:
    return common_pb2.Money(
        currency_code=rng.choice(CURRENCIES),
        units=rng.randrange(5_000, 750_000, 250),
        nanos=rng.choice((0, 0, 0, 500_000_000, 990_000_000)),
    )


def _project_plan(rng: random.Random, users: Sequence[UserPlan], today: dt.date) -> ProjectPlan:
    managers = [i for i, u in enumerate(users) if u.role == "manager"]
    owner = rng.choice(managers or [i for i, u in enumerate(users) if u.role == "admin"] or [0])
    others = [i for i in range(len(users)) if i != owner]
    members = (owner, *rng.sample(others, min(len(others), rng.randint(2, 7))))
    status = _weighted(rng, PROJECT_STATUS_WEIGHTS)
    area = rng.choice(PROJECT_AREAS)
    start, end = _project_dates(rng, status, today)
    message = wpb.Project(
        name=f"{rng.choice(PROJECT_CODENAMES)} {area}",
        description=f"{rng.choice(PROJECT_VERBS)} the {area.lower()} to {rng.choice(PROJECT_GOALS)}.",
        status=PROJECT_STATUS[status],
        priority=PRIORITY[_weighted(rng, PRIORITY_WEIGHTS)],
        start_date=_date(start),
        end_date=_date(end),
        archived=status in ("completed", "cancelled") and rng.random() < 0.3,
    )
    if rng.random() < 0.9:
        message.budget.CopyFrom(_budget(rng))
    return ProjectPlan(status, message, owner, members)


def _task_hours(rng: random.Random, status: str) -> tuple[float, float]:
    """(estimated, actual): actual grows with progress, in half hours."""
    estimated = rng.choice(HOURS)
    share = {"done": rng.uniform(0.6, 1.6), "review": rng.uniform(0.7, 1.2), "in_progress": rng.uniform(0.1, 0.9)}
    return estimated, round(estimated * share.get(status, 0.0) * 2) / 2


def _task_message(rng: random.Random, project: ProjectPlan, status: str) -> wpb.Task:
    verb, obj = rng.choice(TASK_VERBS), rng.choice(TASK_OBJECTS)
    area = project.message.name.split(" ", 1)[1].lower()
    start = dt.date(project.message.start_date.year, project.message.start_date.month, project.message.start_date.day)
    end = dt.date(project.message.end_date.year, project.message.end_date.month, project.message.end_date.day)
    estimated, actual = _task_hours(rng, status)
    return wpb.Task(
        title=f"{verb} {obj}",
        description=f"{verb} the {obj} of the {area}. {rng.choice(TASK_DETAILS)}",
        status=TASK_STATUS[status],
        priority=PRIORITY[_weighted(rng, PRIORITY_WEIGHTS)],
        due_date=_date(start + dt.timedelta(days=rng.randint(0, (end - start).days))),
        estimated_hours=estimated,
        actual_hours=actual,
        tags=sorted(rng.sample(TAGS, rng.randint(1, 3))),
    )


def _dependencies(rng: random.Random, statuses: Sequence[str], index: int) -> list[int]:
    """Earlier tasks of the same project only, so never a cycle. Work not started yet (todo,
    blocked) may wait on any of them; work under way or done only on finished ones."""
    if index == 0 or rng.random() >= 0.35:
        return []
    window = range(max(0, index - 6), index)
    candidates = [j for j in window if statuses[index] in ("todo", "blocked") or statuses[j] == "done"]
    return sorted(rng.sample(candidates, min(len(candidates), rng.choice((1, 1, 2)))))


def _unique(name: str, taken: set[str]) -> str:
    """name, or name-2, name-3... if an earlier plan took it; the plan takes what it returns."""
    unique, number = name, 1
    while unique in taken:
        number += 1
        unique = f"{name}-{number}"
    taken.add(unique)
    return unique


def _active_users(users: Sequence[UserPlan]) -> list[int]:
    return [i for i, u in enumerate(users) if u.message.is_active] or list(range(len(users)))


def _chat_lines(rng: random.Random, members: Sequence[int], users: Sequence[UserPlan], count: int) -> tuple[ChatLine, ...]:
    """Messages by members; about a third answer one of the five before them."""
    lines: list[ChatLine] = []
    for index in range(count):
        author = rng.choice(members)
        mentioned = rng.choice([m for m in members if m != author] or [author])
        fill = {
            "obj": rng.choice(TASK_OBJECTS),
            "version": f"v{rng.randint(1, 4)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}",
            "time": rng.choice(CHAT_TIMES),
            "member": users[mentioned].message.username,
        }
        reply = index > 0 and rng.random() < 0.3
        parent = rng.randrange(max(0, index - 5), index) if reply else None
        lines.append(ChatLine(author, rng.choice(CHAT_REPLIES if reply else CHAT_LINES).format(**fill), parent))
    return tuple(lines)


def _channel_plan(
    rng: random.Random, users: Sequence[UserPlan], projects: Sequence[ProjectPlan], per_channel: int, taken: set[str]
) -> ChannelPlan:
    """A project's channel (its members only) about two times in five, else a company channel;
    private ones too. Names are unique within one seed."""
    project: int | None = None
    if projects and rng.random() < 0.4:
        project = rng.randrange(len(projects))
        plan = projects[project]
        suffix = rng.choice(PROJECT_CHANNEL_SUFFIXES)
        name = f"{plan.message.name.split(' ', 1)[0].lower()}-{suffix}"
        description = f"The {suffix} channel of {plan.message.name}."
        private = rng.random() < 0.5
        pool = list(plan.members)
    else:
        private = rng.random() < 0.25
        name, description = rng.choice(PRIVATE_CHANNELS if private else PUBLIC_CHANNELS)
        pool = _active_users(users)
    creator = rng.choice(pool)
    others = [u for u in pool if u != creator]
    members = (creator, *rng.sample(others, min(len(others), rng.randint(2, 8))))
    message = cpb.Channel(name=_unique(name, taken), description=description, is_private=private)
    return ChannelPlan(message, project, members, _chat_lines(rng, members, users, per_channel))


def _turn(sender: cpb.SenderType.ValueType, content: str, metadata: dict[str, Any] | None) -> cpb.ConversationMessage:
    turn = cpb.ConversationMessage(sender_type=sender, content=content)
    if metadata:
        turn.role_metadata.CopyFrom(_struct(metadata))
    return turn


def _conversation_plan(rng: random.Random, users: Sequence[UserPlan], count: int) -> ConversationPlan:
    """count turns: a system prompt first about half the time, then the user and the assistant
    by turns (the user first), with the client or the model's usage as metadata now and then."""
    title, asks, answers = rng.choice(CONVERSATION_TOPICS)
    turns: list[cpb.ConversationMessage] = []
    if count and rng.random() < 0.5:
        turns.append(_turn(cpb.SENDER_TYPE_SYSTEM, CONVERSATION_SYSTEM_PROMPT, {"prompt_version": "2026-11"}))
    for k in range(count - len(turns)):
        if k % 2 == 0:
            client = {"client": rng.choice(CLIENTS)} if rng.random() < 0.4 else None
            turns.append(_turn(cpb.SENDER_TYPE_USER, asks[k // 2 % len(asks)], client))
        else:
            usage = None
            if rng.random() < 0.7:
                prompt = rng.randint(200, 3000)
                usage = {
                    "model": rng.choice(ASSISTANT_MODELS),
                    "usage": {"prompt_tokens": prompt, "completion_tokens": rng.randint(20, 400)},
                    "finish_reason": "stop",
                }
            turns.append(_turn(cpb.SENDER_TYPE_ASSISTANT, answers[k // 2 % len(answers)], usage))
    return ConversationPlan(rng.choice(_active_users(users)), title, rng.random() < 0.25, tuple(turns))


def _knowledge_chunks(rng: random.Random, count: int) -> list[kpb.KnowledgeChunk]:
    """count chunks of files of the KNOWLEDGE_SOURCES, one to five sections a file, each
    "path#index" once within its source (a path drawn twice gets a number)."""
    chunks: list[kpb.KnowledgeChunk] = []
    taken: set[str] = set()
    while len(chunks) < count:
        source = rng.choice(list(KNOWLEDGE_SOURCES))
        patterns, topics = KNOWLEDGE_SOURCES[source]
        module = rng.choice(KNOWLEDGE_MODULES)
        slug, english, german = rng.choice(topics)
        stem = rng.choice(patterns).format(module=module, topic=slug).removesuffix(".md")
        path = _unique(f"{source}:{stem}", taken).split(":", 1)[1] + ".md"
        lang = "de" if source in GERMAN_SOURCES and rng.random() < GERMAN_SHARE else "en"
        topic = german if lang == "de" else english
        line = 1
        all_sections = KNOWLEDGE_SECTIONS[lang]
        picked = sorted(rng.sample(range(len(all_sections)), rng.randint(1, 5)))[: count - len(chunks)]
        sections = [all_sections[i] for i in picked]  # in the order a page has them
        for index, section in enumerate(sections):
            sentences = rng.sample(KNOWLEDGE_SENTENCES[lang], rng.randint(2, 4))
            fill = {"topic": topic if lang == "de" else topic.lower(), "module": module, "number": rng.choice((1, 2, 5, 10, 30))}
            lines = rng.randint(8, 60)
            metadata = {"lang": lang, "section": section, "module": module, "path": path, "line_start": line, "line_end": line + lines - 1}
            chunks.append(
                kpb.KnowledgeChunk(
                    source=source,
                    external_id=f"{path}#{index}",
                    title=f"{topic}: {section}",
                    content=" ".join(s.format(**fill) for s in sentences),
                    chunk_metadata=_struct(metadata),
                )
            )
            line += lines
    return chunks


def _sentence(rng: random.Random, area: str) -> str:
    return rng.choice(DOCUMENT_SENTENCES).format(area=area.lower(), obj=rng.choice(TASK_OBJECTS))


def _sheet_row(rng: random.Random, sheet: str) -> list[Any]:
    columns, (low, high) = DOCUMENT_SHEETS[sheet]
    return [rng.choice(TASK_OBJECTS), rng.choice(FIRST_NAMES), *(rng.randint(low, high) for _ in columns[2:])]


def _slide(rng: random.Random, area: str) -> dict[str, Any]:
    return {"title": rng.choice(DOCUMENT_HEADINGS), "bullets": [_sentence(rng, area) for _ in range(rng.randint(1, 3))]}


def _document_content(rng: random.Random, kind: str, area: str) -> dict[str, Any]:
    """A new document's content as the editor of its kind keeps it: a Word document's sections
    of paragraphs, a workbook's sheets of rows, a deck's slides of bullets, else a text file."""
    if kind == "word":
        headings = rng.sample(DOCUMENT_HEADINGS, rng.randint(1, 3))
        return {"sections": [{"heading": h, "paragraphs": [_sentence(rng, area) for _ in range(rng.randint(1, 3))]} for h in headings]}
    if kind == "excel":
        sheets = rng.sample(list(DOCUMENT_SHEETS), rng.randint(1, 2))
        return {
            "sheets": [
                {"name": name, "columns": list(DOCUMENT_SHEETS[name][0]), "rows": [_sheet_row(rng, name) for _ in range(rng.randint(2, 5))]}
                for name in sheets
            ]
        }
    if kind == "powerpoint":
        return {"slides": [_slide(rng, area) for _ in range(rng.randint(2, 5))]}
    return {"format": "markdown", "text": "\n".join(_sentence(rng, area) for _ in range(rng.randint(1, 4)))}


def _grown(rng: random.Random, kind: str, content: dict[str, Any], area: str) -> dict[str, Any]:
    """A copy of content with one more paragraph, row, slide or line: an edit. Content only
    grows, so no state of a document repeats an earlier one and every edit makes a version."""
    grown = copy.deepcopy(content)
    if kind == "word":
        rng.choice(grown["sections"])["paragraphs"].append(_sentence(rng, area))
    elif kind == "excel":
        sheet = rng.choice(grown["sheets"])
        sheet["rows"].append(_sheet_row(rng, sheet["name"]))
    elif kind == "powerpoint":
        grown["slides"].append(_slide(rng, area))
    else:
        grown["text"] += "\n" + _sentence(rng, area)
    return grown


def _document_plan(rng: random.Random, index: int, users: Sequence[UserPlan]) -> DocumentPlan:
    """A document of an active user, shared with up to three others. The first one has every
    variety (shared at each level, edited by its owner and then by its edit-sharer, a version
    restored), the second is soft-deleted; then a mix: about three in five edited one to four
    times by their owner or edit-sharers, one in ten of those restored, one in ten deleted."""
    active = _active_users(users)
    owner = rng.choice(active)
    kind = _weighted(rng, DOCUMENT_KIND_WEIGHTS)
    area = rng.choice(PROJECT_AREAS)
    title = rng.choice(DOCUMENT_TITLES[kind]).format(area=area, obj=rng.choice(TASK_OBJECTS), quarter=rng.choice(DOCUMENT_QUARTERS))
    content = _document_content(rng, kind, area)
    message = kpb.Document(title=title, kind=DOCUMENT_KIND[kind], content=_struct(content))
    levels = ["edit", "view", "comment"] if index == 0 else [_weighted(rng, SHARE_LEVEL_WEIGHTS) for _ in range(rng.choice((0, 0, 1, 1, 2, 3)))]
    others = [u for u in active if u != owner]
    shares = tuple(zip(rng.sample(others, min(len(others), len(levels))), levels, strict=False))
    editors = [owner, *(user for user, level in shares if level == "edit")]
    if index == 0:
        by = editors[:2]
    else:
        by = [rng.choice(editors) for _ in range(rng.randint(1, 4))] if rng.random() < 0.6 else []
    edits: list[DocumentEdit] = []
    for editor in by:
        content = _grown(rng, kind, content, area)
        retitled = rng.random() < 0.3
        if retitled:
            title = message.title + rng.choice(DOCUMENT_RETITLES)
        edits.append(DocumentEdit(editor, title, _struct(content), ("title", "content") if retitled else ("content",)))
    restore = None
    if edits and (index == 0 or rng.random() < 0.1):
        restore = (rng.choice(editors), rng.randint(1, len(edits)))  # an earlier version: the current one is 1 + len(edits)
    deleted = index == 1 or (index > 1 and rng.random() < 0.1)
    return DocumentPlan(message, owner, shares, tuple(edits), restore, deleted)


# ------------------------------------------------------------------ steps


def _role_steps(existing: dict[str, str]) -> list[Step]:
    def known(name: str, role_id: str) -> Step:
        return Step("", lambda s, c, ids: ids.__setitem__(("role", name), role_id))

    def create(name: str) -> Step:
        request = ipb.CreateRoleRequest(role=ipb.Role(name=name, description=ROLES[name]))

        def run(session: Session, call: Call, ids: Ids) -> None:
            ids[("role", name)] = writes.create(session, identity.ROLES, request, call).id

        return Step("roles", run)

    return [known(name, existing[name]) if name in existing else create(name) for name in ROLES]


def _user_steps(users: Sequence[UserPlan]) -> list[Step]:
    def create(index: int, plan: UserPlan) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            user = writes.create(session, identity.USERS, ipb.CreateUserRequest(user=plan.message), call)
            if plan.verified:
                identity.verify_user_email(session, ipb.VerifyUserEmailRequest(id=user.id))
            ids[("user", index)] = user.id

        return Step("users", run)

    def assign(index: int, role: str) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            identity.assign_role(session, ipb.AssignRoleRequest(user_id=ids[("user", index)], role_id=ids[("role", role)]))

        return Step("role_assignments", run)

    return [step for i, plan in enumerate(users) for step in (create(i, plan), assign(i, plan.role))]


def _api_key_steps(users: Sequence[UserPlan], today: dt.date) -> list[Step]:
    """One CLI key per admin; the secret is returned once and dropped here."""

    def create(index: int, plan: UserPlan) -> Step:
        expire = timestamp_pb2.Timestamp()
        expire.FromDatetime(dt.datetime.combine(today + dt.timedelta(days=365), dt.time(), dt.UTC))

        def run(session: Session, call: Call, ids: Ids) -> None:
            key = ipb.ApiKey(
                name=f"{plan.message.username}-cli", role=plan.message.role, user_id=ids[("user", index)], expire_time=expire
            )
            writes.create(session, identity.API_KEYS, ipb.CreateApiKeyRequest(api_key=key), call)

        return Step("api_keys", run)

    return [create(i, plan) for i, plan in enumerate(users) if plan.role == "admin"]


def _project_steps(projects: Sequence[ProjectPlan]) -> list[Step]:
    def create(index: int, plan: ProjectPlan) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            message = wpb.Project()
            message.CopyFrom(plan.message)
            message.owner_id = ids[("user", plan.owner)]
            ids[("project", index)] = writes.create(session, work.PROJECTS, wpb.CreateProjectRequest(project=message), call).id

        return Step("projects", run)

    def member(index: int, user: int) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            request = wpb.AddProjectMemberRequest(project_id=ids[("project", index)], user_id=ids[("user", user)])
            work.add_project_member(session, request)

        return Step("project_members", run)

    steps: list[Step] = []
    for i, plan in enumerate(projects):
        steps.append(create(i, plan))
        steps.extend(member(i, user) for user in plan.members)
    return steps


def _task_steps(
    rng: random.Random, projects: Sequence[ProjectPlan], users: Sequence[UserPlan], per_project: int
) -> list[Step]:
    def create(p: int, t: int, message: wpb.Task, assignee: int | None, creator: int) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            task = wpb.Task()
            task.CopyFrom(message)
            task.project_id = ids[("project", p)]
            task.creator_id = ids[("user", creator)]
            if assignee is not None:
                task.assignee_id = ids[("user", assignee)]
            ids[("task", p, t)] = writes.create(session, work.TASKS, wpb.CreateTaskRequest(task=task), call).id

        return Step("tasks", run)

    def depend(p: int, t: int, on: int) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            request = wpb.AddTaskDependencyRequest(task_id=ids[("task", p, t)], depends_on_task_id=ids[("task", p, on)])
            work.add_task_dependency(session, request)

        return Step("task_dependencies", run)

    steps: list[Step] = []
    for p, project in enumerate(projects):
        workers = [m for m in project.members if users[m].role != "guest"]  # the owner at least
        statuses = [_weighted(rng, TASK_STATUS_WEIGHTS[project.status]) for _ in range(per_project)]
        for t, status in enumerate(statuses):
            message = _task_message(rng, project, status)
            assignee = rng.choice(workers) if rng.random() < 0.9 else None
            steps.append(create(p, t, message, assignee, rng.choice((project.owner, *workers))))
            steps.extend(depend(p, t, on) for on in _dependencies(rng, statuses, t))
    return steps


def _channel_steps(channels: Sequence[ChannelPlan]) -> list[Step]:
    def create(c: int, plan: ChannelPlan) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            channel = cpb.Channel()
            channel.CopyFrom(plan.message)
            channel.creator_id = ids[("user", plan.members[0])]
            if plan.project is not None:
                channel.project_id = ids[("project", plan.project)]
            ids[("channel", c)] = writes.create(session, chat.CHANNELS, cpb.CreateChannelRequest(channel=channel), call).id

        return Step("channels", run)

    def member(c: int, user: int) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            chat.add_channel_member(session, cpb.AddChannelMemberRequest(channel_id=ids[("channel", c)], user_id=ids[("user", user)]))

        return Step("channel_members", run)

    def post(c: int, m: int, line: ChatLine) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            message = cpb.ChatMessage(channel_id=ids[("channel", c)], author_id=ids[("user", line.author)], content=line.content)
            if line.parent is not None:
                message.parent_id = ids[("chat_message", c, line.parent)]
            request = cpb.CreateChatMessageRequest(chat_message=message)
            ids[("chat_message", c, m)] = writes.create(session, chat.CHAT_MESSAGES, request, call).id

        return Step("chat_messages", run)

    steps: list[Step] = []
    for c, plan in enumerate(channels):
        steps.append(create(c, plan))
        steps.extend(member(c, user) for user in plan.members)
        steps.extend(post(c, m, line) for m, line in enumerate(plan.lines))
    return steps


def _conversation_steps(conversations: Sequence[ConversationPlan]) -> list[Step]:
    def create(c: int, plan: ConversationPlan) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            conversation = cpb.Conversation(user_id=ids[("user", plan.user)], title=plan.title)
            request = cpb.CreateConversationRequest(conversation=conversation)
            ids[("conversation", c)] = writes.create(session, chat.CONVERSATIONS, request, call).id

        return Step("conversations", run)

    def say(c: int, turn: cpb.ConversationMessage) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            message = cpb.ConversationMessage()
            message.CopyFrom(turn)
            message.conversation_id = ids[("conversation", c)]
            writes.create(session, chat.CONVERSATION_MESSAGES, cpb.CreateConversationMessageRequest(conversation_message=message), call)

        return Step("conversation_messages", run)

    def archive(c: int) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            chat.archive_conversation(session, cpb.ArchiveConversationRequest(id=ids[("conversation", c)]))

        return Step("", run)

    steps: list[Step] = []
    for c, plan in enumerate(conversations):
        steps.append(create(c, plan))
        steps.extend(say(c, turn) for turn in plan.turns)
        if plan.archived:
            steps.append(archive(c))
    return steps


def _knowledge_steps(chunks: Sequence[kpb.KnowledgeChunk]) -> list[Step]:
    """Through UpsertKnowledgeChunk's path: a chunk whose key is stored already is replaced."""

    def upsert(chunk: kpb.KnowledgeChunk) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> str | None:
            request = kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=chunk)
            created = knowledge.upsert_knowledge_chunk(session, request, call).created
            return None if created else "knowledge_chunks_replaced"

        return Step("knowledge_chunks", run)

    return [upsert(chunk) for chunk in chunks]


def _acting_for(call: Call, ids: Ids, user: int) -> Call:
    """The seed's call made on behalf of a seeded user: what the engine stamps as the caller's
    (a new document's owner and last editor, the author of the state an edit leaves, who
    shared) is that user's."""
    return Call(
        request_id=call.request_id, method=call.method, dialect=call.dialect, actor_type=call.actor_type,
        actor_id=call.actor_id, role=call.role, actor_user_id=uuid.UUID(ids[("user", user)]),
    )


def _document_steps(plans: Sequence[DocumentPlan]) -> list[Step]:
    """Through the standard Create, Update and Delete and ShareDocument's and
    RestoreDocumentVersion's paths, each on behalf of a seeded user: the owner creates, shares
    and deletes, the plan's editors edit and restore, and the engine keeps every version."""

    def create(d: int, plan: DocumentPlan) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            document = kpb.Document()
            document.CopyFrom(plan.message)
            document.owner_id = ids[("user", plan.owner)]
            request = kpb.CreateDocumentRequest(document=document)
            ids[("document", d)] = writes.create(session, DOCUMENTS, request, _acting_for(call, ids, plan.owner)).id

        return Step("documents", run)

    def share(d: int, owner: int, user: int, level: str) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            request = kpb.ShareDocumentRequest(document_id=ids[("document", d)], user_id=ids[("user", user)], level=SHARE_LEVEL[level])
            share_document(session, request, _acting_for(call, ids, owner))

        return Step("document_shares", run)

    def edit(d: int, change: DocumentEdit) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            document = kpb.Document(id=ids[("document", d)], title=change.title, content=change.content)
            request = kpb.UpdateDocumentRequest(document=document, update_mask=field_mask_pb2.FieldMask(paths=list(change.paths)))
            writes.update(session, DOCUMENTS, request, _acting_for(call, ids, change.editor))

        return Step("document_versions", run)  # the state it leaves

    def restore(d: int, by: int, version: int) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            request = kpb.RestoreDocumentVersionRequest(document_id=ids[("document", d)], version=version)
            restore_document_version(session, request, _acting_for(call, ids, by))

        return Step("document_versions", run)  # the state it leaves

    def delete(d: int, owner: int) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            writes.delete(session, DOCUMENTS, kpb.DeleteDocumentRequest(id=ids[("document", d)]), _acting_for(call, ids, owner))

        return Step("", run)

    steps: list[Step] = []
    for d, plan in enumerate(plans):
        steps.append(create(d, plan))
        steps.extend(share(d, plan.owner, user, level) for user, level in plan.shares)
        steps.extend(edit(d, change) for change in plan.edits)
        if plan.restore is not None:
            steps.append(restore(d, *plan.restore))
        if plan.deleted:
            steps.append(delete(d, plan.owner))
    return steps


AI_MODULES = ("chat", "chat", "chat", "analysis", "tools", "search")
AI_MODELS = {"nexus-assistant-1": (2_500, 10_000), "nexus-assistant-2-preview": (7_500, 30_000), "embedder-small": (20, 0)}  # USD nanos per 1k tokens in, out
AI_STATUS_WEIGHTS = {"succeeded": 92, "failed": 5, "timed_out": 3}
AI_STATUS = {"succeeded": apb.AI_INTERACTION_STATUS_SUCCEEDED, "failed": apb.AI_INTERACTION_STATUS_FAILED, "timed_out": apb.AI_INTERACTION_STATUS_TIMED_OUT}
AI_PROMPTS = (
    "Summarise the open tasks of this project", "Draft a reply to the last message", "Which documents mention the release?",
    "Explain the failing build", "Translate this paragraph into German", "Suggest a title for this document",
)


@dataclass(frozen=True)
class AIInteractionPlan:
    user: int
    message: apb.AIInteraction  # without user_id: the user's own, made on their behalf


def _ai_interaction_plan(rng: random.Random, users: int, today: dt.date) -> AIInteractionPlan:
    """One call to a model in the thirty days before today, its cost from its tokens at the model's price."""
    model = rng.choice(sorted(AI_MODELS))
    price_in, price_out = AI_MODELS[model]
    status = _weighted(rng, AI_STATUS_WEIGHTS)
    prompt_tokens = rng.randint(20, 4000)
    completion_tokens = 0 if status != "succeeded" or not price_out else rng.randint(10, 1500)
    cost = (prompt_tokens * price_in + completion_tokens * price_out) // 1000
    when = dt.datetime.combine(today, dt.time(), dt.UTC) - dt.timedelta(seconds=rng.randrange(1, 30 * 86400))
    latency_ms = rng.randint(30000, 60000) if status == "timed_out" else rng.randint(80, 9000)
    message = apb.AIInteraction(
        module=rng.choice(AI_MODULES),
        model=model,
        prompt=rng.choice(AI_PROMPTS),
        response="" if status != "succeeded" else "Here is what I found.",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        cost=common_pb2.Money(currency_code="USD", units=cost // 1_000_000_000, nanos=cost % 1_000_000_000),
        latency=duration_pb2.Duration(seconds=latency_ms // 1000, nanos=latency_ms % 1000 * 1_000_000),
        status=AI_STATUS[status],
        error={"failed": "the model refused the request", "timed_out": "no answer within the deadline"}.get(status, ""),
        request_metadata=_struct({"client": rng.choice(CLIENTS)}),
    )
    message.request_time.FromDatetime(when)
    return AIInteractionPlan(rng.randrange(users), message)


def _ai_interaction_steps(plans: Sequence[AIInteractionPlan]) -> list[Step]:
    """Through the standard Create, each on behalf of its user (its owner)."""

    def create(plan: AIInteractionPlan) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            request = apb.CreateAIInteractionRequest(ai_interaction=plan.message)
            writes.create(session, ai_usage.AI_INTERACTIONS, request, _acting_for(call, ids, plan.user))

        return Step("ai_interactions", run)

    return [create(plan) for plan in plans]


# ------------------------------------------------------------------ AI jobs

ANALYSIS_TOPICS = ("churn by plan", "revenue by region", "support tickets by week", "sign-ups by channel", "task lead times")
ANALYSIS_TYPES = ("summary", "regression", "forecast", "clustering")
TOOL_PROMPTS = (
    ("python", "a parser of CSV invoices into JSON"), ("sql", "a query of the overdue tasks by project"),
    ("python", "a function that masks e-mail addresses"), ("javascript", "a date picker limited to working days"),
)
JOB_FINISHES = ("pending", "running", "completed", "failed")  # where a job is left, drawn per job
JOB_ERRORS = ("the model timed out", "the input file is not valid CSV", "out of memory on the worker")


def _job_steps(rng: random.Random, users: Sequence[UserPlan], analyses: int, generations: int, blobs: BlobStore | None) -> list[Step]:
    """Analyses and tool generations of active users, each left in a status (the first four of
    each in each status) through Start, Complete and Fail; an analysis's input file, and a
    completed one's output, uploaded to blobs when given."""
    active = _active_users(users) or list(range(len(users)))
    steps: list[Step] = []
    for a in range(analyses):
        owner, status = rng.choice(active), JOB_FINISHES[a] if a < 4 else rng.choice(JOB_FINISHES)
        topic = rng.choice(ANALYSIS_TOPICS)
        analysis = apb.DataAnalysis(title=f"{topic.capitalize()} ({a + 1})", analysis_type=rng.choice(ANALYSIS_TYPES),
                                   parameters=_struct({"period_days": rng.choice((7, 30, 90)), "segment": rng.choice(("all", "paid", "trial"))}))
        rows = [f"{topic.replace(' ', '_')},{rng.randint(1, 500)}" for _ in range(rng.randint(3, 8))]
        steps += _job_lifecycle(("analysis", a), ai_jobs.DATA_ANALYSES, analysis, owner, status, rng,
                                {"result": _struct({"rows": len(rows), "mean": round(rng.uniform(1, 500), 2)})})
        if blobs is not None:
            steps.append(_analysis_file(("analysis", a), owner, blobs, f"{topic} input.csv", "\n".join(rows).encode(), "input"))
            if status == "completed":
                steps.append(_analysis_file(("analysis", a), owner, blobs, f"{topic} summary.txt", f"{topic}: {len(rows)} rows".encode(), "output"))
    for g in range(generations):
        owner, status = rng.choice(active), JOB_FINISHES[g] if g < 4 else rng.choice(JOB_FINISHES)
        tool_type, prompt = rng.choice(TOOL_PROMPTS)
        generation = apb.ToolGeneration(prompt=f"Write {prompt}", tool_type=tool_type, specification=_struct({"tests": rng.random() < 0.5}))
        code = f"# {prompt}\ndef run(data):\n    return data\n"
        steps += _job_lifecycle(("generation", g), ai_jobs.TOOL_GENERATIONS, generation, owner, status, rng,
                                {"generated_code": code, "output": "1 function, 3 lines"})
    return steps


def _job_lifecycle(key: tuple[str, int], spec: Any, message: Any, owner: int, status: str, rng: random.Random, outcome: dict[str, Any]) -> list[Step]:
    """The job created for its owner, then moved by its lifecycle methods to status."""
    pb = sys.modules[spec.message.__module__]
    error = rng.choice(JOB_ERRORS)

    def create(session: Session, call: Call, ids: Ids) -> None:
        job = spec.message()
        job.CopyFrom(message)
        job.user_id = ids[("user", owner)]
        request = getattr(pb, f"Create{spec.name}Request")(**{spec.singular_field: job})
        ids[key] = writes.create(session, spec, request, _acting_for(call, ids, owner)).id

    def move(method: str, **fields: Any) -> Step:
        def run(session: Session, call: Call, ids: Ids) -> None:
            request = getattr(pb, f"{method.capitalize()}{spec.name}Request")(id=ids[key], **fields)
            ai_jobs.transition(session, spec, request, method, _acting_for(call, ids, owner))

        return Step("", run)

    steps = [Step(spec.table.name, create)]  # the count's kind: "data_analyses", "tool_generations"
    if status in ("running", "completed") or (status == "failed" and rng.random() < 0.5):
        steps.append(move(ai_jobs.START))
    if status == "completed":
        steps.append(move(ai_jobs.COMPLETE, **outcome))
    if status == "failed":
        steps.append(move(ai_jobs.FAIL, error=error))
    return steps


def _analysis_file(key: tuple[str, int], owner: int, blobs: BlobStore, name: str, data: bytes, role: str) -> Step:
    """A File of the analysis's owner, its bytes in blobs, linked to the analysis."""

    def run(session: Session, call: Call, ids: Ids) -> None:
        acting = _acting_for(call, ids, owner)
        stored = blobs.put([data])
        made = files.create_file(session, fpb.UploadFileMetadata(name=name, mime_type="text/plain"), stored, acting)
        link = apb.AnalysisFile(analysis_id=ids[key], file_id=made.id, role=apb.AnalysisFileRole.Value(f"ANALYSIS_FILE_ROLE_{role.upper()}"))
        writes.create(session, ai_jobs.ANALYSIS_FILES, apb.CreateAnalysisFileRequest(analysis_file=link), acting)

    return Step("analysis_files", run)


# ------------------------------------------------------------------ running


def _execute(database: Database, steps: Sequence[Step], progress: bool) -> dict[str, int]:
    """Run the steps in order, BATCH_STEPS rows per transaction, under one progress bar."""
    ids: Ids = {}
    call = Call(dialect=database.dialect)
    counts: Counter[str] = Counter()
    total = sum(1 for step in steps if step.kind)
    with tqdm(total=total, desc="seeding", unit="row", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(steps), BATCH_STEPS):
            batch = steps[start : start + BATCH_STEPS]
            done_before = bar.n

            def work_batch(session: Session, batch: Sequence[Step] = batch, done_before: float = done_before) -> list[str]:
                bar.n = done_before  # a retried transaction starts its rows again
                kinds = []
                for step in batch:
                    kinds.append(step.run(session, call, ids) or step.kind)
                    if step.kind:
                        bar.update(1)
                return kinds

            counts.update(kind for kind in database.run_sync(work_batch) if kind)
    return {kind: counts[kind] for kind in COUNT_KINDS}
