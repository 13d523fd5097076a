"""examples/move_in: a chat store (users, conversations, messages, knowledge_chunks, as the earlier
layer's models and migration made them) moved into a real server through its RPCs, by the
program itself, run as a user runs it; then run again, and again after the chat store grew.

The chat store lives in the same kind of database as the service under test: a SQLite file, or
a PostgreSQL database of its own, made here with that database's DDL."""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from google.protobuf import json_format
from nexus.chat.v1 import chat_pb2 as cpb
from nexus.identity.v1 import identity_pb2 as ipb
from nexus.knowledge.v1 import knowledge_pb2 as kpb
from nexus.security.v1 import security_pb2 as spb

from tests.conftest import Client, unique
from tests.databases import fresh_postgres_database

ROOT = Path(__file__).resolve().parent.parent
PROGRAM = ROOT / "examples" / "move_in" / "move_in.py"

# The chat store's schema: its initial migration's tables, columns, keys and indexes. {uuid},
# {json} and {time} are the column types SQLAlchemy's Uuid, JSON and DateTime are on each database.
DDL = """
CREATE TABLE users (
    id {uuid} PRIMARY KEY,
    external_id VARCHAR(255) UNIQUE,
    name VARCHAR(255),
    email VARCHAR(255) UNIQUE,
    created_at {time} NOT NULL,
    updated_at {time} NOT NULL
);
CREATE TABLE conversations (
    id {uuid} PRIMARY KEY,
    user_id {uuid} REFERENCES users (id) ON DELETE CASCADE,
    title VARCHAR(500),
    status VARCHAR(20) NOT NULL,
    created_at {time} NOT NULL,
    updated_at {time} NOT NULL
);
CREATE INDEX idx_conversation_user_status ON conversations (user_id, status);
CREATE INDEX idx_conversation_created ON conversations (created_at);
CREATE TABLE messages (
    id {uuid} PRIMARY KEY,
    conversation_id {uuid} NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    sender_type VARCHAR(20) NOT NULL,
    content TEXT NOT NULL,
    role_metadata {json},
    created_at {time} NOT NULL,
    updated_at {time} NOT NULL
);
CREATE INDEX idx_message_conversation_created ON messages (conversation_id, created_at);
CREATE INDEX idx_message_sender_type ON messages (sender_type);
CREATE TABLE knowledge_chunks (
    id {uuid} PRIMARY KEY,
    source VARCHAR(255) NOT NULL,
    external_id VARCHAR(500),
    title VARCHAR(500),
    content TEXT NOT NULL,
    chunk_metadata {json},
    created_at {time} NOT NULL,
    updated_at {time} NOT NULL
);
CREATE INDEX idx_knowledge_source ON knowledge_chunks (source);
CREATE INDEX idx_knowledge_external_id ON knowledge_chunks (external_id);
CREATE INDEX idx_knowledge_created ON knowledge_chunks (created_at);
"""
TYPES = {
    # SQLAlchemy's Uuid is CHAR(32) of hex digits where the database has no UUID type.
    "sqlite": {"uuid": "CHAR(32)", "json": "JSON", "time": "DATETIME"},
    "postgresql": {"uuid": "UUID", "json": "JSON", "time": "TIMESTAMP WITHOUT TIME ZONE"},
}
T0 = dt.datetime(2024, 3, 1, 9, 0, 0)


class ChatStore:
    """The chat store's database, written as the earlier layer wrote it."""

    def __init__(self, url: str, backend: str) -> None:
        self.url, self.backend = url, backend
        self.engine = sa.create_engine(url)
        with self.engine.begin() as conn:
            for statement in DDL.format(**TYPES[backend]).split(";"):
                if statement.strip():
                    conn.exec_driver_sql(statement)

    def key(self, value: uuid.UUID) -> str:
        return value.hex if self.backend == "sqlite" else str(value)

    def insert(self, table: str, **values: Any) -> str:
        """A row; its id (a new UUID unless given) as the program names it (canonical form)."""
        row_id = values.pop("id", None) or uuid.uuid4()
        minutes = values.pop("minute", 0)
        stamp = T0 + dt.timedelta(minutes=minutes)
        values = {
            k: (self.key(v) if isinstance(v, uuid.UUID) else json.dumps(v) if isinstance(v, dict | list) else v)
            for k, v in values.items()
        }
        values |= {"id": self.key(row_id), "created_at": stamp, "updated_at": stamp}
        columns = ", ".join(values)
        with self.engine.begin() as conn:
            conn.execute(sa.text(f"INSERT INTO {table} ({columns}) VALUES ({', '.join(':' + c for c in values)})"), values)
        return str(row_id)


