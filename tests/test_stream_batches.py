"""StreamBatches over gRPC: the notebook's batches and the DataLoader's order, sources, and a stream
that stops when its client leaves."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
import tiktoken
import torch
from embedserve.client import (
    AsyncClient,
    Batch,
    InvalidArgumentError,
)
from embedserve.server import ServerConfig
from embedserve.server.app import Components
from embedserve.server.core.cursor import StreamSettings
from embedserve.server.core.windows import PlannedBatch

from .conftest import ServerThread, drain, stream_status
from .notebook_reference import create_dataloader_v1, notebook_tables
from .test_core_windows import FIRST_BATCH


async def test_notebook_flow_tokenize_batches_embeddings(server: ServerThread, verdict_text: str) -> None:
    token_layer, pos_layer = notebook_tables()
    async with AsyncClient(server.target) as client:
        ids = await client.tokenize(verdict_text)
        assert len(ids) == 5154
        batches = [
            batch
            async for batch in client.stream_batches(
                corpus="the-verdict.txt",
                batch_size=8,
                max_length=4,
                stride=4,
                shuffle=False,
                include_embeddings=True,
            )
        ]
    assert len(batches) == 161 == batches[0].num_batches
    first = batches[0]
    assert first.index == 0
    assert first.inputs.tolist() == FIRST_BATCH
    assert first.targets[:, :-1].tolist() == [row[1:] for row in FIRST_BATCH]
    assert first.embeddings is not None
    assert first.embeddings.shape == (8, 4, 256)
    expected = token_layer(torch.tensor(FIRST_BATCH)) + pos_layer(torch.arange(4))
    np.testing.assert_array_equal(first.embeddings, expected.detach().numpy())
    assert [b.index for b in batches] == list(range(161))


async def test_inline_text_and_corpus_give_the_same_batches(server: ServerThread, verdict_text: str) -> None:
    settings = {"batch_size": 4, "max_length": 16, "stride": 8, "shuffle": True, "seed": 5}
    async with AsyncClient(server.target) as client:
        inline = [b async for b in client.stream_batches(text=verdict_text, **settings)]  # type: ignore[arg-type]
        named = [b async for b in client.stream_batches(corpus="the-verdict.txt", **settings)]  # type: ignore[arg-type]
    assert len(inline) == len(named) > 0
    for a, b in zip(inline, named, strict=True):
        np.testing.assert_array_equal(a.inputs, b.inputs)


@pytest.mark.parametrize("seed", [0, 123])
async def test_shuffle_order_equals_the_dataloader(
    server: ServerThread, verdict_text: str, reference_encoding: tiktoken.Encoding, seed: int
) -> None:
    loader = create_dataloader_v1(
        verdict_text,
        reference_encoding,
        batch_size=8,
        max_length=32,
        stride=16,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    async with AsyncClient(server.target) as client:
        got = [
            b
            async for b in client.stream_batches(
                text=verdict_text,
                batch_size=8,
                max_length=32,
                stride=16,
                shuffle=True,
                seed=seed,
                drop_last=True,
            )
        ]
    expected = list(loader)
    assert len(got) == len(expected)
    for batch, (x, y) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(batch.inputs, x.numpy())
        np.testing.assert_array_equal(batch.targets, y.numpy())
        inputs, targets = batch.to_torch()
        assert inputs.dtype == torch.int64
        assert torch.equal(inputs, x)
        assert torch.equal(targets, y)


async def test_batches_with_embeddings_refuse_ids_past_a_small_vocabulary(tiny_server: ServerThread) -> None:
    # GPT-2 IDs run to 50256; the tiny model has 6 rows. On CUDA an out-of-range
    # lookup would poison the device for every later call.
    async with AsyncClient(tiny_server.target) as client:
        with pytest.raises(InvalidArgumentError, match=r"outside the embedding model's vocabulary \[0, 6\)"):
            await drain(
                client.stream_batches(
                    text="word " * 50, batch_size=2, max_length=4, stride=4, include_embeddings=True
                )
            )
        plain = [
            b async for b in client.stream_batches(text="word " * 50, batch_size=2, max_length=4, stride=4)
        ]
        assert plain
        assert (await client.embed([2, 3, 5, 1], include_positional=False)).shape == (4, 3)


async def test_corpus_escapes_are_refused_even_when_the_target_exists(
    server: ServerThread, data_dir: Path
) -> None:
    (data_dir.parent / "outside.txt").write_text("secret " * 100)
    link = data_dir / "link-out.txt"
    link.symlink_to(data_dir.parent / "outside.txt")
    try:
        async with AsyncClient(server.target) as client:
            for escape in ("../outside.txt", f"{data_dir.parent}/outside.txt", "nested/../../outside.txt"):
                assert await stream_status(client.stream_batches(corpus=escape, max_length=4, stride=4)) in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.NOT_FOUND,
                )
            # The link's target exists and is readable, but lies outside the data folder.
            status = await stream_status(client.stream_batches(corpus=link.name, max_length=4, stride=4))
            assert status == grpc.StatusCode.NOT_FOUND
    finally:
        link.unlink()


async def test_closing_a_stream_early_cancels_it(server: ServerThread) -> None:
    async with AsyncClient(server.target) as client:
        stream = client.stream_batches(text="word " * 5000, batch_size=2, max_length=8, stride=1)
        seen: list[Batch] = []
        async for batch in stream:
            seen.append(batch)
            if len(seen) == 3:
                break
        await stream.aclose()
        assert [b.index for b in seen] == [0, 1, 2]
        assert await client.tokenize("ok") == [482]


async def test_a_cancelled_stream_stops_generating_on_the_server(
    default_config: ServerConfig, default_components: Components
) -> None:
    gathered = 0

    def counting(settings: StreamSettings, batch: PlannedBatch) -> None:
        nonlocal gathered
        gathered += 1

    running = ServerThread(default_config, default_components, on_stream_batch=counting)
    try:
        async with AsyncClient(running.target) as client:
            stream = client.stream_batches(
                text="word " * 5000, batch_size=2, max_length=8, stride=1, batches_per_message=1
            )
            first = await anext(stream)
            assert first.num_batches > 2000
            await stream.aclose()
            await asyncio.sleep(0.5)
            after_close = gathered
            await asyncio.sleep(0.5)
    finally:
        running.stop()
    assert gathered == after_close
    assert gathered < 100
