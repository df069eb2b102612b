"""Shared-memory output: the server creates each region, results land in it equal to a reply, and
the server touches no file it did not create, for no caller off its host."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from embedserve.client import AsyncClient, NotFoundError
from embedserve.server.app import Components
from embedserve.server.core import InvalidInput, Overloaded, PreconditionFailed
from embedserve.server.core.shared_memory import REGION_PREFIX, SharedMemoryRegistry
from embedserve.server.security import is_same_host
from embedserve.tensor import to_tensor_pb
from embedserve.v1 import embedding_pb2, embedding_pb2_grpc, tensor_pb2

from .client_twins import CLIENT_KINDS, open_client
from .conftest import ServerThread, outside_address

SHM = Path("/dev/shm")


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
        # The server made the file: 0600, this user's, exactly the size asked for.
        made = (SHM / region.name).stat()
        assert stat.S_IMODE(made.st_mode) == 0o600
        assert made.st_uid == os.getuid()
        assert made.st_size == 1 << 20
        got = await client.embed(ids, output=region)
        np.testing.assert_array_equal(got, expected)
        at_offset = await client.embed(ids, output=region, output_offset=expected.nbytes, dtype="float16")
        np.testing.assert_array_equal(at_offset, half)
        np.testing.assert_array_equal(got, expected)  # the first result is untouched
        widened = await client.embed(ids, output=region, dtype="bfloat16", position_offset=5)
        np.testing.assert_array_equal(widened, brain)
        with pytest.raises(Exception, match="do not fit"):
            await client.embed(ids, output=region, output_offset=(1 << 20) - 100)
        name = region.name
    # Large requests are looked up straight into the region, not copied there.
    large = rng.integers(0, 50257, size=(4, 256))
    async with client.shared_memory(4 << 20) as region:
        for dtype in ("float32", "bfloat16"):
            direct = await client.embed(large, output=region, output_offset=64, dtype=dtype)
            np.testing.assert_array_equal(direct, await client.embed(large, dtype=dtype))
    assert await _released(default_components)
    assert not (SHM / name).exists()  # the server removed what it made


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    """Another program's 0600 segment, and a private file beside it, that no request may touch."""
    segment = SHM / "embedserve-test-victim"
    segment.write_bytes(b"precious" * 512)
    segment.chmod(0o600)
    yield segment
    segment.unlink(missing_ok=True)


