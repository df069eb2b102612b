"""StreamBatches for training: per-epoch order, sharding across ranks, and exactly-once resume."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from embedserve.client import AsyncClient, Batch, EmbedServeError
from embedserve.server import ServerConfig
from embedserve.server.core import InvalidInput, iterate_batches, plan_windows
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import ServerThread, free_port, start_cli_server, start_server

TEXT = " ".join(f"word{i % 97} and {i}" for i in range(3000))  # a few thousand tokens


def _plans(
    num_tokens: int,
    max_length: int,
    stride: int,
    batch_size: int,
    world_size: int,
    drop_last: bool,
    seed: int,
    epoch: int,
) -> list[Any]:
    return [
        plan_windows(
            num_tokens=num_tokens, max_length=max_length, stride=stride, batch_size=batch_size, shuffle=True,
            seed=seed, drop_last=drop_last, epoch=epoch, rank=rank, world_size=world_size,
        )
        for rank in range(world_size)
    ]  # fmt: skip


@settings(max_examples=200, deadline=None)
@given(
    num_tokens=st.integers(2, 400),
    max_length=st.integers(1, 16),
    stride=st.integers(1, 8),
    batch_size=st.integers(1, 6),
    world_size=st.integers(1, 5),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
    epoch=st.integers(0, 3),
)
def test_ranks_cover_every_window_exactly_once(
    num_tokens: int,
    max_length: int,
    stride: int,
    batch_size: int,
    world_size: int,
    drop_last: bool,
    seed: int,
    epoch: int,
) -> None:
    try:
        plans = _plans(num_tokens, max_length, stride, batch_size, world_size, drop_last, seed, epoch)
    except InvalidInput:
        return  # no window, or no full global batch under drop_last: refused, as documented
    order = np.asarray(plans[0].order) * stride
    seen = [
        start for plan in plans for b in range(plan.num_batches) for start in plan.batch_starts(b).tolist()
    ]
    assert len(seen) == len(set(seen))  # disjoint ranks, no repeats
    global_size = batch_size * world_size
    expected = order[: len(order) // global_size * global_size] if drop_last else order
    assert sorted(seen) == sorted(expected.tolist())
    # Global batch g is the ranks' g-th batches in rank order: the order does not depend on world_size.
    rebuilt = [
        start
        for g in range(max(plan.num_batches for plan in plans))
        for plan in plans
        if g < plan.num_batches
        for start in plan.batch_starts(g).tolist()
    ]
    assert rebuilt == expected.tolist()
    if drop_last:
        assert len({plan.num_batches for plan in plans}) == 1


def test_epochs_are_distinct_fixed_permutations() -> None:
    def order(epoch: int) -> list[int]:
        plan = plan_windows(
            num_tokens=5000,
            max_length=8,
            stride=4,
            batch_size=4,
            shuffle=True,
            seed=9,
            drop_last=True,
            epoch=epoch,
        )
        return list(np.asarray(plan.order).tolist())

    assert order(1) == order(1)
    assert len({tuple(order(e)) for e in range(4)}) == 4
    assert sorted(order(3)) == list(range(len(order(3))))


async def _stream(target: str, **kwargs: Any) -> list[Batch]:
    async with AsyncClient(target) as client:
        return [b async for b in client.stream_batches(text=TEXT, max_length=16, stride=8, seed=3, **kwargs)]


def _same(got: list[Batch], expected: list[Batch]) -> None:
    assert [(b.epoch, b.index) for b in got] == [(b.epoch, b.index) for b in expected]
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a.inputs, b.inputs)
        np.testing.assert_array_equal(a.targets, b.targets)


async def test_resume_anywhere_equals_the_uninterrupted_stream(tiny_server: ServerThread) -> None:
    other = start_server(ServerConfig(port=0, device="cpu", word_vectors="none", vocab_size=6, dim=3))
    try:
        for sharding in ({"rank": 0, "world_size": 1}, {"rank": 1, "world_size": 3}):
            common = {"batch_size": 4, "epoch": 2, "epochs": 3, "drop_last": False, **sharding}
            full = await _stream(tiny_server.target, **common)
            per_epoch = len([b for b in full if b.epoch == 2])
            assert {b.epoch for b in full} == {2, 3, 4}
            assert per_epoch > 3
            for k in (1, per_epoch - 1, per_epoch, per_epoch + 2, len(full) - 1, len(full)):
                first = full[:k]
                resumed = await _stream(
                    other.target, cursor=first[-1].cursor, **common
                )  # another process's twin
                _same(first + resumed, full)
            # Twice within one epoch: resume from a resumed stream's cursor.
            middle = await _stream(tiny_server.target, cursor=full[1].cursor, **common)
            again = await _stream(tiny_server.target, cursor=middle[1].cursor, **common)
            _same(full[:2] + middle[:2] + again, full)
    finally:
        other.stop()


async def test_a_cursor_from_other_settings_is_refused_with_the_reason(tiny_server: ServerThread) -> None:
    batches = await _stream(tiny_server.target, batch_size=4)
    cursor = batches[0].cursor

    async def resume(text: str, seed: int, cursor: bytes) -> None:
        async with AsyncClient(tiny_server.target) as client:
            async for _ in client.stream_batches(
                text=text, max_length=16, stride=8, seed=seed, batch_size=4, cursor=cursor
            ):
                pass

    with pytest.raises(EmbedServeError, match=r"seed \(cursor 3, request 4\)") as raised:
        await resume(TEXT, 4, cursor)
    assert raised.value.code.name == "FAILED_PRECONDITION"
    with pytest.raises(EmbedServeError, match="source_sha256"):
        await resume(TEXT + " more", 3, cursor)
    for forged in (b"garbage", cursor[:-4] + b"AAAA"):
        with pytest.raises(EmbedServeError, match="cannot be read"):
            await resume(TEXT, 3, forged)


async def test_the_client_resumes_across_a_server_restart() -> None:
    port = free_port()
    flags = (
        "--port",
        str(port),
        "--vocab-size",
        "6",
        "--dim",
        "3",
        "--device",
        "cpu",
        "--word-vectors",
        "none",
    )
    expected = []
    server = start_cli_server(*flags)
    try:
        expected = await _stream(f"127.0.0.1:{port}", batch_size=2, epochs=2)
        got: list[Batch] = []
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            stream = client.stream_batches(text=TEXT, max_length=16, stride=8, seed=3, batch_size=2, epochs=2)
            async for batch in stream:
                got.append(batch)
                if len(got) == 5:
                    server.process.kill()  # mid-stream, no goodbye
                    server.process.wait(10)
                    await asyncio.sleep(0.3)
                    server = start_cli_server(*flags)
        _same(got, expected)
    finally:
        server.terminate()


@settings(max_examples=150, deadline=None)
@given(
    num_tokens=st.integers(20, 600),
    max_length=st.integers(1, 12),
    stride=st.integers(1, 6),
    batch_size=st.integers(1, 5),
    world_size=st.integers(1, 4),
    data=st.data(),
)
def test_resuming_after_any_batch_continues_with_exactly_the_rest(
    num_tokens: int, max_length: int, stride: int, batch_size: int, world_size: int, data: st.DataObject
) -> None:
    rank = data.draw(st.integers(0, world_size - 1))
    drop_last = data.draw(st.booleans())
    first_epoch, epochs = data.draw(st.integers(0, 3)), data.draw(st.integers(1, 3))

    def plan_for(epoch: int) -> Any:
        return plan_windows(
            num_tokens=num_tokens, max_length=max_length, stride=stride, batch_size=batch_size, shuffle=True,
            seed=11, drop_last=drop_last, epoch=epoch, rank=rank, world_size=world_size,
        )  # fmt: skip

    try:
        plan_for(first_epoch)
    except InvalidInput:
        return
    last = first_epoch + epochs - 1
    full = list(iterate_batches(plan_for, epoch=first_epoch, index=0, last_epoch=last))
    if not full:
        return
    stops = sorted(data.draw(st.lists(st.integers(1, len(full)), min_size=1, max_size=3)))
    stitched: list[Any] = []
    epoch, index = first_epoch, 0
    for stop in [*stops, len(full)]:  # resume several times, possibly at the same point twice
        for batch in iterate_batches(plan_for, epoch=epoch, index=index, last_epoch=last):
            if len(stitched) >= stop:
                break
            stitched.append(batch)
        if stitched:
            epoch, index = stitched[-1].next_epoch, stitched[-1].next_index
    assert [(b.epoch, b.index, b.starts.tolist()) for b in stitched] == [
        (b.epoch, b.index, b.starts.tolist()) for b in full
    ]


async def test_packed_messages_carry_the_same_batches_and_cursors(tiny_server: ServerThread) -> None:
    settings: dict[str, Any] = {"batch_size": 2, "max_length": 4, "stride": 3, "shuffle": True, "seed": 5}
    async with AsyncClient(tiny_server.target) as client:
        one_each = [b async for b in client.stream_batches(text=TEXT, batches_per_message=1, **settings)]
        packed = [b async for b in client.stream_batches(text=TEXT, batches_per_message=7, **settings)]
        default = [b async for b in client.stream_batches(text=TEXT, **settings)]
        assert len(one_each) > 30
        for stream in (packed, default):
            assert [b.index for b in stream] == [b.index for b in one_each]
            assert all(np.array_equal(a.inputs, b.inputs) for a, b in zip(stream, one_each, strict=True))
            assert [b.cursor for b in stream] == [b.cursor for b in one_each]
        # Stopping in the middle of a packed message and resuming from that batch's cursor.
        rest = client.stream_batches(text=TEXT, batches_per_message=7, cursor=packed[10].cursor, **settings)
        assert [b.index async for b in rest] == [b.index for b in one_each[11:]]
