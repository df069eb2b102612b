"""embedserve's serving benchmarks, in one run: figures and ratios against their limits.

    .venv/bin/python bench/serving.py [--smoke] [--json OUT] [--results bench/RESULTS.md] [--chart OUT.png]

a. Embed of [8, 256] windows, dim 256, float32, from this process to a server in another process:
   tokens/s and GB/s at 1 and 4 calls in flight, against (i) the same lookup + serialization in
   this process and (ii) the ceiling: a trivial gRPC server (another process) returning
   pre-built bytes of the same size, called through the same client (and, for reference, by
   a client that decodes nothing). Target: >= 60 % of (ii), as the median of three
   alternating rounds.
b. Embed under C concurrent clients each sending 1 x 64-token windows (C = 64, and a sweep
   for the chart): throughput and p50 / p99 latency, batching on (--max-batch-tokens 65536)
   and off (0). Target on CPU: batching costs <= 5 % throughput and lowers p99.
c. StreamBatches against the notebook's GPTDatasetV1 + DataLoader on the-verdict x 100:
   (max_length 256, stride 128, batch 8) and (1024, 1024, 64); the corpus from --data-dir, and
   inline text. Targets: >= 10x from --data-dir, >= 2x inline, >= 20 M tokens/s for the large
   batches.
d. Tokenize of a >= 1 MB text against tiktoken in this process. Target >= 70 %.
f. Cold start: process start to health SERVING (and to WordVectors SERVING).

WordVectors (e) has its own benchmark, bench/word_vectors.py. Nothing here asserts a time;
the run prints a table, writes JSON, appends to a results file, and draws a chart when
matplotlib is installed.
"""

from __future__ import annotations

# torch is imported after tune_openmp:
# ruff: noqa: E402
import argparse
import asyncio
import datetime
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embedserve.server.cli import tune_openmp

tune_openmp(os.environ)  # before torch loads, as `embedserve serve` does

import grpc
import numpy as np
import tiktoken
import torch
from embedserve.client import AsyncClient
from embedserve.server import ServerConfig
from embedserve.server._codec import TensorReply, tensor_pb_from_torch
from embedserve.server.app import load_components, tune_allocator
from embedserve.server.core import load_gpt2_tokenizer
from embedserve.server.core.embedding import EmbedJob
from embedserve.v1 import embedding_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
VERDICT = ROOT.parent / "shared" / "data" / "the-verdict.txt"
EMBEDDING_SERVICE = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
DEVICE = ["cpu"]  # --device: where the servers put the model
WINDOW = (8, 256)
DIM = 256


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Row:
    """One line of the results table."""

    section: str
    what: str
    value: float
    unit: str
    baseline: float | None = None
    baseline_what: str = ""
    target: str = ""
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        return self.value / self.baseline if self.baseline else None


# Processes


