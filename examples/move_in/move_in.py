"""Moves the chat store's data into a running Nexus Data Service, through its RPCs.

The chat store is the earlier layer with the tables `users`, `conversations`, `messages` and
`knowledge_chunks` (its repository functions: create_user, get_or_create_user_by_external_id,
create_conversation, add_message, upsert_knowledge_chunk, ...). This program reads such a
database (SQLite or PostgreSQL, any SQLAlchemy URL) and writes its rows into the service:

    users             -> IdentityService  EnsureUser (by external_id), or CreateUser with a request_id
    conversations     -> ChatService      CreateConversation with a request_id (ArchiveConversation after
                                          its messages when it was archived)
    messages          -> ChatService      CreateConversationMessage with a request_id, in created_at order
    knowledge_chunks  -> KnowledgeService BatchUpsertKnowledgeChunks by (source, external_id), or
                                          CreateKnowledgeChunk with a request_id when it has no external_id

It can run again, and again: every write is idempotent. A request id is derived from the old
primary key (uuid5 of the namespace and "table:pk"), so a second run gets the first run's
resources back instead of new ones; users are found by external_id, chunks by their key. Rows
added to the old database since the last run are moved by the next; nothing is moved twice.
Request ids are remembered per caller: run it with the same API key every time.

    NEXUS_API_KEY=nx_... python examples/move_in/move_in.py --source sqlite:///old/chat.db \\
        [--address localhost:50051] [--ca-file ca.pem] [--namespace NAME] \\
        [--unowned-owner USER_ID] [--ids-out ids.json] [--json]

Prints what it did per table and, with --json, the whole report (counts, the old id -> new id
map of every table, the problems) as one JSON object; --ids-out writes the id map to a file.
Exits 0 when every row was moved or left out on purpose (a chunk whose key a later chunk has,
a row deleted in the service since it was moved, the rows of one that was not moved: each listed
with the reason), 1 when the service refused some (listed with its answer: a rerun after the
cause is fixed moves them), 2 on bad arguments. docs/MIGRATION.md says how each table and field maps.

Needs the service's Python package installed (`pip install -e .` at the repository root: the
generated stubs under `nexus.*`, grpcio, SQLAlchemy; psycopg2 for a PostgreSQL source).
"""
from __future__ import annotations

import argparse
import datetime as dt
import decimal
import json
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf import field_mask_pb2, struct_pb2
from nexus.chat.v1 import chat_pb2, chat_pb2_grpc
from nexus.identity.v1 import identity_pb2, identity_pb2_grpc
from nexus.knowledge.v1 import knowledge_pb2, knowledge_pb2_grpc
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection

# The namespace of the request ids: uuid5(NAMESPACE, "<namespace>/<table>:<pk>"). Fixed, so that
# every run of this program derives the same ids from the same rows.
NAMESPACE = uuid.UUID("6f1d3c52-3b0e-5d7a-9a51-0c6e4f2b8d17")
# Chunks per BatchUpsertKnowledgeChunks (the RPC takes up to 10,000).
UPSERT_BATCH = 500
# Seconds each call may take.
CALL_TIMEOUT = 60.0
# Codes after which the same call is sent again: every call here is idempotent, so a retry after
# a lost answer returns what the first attempt did.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.DEADLINE_EXCEEDED,
             grpc.StatusCode.RESOURCE_EXHAUSTED}
ATTEMPTS = 6

SENDER_TYPES = {
    "user": chat_pb2.SENDER_TYPE_USER,
    "assistant": chat_pb2.SENDER_TYPE_ASSISTANT,
    "system": chat_pb2.SENDER_TYPE_SYSTEM,
}
STATUSES = {"active": chat_pb2.CONVERSATION_STATUS_ACTIVE, "archived": chat_pb2.CONVERSATION_STATUS_ARCHIVED}
USERNAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")

T = TypeVar("T")


# ---------------------------------------------------------------- the report


@dataclass
class Table:
    """What happened to one table's rows."""

    moved: int = 0  # rows that now have their resource in the service (made by this run or an earlier one)
    created: int = 0  # of those, made by this run, where the service says so (EnsureUser, upserts)
    skipped: int = 0  # rows left out on purpose, with a reason in problems
    failed: int = 0  # rows the service refused, with its answer in problems
    ids: dict[str, str] = field(default_factory=dict)  # old primary key -> the resource's id


