"""The read path (Core rows, relations loaded per page or joined) answers exactly what the write
path (mapped instances) answered, for every resource with a relation, in every read method."""
from __future__ import annotations

from nexus.chat.v1 import chat_pb2 as cpb
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.work.v1 import work_pb2 as wpb

from tests.conftest import Client, unique
from tests.support import new_channel, new_project, new_role, new_task, new_user


def test_user_roles_read_back_in_name_order(client: Client) -> None:
    tag = unique("rp")
    user = new_user(client, full_name=f"Reader {tag}")
    # Created out of name order: role_names are ordered by name on every path.
    for name in (f"zz{tag}", f"aa{tag}", f"mm{tag}"):
        written = client.identity.AssignRole(ipb.AssignRoleRequest(user_id=user.id, role_id=new_role(client, name=name).id))
    assert list(written.role_names) == [f"aa{tag}", f"mm{tag}", f"zz{tag}"]
    bare = new_user(client, full_name=f"Reader {tag}")

    assert client.identity.GetUser(ipb.GetUserRequest(id=user.id)) == written
    assert list(client.identity.BatchGetUsers(ipb.BatchGetUsersRequest(ids=[bare.id, user.id])).users) == [bare, written]
    listed = client.identity.ListUsers(ipb.ListUsersRequest(filter=f'full_name = "Reader {tag}"', page_size=1))
    assert list(listed.users) == [written] and listed.total_size == 2
    second = client.identity.ListUsers(ipb.ListUsersRequest(filter=f'full_name = "Reader {tag}"', page_size=1, page_token=listed.next_page_token))
    assert list(second.users) == [bare]
    found = client.identity.SearchUsers(ipb.SearchUsersRequest(query=tag))
    assert sorted((r.user for r in found.results), key=lambda u: u.id) == sorted([written, bare], key=lambda u: u.id)


def test_project_members_task_dependencies_and_channel_members_read_back(client: Client) -> None:
    project = new_project(client)
    users = [new_user(client) for _ in range(3)]
    for user in users:
        project = client.work.AddProjectMember(wpb.AddProjectMemberRequest(project_id=project.id, user_id=user.id))
    assert sorted(project.member_ids) == list(project.member_ids) and len(project.member_ids) == 3
    assert client.work.GetProject(wpb.GetProjectRequest(id=project.id)) == project
    assert list(client.work.ListProjects(wpb.ListProjectsRequest(filter=f'id = "{project.id}"')).projects) == [project]

    first, second, waiting, alone = (new_task(client, project) for _ in range(4))
    client.work.AddTaskDependency(wpb.AddTaskDependencyRequest(task_id=waiting.id, depends_on_task_id=second.id))
    waiting = client.work.AddTaskDependency(wpb.AddTaskDependencyRequest(task_id=waiting.id, depends_on_task_id=first.id))
    assert sorted(waiting.dependency_ids) == list(waiting.dependency_ids) == sorted([first.id, second.id])
    assert client.work.GetTask(wpb.GetTaskRequest(id=waiting.id)) == waiting
    page = client.work.ListTasks(wpb.ListTasksRequest(filter=f'project_id = "{project.id}"', page_size=10))
    by_id = {t.id: t for t in page.tasks}
    assert by_id[waiting.id] == waiting and list(by_id[alone.id].dependency_ids) == []
    assert page.total_size == 4

    channel = new_channel(client)
    for user in users:
        channel = client.chat.AddChannelMember(cpb.AddChannelMemberRequest(channel_id=channel.id, user_id=user.id))
    assert len(channel.member_ids) == 3
    assert client.chat.GetChannel(cpb.GetChannelRequest(id=channel.id)) == channel