class ServerProcess:
    """`python -m embedserve.server serve` on a free port, its log kept."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None) -> None:
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "embedserve.server", "serve", "--port", "0", *flags],
            env={**os.environ, **(env or {})},
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        self.port = 0
        for line in self.process.stderr:
            found = re.search(r"listening on .*:(\d+)$", line.strip())
            if found:
                self.port = int(found.group(1))
                break
        if not self.port:
            raise RuntimeError(f"server did not start: {self.process.stderr.read()}")
        self.target = f"127.0.0.1:{self.port}"
        # Drain the log so the server never blocks on a full pipe.
        self._drain = subprocess.Popen(["cat"], stdin=self.process.stderr, stdout=subprocess.DEVNULL)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self._drain.wait(10)


def ceiling_server_main(reply_bytes: int, port: int = 0) -> None:
    """A trivial server: the same pre-built reply of `reply_bytes` bytes to `ceiling.Ceiling/Get`
    and to `EmbeddingService/Embed` (so the SDK's client can call it). Several such processes can
    share one `port` (gRPC sets SO_REUSEPORT), as `embedserve serve --workers` does."""
    payload = embedding_pb2.EmbedResponse(
        embeddings=tensor_pb_from_torch(torch.zeros(reply_bytes // 4, dtype=torch.float32))
    ).SerializeToString()

    async def run() -> None:
        def handler(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
            return payload

        methods = {  # bytes in, bytes out
            "ceiling.Ceiling": {"Get": grpc.unary_unary_rpc_method_handler(handler)},
            EMBEDDING_SERVICE: {"Embed": grpc.unary_unary_rpc_method_handler(handler)},
        }
        server = grpc.aio.server(
            options=[("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
        )
        server.add_generic_rpc_handlers(
            tuple(grpc.method_handlers_generic_handler(name, handlers) for name, handlers in methods.items())
        )
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print(f"listening on 127.0.0.1:{bound}", file=sys.stderr, flush=True)
        await server.wait_for_termination()

    asyncio.run(run())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class CeilingProcess(ServerProcess):
    def __init__(self, reply_bytes: int, port: int = 0) -> None:
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--ceiling-server", str(reply_bytes), "--ceiling-port", str(port)],
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        line = self.process.stderr.readline()
        found = re.search(r":(\d+)$", line.strip())
        if not found:
            raise RuntimeError(f"ceiling server did not start: {line}{self.process.stderr.read()}")
        self.port = int(found.group(1))
        self.target = f"127.0.0.1:{self.port}"
        self._drain = subprocess.Popen(["cat"], stdin=self.process.stderr, stdout=subprocess.DEVNULL)


# Measurements


def gpt2_encoding() -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding, built offline as the server builds it."""
    return load_gpt2_tokenizer(None, os.environ).encoding


class RoundRobin:
    """Calls one of several unary methods (one per connection) in turn."""

    def __init__(self, methods: list[Any]) -> None:
        self._methods = methods
        self._turn = 0

    async def __call__(self) -> Any:
        self._turn = (self._turn + 1) % len(self._methods)
        return await self._methods[self._turn](b"")


async def rate(
    call: Callable[[], Awaitable[Any]], in_flight: int, seconds: float
) -> tuple[float, list[float]]:
    """Calls per second with `in_flight` concurrent callers for about `seconds`, and each call's latency."""
    for _ in range(in_flight):
        await call()  # warm-up: connections, caches
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(in_flight)))
    return len(latencies) / (time.perf_counter() - started), latencies


def median_ratio(values: list[float], baselines: list[float]) -> float:
    """The median over rounds of value / baseline (each round measured both back to back)."""
    return statistics.median(v / b for v, b in zip(values, baselines, strict=True))


class CeilingProcesses:
    """`count` ceiling servers on one port, as `--workers` puts server processes on one."""

    def __init__(self, reply_bytes: int, count: int) -> None:
        port = free_port() if count > 1 else 0
        self.processes = [CeilingProcess(reply_bytes, port) for _ in range(count)]
        self.target = self.processes[0].target

    def stop(self) -> None:
        for process in self.processes:
            process.stop()