@dataclass
class Report:
    tables: dict[str, Table] = field(default_factory=lambda: {name: Table() for name in ("users", "conversations", "messages", "knowledge_chunks")})
    problems: list[dict[str, str]] = field(default_factory=list)

    def problem(self, table: str, pk: str, outcome: str, reason: str) -> None:
        setattr(self.tables[table], outcome, getattr(self.tables[table], outcome) + 1)
        self.problems.append({"table": table, "id": pk, "outcome": outcome, "reason": reason})

    def as_json(self) -> dict[str, Any]:
        return {
            "counts": {name: {k: v for k, v in vars(t).items() if k != "ids"} for name, t in self.tables.items()},
            "ids": {name: t.ids for name, t in self.tables.items()},
            "problems": self.problems,
        }


# ---------------------------------------------------------------- reading the old database


def old_key(value: Any) -> str:
    """A primary key as text, one spelling per key: a UUID (stored as 32 hex digits by SQLAlchemy
    on SQLite, natively on PostgreSQL) in its canonical form, anything else as it is."""
    if value is None:
        return ""
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes) and len(value) == 16:
        return str(uuid.UUID(bytes=value))
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        return str(value)


def json_value(value: Any) -> Any:
    """A JSON column's value: drivers hand over text (SQLite) or the parsed value (PostgreSQL)."""
    if isinstance(value, str | bytes):
        return json.loads(value)
    return value


def struct_of(value: Any) -> struct_pb2.Struct | None:
    """A JSON column as a Struct. A Struct is an object: any other JSON value is kept under "value"
    (and said so in docs/MIGRATION.md). Numbers become doubles, as JSON numbers are."""
    value = json_value(value)
    if value is None:
        return None
    if not isinstance(value, dict):
        value = {"value": value}
    struct = struct_pb2.Struct()
    struct.update(_plain(value))
    return struct


