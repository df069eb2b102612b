"""Sliding windows over a token stream, batched the way a torch DataLoader does.

The reference notebook's GPTDatasetV1 makes one window per start position in
`range(0, len(ids) - max_length, stride)`; the input is ids[i : i + max_length]
and the target the same window shifted by one token. Here a window is only its
start position until a batch is gathered, so a plan costs O(windows) integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from .errors import InvalidInput, LimitExceeded

WindowIndices = npt.NDArray[np.int64]


def shuffled_window_order(num_windows: int, seed: int) -> WindowIndices:
    """The order in which DataLoader(shuffle=True, generator=Generator().manual_seed(seed)) reads.

    Creating a DataLoader iterator draws one int64 base seed from the loader's
    generator before RandomSampler calls torch.randperm with that same
    generator, so the permutation comes after one draw, not from a fresh seed.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return torch.randperm(num_windows, generator=generator).numpy()


@dataclass(frozen=True)
class WindowPlan:
    """Which windows go into which batch, for one pass over a token stream."""

    num_tokens: int
    max_length: int
    stride: int
    batch_size: int
    drop_last: bool
    order: WindowIndices

    @property
    def num_windows(self) -> int:
        return len(self.order)

    @property
    def num_batches(self) -> int:
        if self.drop_last:
            return self.num_windows // self.batch_size
        return -(-self.num_windows // self.batch_size)

    def batch_starts(self, batch_index: int) -> WindowIndices:
        """Start positions in the token stream of the windows of one batch."""
        if not 0 <= batch_index < self.num_batches:
            raise IndexError(f"batch {batch_index} of {self.num_batches}")
        first = batch_index * self.batch_size
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
) -> WindowPlan:
    for name, value in (("batch_size", batch_size), ("max_length", max_length), ("stride", stride)):
        if value <= 0:
            raise InvalidInput(f"{name} must be positive, got {value}")
    if max_batch_size is not None and batch_size > max_batch_size:
        raise LimitExceeded(f"batch_size {batch_size} is over the server's --max-batch-size {max_batch_size}")
    if not 0 <= seed < 2**64:
        raise InvalidInput(f"seed must be in [0, 2**64), got {seed}")
    num_windows = count_windows(num_tokens, max_length, stride)
    if num_windows == 0:
        raise InvalidInput(
            f"the source has {num_tokens} tokens: max_length {max_length} needs at least "
            f"{max_length + 1} for one window"
        )
    if drop_last and num_windows < batch_size:
        raise InvalidInput(
            f"{num_windows} windows make no full batch of {batch_size} with drop_last; "
            "lower batch_size or set drop_last false"
        )
    order = shuffled_window_order(num_windows, seed) if shuffle else np.arange(num_windows, dtype=np.int64)
    return WindowPlan(num_tokens, max_length, stride, batch_size, drop_last, order)


def gather_windows(
    tokens: npt.NDArray[np.int32], starts: WindowIndices, max_length: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """Inputs and targets [len(starts), max_length] for the given window starts."""
    offsets = starts[:, None] + np.arange(max_length + 1, dtype=np.int64)[None, :]
    spans = tokens[offsets]
    return np.ascontiguousarray(spans[:, :-1]), np.ascontiguousarray(spans[:, 1:])
