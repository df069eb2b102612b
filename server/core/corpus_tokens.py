"""The seam StreamBatches reads a source's tokens through.

A stream asks its source for spans of tokens at window starts, and nothing else: whether they come
from a text in memory, one memory-mapped file, the shards of a manifest on local disk or shards
fetched from object storage into a cache is each a class here or behind `ShardSource`. Windows
that cross a shard boundary read from both shards, so a corpus prepared as one shard or as many
gives the same windows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .window_orders import WindowIndices

TokenIds = npt.NDArray[np.integer]


class CorpusTokens(ABC):
    """A token stream read a batch of windows at a time."""

    identity: str  # what cursors carry: changes whenever the tokens do
    num_tokens: int
    # True when every ID is known to come from the tokenizer the source names (a prepared or checked
    # imported corpus): embedding it needs no scan for out-of-vocabulary IDs.
    ids_checked: bool = False
    # True when reading may wait for storage (object storage through a cache): streams then read
    # off the event loop when a span is not ready, and hint what comes next.
    may_wait: bool = False

    @property
    @abstractmethod
    def dtype(self) -> np.dtype[Any]: ...

    @abstractmethod
    def spans(self, starts: WindowIndices, length: int) -> TokenIds:
        """tokens[s : s + length] for each start s, as one [len(starts), length] array."""

    def max_id(self) -> int:
        """The largest token ID (a scan: only asked of sources that are not ids_checked)."""
        raise NotImplementedError

    def ready(self, starts: WindowIndices, length: int) -> bool:
        """False when reading these spans would wait for storage (so the caller reads off the event loop)."""
        return True

    def prefetch(self, starts: WindowIndices, length: int) -> None:  # noqa: B027 (a hint: most ignore it)
        """A hint: these spans come soon. Sources on slow storage start fetching them."""


class ArrayTokens(CorpusTokens):
    """Tokens in one array: a text's IDs in memory, or one memory-mapped token file."""

    def __init__(self, tokens: TokenIds, identity: str, *, ids_checked: bool = False) -> None:
        self.tokens = tokens
        self.identity = identity
        self.num_tokens = len(tokens)
        self.ids_checked = ids_checked

    @property
    def dtype(self) -> np.dtype[Any]:
        return self.tokens.dtype

    def spans(self, starts: WindowIndices, length: int) -> TokenIds:
        return _spans_of(self.tokens, starts, length)

    def max_id(self) -> int:
        return int(self.tokens.max()) if self.num_tokens else -1


class ShardSource(Protocol):
    """A manifest's shards as arrays: memory-mapped from local disk or from a cache."""

    def shard(self, index: int) -> TokenIds:
        """Shard `index`'s tokens (fetched first when needed)."""
        ...

    def has(self, index: int) -> bool:
        """True when shard(index) would not wait for storage (it is mapped already)."""
        ...

    def prefetch(self, indices: Sequence[int]) -> None:
        """Starts fetching these shards, in this order, where they are not here yet; each shard is
        worth hinting once per stream."""
        ...


class ShardedTokens(CorpusTokens):
    """The concatenation of a manifest's shards, in order."""

    def __init__(
        self,
        identity: str,
        shard_tokens: Sequence[int],
        dtype: np.dtype[Any],
        shards: ShardSource,
        *,
        may_wait: bool = False,
    ) -> None:
        self.identity = identity
        self.ids_checked = True
        self.may_wait = may_wait
        self._dtype = dtype
        self._shards = shards
        # bounds[i] is the position of shard i's first token; empty shards are skipped.
        self._indices = np.array([i for i, n in enumerate(shard_tokens) if n > 0], dtype=np.int64)
        sizes = np.array([shard_tokens[i] for i in self._indices], dtype=np.int64)
        self._bounds = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.num_tokens = int(self._bounds[-1])

    @property
    def dtype(self) -> np.dtype[Any]:
        return self._dtype

    def _touched(self, starts: WindowIndices, length: int) -> npt.NDArray[np.int64]:
        """Positions in self._indices of the shards holding these spans, in reading order."""
        first = np.searchsorted(self._bounds, starts, side="right") - 1
        last = np.searchsorted(self._bounds, starts + (length - 1), side="right") - 1
        if len(first) and first.min() == last.max():  # all in one shard: reading in order, mostly
            return first[:1]
        ends = [np.stack([first, last], axis=1).ravel()]
        for a, b in zip(first[last - first > 1].tolist(), last[last - first > 1].tolist(), strict=True):
            ends.append(np.arange(a + 1, b, dtype=np.int64))  # a span longer than a shard
        positions = np.concatenate(ends)
        unique, where = np.unique(positions, return_index=True)
        touched: npt.NDArray[np.int64] = unique[np.argsort(where, kind="stable")]
        return touched

    def spans(self, starts: WindowIndices, length: int) -> TokenIds:
        if len(self._indices) == 1:
            return _spans_of(self._shards.shard(int(self._indices[0])), starts, length)
        first = np.searchsorted(self._bounds, starts, side="right") - 1
        last = np.searchsorted(self._bounds, starts + (length - 1), side="right") - 1
        if len(starts) and first[0] == last[0] and (first == first[0]).all() and (last == first[0]).all():
            # Every span inside one shard: the common case, one fancy index.
            position = int(first[0])
            return _spans_of(
                self._shards.shard(int(self._indices[position])), starts - self._bounds[position], length
            )
        offsets = starts[:, None] + np.arange(length, dtype=np.int64)[None, :]
        positions = np.searchsorted(self._bounds, offsets, side="right") - 1
        out = np.empty(offsets.shape, dtype=self._dtype)
        for position in np.unique(positions).tolist():
            mask = positions == position
            out[mask] = self._shards.shard(int(self._indices[position]))[
                offsets[mask] - self._bounds[position]
            ]
        return out

    def ready(self, starts: WindowIndices, length: int) -> bool:
        if not len(starts):
            return True
        # Every shard from the first span's to the last's: a superset of those touched, found with
        # two searches (this runs for every batch).
        low = int(np.searchsorted(self._bounds, starts.min(), side="right")) - 1
        high = int(np.searchsorted(self._bounds, starts.max() + (length - 1), side="right")) - 1
        return all(self._shards.has(int(self._indices[p])) for p in range(low, high + 1))

    def prefetch(self, starts: WindowIndices, length: int) -> None:
        touched = self._touched(starts, length).tolist()
        if touched:
            last = touched[-1]
            # Where reading in order goes next: one shard per prefetch thread.
            touched += [p for p in (last + 1, last + 2) if p < len(self._indices) and p not in touched]
        self._shards.prefetch([int(self._indices[p]) for p in touched])


def _spans_of(tokens: TokenIds, starts: WindowIndices, length: int) -> TokenIds:
    offsets = starts[:, None] + np.arange(length, dtype=np.int64)[None, :]
    spans: TokenIds = tokens[offsets]
    return spans
