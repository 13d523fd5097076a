"""Memory the server freed goes back to the operating system.

glibc keeps the memory a process frees in its heaps (one per thread that allocates, up to eight
per core) for later reuse, and gives back only what lies at the top of the main heap. After a
burst of large requests (field values at their limits, 4 MiB pages) the server's RSS stayed
far above where it was, for good (bench/rss_after_large.py, bench/README.md). malloc_trim(0) returns the
free pages of every heap: a MemoryTrimmer calls it, on a thread (ctypes releases the GIL),
whenever the resident size has grown by `growth` bytes since the last trim; a steady server
never trims. Where there is no glibc (musl) or no /proc, it does nothing.
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Callable

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


class MemoryTrimmer:
    """Looks at the resident size every `interval` seconds and trims when it is `growth` bytes
    above the lowest it has been: at once while it grows (again by `growth` since the last
    trim), else after a wait that doubles, up to 64 intervals, each time a trim gives back less
    than a quarter of `growth` (memory in use, a thousand streams, is not trimmed for nothing
    every few seconds)."""

    MAX_WAIT = 64

    def __init__(self, interval: float, growth: int = 32 << 20) -> None:
        self.interval = interval
        self.growth = growth
        self.trims = 0
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
        if now - self._low < self.growth:
            self._wait, self._waited = 1, 0
            return
        growing = now - self._last >= self.growth
        if not growing and self._waited < self._wait:
            return
        await asyncio.get_running_loop().run_in_executor(None, self._trim)
        self.trims += 1
        after = resident_bytes() or now
        log.debug("malloc_trim: resident %d -> %d MiB", now >> 20, after >> 20)
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
