"""Benchmark: the same serving workloads against servers built from two or more source trees.

    .venv/bin/python bench/device_thread.py --tree before=/tmp/old-stage --tree after= \\
        [--rounds 3] [--seconds 3] [--smoke] [--json OUT]

Each `--tree NAME=PYTHONPATH` names a server: `embedserve serve` run with that PYTHONPATH in front
(empty: this checkout), so a tree of links to another commit's packages, laid out as the
installed package (see tests/run.sh), serves that commit's code. The client is always this
checkout's. Every round starts each tree's server in turn (GloVe 6B 50d loaded), runs every
workload against it and stops it, so a slow spell of the machine touches all trees alike; the
figures are medians over rounds, and each ratio the median of the rounds' ratios to the first
tree.

Workloads (what issue 17's one-device-thread decision needs):
- Embed [8, 256] with 1 and 4 calls in flight (tokens/s);
- Embed under 64 clients, each 1 x 64 tokens (tokens/s, p99 latency);
- MostSimilar of 64, 512 and 2,048 word queries a call, topn 10 (queries/s);
- the mix: Embed with 4 in flight and MostSimilar of 512 a call at the same time (each's rate);
- and what issue 31's changes touch: Tokenize of 1 MiB of ordinary text (MB/s), and StreamBatches
  of 64 x 1024 windows with embeddings from a 4 MiB text (tokens/s).

Nothing asserts a time; it prints a table and writes JSON.
"""

from __future__ import annotations

# torch is imported by serving after tune_openmp:
import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grpc
import numpy as np
from embedserve.client import AsyncClient, Query
from grpc_health.v1 import health_pb2, health_pb2_grpc
from serving import ServerProcess, log, rate

WORD_VECTORS_SERVICE = "embedserve.v1.WordVectorsService"


async def _wait_for_word_vectors(target: str, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            reply = await health.Check(health_pb2.HealthCheckRequest(service=WORD_VECTORS_SERVICE))
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{target}: word vectors did not load in {seconds} s")


async def _for_seconds(call: Callable[[], Awaitable[Any]], seconds: float) -> int:
    """Calls one after another until `seconds` pass; how many."""
    deadline, count = time.perf_counter() + seconds, 0
    while time.perf_counter() < deadline:
        await call()
        count += 1
    return count


async def workloads(target: str, seconds: float, words: list[str]) -> dict[str, float]:
    rng = np.random.default_rng(0)
    window = rng.integers(0, 50257, size=(8, 256)).astype(np.int32)
    small = rng.integers(0, 50257, size=(1, 64)).astype(np.int32)
    figures: dict[str, float] = {}
    async with AsyncClient(target, connections=4) as client:
        for in_flight in (1, 4):
            calls, _ = await rate(lambda: client.embed(window), in_flight, seconds)
            figures[f"embed_{in_flight}_tokens_s"] = calls * window.size
        calls, latencies = await rate(lambda: client.embed(small), 64, seconds)
        figures["embed_64_clients_tokens_s"] = calls * small.size
        figures["embed_64_clients_p99_ms"] = float(np.percentile(latencies, 99) * 1e3)
        vectors = client.word_vectors
        for size in (64, 512, 2048):
            queries = [Query(positive=[words[(i * 7919 + size) % len(words)]]) for i in range(size)]
            calls, _ = await rate(lambda q=queries: vectors.most_similar_batch(q), 1, seconds)  # type: ignore[misc]
            figures[f"most_similar_{size}_queries_s"] = calls * size
        mixed = [Query(positive=[words[(i * 104729) % len(words)]]) for i in range(512)]
        await vectors.most_similar_batch(mixed)  # warm

        async def embeds() -> int:
            counts = await asyncio.gather(
                *(_for_seconds(lambda: client.embed(window), seconds) for _ in range(4))
            )
            return sum(counts)

        started = time.perf_counter()
        embed_calls, scan_calls = await asyncio.gather(
            embeds(), _for_seconds(lambda: vectors.most_similar_batch(mixed), seconds)
        )
        elapsed = time.perf_counter() - started
        figures["mix_embed_tokens_s"] = embed_calls * window.size / elapsed
        figures["mix_most_similar_queries_s"] = scan_calls * len(mixed) / elapsed
        text = (" ".join(words) + "\n") * (1 + (1 << 20) // (len(" ".join(words)) + 1))
        text = text[: 1 << 20]
        calls, _ = await rate(lambda: client.tokenize(text), 1, seconds)
        figures["tokenize_1mib_mb_s"] = calls * len(text) / 1e6
        stream_text = text * 4

        async def stream() -> None:
            batches = client.stream_batches(
                text=stream_text, batch_size=64, max_length=1024, stride=1024, include_embeddings=True
            )
            async for _ in batches:
                pass

        started = time.perf_counter()
        streams = await _for_seconds(stream, seconds)
        elapsed = time.perf_counter() - started
        tokens = len(await client.tokenize(stream_text)) // 1024 * 1024
        figures["stream_embeddings_tokens_s"] = streams * tokens / elapsed
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tree", action="append", required=True, metavar="NAME=PYTHONPATH")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each measurement")
    parser.add_argument("--smoke", action="store_true", help="one round of short measurements")
    parser.add_argument("--json", type=Path, metavar="OUT")
    parser.add_argument("--word-vectors", default="glove-6b-50d")
    args = parser.parse_args()
    trees = dict(tree.split("=", 1) for tree in args.tree)
    rounds, seconds = (1, 0.3) if args.smoke else (args.rounds, args.seconds)
    measured: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    words: list[str] = []
    for round_index in range(rounds):
        for name, pythonpath in trees.items():
            env = {"PYTHONPATH": pythonpath} if pythonpath else {}
            server = ServerProcess("--word-vectors", args.word_vectors, env=env)
            try:
                asyncio.run(_wait_for_word_vectors(server.target))
                words = words or asyncio.run(_some_words(server.target))
                log(f"round {round_index + 1}/{rounds}: {name}")
                measured[name].append(asyncio.run(workloads(server.target, seconds, words)))
            finally:
                server.stop()
    first = next(iter(trees))
    report: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "trees": trees, "figures": {}}
    keys = list(measured[first][0])
    width = max(16, *(len(name) + len(first) + 3 for name in trees))
    print(
        f"{'workload':32}"
        + "".join(f"{name:>{width}}" for name in trees)
        + "".join(f"{name + '/' + first:>{width}}" for name in list(trees)[1:])
    )
    for key in keys:
        medians = {name: statistics.median(r[key] for r in runs) for name, runs in measured.items()}
        ratios = {
            name: statistics.median(r[key] / b[key] for r, b in zip(runs, measured[first], strict=True))
            for name, runs in measured.items()
            if name != first
        }
        report["figures"][key] = {"medians": medians, "ratios_to_" + first: ratios}
        print(
            f"{key:32}"
            + "".join(f"{medians[n]:>{width},.1f}" for n in trees)
            + "".join(f"{ratios[n]:>{width}.3f}" for n in list(trees)[1:])
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


async def _some_words(target: str) -> list[str]:
    """Up to 4,096 words of the server's vocabulary, near frequent ones, in a seeded order."""
    common = "the of and to in a is that for it as was with be by on not he i this are or his from"
    common_words = common.split()
    async with AsyncClient(target) as client:
        queries = [Query(positive=[word], topn=200) for word in common_words]
        ranked = await client.word_vectors.most_similar_batch(queries)
    pool = sorted({word for answer in ranked for word, _ in answer} | set(common_words))
    return [str(word) for word in np.random.default_rng(1).permutation(pool)][:4096]


if __name__ == "__main__":
    sys.exit(main())
