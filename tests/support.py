"""Test helpers: reading rich errors, and a valid sample of every registered resource."""
from __future__ import annotations

import asyncio
import datetime as dt
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2, struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from nexus.ai.v1 import ai_pb2 as apb
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.common.v1 import common_pb2
from nexus.files.v1 import files_pb2 as fpb
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.knowledge.v1 import knowledge_pb2 as kpb
from nexus.mail.v1 import mail_pb2 as mpb
from nexus.work.v1 import work_pb2 as wpb

import db.domains  # noqa: F401 - every resource in the registry
from db.blobs import Stored
from db.domains import files
from db.engine import writes
from db.engine.call import Call
from db.engine.resource import REGISTRY, ResourceSpec
from tests.conftest import Client, close_loop, unique

# Every writable resource: the generic suites make its rows somehow (make_row), by its Create
# RPC or, for one without Create, as its Sample says (a File: by an upload).
MADE = sorted((s for s in REGISTRY if not s.read_only), key=lambda s: s.name)
# Those made by their Create RPC: the ones a test whose subject is Create or BatchCreate itself
# (its request id, its missing fields, its refusals) can walk.
MADE_BY_CREATE = [s for s in MADE if s.create_rpc]
# Those with an Update RPC (a record, an AIInteraction, has none): the tests of Update walk them.
UPDATED = [s for s in MADE if s.update_rpc]


