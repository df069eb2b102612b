"""Sliding windows over a token stream, batched the way a torch DataLoader does.

The reference notebook's GPTDatasetV1 makes one window per start position in
`range(0, len(ids) - max_length, stride)`; the input is ids[i : i + max_length]
and the target the same window shifted by one token. Here a window is only its
index until a batch is gathered, and the order of an epoch's windows comes from a
WindowOrder (window_orders.py): none stored unshuffled, a memory-mapped file for a large
shuffled corpus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .errors import InvalidInput, LimitExceeded, PreconditionFailed
from .window_orders import InMemoryOrders, OrderStore, SequentialOrder, WindowIndices, WindowOrder

_IN_MEMORY = InMemoryOrders()


@dataclass(frozen=True)
class WindowPlan:
    """Which windows go into which of one rank's batches, for one epoch over a token stream.

    A global batch is world_size * batch_size consecutive windows of the epoch's order; rank r
    gets the r-th batch_size of each. With drop_last, only whole global batches are read (the
    tail of fewer than world_size * batch_size windows is dropped, so every rank has the same
    number of batches); without it, the tail is dealt out in the same way, so later ranks may
    get a short batch or one batch fewer, and every window is read exactly once.
    """

    num_tokens: int
    max_length: int
    stride: int
    batch_size: int
    drop_last: bool
    order: WindowOrder
    rank: int = 0
    world_size: int = 1

    @property
    def num_windows(self) -> int:
        return len(self.order)

    @property
    def num_batches(self) -> int:
        global_size = self.batch_size * self.world_size
        full = self.num_windows // global_size
        if self.drop_last:
            return full
        tail = self.num_windows - full * global_size
        return full + (1 if tail > self.rank * self.batch_size else 0)

    def batch_starts(self, batch_index: int) -> WindowIndices:
        """Start positions in the token stream of the windows of one of this rank's batches."""
        if not 0 <= batch_index < self.num_batches:
            raise IndexError(f"batch {batch_index} of {self.num_batches}")
        first = batch_index * self.batch_size * self.world_size + self.rank * self.batch_size
        return self.order[first : first + self.batch_size] * self.stride


def count_windows(num_tokens: int, max_length: int, stride: int) -> int:
    """len(range(0, num_tokens - max_length, stride)), as GPTDatasetV1 counts."""
    return len(range(0, num_tokens - max_length, stride))


def plan_windows(
    *,
    num_tokens: int,
    max_length: int,
    stride: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool,
    max_batch_size: int | None = None,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    orders: OrderStore = _IN_MEMORY,
) -> WindowPlan:
    """The checked plan of one epoch; `orders` makes its shuffled order (in memory unless given)."""
    for name, value in (("batch_size", batch_size), ("max_length", max_length), ("stride", stride)):
        if value <= 0:
            raise InvalidInput(f"{name} must be positive, got {value}")
    if max_batch_size is not None and batch_size > max_batch_size:
        raise LimitExceeded(
            f"batch_size {batch_size} is over the server's --max-batch-size {max_batch_size}",
            limit="max_batch_size",
            allowed=max_batch_size,
            requested=batch_size,
        )
    if not 0 <= seed < 2**64:
        raise InvalidInput(f"seed must be in [0, 2**64), got {seed}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise InvalidInput(f"rank must be in [0, world_size), got rank {rank} of world_size {world_size}")
    if epoch < 0:
        raise InvalidInput(f"epoch must be >= 0, got {epoch}")
    num_windows = count_windows(num_tokens, max_length, stride)
    if num_windows == 0:
        raise InvalidInput(
            f"the source has {num_tokens} tokens: max_length {max_length} needs at least "
            f"{max_length + 1} for one window"
        )
    if drop_last and num_windows < batch_size * world_size:
        raise InvalidInput(
            f"{num_windows} windows make no full batch of {batch_size}"
            + (f" for each of {world_size} ranks" if world_size > 1 else "")
            + " with drop_last; lower batch_size or set drop_last false"
        )
    order = orders.shuffled(num_windows, seed, epoch) if shuffle else SequentialOrder(num_windows)
    return WindowPlan(num_tokens, max_length, stride, batch_size, drop_last, order, rank, world_size)


def gather_windows(
    tokens: npt.NDArray[np.integer], starts: WindowIndices, max_length: int
) -> tuple[npt.NDArray[np.integer], npt.NDArray[np.integer]]:
    """Inputs and targets [len(starts), max_length] for the given window starts."""
    offsets = starts[:, None] + np.arange(max_length + 1, dtype=np.int64)[None, :]
    spans = tokens[offsets]
    return np.ascontiguousarray(spans[:, :-1]), np.ascontiguousarray(spans[:, 1:])


@dataclass(frozen=True)
class PlannedBatch:
    """One batch of a stream: where it is, its windows' start positions, and where the stream goes next."""

    epoch: int
    index: int
    starts: WindowIndices
    plan: WindowPlan
    next_epoch: int
    next_index: int


def iterate_batches(
    plan_for: Callable[[int], WindowPlan], *, epoch: int, index: int, last_epoch: int
) -> Iterator[PlannedBatch]:
    """The batches from (epoch, index) to the end of last_epoch; plan_for(e) plans epoch e.

    Resuming at the (next_epoch, next_index) of any batch continues with exactly the batches
    that followed it, which is what stream cursors rely on.
    """
    for current in range(epoch, last_epoch + 1):
        plan = plan_for(current)
        first = index if current == epoch else 0
        if first > plan.num_batches:
            raise PreconditionFailed(
                f"batch {first} is past the end of epoch {current} ({plan.num_batches} batches)"
            )
        for position in range(first, plan.num_batches):
            last = position + 1 == plan.num_batches
            yield PlannedBatch(
                epoch=current,
                index=position,
                starts=plan.batch_starts(position),
                plan=plan,
                next_epoch=current + 1 if last else current,
                next_index=0 if last else position + 1,
            )
