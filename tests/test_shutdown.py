"""Graceful shutdown: in-flight unary calls finish, streams end at a reply boundary with
UNAVAILABLE, and a stream resumes from its last cursor on another replica, exactly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import tiktoken
from embedserve.client import AsyncClient, Batch, UnavailableError
from embedserve.server.app import Components

from .conftest import TINY_CONFIG, ServerThread

CONFIG = replace(TINY_CONFIG, vocab_size=50257, dim=8, context_length=64)
TEXT = " ".join(f"token{i % 211} and {i}" for i in range(4000))
STREAM: dict[str, Any] = {
    "batch_size": 4, "max_length": 16, "stride": 8, "shuffle": True, "seed": 7, "batches_per_message": 1,
}  # fmt: skip
GRACE = 20.0


@pytest.fixture(scope="module")
def components() -> Components:
    from embedserve.server.app import load_components

    return load_components(CONFIG)


def _windows(batches: list[Batch]) -> list[tuple[int, ...]]:
    return [tuple(row) for batch in batches for row in batch.inputs.tolist()]


async def test_shutdown_finishes_calls_and_streams_resume_elsewhere(
    components: Components, reference_encoding: tiktoken.Encoding
) -> None:
    leaving = ServerThread(CONFIG, components)
    staying = ServerThread(CONFIG, components)
    try:
        async with AsyncClient(staying.target) as reference_client:
            expected = [batch async for batch in reference_client.stream_batches(text=TEXT, **STREAM)]
        assert len(expected) > 20

        async with AsyncClient(leaving.target) as client:
            received: list[Batch] = []
            stream = client.stream_batches(text=TEXT, reconnect_attempts=0, **STREAM)
            for _ in range(3):
                received.append(await anext(stream))

            windows: asyncio.Queue[np.ndarray | None] = asyncio.Queue()

            async def window_source() -> AsyncIterator[np.ndarray]:
                while (window := await windows.get()) is not None:
                    yield window

            embedded = client.embed_stream(window_source())
            for start in range(3):
                await windows.put(np.arange(start, start + 16).reshape(1, 16))
                assert (await anext(embedded)).shape == (1, 16, 8)

            big_text = "the quick brown fox jumps over the lazy dog. " * 60_000
            in_flight = asyncio.ensure_future(client.tokenize(big_text))
            await asyncio.sleep(0.05)  # accepted before the shutdown starts
            shutdown = asyncio.wrap_future(leaving.begin_shutdown(GRACE))

            async def drain_stream() -> None:
                async for batch in stream:
                    received.append(batch)

            with pytest.raises(UnavailableError, match="shutting down"):
                await drain_stream()
            with pytest.raises(UnavailableError, match="shutting down"):
                await anext(embedded)
            assert len(await in_flight) == len(reference_encoding.encode(big_text))
            took = await shutdown
        assert took < GRACE / 2, "streams ended at a reply boundary, not when the grace period ran out"

        async with AsyncClient(staying.target) as client:
            rest = client.stream_batches(text=TEXT, cursor=received[-1].cursor, **STREAM)
            received += [batch async for batch in rest]
        assert [batch.index for batch in received] == [batch.index for batch in expected]
        assert _windows(received) == _windows(expected)
    finally:
        staying.stop()
        leaving.stop()
