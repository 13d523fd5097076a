"""`nexus-data seed`: the real CLI in a subprocess, then the seeded data read back through the API.

Each backend gets its own fresh database (the seed's exact counts would be blurred by what the
other suites write into the shared session database); a server runs on it before the seed, so
totals are asserted as growth, and keeps running while the CLI writes.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from nexus.ai.v1 import ai_pb2 as apb
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.knowledge.v1 import knowledge_pb2 as kpb
from nexus.work.v1 import work_pb2 as wpb
from sqlalchemy import func, select

from db import migrate, seed
from db.database import Database
from db.domains.ai_usage import AIInteraction
from db.domains.chat import Channel, ChatMessage, Conversation, ConversationMessage
from db.domains.documents import Document, DocumentShare, DocumentVersion
from db.domains.identity import User
from db.domains.knowledge import KnowledgeChunk
from db.domains.work import Project, Task
from db.unit import SESSION_READ
from tests.conftest import Client, ServerThread, blob_dir_of, connect, make_config
from tests.databases import fresh_postgres_database

REPO = Path(__file__).resolve().parents[1]
NEXUS_DATA = Path(sys.executable).parent / "nexus-data"
USERS, PROJECTS, TASKS = 12, 3, 5
CHANNELS, MESSAGES, CONVERSATIONS, TURNS, CHUNKS, DOCUMENTS = 4, 6, 5, 5, 24, 8
AI_INTERACTIONS = 15
SIZE_ARGS = [
    "--users", str(USERS), "--projects", str(PROJECTS), "--tasks", str(TASKS),
    "--channels", str(CHANNELS), "--messages", str(MESSAGES),
    "--conversations", str(CONVERSATIONS), "--turns", str(TURNS), "--chunks", str(CHUNKS), "--documents", str(DOCUMENTS),
    "--ai-interactions", str(AI_INTERACTIONS),
]
COUNTS_LINE = re.compile(r"^(\d+ [a-z_]+)(, \d+ [a-z_]+)*$")


def run_seed(url: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DB_HOST", "DB_PATH")}
    env["NEXUS_BLOB_DIR"] = str(blob_dir_of(url))  # the test servers' store of the database (never the repository's data/)
    return subprocess.run(
        [str(NEXUS_DATA), "seed", *args, "--database-url", url],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def parse_counts(stdout: str) -> dict[str, int]:
    """The CLI's last line: "12 users, 4 roles, ..." -> {"users": 12, "roles": 4, ...}."""
    line = stdout.strip().splitlines()[-1]
    assert COUNTS_LINE.match(line), f"not a counts line: {line!r}"
    pairs = (item.split(" ", 1) for item in line.split(", "))
    return {name: int(n) for n, name in pairs}


@contextlib.contextmanager
def fresh_database(backend: str, tmp: Path) -> Iterator[str]:
    if backend == "postgresql":
        with fresh_postgres_database("nexus_seed") as url:
            yield url
    else:
        yield f"sqlite:///{tmp / 'seed.db'}"


def backend_of(url: str) -> str:
    return "postgresql" if url.startswith("postgresql") else "sqlite"


def list_all(method: Any, request_type: Any, items: str, **fields: Any) -> list[Any]:
    out: list[Any] = []
    token = ""
    while True:
        response = method(request_type(page_size=1000, page_token=token, **fields))
        out.extend(getattr(response, items))
        token = response.next_page_token
        if not token:
            return out


def all_documents(c: Client) -> list[kpb.Document]:
    return list_all(c.knowledge.ListDocuments, kpb.ListDocumentsRequest, "documents", order_by="create_time", show_deleted=True)


def per_document(c: Client, documents: list[kpb.Document], method: str, request_type: Any, items: str) -> dict[str, list[Any]]:
    """A document's versions or shares, listed per document as the API serves them."""
    return {d.id: list_all(getattr(c.knowledge, method), request_type, items, document_id=d.id) for d in documents}


