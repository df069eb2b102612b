"""StreamBatches flow control and memory: a slow consumer holds back only its own stream, a
cancelled stream stops, and a large prepared corpus streams without being read into memory."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
from embedserve.client import AsyncClient
from embedserve.server import ServerConfig
from embedserve.server.core.cursor import StreamSettings
from embedserve.server.core.windows import PlannedBatch

from .conftest import start_cli_server, start_server

TEXT = " ".join(f"w{i % 211} {i}" for i in range(60000))


async def test_a_slow_consumer_holds_back_only_its_own_stream() -> None:
    produced: dict[int, int] = {}

    def counting(settings: StreamSettings, batch: PlannedBatch) -> None:
        produced[settings.max_length] = produced.get(settings.max_length, 0) + 1

    running = start_server(ServerConfig(port=0, device="cpu", word_vectors="none"), on_stream_batch=counting)
    try:
        async with AsyncClient(running.target) as client:
            # 2 MB per batch (embeddings included): the slow stream uses max_length 256.
            slow = client.stream_batches(
                text=TEXT, batch_size=8, max_length=256, stride=256, include_embeddings=True
            )
            await anext(slow)
            fast = [
                b async for b in client.stream_batches(text=TEXT, batch_size=8, max_length=255, stride=64)
            ]
            assert len(fast) == produced[255]  # the other stream ran to its end meanwhile
            await asyncio.sleep(0.5)
            ahead = produced[256] - 1
            assert ahead <= 32, f"the server produced {ahead} batches ahead of a consumer that stopped"
            await slow.aclose()  # cancelling stops production
            stopped_at = produced[256]
            await asyncio.sleep(0.3)
            assert produced[256] == stopped_at
    finally:
        running.stop()


def _write_prepared(folder: Path, name: str, count: int) -> None:
    rng = np.random.default_rng(0)
    with (folder / f"{name}.tokens").open("wb") as out:
        digest = hashlib.sha256()
        for start in range(0, count, 1 << 22):
            chunk = (
                rng.integers(0, 50257, size=min(1 << 22, count - start), dtype=np.uint16)
                .astype("<u2")
                .tobytes()
            )
            out.write(chunk)
            digest.update(chunk)
    meta = {
        "kind": "embedserve-prepared-corpus",
        "format": 1,
        "tokenizer": "gpt2",
        "vocab_size": 50257,
        "dtype": "uint16",
        "token_count": count,
        "documents": 1,
        "separator": {"policy": "endoftext-between-documents", "token_id": 50256},
        "sources": [],
        "tokens_file": f"{name}.tokens",
        "tokens_sha256": digest.hexdigest(),
    }
    (folder / f"{name}.json").write_text(json.dumps(meta))


def _maps_file(pid: int, name: str) -> bool:
    return name in Path(f"/proc/{pid}/maps").read_text()


def _anonymous_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no RssAnon")


async def test_a_large_prepared_corpus_streams_without_being_loaded(tmp_path: Path) -> None:
    """EMBEDSERVE_BIG_CORPUS_TOKENS sizes it (the benchmark runs 500M tokens = 1 GB); CI uses 64M."""
    count = int(os.environ.get("EMBEDSERVE_BIG_CORPUS_TOKENS", 64 << 20))
    _write_prepared(tmp_path, "big", count)
    server = start_cli_server("--device", "cpu", "--word-vectors", "none", "--data-dir", str(tmp_path))
    try:
        async with AsyncClient(f"127.0.0.1:{server.port}") as client:
            await client.tokenize("warm up")
            before = _anonymous_rss_mb(server.process.pid)
            seen = 0
            started = time.perf_counter()
            async for batch in client.stream_batches(
                corpus="big", batch_size=64, max_length=1024, stride=1024, seed=1
            ):
                if not seen:
                    assert _maps_file(server.process.pid, "big.tokens")  # served from the mapping
                seen += batch.inputs.size
                if seen >= 50_000_000 or time.perf_counter() - started > 20:
                    break
            grown = _anonymous_rss_mb(server.process.pid) - before
        # Windows are slices of the mapped file: the file is never copied into the process's own memory.
        assert grown < 64 + count * 8 / 1024 / 1024 / 1024, f"anonymous memory grew by {grown:.0f} MB"
        assert seen > 1_000_000
        # The stream is over (closed early): its mapping of the corpus is gone with it.
        for _ in range(50):
            if not _maps_file(server.process.pid, "big.tokens"):
                break
            await asyncio.sleep(0.05)
        assert not _maps_file(server.process.pid, "big.tokens")
    finally:
        server.terminate()