async def bench_embed_transport(seconds: float, rounds: int, workers: int = 1) -> list[Row]:
    """a: Embed of [8, 256] windows against in-process lookup + serialization and the ceiling.

    The ceiling is measured twice: with the SDK's own client (the same decoding as for Embed,
    so the ratio is what the server costs) and with a client that takes the raw reply bytes
    (what the transport alone moves). Server and ceilings alternate over `rounds` rounds; each
    ratio is the median of the rounds'. With `workers` > 1 the server runs `--workers` processes
    and the ceiling as many processes, each on one shared port; the kernel spreads the client's
    connections among them.
    """
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, size=WINDOW).astype(np.int32)
    tokens = ids.size
    reply_bytes = tokens * DIM * 4

    config = ServerConfig(device=DEVICE[0], word_vectors="none", log_level="WARNING")
    components = load_components(config)
    model = components.model
    tune_allocator()  # as the server does

    def lookup_and_encode() -> bytes:  # what the server does for one Embed
        reply = TensorReply(1, (*ids.shape, DIM), torch.float32)
        model.embed_many([EmbedJob(ids, out=reply.tensor)])
        return reply.message()

    for _ in range(20):  # warm-up
        lookup_and_encode()
    started = time.perf_counter()
    count = 0
    while time.perf_counter() - started < seconds:
        lookup_and_encode()
        count += 1
    in_process = count / (time.perf_counter() - started)
    components.close()

    rows = [
        Row(
            "a",
            "in-process lookup + serialization",
            in_process * tokens,
            "tokens/s",
            extra={"gb_s": in_process * reply_bytes / 1e9},
        )
    ]
    if workers > 1:
        spread = ("--workers", str(workers), "--port", str(free_port()))
        server = ServerProcess("--device", DEVICE[0], "--word-vectors", "none", *spread)
        await asyncio.sleep(10)  # the first worker says it listens; give the others time to load
    else:
        server = ServerProcess("--device", DEVICE[0], "--word-vectors", "none")
    ceiling = CeilingProcesses(reply_bytes, workers)
    processes = f", {workers} server processes" if workers > 1 else ""
    per_round = seconds / rounds
    try:
        for in_flight in (1, 4):
            options = [("grpc.max_receive_message_length", 1 << 30), ("grpc.use_local_subchannel_pool", 1)]
            channels = [grpc.aio.insecure_channel(ceiling.target, options=options) for _ in range(in_flight)]
            raw_call = RoundRobin([c.unary_unary("/ceiling.Ceiling/Get", None, None) for c in channels])
            measured: dict[str, list[float]] = {"embed": [], "ceiling": [], "raw": []}
            latencies: list[float] = []
            async with (
                AsyncClient(server.target, connections=in_flight) as client,
                AsyncClient(ceiling.target, connections=in_flight) as ceiling_client,
            ):
                for _ in range(rounds):
                    measured["raw"].append((await rate(raw_call, in_flight, per_round))[0])
                    measured["ceiling"].append(
                        (await rate(lambda: ceiling_client.embed(ids), in_flight, per_round))[0]
                    )
                    embed_rate, embed_latencies = await rate(lambda: client.embed(ids), in_flight, per_round)
                    measured["embed"].append(embed_rate)
                    latencies += embed_latencies
            for channel in channels:
                await channel.close(grace=None)
            embed_rate, ceiling_rate, raw_rate = (
                statistics.median(measured[k]) for k in ("embed", "ceiling", "raw")
            )
            share = statistics.median(
                e / c for e, c in zip(measured["embed"], measured["ceiling"], strict=True)
            )
            raw_share = statistics.median(
                e / r for e, r in zip(measured["embed"], measured["raw"], strict=True)
            )
            rows.append(
                Row(
                    "a",
                    f"Embed [8,256] x {DIM} f32, {in_flight} in flight{processes}",
                    embed_rate * tokens,
                    "tokens/s",
                    baseline=embed_rate * tokens / share,
                    baseline_what="trivial gRPC server, same bytes, same client",
                    target=">= 60 % of the ceiling",
                    met=share >= 0.6,
                    extra={
                        "gb_s": embed_rate * reply_bytes / 1e9,
                        "ceiling_gb_s": ceiling_rate * reply_bytes / 1e9,
                        "raw_ceiling_gb_s": raw_rate * reply_bytes / 1e9,
                        "share_of_raw_ceiling": raw_share,
                        "vs_in_process": embed_rate / in_process,
                        "p50_ms": 1000 * statistics.median(latencies),
                        "rounds": measured,
                    },
                )
            )
            rows.append(
                Row(
                    "a",
                    f"Embed [8,256] x {DIM} f32, {in_flight} in flight{processes}, against raw bytes",
                    embed_rate * tokens,
                    "tokens/s",
                    baseline=embed_rate * tokens / raw_share,
                    baseline_what="trivial gRPC server, same bytes, client that does not decode",
                )
            )
        async with (
            AsyncClient(server.target, connections=1) as client,
            AsyncClient(ceiling.target, connections=1) as ceiling_client,
            client.shared_memory(reply_bytes) as region,
        ):
            shm_rates, ceiling_rates = [], []
            latencies = []
            for _ in range(rounds):
                ceiling_rates.append((await rate(lambda: ceiling_client.embed(ids), 1, per_round))[0])
                shm_rate, shm_latencies = await rate(lambda: client.embed(ids, output=region), 1, per_round)
                shm_rates.append(shm_rate)
                latencies += shm_latencies
        shm_share = median_ratio(shm_rates, ceiling_rates)
        shm_rate = statistics.median(shm_rates)
        rows.append(
            Row(
                "a",
                f"Embed [8,256] x {DIM} f32 into shared memory, 1 in flight",
                shm_rate * tokens,
                "tokens/s",
                baseline=shm_rate * tokens / shm_share,
                baseline_what="trivial gRPC server, same bytes, same client, 1 in flight",
                target="above the ceiling",
                met=shm_share > 1,
                extra={"gb_s": shm_rate * reply_bytes / 1e9, "p50_ms": 1000 * statistics.median(latencies)},
            )
        )
    finally:
        server.stop()
        ceiling.stop()
    return rows


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def bench_concurrency(seconds: float, levels: list[int]) -> tuple[list[Row], dict[str, Any]]:
    """b: C clients each sending 1 x 64-token windows, batching on and off."""
    rng = np.random.default_rng(1)
    window = rng.integers(0, 50257, size=(1, 64)).astype(np.int32)
    curve: dict[str, Any] = {"levels": levels, "on": [], "off": []}
    rows: list[Row] = []
    results: dict[tuple[str, int], tuple[float, float, float]] = {}
    for mode, flags in (("on", ["--max-batch-tokens", "65536"]), ("off", ["--max-batch-tokens", "0"])):
        server = ServerProcess("--device", DEVICE[0], "--word-vectors", "none", *flags)
        try:
            for clients in levels:
                async with AsyncClient(server.target, connections=1) as client:
                    calls_per_s, latencies = await rate(lambda: client.embed(window), clients, seconds)
                results[(mode, clients)] = (
                    calls_per_s * window.size,
                    1000 * percentile(latencies, 50),
                    1000 * percentile(latencies, 99),
                )
                curve[mode].append(
                    {
                        "clients": clients,
                        "tokens_s": results[(mode, clients)][0],
                        "p50_ms": results[(mode, clients)][1],
                        "p99_ms": results[(mode, clients)][2],
                    }
                )
        finally:
            server.stop()
    top = max(levels)
    on, off = results[("on", top)], results[("off", top)]
    on_gpu = torch.cuda.is_available()
    rows.append(
        Row(
            "b",
            f"Embed 1x64, {top} clients, batching on",
            on[0],
            "tokens/s",
            baseline=off[0],
            baseline_what="batching off",
            target=">= 2x throughput" if on_gpu else "<= 5 % throughput cost, lower p99",
            met=(on[0] >= 2 * off[0]) if on_gpu else (on[0] >= 0.95 * off[0] and on[2] <= off[2]),
            extra={"p50_ms": on[1], "p99_ms": on[2], "off_p50_ms": off[1], "off_p99_ms": off[2]},
        )
    )
    return rows, curve