def totals(c: Client) -> dict[str, int]:
    documents = all_documents(c)
    versions = per_document(c, documents, "ListDocumentVersions", kpb.ListDocumentVersionsRequest, "document_versions")
    shares = per_document(c, documents, "ListDocumentShares", kpb.ListDocumentSharesRequest, "document_shares")
    return {
        "users": c.identity.ListUsers(ipb.ListUsersRequest(page_size=1)).total_size,
        "roles": c.identity.ListRoles(ipb.ListRolesRequest(page_size=1)).total_size,
        "api_keys": c.identity.ListApiKeys(ipb.ListApiKeysRequest(page_size=1)).total_size,
        "projects": c.work.ListProjects(wpb.ListProjectsRequest(page_size=1)).total_size,
        "tasks": c.work.ListTasks(wpb.ListTasksRequest(page_size=1)).total_size,
        "channels": c.chat.ListChannels(cpb.ListChannelsRequest(page_size=1)).total_size,
        "channel_members": sum(len(ch.member_ids) for ch in list_all(c.chat.ListChannels, cpb.ListChannelsRequest, "channels")),
        "chat_messages": c.chat.ListChatMessages(cpb.ListChatMessagesRequest(page_size=1)).total_size,
        "conversations": c.chat.ListConversations(cpb.ListConversationsRequest(page_size=1)).total_size,
        "conversation_messages": c.chat.ListConversationMessages(cpb.ListConversationMessagesRequest(page_size=1)).total_size,
        "knowledge_chunks": c.knowledge.ListKnowledgeChunks(kpb.ListKnowledgeChunksRequest(page_size=1)).total_size,
        "documents": len(documents),
        "document_versions": sum(map(len, versions.values())),
        "document_shares": sum(map(len, shares.values())),
        "ai_interactions": c.ai.ListAIInteractions(apb.ListAIInteractionsRequest(page_size=1)).total_size,
    }


@dataclass
class Seeded:
    """The first seed of a fresh database, and everything the API returned right after it."""

    url: str
    client: Client
    result: subprocess.CompletedProcess[str]
    before: dict[str, int]
    after: dict[str, int]
    users: list[ipb.User]
    roles: list[ipb.Role]
    projects: list[wpb.Project]
    tasks: list[wpb.Task]
    channels: list[cpb.Channel]
    chat_messages: list[cpb.ChatMessage]
    conversations: list[cpb.Conversation]
    conversation_messages: list[cpb.ConversationMessage]
    chunks: list[kpb.KnowledgeChunk]
    documents: list[kpb.Document]  # soft-deleted ones too
    versions: dict[str, list[kpb.DocumentVersion]]  # by document id, oldest first
    shares: dict[str, list[kpb.DocumentShare]]  # by document id


