"""Ids and request ids: drawn from the OS's CSPRNG through a per-thread buffer (db.base.random_bytes)."""
from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from pathlib import Path

from db import base

REPO = Path(__file__).resolve().parent.parent


def test_ids_are_unique_across_threads_and_well_formed() -> None:
    made: list[list[uuid.UUID]] = []

    def draw() -> None:
        made.append([base.uuid7() for _ in range(3000)] + [base.uuid4() for _ in range(3000)])

    threads = [threading.Thread(target=draw) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [i for batch in made for i in batch]
    assert len(ids) == len(set(ids)) == 24000
    assert {i.version for batch in made for i in batch[:3000]} == {7}
    assert {i.version for batch in made for i in batch[3000:]} == {4}
    assert {i.variant for i in ids} == {uuid.RFC_4122}
    # v7 ids of one thread are time-ordered (their first 48 bits are milliseconds).
    assert all(a.int >> 80 <= b.int >> 80 for batch in made for a, b in zip(batch[:2999], batch[1:3000], strict=True))


# Run in a fresh interpreter of its own: forking the test process itself would fork its servers'
# threads too (gRPC's, the databases'), which a fork in a process with threads does not survive
# reliably, and gRPC's fork handlers would act on every server of the session.
_FORK_CHECK = """
import os, sys
from db import base

base.random_bytes(16)  # the buffer is filled
read, write = os.pipe()
pid = os.fork()
if pid == 0:  # the child: its next bytes, to the parent
    try:
        os.write(write, base.random_bytes(64))
    finally:
        os._exit(0)
os.close(write)
child = b""
while len(child) < 64:
    chunk = os.read(read, 64 - len(child))
    if not chunk:
        break
    child += chunk
os.close(read)
os.waitpid(pid, 0)
parent = base.random_bytes(64)
print(child.hex(), parent.hex())
"""


def test_a_forked_child_never_reuses_the_parents_buffered_bytes() -> None:
    done = subprocess.run([sys.executable, "-c", _FORK_CHECK], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    child, parent = (bytes.fromhex(h) for h in done.stdout.split())
    assert len(child) == 64 and len(parent) == 64
    assert child != parent, "the child drew the bytes the parent draws next"
