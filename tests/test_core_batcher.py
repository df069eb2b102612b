"""The shared Batcher (core, no gRPC): concurrent submissions coalesce, sized items count as their size,
a key keeps batches apart, and a failing merged batch fails only its bad request."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from embedserve.server.core import Overloaded
from embedserve.server.core.batcher import Batcher


class GatedRun:
    """A batch function that records each batch and holds the first until released."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.release = threading.Event()
        self.started = threading.Event()

    def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.started.set()
        self.release.wait(10)
        return [item * 10 if isinstance(item, int) else item.upper() for item in items]


async def _wait_started(run: GatedRun) -> None:
    assert await asyncio.to_thread(run.started.wait, 10)


async def test_requests_arriving_during_a_batch_go_together_into_the_next() -> None:
    run = GatedRun()
    with ThreadPoolExecutor(1) as executor:
        batcher: Batcher[int, int] = Batcher(run, executor=executor)
        first = asyncio.create_task(batcher.submit([1, 2]))
        await _wait_started(run)
        waiting = [asyncio.create_task(batcher.submit([n])) for n in (3, 4, 5)]
        await asyncio.sleep(0.05)
        run.release.set()
        assert (await first).outputs == [10, 20]
        assert [(await w).outputs for w in waiting] == [[30], [40], [50]]
    assert run.batches == [[1, 2], [3, 4, 5]]
    assert batcher.stats.batches == 2


async def test_sized_items_count_as_their_size_for_the_batch_budget_and_the_queue() -> None:
    """One item per request, sized as the queries it holds: max_batch and max_queue count those."""
    run = GatedRun()
    with ThreadPoolExecutor(1) as executor:
        batcher: Batcher[str, str] = Batcher(run, executor=executor, max_batch=6, max_queue=10, size=len)
        first = asyncio.create_task(batcher.submit(["ab"]))
        await _wait_started(run)
        queued = [asyncio.create_task(batcher.submit([text])) for text in ("cde", "fgh", "ijkl")]
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded, match="10 items are already queued"):
            await batcher.submit(["m"])  # 3 + 3 + 4 queued: one more is over 10
        run.release.set()
        assert (await first).outputs == ["AB"]
        assert [(await q).outputs for q in queued] == [["CDE"], ["FGH"], ["IJKL"]]
    # 3 + 3 fit max_batch 6; 4 more do not, so they run next (an oversized item would run alone).
    assert run.batches == [["ab"], ["cde", "fgh"], ["ijkl"]]


async def test_a_failing_batch_fails_each_of_its_callers_and_the_next_batch_runs() -> None:
    calls = 0

    def run(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        if 0 in items:
            raise ValueError("zero")
        return items

    with ThreadPoolExecutor(1) as executor:
        batcher: Batcher[int, int] = Batcher(run, executor=executor)
        with pytest.raises(ValueError, match="zero"):
            await batcher.submit([0, 1])
        timed = await batcher.submit([2])
    assert timed.outputs == [2]
    assert timed.queue_seconds >= 0
    assert timed.compute_seconds >= 0
    assert calls == 2


async def test_a_cancelled_callers_items_are_dropped() -> None:
    run = GatedRun()
    with ThreadPoolExecutor(1) as executor:
        batcher: Batcher[int, int] = Batcher(run, executor=executor)
        first = asyncio.create_task(batcher.submit([1]))
        await _wait_started(run)
        cancelled = asyncio.create_task(batcher.submit([2]))
        kept = asyncio.create_task(batcher.submit([3]))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        run.release.set()
        await first
        assert (await kept).outputs == [30]
    assert run.batches == [[1], [3]]


async def test_a_key_keeps_requests_out_of_batches_of_another_key() -> None:
    run = GatedRun()
    with ThreadPoolExecutor(1) as executor:
        batcher: Batcher[int, int] = Batcher(run, executor=executor)
        first = asyncio.create_task(batcher.submit([1], key="a"))
        await _wait_started(run)
        keyed = ((2, "b"), (3, "a"), (4, "b"))
        queued = [asyncio.create_task(batcher.submit([n], key=key)) for n, key in keyed]
        await asyncio.sleep(0.05)
        run.release.set()
        await first
        assert [(await q).outputs for q in queued] == [[20], [30], [40]]
    # The first queued request's key leads; the other key keeps its place for the batch after.
    assert run.batches == [[1], [2, 4], [3]]


async def test_a_failing_merged_batch_runs_again_one_request_at_a_time() -> None:
    run = GatedRun()

    def failing_on_zero(items: list[int]) -> list[int]:
        if 0 in items:
            run.batches.append(list(items))
            raise ValueError("zero")
        return run(items)

    with ThreadPoolExecutor(1) as executor:
        batcher: Batcher[int, int] = Batcher(failing_on_zero, executor=executor)
        first = asyncio.create_task(batcher.submit([1]))
        await _wait_started(run)
        queued = [asyncio.create_task(batcher.submit([n])) for n in (2, 0, 3)]
        await asyncio.sleep(0.05)
        run.release.set()
        await first
        two, zero, three = await asyncio.gather(*queued, return_exceptions=True)
    assert isinstance(zero, ValueError)
    assert [getattr(two, "outputs", None), getattr(three, "outputs", None)] == [[20], [30]]
    assert run.batches == [[1], [2, 0, 3], [2], [0], [3]]
    assert (batcher.queued, batcher.waiting_requests) == (0, 0)


async def test_a_request_over_the_queue_bound_is_admitted_when_the_queue_is_empty() -> None:
    with ThreadPoolExecutor(1) as executor:
        batcher: Batcher[int, int] = Batcher(lambda items: items, executor=executor, max_queue=2)
        assert (await batcher.submit([1, 2, 3])).outputs == [1, 2, 3]