def run_async(coro: Any) -> Any:
    """coro run to its end on a loop of its own. Unlike asyncio.run, it leaves the main thread's
    event loop setting alone: code that builds a grpc.aio server outside a running loop (as
    some tests do) still finds one."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        close_loop(loop)


@dataclass
class RichError:
    code: grpc.StatusCode
    message: str
    info: error_details_pb2.ErrorInfo
    violations: list[error_details_pb2.BadRequest.FieldViolation]
    resource: error_details_pb2.ResourceInfo | None
    error_info_count: int


def rich_error(exc: grpc.RpcError) -> RichError:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None, f"no google.rpc.Status in {exc.code()}: {exc.details()}"
    infos, violations, resource = [], [], None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            infos.append(info)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend(bad.field_violations)
        elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
            resource = error_details_pb2.ResourceInfo()
            detail.Unpack(resource)
    assert infos, "every error carries an ErrorInfo"
    return RichError(exc.code(), status.message, infos[0], violations, resource, len(infos))


def expect_error(code: grpc.StatusCode, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> RichError:
    """Call fn, assert it fails with `code` and a well-formed google.rpc.Status; return the details."""
    with pytest.raises(grpc.RpcError) as caught:
        fn(*args, **kwargs)
    err = rich_error(caught.value)
    assert err.code == code, f"expected {code}, got {err.code}: {err.message}"
    assert err.error_info_count == 1
    assert err.info.domain == "nexus"
    assert err.info.reason and err.info.reason == err.info.reason.upper()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert err.violations, "INVALID_ARGUMENT carries BadRequest field violations"
    if code == grpc.StatusCode.NOT_FOUND:
        assert err.resource is not None, "NOT_FOUND carries ResourceInfo"
    return err


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


# ------------------------------------------------------------------ samples per resource


def service_of(resource: str) -> str:
    """Full name of the service that serves a resource."""
    from service.server import DOMAIN_SERVICES

    for cls, _, full_name in DOMAIN_SERVICES:
        if any(spec.name == resource for spec in cls.resources):
            return full_name
    raise KeyError(resource)


def new_user(c: Client, **fields: Any) -> ipb.User:
    name = unique("u")
    values: dict[str, Any] = {"username": name, "email": f"{name}@example.com", "full_name": f"User {name}"}
    values.update(fields)
    return c.identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(**values)))


def new_role(c: Client, **fields: Any) -> ipb.Role:
    values: dict[str, Any] = {"name": unique("role")}
    values.update(fields)
    return c.identity.CreateRole(ipb.CreateRoleRequest(role=ipb.Role(**values)))


def new_project(c: Client, owner: ipb.User | None = None, **fields: Any) -> wpb.Project:
    owner = owner or new_user(c)
    values: dict[str, Any] = {"name": f"Project {unique()}", "owner_id": owner.id}
    values.update(fields)
    return c.work.CreateProject(wpb.CreateProjectRequest(project=wpb.Project(**values)))


def new_task(c: Client, project: wpb.Project | None = None, **fields: Any) -> wpb.Task:
    project = project or new_project(c)
    values: dict[str, Any] = {"project_id": project.id, "title": f"Task {unique()}"}
    values.update(fields)
    return c.work.CreateTask(wpb.CreateTaskRequest(task=wpb.Task(**values)))


def new_channel(c: Client, **fields: Any) -> cpb.Channel:
    values: dict[str, Any] = {"name": f"channel {unique()}"}
    values.update(fields)
    return c.chat.CreateChannel(cpb.CreateChannelRequest(channel=cpb.Channel(**values)))


def new_file(c: Client, data: bytes = b"some bytes", **metadata: Any) -> fpb.File:
    """A File uploaded by the client (private unless is_public=True)."""
    values: dict[str, Any] = {"name": f"{unique('file')}.txt", "mime_type": "text/plain"}
    values.update(metadata)
    parts = [fpb.UploadFileRequest(metadata=fpb.UploadFileMetadata(**values)), fpb.UploadFileRequest(chunk=data)]
    return c.files.UploadFile(iter(parts))


def new_data_analysis(c: Client, **fields: Any) -> apb.DataAnalysis:
    values: dict[str, Any] = {"title": f"analysis {unique()}", "analysis_type": "summary"}
    values.update(fields)
    return c.ai.CreateDataAnalysis(apb.CreateDataAnalysisRequest(data_analysis=apb.DataAnalysis(**values)))


def new_conversation(c: Client, **fields: Any) -> cpb.Conversation:
    values: dict[str, Any] = {"title": f"conversation {unique()}", "user_id": new_user(c).id}
    values.update(fields)
    return c.chat.CreateConversation(cpb.CreateConversationRequest(conversation=cpb.Conversation(**values)))


@dataclass
class Sample:
    """How the generic tests make and change one resource."""

    service: str
    # message fields for a valid new resource whose searchable text contains `word`
    fields: Callable[[Client, str], dict[str, Any]]
    # (field, value) an update changes; None for a resource without Update (a record)
    change: tuple[str, Any] | None
    # a filter that matches exactly the resources made with `word`
    filter_for: Callable[[str], str]
    # fields that make a row visible to fewer callers (tests/test_access_matrix.py tries both)
    restricted: dict[str, Any] = field(default_factory=dict)
    # Rights a row's owner can give another user (tests/test_access_matrix.py makes a row for
    # each, given to the caller): name -> (give(admin client, row, user id), what a user or
    # manager given it may do: (see, change, delete)).
    grants: dict[str, tuple[Callable[[Client, Any, str], Any], tuple[bool, bool, bool]]] = field(default_factory=dict)
    # For a resource without a Create RPC (ResourceSpec.create_rpc False): why, and how its rows
    # are made instead: make(client, fields, request_id) -> the new row, made by the client's
    # caller from the sample's fields (make_row); write(client, message) -> the engine write
    # (session, call) -> row that makes the same row in a unit of work of a test's own (engine_create).
    without_create: str = ""
    make: Callable[[Client, dict[str, Any], str], Any] | None = None
    write: Callable[[Client, Any], Callable[[Any, Call], Any]] | None = None


def _user_fields(c: Client, word: str) -> dict[str, Any]:
    return {
        "username": word,
        "email": f"{word}@example.com",
        "full_name": f"{word} Person",
        "preferences": struct_pb2.Struct(fields={"theme": struct_pb2.Value(string_value="dark")}),
        "password": "correct horse battery",
    }


def _project_fields(c: Client, word: str) -> dict[str, Any]:
    return {
        "name": f"{word} project",
        "description": "a sample project",
        "owner_id": new_user(c).id,
        "start_date": common_pb2.Date(year=2026, month=1, day=1),
        "end_date": common_pb2.Date(year=2026, month=12, day=31),
        "budget": common_pb2.Money(currency_code="EUR", units=1000, nanos=500_000_000),
    }


def _task_fields(c: Client, word: str) -> dict[str, Any]:
    return {
        "project_id": new_project(c).id,
        "title": f"{word} task",
        "description": "a sample task",
        "estimated_hours": 3.5,
        "tags": ["sample", word],
        "due_date": common_pb2.Date(year=2026, month=6, day=1),
    }


SAMPLES: dict[str, Sample] = {
    "User": Sample("nexus.identity.v1.IdentityService", _user_fields, ("full_name", "Changed Name"), lambda w: f'username = "{w}"'),
    "Role": Sample(
        "nexus.identity.v1.IdentityService",
        lambda c, w: {"name": w, "description": f"{w} role", "permissions": ["work.tasks.read"]},
        ("description", "changed description"),
        lambda w: f'name = "{w}"',
    ),
    "ApiKey": Sample(
        "nexus.identity.v1.IdentityService",
        lambda c, w: {"name": w, "role": ipb.USER_ROLE_GUEST, "expire_time": _future()},  # any owner may hold it
        ("name", None),  # None: a fresh unique value
        lambda w: f'name = "{w}"',
    ),
    "Project": Sample("nexus.work.v1.WorkService", _project_fields, ("description", "changed description"), lambda w: f'name = "{w} project"'),
    "Task": Sample("nexus.work.v1.WorkService", _task_fields, ("title", None), lambda w: f'tags:"{w}"'),
    "Channel": Sample(
        "nexus.chat.v1.ChatService",
        lambda c, w: {"name": f"{w} channel", "description": "a sample channel", "project_id": new_project(c).id},
        ("description", "changed description"),
        lambda w: f'name = "{w} channel"',
        restricted={"is_private": True},
    ),
    "ChatMessage": Sample(
        "nexus.chat.v1.ChatService",
        lambda c, w: {
            "channel_id": new_channel(c).id,
            "author_id": new_user(c).id,
            "content": f"{w} says hello",
            "attachments": [cpb.Attachment(name="a.png", url="https://files.example.com/a.png", mime_type="image/png", size_bytes=10)],
        },
        ("content", None),
        lambda w: f'content = "{w} says hello"',
    ),
    "Conversation": Sample(
        "nexus.chat.v1.ChatService",
        lambda c, w: {"title": f"{w} conversation", "user_id": new_user(c).id},
        ("title", None),
        lambda w: f'title = "{w} conversation"',
        # Without a user (made by an admin acting for none): admins' alone.
        restricted={"user_id": ""},
    ),
    "ConversationMessage": Sample(
        "nexus.chat.v1.ChatService",
        lambda c, w: {
            "conversation_id": new_conversation(c).id,
            "sender_type": cpb.SENDER_TYPE_USER,
            "content": f"{w} asks a question",
            "role_metadata": struct_pb2.Struct(fields={"tokens": struct_pb2.Value(number_value=12)}),
        },
        ("content", None),
        lambda w: f'content = "{w} asks a question"',
    ),
    "KnowledgeChunk": Sample(
        "nexus.knowledge.v1.KnowledgeService",
        lambda c, w: {
            "source": "docs",
            "external_id": f"guide.md#{unique(w)}",  # the key: one per chunk, even of one word
            "title": f"{w} installation",
            "content": f"How to install {w}: run the installer, then sign in.",
            "chunk_metadata": struct_pb2.Struct(fields={"lang": struct_pb2.Value(string_value="en")}),
        },
        ("title", None),
        lambda w: f'title = "{w} installation"',
    ),
    "Document": Sample(
        "nexus.knowledge.v1.KnowledgeService",
        lambda c, w: {
            "title": f"{w} quarterly report",
            "kind": kpb.DOCUMENT_KIND_WORD,
            "content": struct_pb2.Struct(fields={"body": struct_pb2.Value(string_value="Revenue grew.")}),
            "owner_id": new_user(c).id,
        },
        ("title", None),
        lambda w: f'title = "{w} quarterly report"',
        grants={
            "shared to view": (lambda c, row, user_id: _share(c, row, user_id, kpb.DOCUMENT_SHARE_LEVEL_VIEW), (True, False, False)),
            "shared to comment": (lambda c, row, user_id: _share(c, row, user_id, kpb.DOCUMENT_SHARE_LEVEL_COMMENT), (True, False, False)),
            "shared to edit": (lambda c, row, user_id: _share(c, row, user_id, kpb.DOCUMENT_SHARE_LEVEL_EDIT), (True, True, False)),
        },
    ),
    "File": Sample(
        "nexus.files.v1.FileService",
        lambda c, w: {"name": f"{w} notes.txt", "mime_type": "text/plain", "is_public": True},
        ("mime_type", None),
        lambda w: f'name = "{w} notes.txt"',
        restricted={"is_public": False},
        without_create="a File is made only by UploadFile, a client stream of its bytes",
        make=lambda c, fields, request_id: _upload(c, fields, request_id),
        write=lambda c, file: _upload_write(c, file),
    ),
    "Email": Sample(
        "nexus.mail.v1.MailService",
        lambda c, w: {
            "sender_id": new_user(c).id,
            "to": ["ann@example.com"],
            "bcc": ["boss@example.com"],
            "subject": f"{w} meeting notes",
            "body": "See you at noon in the small room.",
            "attachments": [new_file(c).id],
        },
        ("subject", None),
        lambda w: f'subject = "{w} meeting notes"',
        grants={"sent to them": (lambda c, row, user_id: _send_to(c, row, user_id), (True, False, False))},
    ),
    "AIInteraction": Sample(
        "nexus.ai.v1.AIService",
        lambda c, w: {
            "user_id": new_user(c).id,
            "module": "chat",
            "model": "gpt-4o",
            "prompt": f"{w} asks for a summary",
            "response": "Here is the summary you asked for.",
            "prompt_tokens": 120,
            "completion_tokens": 30,
            "cost": common_pb2.Money(currency_code="USD", units=0, nanos=4_500_000),
            "latency": duration_pb2.Duration(seconds=1, nanos=250_000_000),
            "status": apb.AI_INTERACTION_STATUS_SUCCEEDED,
            "request_metadata": struct_pb2.Struct(fields={"temperature": struct_pb2.Value(number_value=0.2)}),
        },
        None,  # a record: no Update
        lambda w: f'prompt = "{w} asks for a summary"',
    ),
    "DataAnalysis": Sample(
        "nexus.ai.v1.AIService",
        lambda c, w: {
            "user_id": new_user(c).id,
            "title": f"{w} churn analysis",
            "analysis_type": "regression",
            "parameters": struct_pb2.Struct(fields={"target": struct_pb2.Value(string_value="churned")}),
        },
        ("title", None),
        lambda w: f'title = "{w} churn analysis"',
    ),
    "AnalysisFile": Sample(
        "nexus.ai.v1.AIService",
        lambda c, w: {
            "analysis_id": new_data_analysis(c, user_id=new_user(c).id).id,
            "file_id": new_file(c, is_public=True).id,
            "role": apb.ANALYSIS_FILE_ROLE_OUTPUT,
            "description": f"{w} figures",
        },
        ("description", None),
        lambda w: f'description = "{w} figures"',
    ),
    "ToolGeneration": Sample(
        "nexus.ai.v1.AIService",
        lambda c, w: {
            "user_id": new_user(c).id,
            "prompt": f"{w} parser for invoices",
            "tool_type": "python",
            "specification": struct_pb2.Struct(fields={"input": struct_pb2.Value(string_value="csv")}),
        },
        ("prompt", None),
        lambda w: f'prompt = "{w} parser for invoices"',
    ),
}


def make_row(c: Client, spec: ResourceSpec, fields: dict[str, Any], request_id: str = "") -> Any:
    """A new row of spec with fields, made by the caller of c the one way its resource is made:
    by its Create RPC, or by its sample's make (a File: by an upload)."""
    sample = SAMPLES[spec.name]
    if sample.make is not None:
        return sample.make(c, fields, request_id)
    pb = sys.modules[spec.message.__module__]
    request = getattr(pb, f"Create{spec.name}Request")(**{spec.singular_field: spec.message(**fields)}, request_id=request_id)
    return getattr(c.stub_for(sample.service), f"Create{spec.name}")(request)