def notebook_tokens_per_s(text: str, max_length: int, stride: int, batch_size: int) -> float:
    """The notebook's pipeline end to end: tokenize, build one tensor per window, read a DataLoader."""
    sys.path.insert(0, str(ROOT))
    from tests.notebook_reference import create_dataloader_v1

    started = time.perf_counter()
    loader = create_dataloader_v1(
        text,
        gpt2_encoding(),
        batch_size=batch_size,
        max_length=max_length,
        stride=stride,
        shuffle=False,
    )
    tokens = 0
    for inputs, _ in loader:
        tokens += inputs.numel()
    return tokens / (time.perf_counter() - started)


async def stream_tokens_per_s(client: AsyncClient, **source: Any) -> float:
    started = time.perf_counter()
    tokens = 0
    async for batch in client.stream_batches(shuffle=False, **source):
        tokens += batch.inputs.size
    return tokens / (time.perf_counter() - started)


async def bench_stream_batches(copies: int) -> list[Row]:
    """c: StreamBatches against the notebook's GPTDatasetV1 + DataLoader."""
    if not VERDICT.is_file():
        log(f"c: skipped, {VERDICT} is absent")
        return []
    text = VERDICT.read_text() * copies
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "corpus.txt").write_text(text)
        server = ServerProcess("--device", DEVICE[0], "--word-vectors", "none", "--data-dir", folder)
        try:
            async with AsyncClient(server.target, timeout=600) as client:
                for max_length, stride, batch_size in ((256, 128, 8), (1024, 1024, 64)):
                    settings = {"max_length": max_length, "stride": stride, "batch_size": batch_size}
                    notebook = notebook_tokens_per_s(text, max_length, stride, batch_size)
                    await stream_tokens_per_s(
                        client, corpus="corpus.txt", **settings
                    )  # the first read tokenizes
                    served = await stream_tokens_per_s(client, corpus="corpus.txt", **settings)
                    inline = await stream_tokens_per_s(client, text=text, **settings)
                    label = f"{max_length}/{stride}/{batch_size}"
                    rows.append(
                        Row(
                            "c",
                            f"StreamBatches {label}, --data-dir corpus",
                            served,
                            "tokens/s",
                            notebook,
                            "notebook pipeline",
                            ">= 10x",
                            served >= 10 * notebook,
                        )
                    )
                    rows.append(
                        Row(
                            "c",
                            f"StreamBatches {label}, inline text",
                            inline,
                            "tokens/s",
                            notebook,
                            "notebook pipeline",
                            ">= 2x",
                            inline >= 2 * notebook,
                        )
                    )
                    if batch_size == 64:
                        rows.append(
                            Row(
                                "c",
                                f"StreamBatches {label}, one consumer",
                                served,
                                "tokens/s",
                                target=">= 20 M tokens/s",
                                met=served >= 20e6,
                            )
                        )
        finally:
            server.stop()
    return rows


