"""Realistic sample data for the identity and work domains (`nexus-data seed`).

Every row goes through the code paths the API uses: the proto Create*Request messages and
`writes.create` with all its validation, and the domain functions for memberships, role
assignments, e-mail verification and task dependencies. A plan of steps is drawn from one random
generator first (deterministic when `rng_seed` is given, for a given database and day: dates are
relative to today), then run in transactions of BATCH_STEPS rows.

Seeding twice into the same database never collides: usernames and e-mails carry a number past
the users already stored, role rows that exist are reused, and API key names follow usernames.
"""
from __future__ import annotations

import datetime as dt
import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2
from nexus.common.v1 import common_pb2
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.work.v1 import work_pb2 as wpb
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session
from tqdm import tqdm

import db.domains  # noqa: F401 - the audit trail records seeded rows too
from db.database import Database
from db.domains import identity, work
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
)

ROLES: dict[str, tuple[str, list[str]]] = {
    "admin": (
        "Administers the platform: users, roles, keys and every project.",
        ["users.read", "users.write", "roles.read", "roles.write", "api_keys.read", "api_keys.write",
         "projects.read", "projects.write", "projects.delete", "tasks.read", "tasks.write", "tasks.delete"],
    ),
    "manager": (
        "Runs projects: members, plans and tasks of the projects it owns.",
        ["users.read", "projects.read", "projects.write", "tasks.read", "tasks.write", "tasks.delete"],
    ),
    "user": ("Works on tasks of the projects it is a member of.", ["users.read", "projects.read", "tasks.read", "tasks.write"]),
    "guest": ("Reads projects and tasks it is invited to.", ["projects.read", "tasks.read"]),
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

Ids = dict[Any, str]  # plan key, e.g. ("user", 3), -> id of the created resource
StepFn = Callable[[Session, Call, Ids], None]


@dataclass(frozen=True)
class Step:
    """One row to write: `kind` names the count it adds to."""

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


# ------------------------------------------------------------------ entry point


def seed(
    database: Database,
    *,
    users: int = 50,
    projects: int = 20,
    tasks_per_project: int = 25,
    progress: bool = True,
    rng_seed: int | None = None,
) -> dict[str, int]:
    """Write sample users, roles, API keys, projects, members, tasks and dependencies; return counts."""
    if min(users, projects, tasks_per_project) < 0:
        raise ValueError("users, projects and tasks_per_project must not be negative")
    if projects and not users:
        raise ValueError("projects need at least one user to own them")
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
    emails = [f"{name}@{domain}" for name, (_, _, domain) in zip(names, stems)]
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
    preferences = struct_pb2.Struct()
    preferences.update(
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


# ------------------------------------------------------------------ steps


def _role_steps(existing: dict[str, str]) -> list[Step]:
    def known(name: str, role_id: str) -> Step:
        return Step("", lambda s, c, ids: ids.__setitem__(("role", name), role_id))

    def create(name: str) -> Step:
        description, permissions = ROLES[name]
        request = ipb.CreateRoleRequest(role=ipb.Role(name=name, description=description, permissions=permissions))

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
        expire.FromDatetime(dt.datetime.combine(today + dt.timedelta(days=365), dt.time(), dt.timezone.utc))

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

            def work_batch(session: Session, batch: Sequence[Step] = batch, done_before: int = done_before) -> None:
                bar.n = done_before  # a retried transaction starts its rows again
                for step in batch:
                    step.run(session, call, ids)
                    if step.kind:
                        bar.update(1)

            database.run_sync(work_batch)
            counts.update(step.kind for step in batch if step.kind)
    return {kind: counts[kind] for kind in COUNT_KINDS}
