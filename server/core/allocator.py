"""glibc's allocator: kept from unmapping reply buffers under load, and asked to give freed memory
back to the kernel once a burst has passed.

Each reply holds a few buffers of megabytes; by default glibc maps and unmaps each one, and the
page faults of touching fresh pages cost more than the lookup itself (docs/performance.md has
the measurement), so `tune_allocator` raises its thresholds. Freed memory then stays in the
process for reuse, also after a burst: `AllocatorTrimmer` calls malloc_trim when private memory
has grown after a burst (docs/operations.md compares this with other allocators).
Every function is a no-op off glibc.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import time
from collections.abc import Callable
from functools import cache
from typing import Any

_LOGGER = logging.getLogger(__name__)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@cache
def _libc() -> Any:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc has both
    except (OSError, AttributeError):
        return None
    return libc


def tune_allocator() -> None:
    """Keeps glibc from returning every reply's buffers to the kernel (see the module): buffers
    under 32 MiB come from its heaps and stay there for reuse, and a heap gives back its free top
    only beyond 32 MiB. Larger buffers are mapped and unmapped: what they held leaves with them."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        libc.mallopt(_M_TRIM_THRESHOLD, 32 * 1024 * 1024)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks")
    ] + [("fordblks", ctypes.c_size_t), ("keepcost", ctypes.c_size_t)]


def free_heap_bytes() -> int | None:
    """Bytes glibc holds freed in its arenas, ready for reuse (mallinfo2's fordblks); None off
    glibc 2.33+."""
    libc = _libc()
    mallinfo2 = getattr(libc, "mallinfo2", None) if libc is not None else None
    if mallinfo2 is None:
        return None
    mallinfo2.restype = _Mallinfo2
    return int(mallinfo2().fordblks)


def trim() -> bool:
    """Gives the free memory of every malloc arena back to the kernel; True when some was."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))


def private_memory_bytes(pid: int | str = "self") -> int:
    """A process's private memory: RssAnon + RssShmem (VmRSS also counts each mapping of a
    memory-mapped corpus or vector file)."""
    total = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("RssAnon:", "RssShmem:")):
                total += int(line.split()[1]) * 1024
    return total


class AllocatorTrimmer:
    """Gives memory freed after a burst back to the kernel: every `interval` seconds, when the
    process's private memory, the memory glibc holds freed for reuse, or the bytes requests gave
    back to the memory budget (`released()`) have grown by `min_growth` since the last trim, it
    collects garbage (a call that ended with an error stays in a reference cycle with its
    frames, replies included) and trims.

    Under steady load memory stays level, so freed buffers stay for reuse (what tune_allocator is
    for); after a burst (large requests, replies to slow readers, gRPC's own buffers) private
    memory falls back within about two intervals."""

    def __init__(
        self, released: Callable[[], int], interval: float = 5.0, min_growth: int = 64 << 20
    ) -> None:
        self._released = released
        self._interval = interval
        self._min_growth = min_growth
        self.trims = 0

    def _levels(self) -> tuple[int, int, int]:
        return private_memory_bytes(), free_heap_bytes() or 0, self._released()

    async def run(self) -> None:
        """Runs until cancelled (a no-op off glibc, without /proc, or with an interval of 0)."""
        if _libc() is None or self._interval <= 0:
            return
        loop = asyncio.get_running_loop()
        try:
            levels = self._levels()
        except OSError:
            return
        while True:
            await asyncio.sleep(self._interval)
            now = self._levels()
            if all(current - last < self._min_growth for current, last in zip(now, levels, strict=True)):
                levels = (min(levels[0], now[0]), min(levels[1], now[1]), levels[2])
                continue
            started = time.perf_counter()
            collected = gc.collect()
            await loop.run_in_executor(None, trim)
            levels = self._levels()
            self.trims += 1
            _LOGGER.debug(
                "allocator trimmed from %d to %d MiB in %.1f ms (%d objects collected, %d MiB kept free)",
                now[0] >> 20, levels[0] >> 20, 1000 * (time.perf_counter() - started), collected,
                levels[1] >> 20,
            )  # fmt: skip
