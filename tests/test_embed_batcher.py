"""The Embed batcher (core, no gRPC): merged lookups equal single ones bit for bit, under its limits."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time

import numpy as np
import pytest
import torch
from embedserve.server.core import EmbeddingModel, EmbedJob, InvalidInput, Overloaded, seeded_embedding_tables
from embedserve.server.core.embed_batcher import EmbedBatcher
from embedserve.server.core.embedding import DIRECT_LOOKUP_TOKENS

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model() -> EmbeddingModel:
    return EmbeddingModel(seeded_embedding_tables(1000, 16, 64, 123), CPU)


def _random_jobs(rng: np.random.Generator, count: int) -> list[EmbedJob]:
    jobs = []
    for _ in range(count):
        length = int(rng.integers(1, 40))
        shape = (length,) if rng.random() < 0.3 else (int(rng.integers(1, 5)), length)
        jobs.append(
            EmbedJob(
                rng.integers(0, 1000, size=shape).astype(np.int32 if rng.random() < 0.5 else np.int64),
                position_offset=int(rng.integers(0, 64 - length + 1)),
                include_positional=bool(rng.random() < 0.8),
                output_dtype=[torch.float32, torch.float16, torch.bfloat16][int(rng.integers(0, 3))],
            )
        )
    return jobs


def _alone(model: EmbeddingModel, job: EmbedJob) -> torch.Tensor:
    return model.embed(
        job.token_ids,
        position_offset=job.position_offset,
        include_positional=job.include_positional,
        output_dtype=job.output_dtype,
    )


async def test_concurrent_jobs_merge_and_equal_single_lookups(model: EmbeddingModel) -> None:
    batcher = EmbedBatcher(model, max_batch_tokens=300)
    jobs = _random_jobs(np.random.default_rng(0), 200)
    results = await asyncio.gather(*(batcher.embed(job) for job in jobs))
    for job, result in zip(jobs, results, strict=True):
        expected = _alone(model, job)
        assert result.shape == expected.shape
        assert result.dtype == job.output_dtype
        assert torch.equal(result, expected)
    assert batcher.stats.requests == 200
    assert batcher.stats.batches < 100  # merged
    assert batcher.queued_tokens == 0


async def test_budget_and_no_merging(model: EmbeddingModel) -> None:
    sizes: list[int] = []
    original = model.embed_many

    def recording(jobs: list[EmbedJob]) -> list[torch.Tensor]:
        sizes.append(sum(job.tokens for job in jobs))
        return original(jobs)

    model.embed_many = recording  # type: ignore[method-assign]
    try:
        jobs = [EmbedJob(np.arange(i % 50 + 1) % 1000) for i in range(120)]
        batcher = EmbedBatcher(model, max_batch_tokens=200)
        await asyncio.gather(*(batcher.embed(job) for job in jobs))
        assert max(sizes) <= 200
        sizes.clear()
        unmerged = EmbedBatcher(model, max_batch_tokens=0)
        await asyncio.gather(*(unmerged.embed(job) for job in jobs))
        assert unmerged.stats.batches == 120
        assert len(sizes) == 120
        big = EmbedJob(np.zeros(500, dtype=np.int64), include_positional=False)  # alone over the budget
        assert (await batcher.embed(big)).shape == (500, 16)
    finally:
        del model.embed_many


async def test_full_queue_is_overloaded_with_a_retry_hint(model: EmbeddingModel) -> None:
    batcher = EmbedBatcher(model, max_queue_tokens=100)
    jobs = [EmbedJob(np.zeros(40, dtype=np.int64)) for _ in range(10)]
    outcomes = await asyncio.gather(*(batcher.embed(job) for job in jobs), return_exceptions=True)
    refused = [o for o in outcomes if isinstance(o, Overloaded)]
    assert refused, "some of 400 tokens against a queue of 100 must be refused"
    assert "retry in about" in str(refused[0])
    assert all(isinstance(o, torch.Tensor | Overloaded) for o in outcomes)
    assert batcher.queued_tokens == 0
    assert (await batcher.embed(jobs[0])).shape == (40, 16)  # and it recovers


async def test_cancelled_callers_leave_nothing_behind(model: EmbeddingModel) -> None:
    batcher = EmbedBatcher(model)
    jobs = _random_jobs(np.random.default_rng(1), 50)
    tasks = [asyncio.create_task(batcher.embed(job)) for job in jobs]
    await asyncio.sleep(0)
    for task in tasks[::2]:
        task.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    for job, outcome in zip(jobs[1::2], done[1::2], strict=True):
        assert isinstance(outcome, torch.Tensor)
        assert torch.equal(outcome, _alone(model, job))
    assert batcher.queued_tokens == 0
    assert batcher.waiting_requests == 0  # no bookkeeping left for callers that went away


async def test_a_cancelled_last_caller_frees_its_place_and_the_reported_queue(
    model: EmbeddingModel,
) -> None:
    reported: list[int] = []
    batcher = EmbedBatcher(model, max_queue_tokens=1000, on_queue_change=reported.append)
    release = threading.Event()
    embed_many = model.embed_many

    def held(jobs: list[EmbedJob]) -> list[torch.Tensor]:
        release.wait(5)
        return embed_many(jobs)

    model.embed_many = held  # type: ignore[method-assign]
    try:
        large = EmbedJob(np.zeros(900, dtype=np.int64), include_positional=False)
        running = asyncio.create_task(batcher.embed(EmbedJob(np.zeros(10, dtype=np.int64))))
        await asyncio.sleep(0.05)  # the first job holds the device
        waiting = asyncio.create_task(batcher.embed(large))
        await asyncio.sleep(0.01)
        assert batcher.queued_tokens == 900
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        # Nothing runs after it, yet its place is free at once and the gauge says so.
        assert (batcher.queued_tokens, reported[-1]) == (0, 0)
        admitted = asyncio.create_task(batcher.embed(large))
        release.set()
        assert (await running).shape == (10, 16)
        assert (await admitted).shape == (900, 16)
        assert (batcher.queued_tokens, reported[-1]) == (0, 0)
    finally:
        release.set()
        del model.embed_many


async def test_an_idle_batcher_does_not_wait(model: EmbeddingModel) -> None:
    batcher = EmbedBatcher(model, max_wait_us=2_000_000)  # 2 s, paid only while requests keep coming
    job = EmbedJob(np.arange(10))
    started = time.perf_counter()
    await batcher.embed(job)
    assert time.perf_counter() - started < 1.0
    await asyncio.sleep(2.1)
    started = time.perf_counter()
    await batcher.embed(job)
    assert time.perf_counter() - started < 1.0


async def test_bad_ids_fail_their_batch_not_the_batcher(model: EmbeddingModel) -> None:
    batcher = EmbedBatcher(model)
    good = EmbedJob(np.arange(5))
    bad_id = EmbedJob(np.array([1, 2, 5000]))  # unchecked jobs: the model refuses them before the device
    bad_position = EmbedJob(np.arange(10), position_offset=60)
    for bad in (bad_id, bad_position):
        outcomes = await asyncio.gather(batcher.embed(good), batcher.embed(bad), return_exceptions=True)
        assert isinstance(outcomes[1], InvalidInput)
        assert isinstance(outcomes[0], torch.Tensor)
        assert torch.equal(outcomes[0], _alone(model, good))
    assert torch.equal(await batcher.embed(good), _alone(model, good))


@pytest.mark.parametrize("output_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_results_written_into_out_equal_lookups_on_their_own(
    model: EmbeddingModel, output_dtype: torch.dtype
) -> None:
    """Jobs given an `out` (a reply being built) get their result written there: large ones by a
    lookup of their own straight into it, small ones copied from the batch; bit for bit the same."""
    rng = np.random.default_rng(7)
    shapes = [(DIRECT_LOOKUP_TOKENS,), (20, 30), (3, 200), (2, 5), (40,), (DIRECT_LOOKUP_TOKENS // 2, 2)]
    jobs = [
        EmbedJob(
            rng.integers(0, 1000, size=shape),
            position_offset=int(rng.integers(0, 64 - shape[-1] + 1)) if shape[-1] <= 64 else 0,
            include_positional=shape[-1] <= 64,
            output_dtype=output_dtype,
        )
        for shape in shapes
    ]
    outs = [torch.full((*job.token_ids.shape, model.dim), float("nan"), dtype=output_dtype) for job in jobs]
    with_out = [dataclasses.replace(job, out=out) for job, out in zip(jobs, outs, strict=True)]
    mixed = with_out[:4] + jobs[4:]  # some with an out, some without, in one batch
    results = model.embed_many(mixed)
    for job, result in zip(mixed, results, strict=True):
        assert torch.equal(result, _alone(model, job))
        if job.out is not None:
            assert result.data_ptr() == job.out.data_ptr()
    for job, out in zip(jobs[:4], outs[:4], strict=True):
        assert torch.equal(out, _alone(model, job))
    wrong = dataclasses.replace(jobs[0], out=torch.empty(3, model.dim, dtype=output_dtype))
    with pytest.raises(ValueError, match="not the job's result"):
        model.embed_many([wrong])