@pytest.fixture
def chat_store(client: Client, tmp_path: Path) -> Iterator[ChatStore]:
    if client.backend == "sqlite":
        store = ChatStore(f"sqlite:///{tmp_path / 'chat_store.db'}", "sqlite")
        yield store
        store.engine.dispose()
    else:
        with fresh_postgres_database("chat_store") as url:
            store = ChatStore(url, "postgresql")
            yield store
            store.engine.dispose()


def run(client: Client, store: ChatStore, api_key: str, *args: str) -> tuple[int, dict[str, Any]]:
    """The program, run as a user runs it; its exit status and its JSON report."""
    env = {**os.environ, "NEXUS_API_KEY": api_key}
    done = subprocess.run(
        [sys.executable, str(PROGRAM), "--source", store.url, "--address", client.address, "--json", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert done.stdout, f"no report (exit {done.returncode}): {done.stderr}"
    return done.returncode, json.loads(done.stdout)


def audit_of(client: Client, key_id: str) -> list[tuple[str, str, str]]:
    """(action, resource type, resource id) of every change made with the key, oldest first."""
    entries, token = [], ""
    while True:
        page = client.security.ListAuditLogEntries(spb.ListAuditLogEntriesRequest(
            filter=f'actor_id = "{key_id}"', order_by="create_time, id", page_size=1000, page_token=token))
        entries += [(spb.AuditAction.Name(e.action), e.resource_type, e.resource_id) for e in page.audit_log_entries]
        token = page.next_page_token
        if not token:
            return entries


def messages_of(client: Client, conversation_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    page = client.chat.ListConversationMessages(cpb.ListConversationMessagesRequest(
        filter=f'conversation_id = "{conversation_id}"', order_by="create_time, id", page_size=1000))
    return [(cpb.SenderType.Name(m.sender_type), m.content, json_format.MessageToDict(m.role_metadata))
            for m in page.conversation_messages]


def chunks_of(client: Client, source: str) -> dict[str, tuple[str, str, str, dict[str, Any]]]:
    page = client.knowledge.ListKnowledgeChunks(kpb.ListKnowledgeChunksRequest(filter=f'source = "{source}"', page_size=1000))
    return {c.id: (c.external_id, c.title, c.content, json_format.MessageToDict(c.chunk_metadata)) for c in page.knowledge_chunks}


def test_a_chat_store_moves_in_once_however_often_the_program_runs(client: Client, chat_store: ChatStore) -> None:
    uid = unique("m")
    # The move's own key: its request ids are remembered for it, and its changes audited under it.
    key = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("move"), role=ipb.USER_ROLE_ADMIN)))
    # Already in the service: a person who signed up before the move, and the owner of the
    # conversations that had no user.
    known = client.identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(username=unique("known"), email=f"dora.{uid}@example.com")))
    owner = client.identity.CreateUser(ipb.CreateUserRequest(user=ipb.User(username=unique("owner"), email=f"owner.{uid}@example.com")))

    store = chat_store
    ada = store.insert("users", external_id=f"auth|{uid}|ada", name="Ada Lovelace", email=f"ada.{uid}@example.com", minute=1)
    bob = store.insert("users", name="Bob", email=f"bob.{uid}@example.com", minute=2)  # no external id
    cy = store.insert("users", external_id=f"auth|{uid}|cy", minute=3)  # neither name nor e-mail address
    dora = store.insert("users", external_id=f"auth|{uid}|dora", name="Dora", email=f"Dora.{uid}@example.com", minute=4)

    chat = store.insert("conversations", user_id=uuid.UUID(ada), title="How to use the database?", status="active", minute=10)
    done = store.insert("conversations", user_id=uuid.UUID(bob), title="Closed", status="archived", minute=11)
    # A status stored by its enum's name, no title.
    named = store.insert("conversations", user_id=uuid.UUID(cy), status="ACTIVE", minute=12)
    orphan = store.insert("conversations", title="Nobody's", status="active", minute=13)
    store.insert("conversations", user_id=uuid.UUID(dora), title="Dora's", status="archived", minute=14)  # no messages

    metadata = {"tokens": 10, "retrieved": ["readme_section_1", "readme_section_2"], "tool": {"name": "search", "ok": True, "score": 0.5}}
    # Written out of order: the service keeps the order of created_at, not of the ids or inserts.
    store.insert("messages", conversation_id=uuid.UUID(chat), sender_type="assistant", content="It keeps your data.", role_metadata=metadata, minute=22)
    store.insert("messages", conversation_id=uuid.UUID(chat), sender_type="system", content="You are helpful.", minute=20)
    store.insert("messages", conversation_id=uuid.UUID(chat), sender_type="user", content="How does the database work?", role_metadata={"tokens": 5}, minute=21)
    store.insert("messages", conversation_id=uuid.UUID(done), sender_type="user", content="Thanks, that is all.", minute=30)
    store.insert("messages", conversation_id=uuid.UUID(done), sender_type="assistant", content="Goodbye!", role_metadata=[1, 2], minute=31)
    store.insert("messages", conversation_id=uuid.UUID(named), sender_type="USER", content="Hi", minute=40)
    store.insert("messages", conversation_id=uuid.UUID(orphan), sender_type="user", content="Anyone?", minute=50)

    source = f"enhanced_readme_{uid}"
    section_1 = store.insert("knowledge_chunks", source=source, external_id="readme_section_1", title="Installation Guide",
                             content="To install the project, run: pip install -r requirements.txt",
                             chunk_metadata={"section_type": "installation", "module": "readme_generator", "line_numbers": [3, 9]}, minute=60)
    store.insert("knowledge_chunks", source=source, external_id="readme_section_2", title="Usage", content="Run it.", minute=61)
    store.insert("knowledge_chunks", source=source, content="A chunk of no external id.", minute=62)
    stale = store.insert("knowledge_chunks", source=source, external_id="dup", content="The older text.", minute=63)
    store.insert("knowledge_chunks", source=source, external_id="dup", content="The newer text.", minute=64)

    # --- the first run: everything moves in, the conversation of no user to --unowned-owner
    status, first = run(client, store, key.secret, "--unowned-owner", owner.id)
    assert status == 0, first["problems"]
    assert first["problems"] == [{"table": "knowledge_chunks", "id": stale, "outcome": "skipped",
                                  "reason": f"another chunk of source '{source}' and external_id 'dup' was updated later"}]
    counts = first["counts"]
    assert {t: (c["moved"], c["failed"]) for t, c in counts.items()} == {
        "users": (4, 0), "conversations": (5, 0), "messages": (7, 0), "knowledge_chunks": (4, 0)}
    # EnsureUser made Ada and Cy; Dora's address was known: she is that user; Bob was created
    # with a request id (not counted as created: the answer does not say it).
    assert counts["users"]["created"] == 2 and counts["knowledge_chunks"]["created"] == 3
    ids = first["ids"]
    assert ids["users"][dora] == known.id

    # What the service holds: users...
    users = {u.id: u for u in client.identity.BatchGetUsers(ipb.BatchGetUsersRequest(ids=list(ids["users"].values()))).users}
    assert (users[ids["users"][ada]].external_id, users[ids["users"][ada]].full_name, users[ids["users"][ada]].email) == (
        f"auth|{uid}|ada", "Ada Lovelace", f"ada.{uid}@example.com")
    assert users[ids["users"][ada]].username == f"ada.{uid}-{ada.replace('-', '')[:8]}"
    assert (users[ids["users"][bob]].external_id, users[ids["users"][bob]].full_name) == ("", "Bob")
    assert users[ids["users"][cy]].email == f"user-{cy.replace('-', '')[:8]}@chat-store.invalid"
    lookup = client.identity.LookupUser(ipb.LookupUserRequest(external_id=f"auth|{uid}|cy"))
    assert lookup.id == ids["users"][cy]
    # ... conversations, with their owners, titles and statuses ...
    conversations = {old: client.chat.GetConversation(cpb.GetConversationRequest(id=new)) for old, new in ids["conversations"].items()}
    assert {old: (c.user_id, c.title, cpb.ConversationStatus.Name(c.status)) for old, c in conversations.items()} == {
        chat: (ids["users"][ada], "How to use the database?", "CONVERSATION_STATUS_ACTIVE"),
        done: (ids["users"][bob], "Closed", "CONVERSATION_STATUS_ARCHIVED"),
        named: (ids["users"][cy], "", "CONVERSATION_STATUS_ACTIVE"),
        orphan: (owner.id, "Nobody's", "CONVERSATION_STATUS_ACTIVE"),
        next(k for k in ids["conversations"] if k not in (chat, done, named, orphan)): (known.id, "Dora's", "CONVERSATION_STATUS_ARCHIVED"),
    }
    # ... messages in the order they were written, with their metadata ...
    assert messages_of(client, ids["conversations"][chat]) == [
        ("SENDER_TYPE_SYSTEM", "You are helpful.", {}),
        ("SENDER_TYPE_USER", "How does the database work?", {"tokens": 5}),
        ("SENDER_TYPE_ASSISTANT", "It keeps your data.", metadata),
    ]
    assert messages_of(client, ids["conversations"][done]) == [
        ("SENDER_TYPE_USER", "Thanks, that is all.", {}), ("SENDER_TYPE_ASSISTANT", "Goodbye!", {"value": [1, 2]})]
    assert messages_of(client, ids["conversations"][named]) == [("SENDER_TYPE_USER", "Hi", {})]
    # ... and the chunks, the duplicate key's newer text kept.
    chunks = chunks_of(client, source)
    assert sorted(chunks.values(), key=lambda c: (c[0], c[2])) == [
        ("", "", "A chunk of no external id.", {}),
        ("dup", "", "The newer text.", {}),
        ("readme_section_1", "Installation Guide", "To install the project, run: pip install -r requirements.txt",
         {"section_type": "installation", "module": "readme_generator", "line_numbers": [3, 9]}),
        ("readme_section_2", "Usage", "Run it.", {}),
    ]
    assert set(chunks) == set(ids["knowledge_chunks"].values())

    audit = audit_of(client, key.id)
    made = [(kind, rid) for action, kind, rid in audit if action == "AUDIT_ACTION_CREATE"]
    assert sorted(made) == sorted(
        [("User", ids["users"][u]) for u in (ada, bob, cy)]
        + [("Conversation", c) for c in ids["conversations"].values()]
        + [("ConversationMessage", m) for m in ids["messages"].values()]
        + [("KnowledgeChunk", k) for k in ids["knowledge_chunks"].values()])
    # The two archived conversations: archived after their messages went in.
    assert sorted(rid for action, _, rid in audit if action == "AUDIT_ACTION_UPDATE") == sorted(
        ids["conversations"][c] for c in ids["conversations"] if conversations[c].status == cpb.CONVERSATION_STATUS_ARCHIVED)

    # --- the second run: the same answers, nothing written
    status, second = run(client, store, key.secret, "--unowned-owner", owner.id)
    assert status == 0
    assert second["ids"] == first["ids"] and second["problems"] == first["problems"]
    assert {t: c["moved"] for t, c in second["counts"].items()} == {t: c["moved"] for t, c in counts.items()}
    assert second["counts"]["users"]["created"] == 0 and second["counts"]["knowledge_chunks"]["created"] == 0
    assert audit_of(client, key.id) == audit
    assert messages_of(client, ids["conversations"][chat])[-1][1] == "It keeps your data."
    assert len(chunks_of(client, source)) == 4

    # --- the chat store grew: the third run moves the new rows only
    eve = store.insert("users", external_id=f"auth|{uid}|eve", name="Eve", email=f"eve.{uid}@example.com", minute=70)
    later = store.insert("messages", conversation_id=uuid.UUID(chat), sender_type="user", content="One more thing.", minute=71)
    # A newer text of a key moved before: it replaces the chunk, and the older row is the one left out.
    newer = store.insert("knowledge_chunks", source=source, external_id="readme_section_1", title="Installation Guide",
                         content="pip install nexus", minute=72)
    status, third = run(client, store, key.secret, "--unowned-owner", owner.id)
    assert status == 0
    for table in ("users", "conversations", "messages"):
        assert {old: new for old, new in third["ids"][table].items() if old in first["ids"][table]} == first["ids"][table]
    assert set(third["ids"]["users"]) - set(ids["users"]) == {eve}
    assert set(third["ids"]["messages"]) - set(ids["messages"]) == {later}
    replaced = ids["knowledge_chunks"][section_1]
    assert third["ids"]["knowledge_chunks"][newer] == replaced and section_1 not in third["ids"]["knowledge_chunks"]
    assert chunks_of(client, source)[replaced][2] == "pip install nexus"
    grown = audit_of(client, key.id)
    assert grown[:len(audit)] == audit
    assert sorted(grown[len(audit):]) == sorted([
        ("AUDIT_ACTION_CREATE", "User", third["ids"]["users"][eve]),
        ("AUDIT_ACTION_CREATE", "ConversationMessage", third["ids"]["messages"][later]),
        ("AUDIT_ACTION_UPDATE", "KnowledgeChunk", replaced),
    ])
    assert messages_of(client, ids["conversations"][chat])[-1][1] == "One more thing."


