"""Embed requests checked against the model and the server's limits, as jobs for the batcher."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from .embedding import EmbeddingModel, EmbedJob
from .limits import RequestLimits
from .shared_memory import SharedMemoryRegistry


@dataclass(frozen=True)
class OutputRegion:
    """Part of a registered shared-memory region that receives the result instead of the reply."""

    handle: str
    offset: int


def embed_job(
    model: EmbeddingModel,
    token_ids: npt.NDArray[np.integer],
    *,
    position_offset: int = 0,
    include_positional: bool = True,
    output_dtype: torch.dtype = torch.float32,
    region: OutputRegion | None = None,
    limits: RequestLimits,
    shared_memory: SharedMemoryRegistry,
) -> EmbedJob:
    """The request as a job (its `out` still unset). InvalidInput or LimitExceeded when the IDs do
    not fit the model or the limits, or the result would not fit its reply or its region."""
    model.check(
        token_ids,
        position_offset=position_offset,
        include_positional=include_positional,
        max_tokens=limits.max_tokens_per_request,
    )
    nbytes = token_ids.size * model.dim * output_dtype.itemsize
    if region is not None:
        shared_memory.check(region.handle, region.offset, nbytes)
    else:
        limits.check_reply_bytes(nbytes, f"the embeddings of {token_ids.size} tokens")
    return EmbedJob(
        token_ids,
        position_offset=position_offset,
        include_positional=include_positional,
        output_dtype=output_dtype,
    )


def result_shape(job: EmbedJob, dim: int) -> tuple[int, ...]:
    """The shape of a job's embeddings: its IDs' shape and the model's dimension."""
    return (*job.token_ids.shape, dim)
