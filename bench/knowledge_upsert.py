"""BatchUpsertKnowledgeChunks against a floor of the same rows upserted with raw SQL.

    .venv/bin/python bench/knowledge_upsert.py [--db postgresql,sqlite] [--rows 20000] [--batch 5000] [--rounds 3]

For each database: a fresh one (PostgreSQL: created on `postgres` and dropped afterwards;
SQLite: a temporary file), `nexus-data migrate`, an admin key, `nexus-data serve`. Chunks are
a re-ingestion's: a title of 6 words, about 60 words of content, chunk_metadata {lang, section,
line}; the same chunks for both sides. Each round, both sides (their order alternating):

- insert: --rows new chunks of a source in batches of --batch, one call (or one transaction)
  per batch;
- replace: the same keys again with changed content, so every row is replaced.

- service: BatchUpsertKnowledgeChunks over gRPC with read_mask "id,etag" (what an ingestion job
  keeps), requests built before the clock starts. It validates every chunk, reads and locks the
  rows of the keys, writes the rows and their audit entries, answers each chunk.
- floor: the same rows in the database with raw SQL from one connection: per batch BEGIN;
  INSERT ... ON CONFLICT (source, external_id) DO UPDATE of every chunk and an INSERT of an
  audit entry for each (a new chunk's fields; a replaced one's changed fields, old and new,
  which the floor knows because it wrote them): psycopg2 execute_values, one statement each
  (SQLite: executemany); COMMIT. No validation, no locking read, no answer.
- bare floor: the floor without the audit entries: the chunks alone.

Rows per second of each phase, best of --rounds; the ratios are service / floor and service / bare floor. Written to
bench/results/knowledge_upsert.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "generated"))
import benchdb  # noqa: E402
import rpc_bench  # noqa: E402
from google.protobuf import field_mask_pb2, struct_pb2  # noqa: E402
from nexus.knowledge.v1 import knowledge_pb2 as kpb  # noqa: E402
from nexus.knowledge.v1 import knowledge_pb2_grpc  # noqa: E402

COLUMNS = ("id", "source", "external_id", "title", "content", "chunk_metadata", "create_time", "update_time", "revision")
# service: BatchUpsertKnowledgeChunks; floor: raw SQL of the same rows (chunks and audit
# entries); bare floor: the chunks alone.
SIDES = ("service", "floor", "bare floor")
SECTIONS = ("overview", "install", "usage", "api", "faq", "troubleshooting")


def chunks(source: str, rows: int, version: int, rng: random.Random) -> list[dict[str, Any]]:
    words = benchdb.VOCABULARY
    out = []
    for i in range(rows):
        out.append({
            "source": source,
            "external_id": f"docs/page-{i // 8}.md#{i % 8}",
            "title": " ".join(rng.choice(words) for _ in range(6)),
            "content": f"v{version} " + " ".join(rng.choice(words) for _ in range(60)),
            "chunk_metadata": {"lang": "en" if i % 5 else "de", "section": SECTIONS[i % len(SECTIONS)], "line": i % 400},
        })
    return out


def requests_of(batch: list[dict[str, Any]]) -> kpb.BatchUpsertKnowledgeChunksRequest:
    requests = []
    for c in batch:
        meta = struct_pb2.Struct()
        meta.update(c["chunk_metadata"])
        chunk = kpb.KnowledgeChunk(source=c["source"], external_id=c["external_id"], title=c["title"], content=c["content"], chunk_metadata=meta)
        requests.append(kpb.UpsertKnowledgeChunkRequest(knowledge_chunk=chunk))
    return kpb.BatchUpsertKnowledgeChunksRequest(requests=requests, read_mask=field_mask_pb2.FieldMask(paths=["id", "etag"]))


def run_service(stub: Any, key: str, batches: list[list[dict[str, Any]]]) -> float:
    prepared = [requests_of(b) for b in batches]
    metadata = (("authorization", f"Bearer {key}"),)
    start = time.perf_counter()
    for request in prepared:
        answer = stub.BatchUpsertKnowledgeChunks(request, metadata=metadata, timeout=300)
        assert len(answer.results) == len(request.requests)
    return time.perf_counter() - start


def floor_statement(dialect: str) -> str:
    names = ", ".join(COLUMNS)
    replaced = "title = EXCLUDED.title, content = EXCLUDED.content, chunk_metadata = EXCLUDED.chunk_metadata, " \
               "update_time = EXCLUDED.update_time, revision = knowledge_chunks.revision + 1"
    conflict = "ON CONFLICT (source, external_id) WHERE external_id IS NOT NULL DO UPDATE SET " + replaced
    values = "%s" if dialect == "postgresql" else "(" + ", ".join("?" for _ in COLUMNS) + ")"
    return f"INSERT INTO knowledge_chunks ({names}) VALUES {values} {conflict}"


AUDIT_COLUMNS = ("id", "create_time", "actor_type", "actor_id", "action", "resource_type", "resource_id", "changes", "method", "summary")
METHOD = "/nexus.knowledge.v1.KnowledgeService/BatchUpsertKnowledgeChunks"


def floor_rows(dialect: str, batch: list[dict[str, Any]], known: dict[str, tuple[str, dict[str, Any]]]) -> tuple[list[tuple], list[tuple]]:
    """The rows the floor writes for a batch: the chunks, and an audit entry for each (as the
    service's: a new chunk's fields, or a replaced one's changed fields old and new). known:
    external_id -> (id, the chunk as last written), kept by the floor as a client would."""
    now = dt.datetime.now(dt.UTC)
    stamp: Any = now if dialect == "postgresql" else now.strftime("%Y-%m-%d %H:%M:%S.%f")
    chunks, entries = [], []
    for c in batch:
        earlier = known.get(c["external_id"])
        row_id = earlier[0] if earlier else str(uuid.uuid4())
        if earlier is None:
            changed = [{"field": f, "old_value": None, "new_value": c[f]} for f in ("source", "external_id", "title", "content", "chunk_metadata")]
            action = "create"
        else:
            changed = [{"field": f, "old_value": earlier[1][f], "new_value": c[f]} for f in ("title", "content", "chunk_metadata") if earlier[1][f] != c[f]]
            action = "update"
        known[c["external_id"]] = (row_id, c)
        ident = row_id if dialect == "postgresql" else uuid.UUID(row_id).hex
        chunks.append((ident, c["source"], c["external_id"], c["title"], c["content"], json.dumps(c["chunk_metadata"]), stamp, stamp, 1))
        entry_id = str(uuid.uuid4()) if dialect == "postgresql" else uuid.uuid4().hex
        summary = " ".join([action, "KnowledgeChunk", *(ch["field"] for ch in changed)])
        entries.append((entry_id, stamp, "api_key", None, action, "KnowledgeChunk", ident, json.dumps(changed), METHOD, summary))
    return chunks, entries


def run_floor(dialect: str, target: str, batches: list[list[dict[str, Any]]], known: dict[str, Any], audited: bool) -> float:
    """Each batch in one transaction: its chunks upserted by one statement, and (audited) its
    audit entries inserted by one more; the rows are built inside the clock, as a client builds them."""
    stmt = floor_statement(dialect)
    audit_names = ", ".join(AUDIT_COLUMNS)
    audit_stmt = f"INSERT INTO audit_log_entries ({audit_names}) VALUES " + ("%s" if dialect == "postgresql" else "(" + ", ".join("?" for _ in AUDIT_COLUMNS) + ")")
    conn = benchdb.connect(dialect, target)
    try:
        start = time.perf_counter()
        for batch in batches:
            chunks, entries = floor_rows(dialect, batch, known)
            if dialect == "postgresql":
                import psycopg2.extras

                with conn.cursor() as cur:
                    psycopg2.extras.execute_values(cur, stmt, chunks, page_size=len(chunks))
                    if audited:
                        psycopg2.extras.execute_values(cur, audit_stmt, entries, page_size=len(entries))
                conn.commit()
            else:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(stmt, chunks)
                if audited:
                    conn.executemany(audit_stmt, entries)
                conn.execute("COMMIT")
        return time.perf_counter() - start
    finally:
        conn.close()


def bench_dialect(dialect: str, args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    target = benchdb.create_pg_database("nexus_upsertbench") if dialect == "postgresql" else str(work / "bench.db")
    url = benchdb.database_url(dialect, target)
    try:
        benchdb.migrate(url)
        key = benchdb.create_admin_key(url)
        ns = argparse.Namespace(max_rpcs=100, pool_size=5, max_overflow=5, workers=1, project_src=None)
        server = rpc_bench.start_project(dialect, url, work, ns, dialect)
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=[("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)])
        stub = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
        best: dict[tuple[str, str], float] = {}
        try:
            for round_no in range(args.rounds):
                sides = list(SIDES) if round_no % 2 == 0 else list(reversed(SIDES))
                for side in sides:
                    source = f"{side}-{round_no}"
                    known: dict[str, Any] = {}
                    for phase, version in (("insert", 1), ("replace", 2)):
                        rows = chunks(source, args.rows, version, random.Random(f"{round_no}-{version}"))
                        batches = [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]
                        if side == "service":
                            took = run_service(stub, key, batches)
                        else:
                            took = run_floor(dialect, target, batches, known, audited=side == "floor")
                        rate = args.rows / took
                        rpc_bench.log(f"{dialect} round {round_no + 1} {side} {phase}: {rate:,.0f} rows/s")
                        best[(side, phase)] = max(best.get((side, phase), 0.0), rate)
        finally:
            channel.close()
            server.stop()
        return [
            {"db": dialect, "phase": phase, **{side: best[(side, phase)] for side in SIDES}} for phase in ("insert", "replace")
        ]
    finally:
        if dialect == "postgresql":
            benchdb.drop_pg_database(target)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--db", default="postgresql,sqlite")
    p.add_argument("--rows", type=int, default=20_000, help="chunks per phase (default 20000)")
    p.add_argument("--batch", type=int, default=5_000, help="chunks per call (default 5000)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="nexus-upsert-bench-") as tmp:
        for dialect in args.db.split(","):
            results += bench_dialect(dialect, args, Path(tmp))
    lines = [
        f"# BatchUpsertKnowledgeChunks vs raw-SQL upserts ({dt.date.today()}, {os.cpu_count()} cores)",
        "",
        f"`{' '.join(['bench/knowledge_upsert.py', *sys.argv[1:]])}`: {args.rows} chunks per phase, {args.batch} per call, best of {args.rounds} rounds.",
        "",
        "| database | phase | service rows/s | floor rows/s | service / floor | bare floor rows/s | service / bare floor |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['db']} | {r['phase']} | {r['service']:,.0f} | {r['floor']:,.0f} | {r['service'] / r['floor']:.2f} "
        f"| {r['bare floor']:,.0f} | {r['service'] / r['bare floor']:.2f} |"
        for r in results
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    (BENCH / "results" / "knowledge_upsert.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
