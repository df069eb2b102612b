"""The order in which an epoch reads its windows, without per-window memory where it matters.

An unshuffled epoch reads windows 0, 1, 2, ...: nothing is stored. A shuffled epoch reads them in
the order of the DataLoader's RandomSampler (`shuffled_window_order`): a permutation of every
window. For a prepared corpus of a billion windows that permutation is gigabytes, so
`MappedOrders` computes it once, with torch itself, straight into a file that every server
process then memory-maps; pages are read as the stream reaches them and belong to the page cache,
not to any process. Small permutations (a text sent with the request) stay in memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch

WindowIndices = npt.NDArray[np.int64]

_LOGGER = logging.getLogger(__name__)


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of an epoch: `seed` itself for epoch 0, else one derived from (seed, epoch)."""
    if epoch == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"embedserve-epoch:{seed}:{epoch}".encode()).digest()[:8], "little")


def start_sampler_generator(generator_seed: int) -> torch.Generator:
    """The generator as RandomSampler finds it when a DataLoader iterator starts.

    Creating a DataLoader iterator draws one int64 base seed from the loader's generator before
    RandomSampler calls torch.randperm with that same generator, so the permutation comes after
    one draw, not from a fresh seed. Epoch e > 0 does the same from a generator seeded by
    epoch_seed(seed, e), so any epoch's order costs one permutation, whatever came before.
    """
    generator = torch.Generator().manual_seed(generator_seed)
    torch.empty((), dtype=torch.int64).random_(generator=generator)
    return generator


class WindowOrder(ABC):
    """Window indices in reading order; sliced a batch at a time."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, positions: slice) -> WindowIndices:
        """The indices at these reading positions (a slice with step 1), as int64."""

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> WindowIndices:
        whole = self[0 : len(self)]
        return whole if dtype is None else whole.astype(dtype)


class SequentialOrder(WindowOrder):
    """0, 1, 2, ...: the unshuffled order, which needs no storage."""

    def __init__(self, num_windows: int) -> None:
        self._num_windows = num_windows

    def __len__(self) -> int:
        return self._num_windows

    def __getitem__(self, positions: slice) -> WindowIndices:
        start, stop, _ = positions.indices(self._num_windows)
        return np.arange(start, max(start, stop), dtype=np.int64)


class ArrayOrder(WindowOrder):
    """An order held in an array: in memory, or a read-only memory map."""

    def __init__(self, indices: npt.NDArray[np.integer]) -> None:
        self._indices = indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, positions: slice) -> WindowIndices:
        return self._indices[positions].astype(np.int64)


def _index_dtype(num_windows: int) -> torch.dtype:
    # Half the bytes where every index fits; the permutation is the same in either dtype.
    return torch.int32 if num_windows <= np.iinfo(np.int32).max + 1 else torch.int64


def shuffled_window_order(num_windows: int, seed: int, epoch: int = 0) -> WindowIndices:
    """The order in which DataLoader(shuffle=True, generator=Generator().manual_seed(seed)) reads
    epoch `epoch`, in memory (see start_sampler_generator for why it is the DataLoader's)."""
    generator = start_sampler_generator(epoch_seed(seed, epoch))
    return torch.randperm(num_windows, generator=generator).numpy()


class OrderStore(Protocol):
    """Where a source's shuffled orders come from."""

    def shuffled(self, num_windows: int, seed: int, epoch: int) -> WindowOrder: ...


class InMemoryOrders:
    """Each shuffled order computed in memory (for sources bounded by a request's size)."""

    def shuffled(self, num_windows: int, seed: int, epoch: int) -> WindowOrder:
        generator = start_sampler_generator(epoch_seed(seed, epoch))
        return ArrayOrder(
            torch.randperm(num_windows, generator=generator, dtype=_index_dtype(num_windows)).numpy()
        )


class MappedOrders:
    """Shuffled orders of at least `min_windows` windows, computed once into `folder` and
    memory-mapped; smaller ones in memory. The newest `keep` files stay, older ones are deleted
    when a new one is written (a stream that has one mapped keeps reading it)."""

    def __init__(self, folder: Path, *, min_windows: int = 1 << 20, keep: int = 4) -> None:
        self.folder = folder
        self.min_windows = min_windows
        self.keep = keep
        self._small = InMemoryOrders()

    def path_for(self, num_windows: int, seed: int, epoch: int) -> Path:
        """The file of one permutation: it depends only on the window count and the generator seed."""
        dtype = "int32" if _index_dtype(num_windows) == torch.int32 else "int64"
        return self.folder / f"randperm-{num_windows}-{epoch_seed(seed, epoch):016x}.{dtype}"

    def shuffled(self, num_windows: int, seed: int, epoch: int) -> WindowOrder:
        if num_windows < self.min_windows:
            return self._small.shuffled(num_windows, seed, epoch)
        path = self.path_for(num_windows, seed, epoch)
        dtype = _index_dtype(num_windows)
        if path.exists():
            os.utime(path)  # recently used: the last to be evicted
        else:
            self.folder.mkdir(parents=True, exist_ok=True)
            # One process computes an order; the others on this folder wait for it, then map it.
            with open(self.folder / f".{path.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if not path.exists():
                    self._write(path, num_windows, epoch_seed(seed, epoch), dtype)
            (self.folder / f".{path.name}.lock").unlink(missing_ok=True)
        numpy_dtype = np.int32 if dtype == torch.int32 else np.int64
        mapped = np.memmap(path, dtype=numpy_dtype, mode="r", shape=(num_windows,))
        # A plain array over the same pages: slicing a np.memmap runs Python code per batch.
        return ArrayOrder(mapped.view(np.ndarray))

    def _write(self, path: Path, num_windows: int, generator_seed: int, dtype: torch.dtype) -> None:
        started = time.perf_counter()
        itemsize = torch.empty((), dtype=dtype).element_size()
        # Written under a unique name, then renamed: a reader only ever maps a complete file.
        handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=".randperm-", suffix=".partial")
        try:
            os.ftruncate(handle, num_windows * itemsize)
            os.close(handle)
            mapped = torch.from_file(temporary, shared=True, size=num_windows, dtype=dtype)
            # randperm shuffles in place in `out`, so the permutation lives only in the file.
            torch.randperm(num_windows, generator=start_sampler_generator(generator_seed), out=mapped)
            del mapped
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        _LOGGER.info(
            "shuffled order of %d windows written to %s in %.1f s",
            num_windows,
            path,
            time.perf_counter() - started,
        )
        self._evict()

    def _evict(self) -> None:
        used: list[tuple[float, Path]] = []
        for order in self.folder.glob("randperm-*"):
            with contextlib.suppress(FileNotFoundError):  # another process evicted it first
                used.append((order.stat().st_mtime, order))
        for _, stale in sorted(used, reverse=True)[self.keep :]:
            stale.unlink(missing_ok=True)
