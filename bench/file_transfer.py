"""UploadFile and DownloadFile throughput (MB/s) against a floor: the same bytes through a bare
grpc.aio stream to a file and back.

    .venv/bin/python bench/file_transfer.py [--db sqlite,postgresql] [--mib 200] [--rounds 5] [--chunk-kib 256]

For each database: a fresh one (PostgreSQL: created on `postgres` and dropped afterwards;
SQLite: a temporary file), `nexus-data migrate`, an admin key, `nexus-data serve` with its blob
store in a temporary directory. The floor is this file run as a server (`--floor-port`): one
grpc.aio process whose client stream writes each message's bytes to a file as it arrives and
fsyncs it at the end, and whose server stream reads a file back in 64 KiB messages (the
service's DownloadFile chunk). No hashing, no temporary file renamed into place, no lock, no
database row, no authentication, no row rule: what any Python gRPC file store pays at least.

Each round, for each side (their order alternating): one upload of --mib MiB in messages of
--chunk-kib KiB (fresh bytes each round, so the service never finds them stored already: each
upload stores its bytes), then one download of it, through the same kind of channel (grpcio,
sync, on this machine). The client's messages are built before the clock starts. MB/s = MiB
moved / seconds (1 MiB = 1,048,576 bytes), best of --rounds. The target is service / floor >= 0.8
for both; the exit code is 1 when a ratio is below it. Written to bench/results/file_transfer.md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "generated"))
import benchdb  # noqa: E402
import rpc_bench  # noqa: E402
from nexus.files.v1 import files_pb2 as fpb  # noqa: E402
from nexus.files.v1 import files_pb2_grpc  # noqa: E402

SIDES = ("service", "floor")
TARGET = 0.8
DOWNLOAD_CHUNK = 64 * 1024  # the service's DownloadFile message (service/files.py CHUNK_BYTES)
UPLOAD = "/floor.Files/Upload"
DOWNLOAD = "/floor.Files/Download"
MESSAGE_LIMIT = 16 << 20


def _raw(data: bytes) -> bytes:
    return data


# ---------------------------------------------------------------- the floor server


async def serve_floor(port: int, directory: Path) -> None:
    """Upload: a client stream of raw byte messages, written to a file and fsynced; answers the
    file's name. Download: the file named by the request, in 64 KiB messages."""

    async def upload(messages: AsyncIterator[bytes], context: Any) -> bytes:
        fd, name = tempfile.mkstemp(dir=directory)
        with os.fdopen(fd, "wb") as f:
            async for chunk in messages:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        return os.path.basename(name).encode()

    async def download(request: bytes, context: Any) -> AsyncIterator[bytes]:
        with open(directory / request.decode(), "rb") as f:
            while chunk := f.read(DOWNLOAD_CHUNK):
                yield chunk

    handlers = {
        "Upload": grpc.stream_unary_rpc_method_handler(upload, request_deserializer=_raw, response_serializer=_raw),
        "Download": grpc.unary_stream_rpc_method_handler(download, request_deserializer=_raw, response_serializer=_raw),
    }
    options = [("grpc.max_receive_message_length", MESSAGE_LIMIT), ("grpc.max_send_message_length", MESSAGE_LIMIT)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor.Files", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    checker = health.aio.HealthServicer()
    await checker.set("readiness", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)
    await server.wait_for_termination()


# ---------------------------------------------------------------- the clients


def payload(mib: int, round_no: int, side: str) -> tuple[list[bytes], str]:
    """Fresh bytes for one upload, as chunks (a random MiB repeated, with the round and side in
    its first bytes so no two uploads share a blob), and their SHA-256."""
    block = bytearray(os.urandom(1 << 20))
    block[:32] = f"{side} {round_no} {time.time_ns()}".encode().ljust(32)
    data = bytes(block) * mib
    return [data[i:i + CHUNK] for i in range(0, len(data), CHUNK)], hashlib.sha256(data).hexdigest()


CHUNK = 256 * 1024


def service_side(stub: Any, key: str, chunks: list[bytes], sha256: str) -> tuple[float, float]:
    metadata = (("authorization", f"Bearer {key}"),)
    messages = [fpb.UploadFileRequest(metadata=fpb.UploadFileMetadata(name="bench.bin", sha256=sha256))]
    messages += [fpb.UploadFileRequest(chunk=c) for c in chunks]
    start = time.perf_counter()
    made = stub.UploadFile(iter(messages), metadata=metadata, timeout=600)
    up = time.perf_counter() - start
    got, start = 0, time.perf_counter()
    for part in stub.DownloadFile(fpb.DownloadFileRequest(id=made.id), metadata=metadata, timeout=600):
        got += len(part.chunk)
    down = time.perf_counter() - start
    assert made.sha256 == sha256 and got == made.size_bytes == sum(map(len, chunks)), (made, got)
    stub.DeleteFile(fpb.DeleteFileRequest(id=made.id, force=True), metadata=metadata, timeout=60)
    return up, down


def floor_side(channel: grpc.Channel, chunks: list[bytes], directory: Path) -> tuple[float, float]:
    upload = channel.stream_unary(UPLOAD, request_serializer=_raw, response_deserializer=_raw)
    download = channel.unary_stream(DOWNLOAD, request_serializer=_raw, response_deserializer=_raw)
    start = time.perf_counter()
    name = upload(iter(chunks), timeout=600)
    up = time.perf_counter() - start
    got, start = 0, time.perf_counter()
    for part in download(name, timeout=600):
        got += len(part)
    down = time.perf_counter() - start
    assert got == sum(map(len, chunks))
    (directory / name.decode()).unlink()
    return up, down


def _channel(port: int) -> grpc.Channel:
    options = [("grpc.max_send_message_length", MESSAGE_LIMIT), ("grpc.max_receive_message_length", MESSAGE_LIMIT)]
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=options)


