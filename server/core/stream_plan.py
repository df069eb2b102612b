"""Planning a StreamBatches stream (no gRPC here).

`plan_stream` turns a request's settings, its source and the server's limits into a
`StreamPlan`: every setting is checked before anything streams, the cursor is decoded (or the
stream starts at its first epoch), and the plan decides how many batches one reply message
holds. The plan then names the stream's batches in order, gathers each batch's windows and
encodes the cursor that resumes right after it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import numpy.typing as npt

from .corpus_tokens import CorpusTokens
from .cursor import Position, StreamSettings, decode_cursor, encode_cursor
from .errors import InvalidInput, PreconditionFailed
from .limits import RequestLimits
from .window_orders import InMemoryOrders, OrderStore
from .windows import PlannedBatch, WindowPlan, iterate_batches, plan_windows

MAX_BATCHES_PER_MESSAGE = 256
# Batches ahead of the one being gathered whose shards a source on slow storage starts fetching.
_PREFETCH_BATCHES = 16
# Per batch: inputs and targets (int32 each), and room for the reply's other fields.
_WINDOW_TOKEN_BYTES = 2 * 4
_BATCH_OVERHEAD_BYTES = 1024

TokenIds = npt.NDArray[np.integer]
# Told of every batch whose windows a stream gathers, with the stream's settings (a seam for
# tests and instrumentation; None costs nothing).
BatchObserver = Callable[[StreamSettings, PlannedBatch], None]


@dataclass(frozen=True)
class StreamRequest:
    """A StreamBatches request's settings as the wire carries them: 0 and empty mean unset."""

    max_length: int
    stride: int
    batch_size: int
    shuffle: bool = False
    seed: int = 0
    drop_last: bool = False
    epoch: int = 0
    epochs: int = 0  # 0: one epoch
    rank: int = 0
    world_size: int = 0  # 0: one rank
    cursor: bytes = b""
    batches_per_message: int = 0  # 0: one batch per message
    include_embeddings: bool = False


@dataclass(frozen=True)
class StreamSource:
    """The tokens a stream reads (their identity is what cursors carry), the tokenizer that made
    them (its name, and how many IDs it has), and where its shuffled orders are kept."""

    tokens: CorpusTokens
    tokenizer: str
    tokenizer_vocab: int
    orders: OrderStore = field(default_factory=InMemoryOrders)


class EmbeddingTableShape(Protocol):
    """The sizes of the embedding model that embeds the batches (EmbeddingModel has them)."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def dim(self) -> int: ...

    @property
    def context_length(self) -> int: ...


@dataclass(frozen=True)
class StreamPlan:
    """A checked stream: where it starts and ends, and how its replies are sized."""

    settings: StreamSettings
    tokens: CorpusTokens
    start: Position
    last_epoch: int
    include_embeddings: bool
    batch_bytes: int  # the reply size of one batch, embeddings included
    batches_per_message: int
    plan_for: Callable[[int], WindowPlan]

    def batches(self) -> Iterator[PlannedBatch]:
        """The stream's batches from its start to the end of its last epoch."""
        return iterate_batches(
            self.plan_for, epoch=self.start.epoch, index=self.start.batch, last_epoch=self.last_epoch
        )

    def windows(self, batch: PlannedBatch) -> tuple[TokenIds, TokenIds]:
        """The batch's inputs and targets, [windows, max_length] each, in the source's dtype."""
        spans = self.tokens.spans(batch.starts, self.settings.max_length + 1)
        return np.ascontiguousarray(spans[:, :-1]), np.ascontiguousarray(spans[:, 1:])

    def ready(self, batch: PlannedBatch) -> bool:
        """False when gathering the batch would wait for storage."""
        return self.tokens.ready(batch.starts, self.settings.max_length + 1)

    def prefetch_after(self, batch: PlannedBatch, previous: PlannedBatch | None) -> None:
        """Hints the source with the windows of the batches after `batch` in its epoch: all of the
        next few when the stream starts or enters a new epoch (`previous` None or of another epoch),
        else only the one batch that has just come within reach (the others were hinted before)."""
        plan = batch.plan
        if previous is None or previous.epoch != batch.epoch:
            following = range(batch.index + 1, min(batch.index + 1 + _PREFETCH_BATCHES, plan.num_batches))
        else:
            ahead = batch.index + _PREFETCH_BATCHES
            following = range(ahead, ahead + 1) if ahead < plan.num_batches else range(0)
        if following:
            starts = np.concatenate([plan.batch_starts(index) for index in following])
            self.tokens.prefetch(starts, self.settings.max_length + 1)

    def cursor_after(self, batch: PlannedBatch) -> bytes:
        """The cursor that resumes the stream right after `batch`."""
        return encode_cursor(self.settings, Position(batch.next_epoch, batch.next_index))


