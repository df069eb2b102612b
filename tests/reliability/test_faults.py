"""Faults: cancellations mid-stream and exceeded deadlines leave nothing behind; SIGTERM under load
loses no accepted call; SIGKILL and restart lose no streamed window."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import signal
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
from embedserve.client import AsyncClient, DeadlineExceededError, EmbedServeError, UnavailableError

from ..conftest import TINY_CONFIG, ServerThread, free_port
from ._server import ReferenceEmbeddings, start, wait_serving, windows
from .conftest import Scale

TEXT = " ".join(f"fault{i} in the stream" for i in range(3000))
STREAM: dict[str, Any] = {
    "batch_size": 4, "max_length": 32, "stride": 16, "shuffle": True, "drop_last": False,
}  # fmt: skip
SERVER_FLAGS = ("--word-vectors", "none", "--grace", "10")


async def test_cancellations_and_deadlines_leave_nothing_behind(scale: Scale) -> None:
    config = replace(TINY_CONFIG, vocab_size=50257, dim=64, context_length=256)
    from embedserve.server.app import load_components

    running = ServerThread(config, load_components(config))
    metrics = running.server.metrics
    chooser = random.Random(7)
    rounds = 40 if scale.full else 10
    try:
        hasty = AsyncClient(running.target, timeout=0.0005, stream_timeout=0.0005)
        async with AsyncClient(running.target) as client, hasty:
            for _ in range(rounds):
                stream = client.stream_batches(text=TEXT, **STREAM)
                for _ in range(chooser.randrange(1, 4)):
                    await anext(stream)
                await stream.aclose()  # cancels the call mid-stream

                windows_sent = [np.arange(i, i + 32).reshape(1, 32) for i in range(16)]
                embedded = client.embed_stream(windows_sent)
                for _ in range(chooser.randrange(1, 4)):
                    await anext(embedded)
                await embedded.aclose()

                with contextlib.suppress(DeadlineExceededError):
                    await hasty.embed(np.zeros((64, 256), dtype=np.int32))
                with contextlib.suppress(DeadlineExceededError):
                    async for _ in hasty.stream_batches(text=TEXT, **STREAM):
                        pass
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                (streams_metric,) = metrics.open_streams.collect()
                (queue_metric,) = metrics.queue_tokens.collect()
                open_streams = sum(sample.value for sample in streams_metric.samples)
                queued = queue_metric.samples[0].value
                if open_streams == 0 and queued == 0:
                    break
                await asyncio.sleep(0.1)
            assert (open_streams, queued) == (0, 0), "streams and queued work are gone"
            assert (await client.tokenize("hello world")) == [31373, 995]
            assert (await client.embed([[1, 2, 3]])).shape == (1, 3, 64)
        finished = metrics.finished_calls()
        scale.record("faults: cancellations and deadlines", {"rounds": rounds, "calls": finished})
        unclear = {"INTERNAL", "UNKNOWN"}
        assert not any(unclear & set(codes) for codes in finished.values()), finished
    finally:
        running.stop()


async def test_sigterm_under_load_loses_no_accepted_call(scale: Scale, vector_cache: Path) -> None:
    port = free_port()
    server = start(port, vector_cache, *SERVER_FLAGS)
    target = f"127.0.0.1:{port}"
    reference = ReferenceEmbeddings()
    outcomes: Counter[str] = Counter()
    stop = asyncio.Event()

    async def unary_load(index: int) -> None:
        chooser = random.Random(index)
        async with AsyncClient(target, connections=1) as client:
            while not stop.is_set():
                ids = np.array([[chooser.randrange(50257) for _ in range(128)]])
                try:
                    got = await client.embed(ids)
                    outcomes["OK" if np.array_equal(got, reference.embed(ids)) else "WRONG"] += 1
                except EmbedServeError as error:
                    outcomes[error.code.name] += 1
                    if isinstance(error, UnavailableError):
                        return  # the server is gone; this client stops
                await asyncio.sleep(0)

    try:
        await wait_serving(target)
        clients = [asyncio.create_task(unary_load(index)) for index in range(16 if scale.full else 8)]
        await asyncio.sleep(1.0)
        server.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.process.wait, 30)
        stop.set()
        await asyncio.gather(*clients)
    finally:
        if server.process.poll() is None:
            server.process.kill()
    server._reader.join(10)
    assert code == 0, server.log
    found = re.search(r"calls finished: (\{.*\})", server.log)
    assert found is not None, server.log
    finished = json.loads(found.group(1))
    figures = {"client_outcomes": dict(outcomes), "server_finished": finished}
    scale.record("faults: SIGTERM under load", figures)
    assert set(outcomes) <= {"OK", "UNAVAILABLE"}, outcomes
    assert outcomes["OK"] > 20
    # Every call the server accepted, it finished OK, and every one of those replies arrived.
    assert finished["Embed"] == {"OK": outcomes["OK"]}, (finished, outcomes)


async def test_sigkill_and_restart_lose_no_window(
    scale: Scale, vector_cache: Path, reference_encoding: tiktoken.Encoding
) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    expected = windows(reference_encoding.encode(TEXT), STREAM["max_length"], STREAM["stride"])
    server = start(port, vector_cache, *SERVER_FLAGS)
    consumers = 8 if scale.full else 3
    seen: list[Counter[tuple[int, ...]]] = [Counter() for _ in range(consumers)]

    async def consume(index: int) -> None:
        async with AsyncClient(target, connections=1) as client:
            stream = client.stream_batches(text=TEXT, seed=index, reconnect_attempts=10, **STREAM)
            async for batch in stream:
                seen[index].update(tuple(row) for row in batch.inputs.tolist())
                await asyncio.sleep(0.005)  # a training step: the stream is still running at the kill

    try:
        await wait_serving(target)
        tasks = [asyncio.create_task(consume(index)) for index in range(consumers)]
        await asyncio.sleep(1.0)
        assert not any(task.done() for task in tasks), "the streams outlive the kill"
        server.process.kill()
        server.process.wait(10)
        server = start(port, vector_cache, *SERVER_FLAGS)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        async with AsyncClient(target) as client:
            assert await client.tokenize("hello world") == [31373, 995]
    finally:
        assert server.terminate() == 0, server.log
    lost = sum(sum((expected - got).values()) for got in seen)
    duplicated = sum(sum((got - expected).values()) for got in seen)
    scale.record(
        "faults: SIGKILL and restart",
        {
            "streams": consumers,
            "windows": sum(expected.values()) * consumers,
            "lost": lost,
            "duplicated": duplicated,
        },
    )
    assert lost == duplicated == 0
