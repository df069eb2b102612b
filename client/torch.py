"""`StreamingDataset`: a torch IterableDataset over StreamBatches, resumable from a checkpoint.

    dataset = StreamingDataset("10.0.0.5:50051", corpus="books", batch_size=8, max_length=256,
                               stride=128, rank=rank, world_size=world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    for inputs, targets in loader: ...
    checkpoint = dataset.state_dict()          # with num_workers=0, or per worker under a
    dataset.load_state_dict(checkpoint)        # stateful loader (torchdata's StatefulDataLoader)

Batches arrive already formed, so use `batch_size=None` in the DataLoader. With DataLoader
workers each worker streams a disjoint sub-shard: worker w of W, on rank r of R, reads as rank
r * W + w of R * W, so the workers of all ranks together still read every window exactly
once per epoch. Importing this module imports torch; `embedserve.client` itself does not.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Unpack

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ._batch_spec import BatchSettings, BatchSpec
from ._sync import Client

# Eight windows a batch unless told otherwise; every other setting as in stream_batches.
DEFAULT_SPEC = BatchSpec(batch_size=8)


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
        self._cursors: dict[int, bytes] = {}  # sub-rank -> cursor of the last batch yielded

    @property
    def rank(self) -> int:
        return self.spec.rank

    @property
    def world_size(self) -> int:
        return self.spec.world_size

    def _sub_shard(self) -> tuple[int, int]:
        worker = get_worker_info()
        if worker is None:
            return self.rank, self.world_size
        return self.rank * worker.num_workers + worker.id, self.world_size * worker.num_workers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rank, world_size = self._sub_shard()
        with Client(self.target, timeout=self.timeout) as client:
            for batch in client.stream_batches(
                **self._source,
                spec=self.spec.replace(rank=rank, world_size=world_size),
                cursor=self._cursors.get(rank),
            ):
                self._cursors[rank] = batch.cursor
                yield batch.to_torch()

    def state_dict(self) -> dict[str, Any]:
        """Where each sub-shard read in this process stands: its last batch's cursor."""
        return {"cursors": dict(self._cursors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue each sub-shard right after the batch its cursor names."""
        self._cursors = {int(k): bytes(v) for k, v in state.get("cursors", {}).items()}


__all__ = ["StreamingDataset"]