def _plain(value: Any) -> Any:
    """What Struct.update accepts: dicts, lists, str, float, bool, None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float | decimal.Decimal):
        return float(value)
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


def rows(conn: Connection, sql: str) -> Iterator[dict[str, Any]]:
    """The rows of a query, streamed (a server-side cursor on PostgreSQL)."""
    result = conn.execution_options(stream_results=True, yield_per=1000).execute(text(sql))
    for row in result.mappings():
        yield dict(row)


def enum_text(value: Any) -> str:
    """An enum column's value as the chat store wrote it: its value ("user") or, where SQLAlchemy
    stored a Python enum by name, its name ("USER", "MessageSenderType.USER")."""
    return str(getattr(value, "value", value) or "").rsplit(".", 1)[-1].strip().lower()


# ---------------------------------------------------------------- calling the service


class Service:
    """The three stubs, each call with the API key, a deadline and retries."""

    def __init__(self, channel: grpc.Channel, api_key: str) -> None:
        self.identity = identity_pb2_grpc.IdentityServiceStub(channel)
        self.chat = chat_pb2_grpc.ChatServiceStub(channel)
        self.knowledge = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),)

    def call(self, method: Callable[..., T], request: Any) -> T:
        for attempt in range(ATTEMPTS):
            try:
                return method(request, metadata=self.metadata, timeout=CALL_TIMEOUT)
            except grpc.RpcError as error:
                if error.code() not in RETRYABLE or attempt == ATTEMPTS - 1:
                    raise
                time.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")


def request_id(namespace: str, table: str, pk: str) -> str:
    """The request id of the row `pk` of `table`: the same on every run."""
    return str(uuid.uuid5(NAMESPACE, f"{namespace}/{table}:{pk}"))


def refusal(error: grpc.RpcError) -> str:
    return f"{error.code().name}: {error.details()}"


# ---------------------------------------------------------------- moving each table


def username_for(row: dict[str, Any], pk: str) -> str:
    """A username for a user of the chat store, which had none: the e-mail address's local part
    (or the name), made of the characters usernames allow, and the old id's first 8 hex digits,
    so that it is unique and the same on every run."""
    base = (row.get("email") or "").split("@", 1)[0] or (row.get("name") or "") or "user"
    base = USERNAME_CHARS.sub("-", base).strip("-.") or "user"
    return f"{base[:48]}-{pk.replace('-', '')[:8]}"


def move_users(conn: Connection, service: Service, namespace: str, report: Report) -> None:
    table = report.tables["users"]
    for row in rows(conn, "SELECT id, external_id, name, email FROM users ORDER BY created_at, id"):
        pk = old_key(row["id"])
        username = username_for(row, pk)
        # The service needs an e-mail address; one the chat store lacked gets an address of the
        # reserved .invalid domain, which no mail can reach.
        email = (row["email"] or "").strip() or f"{username}@chat-store.invalid"
        user = identity_pb2.User(username=username, email=email, full_name=row["name"] or "",
                                 external_id=row["external_id"] or "")
        try:
            if row["external_id"]:
                # Found by external_id, or made. Today EnsureUser makes a user only with a username
                # and an e-mail address; once it takes external_id alone, username and email above
                # are only needed for users the service should know by them.
                answer = service.call(service.identity.EnsureUser, identity_pb2.EnsureUserRequest(user=user))
                new_id, table.created = answer.user.id, table.created + answer.created
            else:
                new_id = service.call(service.identity.CreateUser, identity_pb2.CreateUserRequest(
                    user=user, request_id=request_id(namespace, "users", pk))).id
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                # Its external_id is a user deleted in the service since: it stays deleted (and
                # its conversations are left out) until an admin undeletes it.
                report.problem("users", pk, "skipped", refusal(error))
                continue
            if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                report.problem("users", pk, "failed", refusal(error))
                continue
            # The address is taken: the service already knows this person (an earlier sign-up):
            # that user is theirs. A username taken by someone else is a real conflict.
            try:
                known = service.call(service.identity.LookupUser, identity_pb2.LookupUserRequest(email=email))
            except grpc.RpcError:
                report.problem("users", pk, "failed", refusal(error))
                continue
            if known.external_id and known.external_id != user.external_id:
                report.problem("users", pk, "failed", f"its e-mail address belongs to the user {known.id}, of another external_id")
                continue
            new_id = known.id
        table.ids[pk] = new_id
        table.moved += 1


def move_conversations(conn: Connection, service: Service, namespace: str, report: Report, unowned_owner: str) -> None:
    users, table = report.tables["users"].ids, report.tables["conversations"]
    messages = _messages_by_conversation(conn)
    for row in rows(conn, "SELECT id, user_id, title, status FROM conversations ORDER BY created_at, id"):
        pk, owner = old_key(row["id"]), old_key(row["user_id"])
        status = STATUSES.get(enum_text(row["status"]) or "active")
        if status is None:
            report.problem("conversations", pk, "failed", f"unknown status {row['status']!r}")
            continue
        if owner and owner not in users:
            report.problem("conversations", pk, "skipped", f"its user {owner} was not moved")
            continue
        # A conversation of no user goes to --unowned-owner when given; otherwise it is sent as
        # it is, and the service keeps it without a user (only admins see it) when the move's
        # key is an admin's acting for no user.
        user_id = users[owner] if owner else unowned_owner
        # Made active: its messages go in first (an archived conversation takes none), then it is
        # archived as it was.
        conversation = chat_pb2.Conversation(user_id=user_id, title=row["title"] or "", status=chat_pb2.CONVERSATION_STATUS_ACTIVE)
        try:
            made = service.call(service.chat.CreateConversation, chat_pb2.CreateConversationRequest(
                conversation=conversation, request_id=request_id(namespace, "conversations", pk)))
        except grpc.RpcError as error:
            code = error.code()
            if code == grpc.StatusCode.NOT_FOUND:
                # Moved by an earlier run and deleted in the service since (or its user was).
                report.problem("conversations", pk, "skipped", refusal(error))
            elif code == grpc.StatusCode.PERMISSION_DENIED and not owner and not unowned_owner:
                report.problem("conversations", pk, "failed", "it has no user: only an admin key acting for no user moves it as it is; or pass --unowned-owner USER_ID")
            else:
                report.problem("conversations", pk, "failed", refusal(error))
            continue
        if not owner and not unowned_owner and made.user_id:
            # The key acts for a user, whose own the conversation became: moved, and listed.
            report.problems.append({"table": "conversations", "id": pk, "outcome": "moved",
                                    "reason": f"it had no user and is now the key's user's ({made.user_id}): move with an admin key acting for no user"})
        table.ids[pk] = made.id
        table.moved += 1
        complete = move_messages(service, namespace, report, made, messages.get(pk, []))
        if status == chat_pb2.CONVERSATION_STATUS_ARCHIVED and made.status != status:
            if not complete:
                # Archived, it would take no more messages: it stays open until a run moves them all.
                report.problem("conversations", pk, "failed", "left active: some of its messages were not moved")
                continue
            try:
                service.call(service.chat.ArchiveConversation, chat_pb2.ArchiveConversationRequest(id=made.id))
            except grpc.RpcError as error:
                report.problem("conversations", pk, "failed", f"not archived: {refusal(error)}")
    for pk in set(messages) - set(table.ids):
        for message in messages[pk]:
            report.problem("messages", old_key(message["id"]), "skipped", f"its conversation {pk} was not moved")


def _messages_by_conversation(conn: Connection) -> dict[str, list[dict[str, Any]]]:
    """Every message, by its conversation's old id, in the order they were written. (Held in
    memory: the text of a chat store; a very large one would read them per conversation.)"""
    found: dict[str, list[dict[str, Any]]] = {}
    for row in rows(conn, "SELECT id, conversation_id, sender_type, content, role_metadata FROM messages ORDER BY created_at, id"):
        found.setdefault(old_key(row["conversation_id"]), []).append(row)
    return found


def move_messages(service: Service, namespace: str, report: Report, conversation: chat_pb2.Conversation, messages: list[dict[str, Any]]) -> bool:
    """The conversation's messages, one at a time in their order (create_time keeps it). True
    when every one of them is in the service."""
    table, complete = report.tables["messages"], True
    for row in messages:
        pk = old_key(row["id"])
        sender = SENDER_TYPES.get(enum_text(row["sender_type"]))
        if sender is None:
            report.problem("messages", pk, "failed", f"unknown sender_type {row['sender_type']!r}")
            complete = False
            continue
        message = chat_pb2.ConversationMessage(conversation_id=conversation.id, sender_type=sender, content=row["content"] or "")
        metadata = struct_of(row["role_metadata"])
        if metadata is not None:
            message.role_metadata.CopyFrom(metadata)
        try:
            made = service.call(service.chat.CreateConversationMessage, chat_pb2.CreateConversationMessageRequest(
                conversation_message=message, request_id=request_id(namespace, "messages", pk)))
        except grpc.RpcError as error:
            report.problem("messages", pk, "failed", refusal(error))
            complete = False
            continue
        table.ids[pk] = made.id
        table.moved += 1
    return complete


def move_knowledge_chunks(conn: Connection, service: Service, namespace: str, report: Report) -> None:
    table = report.tables["knowledge_chunks"]
    keyed: dict[tuple[str, str], tuple[str, knowledge_pb2.KnowledgeChunk]] = {}
    sql = "SELECT id, source, external_id, title, content, chunk_metadata FROM knowledge_chunks ORDER BY updated_at, created_at, id"
    for row in rows(conn, sql):
        pk = old_key(row["id"])
        chunk = knowledge_pb2.KnowledgeChunk(source=row["source"] or "", external_id=row["external_id"] or "",
                                            title=row["title"] or "", content=row["content"] or "")
        metadata = struct_of(row["chunk_metadata"])
        if metadata is not None:
            chunk.chunk_metadata.CopyFrom(metadata)
        if not chunk.external_id:
            _create_chunk(service, namespace, report, pk, chunk)
            continue
        key = (chunk.source, chunk.external_id)
        if key in keyed:
            # The service keeps one chunk per (source, external_id); the chat store's index on
            # external_id was not unique. The one updated last wins; the other is left out.
            earlier, _ = keyed[key]
            report.problem("knowledge_chunks", earlier, "skipped", f"another chunk of source {key[0]!r} and external_id {key[1]!r} was updated later")
        keyed[key] = (pk, chunk)
    batch = list(keyed.values())
    for start in range(0, len(batch), UPSERT_BATCH):
        part = batch[start:start + UPSERT_BATCH]
        request = knowledge_pb2.BatchUpsertKnowledgeChunksRequest(
            requests=[knowledge_pb2.UpsertKnowledgeChunkRequest(knowledge_chunk=chunk) for _, chunk in part],
            read_mask=field_mask_pb2.FieldMask(paths=["id"]))
        try:
            answer = service.call(service.knowledge.BatchUpsertKnowledgeChunks, request)
        except grpc.RpcError:
            # All or nothing: one at a time, to name the chunk the service refuses.
            for pk, chunk in part:
                try:
                    one = service.call(service.knowledge.UpsertKnowledgeChunk, knowledge_pb2.UpsertKnowledgeChunkRequest(knowledge_chunk=chunk))
                except grpc.RpcError as error:
                    report.problem("knowledge_chunks", pk, "failed", refusal(error))
                    continue
                table.ids[pk], table.moved, table.created = one.knowledge_chunk.id, table.moved + 1, table.created + one.created
            continue
        for (pk, _), result in zip(part, answer.results, strict=True):
            table.ids[pk] = result.knowledge_chunk.id
        table.moved += len(part)
        table.created += answer.created_count


def _create_chunk(service: Service, namespace: str, report: Report, pk: str, chunk: knowledge_pb2.KnowledgeChunk) -> None:
    """A chunk without an external_id has no key to upsert by: a Create with a request id."""
    table = report.tables["knowledge_chunks"]
    try:
        made = service.call(service.knowledge.CreateKnowledgeChunk, knowledge_pb2.CreateKnowledgeChunkRequest(
            knowledge_chunk=chunk, request_id=request_id(namespace, "knowledge_chunks", pk)))
    except grpc.RpcError as error:
        outcome = "skipped" if error.code() == grpc.StatusCode.NOT_FOUND else "failed"
        report.problem("knowledge_chunks", pk, outcome, refusal(error))
        return
    table.ids[pk] = made.id
    table.moved += 1


def move_in(source_url: str, channel: grpc.Channel, api_key: str, *, namespace: str = "", unowned_owner: str = "") -> Report:
    """Everything in the chat store at source_url, moved into the service on channel."""
    service, report = Service(channel, api_key), Report()
    engine = create_engine(source_url)
    try:
        with engine.connect() as conn:
            move_users(conn, service, namespace, report)
            move_conversations(conn, service, namespace, report, unowned_owner)
            move_knowledge_chunks(conn, service, namespace, report)
    finally:
        engine.dispose()
    return report


# ---------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Move a chat store's users, conversations, messages and knowledge chunks into the service.")
    parser.add_argument("--source", default=os.environ.get("SOURCE_DATABASE_URL", ""),
                        help="the chat store's SQLAlchemy URL, e.g. sqlite:///chat.db (default: SOURCE_DATABASE_URL)")
    parser.add_argument("--address", default=os.environ.get("NEXUS_ADDRESS", "localhost:50051"), help="the service (default: NEXUS_ADDRESS or localhost:50051)")
    parser.add_argument("--ca-file", help="PEM certificate authority of a TLS server (default: plaintext)")
    parser.add_argument("--namespace", default="", help="a name mixed into every request id, to move several chat stores whose keys may collide")
    parser.add_argument("--unowned-owner", default="", metavar="USER_ID", help="the service user who gets the conversations of no user")
    parser.add_argument("--ids-out", metavar="FILE", help="write the old id -> new id map of every table to FILE (JSON)")
    parser.add_argument("--json", action="store_true", help="print the whole report as one JSON object")
    args = parser.parse_args(argv)
    api_key = os.environ.get("NEXUS_API_KEY", "")
    if not args.source:
        parser.error("--source (or SOURCE_DATABASE_URL) is required")
    if not api_key:
        parser.error("NEXUS_API_KEY is not set: an API key that may create users (an admin's)")
    if args.ca_file:
        with open(args.ca_file, "rb") as f:
            channel = grpc.secure_channel(args.address, grpc.ssl_channel_credentials(root_certificates=f.read()))
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        report = move_in(args.source, channel, api_key, namespace=args.namespace, unowned_owner=args.unowned_owner)
    result = report.as_json()
    if args.ids_out:
        with open(args.ids_out, "w") as f:
            json.dump(result["ids"], f, indent=1, sort_keys=True)
    if args.json:
        json.dump(result, sys.stdout, sort_keys=True)
        print()
    else:
        for name, counts in result["counts"].items():
            print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        for problem in report.problems:
            print(f"{problem['outcome']}: {problem['table']} {problem['id']}: {problem['reason']}", file=sys.stderr)
    return 1 if any(t.failed for t in report.tables.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
