"""Coalesces concurrent requests into one call of a batch function run off the event loop.

One queue, one drain task and one policy serve every batched RPC: Embed, EmbedStream and
StreamBatches' embeddings (EmbedBatcher: token budgets, a short wait for more, one output dtype
per batch) and MostSimilar (prepared query batches, sized by their queries).

- An idle batcher runs a request at once. Requests that arrive while a batch runs queue, and
  when it ends, everything queued that fits `max_batch` (counted in `size` units) goes into the
  next one; a request larger than the budget runs alone. `max_batch` 0 turns merging off.
- A request's `key` (e.g. its output dtype) keeps it out of batches of another key: it keeps its
  place for a later batch.
- Right after a batch, a partial batch smaller than `enough_to_run` may wait up to `max_wait_us`
  for more; that only pays while requests keep arriving, so an idle batcher never waits.
- The queue is bounded: past `max_queue` units a request is Overloaded, with a retry hint from
  the measured time per unit (a request that finds the queue empty is always admitted).
- A caller that goes away (cancelled, deadline) gives its place back at once.
- A merged batch that fails runs again one request at a time: one bad request fails its own
  caller, not its neighbours.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Generic, TypeVar

from .errors import Overloaded

QUEUE_FULL_REASON = "QUEUE_FULL"
_In = TypeVar("_In")
_Out = TypeVar("_Out")


@dataclass(frozen=True)
class TimedOutputs(Generic[_Out]):
    """A request's outputs, the time it waited for its batch and the time that batch ran."""

    outputs: list[_Out]
    queue_seconds: float
    compute_seconds: float


@dataclass
class BatcherStats:
    batches: int = 0
    requests: int = 0
    items: int = 0  # in `size` units: tokens, queries
    largest_batch_requests: int = 0


class _Request(Generic[_In, _Out]):
    """One caller's place in the queue (compared by identity: items may hold tensors)."""

    __slots__ = ("enqueued", "future", "items", "key", "size")

    def __init__(
        self,
        items: Sequence[_In],
        future: asyncio.Future[TimedOutputs[_Out]],
        size: int,
        key: Hashable,
    ) -> None:
        self.items = items
        self.future = future
        self.size = size
        self.key = key
        self.enqueued = time.perf_counter()