@pytest.fixture(scope="module")
def seeded(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    backend = backend_of(database_url)
    with fresh_database(backend, tmp_path_factory.mktemp("seed")) as url:
        server = ServerThread(make_config(url)).start()  # migrates the fresh database
        client = connect(backend, url, server)
        try:
            before = totals(client)
            result = run_seed(url, *SIZE_ARGS, "--quiet")
            assert result.returncode == 0, result.stderr
            documents = all_documents(client)
            yield Seeded(
                url,
                client,
                result,
                before,
                totals(client),
                list_all(client.identity.ListUsers, ipb.ListUsersRequest, "users", order_by="create_time"),
                list_all(client.identity.ListRoles, ipb.ListRolesRequest, "roles"),
                list_all(client.work.ListProjects, wpb.ListProjectsRequest, "projects"),
                list_all(client.work.ListTasks, wpb.ListTasksRequest, "tasks", order_by="create_time"),
                list_all(client.chat.ListChannels, cpb.ListChannelsRequest, "channels"),
                list_all(client.chat.ListChatMessages, cpb.ListChatMessagesRequest, "chat_messages", order_by="create_time"),
                list_all(client.chat.ListConversations, cpb.ListConversationsRequest, "conversations"),
                list_all(
                    client.chat.ListConversationMessages, cpb.ListConversationMessagesRequest, "conversation_messages", order_by="create_time"
                ),
                list_all(client.knowledge.ListKnowledgeChunks, kpb.ListKnowledgeChunksRequest, "knowledge_chunks"),
                documents,
                per_document(client, documents, "ListDocumentVersions", kpb.ListDocumentVersionsRequest, "document_versions"),
                per_document(client, documents, "ListDocumentShares", kpb.ListDocumentSharesRequest, "document_shares"),
            )
        finally:
            client.channel.close()
            server.stop()


def test_cli_prints_the_counts(seeded: Seeded) -> None:
    counts = parse_counts(seeded.result.stdout)
    assert list(counts) == list(seed.COUNT_KINDS)
    assert counts["users"] == USERS
    assert counts["roles"] == 4
    assert counts["role_assignments"] == USERS
    assert counts["api_keys"] >= 1  # one per admin, and the first user is one
    assert counts["projects"] == PROJECTS
    assert PROJECTS * 3 <= counts["project_members"] <= PROJECTS * 8  # the owner and 2 to 7 more
    assert counts["tasks"] == PROJECTS * TASKS
    assert 0 <= counts["task_dependencies"] <= PROJECTS * (TASKS - 1) * 2
    assert counts["channels"] == CHANNELS
    assert CHANNELS * 3 <= counts["channel_members"] <= CHANNELS * 9  # the creator and 2 to 8 more
    assert counts["chat_messages"] == CHANNELS * MESSAGES
    assert counts["conversations"] == CONVERSATIONS
    assert counts["conversation_messages"] == CONVERSATIONS * TURNS
    assert counts["knowledge_chunks"] == CHUNKS
    assert counts["knowledge_chunks_replaced"] == 0, "a fresh database has no chunk to replace"
    assert counts["documents"] == DOCUMENTS
    assert counts["ai_interactions"] == AI_INTERACTIONS
    assert counts["document_versions"] >= 3, "the first document is edited twice and restored"
    assert counts["document_shares"] >= 3, "the first document is shared at each level"
    assert seeded.result.stdout.strip().count("\n") == 0, "--quiet prints the counts line only"
    assert seeded.result.stderr == "", "--quiet draws no progress bar"
    assert "password" not in (seeded.result.stdout + seeded.result.stderr).lower()


def test_totals_grew_by_the_counts(seeded: Seeded) -> None:
    counts = parse_counts(seeded.result.stdout)
    for kind, total in seeded.after.items():
        assert total - seeded.before[kind] == counts[kind], kind


def test_roles_and_users(seeded: Seeded) -> None:
    roles = {r.name: r for r in seeded.roles}
    assert set(roles) == {"admin", "manager", "user", "guest"}
    assert all(r.description and r.permissions for r in roles.values())
    assert set(roles["guest"].permissions) < set(roles["admin"].permissions)

    users = seeded.users
    assert len(users) == USERS
    assert len({u.username for u in users}) == len({u.email for u in users}) == USERS
    platform = {number: name for name, number in seed.PLATFORM_ROLE.items()}
    for user in users:
        first, last = user.full_name.split(" ")
        assert user.username.startswith(f"{first}.{last}".lower())
        assert user.email.startswith(user.username + "@")
        assert list(user.role_names) == [platform[user.role]]  # the Role row of the platform role
        assert user.preferences["theme"] in ("dark", "light")
        assert user.preferences["language"]
    assert [platform[u.role] for u in users[:3]] == ["admin", "manager", "user"]
    assert any(u.is_verified for u in users)


def test_only_the_first_users_can_sign_in(seeded: Seeded) -> None:
    c = seeded.client
    for user in seeded.users[: seed.PASSWORD_USERS]:
        response = c.identity.AuthenticateUser(ipb.AuthenticateUserRequest(login=user.username, password=seed.SAMPLE_PASSWORD))
        assert response.authenticated and response.user.id == user.id
    later = seeded.users[seed.PASSWORD_USERS]
    response = c.identity.AuthenticateUser(ipb.AuthenticateUserRequest(login=later.username, password=seed.SAMPLE_PASSWORD))
    assert not response.authenticated


def test_projects(seeded: Seeded) -> None:
    users = {u.id: u for u in seeded.users}
    assert len(seeded.projects) == PROJECTS
    for project in seeded.projects:
        assert project.name and project.description
        assert users[project.owner_id].role in (ipb.USER_ROLE_MANAGER, ipb.USER_ROLE_ADMIN)
        assert project.owner_id in project.member_ids
        assert 3 <= len(project.member_ids) <= 8
        assert set(project.member_ids) <= set(users)
        assert project.status != wpb.PROJECT_STATUS_UNSPECIFIED and project.priority != wpb.PRIORITY_UNSPECIFIED
        start = dt.date(project.start_date.year, project.start_date.month, project.start_date.day)
        end = dt.date(project.end_date.year, project.end_date.month, project.end_date.day)
        assert start <= end
        if project.HasField("budget"):
            assert len(project.budget.currency_code) == 3 and project.budget.units > 0


def test_tasks(seeded: Seeded) -> None:
    projects = {p.id: p for p in seeded.projects}
    tasks = {t.id: t for t in seeded.tasks}
    assert len(tasks) == PROJECTS * TASKS
    position = {t.id: i for i, t in enumerate(seeded.tasks)}  # creation order
    for task in seeded.tasks:
        project = projects[task.project_id]
        assert task.title and task.description and task.tags
        assert task.status != wpb.TASK_STATUS_UNSPECIFIED
        assert task.estimated_hours > 0 and task.HasField("due_date")
        assert task.creator_id in project.member_ids
        assert task.assignee_id == "" or task.assignee_id in project.member_ids
        assert task.HasField("completed_time") == (task.status == wpb.TASK_STATUS_DONE)
        for dep in task.dependency_ids:
            assert tasks[dep].project_id == task.project_id
            assert position[dep] < position[task.id], "dependencies point to earlier tasks only"


def test_project_progress_of_a_seeded_project(seeded: Seeded) -> None:
    for project in seeded.projects:
        progress = seeded.client.work.GetProjectProgress(wpb.GetProjectProgressRequest(project_id=project.id))
        mine = [t for t in seeded.tasks if t.project_id == project.id]
        assert progress.project_id == project.id
        assert progress.total_tasks == len(mine) == TASKS
        assert sum(s.count for s in progress.status_counts) == TASKS
        done = sum(t.status == wpb.TASK_STATUS_DONE for t in mine)
        assert progress.completion_percent == pytest.approx(100.0 * done / TASKS)
        assert progress.estimated_hours == pytest.approx(sum(t.estimated_hours for t in mine))
        assert progress.actual_hours == pytest.approx(sum(t.actual_hours for t in mine))


def test_channels_and_their_messages(seeded: Seeded) -> None:
    users = {u.id for u in seeded.users}
    projects = {p.id: p for p in seeded.projects}
    channels = {ch.id: ch for ch in seeded.channels}
    assert len(channels) == CHANNELS and len({ch.name for ch in seeded.channels}) == CHANNELS
    for channel in seeded.channels:
        assert channel.name and channel.description
        assert channel.creator_id in channel.member_ids, "the creator is a member"
        assert 3 <= len(channel.member_ids) <= 9 and set(channel.member_ids) <= users
        if channel.project_id:
            assert set(channel.member_ids) <= set(projects[channel.project_id].member_ids), "a project's channel is its members'"
    messages = {m.id: m for m in seeded.chat_messages}
    position = {m.id: i for i, m in enumerate(seeded.chat_messages)}  # creation order
    assert len(messages) == CHANNELS * MESSAGES
    for message in seeded.chat_messages:
        assert message.content
        assert message.author_id in channels[message.channel_id].member_ids, "authors are members of the channel"
        if message.parent_id:
            parent = messages[message.parent_id]
            assert parent.channel_id == message.channel_id, "a reply is in its parent's channel"
            assert position[parent.id] < position[message.id]


def test_conversations_and_their_turns(seeded: Seeded) -> None:
    users = {u.id for u in seeded.users}
    conversations = {c.id: c for c in seeded.conversations}
    assert len(conversations) == CONVERSATIONS
    assert all(c.user_id in users and c.title for c in seeded.conversations)
    assert all(c.status in (cpb.CONVERSATION_STATUS_ACTIVE, cpb.CONVERSATION_STATUS_ARCHIVED) for c in seeded.conversations)
    turns: dict[str, list[cpb.ConversationMessage]] = {}
    for message in seeded.conversation_messages:
        assert message.conversation_id in conversations, "messages belong to seeded conversations"
        turns.setdefault(message.conversation_id, []).append(message)
    assert set(turns) == set(conversations)
    for said in turns.values():
        assert len(said) == TURNS
        senders = [m.sender_type for m in said]
        if senders[0] == cpb.SENDER_TYPE_SYSTEM:
            senders = senders[1:]
        expected = [cpb.SENDER_TYPE_USER, cpb.SENDER_TYPE_ASSISTANT] * TURNS
        assert senders == expected[: len(senders)], "a system prompt first at most, then the user and the assistant by turns"


def test_knowledge_chunks(seeded: Seeded) -> None:
    chunks = seeded.chunks
    assert len(chunks) == CHUNKS
    keys = [(c.source, c.external_id) for c in chunks]
    assert len(set(keys)) == CHUNKS, "an external id is unique within its source"
    for chunk in chunks:
        path, _, index = chunk.external_id.rpartition("#")
        assert chunk.source in seed.KNOWLEDGE_SOURCES and path.endswith(".md") and index.isdigit()
        assert chunk.title and chunk.content.count(".") >= 2
        metadata = json_format.MessageToDict(chunk.chunk_metadata)
        assert metadata["lang"] in ("en", "de") and metadata["section"] and metadata["module"]
        assert metadata["path"] == path
        assert metadata["lang"] == "en" or chunk.source in seed.GERMAN_SOURCES


def test_knowledge_chunks_are_searchable_and_filterable_by_lang(seeded: Seeded) -> None:
    c = seeded.client
    lang = {chunk.id: json_format.MessageToDict(chunk.chunk_metadata)["lang"] for chunk in seeded.chunks}
    for code in ("en", "de"):
        found = list_all(c.knowledge.ListKnowledgeChunks, kpb.ListKnowledgeChunksRequest, "knowledge_chunks", filter=f'chunk_metadata.lang = "{code}"')
        assert {chunk.id for chunk in found} == {i for i, v in lang.items() if v == code}
    english = next(chunk for chunk in seeded.chunks if lang[chunk.id] == "en")
    word = max((w.strip(".,;:") for w in english.content.split()), key=lambda w: (w.isalpha(), len(w)))
    response = c.knowledge.SearchKnowledgeChunks(
        kpb.SearchKnowledgeChunksRequest(query=word, filter='chunk_metadata.lang = "en"', page_size=1000)
    )
    hits = [r.knowledge_chunk for r in response.results]
    assert english.id in {h.id for h in hits}, f"a search for {word!r} finds the chunk"
    assert all(lang[h.id] == "en" for h in hits)


VIEW, COMMENT, EDIT = kpb.DOCUMENT_SHARE_LEVEL_VIEW, kpb.DOCUMENT_SHARE_LEVEL_COMMENT, kpb.DOCUMENT_SHARE_LEVEL_EDIT
CONTENT_OF_KIND = {  # a kind's content: its parts, and what each part holds
    kpb.DOCUMENT_KIND_WORD: ("sections", "paragraphs"),
    kpb.DOCUMENT_KIND_EXCEL: ("sheets", "rows"),
    kpb.DOCUMENT_KIND_POWERPOINT: ("slides", "bullets"),
}


def test_documents_have_content_that_fits_their_kind(seeded: Seeded) -> None:
    users = {u.id for u in seeded.users}
    assert len(seeded.documents) == DOCUMENTS
    for document in seeded.documents:
        assert document.title and document.owner_id in users and document.last_editor_id in users
        content = json_format.MessageToDict(document.content)
        if document.kind == kpb.DOCUMENT_KIND_OTHER:
            assert content["text"] and content["format"], document.title
            continue
        parts, holds = CONTENT_OF_KIND[document.kind]
        assert content[parts] and all(part[holds] for part in content[parts]), document.title
        for sheet in content.get("sheets", ()):
            assert all(len(row) == len(sheet["columns"]) for row in sheet["rows"]), "a row has a cell per column"
    deleted = [d for d in seeded.documents if d.HasField("delete_time")]
    assert 1 <= len(deleted) < DOCUMENTS, "a few documents are soft-deleted"


def test_document_versions_are_numbered_without_gaps_and_made_by_editors(seeded: Seeded) -> None:
    counts = parse_counts(seeded.result.stdout)
    for document in seeded.documents:
        versions = seeded.versions[document.id]
        assert [v.version for v in versions] == list(range(1, document.version)), document.title
        editors = {document.owner_id} | {s.user_id for s in seeded.shares[document.id] if s.level == EDIT}
        assert {v.author_id for v in versions} | {document.last_editor_id} <= editors, "every state is the owner's or an edit-sharer's"
    assert sum(d.version - 1 for d in seeded.documents) == counts["document_versions"]
    by_sharers = [v for d in seeded.documents for v in seeded.versions[d.id] if v.author_id != d.owner_id]
    assert by_sharers, "some versions are an edit-sharer's"
    # Edits only add to the content, so a document that is in the state of one of its versions was restored.
    restored = [d for d in seeded.documents if any((v.title, v.content, v.kind) == (d.title, d.content, d.kind) for v in seeded.versions[d.id])]
    assert restored, "a document was restored to an earlier version"


def test_document_shares_are_at_every_level_and_never_the_owners(seeded: Seeded) -> None:
    users = {u.id for u in seeded.users}
    levels = set()
    for document in seeded.documents:
        shares = seeded.shares[document.id]
        assert len({s.user_id for s in shares}) == len(shares)
        for share in shares:
            assert share.user_id != document.owner_id, "an owner needs no share"
            assert share.user_id in users and share.shared_by_id == document.owner_id
            levels.add(share.level)
    assert levels == {VIEW, COMMENT, EDIT}


def test_ai_interactions_belong_to_seeded_users_and_sum_up(seeded: Seeded) -> None:
    c = seeded.client
    made = list_all(c.ai.ListAIInteractions, apb.ListAIInteractionsRequest, "ai_interactions")
    assert len(made) == AI_INTERACTIONS
    assert {i.user_id for i in made} <= {u.id for u in seeded.users}
    assert all(i.total_tokens == i.prompt_tokens + i.completion_tokens and i.cost.currency_code == "USD" for i in made)
    end = max(i.request_time.ToDatetime() for i in made) + dt.timedelta(seconds=1)
    request = apb.GetAIUsageSummaryRequest(group_by=[apb.USAGE_GROUPING_USER], page_size=1000)
    request.start_time.FromDatetime(end - dt.timedelta(days=31))
    request.end_time.FromDatetime(end)
    groups = c.ai.GetAIUsageSummary(request).groups
    assert sum(g.call_count for g in groups) == AI_INTERACTIONS
    assert sum(g.total_tokens for g in groups) == sum(i.total_tokens for i in made)


def test_seeding_again_adds_more_without_collisions(seeded: Seeded) -> None:
    before = totals(seeded.client)
    result = run_seed(seeded.url, *SIZE_ARGS, "--quiet")
    assert result.returncode == 0, result.stderr
    counts = parse_counts(result.stdout)
    assert counts["users"] == USERS and counts["projects"] == PROJECTS and counts["tasks"] == PROJECTS * TASKS
    assert counts["roles"] == 0, "the role rows exist already and are reused"
    assert counts["role_assignments"] == USERS
    assert counts["channels"] == CHANNELS and counts["chat_messages"] == CHANNELS * MESSAGES
    assert counts["conversations"] == CONVERSATIONS and counts["conversation_messages"] == CONVERSATIONS * TURNS
    assert counts["documents"] == DOCUMENTS and counts["document_versions"] >= 3 and counts["document_shares"] >= 3
    assert counts["ai_interactions"] == AI_INTERACTIONS
    # A chunk whose (source, external_id) was seeded before is replaced, not added again.
    assert counts["knowledge_chunks"] + counts["knowledge_chunks_replaced"] == CHUNKS
    after = totals(seeded.client)
    assert {k: after[k] - before[k] for k in after} == {k: counts[k] for k in after}
    users = list_all(seeded.client.identity.ListUsers, ipb.ListUsersRequest, "users")
    assert len({u.username for u in users}) == len(users) == after["users"]


def test_progress_bar_goes_to_stderr(database_url: str, tmp_path: Path) -> None:
    with fresh_database(backend_of(database_url), tmp_path) as url:
        result = run_seed(url, "--users", "3", "--projects", "1", "--tasks", "2")
    assert result.returncode == 0, result.stderr
    counts = parse_counts(result.stdout)
    total = sum(counts.values())
    assert "seeding" in result.stderr and "100%" in result.stderr
    assert f"{total}/{total}" in result.stderr
    assert "seeding" not in result.stdout and "%" not in result.stdout


# ------------------------------------------------------------------ in-process


def username_of(user_id: Any) -> Any:
    """The username of a user id column (ids differ between databases; usernames do not)."""
    return select(User.username).where(User.id == user_id).scalar_subquery()


SNAPSHOT_COLUMNS = {
    User: (User.username, User.email, User.full_name, User.role, User.preferences, User.is_active),
    Project: (Project.name, Project.status, Project.priority, Project.budget_amount, Project.start_date),
    Task: (Task.title, Task.status, Task.priority, Task.tags, Task.estimated_hours, Task.actual_hours),
    Channel: (Channel.name, Channel.description, Channel.is_private),
    ChatMessage: (ChatMessage.content,),
    Conversation: (Conversation.title, Conversation.status),
    ConversationMessage: (ConversationMessage.sender_type, ConversationMessage.content, ConversationMessage.role_metadata),
    KnowledgeChunk: (KnowledgeChunk.source, KnowledgeChunk.external_id, KnowledgeChunk.title, KnowledgeChunk.content, KnowledgeChunk.chunk_metadata),
    Document: (
        Document.title, Document.kind, Document.content, Document.version, Document.delete_time.is_(None),
        username_of(Document.owner_id), username_of(Document.last_editor_id),
    ),
    DocumentVersion: (DocumentVersion.version, DocumentVersion.title, DocumentVersion.kind, DocumentVersion.content, username_of(DocumentVersion.author_id)),
    DocumentShare: (DocumentShare.level, username_of(DocumentShare.user_id), username_of(DocumentShare.shared_by_id)),
    AIInteraction: (
        AIInteraction.module, AIInteraction.model, AIInteraction.total_tokens, AIInteraction.cost_units, AIInteraction.cost_nanos,
        AIInteraction.latency_nanos, AIInteraction.status, AIInteraction.request_time, username_of(AIInteraction.user_id),
    ),
}


def _snapshot(url: str) -> dict[str, list[Any]]:
    """The seeded rows' generated values, in creation order."""
    database = Database(url)
    try:
        return database.run_sync(
            lambda s: {
                model.__name__: list(s.execute(select(*columns).order_by(model.create_time, model.id)))
                for model, columns in SNAPSHOT_COLUMNS.items()
            },
            SESSION_READ,
        )
    finally:
        database.dispose()


def _seed_in_process(url: str, **kwargs: Any) -> dict[str, int]:
    database = Database(url)
    try:
        migrate.upgrade(database.engine)
        return seed.seed(database, progress=False, **kwargs)
    finally:
        database.dispose()


IN_PROCESS_SIZES = dict(
    users=8, projects=2, tasks_per_project=6, channels=6, messages_per_channel=8,
    conversations=6, messages_per_conversation=6, knowledge_chunks=30, documents=10, ai_interactions=12,
)


def test_a_seed_number_makes_it_deterministic(tmp_path: Path) -> None:
    urls = [f"sqlite:///{tmp_path / name}.db" for name in ("a", "b", "c")]
    sizes = IN_PROCESS_SIZES
    counts = [_seed_in_process(urls[0], rng_seed=42, **sizes), _seed_in_process(urls[1], rng_seed=42, **sizes)]
    assert counts[0] == counts[1]
    assert _snapshot(urls[0]) == _snapshot(urls[1])
    _seed_in_process(urls[2], rng_seed=43, **sizes)
    assert _snapshot(urls[2]) != _snapshot(urls[0])


def _stored(url: str) -> dict[str, int]:
    database = Database(url)
    try:
        return database.run_sync(
            lambda s: {model.__name__: s.scalar(select(func.count()).select_from(model)) for model in SNAPSHOT_COLUMNS}, SESSION_READ
        )
    finally:
        database.dispose()


def test_seeding_twice_with_one_seed_number_replaces_the_chunks_and_adds_the_rest(database_url: str, tmp_path: Path) -> None:
    """The same chunks again (same keys) are replaced through the upsert; everything else is added."""
    with fresh_database(backend_of(database_url), tmp_path) as url:
        first = _seed_in_process(url, rng_seed=7, **IN_PROCESS_SIZES)
        once = _stored(url)
        second = _seed_in_process(url, rng_seed=7, **IN_PROCESS_SIZES)
        twice = _stored(url)
    assert first["knowledge_chunks"] == IN_PROCESS_SIZES["knowledge_chunks"] and first["knowledge_chunks_replaced"] == 0
    assert second["knowledge_chunks"] == 0 and second["knowledge_chunks_replaced"] == IN_PROCESS_SIZES["knowledge_chunks"]
    assert twice["KnowledgeChunk"] == once["KnowledgeChunk"] == IN_PROCESS_SIZES["knowledge_chunks"]
    for model, kind in ((User, "users"), (Task, "tasks"), (Channel, "channels"), (ChatMessage, "chat_messages"),
                        (Conversation, "conversations"), (ConversationMessage, "conversation_messages"), (Document, "documents"),
                        (DocumentVersion, "document_versions"), (DocumentShare, "document_shares")):
        assert twice[model.__name__] == 2 * once[model.__name__] == 2 * first[kind] == 2 * second[kind], kind


def test_the_sample_has_each_variety(tmp_path: Path) -> None:
    """One seed number's sample has what a client of each kind meets: project and company
    channels, private ones, replies, archived conversations with system prompts and metadata,
    German chunks and several sources, documents of every kind, live and deleted, with versions
    by their owners and by others."""
    url = f"sqlite:///{tmp_path / 'v.db'}"
    # Large enough that each variety is all but certain for any seed number, not just this one.
    _seed_in_process(url, rng_seed=1, **IN_PROCESS_SIZES | dict(channels=16, conversations=16, knowledge_chunks=200, documents=40))
    database = Database(url)
    try:
        channels, messages, conversations, turns, chunks, documents, versions = database.run_sync(
            lambda s: [
                list(s.scalars(select(model)))
                for model in (Channel, ChatMessage, Conversation, ConversationMessage, KnowledgeChunk, Document, DocumentVersion)
            ],
            SESSION_READ,
        )
        assert {c.project_id is None for c in channels} == {True, False}
        assert {c.is_private for c in channels} == {True, False}
        assert any(m.parent_id for m in messages)
        assert {c.status for c in conversations} == {"active", "archived"}
        assert {t.sender_type for t in turns} == {"system", "user", "assistant"}
        assert any(t.role_metadata for t in turns) and not all(t.role_metadata for t in turns)
        assert {c.chunk_metadata["lang"] for c in chunks} == {"en", "de"}
        assert len({c.source for c in chunks}) >= 3
        assert {d.kind for d in documents} == set(seed.DOCUMENT_KIND)
        assert {d.delete_time is None for d in documents} == {True, False}
        owner = {d.id: d.owner_id for d in documents}
        assert {v.author_id == owner[v.document_id] for v in versions} == {True, False}
    finally:
        database.dispose()


def test_sizes_are_checked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    with pytest.raises(ValueError, match="at least one user"):
        _seed_in_process(url, users=0, projects=1, channels=0, conversations=0, documents=0, ai_interactions=0)
    for kind in ("channels", "conversations", "documents", "ai_interactions"):
        with pytest.raises(ValueError, match="at least one user"):
            _seed_in_process(url, users=0, projects=0, **{"channels": 0, "conversations": 0, "documents": 0, "ai_interactions": 0, kind: 1})
    for size in IN_PROCESS_SIZES:
        with pytest.raises(ValueError, match="negative"):
            _seed_in_process(url, **{size: -1})
    nothing = dict.fromkeys(IN_PROCESS_SIZES, 0)
    assert _seed_in_process(url, **nothing) == dict.fromkeys(seed.COUNT_KINDS, 0) | {"roles": 4}
    assert set(_stored(url).values()) == {0}