def test_a_conversation_of_no_user_stays_without_one_or_is_refused_and_named(client: Client, chat_store: ChatStore) -> None:
    """Without --unowned-owner, an admin key acting for no user moves a conversation of no user
    as it is (only admins see it); a key of another role acting for no user is refused it."""
    orphan = chat_store.insert("conversations", title="Nobody's", status="active")
    message = chat_store.insert("messages", conversation_id=uuid.UUID(orphan), sender_type="user", content="Anyone?")
    user_key = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("move"), role=ipb.USER_ROLE_USER)))
    status, report = run(client, chat_store, user_key.secret)
    assert status == 1
    problems = {(p["table"], p["id"]): (p["outcome"], p["reason"]) for p in report["problems"] if p["table"] in ("conversations", "messages")}
    assert problems == {
        ("conversations", orphan): ("failed", "it has no user: only an admin key acting for no user moves it as it is; or pass --unowned-owner USER_ID"),
        ("messages", message): ("skipped", f"its conversation {orphan} was not moved"),
    }
    key = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("move"), role=ipb.USER_ROLE_ADMIN)))
    status, report = run(client, chat_store, key.secret)
    assert status == 0 and report["problems"] == []
    moved = client.chat.GetConversation(cpb.GetConversationRequest(id=report["ids"]["conversations"][orphan]))
    assert moved.user_id == "" and moved.title == "Nobody's"
    assert messages_of(client, moved.id) == [("SENDER_TYPE_USER", "Anyone?", {})]


def test_a_user_deleted_in_the_service_since_the_move_stays_deleted(client: Client, chat_store: ChatStore) -> None:
    uid = unique("m")
    key = client.identity.CreateApiKey(ipb.CreateApiKeyRequest(api_key=ipb.ApiKey(name=unique("move"), role=ipb.USER_ROLE_ADMIN)))
    gone = chat_store.insert("users", external_id=f"auth|{uid}|gone", email=f"gone.{uid}@example.com")
    chat = chat_store.insert("conversations", user_id=uuid.UUID(gone), title="Mine", status="active")
    status, first = run(client, chat_store, key.secret)
    assert status == 0 and first["problems"] == []
    client.identity.DeleteUser(ipb.DeleteUserRequest(id=first["ids"]["users"][gone]))
    audit = audit_of(client, key.id)

    status, second = run(client, chat_store, key.secret)
    assert status == 0
    assert [(p["table"], p["id"], p["outcome"]) for p in second["problems"]] == [
        ("users", gone, "skipped"), ("conversations", chat, "skipped")]
    assert "FAILED_PRECONDITION" in second["problems"][0]["reason"]
    assert audit_of(client, key.id) == audit