async def bench_tokenize(megabytes: float, rounds: int) -> list[Row]:
    """d: Tokenize of a large text against tiktoken in this process, alternating over `rounds`."""
    base = VERDICT.read_text() if VERDICT.is_file() else "The quick brown fox jumps over the lazy dog. " * 100
    text = base * max(1, int(megabytes * 1e6 / len(base.encode())))
    encoding = gpt2_encoding()
    server = ServerProcess("--device", DEVICE[0], "--word-vectors", "none")
    local_rates, remote_rates = [], []
    try:
        async with AsyncClient(server.target, timeout=600) as client:
            await client.tokenize("warm up")
            for _ in range(rounds):
                started = time.perf_counter()
                local = encoding.encode(text)
                local_rates.append(len(local) / (time.perf_counter() - started))
                started = time.perf_counter()
                remote = await client.tokenize(text)
                remote_rates.append(len(remote) / (time.perf_counter() - started))
                assert remote == local, "the server's tokens differ from tiktoken's"
    finally:
        server.stop()
    share = median_ratio(remote_rates, local_rates)
    remote_rate = statistics.median(remote_rates)
    return [
        Row(
            "d",
            f"Tokenize {len(text.encode()) / 1e6:.1f} MB",
            remote_rate,
            "tokens/s",
            remote_rate / share,
            "tiktoken in process",
            ">= 70 %",
            share >= 0.7,
            extra={"rounds": {"server": remote_rates, "tiktoken": local_rates}},
        )
    ]


async def bench_prepared(megabytes: float, seconds: float) -> list[Row]:
    """g: `prepare` against single-threaded tiktoken, and a prepared corpus to 1 and to 4 consumers."""
    from embedserve.server.core.prepared import prepare_corpus

    base = VERDICT.read_text() if VERDICT.is_file() else " ".join(f"word{i % 997}" for i in range(20000))
    text = base * max(1, int(megabytes * 1e6 / len(base.encode())))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "corpus.txt"
        source.write_text(text)
        tokenizer = load_gpt2_tokenizer(None, os.environ)
        started = time.perf_counter()
        tokenizer.encoding.encode(text, allowed_special={"<|endoftext|>"})
        single = len(text.encode()) / (time.perf_counter() - started)
        started = time.perf_counter()
        prepare_corpus([source], "corpus", Path(folder) / "data", tokenizer)
        prepared_rate = len(text.encode()) / (time.perf_counter() - started)
        rows.append(
            Row("g", f"prepare {len(text.encode()) / 1e6:.0f} MB of text ({os.cpu_count()} cores)",
                prepared_rate / 1e6, "MB/s", single / 1e6, "tiktoken, one thread")
        )  # fmt: skip
        server = ServerProcess(
            "--device", DEVICE[0], "--word-vectors", "none", "--data-dir", str(Path(folder) / "data")
        )
        try:
            for consumers in (1, 4):

                async def consume(rank: int, deadline: float, consumers: int = consumers) -> int:
                    tokens = 0
                    async with AsyncClient(server.target, timeout=600) as client:
                        async for batch in client.stream_batches(
                            corpus="corpus", batch_size=64, max_length=1024, stride=1024, seed=rank,
                            epochs=1000, rank=rank, world_size=consumers,
                        ):  # fmt: skip
                            tokens += batch.inputs.size
                            if time.perf_counter() > deadline:
                                break
                    return tokens

                started = time.perf_counter()
                totals = await asyncio.gather(*(consume(r, started + seconds) for r in range(consumers)))
                rate_total = sum(totals) / (time.perf_counter() - started)
                rows.append(
                    Row(
                        "g",
                        f"prepared corpus 1024/1024/64 to {consumers} consumer(s)",
                        rate_total,
                        "tokens/s",
                    )
                )
        finally:
            server.stop()
    return rows


