"""Benchmark: WordVectors.most_similar through a real server, against gensim and the bare GEMM.

    .venv/bin/python bench/word_vectors.py [--smoke] [--prefilter auto|on|off] [--json OUT]
        [--results bench/RESULTS.md] [--scanners columns-first,rows-first,prefilter,candidates]

For each model (GloVe 6B 50d, 400k x 50, and random normal vectors, 1M x 300;
100k x 300 with --smoke), on the same vectors and the same seeded random
vocabulary words, it measures

1. gensim: KeyedVectors.most_similar(word, topn=10), one call per word, on a subset;
2. server: AsyncClient.word_vectors.most_similar_batch over gRPC on 127.0.0.1, against a
   real in-process server (after a warm-up call), and the core's WordVectors.search alone,
   off the server, on the same queries (to tell the scan from the gRPC path), with the
   scanner the server picked and with the float32 one it picks with the prefilter off (and,
   with --scanners, with each scanner named there);
3. the GEMM limit: a bare float32 torch.mm of [queries x dim] by [dim x vocab], blocked over
   the vocabulary (the fastest of 4096, 8192 and 32768 rows on CPU, the server's blocking on
   a GPU; each as that product and as its transpose, rows first), with no top-k; with the
   prefilter, the same product in bfloat16 as well. Server calls and GEMM passes alternate
   (--rounds of each), and the share of the GEMM limit is the median of the rounds' ratios,
   so a slow spell of a shared machine slows both;
4. verification: on the words gensim ran, the server's top-10 equals gensim's (a
   different word only where gensim scores both within 1e-6) with scores within 1e-5.

It prints a table, writes the figures as JSON (--json), appends a dated markdown
section (--results), and exits 1 when a ranking does not match.
"""

from __future__ import annotations

# torch is imported after tune_openmp:
# ruff: noqa: E402
import argparse
import asyncio
import datetime
import json
import logging
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from embedserve.server.cli import tune_openmp

tune_openmp(os.environ)  # before torch loads, as `embedserve serve` does

import numpy as np
import torch
from embedserve.client import AsyncClient, Query
from embedserve.server import ServerConfig
from embedserve.server.app import Components, EmbedServer, build_server, load_components
from embedserve.server.core.word_vectors import (
    SCANNER_NAMES,
    Bfloat16PrefilterScan,
    CandidateScan,
    PrefilterSetting,
    QueryColumns,
    Scanner,
    ScannerName,
    WordVectors,
    build_scanner,
    choose_scanner,
)
from embedserve.server.core.word_vectors.columns_first import GPU_SCORE_BUFFER_ELEMENTS
from gensim.models import KeyedVectors

TOPN = 10
GEMM_BLOCK_ROWS = (4096, 8192, 32768)  # the GEMM limit is the fastest of these blockings on CPU
DEVICE = torch.device("cpu")  # set from --device
PREFILTER: PrefilterSetting = "auto"  # set from --prefilter
SCORE_TOLERANCE = 1e-5
TIE_TOLERANCE = 1e-6
TARGET_GEMM_FRACTION = 0.70
TARGET_SPEEDUP = {"glove-6b-50d": 5.0, "synthetic": 10.0}
TARGET_SPEEDUP_GPU = 500.0


