"""One memory budget for the whole server process.

Every request's working memory is admitted against it before its work starts: a request asks for
the bytes it will hold at most (request_memory.py estimates them), goes on at once when they fit,
and otherwise waits its turn, first come first served, for a bounded time. A request that still
does not fit is Overloaded with a retry hint; one larger than the whole budget can never run and
is LimitExceeded. docs/operations.md says how the default is chosen.

The budget lives on its server's event loop: reserve, release and shrink are called there.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import types
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import LimitExceeded, Overloaded

MEMORY_BUDGET_REASON = "MEMORY_BUDGET"
# The retry hint of a refusal: about how long a burst takes to pass, never less than this.
_MIN_RETRY_SECONDS = 0.25


def format_bytes(nbytes: float) -> str:
    """`nbytes` for a message: 1.5 GiB, 20.0 MiB, 512 B."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(nbytes) >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


def memory_limit_bytes(
    cgroups: Path = Path("/proc/self/cgroup"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    meminfo: Path = Path("/proc/meminfo"),
) -> int:
    """The memory this process may use: the lowest limit of its memory cgroup and the cgroup's
    parents (v2 memory.max, v1 memory.limit_in_bytes), or the machine's MemTotal below that."""
    limits = [_mem_total(meminfo)]
    for limit_file in _cgroup_limit_files(cgroups, cgroup_root):
        with contextlib.suppress(OSError, ValueError):
            text = limit_file.read_text().strip()
            if text != "max":
                limits.append(int(text))
    return min(limits)


def _mem_total(meminfo: Path) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"{meminfo} has no MemTotal")


def _cgroup_limit_files(cgroups: Path, cgroup_root: Path) -> Iterator[Path]:
    """The limit files of the process's memory cgroup and its parents, v2 and v1 alike (a
    container sees its own cgroup as the root)."""
    try:
        lines = cgroups.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            folder, name = cgroup_root, "memory.max"
        elif "memory" in controllers.split(","):
            folder, name = cgroup_root / "memory", "memory.limit_in_bytes"
        else:
            continue
        own = folder / path.lstrip("/")
        for ancestor in [own, *own.parents]:
            yield ancestor / name
            if ancestor == folder:
                break


@dataclass(eq=False)
class _Waiter:
    nbytes: int
    admitted: asyncio.Future[None]


class Reservation:
    """Bytes held against the budget until released; release and shrink may be called any number
    of times, and the budget's waiters are woken as bytes come back."""

    def __init__(self, budget: MemoryBudget, nbytes: int) -> None:
        self._budget = budget
        self.nbytes = nbytes

    def shrink(self, nbytes: int) -> None:
        """Keeps only `nbytes` (once a request knows what it really holds); never grows."""
        freed = self.nbytes - max(0, nbytes)
        if freed > 0:
            self.nbytes -= freed
            self._budget._give_back(freed)

    def release(self) -> None:
        self.shrink(0)

    async def __aenter__(self) -> Reservation:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        self.release()


class MemoryBudget:
    """`total_bytes` of working memory that requests share; `wait_seconds` is the longest a request
    waits for room before it is refused. `on_change(budget)` is told of every change
    (metrics)."""

    def __init__(
        self,
        total_bytes: int,
        wait_seconds: float,
        *,
        on_change: Callable[[MemoryBudget], None] | None = None,
    ) -> None:
        if total_bytes <= 0:
            raise ValueError("a memory budget must be positive")
        self.total_bytes = total_bytes
        self.wait_seconds = wait_seconds
        self.in_use_bytes = 0
        self.peak_bytes = 0
        self.released_bytes = 0  # given back since the start, in all
        self.refused = 0
        self._waiters: deque[_Waiter] = deque()
        self._on_change = on_change

    @property
    def waiting(self) -> int:
        """Requests waiting for room now."""
        return len(self._waiters)

    def check_fits(self, nbytes: int, what: str) -> None:
        """LimitExceeded when `what` needs more than the whole budget: no wait could help."""
        if nbytes > self.total_bytes:
            raise LimitExceeded(
                f"{what} needs about {format_bytes(nbytes)} of working memory, more than the server's "
                f"whole --memory-budget of {format_bytes(self.total_bytes)}; send less at once",
                limit="memory_budget",
                allowed=self.total_bytes,
                requested=nbytes,
            )

    async def reserve(self, nbytes: int, what: str) -> Reservation:
        """`nbytes` held for the caller (use the Reservation as `async with`, or release it).

        Waits while earlier requests hold the room, for at most wait_seconds; then Overloaded
        (reason MEMORY_BUDGET, with a retry hint). A caller cancelled while waiting takes
        nothing. LimitExceeded when `nbytes` exceeds the whole budget."""
        nbytes = max(0, int(nbytes))
        self.check_fits(nbytes, what)
        if not self._waiters and self._fits(nbytes):
            return self._take(nbytes)
        waiter = _Waiter(nbytes, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        started = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.admitted), self.wait_seconds)
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        if waiter.admitted.done():  # admitted, even if the timer ran out at the same moment
            return Reservation(self, nbytes)
        self._abandon(waiter)
        self.refused += 1
        waited = time.monotonic() - started
        retry = max(_MIN_RETRY_SECONDS, waited)
        raise Overloaded(
            f"{what} needs about {format_bytes(nbytes)} of working memory and the server's "
            f"--memory-budget of {format_bytes(self.total_bytes)} stayed full for {waited:.1f} s "
            f"({format_bytes(self.in_use_bytes)} in use); retry in about {retry:.1f} s",
            reason=MEMORY_BUDGET_REASON,
            retry_after=retry,
            metadata={
                "budget_bytes": str(self.total_bytes),
                "in_use_bytes": str(self.in_use_bytes),
                "requested_bytes": str(nbytes),
            },
        )

    def _fits(self, nbytes: int) -> bool:
        return self.in_use_bytes + nbytes <= self.total_bytes

    def _take(self, nbytes: int) -> Reservation:
        self._changed(nbytes)
        return Reservation(self, nbytes)

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter that gave up: its bytes go back if it was admitted meanwhile, and those behind
        it may fit now."""
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        if waiter.admitted.done() and not waiter.admitted.cancelled():
            self._give_back(waiter.nbytes)
        else:
            waiter.admitted.cancel()
            self._admit_waiters()

    def _give_back(self, nbytes: int) -> None:
        self.released_bytes += nbytes
        self._changed(-nbytes)
        self._admit_waiters()

    def _admit_waiters(self) -> None:
        """Admits waiters in order while the first one fits (a large request is not overtaken)."""
        while self._waiters and self._fits(self._waiters[0].nbytes):
            waiter = self._waiters.popleft()
            if waiter.admitted.done():
                continue
            self._changed(waiter.nbytes)
            waiter.admitted.set_result(None)

    def _changed(self, by: int) -> None:
        self.in_use_bytes += by
        self.peak_bytes = max(self.peak_bytes, self.in_use_bytes)
        if self._on_change is not None:
            self._on_change(self)
