"""On a CUDA machine: the model lives on the GPU and answers exactly as on the CPU."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from embedserve.client import AsyncClient, InvalidArgumentError
from embedserve.server import ServerConfig
from embedserve.server.core import EmbeddingModel, EmbedJob, resolve_device, seeded_embedding_tables
from embedserve.server.core.word_vectors import (
    CandidateScan,
    ColumnsFirstScan,
    ScanLog,
    SimilarityQuery,
    Term,
    WordVectors,
)

from .conftest import start_server
from .test_core_embedding import NOTEBOOK_ROWS_2_3_5_1

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_auto_device_is_cuda_and_tables_live_there() -> None:
    device = resolve_device("auto")
    assert device.type == "cuda"
    assert device.index is not None
    model = EmbeddingModel(seeded_embedding_tables(6, 3, 4, 123), device)
    assert model._token.device == device
    got = model.embed(np.array([2, 3, 5, 1]), include_positional=False)
    np.testing.assert_allclose(got.numpy(), NOTEBOOK_ROWS_2_3_5_1, atol=1e-4)


def test_cuda_embeddings_equal_cpu_bit_for_bit() -> None:
    tables = seeded_embedding_tables(50257, 256, 1024, 123)
    cpu = EmbeddingModel(tables, torch.device("cpu"))
    gpu = EmbeddingModel(tables, resolve_device("cuda"))
    ids = np.random.default_rng(0).integers(0, 50257, size=(8, 1024)).astype(np.int32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert torch.equal(gpu.embed(ids, output_dtype=dtype), cpu.embed(ids, output_dtype=dtype))
        # Into a reply being built: copied from the batch's pinned result on CUDA, looked up
        # straight into it on the CPU; the same bits either way.
        on_gpu, on_cpu = (torch.empty((*ids.shape, 256), dtype=dtype) for _ in range(2))
        gpu.embed_many([EmbedJob(ids, output_dtype=dtype, out=on_gpu)])
        cpu.embed_many([EmbedJob(ids, output_dtype=dtype, out=on_cpu)])
        assert torch.equal(on_gpu, on_cpu)
        assert torch.equal(on_gpu, cpu.embed(ids, output_dtype=dtype))
    assert torch.equal(
        gpu.embed(ids[0, :100], position_offset=900), cpu.embed(ids[0, :100], position_offset=900)
    )


async def test_default_server_on_cuda_serves_the_notebook_flow() -> None:
    running = start_server(replace(ServerConfig(), port=0, device="auto"))
    try:
        torch.manual_seed(123)
        token_layer, pos_layer = torch.nn.Embedding(50257, 256), torch.nn.Embedding(1024, 256)
        text = "In the heart of the city stood the old library, a relic from a bygone era. " * 20
        async with AsyncClient(running.target) as client:
            info = await client.info()
            assert info.device.startswith("cuda:")
            window = np.arange(2048, dtype=np.int32).reshape(8, 256)
            expected_window = token_layer(torch.from_numpy(window.astype(np.int64))) + pos_layer(
                torch.arange(256)
            )
            np.testing.assert_array_equal(await client.embed(window), expected_window.detach().numpy())
            batches = [
                b
                async for b in client.stream_batches(
                    text=text,
                    batch_size=8,
                    max_length=4,
                    stride=4,
                    shuffle=True,
                    seed=1,
                    include_embeddings=True,
                )
            ]
        for batch in batches:
            expected = token_layer(torch.from_numpy(batch.inputs.astype(np.int64))) + pos_layer(
                torch.arange(4)
            )
            np.testing.assert_array_equal(batch.embeddings, expected.detach().numpy())
    finally:
        running.stop()


async def test_out_of_range_ids_never_reach_the_device() -> None:
    # An index past the table is a device-side assert on CUDA that breaks every later call.
    running = start_server(
        replace(ServerConfig(), port=0, vocab_size=6, dim=3, context_length=4, device="cuda")
    )
    try:
        async with AsyncClient(running.target) as client:
            with pytest.raises(InvalidArgumentError):
                await client.embed([[1, 6]])
            with pytest.raises(InvalidArgumentError):
                async for _ in client.stream_batches(
                    text="word " * 50, batch_size=2, max_length=4, stride=4, include_embeddings=True
                ):
                    pass
            rows = await client.embed([2, 3, 5, 1], include_positional=False)
        np.testing.assert_allclose(rows, NOTEBOOK_ROWS_2_3_5_1, atol=1e-4)
    finally:
        running.stop()


@pytest.mark.parametrize("prefilter", [False, True], ids=["float32", "bfloat16 candidates"])
def test_word_vector_search_on_cuda_equals_cpu(prefilter: bool) -> None:
    """Same words in the same order as the CPU scan (scores within 1e-5), for every query form;
    with the prefilter on, through the GPU's candidate scan."""
    rng = np.random.default_rng(7)
    count, dim = 300_000, 64  # more rows than one GPU block holds at 512 queries
    words = [f"w{i}" for i in range(count)]
    vectors = rng.standard_normal((count, dim), dtype=np.float32)
    vectors[5] = 0  # a zero vector is never returned
    cpu = WordVectors(words, vectors, name="r", source="r", device=torch.device("cpu"), prefilter=False)
    gpu = WordVectors(
        words, vectors, name="r", source="r", device=resolve_device("cuda"), prefilter=prefilter
    )
    # On a GPU the factory picks the candidate scan where the prefilter is on (the bfloat16
    # kernels kept within the margin), else the float32 columns-first scan.
    assert type(gpu.scanner) is (CandidateScan if prefilter else ColumnsFirstScan)
    assert gpu.prefilter == prefilter
    queries = []
    for i in range(600):
        picked = [words[j] for j in rng.choice(count, size=3, replace=False)]
        queries.append(
            SimilarityQuery(
                positive=(Term(picked[0]), Term(picked[1])) if i % 3 else (Term(vector=vectors[i + 10]),),
                negative=(Term(picked[2]),) if i % 2 else (),
                topn=int(rng.integers(1, 30)),
                restrict_vocab=int(rng.integers(1000, count)) if i % 5 == 0 else None,
                method="mul" if i % 7 == 0 else "add",
            )
        )
    log = ScanLog()
    for want, got in zip(cpu.most_similar(queries), gpu.most_similar(queries, log), strict=True):
        assert len(got) == len(want)
        for (want_word, want_score), (word, score) in zip(want, got, strict=True):
            assert abs(score - want_score) < 1e-5 * max(1.0, abs(want_score))
            if word != want_word:  # only among scores tied within float32 noise
                assert abs(score - want_score) < 1e-6 * max(1.0, abs(want_score))
    assert (log.count("candidates") > 0) == prefilter
