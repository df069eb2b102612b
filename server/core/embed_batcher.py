"""Dynamic batching of Embed lookups onto the device-resident model.

Concurrent jobs (Embed calls, EmbedStream windows, StreamBatches' embeddings) are merged into
one lookup (EmbeddingModel.embed_many) under a token budget, run in the model's worker thread,
and their results split back to the callers. The queueing policy is the shared Batcher's (see
core/batcher.py); here it counts tokens, keeps each batch to one output dtype, and lets a
partial batch of fewer than ENOUGH_TO_RUN_TOKENS wait up to `max_wait_us` for more.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .batcher import Batcher, BatcherStats, TimedOutputs
from .embedding import EmbeddingModel, EmbedJob

# A batch this large runs without waiting for more: its lookup already costs more than the
# per-batch overhead that merging saves. (asyncio's timers wake no sooner than the next
# millisecond, so a wait of 200 us holds a batch for about 1 ms.)
ENOUGH_TO_RUN_TOKENS = 1024
# Where the retry hint's estimate of the time per token starts, before the first batch.
_INITIAL_SECONDS_PER_TOKEN = 1e-7


def _tokens(job: EmbedJob) -> int:
    return job.tokens


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
        """max_batch_tokens 0 turns merging off: each request is its own batch. Past
        max_queue_tokens queued, a job is Overloaded with a retry hint.

        on_batch(requests, tokens, queue_seconds_of_each) is called after every batch, and
        on_queue_change(queued_tokens) whenever the queue grows or shrinks (metrics).
        """
        self._model = model
        self._batcher: Batcher[EmbedJob, torch.Tensor] = Batcher(
            self._embed_many,
            executor=model.device_thread,
            max_batch=max_batch_tokens,
            max_queue=max_queue_tokens,
            size=_tokens,
            max_wait_us=max_wait_us,
            enough_to_run=ENOUGH_TO_RUN_TOKENS,
            unit="tokens",
            queue_limit="--max-queue",
            seconds_per_item=_INITIAL_SECONDS_PER_TOKEN,
            on_batch=on_batch,
            on_queue_change=on_queue_change,
        )

    def _embed_many(self, jobs: list[EmbedJob]) -> list[torch.Tensor]:
        return self._model.embed_many(jobs)  # looked up at each batch, so a wrapped model is honoured

    @property
    def stats(self) -> BatcherStats:
        """Batches run so far; `items` counts their tokens."""
        return self._batcher.stats

    @property
    def queued_tokens(self) -> int:
        return self._batcher.queued

    @property
    def waiting_requests(self) -> int:
        return self._batcher.waiting_requests

    async def embed(self, job: EmbedJob) -> torch.Tensor:
        """The job's embeddings on the CPU, [*ids.shape, D], in the job's output dtype."""
        return (await self.embed_timed(job)).outputs[0]

    async def embed_timed(self, job: EmbedJob) -> TimedOutputs[torch.Tensor]:
        """embed() (the one output), with how long the job waited for the device and how long
        its batch took."""
        return await self._batcher.submit((job,), key=job.output_dtype)