def plan_stream(
    request: StreamRequest,
    source: StreamSource,
    *,
    limits: RequestLimits,
    model: EmbeddingTableShape,
    embeddings_itemsize: int,
) -> StreamPlan:
    """The checked plan of a stream; InvalidInput, LimitExceeded or PreconditionFailed say what is
    wrong. `embeddings_itemsize`: bytes per element of the embeddings (when included)."""
    num_tokens = source.tokens.num_tokens
    world_size = request.world_size or 1

    @functools.lru_cache(maxsize=2)
    def plan_for(epoch: int) -> WindowPlan:
        return plan_windows(
            num_tokens=num_tokens,
            max_length=request.max_length,
            stride=request.stride,
            batch_size=request.batch_size,
            shuffle=request.shuffle,
            seed=request.seed,
            drop_last=request.drop_last,
            max_batch_size=limits.max_batch_size,
            epoch=epoch,
            rank=request.rank,
            world_size=world_size,
            orders=source.orders,
        )

    first = plan_for(request.epoch)  # checks every setting before anything streams
    settings = StreamSettings(
        source_sha256=source.tokens.identity,
        tokenizer=source.tokenizer,
        max_length=first.max_length,
        stride=first.stride,
        batch_size=first.batch_size,
        drop_last=first.drop_last,
        seed=request.seed,
        shuffle=request.shuffle,
        rank=request.rank,
        world_size=world_size,
    )
    start = Position(request.epoch, 0)
    if request.cursor:
        start = decode_cursor(request.cursor, settings)
        if start.epoch < request.epoch:
            raise PreconditionFailed(
                f"the cursor is in epoch {start.epoch}, before this request's first epoch {request.epoch}"
            )
    tokens_per_batch = first.batch_size * first.max_length
    batch_bytes = _WINDOW_TOKEN_BYTES * tokens_per_batch + _BATCH_OVERHEAD_BYTES
    if request.include_embeddings:
        _check_embeddable(first.max_length, source, model)
        batch_bytes += tokens_per_batch * model.dim * embeddings_itemsize
    limits.check_reply_bytes(batch_bytes, f"a batch of {first.batch_size} x {first.max_length}")
    per_message = min(max(1, request.batches_per_message), MAX_BATCHES_PER_MESSAGE)
    per_message = max(1, min(per_message, limits.max_message_bytes // batch_bytes))
    return StreamPlan(
        settings=settings,
        tokens=source.tokens,
        start=start,
        last_epoch=request.epoch + max(1, request.epochs) - 1,
        include_embeddings=request.include_embeddings,
        batch_bytes=batch_bytes,
        batches_per_message=per_message,
        plan_for=plan_for,
    )


def _check_embeddable(max_length: int, source: StreamSource, model: EmbeddingTableShape) -> None:
    """InvalidInput unless the model can embed every window: positions within its context, and
    every token ID within its vocabulary."""
    if max_length > model.context_length:
        raise InvalidInput(
            f"max_length {max_length} exceeds the context length {model.context_length}, "
            "so the windows have no positional embedding"
        )
    # A prepared corpus holds only its tokenizer's IDs: no need to scan a mapped file for them.
    if source.tokens.ids_checked and source.tokenizer_vocab <= model.vocab_size:
        return
    largest = source.tokens.max_id()
    if largest >= model.vocab_size:
        raise InvalidInput(
            f"the source has token id {largest}, outside the embedding model's vocabulary "
            f"[0, {model.vocab_size}); stream it without include_embeddings"
        )
