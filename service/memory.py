"""Memory the server freed goes back to the operating system.

glibc keeps the memory a process frees in its heaps (one per thread that allocates, up to eight
per core) for later reuse, and gives back only what lies at the top of the main heap. After a
burst of large requests (field values at their limits, 4 MiB pages) the server's RSS stayed
far above where it was, for good (bench/rss_after_large.py, bench/README.md). malloc_trim(0) returns the
free pages of every heap: a MemoryTrimmer calls it, on a thread (ctypes releases the GIL),
whenever the resident size has grown by `growth` bytes since the last trim; a steady server
never trims. Where there is no glibc (musl) or no /proc, it does nothing.

glibc also gives each thread that allocates a heap of its own (an arena), up to eight per core.
The server's threads (the event loop, gRPC's, the database threads, the hash pool) allocate in
their own arenas and free what the others allocated: under a steady mixed load the arenas' free
holes grew, and so did the resident size, about 2 MiB a minute for eight minutes, to 13 MiB
above where two arenas level off by minute 3, with the memory in use flat (bench/soak.py,
bench/README.md). limit_arenas() caps the
arenas at startup (NEXUS_MALLOC_ARENAS, 2 by default, as MALLOC_ARENA_MAX=2 does); heap_stats()
tells how many there are and what they hold, for /metrics.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import re
from collections.abc import Callable
from typing import NamedTuple

log = logging.getLogger("nexus.memory")

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int | None:
    """The process's resident set size, or None where /proc is missing."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, IndexError, ValueError):
        return None


def malloc_trim() -> Callable[[], int] | None:
    """glibc's malloc_trim(0) as a function, or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: int(trim(0))


_M_ARENA_MAX = -8  # mallopt's parameter (malloc.h)


def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def limit_arenas(arenas: int) -> bool:
    """At most `arenas` glibc heaps in this process and in the processes it starts after this
    (workers: MALLOC_ARENA_MAX, which glibc reads as it starts). To be called before the process
    starts threads: a thread that has an arena keeps it. 0, MALLOC_ARENA_MAX already set (the
    operator's, which glibc has applied) or no glibc: nothing is changed. Whether the limit is set."""
    if arenas <= 0 or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    if mallopt(_M_ARENA_MAX, arenas) != 1:
        return False
    os.environ["MALLOC_ARENA_MAX"] = str(arenas)
    return True


class HeapStats(NamedTuple):
    arenas: int  # glibc heaps (arenas) in use by the process
    in_use: int  # bytes malloc handed out and not yet freed
    free: int  # bytes the heaps hold free (holes and tops not given back)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_HEAP = re.compile(rb"<heap nr=")


def heap_stats() -> HeapStats | None:
    """glibc's count of heaps (malloc_info) and their bytes in use and free (mallinfo2), or None
    where there is no glibc 2.33+. Each call locks every heap in turn, for a moment: for a scrape, not
    for a hot path."""
    libc = _libc()
    if libc is None or not all(hasattr(libc, name) for name in ("mallinfo2", "malloc_info", "open_memstream", "fclose", "free")):
        return None
    libc.mallinfo2.restype = _MallInfo2
    libc.open_memstream.restype = ctypes.c_void_p
    libc.open_memstream.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t)]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    libc.free.argtypes = [ctypes.c_void_p]
    buf, size = ctypes.c_void_p(), ctypes.c_size_t()
    stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if not stream:
        return None
    try:
        libc.malloc_info(0, stream)
    finally:
        libc.fclose(stream)
    try:
        arenas = len(_HEAP.findall(ctypes.string_at(buf.value, size.value) if buf.value else b""))
    finally:
        libc.free(buf)
    info = libc.mallinfo2()
    return HeapStats(arenas, int(info.uordblks) + int(info.hblkhd), int(info.fordblks))


class MemoryTrimmer:
    """Looks at the resident size every `interval` seconds and trims when it is `growth` bytes
    above the lowest it has been: at once while it grows (again by `growth` since the last
    trim), else after a wait that doubles, up to 64 intervals, each time a trim gives back less
    than a quarter of `growth` (memory in use, a thousand streams, is not trimmed for nothing
    every few seconds).

    `release` (Database.release_connections) is called, on a thread, when such a trim of memory
    that stopped growing gave back little, and the heaps trimmed again: what a burst of large
    requests leaves in use is mostly the database connections' own buffers (libpq keeps each
    connection's input and output buffers at the largest statement or result it carried: ~13
    MiB after a batch of large rows), which only closing the connection gives back.

    `busy` (the calls under way) ends a wait: at the first look that finds no call under way
    after one that found some, memory still high is trimmed at once. The load that left it is
    over, and a wait doubled by the trims during a burst would otherwise keep what the burst left
    for up to two minutes."""

    MAX_WAIT = 64

    def __init__(
        self, interval: float, growth: int = 32 << 20, release: Callable[[], None] | None = None,
        busy: Callable[[], int] | None = None,
    ) -> None:
        self.interval = interval
        self.growth = growth
        self.trims = 0
        self.releases = 0
        self._release = release
        self._busy = busy
        self._was_busy = False
        self._trim = malloc_trim() if interval > 0 else None
        self._low = resident_bytes()
        self._last = self._low or 0  # the resident size after the last trim
        self._wait = 1  # intervals to wait before trimming memory that is high but not growing
        self._waited = 0

    @property
    def enabled(self) -> bool:
        return self._trim is not None and self._low is not None

    async def check(self) -> None:
        """One look, and a trim (on a thread) when one is due."""
        now = resident_bytes()
        if self._trim is None or now is None or self._low is None:
            return
        self._low = min(self._low, now)
        self._waited += 1
        busy = self._busy is not None and self._busy() > 0
        went_quiet, self._was_busy = self._was_busy and not busy, busy
        if now - self._low < self.growth:
            self._wait, self._waited = 1, 0
            return
        growing = now - self._last >= self.growth
        if not growing and self._waited < self._wait and not went_quiet:
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._trim)
        self.trims += 1
        after = resident_bytes() or now
        log.debug("malloc_trim: resident %d -> %d MiB", now >> 20, after >> 20)
        released = now - after
        if not growing and released < self.growth // 4 and self._release is not None:
            await loop.run_in_executor(None, self._release)
            await loop.run_in_executor(None, self._trim)
            self.releases += 1
            after = resident_bytes() or after
            log.debug("database connections renewed: resident %d MiB", after >> 20)
            released = now - after
        self._wait = 1 if growing or released >= self.growth // 4 else min(self._wait * 2, self.MAX_WAIT)
        self._waited = 0
        self._last = after

    async def run(self) -> None:
        if not self.enabled:
            return
        while True:
            await asyncio.sleep(self.interval)
            await self.check()