def bench_word_vectors(smoke: bool, word_vectors: str) -> list[Row]:
    """e: bench/word_vectors.py in its own process; its figures become rows here."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "word_vectors.json"
        command = [
            sys.executable,
            str(ROOT / "bench" / "word_vectors.py"),
            "--json",
            str(out),
            "--device",
            DEVICE[0],
        ]
        if smoke:
            command += ["--smoke", "--word-vectors", "none"]
        else:
            command += ["--word-vectors", word_vectors]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        results = json.loads(out.read_text())["results"]
    rows = []
    for r in results:
        label = f"MostSimilar {r['label']} {r['vocab_size'] // 1000}k x {r['dim']}"
        speedup_target, gemm_target = r["target_speedup"], r["target_gemm_fraction"]
        rows.append(
            Row(
                "e",
                label,
                1000 / r["server_ms"],
                "queries/s",
                baseline=1000 / r["gensim_ms"],
                baseline_what="gensim most_similar loop",
                target=f">= {speedup_target:.0f}x",
                met=r["speedup"] >= speedup_target,
            )
        )
        rows.append(
            Row(
                "e",
                f"{label}, share of the GEMM limit",
                100 * r["gemm_fraction"],
                "%",
                target=f">= {100 * gemm_target:.0f} %",
                met=r["gemm_fraction"] >= gemm_target,
            )
        )
    return rows


async def bench_cold_start(word_vectors: str) -> list[Row]:
    """f: process start to health SERVING, overall and for WordVectors."""
    server = ServerProcess("--device", DEVICE[0], "--word-vectors", word_vectors)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            times: dict[str, float] = {}
            for service in ("", "embedserve.v1.WordVectorsService") if word_vectors != "none" else ("",):
                while True:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
                    if reply.status == serving:
                        times[service] = time.perf_counter() - server.started
                        break
                    await asyncio.sleep(0.02)
    finally:
        server.stop()
    rows = [Row("f", "cold start to SERVING", times[""], "s")]
    if "embedserve.v1.WordVectorsService" in times:
        rows.append(
            Row(
                "f",
                f"cold start to WordVectors SERVING ({word_vectors})",
                times["embedserve.v1.WordVectorsService"],
                "s",
            )
        )
    return rows


# Output


def fmt(value: float, unit: str) -> str:
    if unit == "tokens/s":
        return f"{value / 1e6:.2f} M tokens/s"
    if unit == "MB/s":
        return f"{value:.1f} MB/s"
    if unit == "queries/s":
        return f"{value:,.0f} queries/s"
    return f"{value:.2f} {unit}"


def table(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        out.append(
            [
                r.section,
                r.what,
                fmt(r.value, r.unit),
                "" if r.baseline is None else f"{fmt(r.baseline, r.unit)} ({r.baseline_what})",
                "" if r.ratio is None else f"{r.ratio:.2f}x",
                r.target,
                "" if r.met is None else ("ok" if r.met else "MISS"),
            ]
        )
    return out


HEADER = ["", "measure", "value", "baseline", "ratio", "target", ""]


def text_table(rows: list[Row]) -> str:
    cells = [HEADER, *table(rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(HEADER))]
    return "\n".join("  ".join(c[i].ljust(widths[i]) for i in range(len(HEADER))) for c in cells)


def markdown_table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "|".join("---" for _ in HEADER) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in table(rows)]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "grpcio": grpc.__version__,
        "python": platform.python_version(),
    }


def draw_chart(curve: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib  # type: ignore[import-not-found,unused-ignore]

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        log("chart: matplotlib is not installed (pip install embedserve[bench])")
        return False
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("on", "o-"), ("off", "s--")):
        points = curve[mode]
        left.plot(
            [p["clients"] for p in points],
            [p["tokens_s"] / 1e6 for p in points],
            style,
            label=f"batching {mode}",
        )
        right.plot(
            [p["clients"] for p in points], [p["p99_ms"] for p in points], style, label=f"batching {mode}"
        )
    left.set(xscale="log", xlabel="concurrent clients", ylabel="M tokens/s", title="Embed 1x64 throughput")
    right.set(
        xscale="log", xlabel="concurrent clients", ylabel="p99 latency (ms)", title="Embed 1x64 p99 latency"
    )
    left.legend()
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return True


async def run(args: argparse.Namespace) -> list[Row]:
    seconds = args.seconds or (0.5 if args.smoke else 3.0)
    rows: list[Row] = []
    args.curve = {}
    if "a" in args.sections:
        log("a: Embed [8,256] against in-process and the gRPC ceiling")
        rows += await bench_embed_transport(seconds, 1 if args.smoke else 3, args.embed_workers)
    if "b" in args.sections:
        log("b: Embed under concurrent clients, batching on and off")
        levels = [1, 8, 64] if args.smoke else [1, 4, 16, 64]
        concurrency_rows, args.curve = await bench_concurrency(seconds, levels)
        rows += concurrency_rows
    if "c" in args.sections:
        log("c: StreamBatches against the notebook's DataLoader")
        rows += await bench_stream_batches(20 if args.smoke else 100)
    if "d" in args.sections:
        log("d: Tokenize against tiktoken")
        rows += await bench_tokenize(0.2 if args.smoke else 1.2, 1 if args.smoke else 3)
    if "g" in args.sections:
        log("g: prepared corpora")
        rows += await bench_prepared(2 if args.smoke else 20, seconds)
    if "e" in args.sections:
        log("e: WordVectors against gensim (bench/word_vectors.py)")
        rows += bench_word_vectors(args.smoke, args.word_vectors)
    if "f" in args.sections:
        log("f: cold start")
        rows += await bench_cold_start("none" if args.smoke else args.word_vectors)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="seconds-long run: fewer, shorter measurements")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write every figure as JSON here")
    parser.add_argument("--results", type=Path, metavar="MD", help="append a dated markdown section here")
    parser.add_argument("--chart", type=Path, metavar="PNG", help="throughput and p99 against concurrency")
    parser.add_argument("--word-vectors", default="glove-6b-50d", help="model for the cold-start figure")
    parser.add_argument("--device", default="cpu", help="the servers' --device (cpu, cuda)")
    parser.add_argument("--sections", default="abcdefg", help="which measurements to run (default abcdefg)")
    parser.add_argument("--seconds", type=float, help="length of each timed measurement")
    parser.add_argument(
        "--embed-workers", type=int, default=1, help="a: server processes (--workers) and ceiling processes"
    )
    parser.add_argument("--ceiling-server", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ceiling-port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ceiling_server:
        ceiling_server_main(args.ceiling_server, args.ceiling_port)
        return 0
    DEVICE[0] = args.device
    tune_allocator()  # in this (client) process too: see embedserve.server.app.tune_allocator
    info = machine()
    log(f"{info['cpu']}, {info['cores']} cores, GPU {info['gpu']}, torch {info['torch']}")
    started = time.perf_counter()
    rows = asyncio.run(run(args))
    print()
    print(text_table(rows))
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "smoke": args.smoke,
            "machine": info,
            "rows": [asdict(r) | {"ratio": r.ratio} for r in rows],
            "concurrency_curve": args.curve,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.chart and args.curve and draw_chart(args.curve, args.chart):
        log(f"chart: {args.chart}")
    if args.results:
        stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        section = [
            f"## {stamp}: bench/serving.py{' --smoke' if args.smoke else ''}",
            "",
            f"- machine: {info['cpu']}, {info['cores']} cores, GPU {info['gpu'] or 'none'}, "
            f"torch {info['torch']}, grpcio {info['grpcio']}, Python {info['python']}",
            "",
            markdown_table(rows),
            "",
        ]
        existing = args.results.read_text() if args.results.exists() else "# Benchmark results\n\n"
        args.results.write_text(existing.rstrip("\n") + "\n\n" + "\n".join(section) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
