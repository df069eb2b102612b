"""Shared-memory output: results land in the region, equal to a reply; regions are checked and freed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from embedserve.client import AsyncClient, InvalidArgumentError, NotFoundError
from embedserve.server.app import Components
from embedserve.v1 import embedding_pb2, embedding_pb2_grpc

from .client_twins import CLIENT_KINDS, open_client
from .conftest import ServerThread


@pytest.fixture(params=CLIENT_KINDS)
async def client(request: pytest.FixtureRequest, server: ServerThread) -> AsyncIterator[AsyncClient]:
    """AsyncClient, then the synchronous Client (whose regions are used as `with ... as region`)."""
    async with open_client(request.param, server.target) as opened:
        yield opened


async def _released(components: Components) -> bool:
    for _ in range(100):
        if len(components.shared_memory) == 0:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_results_land_in_the_region_equal_to_replies(
    client: AsyncClient, default_components: Components
) -> None:
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 50257, size=(4, 32))
    expected = await client.embed(ids)
    half = await client.embed(ids, dtype="float16")
    brain = await client.embed(ids, dtype="bfloat16", position_offset=5)
    async with client.shared_memory(1 << 20) as region:
        assert len(default_components.shared_memory) == 1
        got = await client.embed(ids, output=region)
        np.testing.assert_array_equal(got, expected)
        at_offset = await client.embed(ids, output=region, output_offset=expected.nbytes, dtype="float16")
        np.testing.assert_array_equal(at_offset, half)
        np.testing.assert_array_equal(got, expected)  # the first result is untouched
        widened = await client.embed(ids, output=region, dtype="bfloat16", position_offset=5)
        np.testing.assert_array_equal(widened, brain)
        with pytest.raises(InvalidArgumentError, match="do not fit"):
            await client.embed(ids, output=region, output_offset=(1 << 20) - 100)
    # Large requests are looked up straight into the region, not copied there.
    large = rng.integers(0, 50257, size=(4, 256))
    async with client.shared_memory(4 << 20) as region:
        for dtype in ("float32", "bfloat16"):
            direct = await client.embed(large, output=region, output_offset=64, dtype=dtype)
            np.testing.assert_array_equal(direct, await client.embed(large, dtype=dtype))
    assert await _released(default_components)


async def test_bad_regions_and_handles(
    server: ServerThread, client: AsyncClient, default_components: Components
) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        for name, error in (
            ("../etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
            ("no-such-region-x", grpc.StatusCode.NOT_FOUND),
        ):
            session = stub.SharedMemorySession(
                embedding_pb2.SharedMemorySessionRequest(name=name, byte_size=10)
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await session.read()
            assert raised.value.code() is error
    async with client.shared_memory(4096) as region:
        region.handle = "forged"
        with pytest.raises(NotFoundError, match="handle"):
            await client.embed([1, 2, 3], output=region)
    small = Path("/dev/shm") / "embedserve-test-small"
    small.write_bytes(b"\0" * 4096)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            session = stub.SharedMemorySession(
                embedding_pb2.SharedMemorySessionRequest(name=small.name, byte_size=8192)
            )
            with pytest.raises(grpc.aio.AioRpcError, match="larger than region"):
                await session.read()
    finally:
        small.unlink()
    assert await _released(default_components)
    assert not [name for name in os.listdir("/dev/shm") if name.startswith("embedserve-")]


async def test_a_client_that_goes_away_releases_its_region(
    server: ServerThread, default_components: Components
) -> None:
    client = AsyncClient(server.target)
    region = await client.shared_memory(4096).__aenter__()
    assert len(default_components.shared_memory) == 1
    await client.close()  # the connection drops without ending the session
    assert await _released(default_components)
    await region.close()


def test_a_region_released_while_a_result_is_written_stays_mapped_until_the_write_ends(
    tmp_path: Path,
) -> None:
    """The lookup writes through a view of the region; releasing the region meanwhile (its
    session ended) unmaps it only once that view is gone."""
    import gc

    import torch
    from embedserve.server.core.shared_memory import SharedMemoryRegistry

    (tmp_path / "region").write_bytes(b"\0" * 4096)
    registry = SharedMemoryRegistry(tmp_path)
    handle = registry.register("region", 4096)
    view = registry.view(handle, 1024, (4, 8), torch.float32)
    registry.release(handle)
    assert len(registry) == 0
    view.fill_(2.5)  # still mapped: no crash, and the file sees it
    del view
    gc.collect()
    written = np.frombuffer((tmp_path / "region").read_bytes(), dtype=np.float32)
    assert (written[256 : 256 + 32] == 2.5).all()
    assert (written[:256] == 0).all()
