"""member_ids filters of projects (work) and channels (chat): `member_ids:"<user id>"` is "the
projects (channels) this user is a member of", read through the link table and its index on
the user id, with the caller's row rules still applied; a bad id or operator is refused
INVALID_ARGUMENT naming the filter."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.work.v1 import work_pb2 as wpb
from sqlalchemy import Engine, create_engine, insert

from db.base import utcnow
from db.domains import chat, work
from db.domains.identity import User
from db.engine import statements
from tests.conftest import Client, connect, unique
from tests.support import expect_error, new_channel, new_project, new_user

Code = grpc.StatusCode


def _projects(c: Client, flt: str, word: str) -> list[str]:
    page = c.work.ListProjects(wpb.ListProjectsRequest(filter=f'name = "{word}*" AND ({flt})', page_size=1000))
    assert page.total_size == len(page.projects)
    return sorted(p.name for p in page.projects)


def _channels(c: Client, flt: str, word: str) -> list[str]:
    page = c.chat.ListChannels(cpb.ListChannelsRequest(filter=f'name = "{word}*" AND ({flt})', page_size=1000))
    assert page.total_size == len(page.channels)
    return sorted(ch.name for ch in page.channels)


def test_projects_by_member(client: Client) -> None:
    word = unique("pm")
    ann, bob = new_user(client), new_user(client)
    made = {name: new_project(client, name=f"{word} {name}") for name in ("a", "ab", "none")}
    for name, user in (("a", ann), ("ab", ann), ("ab", bob)):
        client.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=made[name].id, user_id=user.id))
    assert _projects(client, f'member_ids:"{ann.id}"', word) == [f"{word} a", f"{word} ab"]
    assert _projects(client, f'member_ids:"{ann.id}" AND member_ids:"{bob.id}"', word) == [f"{word} ab"]
    assert _projects(client, f'member_ids:"{bob.id}" OR member_ids:"{ann.id}"', word) == [f"{word} a", f"{word} ab"]
    assert _projects(client, f'NOT member_ids:"{ann.id}"', word) == [f"{word} none"]
    assert _projects(client, "member_ids:*", word) == [f"{word} a", f"{word} ab"]
    assert _projects(client, "NOT member_ids:*", word) == [f"{word} none"]
    # An owner is not a member: owner_id says who owns.
    owner = made["none"].owner_id
    assert _projects(client, f'member_ids:"{owner}"', word) == []
    assert _projects(client, f'owner_id = "{owner}" OR member_ids:"{owner}"', word) == [f"{word} none"]
    # The filter follows membership changes, and serves Search too.
    client.work.RemoveProjectMember(wpb.RemoveProjectMemberRequest(project_id=made["a"].id, user_id=ann.id))
    assert _projects(client, f'member_ids:"{ann.id}"', word) == [f"{word} ab"]
    hits = client.work.SearchProjects(wpb.SearchProjectsRequest(query=word, filter=f'member_ids:"{bob.id}"'))
    assert [h.project.id for h in hits.results] == [made["ab"].id]


@pytest.fixture
def user_client(client: Client) -> Iterator[tuple[ipb.User, Client]]:
    user = new_user(client)
    key = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=ipb.USER_ROLE_USER, user_id=user.id)))
    c = connect(client.backend, client.database_url, client.server, secret=key.secret)
    yield user, c
    c.channel.close()


def test_channels_by_member_keep_the_row_rules(client: Client, user_client: tuple[ipb.User, Client]) -> None:
    """Another user's memberships are filterable, but only among the channels the caller sees:
    a private channel it is not in stays hidden, as it is from every read."""
    word = unique("cm")
    me, c = user_client
    other = new_user(client)
    public = new_channel(client, name=f"{word} public")
    private = new_channel(client, name=f"{word} private", is_private=True)
    shared = new_channel(client, name=f"{word} shared", is_private=True)
    for channel, user in ((public, other), (private, other), (shared, other), (shared, me)):
        client.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=channel.id, user_id=user.id))
    everything = [f"{word} private", f"{word} public", f"{word} shared"]
    assert _channels(client, f'member_ids:"{other.id}"', word) == everything
    assert _channels(c, f'member_ids:"{other.id}"', word) == [f"{word} public", f"{word} shared"]
    assert _channels(c, f'member_ids:"{me.id}"', word) == [f"{word} shared"]
    assert _channels(c, f'NOT member_ids:"{me.id}"', word) == [f"{word} public"]
    # Projects: everyone sees every project, so the filter answers the same to all.
    project = new_project(client, name=f"{word} project")
    client.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=other.id))
    assert _projects(c, f'member_ids:"{other.id}"', word) == [f"{word} project"]


@pytest.mark.parametrize(
    ("flt", "reason"),
    [
        ('member_ids:"not-a-uuid"', "INVALID_FILTER_VALUE"),
        ("member_ids:42", "INVALID_FILTER_VALUE"),
        ("member_ids:abc", "INVALID_FILTER_VALUE"),
        ('member_ids:"0195f3a2-0000-7000-8000-*"', "INVALID_FILTER_VALUE"),
        ('member_ids = "0195f3a2-0000-7000-8000-000000000001"', "UNSUPPORTED_FILTER_OPERATOR"),
        ('member_ids != "0195f3a2-0000-7000-8000-000000000001"', "UNSUPPORTED_FILTER_OPERATOR"),
        ("member_ids = null", "UNSUPPORTED_FILTER_OPERATOR"),
        ('member_ids.x:"0195f3a2-0000-7000-8000-000000000001"', "UNKNOWN_FILTER_FIELD"),
    ],
)
def test_a_bad_member_filter_is_invalid_argument(client: Client, flt: str, reason: str) -> None:
    for call, request in (
        (client.work.ListProjects, wpb.ListProjectsRequest(filter=flt)),
        (client.chat.ListChannels, cpb.ListChannelsRequest(filter=flt)),
        (client.work.SearchProjects, wpb.SearchProjectsRequest(query="x", filter=flt)),
    ):
        err = expect_error(Code.INVALID_ARGUMENT, call, request)
        assert err.info.reason == reason and err.violations[0].field == "filter", (flt, err.message)


def test_an_unknown_user_id_matches_nothing(client: Client) -> None:
    page = client.work.ListProjects(wpb.ListProjectsRequest(filter=f'member_ids:"{uuid.uuid4()}"'))
    assert page.total_size == 0 and not page.projects


# ------------------------------------------------------------------ the index, at size

USERS, PROJECTS, MEMBERS_EACH = 400, 4000, 5


@pytest.fixture(scope="module")
def large(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Engine, uuid.UUID]]:
    """A database of its own, migrated, with PROJECTS projects and channels of MEMBERS_EACH
    members each among USERS users, and its statistics gathered: (engine, one member's id)."""
    from db import migrate
    from tests.databases import fresh_postgres_database

    def fill(url: str) -> Iterator[tuple[Engine, uuid.UUID]]:
        engine = create_engine(url)
        migrate.upgrade(engine)
        now = utcnow()
        users = [uuid.uuid4() for _ in range(USERS)]
        projects = [uuid.uuid4() for _ in range(PROJECTS)]
        with engine.begin() as conn:
            conn.execute(insert(User), [
                {"id": u, "username": f"u{i}", "email": f"u{i}@example.com", "role": "user", "is_active": True,
                 "create_time": now, "update_time": now, "revision": 1}
                for i, u in enumerate(users)
            ])
            base = {"create_time": now, "update_time": now, "revision": 1}
            conn.execute(insert(work.Project), [
                {**base, "id": p, "name": f"p{i}", "owner_id": users[0], "status": "active", "priority": "medium", "archived": False}
                for i, p in enumerate(projects)
            ])
            conn.execute(insert(chat.Channel), [{**base, "id": p, "name": f"c{i}", "is_private": False} for i, p in enumerate(projects)])
            links = [(p, users[(i * 7 + k * 13) % USERS]) for i, p in enumerate(projects) for k in range(MEMBERS_EACH)]
            conn.execute(insert(work.project_members), [{"project_id": p, "user_id": u, "create_time": now} for p, u in links])
            conn.execute(insert(chat.channel_members), [{"channel_id": p, "user_id": u, "create_time": now} for p, u in links])
        with engine.connect() as conn:
            conn.exec_driver_sql("ANALYZE")
            conn.commit()
        yield engine, users[1]
        engine.dispose()

    if database_url.startswith("sqlite"):
        yield from fill(f"sqlite:///{Path(tmp_path_factory.mktemp('members')) / 'members.db'}")
    else:
        with fresh_postgres_database("nexus_members") as url:
            yield from fill(url)


def _plan(engine: Engine, spec: Any, flt: str) -> str:
    """The database's plan of the List page statement the service runs for this filter (its
    values written in: this test's own filter, never a caller's text)."""
    dialect = engine.dialect.name
    shape, params = spec.filter_compiler(dialect).bind(flt)
    stmt, _ = statements.build_page_statements(spec, dialect, shape, False, "", None, 50, None)
    stmt = stmt.params(params)
    sql = str(stmt.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
    explain = "EXPLAIN QUERY PLAN " if dialect == "sqlite" else "EXPLAIN "
    with engine.connect() as conn:
        return "\n".join(str(row[-1]) for row in conn.exec_driver_sql(explain + sql))


@pytest.mark.parametrize(("resource", "index"), [("Project", "ix_project_members_user_id"), ("Channel", "ix_channel_members_user_id")])
def test_the_member_filter_reads_the_link_tables_index(large: tuple[Engine, uuid.UUID], resource: str, index: str) -> None:
    from db.engine.resource import REGISTRY

    engine, member = large
    spec = REGISTRY[resource]
    plan = _plan(engine, spec, f'member_ids:"{member}"')
    assert index in plan, plan
    # And the answer is right at that size: the rows the link table names.
    from sqlalchemy import select

    link = work.project_members if resource == "Project" else chat.channel_members
    parent = link.c.project_id if resource == "Project" else link.c.channel_id
    compiled = spec.filter_compiler(engine.dialect.name).compile(f'member_ids:"{member}"')
    with engine.connect() as conn:
        expected = set(conn.scalars(select(parent).where(link.c.user_id == member)))
        found = set(conn.scalars(select(spec.table.c.id).where(compiled)))
    assert found == expected and len(expected) == PROJECTS * MEMBERS_EACH // USERS