def gemm_block_rows(queries: int, count: int) -> tuple[int, ...]:
    """Vocabulary rows per product to try: several on CPU, the server's blocking on a GPU."""
    if DEVICE.type == "cpu":
        return GEMM_BLOCK_ROWS
    return (max(32768, min(count, GPU_SCORE_BUFFER_ELEMENTS // max(1, queries))),)


@dataclass(frozen=True)
class Plan:
    """How much of each measurement to run."""

    synthetic_rows: int
    synthetic_dim: int
    gensim_queries: int
    batch: int  # queries per server call
    in_flight: int  # server calls at a time
    calls: int  # timed server calls (after one warm-up call)
    gemm_repeats: int
    rounds: int  # server calls and GEMM passes alternate this many times; the share is their median
    # Also time the server with the client in another process, as a deployment has it: in this
    # process the client's Python work (packing, unpacking) shares the server's interpreter lock.
    client_process: bool = False


FULL = Plan(
    synthetic_rows=1_000_000,
    synthetic_dim=300,
    gensim_queries=50,
    batch=512,
    in_flight=1,
    calls=4,
    gemm_repeats=3,
    rounds=5,
)
SMOKE = Plan(
    synthetic_rows=100_000,
    synthetic_dim=300,
    gensim_queries=10,
    batch=256,
    in_flight=1,
    calls=2,
    gemm_repeats=2,
    rounds=2,
)


@dataclass
class Result:
    model: str
    label: str
    vocab_size: int
    dim: int
    batch: int
    server_queries: int
    gensim_queries: int
    gensim_ms: float = math.nan
    server_ms: float = math.nan
    search_ms: float = math.nan  # WordVectors.search alone, in this process, no gRPC
    search_float32_ms: float = math.nan  # the same with the bfloat16 prefilter off
    prefilter: bool = False
    scanner: str = ""  # the server's scanner (factory.choose_scanner)
    search_by_scanner_ms: dict[str, float] = field(default_factory=dict)  # --scanners: search_ms each
    gemm_ms: float = math.nan
    gemm_bfloat16_ms: float = math.nan  # the bare product in bfloat16: the prefilter's first pass
    gemm_gflops: float = math.nan
    server_gflops: float = math.nan
    speedup: float = math.nan  # gensim ms / server ms
    server_apart_ms: float = math.nan  # server ms/q with the client in another process
    speedup_apart: float = math.nan  # gensim ms / server_apart_ms
    gemm_fraction: float = math.nan  # median over rounds of GEMM-limit ms / server ms
    round_fractions: list[float] = field(default_factory=list)
    target_speedup: float = math.nan
    target_gemm_fraction: float = TARGET_GEMM_FRACTION
    matched: int = 0
    compared: int = 0
    mismatches: list[str] = field(default_factory=list)
    load_s: float = math.nan


class ServerThread:
    """A real grpc.aio server on 127.0.0.1:0 on its own event loop in a thread (as tests/conftest.py)."""

    def __init__(self, config: ServerConfig, components: Components) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-server", daemon=True)
        self._thread.start()

        async def start() -> EmbedServer:
            server = build_server(config, components)
            await server.start()
            return server

        self.server = asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=60)
        self.port = self.server.port
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=60)
        self._loop.close()


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Measurements


def time_gensim(kv: KeyedVectors, words: list[str]) -> tuple[float, list[list[tuple[str, float]]]]:
    """ms per query of kv.most_similar(word, topn=10), one word at a time, and its answers."""
    kv.fill_norms()
    kv.most_similar(positive=[words[0]], topn=TOPN)  # warm-up: page faults, BLAS start
    answers = []
    started = time.perf_counter()
    for word in words:
        answers.append(kv.most_similar(positive=[word], topn=TOPN))
    return (time.perf_counter() - started) * 1000 / len(words), answers


def same_rankings(a: list[list[tuple[str, float]]], b: list[list[tuple[str, float]]]) -> bool:
    """Position by position the same scores within float32 rounding, and the same words except
    where two scored within TIE_TOLERANCE swapped (how concurrent calls coalesce changes the
    products' shapes and orientation, and so their rounding)."""

    def agree(x: list[tuple[str, float]], y: list[tuple[str, float]]) -> bool:
        if len(x) != len(y) or any(abs(p - q) > 1e-6 for (_, p), (_, q) in zip(x, y, strict=True)):
            return False
        y_scores = dict(y)
        return all(
            word == other
            or abs(y_scores.get(word, -math.inf) - score) <= TIE_TOLERANCE
            or index == len(x) - 1
            for index, ((word, score), (other, _)) in enumerate(zip(x, y, strict=True))
        )

    return len(a) == len(b) and all(agree(x, y) for x, y in zip(a, b, strict=True))


def time_server_blocking(
    target: str, warmup: list[str], batches: list[list[str]], in_flight: int
) -> tuple[float, list[list[tuple[str, float]]]]:
    """time_server in a process of its own (a spawned child runs this)."""
    return asyncio.run(time_server(target, warmup, batches, in_flight))


async def time_server(
    target: str, warmup: list[str], batches: list[list[str]], in_flight: int
) -> tuple[float, list[list[tuple[str, float]]]]:
    """ms per query of most_similar_batch over gRPC with `in_flight` calls at a time (after a
    warm-up call, if `warmup` has words), and the answers in order."""
    async with AsyncClient(target, timeout=600) as client:
        if warmup:
            await client.word_vectors.most_similar_batch([Query(positive=[w], topn=TOPN) for w in warmup])
        else:
            await client.info()  # connected before the clock starts
        requests = [[Query(positive=[w], topn=TOPN) for w in words] for words in batches]
        replies: list[list[list[tuple[str, float]]]] = [[] for _ in batches]
        waiting = list(range(len(batches)))

        async def caller() -> None:
            while waiting:
                index = waiting.pop(0)
                replies[index] = await client.word_vectors.most_similar_batch(requests[index])

        started = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
    return elapsed * 1000 / sum(len(b) for b in batches), [answer for reply in replies for answer in reply]


def time_search_with(model: WordVectors, batches: list[list[str]], scanner: Scanner) -> float:
    """time_search with this scanner in the model's place (the model's own again after)."""
    chosen = model.scanner
    model.scanner = scanner
    try:
        return time_search(model, batches)
    finally:
        model.scanner = chosen


def time_scanners(model: WordVectors, batches: list[list[str]], names: list[ScannerName]) -> dict[str, float]:
    """time_search with each named scanner in turn."""
    chosen = model.scanner
    # The bfloat16 scanners share the rows the server's one rounded already, where it has them.
    rounded = chosen.unit_bfloat16 if isinstance(chosen, Bfloat16PrefilterScan | CandidateScan) else None
    return {
        name: time_search_with(model, batches, build_scanner(name, model.search_rows, unit_bfloat16=rounded))
        for name in names
    }


def time_search(model: WordVectors, batches: list[list[str]]) -> float:
    """ms per query of the core's prepare + search alone (no gRPC), same batches."""
    elapsed = 0.0
    for words in batches:
        ones = np.ones(len(words), np.int64)
        queries = QueryColumns(
            words=words,
            positive_counts=ones,
            negative_counts=ones * 0,
            topn=ones * TOPN,
            restrict_vocab=ones * 0,
            cosmul=ones == 0,
        )  # as the server reads a packed request
        started = time.perf_counter()
        model.search(model.prepare(queries))
        elapsed += time.perf_counter() - started
    return elapsed * 1000 / sum(len(b) for b in batches)


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


Blocking = tuple[int, bool]  # (vocabulary rows per product, whether the product is rows first)


def time_gemm(
    vectors: torch.Tensor,
    queries: torch.Tensor,
    repeats: int,
    dtype: torch.dtype = torch.float32,
    blockings: tuple[Blocking, ...] | None = None,
) -> tuple[float, Blocking]:
    """ms per query of a bare [Q x D] @ [D x V] product, blocked over the vocabulary, and the
    blocking: the fastest of `blockings` (default: gemm_block_rows, each as [Q x D] @ [D x rows]
    and as its transpose [rows x D] @ [D x Q], since a BLAS may be faster at one than the other;
    the server's CPU scan takes the second for 16 queries or more) and the best of `repeats`
    (after a warm-up pass each)."""
    vectors, queries = vectors.to(DEVICE, dtype), queries.to(DEVICE, dtype)
    queries_t = queries.T.contiguous()
    count, rows = vectors.shape[0], queries.shape[0]
    best, best_blocking = math.inf, (0, False)
    tried = blockings or tuple(
        (block, rows_first) for block in gemm_block_rows(rows, count) for rows_first in (False, True)
    )
    for block, rows_first in tried:
        buffer = torch.empty(rows * min(block, count), dtype=dtype, device=DEVICE)  # reused
        with torch.inference_mode():
            for repeat in range(repeats + 1):
                started = time.perf_counter()
                for start in range(0, count, block):
                    stop = min(start + block, count)
                    if rows_first:
                        out = buffer[: rows * (stop - start)].view(stop - start, rows)
                        torch.mm(vectors[start:stop], queries_t, out=out)
                    else:
                        out = buffer[: rows * (stop - start)].view(rows, stop - start)
                        torch.mm(queries, vectors[start:stop].T, out=out)
                _sync()
                elapsed = time.perf_counter() - started
                if repeat and elapsed < best:  # the first pass is a warm-up
                    best, best_blocking = elapsed, (block, rows_first)
    return best * 1000 / rows, best_blocking


# Verification


def gensim_score(kv: KeyedVectors, query_word: str, word: str) -> float:
    """gensim's most_similar score of `word` for the query [query_word]."""
    mean = kv.get_mean_vector([query_word], pre_normalize=True, post_normalize=True, ignore_missing=False)
    index = kv.get_index(word)
    return float(np.dot(kv.vectors[index], mean) / kv.norms[index])


def compare(
    kv: KeyedVectors, word: str, expected: list[tuple[str, float]], got: list[tuple[str, float]]
) -> str | None:
    """None when the rankings agree; else why not."""
    if len(expected) != len(got):
        return f"{word!r}: {len(got)} results, gensim {len(expected)}"
    for position, ((want, want_score), (have, have_score)) in enumerate(zip(expected, got, strict=True)):
        if abs(want_score - have_score) > SCORE_TOLERANCE:
            return (
                f"{word!r} #{position}: score {have_score:.8f} ({have!r}), gensim {want_score:.8f} ({want!r})"
            )
        if want != have:
            tied = gensim_score(kv, word, have)
            if abs(tied - want_score) >= TIE_TOLERANCE:
                return (
                    f"{word!r} #{position}: {have!r} (gensim scores it {tied:.8f}) "
                    f"where gensim has {want!r} ({want_score:.8f})"
                )
    return None


# One model


def bench_model(
    label: str,
    key: str,
    spec: str,
    cache_dir: Path,
    plan: Plan,
    rng: np.random.Generator,
    kv: KeyedVectors | None,
    scanners: list[ScannerName] | None = None,
) -> Result:
    """Starts a server on `spec`, builds gensim's model from the server's arrays (unless given), measures."""
    started = time.perf_counter()
    config = ServerConfig(
        port=0,
        device=str(DEVICE),
        word_vectors=spec,
        cache_dir=cache_dir,
        log_level="WARNING",
        word_vector_prefilter=PREFILTER,
    )
    components = load_components(config)
    running = None
    try:
        running = ServerThread(config, components)  # starts loading the vectors in the background
        if not components.word_vectors.wait(600):
            raise RuntimeError(f"{label}: word vectors still loading after 600 s")
        model = components.word_vectors.model
        load_s = time.perf_counter() - started
        log(f"{label}: server ready ({model.vocab_size} x {model.dim}) in {load_s:.1f} s")
        if kv is None:
            kv = KeyedVectors(model.dim)
            kv.add_vectors(model.words, np.asarray(model.vectors, dtype=np.float32))
        if (len(kv), kv.vector_size) != (model.vocab_size, model.dim):
            raise RuntimeError(f"{label}: gensim has {len(kv)} x {kv.vector_size}, the server another shape")

        total = plan.batch * (plan.calls + 1)
        picks = rng.choice(model.vocab_size, size=total, replace=total > model.vocab_size)
        words = [model.words[i] for i in picks]
        warmup, measured = words[: plan.batch], words[plan.batch :]
        batches = [measured[i : i + plan.batch] for i in range(0, len(measured), plan.batch)]
        result = Result(
            model=key,
            label=label,
            vocab_size=model.vocab_size,
            dim=model.dim,
            batch=plan.batch,
            server_queries=len(measured),
            gensim_queries=plan.gensim_queries,
            target_speedup=TARGET_SPEEDUP_GPU if DEVICE.type == "cuda" else TARGET_SPEEDUP[key],
            load_s=load_s,
        )

        log(f"{label}: gensim, {plan.gensim_queries} queries one at a time")
        gensim_words = measured[: plan.gensim_queries]
        result.gensim_ms, expected = time_gensim(kv, gensim_words)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only memory map, never written
            vectors = torch.from_numpy(np.asarray(model.vectors, dtype=np.float32))
        unit = torch.from_numpy(np.stack([model.unit_vector(w) for w in batches[0]]).astype(np.float32))
        log(
            f"{label}: bare GEMM [{plan.batch} x {model.dim}] x [{model.dim} x {model.vocab_size}], blockings"
        )
        _, blocking = time_gemm(vectors, unit, plan.gemm_repeats)

        # Server and GEMM alternate, so a slow spell of a shared machine hits both: the share is
        # the median of each round's ratio.
        server_rounds: list[float] = []
        apart_rounds: list[float] = []
        gemm_rounds: list[float] = []
        answers: list[list[tuple[str, float]]] = []
        client_process = (
            ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
            if plan.client_process
            else None
        )
        try:
            for round_index in range(plan.rounds):
                log(
                    f"{label}: round {round_index + 1}/{plan.rounds}: server, {plan.calls} calls of "
                    f"{plan.batch} queries over gRPC, {plan.in_flight} at a time"
                    + (", the client in this process, then in another" if client_process else "")
                    + "; then the GEMM"
                )
                round_warmup = warmup if round_index == 0 else []
                server_ms, round_answers = time_server_blocking(
                    running.target, round_warmup, batches, plan.in_flight
                )
                answers = answers or round_answers
                server_rounds.append(server_ms)
                if client_process is not None:
                    apart_ms, apart_answers = client_process.submit(
                        time_server_blocking, running.target, round_warmup, batches, plan.in_flight
                    ).result()
                    if not same_rankings(apart_answers, round_answers):
                        result.mismatches.append("the client in another process got other answers")
                    apart_rounds.append(apart_ms)
                gemm_rounds.append(time_gemm(vectors, unit, 1, blockings=(blocking,))[0])
        finally:
            if client_process is not None:
                client_process.shutdown()
        result.server_ms = statistics.median(server_rounds)
        if apart_rounds:
            result.server_apart_ms = statistics.median(apart_rounds)
        result.gemm_ms = statistics.median(gemm_rounds)
        result.round_fractions = [
            gemm / server for gemm, server in zip(gemm_rounds, server_rounds, strict=True)
        ]
        result.gemm_fraction = statistics.median(result.round_fractions)
        log(f"{label}: GEMM share by round: {', '.join(f'{f:.0%}' for f in result.round_fractions)}")

        log(f"{label}: core search alone, same batches")
        result.search_ms = time_search(model, batches)
        result.prefilter = model.prefilter
        result.scanner = model.scanner.name
        if model.prefilter:
            float32 = choose_scanner(model.search_rows, prefilter="off")  # what the server would pick
            log(f"{label}: core search alone, bfloat16 prefilter off ({float32.name})")
            result.search_float32_ms = time_search_with(model, batches, float32)
            result.gemm_bfloat16_ms, _ = time_gemm(vectors, unit, plan.gemm_repeats, torch.bfloat16)
        else:
            result.search_float32_ms = result.search_ms
        if scanners:
            log(f"{label}: core search alone by scanner: {', '.join(scanners)}")
            result.search_by_scanner_ms = time_scanners(model, batches, scanners)

        flop_per_query = 2.0 * model.vocab_size * model.dim
        result.gemm_gflops = flop_per_query / (result.gemm_ms / 1000) / 1e9
        result.server_gflops = flop_per_query / (result.server_ms / 1000) / 1e9
        result.speedup = result.gensim_ms / result.server_ms
        result.speedup_apart = result.gensim_ms / result.server_apart_ms

        for word, want, have in zip(gensim_words, expected, answers, strict=False):
            result.compared += 1
            problem = compare(kv, word, want, have)
            if problem is None:
                result.matched += 1
            else:
                result.mismatches.append(problem)
        log(f"{label}: {result.matched} of {result.compared} rankings match gensim")
        return result
    finally:
        if running is not None:
            running.stop()
        components.close()


def synthetic_file(folder: Path, rows: int, dim: int, rng: np.random.Generator) -> tuple[Path, KeyedVectors]:
    """Random normal float32 vectors saved as a gensim native .kv file; returns it and the KeyedVectors."""
    log(f"synthetic: generating {rows} x {dim} float32 normal vectors")
    words = [f"w{i}" for i in range(rows)]
    kv = KeyedVectors(dim)
    kv.add_vectors(words, rng.standard_normal((rows, dim), dtype=np.float32))
    path = folder / f"synthetic-{rows}x{dim}.kv"
    kv.save(str(path))
    return path, kv


# Output


COLUMNS = [
    ("model", 22),
    ("gensim ms/q", 11),
    ("server ms/q", 11),
    ("search ms/q", 11),
    ("float32 search ms/q", 19),
    ("GEMM ms/q", 9),
    ("bf16 GEMM ms/q", 14),
    ("server/gensim", 20),
    ("client apart: server ms/q", 25),
    ("client apart: server/gensim", 27),
    ("server % GEMM", 20),
    ("GEMM GFLOP/s", 12),
    ("server GFLOP/s", 14),
    ("verified", 9),
]


def table_rows(results: list[Result]) -> list[list[str]]:
    rows = []
    for r in results:
        speed_ok = "ok" if r.speedup >= r.target_speedup else "MISS"
        gemm_ok = "ok" if r.gemm_fraction >= r.target_gemm_fraction else "MISS"
        rows.append(
            [
                f"{r.label} {r.vocab_size // 1000}k x {r.dim}",
                f"{r.gensim_ms:.2f}",
                f"{r.server_ms:.3f}",
                f"{r.search_ms:.3f}" + (" (prefilter)" if r.prefilter else ""),
                f"{r.search_float32_ms:.3f}",
                f"{r.gemm_ms:.3f}",
                f"{r.gemm_bfloat16_ms:.3f}" if r.prefilter else "-",
                f"{r.speedup:.1f}x (>={r.target_speedup:.0f}x {speed_ok})",
                "-" if math.isnan(r.server_apart_ms) else f"{r.server_apart_ms:.3f}",
                "-"
                if math.isnan(r.server_apart_ms)
                else f"{r.speedup_apart:.1f}x ({'ok' if r.speedup_apart >= r.target_speedup else 'MISS'})",
                f"{100 * r.gemm_fraction:.0f}% (>={100 * r.target_gemm_fraction:.0f}% {gemm_ok})",
                f"{r.gemm_gflops:.1f}",
                f"{r.server_gflops:.1f}",
                f"{r.matched}/{r.compared}",
            ]
        )
    return rows


def text_table(results: list[Result]) -> str:
    widths = [max(w, *(len(row[i]) for row in table_rows(results))) for i, (_, w) in enumerate(COLUMNS)]
    lines = ["  ".join(name.ljust(w) for (name, _), w in zip(COLUMNS, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in table_rows(results):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
    return "\n".join(lines)


def markdown_table(results: list[Result]) -> str:
    lines = ["| " + " | ".join(name for name, _ in COLUMNS) + " |"]
    lines.append("|" + "|".join("---" for _ in COLUMNS) + "|")
    for row in table_rows(results):
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": cpu_cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "device": torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu",
    }


def append_results(path: Path, results: list[Result], info: dict[str, Any], smoke: bool, plan: Plan) -> None:
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    section = [
        f"## {stamp}: bench/word_vectors.py{' --smoke' if smoke else ''}",
        "",
        f"- machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
        f"({info['torch_threads']} threads), Python {info['python']}, device {info['device']}",
        f"- smoke: {'yes' if smoke else 'no'}; {plan.batch} queries per server call, "
        f"{plan.in_flight} in flight, "
        f"{plan.calls} timed calls after a warm-up; gensim on {plan.gensim_queries} of the same words; "
        f"topn {TOPN}"
        + (
            "; client apart = the same calls from a client in another process (as in a deployment), "
            "alternating with the in-process client's"
            if plan.client_process
            else ""
        ),
        "- ms/q is per query; search = WordVectors.search alone (no gRPC), float32 search = the same "
        "with the bfloat16 prefilter off; GEMM = bare float32 torch.mm in the fastest of several "
        "blockings and of both orientations (queries x rows, rows x queries), bf16 GEMM the same "
        "in bfloat16 (the prefilter's first pass); server and GEMM "
        f"alternate {plan.rounds} times and each is the median; server % GEMM = the median of the "
        "rounds' float32 GEMM ms / server ms (over 100% where the prefilter does less than that product)",
        "",
        markdown_table(results),
        "",
    ]
    for r in results:
        for problem in r.mismatches:
            section.append(f"- mismatch ({r.label}): {problem}")
    if any(r.mismatches for r in results):
        section.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if existing and not existing.endswith("\n\n"):
        existing = existing.rstrip("\n") + "\n\n"
    path.write_text(existing + "\n".join(section) + "\n")


def parse_shape(text: str) -> tuple[int, int]:
    rows, _, dim = text.lower().partition("x")
    if not rows.isdigit() or not dim.isdigit() or int(rows) < 1 or int(dim) < 1:
        raise SystemExit(f"--synthetic {text!r}: expected ROWSxDIM, e.g. 1000000x300")
    return int(rows), int(dim)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="a quick run: 100k x 300 synthetic, fewer queries"
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the figures as JSON here")
    parser.add_argument("--results", type=Path, metavar="MD", help="append a dated markdown section here")
    parser.add_argument(
        "--word-vectors", default="glove-6b-50d", help="the first model (default glove-6b-50d)"
    )
    parser.add_argument(
        "--synthetic",
        action="append",
        metavar="ROWSxDIM",
        help="random normal models to run (repeatable; default 1000000x300, 100000x300 with --smoke)",
    )
    parser.add_argument("--batch", type=int, help="queries per server call (default 512; 256 with --smoke)")
    parser.add_argument("--calls", type=int, help="timed server calls per model (default 4; 2 with --smoke)")
    parser.add_argument("--in-flight", type=int, default=1, help="server calls at a time (default 1)")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="cpu", help="torch device of the server and the GEMM (cpu, cuda)")
    parser.add_argument(
        "--prefilter",
        choices=("auto", "on", "off"),
        default="auto",
        help="the server's --word-vector-prefilter",
    )
    parser.add_argument(
        "--scanners",
        default="",
        metavar="NAMES",
        help="also time the core search with each of these scanners, comma-separated "
        f"({', '.join(SCANNER_NAMES)})",
    )
    parser.add_argument(
        "--client-process",
        action="store_true",
        help="also time the server with the client in another process (in this one, the client's "
        "Python work shares the server's interpreter lock)",
    )
    parser.add_argument("--verbose", action="store_true", help="the server's INFO logs")
    args = parser.parse_args(argv)
    known: dict[str, ScannerName] = {name: name for name in SCANNER_NAMES}
    asked = [name for name in args.scanners.split(",") if name]
    unknown = sorted(set(asked) - set(known))
    if unknown:
        parser.error(f"--scanners: no scanner {', '.join(unknown)}; there are {', '.join(SCANNER_NAMES)}")
    scanners = [known[name] for name in asked]

    global DEVICE, PREFILTER
    DEVICE = torch.device(args.device)
    PREFILTER = args.prefilter
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    torch.set_num_threads(cpu_cores())
    plan = SMOKE if args.smoke else FULL
    plan = replace(
        plan,
        batch=args.batch or plan.batch,
        calls=args.calls or plan.calls,
        in_flight=args.in_flight,
        client_process=args.client_process,
    )
    shapes = [parse_shape(text) for text in args.synthetic or [f"{plan.synthetic_rows}x{plan.synthetic_dim}"]]
    info = machine()
    log(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads)")
    started = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="embedserve-bench-") as temp:
        folder = Path(temp)
        cache_dir = folder / "cache"
        first = "glove-6b-50d" if args.word_vectors == "glove-6b-50d" else "synthetic"
        label = "GloVe 6B 50d" if first == "glove-6b-50d" else Path(args.word_vectors).name
        if args.word_vectors != "none":  # none: the synthetic model alone (e.g. where GloVe is not installed)
            results.append(
                bench_model(
                    label,
                    first,
                    args.word_vectors,
                    cache_dir,
                    plan,
                    np.random.default_rng(args.seed),
                    None,
                    scanners,
                )
            )
        rng = np.random.default_rng(args.seed + 1)
        for rows, dim in shapes:
            path, kv = synthetic_file(folder, rows, dim, rng)
            results.append(
                bench_model(
                    "random normal",
                    "synthetic",
                    str(path),
                    cache_dir,
                    plan,
                    rng,
                    kv,
                    scanners,
                )
            )
            del kv
            path.unlink()
    elapsed = time.perf_counter() - started

    print()
    print(text_table(results))
    print()
    if DEVICE.type == "cuda":
        print(
            f"targets: server >= {100 * TARGET_GEMM_FRACTION:.0f}% of the GEMM limit; "
            f"server/gensim >= {TARGET_SPEEDUP_GPU:.0f}x on a GPU"
        )
    else:
        print(
            f"targets: server >= {100 * TARGET_GEMM_FRACTION:.0f}% of the GEMM limit; server/gensim >= "
            f"{TARGET_SPEEDUP['synthetic']:.0f}x on 1M x 300, "
            f">= {TARGET_SPEEDUP['glove-6b-50d']:.0f}x on GloVe"
            + (" (smoke: the synthetic model is 100k x 300)" if args.smoke else "")
        )
    for r in results:
        print(f"{r.label}: the server scans with {r.scanner}")
        for name, ms in r.search_by_scanner_ms.items():
            print(f"{r.label}: core search alone by {name}: {ms:.3f} ms/q")
    for r in results:
        print(f"{r.label}: {r.matched} of {r.compared} rankings equal gensim's")
        for problem in r.mismatches:
            print(f"  MISMATCH {problem}")
    print(f"total {elapsed:.0f} s")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "smoke": args.smoke,
            "machine": info,
            "plan": asdict(plan),
            "elapsed_s": elapsed,
            "results": [asdict(r) for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.results:
        append_results(args.results, results, info, args.smoke, plan)
    return 1 if any(r.mismatches for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
