"""The permissions of Roles in authorisation, end to end on a real server (SQLite and PostgreSQL).

Every method has one permission (service/policy.py permission_for); the built-in roles hold
exactly what their level allows and cannot be changed; a custom Role holds the permissions it
was given (unknown ones refused); a caller whose user has Roles assigned may call a method only
when one of them holds its permission and its level allows it. A change of a role or of an
assignment holds from the next call, and open streams are re-authorised.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.work.v1 import work_pb2 as wpb

from service import policy
from service.server import DOMAIN_SERVICES
from tests.conftest import Client, connect, unique
from tests.support import expect_error, mask, new_channel, new_project, new_role, new_task, new_user
from tests.test_auth import call_empty
from tests.test_stream_access import ends_after_change, live
from tests.test_streams import EventReader, post

Code = grpc.StatusCode
SERVED = [(f"/{full}/{m.name}", m) for cls, _, full in DOMAIN_SERVICES for m in cls.service_descriptor.methods]
TASK_READS = {"GetTask", "ListTasks", "SearchTasks", "BatchGetTasks"}
TASK_WRITES = {"CreateTask", "UpdateTask", "DeleteTask", "UndeleteTask", "BatchCreateTasks", "AddTaskDependency", "RemoveTaskDependency"}


class Restricted:
    """A user of a level with Roles assigned, its API key (of the same level) and a client calling with it."""

    def __init__(self, admin: Client, roles: list[ipb.Role], level: int = ipb.USER_ROLE_USER) -> None:
        self.user = new_user(admin, role=level)
        for role in roles:
            admin.identity.AssignRole(ipb.AssignRoleRequest(user_id=self.user.id, role_id=role.id))
        key = admin.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("k"), role=level, user_id=self.user.id)))
        self.secret = key.secret
        self.c = connect(admin.backend, admin.database_url, admin.server, secret=key.secret)


@pytest.fixture
def restricted(client: Client) -> Iterator[Callable[..., Restricted]]:
    made: list[Restricted] = []

    def make(*permissions: str, roles: list[ipb.Role] | None = None, level: int = ipb.USER_ROLE_USER) -> Restricted:
        if roles is None:
            roles = [new_role(client, permissions=list(permissions))]
        made.append(Restricted(client, roles, level))
        return made[-1]

    yield make
    for r in made:
        r.c.channel.close()


def built_in(client: Client, name: str) -> ipb.Role:
    """The Role row of a built-in role, made when this database has none yet."""
    found = client.identity.ListRoles(ipb.ListRolesRequest(filter=f'name = "{name}"')).roles
    return found[0] if found else new_role(client, name=name)


def denied_for_lack_of(permission: str, fn: Callable[..., Any], *args: Any) -> None:
    err = expect_error(Code.PERMISSION_DENIED, fn, *args)
    assert err.info.reason == "ROLE_LACKS_PERMISSION", err.info.reason
    assert err.info.metadata["permission"] == permission


def member_project(client: Client, user: ipb.User) -> wpb.Project:
    project = new_project(client)
    client.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=user.id))
    return project


def test_a_role_with_only_task_reads_reads_tasks_and_nothing_else(client: Client, restricted: Callable[..., Restricted]) -> None:
    r = restricted("work.tasks.read")
    project = member_project(client, r.user)
    task = new_task(client, project)
    # Reads of tasks: allowed (the row rules still decide which rows).
    assert r.c.work.GetTask(wpb.GetTaskRequest(id=task.id)).id == task.id
    assert task.id in {t.id for t in r.c.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"')).tasks}
    assert r.c.work.BatchGetTasks(wpb.BatchGetTasksRequest(ids=[task.id])).tasks[0].id == task.id
    # Writes of tasks: refused, naming the permission, though the user's level allows them.
    denied_for_lack_of("work.tasks.write", r.c.work.CreateTask, wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="no")))
    denied_for_lack_of(
        "work.tasks.write", r.c.work.UpdateTask, wpb.UpdateTaskRequest(task=wpb.Task(id=task.id, title="no"), update_mask=mask("title"))
    )
    denied_for_lack_of("work.tasks.write", r.c.work.DeleteTask, wpb.DeleteTaskRequest(id=task.id))
    assert client.work.GetTask(wpb.GetTaskRequest(id=task.id)).title == task.title
    # Every method of every other family (and the task writes) is refused at the gate; the task
    # reads pass it (an empty request may be invalid, never refused for the role).
    metadata = [("authorization", f"Bearer {r.secret}")]
    channel = grpc.insecure_channel(client.address)
    try:
        for path, method in SERVED:
            code, reason = call_empty(channel, path, method, metadata)
            if policy.permission_for(path) == "work.tasks.read":
                assert method.name in TASK_READS
                assert code != Code.PERMISSION_DENIED, (path, reason)
                continue
            assert code == Code.PERMISSION_DENIED, (path, code)
            # Admin methods are refused for the level already; all others for the permission.
            expected = "ROLE_FORBIDS_METHOD" if policy.action_for(path) is policy.Action.ADMIN else "ROLE_LACKS_PERMISSION"
            assert reason == expected, (path, reason)
    finally:
        channel.close()
    assert {m.name for path, m in SERVED if policy.permission_for(path) == "work.tasks.write"} == TASK_WRITES


def test_the_built_in_roles_hold_their_levels_permissions_and_do_not_change(client: Client) -> None:
    catalog = policy.permission_catalog(path for path, _ in SERVED)
    guest = built_in(client, "guest")
    assert set(guest.permissions) == {p for p in catalog if p.endswith(".read")}
    assert set(built_in(client, "user").permissions) == set(built_in(client, "manager").permissions) == {
        p for p in catalog if not p.endswith(".admin")
    }
    assert set(built_in(client, "admin").permissions) == set(catalog)
    err = expect_error(
        Code.FAILED_PRECONDITION,
        client.identity.UpdateRole,
        ipb.UpdateRoleRequest(role=ipb.Role(id=guest.id, permissions=["work.tasks.read"]), update_mask=mask("permissions")),
    )
    assert err.info.reason == "BUILT_IN_ROLE"
    # A custom role does not take a built-in name with other permissions either.
    custom = new_role(client, permissions=["work.tasks.read"])
    err = expect_error(
        Code.FAILED_PRECONDITION, client.identity.UpdateRole, ipb.UpdateRoleRequest(role=ipb.Role(id=custom.id, name="guest"), update_mask=mask("name"))
    )
    assert err.info.reason in ("BUILT_IN_ROLE",)
    # Its description still changes, and its permissions stay its level's.
    changed = client.identity.UpdateRole(ipb.UpdateRoleRequest(role=ipb.Role(id=guest.id, description="readers"), update_mask=mask("description")))
    assert changed.description == "readers" and set(changed.permissions) == set(guest.permissions)


def test_an_assigned_built_in_role_narrows_and_never_widens(client: Client, restricted: Callable[..., Restricted]) -> None:
    # A user assigned the guest role reads, and writes nothing.
    reader = restricted(roles=[built_in(client, "guest")])
    project = member_project(client, reader.user)
    task = new_task(client, project)
    assert reader.c.work.GetTask(wpb.GetTaskRequest(id=task.id)).id == task.id
    denied_for_lack_of("work.tasks.write", reader.c.work.CreateTask, wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="no")))
    # A guest assigned the admin role is still a guest: its level caps what any role holds.
    guest = restricted(roles=[built_in(client, "admin")], level=ipb.USER_ROLE_GUEST)
    member_project(client, guest.user)
    err = expect_error(Code.PERMISSION_DENIED, guest.c.work.CreateTask, wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="no")))
    assert err.info.reason == "ROLE_FORBIDS_METHOD"
    assert guest.c.work.GetTask(wpb.GetTaskRequest(id=task.id)).id == task.id


def test_unknown_permissions_are_refused_when_a_role_is_written(client: Client) -> None:
    err = expect_error(
        Code.INVALID_ARGUMENT,
        client.identity.CreateRole,
        ipb.CreateRoleRequest(role=ipb.Role(name=unique("role"), permissions=["work.tasks.read", "tasks.read", "work.tasks.delete"])),
    )
    assert [v.field for v in err.violations] == ["role.permissions[1]", "role.permissions[2]"]
    assert {v.reason for v in err.violations} == {"UNKNOWN_PERMISSION"}
    role = new_role(client, permissions=["work.tasks.read"])
    err = expect_error(
        Code.INVALID_ARGUMENT,
        client.identity.UpdateRole,
        ipb.UpdateRoleRequest(role=ipb.Role(id=role.id, permissions=["work.tasks.read", "work.everything"]), update_mask=mask("permissions")),
    )
    assert err.violations[0].field == "role.permissions[1]"
    assert list(client.identity.GetRole(ipb.GetRoleRequest(id=role.id)).permissions) == ["work.tasks.read"]


def test_only_admins_write_roles(client: Client, restricted: Callable[..., Restricted]) -> None:
    """A role's permissions decide what its users may call: a user who could change them could
    give itself back what a role took away."""
    r = restricted(roles=[built_in(client, "user")])
    role = new_role(client, permissions=["work.tasks.read"])
    err = expect_error(
        Code.PERMISSION_DENIED,
        r.c.identity.UpdateRole,
        ipb.UpdateRoleRequest(role=ipb.Role(id=role.id, permissions=["work.tasks.read", "work.tasks.write"]), update_mask=mask("permissions")),
    )
    assert err.info.reason != "ROLE_LACKS_PERMISSION"  # the row rule refused it, not the gate
    expect_error(Code.PERMISSION_DENIED, r.c.identity.CreateRole, ipb.CreateRoleRequest(role=ipb.Role(name=unique("role"))))


def test_a_change_of_a_role_or_an_assignment_holds_from_the_next_call(client: Client, restricted: Callable[..., Restricted]) -> None:
    role = new_role(client, permissions=["work.tasks.read", "work.tasks.write"])
    r = restricted(roles=[role])
    project = member_project(client, r.user)

    def create() -> wpb.Task:
        return r.c.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(project_id=project.id, title="t")))

    create()
    client.identity.UpdateRole(ipb.UpdateRoleRequest(role=ipb.Role(id=role.id, permissions=["work.tasks.read"]), update_mask=mask("permissions")))
    denied_for_lack_of("work.tasks.write", create)
    client.identity.UpdateRole(
        ipb.UpdateRoleRequest(role=ipb.Role(id=role.id, permissions=["work.tasks.read", "work.tasks.write"]), update_mask=mask("permissions"))
    )
    create()
    # A second role adds what it holds; revoking the first leaves the second's alone.
    projects = new_role(client, permissions=["work.projects.read"])
    client.identity.AssignRole(ipb.AssignRoleRequest(user_id=r.user.id, role_id=projects.id))
    assert r.c.work.GetProject(wpb.GetProjectRequest(id=project.id)).id == project.id
    client.identity.RevokeRole(ipb.RevokeRoleRequest(user_id=r.user.id, role_id=role.id))
    denied_for_lack_of("work.tasks.read", r.c.work.ListTasks, wpb.ListTasksRequest())
    assert r.c.work.GetProject(wpb.GetProjectRequest(id=project.id)).id == project.id
    # No role assigned any more: the level alone decides again.
    client.identity.RevokeRole(ipb.RevokeRoleRequest(user_id=r.user.id, role_id=projects.id))
    create()
    # A role deleted is a role no longer assigned.
    client.identity.AssignRole(ipb.AssignRoleRequest(user_id=r.user.id, role_id=projects.id))
    denied_for_lack_of("work.tasks.write", create)
    client.identity.DeleteRole(ipb.DeleteRoleRequest(id=projects.id))
    create()


def test_an_open_stream_ends_when_its_role_loses_the_permission(client: Client, restricted: Callable[..., Restricted]) -> None:
    role = new_role(client, permissions=["chat.events.read", "chat.channels.read"])
    r = restricted(roles=[role])
    channel = new_channel(client)
    reader = EventReader(r.c.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
    live(reader, client, channel)
    ends_after_change(
        reader,
        lambda: client.identity.UpdateRole(
            ipb.UpdateRoleRequest(role=ipb.Role(id=role.id, permissions=["chat.channels.read"]), update_mask=mask("permissions"))
        ),
        lambda: post(client, channel, "after"),
        Code.PERMISSION_DENIED,
        "ROLE_LACKS_PERMISSION",
    )
    # A new stream is refused at once.
    again = EventReader(r.c.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
    assert again.done.wait(10)
    assert again.error is not None and again.error.code() == Code.PERMISSION_DENIED


def test_an_open_stream_ends_when_its_role_is_revoked_for_one_without_the_permission(
    client: Client, restricted: Callable[..., Restricted]
) -> None:
    streams = new_role(client, permissions=["chat.events.read"])
    other = new_role(client, permissions=["chat.channels.read"])
    r = restricted(roles=[streams, other])
    channel = new_channel(client)
    reader = EventReader(r.c.chat, cpb.StreamEventsRequest(channel_ids=[channel.id]))
    live(reader, client, channel)
    started = time.monotonic()
    ends_after_change(
        reader,
        lambda: client.identity.RevokeRole(ipb.RevokeRoleRequest(user_id=r.user.id, role_id=streams.id)),
        lambda: post(client, channel, "after"),
        Code.PERMISSION_DENIED,
        "ROLE_LACKS_PERMISSION",
    )
    assert time.monotonic() - started < 10