def engine_create(c: Client, spec: ResourceSpec, message: Any) -> Callable[[Any, Call], Any]:
    """The engine write (session, call) -> row that makes a row of spec from message as make_row
    would, for a test that runs it in a unit of work of its own: the Create's writes.create, or
    the write of the sample's make (a File: the row of an upload, its bytes already stored)."""
    sample = SAMPLES[spec.name]
    if sample.write is not None:
        return sample.write(c, message)
    pb = sys.modules[spec.message.__module__]
    request = getattr(pb, f"Create{spec.name}Request")(**{spec.singular_field: message})
    return lambda session, call: writes.create(session, spec, request, call)


_UPLOADED = frozenset(fpb.UploadFileMetadata.DESCRIPTOR.fields_by_name)


def _upload(c: Client, fields: dict[str, Any], request_id: str) -> fpb.File:
    """A File uploaded by the caller of c with the fields its metadata carries; the others (an
    owner_id, an admin's to name) set by an Update after it."""
    carried = {k: v for k, v in fields.items() if k in _UPLOADED}
    made = new_file(c, **carried, request_id=request_id)
    rest = {k: v for k, v in fields.items() if k not in carried}
    if rest:
        patch = fpb.File(id=made.id, **rest)
        made = c.files.UpdateFile(fpb.UpdateFileRequest(file=patch, update_mask=mask(*rest)))
    return made


def _upload_write(c: Client, file: fpb.File) -> Callable[[Any, Call], fpb.File]:
    """The row an upload of file's metadata writes once its bytes are stored (those of a File
    uploaded first, so the blob store holds them)."""
    stored = new_file(c)
    metadata = fpb.UploadFileMetadata(name=file.name, mime_type=file.mime_type, is_public=file.is_public)
    return lambda session, call: files.create_file(session, metadata, Stored(stored.sha256, stored.size_bytes), call)


def _send_to(c: Client, email: Any, user_id: str) -> Any:
    """The draft addressed to the user and sent."""
    c.mail.UpdateEmail(mpb.UpdateEmailRequest(email=mpb.Email(id=email.id, to_user_ids=[user_id]), update_mask={"paths": ["to_user_ids"]}))
    return c.mail.SendEmail(mpb.SendEmailRequest(id=email.id))


def _share(c: Client, document: Any, user_id: str, level: int) -> Any:
    return c.knowledge.ShareDocument(kpb.ShareDocumentRequest(document_id=document.id, user_id=user_id, level=level))


def _future() -> Any:
    from google.protobuf import timestamp_pb2

    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(dt.datetime.now(dt.UTC) + dt.timedelta(days=30))
    return ts
