"""Coalesces concurrent requests into one call of a batch function run off the event loop.

An idle batcher runs a request at once; requests that arrive while a batch is
running wait and then go together into the next one (up to `max_items`). The
queue is bounded: past `max_queue` waiting items a request is Overloaded.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import Overloaded

_In = TypeVar("_In")
_Out = TypeVar("_Out")


@dataclass(frozen=True)
class TimedOutputs(Generic[_Out]):
    """A request's outputs, the time it waited for its batch and the time that batch ran."""

    outputs: list[_Out]
    queue_seconds: float
    compute_seconds: float


# (items, their future, when they were queued, how many items they count as)
_Pending = tuple[Sequence[_In], asyncio.Future[TimedOutputs[_Out]], float, int]


class MicroBatcher(Generic[_In, _Out]):
    def __init__(
        self,
        run: Callable[[list[_In]], list[_Out]],
        *,
        executor: Executor,
        max_items: int = 1024,
        max_queue: int = 65536,
        size: Callable[[_In], int] | None = None,
    ) -> None:
        """size: how many items one input counts as, for max_items and max_queue (default 1;
        e.g. the queries of a prepared batch)."""
        self._run = run
        self._size = size
        self._executor = executor
        self._max_items = max_items
        self._max_queue = max_queue
        self._pending: deque[_Pending[_In, _Out]] = deque()
        self._queued = 0
        self._drainer: asyncio.Task[None] | None = None
        self.batches_run = 0

    async def submit(self, items: Sequence[_In]) -> TimedOutputs[_Out]:
        """The batch function's outputs for these items, in order, and how long they took."""
        if not items:
            return TimedOutputs([], 0.0, 0.0)
        count = self._count(items)
        if self._queued + count > self._max_queue:
            raise Overloaded(
                f"{self._queued} items are already queued (limit {self._max_queue}); retry later"
            )
        future: asyncio.Future[TimedOutputs[_Out]] = asyncio.get_running_loop().create_future()
        self._pending.append((items, future, time.perf_counter(), count))
        self._queued += count
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            taken: list[_Pending[_In, _Out]] = []
            count = 0
            while self._pending and (not taken or count + self._pending[0][3] <= self._max_items):
                pending = self._pending.popleft()
                self._queued -= pending[3]
                if not pending[1].done():  # a cancelled caller's items are dropped
                    taken.append(pending)
                    count += pending[3]
            if not taken:
                continue
            flat = [item for items, _, _, _ in taken for item in items]
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, flat)
            except Exception as error:
                for _, future, _, _ in taken:
                    if not future.done():
                        future.set_exception(error)
                continue
            compute_seconds = time.perf_counter() - started
            self.batches_run += 1
            start = 0
            for items, future, enqueued, _ in taken:
                if not future.done():
                    future.set_result(
                        TimedOutputs(outputs[start : start + len(items)], started - enqueued, compute_seconds)
                    )
                start += len(items)

    def _count(self, items: Sequence[_In]) -> int:
        return len(items) if self._size is None else sum(map(self._size, items))