class Batcher(Generic[_In, _Out]):
    def __init__(
        self,
        run: Callable[[list[_In]], list[_Out]],
        *,
        executor: Executor,
        max_batch: int = 1024,
        max_queue: int = 65536,
        size: Callable[[_In], int] | None = None,
        max_wait_us: int = 0,
        enough_to_run: int = 1024,
        unit: str = "items",
        queue_limit: str = "limit",
        seconds_per_item: float = 1e-6,
        on_batch: Callable[[int, int, list[float]], None] | None = None,
        on_queue_change: Callable[[int], None] | None = None,
    ) -> None:
        """run(items) -> one output per item, in order, called in `executor`.

        size: how many units one item counts as, for max_batch and max_queue (default 1; e.g. a
        job's tokens, a prepared batch's queries). unit and queue_limit name those units and the
        queue's limit in the Overloaded message; seconds_per_item starts the retry hint's
        estimate. on_batch(requests, items, queue_seconds_of_each) is called after every batch,
        and on_queue_change(queued_items) whenever the queue grows or shrinks (metrics).
        """
        self._run = run
        self._executor = executor
        self._size = size
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._max_wait = max_wait_us / 1e6
        # A partial batch waits for more only while it is smaller than this (0: never).
        self._worth_waiting_below = min(max_batch, enough_to_run)
        self._unit = unit
        self._queue_limit = queue_limit
        self._seconds_per_item = seconds_per_item  # running estimate, for the retry hint
        self._on_batch = on_batch
        self._on_queue_change = on_queue_change
        self._pending: deque[_Request[_In, _Out]] = deque()
        self._queued = 0
        self._arrived = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._last_batch_end = 0.0
        self._alone = 0  # how many queued requests run one at a time (after a merged batch failed)
        self.stats = BatcherStats()

    @property
    def queued(self) -> int:
        """Units waiting for a batch."""
        return self._queued

    @property
    def waiting_requests(self) -> int:
        """Requests the queue still holds (none once every caller is answered or gone)."""
        return len(self._pending)

    def _queue_changed(self, by: int) -> None:
        self._queued += by
        if self._on_queue_change is not None:
            self._on_queue_change(self._queued)

    async def submit(self, items: Sequence[_In], *, key: Hashable = None) -> TimedOutputs[_Out]:
        """The batch function's outputs for these items, in order, and how long they took."""
        if not items:
            return TimedOutputs([], 0.0, 0.0)
        count = len(items) if self._size is None else sum(map(self._size, items))
        if self._queued + count > self._max_queue and self._queued > 0:
            retry_ms = max(1, round(1000 * self._queued * self._seconds_per_item))
            raise Overloaded(
                f"{self._queued} {self._unit} are already queued ({self._queue_limit} {self._max_queue}); "
                f"retry in about {retry_ms} ms",
                reason=QUEUE_FULL_REASON,
                retry_after=retry_ms / 1000,
            )
        request: _Request[_In, _Out] = _Request(items, asyncio.get_running_loop().create_future(), count, key)
        self._pending.append(request)
        self._queue_changed(count)
        self._arrived.set()
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        try:
            return await request.future
        except asyncio.CancelledError:
            # The caller went away: give its place back now, not when the drainer next reaches
            # it, so the queue bound and gauge stay true.
            for index, queued in enumerate(self._pending):
                if queued is request:
                    del self._pending[index]
                    self._queue_changed(-count)
                    break
            raise

    def _take(self) -> list[_Request[_In, _Out]]:
        """The next batch: the first queued request and those after it of its key that fit the budget."""
        taken: list[_Request[_In, _Out]] = []
        kept: list[_Request[_In, _Out]] = []
        size = left = 0
        while self._pending:
            request = self._pending.popleft()
            if request.future.done():  # its caller went away
                left += request.size
                continue
            if taken:
                if not self._max_batch or self._alone or size + request.size > self._max_batch:
                    kept.append(request)
                    break
                if request.key != taken[0].key:
                    kept.append(request)
                    continue
            taken.append(request)
            size += request.size
        self._pending.extendleft(reversed(kept))
        if size or left:
            self._queue_changed(-(size + left))
        self._alone = max(0, self._alone - len(taken))
        return taken

    def _worth_waiting(self) -> bool:
        return (
            self._max_wait > 0
            and self._queued < self._worth_waiting_below
            and time.perf_counter() - self._last_batch_end < self._max_wait
        )

    async def _wait_for_more(self) -> None:
        deadline = self._last_batch_end + self._max_wait
        while self._queued < self._worth_waiting_below:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                return

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            if self._worth_waiting():
                await self._wait_for_more()
            taken = self._take()
            if not taken:
                continue
            flat = list(taken[0].items) if len(taken) == 1 else [item for r in taken for item in r.items]
            started = time.perf_counter()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, flat)
            except Exception as error:
                self._last_batch_end = time.perf_counter()
                if len(taken) == 1:
                    if not taken[0].future.done():
                        taken[0].future.set_exception(error)
                    continue
                # One bad request must not fail its neighbours: run them one by one.
                self._pending.extendleft(reversed(taken))
                self._queue_changed(sum(request.size for request in taken))
                self._alone = len(taken)
                continue
            self._last_batch_end = time.perf_counter()
            compute = self._last_batch_end - started
            items = sum(request.size for request in taken)
            self._seconds_per_item = 0.8 * self._seconds_per_item + 0.2 * compute / max(1, items)
            self.stats.batches += 1
            self.stats.requests += len(taken)
            self.stats.items += items
            self.stats.largest_batch_requests = max(self.stats.largest_batch_requests, len(taken))
            waits = [started - request.enqueued for request in taken]
            if self._on_batch is not None:
                self._on_batch(len(taken), items, waits)
            start = 0
            for request, waited in zip(taken, waits, strict=True):
                end = start + len(request.items)
                if not request.future.done():
                    request.future.set_result(TimedOutputs(outputs[start:end], waited, compute))
                start = end
