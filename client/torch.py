"""`StreamingDataset`: a torch IterableDataset over StreamBatches, resumable from a checkpoint.

    dataset = StreamingDataset("10.0.0.5:50051", corpus="books", batch_size=8, max_length=256,
                               stride=128, rank=rank, world_size=world_size)
    loader = torchdata.stateful_dataloader.StatefulDataLoader(dataset, batch_size=None, num_workers=2)
    for inputs, targets in loader: ...
    checkpoint = loader.state_dict()           # every worker's cursors (a plain DataLoader at
    loader.load_state_dict(checkpoint)         # num_workers=0: dataset.state_dict() and load_...)

Batches arrive already formed, so use `batch_size=None` in the DataLoader. With DataLoader
workers each worker streams a disjoint sub-shard: worker w of W, on rank r of R, reads as rank
r * W + w of R * W, so the workers of all ranks together still read every window exactly
once per epoch.

Every `iter()` of the dataset is one pass over its epochs from `epoch`, in a worker as in the main
process, unless `load_state_dict()` came before it: then that pass continues from the state (a
finished pass's state, in the next epoch once `set_epoch()` names it). `set_epoch()` chooses the
epoch of the next pass. A state loads only where the epoch is split into the same sub-shards.

Forked workers and gRPC: a process forked while a gRPC channel of its parent is alive cannot use
gRPC (it crashes). Before any fork, this module collects channels that are closed but not yet
freed, so a parent that used a `Client` (or a pass at num_workers=0) and closed it forks safely;
a worker forked while a channel is still open refuses with a RuntimeError that says so. Importing
this module imports torch; `embedserve.client` itself does not.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Iterator
from typing import Any, Unpack

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ._batch_spec import BatchSettings, BatchSpec
from ._sync import Client

# Eight windows a batch unless told otherwise; every other setting as in stream_batches.
DEFAULT_SPEC = BatchSpec(batch_size=8)

# What a worker forked with gRPC alive in its parent says instead of crashing.
_FORKED_WITH_GRPC = (
    "this process was forked while its parent held a gRPC channel (an open embedserve Client, a "
    "closed AsyncClient that a variable still refers to, or a gRPC server), and gRPC cannot be used "
    "after such a fork. Before the loader starts its workers, close the parent's Clients (drop a "
    "closed AsyncClient: `del client`), or create the DataLoader with "
    "multiprocessing_context='forkserver' (or 'spawn')"
)


def _grpc_aio_running() -> bool:
    """Whether grpc.aio's process-wide poller thread runs: it does while any grpc.aio channel or
    server of this process exists (closed channels count until they are freed)."""
    return any(thread.name.endswith("(_poll_wrapper)") for thread in threading.enumerate())


class _ForkGuard:
    """Fork hooks: free closed channels before a fork, and tell the child whether gRPC was still
    alive in its parent."""

    alive_in_parent = False
    _alive_at_fork = False

    @classmethod
    def before(cls) -> None:
        alive = _grpc_aio_running()
        if alive:
            # Closed Clients wait in reference cycles for the collector; once their channels are
            # freed, grpc.aio stops its poller and the child starts with no gRPC state.
            gc.collect()
            alive = _grpc_aio_running()
        cls._alive_at_fork = alive

    @classmethod
    def after_in_child(cls) -> None:
        cls.alive_in_parent = cls._alive_at_fork

    @classmethod
    def after_in_parent(cls) -> None:
        cls._alive_at_fork = False


os.register_at_fork(
    before=_ForkGuard.before,
    after_in_child=_ForkGuard.after_in_child,
    after_in_parent=_ForkGuard.after_in_parent,
)


class StreamingDataset(IterableDataset[tuple[torch.Tensor, torch.Tensor]]):
    """Yields (inputs, targets) int64 tensors [B, T] per batch, for `epochs` epochs from `epoch`.

    `spec` and keywords are as in stream_batches (default: DEFAULT_SPEC). Embeddings are not
    asked for: a DataLoader here yields only token IDs.
    """

    def __init__(
        self,
        target: str,
        *,
        corpus: str | None = None,
        text: str | None = None,
        spec: BatchSpec | None = None,
        timeout: float = 60.0,
        **settings: Unpack[BatchSettings],
    ) -> None:
        if (text is None) == (corpus is None):
            raise ValueError("pass exactly one of text= or corpus=")
        self.target = target
        self._source: dict[str, Any] = {"corpus": corpus} if corpus is not None else {"text": text}
        self.spec = (spec or DEFAULT_SPEC).replace(**settings)
        if self.spec.include_embeddings:
            raise ValueError("StreamingDataset yields token IDs only; use stream_batches for embeddings")
        self.timeout = timeout
        # The latest pass in this process: sub-rank -> cursor of its last batch yielded, and the
        # number of sub-shards the pass split the epoch into.
        self._cursors: dict[int, bytes] = {}
        self._shards: int | None = None
        # Where the next pass continues, when a state was loaded since the last iter().
        self._resume: dict[int, bytes] | None = None
        self._resume_shards: int | None = None

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def world_size(self) -> int:
        return self.spec.world_size

    def set_epoch(self, epoch: int) -> None:
        """The next pass streams from `epoch` (its `epochs` epochs). Call it in the main process
        before each `iter(loader)`: fresh workers copy it (persistent workers do not see it)."""
        self.spec = self.spec.replace(epoch=epoch)

    def _sub_shard(self) -> tuple[int, int]:
        worker = get_worker_info()
        if worker is None:
            return self.rank, self.world_size
        return self.rank * worker.num_workers + worker.id, self.world_size * worker.num_workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if _ForkGuard.alive_in_parent:
            raise RuntimeError(_FORKED_WITH_GRPC)
        rank, shards = self._sub_shard()
        resume, resume_shards = self._resume or {}, self._resume_shards
        self._resume, self._resume_shards = None, None
        if resume and resume_shards not in (None, shards):
            workers = shards // self.world_size
            raise ValueError(
                f"this state was saved by a loader that split the epoch into {resume_shards} "
                f"sub-shards (world_size x num_workers, num_workers=0 counting as 1), and loads only "
                f"into one that splits it the same way; this one splits it into {shards} "
                f"(world_size={self.world_size}, num_workers={workers if workers > 1 else '0 or 1'})"
            )
        if resume and rank not in resume:
            raise ValueError(
                f"this state holds the cursors of sub-shards {sorted(resume)}, not of this reader's "
                f"sub-shard {rank} (rank {self.rank} of {self.world_size}): load each rank's own state"
            )
        # Set now, not when the generator starts: a loader may ask for the state in between.
        self._cursors, self._shards = dict(resume), shards
        return self._stream(rank, shards, resume.get(rank))

    def _stream(
        self, rank: int, shards: int, cursor: bytes | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        with Client(self.target, timeout=self.timeout) as client:
            for batch in client.stream_batches(
                **self._source, spec=self.spec.replace(rank=rank, world_size=shards), cursor=cursor
            ):
                self._cursors[rank] = batch.cursor
                yield batch.to_torch()

    def state_dict(self) -> dict[str, Any]:
        """Where the latest pass in this process stands: each sub-shard's last cursor, and how many
        sub-shards the epoch was split into (world_size times the DataLoader workers)."""
        return {"cursors": dict(self._cursors), "shards": self._shards}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next pass continues each sub-shard right after the batch its cursor names. The
        state must come from a loader with the same world_size and num_workers (else the next
        `iter()` raises ValueError)."""
        self._cursors = {int(k): bytes(v) for k, v in state.get("cursors", {}).items()}
        shards = state.get("shards")
        self._shards = None if shards is None else int(shards)
        self._resume, self._resume_shards = dict(self._cursors), self._shards


__all__ = ["StreamingDataset"]
