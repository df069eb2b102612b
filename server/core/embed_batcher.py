"""Dynamic batching of Embed requests onto the device-resident model.

Concurrent requests are merged into one lookup (EmbeddingModel.embed_many) under a
token budget, run in the model's worker thread, and their results split back to
the callers. An idle batcher runs a request at once; while the device is busy,
requests queue, and when a batch ends everything queued (up to the budget) goes
into the next one. Right after a batch, a partial batch of fewer than ENOUGH_TO_RUN_TOKENS
may wait up to `max_wait_us` for more requests (it only pays while requests keep
arriving). The queue is bounded in tokens: past `max_queue_tokens` a request is
Overloaded with a retry hint.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .embedding import EmbeddingModel, EmbedJob
from .errors import Overloaded

# A batch this large runs without waiting for more: its lookup already costs more than the
# per-batch overhead that merging saves. (asyncio's timers wake no sooner than the next
# millisecond, so a wait of 200 us holds a batch for about 1 ms.)
ENOUGH_TO_RUN_TOKENS = 1024


@dataclass(frozen=True)
class Timed:
    result: torch.Tensor
    queue_seconds: float
    compute_seconds: float


@dataclass
class BatcherStats:
    batches: int = 0
    requests: int = 0
    tokens: int = 0
    largest_batch_requests: int = 0


class EmbedBatcher:
    def __init__(
        self,
        model: EmbeddingModel,
        *,
        max_batch_tokens: int = 65536,
        max_wait_us: int = 0,
        max_queue_tokens: int = 1 << 22,
        on_batch: Callable[[int, int, list[float]], None] | None = None,
        on_queue_change: Callable[[int], None] | None = None,
    ) -> None:
        """max_batch_tokens 0 turns merging off: each request is its own batch.

        on_batch(requests, tokens, queue_seconds_of_each) is called after every batch, and
        on_queue_change(queued_tokens) whenever the queue grows or shrinks (metrics).
        """
        self._model = model
        self._max_batch_tokens = max_batch_tokens
        self._max_wait = max_wait_us / 1e6
        # A partial batch waits for more only while it is smaller than this (0: never).
        self._worth_waiting_below = min(max_batch_tokens, ENOUGH_TO_RUN_TOKENS)
        self._max_queue_tokens = max_queue_tokens
        self._pending: deque[tuple[EmbedJob, asyncio.Future[Timed]]] = deque()
        self._on_batch = on_batch
        self._on_queue_change = on_queue_change
        self._queued_tokens = 0
        self._arrived = asyncio.Event()
        self._drainer: asyncio.Task[None] | None = None
        self._last_batch_end = 0.0
        self._seconds_per_token = 1e-7  # running estimate, for the retry hint
        self._alone = 0  # how many queued jobs run one at a time (after a merged batch failed)
        self.stats = BatcherStats()
        self._enqueued: dict[int, float] = {}

    @property
    def queued_tokens(self) -> int:
        return self._queued_tokens

    def _queue_changed(self, by_tokens: int) -> None:
        self._queued_tokens += by_tokens
        if self._on_queue_change is not None:
            self._on_queue_change(self._queued_tokens)

    async def embed(self, job: EmbedJob) -> torch.Tensor:
        """The job's embeddings on the CPU, [*ids.shape, D], in the job's output dtype."""
        return (await self.embed_timed(job)).result

    async def embed_timed(self, job: EmbedJob) -> Timed:
        """embed(), with how long the job waited for the device and how long its batch took."""
        if self._queued_tokens + job.tokens > self._max_queue_tokens and self._queued_tokens > 0:
            retry_ms = max(1, round(1000 * self._queued_tokens * self._seconds_per_token))
            raise Overloaded(
                f"{self._queued_tokens} tokens are already queued (--max-queue {self._max_queue_tokens}); "
                f"retry in about {retry_ms} ms"
            )
        future: asyncio.Future[Timed] = asyncio.get_running_loop().create_future()
        self._enqueued[id(future)] = time.perf_counter()
        entry = (job, future)
        self._pending.append(entry)
        self._queue_changed(job.tokens)
        self._arrived.set()
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        try:
            return await future
        except asyncio.CancelledError:
            # The caller went away (cancelled, deadline): give its place back now, not
            # when the drainer next reaches it, so the queue bound and gauge stay true.
            for index, queued in enumerate(self._pending):
                if queued is entry:  # identity: jobs hold tensors, which do not compare
                    del self._pending[index]
                    self._enqueued.pop(id(future), None)
                    self._queue_changed(-job.tokens)
                    break
            raise

    def _take(self) -> list[tuple[EmbedJob, asyncio.Future[Timed]]]:
        """The next batch: the first queued job and those after it of its output dtype that fit the budget.

        Jobs of another output dtype keep their place for a later batch.
        """
        taken: list[tuple[EmbedJob, asyncio.Future[Timed]]] = []
        kept: list[tuple[EmbedJob, asyncio.Future[Timed]]] = []
        tokens = left = 0
        while self._pending:
            job, future = self._pending.popleft()
            if future.done():  # its caller went away
                left += job.tokens
                self._enqueued.pop(id(future), None)
                continue
            if taken:
                if not self._max_batch_tokens or self._alone or tokens + job.tokens > self._max_batch_tokens:
                    kept.append((job, future))
                    break
                if job.output_dtype != taken[0][0].output_dtype:
                    kept.append((job, future))
                    continue
            taken.append((job, future))
            tokens += job.tokens
        self._pending.extendleft(reversed(kept))
        if tokens or left:
            self._queue_changed(-(tokens + left))
        self._alone = max(0, self._alone - len(taken))
        return taken

    def _worth_waiting(self) -> bool:
        return (
            self._max_wait > 0
            and self._queued_tokens < self._worth_waiting_below
            and time.perf_counter() - self._last_batch_end < self._max_wait
        )

    async def _wait_for_more(self) -> None:
        deadline = self._last_batch_end + self._max_wait
        while self._queued_tokens < self._worth_waiting_below:
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
            jobs = [job for job, _ in taken]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._model.executor, self._model.embed_many, jobs)
            except Exception as error:
                self._last_batch_end = time.perf_counter()
                if len(taken) == 1:
                    self._enqueued.pop(id(taken[0][1]), None)
                    if not taken[0][1].done():
                        taken[0][1].set_exception(error)
                    continue
                # One bad job must not fail its neighbours: run them one by one.
                self._pending.extendleft(reversed(taken))
                self._queue_changed(sum(job.tokens for job in jobs))
                self._alone = len(taken)
                continue
            self._last_batch_end = time.perf_counter()
            tokens = sum(job.tokens for job in jobs)
            self._seconds_per_token = 0.8 * self._seconds_per_token + 0.2 * (
                (self._last_batch_end - started) / max(1, tokens)
            )
            self.stats.batches += 1
            self.stats.requests += len(jobs)
            self.stats.tokens += tokens
            self.stats.largest_batch_requests = max(self.stats.largest_batch_requests, len(jobs))
            compute = self._last_batch_end - started
            waits = [started - self._enqueued.pop(id(future), started) for _, future in taken]
            if self._on_batch is not None:
                self._on_batch(len(jobs), tokens, waits)
            for (_, future), result, waited in zip(taken, results, waits, strict=True):
                if not future.done():
                    future.set_result(Timed(result, waited, compute))