def bench_dialect(dialect: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    target = benchdb.create_pg_database("nexus_filebench") if dialect == "postgresql" else str(work / "bench.db")
    url = benchdb.database_url(dialect, target)
    blobs, floor_dir = work / f"blobs-{dialect}", work / f"floor-{dialect}"
    floor_dir.mkdir()
    try:
        benchdb.migrate(url)
        key = benchdb.create_admin_key(url)
        os.environ["NEXUS_BLOB_DIR"] = str(blobs)
        ns = argparse.Namespace(max_rpcs=100, pool_size=5, max_overflow=5, workers=1, project_src=None)
        server = rpc_bench.start_project(dialect, url, work, ns, dialect)
        port = rpc_bench.free_port()
        argv = [rpc_bench.PYTHON, __file__, "--floor-port", str(port), "--floor-dir", str(floor_dir)]
        floor = rpc_bench.Server(f"floor-{dialect}", argv, dict(os.environ), work / f"floor-{dialect}.log", port)
        rpc_bench.wait_ready(floor)
        best: dict[tuple[str, str], float] = {}
        service_channel, floor_channel = _channel(server.port), _channel(port)
        stub = files_pb2_grpc.FileServiceStub(service_channel)
        try:
            for round_no in range(args.rounds):
                for side in SIDES if round_no % 2 == 0 else tuple(reversed(SIDES)):
                    chunks, sha256 = payload(args.mib, round_no, side)
                    if side == "service":
                        up, down = service_side(stub, key, chunks, sha256)
                    else:
                        up, down = floor_side(floor_channel, chunks, floor_dir)
                    rates = {"upload": args.mib / up, "download": args.mib / down}
                    rpc_bench.log(f"{dialect} round {round_no + 1} {side}: upload {rates['upload']:,.0f} MB/s, download {rates['download']:,.0f} MB/s")
                    for direction, rate in rates.items():
                        best[(side, direction)] = max(best.get((side, direction), 0.0), rate)
        finally:
            service_channel.close()
            floor_channel.close()
            floor.stop()
            server.stop()
        return {"db": dialect, **{f"{side} {d}": best[(side, d)] for side in SIDES for d in ("upload", "download")}}
    finally:
        if dialect == "postgresql":
            benchdb.drop_pg_database(target)


def main() -> int:
    global CHUNK
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--db", default="sqlite,postgresql")
    p.add_argument("--mib", type=int, default=200, help="MiB per transfer (default 200)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--chunk-kib", type=int, default=256, help="KiB per upload message (default 256)")
    p.add_argument("--floor-port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--floor-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.floor_port:
        asyncio.run(serve_floor(args.floor_port, Path(args.floor_dir)))
        return 0
    CHUNK = args.chunk_kib * 1024
    results = []
    with tempfile.TemporaryDirectory(prefix="nexus-file-bench-") as tmp:
        for dialect in args.db.split(","):
            results.append(bench_dialect(dialect, args, Path(tmp)))
    lines = [
        f"# UploadFile and DownloadFile vs a bare grpc.aio file stream ({dt.date.today()}, {os.cpu_count()} cores)",
        "",
        f"`{' '.join(['bench/file_transfer.py', *sys.argv[1:]])}`: {args.mib} MiB per transfer, uploads in "
        f"{args.chunk_kib} KiB messages, downloads in 64 KiB ones, best of {args.rounds} rounds; target service / floor >= {TARGET}.",
        "",
        "| database | direction | service MB/s | floor MB/s | service / floor | target met |",
        "|---|---|---:|---:|---:|---|",
    ]
    failed = False
    for r in results:
        for d in ("upload", "download"):
            ratio = r[f"service {d}"] / r[f"floor {d}"]
            failed |= ratio < TARGET
            lines.append(f"| {r['db']} | {d} | {r[f'service {d}']:,.0f} | {r[f'floor {d}']:,.0f} | {ratio:.2f} | {'yes' if ratio >= TARGET else 'NO'} |")
    table = "\n".join(lines) + "\n"
    print(table)
    (BENCH / "results" / "file_transfer.md").write_text(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
