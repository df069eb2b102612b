"""Load: many concurrent mixed clients for a bounded time against one server process. Every reply
is checked (tokens against tiktoken, embeddings against the direct computation, every streamed
window exactly once, analogies against the first answer), and the server's memory stays flat."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
from embedserve.client import AsyncClient, EmbedServeError
from embedserve.server.app import WORD_VECTORS_SERVICE as WORD_VECTORS
from embedserve.server.app import Components

from ..conftest import free_port
from ._server import ReferenceEmbeddings, rss_bytes, start, wait_serving, windows
from .conftest import Scale

STREAM_TEXT = " ".join(f"item{i} of the load corpus" for i in range(1500))
STREAM: dict[str, Any] = {
    "batch_size": 8,
    "max_length": 32,
    "stride": 24,
    "shuffle": True,
    "drop_last": False,
}
KINDS = ("tokenize", "embed", "embed_stream", "stream_batches", "word_vectors")


class Tally:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.wrong: list[str] = []
        self.windows_lost = 0
        self.windows_duplicated = 0
        self.streams_checked = 0


async def _client(
    index: int,
    target: str,
    stop_at: float,
    tally: Tally,
    encoding: tiktoken.Encoding,
    reference: ReferenceEmbeddings,
    expected_windows: Counter[tuple[int, ...]],
    queen: list[tuple[str, float]],
) -> None:
    kind = KINDS[index % len(KINDS)]
    chooser = random.Random(index)
    async with AsyncClient(target, connections=1, timeout=60, stream_timeout=120) as client:
        while time.monotonic() < stop_at:
            tally.requests[kind] += 1
            try:
                if kind == "tokenize":
                    text = " ".join(
                        chooser.choice(["embed", "serve", "token", "é", "🙂", "42"]) for _ in range(20)
                    )
                    if await client.tokenize(text) != encoding.encode(text):
                        tally.wrong.append(f"tokenize {text!r}")
                elif kind == "embed":
                    ids = np.array([[chooser.randrange(50257) for _ in range(64)]])
                    got = await client.embed(ids)
                    want = reference.embed(ids)
                    if hashlib.sha256(got.tobytes()).digest() != hashlib.sha256(want.tobytes()).digest():
                        tally.wrong.append(f"embed {ids[0, :4]}...")
                elif kind == "embed_stream":
                    batches = [np.array([[chooser.randrange(50257) for _ in range(32)]]) for _ in range(8)]
                    got_all = [array async for array in client.embed_stream(batches)]
                    for ids, got in zip(batches, got_all, strict=True):
                        if not np.array_equal(got, reference.embed(ids)):
                            tally.wrong.append("embed_stream")
                elif kind == "stream_batches":
                    seen: Counter[tuple[int, ...]] = Counter()
                    async for batch in client.stream_batches(text=STREAM_TEXT, seed=index, **STREAM):
                        seen.update(tuple(row) for row in batch.inputs.tolist())
                        if time.monotonic() > stop_at + 60:
                            break
                    tally.windows_lost += sum((expected_windows - seen).values())
                    tally.windows_duplicated += sum((seen - expected_windows).values())
                    tally.streams_checked += 1
                else:
                    answer = await client.word_vectors.most_similar(
                        positive=["king", "woman"], negative=["man"], topn=5
                    )
                    # Coalesced queries share one GEMM, whose rounding depends on the batch: scores
                    # may differ in the last bit, the ranking may not.
                    same_words = [word for word, _ in answer] == [word for word, _ in queen]
                    close = np.allclose([s for _, s in answer], [s for _, s in queen], rtol=0, atol=1e-6)
                    if not (same_words and close):
                        tally.wrong.append(f"most_similar {answer[:2]}")
            except EmbedServeError as error:
                tally.failures[error.code.name] += 1


async def test_many_mixed_clients_every_reply_checked(
    scale: Scale, default_components: Components, vector_cache: Path, reference_encoding: tiktoken.Encoding
) -> None:
    default_components.word_vectors.start()  # converts GloVe into the session's cache, once
    assert default_components.word_vectors.wait(600)
    port = free_port()
    server = start(port, vector_cache, "--max-queue", "1000000")
    target = f"127.0.0.1:{port}"
    try:
        await wait_serving(target, WORD_VECTORS)
        reference = ReferenceEmbeddings()
        expected = windows(reference_encoding.encode(STREAM_TEXT), STREAM["max_length"], STREAM["stride"])
        async with AsyncClient(target) as client:
            queen = await client.word_vectors.most_similar(
                positive=["king", "woman"], negative=["man"], topn=5
            )
            assert queen[0][0] == "queen"
            # Warm every path once, so the memory baseline includes what serving needs anyway.
            warm, warm_until = Tally(), time.monotonic() + 2
            await asyncio.gather(*(
                _client(index, target, warm_until, warm, reference_encoding, reference, expected, queen)
                for index in range(len(KINDS) * 2)
            ))  # fmt: skip
        rss_before = rss_bytes(server.process.pid)

        tally = Tally()
        started = time.monotonic()
        stop_at = started + scale.load_seconds
        await asyncio.gather(*(
            _client(index, target, stop_at, tally, reference_encoding, reference, expected, queen)
            for index in range(scale.load_clients)
        ))  # fmt: skip
        elapsed = time.monotonic() - started
        await asyncio.sleep(1)
        rss_after = rss_bytes(server.process.pid)
    finally:
        assert server.terminate() == 0, server.log

    figures: dict[str, Any] = {
        "clients": scale.load_clients,
        "seconds": round(elapsed, 1),
        "requests": dict(tally.requests),
        "requests_total": sum(tally.requests.values()),
        "failures_by_status": dict(tally.failures),
        "wrong_replies": len(tally.wrong),
        "streams_checked": tally.streams_checked,
        "windows_lost": tally.windows_lost,
        "windows_duplicated": tally.windows_duplicated,
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
    }
    scale.record("load", figures)
    assert not tally.wrong, tally.wrong[:5]
    assert not tally.failures, figures
    assert tally.windows_lost == tally.windows_duplicated == 0
    assert tally.streams_checked >= 1
    assert all(tally.requests[kind] > 0 for kind in KINDS)
    assert rss_after < 1.10 * rss_before, figures