async def test_no_request_makes_the_server_touch_a_file_it_did_not_create(
    server: ServerThread, default_components: Components, victim: Path
) -> None:
    before = _snapshot(victim)
    names = [victim.name, "/" + victim.name, "../etc/passwd", "no-such-region-x", "embedserve-hostile-input"]
    refusals = set()
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        for name in names:
            for byte_size in (10, 4096, 1 << 30):
                session = stub.SharedMemorySession(
                    embedding_pb2.SharedMemorySessionRequest(name=name, byte_size=byte_size)
                )
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await session.read()
                assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
                refusals.add(raised.value.details())
        # An existing name and a missing one are refused alike: nothing is told about the files.
        assert len(refusals) == 1, refusals
        # A handle of no session of ours writes nowhere.
        embed = stub.Embed(
            embedding_pb2.EmbedRequest(
                token_ids=(await _token_ids([1, 2, 3])),
                options=embedding_pb2.EmbedOptions(
                    output_region=embedding_pb2.SharedMemoryOutput(handle=victim.name, offset=0)
                ),
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await embed
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND
    assert _snapshot(victim) == before
    assert await _released(default_components)


def _snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


async def _token_ids(ids: list[int]) -> tensor_pb2.Tensor:
    return to_tensor_pb(np.asarray(ids, np.int32), "int32")


async def test_a_forged_handle_is_not_found(client: AsyncClient) -> None:
    async with client.shared_memory(4096) as region:
        region.handle = "forged"
        with pytest.raises(NotFoundError, match="handle"):
            await client.embed([1, 2, 3], output=region)


async def test_each_connection_holds_a_bounded_number_of_regions(default_components: Components) -> None:
    config = replace(default_components.config, shared_memory_regions=3)
    capped = replace(
        default_components, config=config, shared_memory=SharedMemoryRegistry(max_per_connection=3)
    )
    running = ServerThread(config, capped)
    try:
        async with AsyncClient(running.target) as first, AsyncClient(running.target) as second:
            regions = [await first.shared_memory(4096).__aenter__() for _ in range(3)]
            with pytest.raises(Exception, match="holds 3 shared-memory regions") as raised:
                await first.shared_memory(4096).__aenter__()
            assert getattr(raised.value, "code", None) is grpc.StatusCode.INVALID_ARGUMENT
            # Another connection is not refused for the first one's regions.
            async with second.shared_memory(4096) as other:
                assert other.handle
            await regions[0].close()
            async with first.shared_memory(4096) as again:  # a slot came back
                assert again.handle
            for region in regions[1:]:
                await region.close()
        assert await _released(capped)
    finally:
        running.stop()


async def test_shared_memory_can_be_turned_off(default_components: Components) -> None:
    config = replace(default_components.config, shared_memory_regions=0)
    off = replace(default_components, config=config, shared_memory=SharedMemoryRegistry(max_per_connection=0))
    running = ServerThread(config, off)
    try:
        async with AsyncClient(running.target) as client:
            with pytest.raises(Exception, match="shared memory is off") as raised:
                await client.shared_memory(4096).__aenter__()
            assert getattr(raised.value, "code", None) is grpc.StatusCode.FAILED_PRECONDITION
    finally:
        running.stop()


async def test_callers_off_the_host_are_refused(default_components: Components) -> None:
    address = outside_address()
    if address is None:
        pytest.skip("this machine has no address beyond loopback")
    config = replace(default_components.config, host="0.0.0.0", insecure=True)
    running = ServerThread(config, replace(default_components, config=config))
    try:
        async with grpc.aio.insecure_channel(f"{address}:{running.port}") as channel:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            session = stub.SharedMemorySession(embedding_pb2.SharedMemorySessionRequest(byte_size=4096))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await session.read()
            assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
            options = embedding_pb2.EmbedOptions(
                output_region=embedding_pb2.SharedMemoryOutput(handle="any", offset=0)
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Embed(embedding_pb2.EmbedRequest(token_ids=await _token_ids([1]), options=options))
            assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED
        assert len(default_components.shared_memory) == 0
    finally:
        running.stop()


@pytest.mark.parametrize(
    ("peer", "local"),
    [
        ("ipv4:127.0.0.1:5000", True),
        ("ipv4:127.8.9.1:5000", True),
        ("ipv6:[::1]:5000", True),
        ("ipv6:[::ffff:127.0.0.1]:5000", True),
        ("unix:/tmp/embedserve.sock", True),
        ("ipv4:10.0.0.7:5000", False),
        ("ipv6:[2001:db8::1]:5000", False),
        ("ipv6:[::ffff:10.0.0.7]:5000", False),
        ("ipv4:not-an-address:1", False),
        ("", False),
    ],
)
def test_same_host_peers(peer: str, local: bool) -> None:
    assert is_same_host(peer) is local


async def test_a_client_that_goes_away_releases_its_region(
    server: ServerThread, default_components: Components
) -> None:
    client = AsyncClient(server.target)
    region = await client.shared_memory(4096).__aenter__()
    assert len(default_components.shared_memory) == 1
    name = region.name
    await client.close()  # the connection drops without ending the session
    assert await _released(default_components)
    assert not (SHM / name).exists()
    await region.close()


def test_a_region_released_while_a_result_is_written_stays_mapped_until_the_write_ends(
    tmp_path: Path,
) -> None:
    """The lookup writes through a view of the region; releasing the region meanwhile (its
    session ended) unmaps it only once that view is gone."""
    import gc

    import torch

    registry = SharedMemoryRegistry(tmp_path)
    grant = registry.create("connection", 4096)
    kept = (tmp_path / grant.name).open("rb")  # a client's mapping would keep the bytes like this
    view = registry.view(grant.handle, 1024, (4, 8), torch.float32)
    registry.release(grant.handle)
    assert len(registry) == 0
    assert not (tmp_path / grant.name).exists()
    view.fill_(2.5)  # still mapped: no crash
    del view
    gc.collect()
    written = np.frombuffer(kept.read(), dtype=np.float32)
    kept.close()
    assert (written[256 : 256 + 32] == 2.5).all()
    assert (written[:256] == 0).all()


def test_the_registry_removes_only_regions_of_ended_servers(tmp_path: Path) -> None:
    dead_pid = _dead_pid()
    mine = tmp_path / f"{REGION_PREFIX}{os.getpid()}-{'a' * 32}"
    abandoned = tmp_path / f"{REGION_PREFIX}{dead_pid}-{'b' * 32}"
    someone_elses = tmp_path / "embedserve-0123456789abcdef"  # an older client's name
    for path in (mine, abandoned, someone_elses):
        path.write_bytes(b"x")
    assert SharedMemoryRegistry(tmp_path).remove_abandoned() == 1
    assert mine.exists()
    assert someone_elses.exists()
    assert not abandoned.exists()


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_a_full_shared_memory_folder_refuses_instead_of_crashing(tmp_path: Path) -> None:
    """Regions are allocated when created: on a full tmpfs, a write into a sparse region would
    kill the server (SIGBUS); creating it is refused instead."""
    folder = tmp_path / "tiny-shm"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        registry = SharedMemoryRegistry(folder)
        with pytest.raises(Overloaded, match="no room"):
            registry.create("connection", 4 << 20)
        assert not list(folder.iterdir())
        grant = registry.create("connection", 4096)
        registry.release(grant.handle)
        with pytest.raises(InvalidInput):
            registry.create("connection", 0)
        with pytest.raises(PreconditionFailed):
            SharedMemoryRegistry(folder, max_per_connection=0).create("connection", 4096)
    finally:
        subprocess.run(["umount", str(folder)], check=False)


async def test_one_connection_opens_at_most_max_concurrent_streams_calls(
    default_components: Components,
) -> None:
    """HTTP/2's stream limit: past it the client queues its calls; the server never sees them."""
    config = replace(default_components.config, max_concurrent_streams=2)
    running = ServerThread(config, replace(default_components, config=config))
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
            request = embedding_pb2.SharedMemorySessionRequest(byte_size=4096)
            sessions = [stub.SharedMemorySession(request) for _ in range(3)]
            reads = {asyncio.ensure_future(_first_grant(session)): session for session in sessions}
            done, waiting = await asyncio.wait(reads, timeout=2)
            assert len(done) == 2  # whichever two gRPC started first
            assert all(read.result().handle for read in done)
            await asyncio.sleep(0.5)
            assert len(waiting) == 1
            assert len(default_components.shared_memory) == 2
            reads[next(iter(done))].cancel()
            (queued,) = waiting
            assert (await asyncio.wait_for(queued, 10)).handle  # a stream came free
            for session in sessions:
                session.cancel()
        assert await _released(default_components)
    finally:
        running.stop()


async def _first_grant(session: Any) -> embedding_pb2.SharedMemorySessionResponse:
    reply = await session.read()
    assert isinstance(reply, embedding_pb2.SharedMemorySessionResponse)
    return reply
