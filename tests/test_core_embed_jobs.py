"""Embed requests as batcher jobs (core, no gRPC): checked against the model, the limits, and the
shared-memory region that receives the result."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from embedserve.server.core import (
    EmbeddingModel,
    InvalidInput,
    LimitExceeded,
    NotFound,
    seeded_embedding_tables,
)
from embedserve.server.core.embed_jobs import OutputRegion, embed_job, result_shape
from embedserve.server.core.limits import REPLY_OVERHEAD_BYTES, RequestLimits
from embedserve.server.core.shared_memory import SharedMemoryRegistry

LIMITS = RequestLimits(
    max_message_bytes=1 << 20,
    max_tokens_per_request=64,
    max_texts_per_request=1,
    max_batch_size=1,
    max_queries_per_request=1,
    max_terms_per_request=1,
    max_results_per_request=1,
)


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel(seeded_embedding_tables(100, 8, 16, 1), torch.device("cpu"))


def test_a_checked_request_is_a_job_with_its_options(model: EmbeddingModel) -> None:
    ids = np.array([[1, 2, 3], [4, 5, 6]], np.int32)
    job = embed_job(
        model, ids, position_offset=2, include_positional=False, output_dtype=torch.float16,
        limits=LIMITS, shared_memory=SharedMemoryRegistry(),
    )  # fmt: skip
    assert job.token_ids is ids
    assert (job.position_offset, job.include_positional, job.output_dtype, job.out) == (
        2,
        False,
        torch.float16,
        None,
    )
    assert result_shape(job, model.dim) == (2, 3, 8)


def test_requests_the_model_or_the_limits_refuse(model: EmbeddingModel) -> None:
    memory = SharedMemoryRegistry()
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        embed_job(model, np.array([100]), limits=LIMITS, shared_memory=memory)
    with pytest.raises(LimitExceeded, match="--max-tokens-per-request 64") as raised:
        embed_job(
            model, np.zeros(65, np.int32), include_positional=False, limits=LIMITS, shared_memory=memory
        )
    assert raised.value.limit == "max_tokens_per_request"
    reply_bytes = 8 * 8 * 4  # 8 tokens of 8 float32s
    small = replace(LIMITS, max_message_bytes=REPLY_OVERHEAD_BYTES + reply_bytes - 1)
    with pytest.raises(LimitExceeded, match="the embeddings of 8 tokens would be 256 bytes") as raised:
        embed_job(model, np.zeros(8, np.int32), limits=small, shared_memory=memory)
    assert raised.value.limit == "max_message_bytes"


def test_a_result_for_a_region_must_fit_the_region_not_a_message(
    model: EmbeddingModel, tmp_path: Path
) -> None:
    memory = SharedMemoryRegistry(tmp_path)
    handle = memory.create("connection", 256).handle
    tiny_messages = replace(LIMITS, max_message_bytes=1)
    job = embed_job(
        model,
        np.zeros(8, np.int32),
        region=OutputRegion(handle, 0),
        limits=tiny_messages,
        shared_memory=memory,
    )
    assert job.tokens == 8
    with pytest.raises(InvalidInput, match="256 bytes at offset 4 do not fit the region's 256 bytes"):
        embed_job(
            model, np.zeros(8, np.int32), region=OutputRegion(handle, 4), limits=LIMITS, shared_memory=memory
        )
    with pytest.raises(NotFound, match="no such shared-memory region handle"):
        embed_job(
            model, np.zeros(1, np.int32), region=OutputRegion("gone", 0), limits=LIMITS, shared_memory=memory
        )
    memory.close()
