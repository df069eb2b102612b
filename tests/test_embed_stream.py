"""EmbedStream over gRPC: order, sequence IDs, a failing producer, a bad window, leaving early."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from embedserve.client import (
    AsyncClient,
    InvalidArgumentError,
)
from embedserve.v1 import embedding_pb2, embedding_pb2_grpc, tensor_pb2

from .conftest import ServerThread, drain


async def test_embed_stream_keeps_order(server: ServerThread) -> None:
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 50257, size=(rng.integers(1, 5), rng.integers(1, 40))) for _ in range(25)]
    async with AsyncClient(server.target) as client:
        expected = [await client.embed(w) for w in windows]

        async def produce() -> AsyncIterator[np.ndarray]:
            for w in windows:
                await asyncio.sleep(0)
                yield w

        from_sync = [e async for e in client.embed_stream(windows)]
        from_async = [e async for e in client.embed_stream(produce())]
    for got in (from_sync, from_async):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)


async def test_embed_stream_echoes_sequence_ids(server: ServerThread) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        requests = [
            embedding_pb2.EmbedStreamRequest(
                token_ids=tensor_pb2.Tensor(
                    dtype=tensor_pb2.DTYPE_INT32, shape=[1], data=np.array([i], dtype=np.int32).tobytes()
                ),
                sequence_id=1000 + i,
            )
            for i in range(5)
        ]
        replies = [r async for r in stub.EmbedStream(iter(requests))]
    assert [r.sequence_id for r in replies] == [1000, 1001, 1002, 1003, 1004]


async def test_embed_stream_raises_the_producers_own_error(server: ServerThread) -> None:
    async def failing() -> AsyncIterator[list[int]]:
        yield [1, 2]
        raise RuntimeError("producer broke")

    async with AsyncClient(server.target) as client:
        received: list[object] = []

        async def collect() -> None:
            async for embeddings in client.embed_stream(failing()):
                received.append(embeddings)

        with pytest.raises(RuntimeError, match="producer broke"):
            await collect()
        assert len(received) == 1
        with pytest.raises(TypeError, match="must be integers"):
            await drain(client.embed_stream([[0.5, 1.5]]))
        assert (await client.embed([1])).shape == (1, 256)


async def test_embed_stream_window_errors_and_early_exit(server: ServerThread) -> None:
    rng = np.random.default_rng(5)
    windows = [rng.integers(0, 50257, size=(2, 16)) for _ in range(40)]
    async with AsyncClient(server.target) as client:
        expected = [await client.embed(w) for w in windows[:10]]
        got: list[np.ndarray] = []

        async def consume() -> None:
            async for embeddings in client.embed_stream([*windows[:10], np.array([[1, 99999]]), *windows]):
                got.append(embeddings)

        with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
            await consume()
        assert len(got) == 10  # everything before the bad window, in order
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
        stream = client.embed_stream(windows * 50)
        async for _ in stream:  # leave after one of 2,000 windows
            break
        await stream.aclose()
        concurrent = await asyncio.gather(*(client.embed(w) for w in windows))
        for window, embeddings in zip(windows, concurrent, strict=True):
            np.testing.assert_array_equal(embeddings, await client.embed(window))
