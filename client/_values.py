"""Plain values the client returns."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import torch


def to_torch(array: npt.NDArray[Any], device: str | None = None) -> torch.Tensor:
    """A torch tensor from a returned array (needs torch; integer IDs become int64 as nn.Embedding expects).

    Returned arrays are read-only views of the reply, so this copies them once.
    """
    import torch

    values = array.astype(np.int64) if np.issubdtype(array.dtype, np.integer) else np.array(array)
    tensor = torch.from_numpy(values)
    return tensor.to(device) if device is not None else tensor


@dataclass(frozen=True)
class Batch:
    """One StreamBatches batch: [B, T] inputs and targets, and [B, T, D] embeddings when asked for."""

    index: int
    inputs: npt.NDArray[np.int32]
    targets: npt.NDArray[np.int32]
    embeddings: npt.NDArray[Any] | None
    num_batches: int
    epoch: int = 0
    cursor: bytes = b""
    """Pass it as stream_batches(cursor=...) to continue right after this batch."""

    def to_torch(self, device: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) as int64 torch tensors, as the notebook's DataLoader yields them."""
        return to_torch(self.inputs, device), to_torch(self.targets, device)


@dataclass(frozen=True)
class RequestLimits:
    max_message_bytes: int
    max_tokens_per_request: int
    max_texts_per_request: int
    max_batch_size: int
    # Working memory the server's requests share; 0 from a server that does not say.
    memory_budget_bytes: int = 0


@dataclass(frozen=True)
class EmbeddingInfo:
    vocab_size: int
    dim: int
    context_length: int
    dtype: str
    device: str
    tokenizer: str
    weights_source: str
    limits: RequestLimits
    # The encoding's vocabulary (0 from a server older than these fields) and what cursors record
    # of it: the name, or "name@digest" for an encoding from a file.
    tokenizer_vocab_size: int = 0
    tokenizer_identity: str = ""
