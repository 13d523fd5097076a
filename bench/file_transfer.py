"""UploadFile and DownloadFile throughput (MB/s) against a floor: the same bytes through a bare
grpc.aio stream to a file and back.

    .venv/bin/python bench/file_transfer.py [--db sqlite,postgresql] [--mib 200] [--rounds 5] [--chunk-kib 256]

For each database: a fresh one (PostgreSQL: created on `postgres` and dropped afterwards;
SQLite: a temporary file), `nexus-data migrate`, an admin key, `nexus-data serve` with its blob
store in a temporary directory. The floor is this file run as a server (`--floor-port`): one
grpc.aio process serving the same two methods with the same messages (as bench/floor_server.py
does for the other RPCs), whose UploadFile writes each chunk to a file as it arrives and fsyncs it
at the end, and whose DownloadFile reads a file back in 64 KiB chunks (the service's). No
hashing, no temporary file renamed into place, no lock, no database row, no authentication, no
row rule: what any Python gRPC file store of this API pays at least. A second floor,
floor+sha256, also hashes each chunk before writing it, as a content-addressed store must: the
service against it is what the service costs beyond the hash.

Each round, for each side (service, floor, floor+sha256; their order alternating): one upload of --mib MiB in messages of
--chunk-kib KiB (fresh bytes each round, so the service never finds them stored already: each
upload stores its bytes), then one download of it, through the same kind of channel (grpcio,
sync, on this machine) and the same client work: the upload's messages serialized before the
clock starts, the download's messages kept as they arrive and read (checked against the upload)
after it. Both servers run with MALLOC_ARENA_MAX=2, as the image runs the service. MB/s = MiB moved / seconds (1 MiB = 1,048,576 bytes), best of --rounds, with the server
process's CPU time per MiB in that round. The target is service / floor >= 0.8 for both; the exit
code is 1 when a ratio is below it. Written to bench/results/file_transfer.md.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
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

# The floor, and the floor hashing each upload's bytes on the way (SHA-256, as the service must
# to address them by content): what the service costs beyond the hash it cannot skip.
SIDES = ("service", "floor", "floor+sha256")
FLOORS = SIDES[1:]
TARGET = 0.8
DOWNLOAD_CHUNK = 64 * 1024  # the service's DownloadFile message (service/files.py CHUNK_BYTES)
UPLOAD = "/nexus.files.v1.FileService/UploadFile"
DOWNLOAD = "/nexus.files.v1.FileService/DownloadFile"
MESSAGE_LIMIT = 16 << 20


def _raw(data: bytes) -> bytes:
    return data


# ---------------------------------------------------------------- the floor server


async def serve_floor(port: int, directory: Path, hashing: bool) -> None:
    """UploadFile: each chunk written to a new file as it arrives (hashed first, when hashing),
    fsynced at the end; answers a File whose id is the file's name (and sha256). DownloadFile:
    that file in 64 KiB chunks."""

    async def upload(messages: AsyncIterator[fpb.UploadFileRequest], context: Any) -> fpb.File:
        fd, name = tempfile.mkstemp(dir=directory)
        size, digest = 0, hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            async for message in messages:
                chunk = message.chunk
                size += len(chunk)
                if hashing:
                    digest.update(chunk)
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        return fpb.File(id=os.path.basename(name), size_bytes=size, sha256=digest.hexdigest() if hashing else "")

    async def download(request: fpb.DownloadFileRequest, context: Any) -> AsyncIterator[fpb.DownloadFileResponse]:
        offset = 0
        with open(directory / request.id, "rb") as f:  # noqa: ASYNC230 - the floor server reads its blob as the plainest server would
            while chunk := f.read(DOWNLOAD_CHUNK):
                yield fpb.DownloadFileResponse(chunk=chunk, offset=offset)
                offset += len(chunk)

    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "UploadFile": grpc.stream_unary_rpc_method_handler(
            upload, request_deserializer=fpb.UploadFileRequest.FromString, response_serializer=fpb.File.SerializeToString),
        "DownloadFile": grpc.unary_stream_rpc_method_handler(
            download, request_deserializer=fpb.DownloadFileRequest.FromString, response_serializer=fpb.DownloadFileResponse.SerializeToString),
    }
    options = [("grpc.max_receive_message_length", MESSAGE_LIMIT), ("grpc.max_send_message_length", MESSAGE_LIMIT)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("nexus.files.v1.FileService", handlers),))
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


Measured = dict[str, tuple[float, float]]  # direction -> (seconds, server CPU seconds)


def _timed(server_cpu: Callable[[], float], transfer: Callable[[], Any]) -> tuple[Any, float, float]:
    cpu, start = server_cpu(), time.perf_counter()
    result = transfer()
    return result, time.perf_counter() - start, server_cpu() - cpu


def transfer(channel: grpc.Channel, chunks: list[bytes], sha256: str, server_cpu: Callable[[], float], key: str | None) -> tuple[Measured, str]:
    """One upload and one download through either side: (what was measured, the File's id)."""
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    messages = [fpb.UploadFileRequest(metadata=fpb.UploadFileMetadata(name="bench.bin", sha256=sha256)).SerializeToString()]
    messages += [fpb.UploadFileRequest(chunk=c).SerializeToString() for c in chunks]
    upload = channel.stream_unary(UPLOAD, request_serializer=_raw, response_deserializer=fpb.File.FromString)
    download = channel.unary_stream(DOWNLOAD, request_serializer=fpb.DownloadFileRequest.SerializeToString, response_deserializer=_raw)
    made, up, up_cpu = _timed(server_cpu, lambda: upload(iter(messages), metadata=metadata, timeout=600))
    parts, down, down_cpu = _timed(server_cpu, lambda: list(download(fpb.DownloadFileRequest(id=made.id), metadata=metadata, timeout=600)))
    got, offset = hashlib.sha256(), 0
    for part in parts:
        response = fpb.DownloadFileResponse.FromString(part)
        assert response.offset == offset
        got.update(response.chunk)
        offset += len(response.chunk)
    assert got.hexdigest() == sha256 and made.size_bytes == offset == sum(map(len, chunks)), made
    return {"upload": (up, up_cpu), "download": (down, down_cpu)}, made.id


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
        # Both servers with the glibc heaps of the image (Dockerfile): with the default eight
        # per core, each thread a transfer's file I/O runs on allocates in a heap of its own.
        os.environ["MALLOC_ARENA_MAX"] = "2"
        ns = argparse.Namespace(max_rpcs=100, pool_size=5, max_overflow=5, workers=1, project_src=None)
        server = rpc_bench.start_project(dialect, url, work, ns, dialect)
        floors = {}
        for side in FLOORS:
            port = rpc_bench.free_port()
            argv = [rpc_bench.PYTHON, __file__, "--floor-port", str(port), "--floor-dir", str(floor_dir), *(["--floor-hash"] if "sha256" in side else [])]
            floors[side] = rpc_bench.Server(f"{side}-{dialect}", argv, dict(os.environ), work / f"{side}-{dialect}.log", port)
            rpc_bench.wait_ready(floors[side])
        best: dict[tuple[str, str], tuple[float, float]] = {}  # (MB/s, server CPU ms per MiB) of the fastest round
        service_channel = _channel(server.port)
        floor_channels = {side: _channel(floor.port) for side, floor in floors.items()}
        try:
            for round_no in range(args.rounds):
                for side in SIDES if round_no % 2 == 0 else tuple(reversed(SIDES)):
                    chunks, sha256 = payload(args.mib, round_no, side)
                    pid = (server if side == "service" else floors[side]).proc.pid
                    server_cpu = functools.partial(rpc_bench.tree_cpu_seconds, pid)
                    if side == "service":
                        measured, file_id = transfer(service_channel, chunks, sha256, server_cpu, key)
                        stub = files_pb2_grpc.FileServiceStub(service_channel)
                        stub.DeleteFile(fpb.DeleteFileRequest(id=file_id, force=True), metadata=(("authorization", f"Bearer {key}"),), timeout=60)
                    else:
                        measured, file_id = transfer(floor_channels[side], chunks, sha256, server_cpu, None)
                        (floor_dir / file_id).unlink()
                    for direction, (seconds, cpu) in measured.items():
                        rate = args.mib / seconds
                        rpc_bench.log(f"{dialect} round {round_no + 1} {side} {direction}: {rate:,.0f} MB/s, server CPU {cpu * 1000 / args.mib:.2f} ms per MiB")
                        if rate > best.get((side, direction), (0.0, 0.0))[0]:
                            best[(side, direction)] = (rate, cpu * 1000 / args.mib)
        finally:
            service_channel.close()
            for side, floor in floors.items():
                floor_channels[side].close()
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
    p.add_argument("--floor-hash", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.floor_port:
        asyncio.run(serve_floor(args.floor_port, Path(args.floor_dir), args.floor_hash))
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
        "| database | direction | service MB/s | floor MB/s | service / floor | target met | floor+sha256 MB/s | service / floor+sha256 | CPU ms/MiB: service, floor, floor+sha256 |",
        "|---|---|---:|---:|---:|---|---:|---:|---|",
    ]
    failed = False
    for r in results:
        for d in ("upload", "download"):
            (rate, cpu), (floor_rate, floor_cpu), (hashed_rate, hashed_cpu) = (r[f"{side} {d}"] for side in SIDES)
            ratio = rate / floor_rate
            failed |= ratio < TARGET
            lines.append(f"| {r['db']} | {d} | {rate:,.0f} | {floor_rate:,.0f} | {ratio:.2f} | {'yes' if ratio >= TARGET else 'NO'} "
                         f"| {hashed_rate:,.0f} | {rate / hashed_rate:.2f} | {cpu:.2f}, {floor_cpu:.2f}, {hashed_cpu:.2f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    (BENCH / "results" / "file_transfer.md").write_text(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
