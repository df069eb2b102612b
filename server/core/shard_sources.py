"""A manifest's shards as memory-mapped arrays (the `ShardSource`s of corpus_tokens).

`LocalShards` maps the files of a corpus on local disk where they are. `CachedShards` maps the
verified copies a `ShardCache` fetched from object storage; it keeps a few shards mapped, so a
corpus larger than the cache streams with the cache evicting behind it.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .corpus_tokens import TokenIds
from .errors import InvalidInput, NotFound, Unavailable
from .manifest import CorpusManifest, ShardEntry
from .shard_cache import ShardCache
from .storage import Storage

# Shards a stream keeps mapped: the one it reads and those its spans cross into.
_OPEN_SHARDS = 8


def _map_file(path: Path, entry: ShardEntry, manifest: CorpusManifest) -> TokenIds:
    """map_shard, with a file that vanished raising FileNotFoundError."""
    if entry.tokens == 0:
        return np.zeros(0, manifest.numpy_dtype)
    mapped = np.memmap(
        path, dtype=manifest.numpy_dtype, mode="r", offset=entry.header_bytes, shape=(entry.tokens,)
    )
    array: TokenIds = mapped.view(np.ndarray)
    return array


def map_shard(path: Path, entry: ShardEntry, manifest: CorpusManifest) -> TokenIds:
    """The shard's tokens, memory-mapped read-only; InvalidInput when the file's size is not the
    manifest's (a truncated or replaced file)."""
    try:
        size = path.stat().st_size
    except OSError as error:
        raise NotFound(
            f"corpus {manifest.name!r}: shard {entry.file} cannot be read: {error.strerror}"
        ) from None
    if size != entry.bytes or entry.header_bytes + entry.tokens * manifest.numpy_dtype.itemsize != size:
        raise InvalidInput(
            f"corpus {manifest.name!r}: shard {entry.file} is {size} bytes, the manifest says "
            f"{entry.bytes} ({entry.tokens} tokens); truncated or replaced?"
        )
    if entry.tokens == 0:
        return np.zeros(0, manifest.numpy_dtype)
    mapped = np.memmap(
        path, dtype=manifest.numpy_dtype, mode="r", offset=entry.header_bytes, shape=(entry.tokens,)
    )
    # A plain array over the same pages: indexing a np.memmap runs Python code per call.
    array: TokenIds = mapped.view(np.ndarray)
    return array


class _MappedShards:
    """The last few shards mapped, by index; subclasses say how one is mapped. (No callback to the
    owner is kept: a cycle would hold the mappings until the garbage collector ran.)"""

    def __init__(self) -> None:
        self._open: OrderedDict[int, TokenIds] = OrderedDict()
        self._lock = threading.Lock()

    def _map(self, index: int) -> TokenIds:
        raise NotImplementedError

    def shard(self, index: int) -> TokenIds:
        with self._lock:
            array = self._open.get(index)
            if array is not None:
                self._open.move_to_end(index)
                return array
        array = self._map(index)
        with self._lock:
            self._open[index] = array
            while len(self._open) > _OPEN_SHARDS:
                self._open.popitem(last=False)
        return array


class LocalShards(_MappedShards):
    """Shards on local disk, each resolved by `resolve` (which keeps them inside the data folder)."""

    def __init__(self, manifest: CorpusManifest, resolve: Callable[[str], Path]) -> None:
        super().__init__()
        self._manifest = manifest
        self._resolve = resolve

    def _map(self, index: int) -> TokenIds:
        entry = self._manifest.shards[index]
        try:
            path = self._resolve(entry.file)
        except NotFound:
            raise NotFound(f"corpus {self._manifest.name!r}: its shard {entry.file!r} is missing") from None
        return map_shard(path, entry, self._manifest)

    def has(self, index: int) -> bool:
        return True

    def prefetch(self, indices: Sequence[int]) -> None:
        return None


class CachedShards(_MappedShards):
    """Shards in object storage, read through the shard cache."""

    def __init__(self, manifest: CorpusManifest, storage: Storage, cache: ShardCache) -> None:
        super().__init__()
        self._manifest = manifest
        self._storage = storage
        self._cache = cache
        self._hinted: set[int] = set()

    def _map(self, index: int) -> TokenIds:
        entry = self._manifest.shards[index]
        for _ in range(3):  # another fetch may evict it between fetching and mapping: fetch again
            path = self._cache.fetch(self._storage, entry)
            with contextlib.suppress(FileNotFoundError):
                return _map_file(path, entry, self._manifest)
        raise Unavailable(f"shard {entry.file} keeps being evicted from the shard cache; raise --cache-size")

    def has(self, index: int) -> bool:
        # Only a mapped shard is sure not to wait: a cached file may be evicted before it is mapped.
        return index in self._open

    def prefetch(self, indices: Sequence[int]) -> None:
        # Each shard is handed to the cache once per stream: hints come every batch, and the cache's
        # own check costs a stat per shard.
        new = [index for index in indices if index not in self._hinted and index not in self._open]
        if new:
            self._hinted.update(new)
            self._cache.prefetch(self._storage, [self._manifest.shards[index] for index in new])
