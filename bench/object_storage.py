"""Benchmark: StreamBatches of one corpus from local disk against the same corpus in object storage.

    .venv/bin/python bench/object_storage.py [--tokens 64000000] [--shard-size-mib 16] [--rounds 3]
        [--smoke] [--json OUT]

One corpus of random GPT-2 token IDs (uint16, seeded), cut into shards by ShardWriter, is written
to a local folder and to a bucket of a real S3-compatible server on 127.0.0.1: moto's server mode,
in a process of its own (so it shares no GIL with the servers or this client). Three
`embedserve serve` processes stream it to this process, which counts the tokens each epoch
delivers:

- local: `--data-dir FOLDER`;
- warm: `--data-dir s3://BUCKET/PREFIX`, its shard cache filled by an epoch before the rounds;
- cold: the same URL with a new, empty `--cache-dir` (a new server) for every stream; the server's
  first call to the object store (its S3 client's start, about half a second) is made before
  the stream and reported apart, so the figure is the empty cache's.

Each round streams one whole epoch of 64 x 1024 windows (stride 1024) in order, and one shuffled
(seed 1), from each source in turn (the order rotating from round to round), so a slow spell of
the machine touches all sources alike. The figures are medians over rounds; each ratio the median
of the rounds' ratios to local. Targets: warm >= 0.9x local, cold >= 0.5x local (in order; the
shuffled figures are reported against the same targets). Every source must deliver the same
tokens (count and checksum) in each setting. Nothing asserts a time; it prints a table and writes JSON.
"""

from __future__ import annotations

# torch is imported by serving after tune_openmp:
import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import numpy as np
from embedserve.client import AsyncClient, BatchSpec, NotFoundError
from embedserve.server.core import load_gpt2_tokenizer
from embedserve.server.core.manifest import CorpusManifest, commit_manifest, now
from embedserve.server.core.shard_writer import ShardWriter, new_run
from embedserve.server.core.storage import LocalStorage, Storage, open_storage
from serving import ServerProcess, log

BUCKET = "bench"
CORPUS = "corpus"
URL = f"s3://{BUCKET}/data"
SOURCES = ("local", "warm", "cold")
SETTINGS = ("in order", "shuffled")
TARGETS = {"warm": 0.9, "cold": 0.5}
SERVE_FLAGS = ("--device", "cpu", "--word-vectors", "none")
CACHE_SIZE = "10GiB"  # holds the whole corpus: "warm" means every shard is in the cache


class MotoServer:
    """`python -m moto.server` on 127.0.0.1, in a process of its own; its state lives there."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stderr is not None
        port = 0
        for line in self.process.stderr:  # werkzeug's " * Running on http://127.0.0.1:PORT"
            found = re.search(r"Running on http://127\.0\.0\.1:(\d+)", line)
            if found:
                port = int(found.group(1))
                break
        if not port:
            self.process.kill()
            raise RuntimeError(f"moto's server did not start: {self.process.stderr.read()}")
        self.endpoint = f"http://127.0.0.1:{port}"
        # Drain its request log so it never blocks on a full pipe.
        self._drain = subprocess.Popen(["cat"], stdin=self.process.stderr, stdout=subprocess.DEVNULL)

    def environment(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self._drain.wait(10)


@contextlib.contextmanager
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    try:
        yield server
    finally:
        server.stop()


def make_bucket(bucket: str) -> None:
    import fsspec  # type: ignore[import-untyped]

    fsspec.filesystem("s3", skip_instance_cache=True).mkdir(bucket)


def write_corpus(destinations: list[Storage], tokens: int, shard_bytes: int, *, seed: int) -> CorpusManifest:
    """The same random corpus, in shards of `shard_bytes`, with its manifest, in each destination."""
    tokenizer = load_gpt2_tokenizer(None, {})
    dtype = np.dtype("<u2")
    run = new_run()  # the same file names in every destination
    writers = [ShardWriter(each, CORPUS, dtype, shard_bytes=shard_bytes, run=run) for each in destinations]
    rng = np.random.default_rng(seed)
    step = max(1, shard_bytes // dtype.itemsize)
    for done in range(0, tokens, step):
        data = rng.integers(0, tokenizer.n_vocab, min(step, tokens - done), dtype=np.uint16).astype(dtype)
        for writer in writers:
            writer.add(data.tobytes())
    entries = [writer.finish() for writer in writers]
    assert all(written == entries[0] for written in entries), "the destinations' shards differ"
    manifest = CorpusManifest(
        name=CORPUS,
        tokenizer=tokenizer.name,
        tokenizer_identity=tokenizer.identity,
        tokenizer_sha256=tokenizer.vocabulary_sha256,
        vocab_size=tokenizer.n_vocab,
        dtype="uint16",
        shards=tuple(entries[0]),
        created=now(),
        updated=now(),
        origin="bench",
    )
    for storage in destinations:
        commit_manifest(storage, manifest)
    return manifest


@dataclasses.dataclass
class Stream:
    """One epoch streamed to this process."""

    tokens: int
    checksum: int  # the sum of every input token ID: equal for every source in one setting
    seconds: float
    first_batch_seconds: float
    # A cold server's: its first call to the object store (warm_up), before the epoch is timed.
    connect_seconds: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def delivered(self) -> tuple[int, int]:
        return self.tokens, self.checksum


def batch_specs(batch_size: int, max_length: int) -> dict[str, BatchSpec]:
    """Each setting's windows: max_length tokens, stride max_length, in order or shuffled."""
    spec = BatchSpec(batch_size=batch_size, max_length=max_length, stride=max_length)
    return {"in order": spec.replace(shuffle=False), "shuffled": spec.replace(shuffle=True, seed=1)}


async def stream_epoch(target: str, spec: BatchSpec) -> Stream:
    async with AsyncClient(target, timeout=600) as client:
        tokens = checksum = 0
        first = 0.0
        started = time.perf_counter()
        async for reply in client.stream_batches(corpus=CORPUS, spec=spec):
            if not tokens:
                first = time.perf_counter() - started
            tokens += reply.inputs.size
            checksum += int(reply.inputs.sum(dtype=np.int64))
        return Stream(tokens, checksum, time.perf_counter() - started, first)


async def warm_up(target: str) -> float:
    """The server's first-call costs, before any corpus is read: a short inline-text stream, then
    a corpus that is not there (in object storage, the first call of the server's S3 client loads
    botocore's models, about half a second here: a cost of a new process, not of a cold cache).
    Returns the seconds of that second call."""
    async with AsyncClient(target, timeout=600) as client:
        async for _ in client.stream_batches(text="warm up " * 2000, batch_size=4, max_length=64, stride=64):
            pass
        started = time.perf_counter()
        with contextlib.suppress(NotFoundError):
            async for _ in client.stream_batches(corpus="absent", batch_size=4, max_length=64, stride=64):
                pass
        return time.perf_counter() - started


@contextlib.contextmanager
def serving(*flags: str) -> Iterator[ServerProcess]:
    server = ServerProcess(*SERVE_FLAGS, *flags)
    try:
        yield server
    finally:
        server.stop()


def from_bucket(cache_dir: Path) -> contextlib.AbstractContextManager[ServerProcess]:
    """A server of the corpus in the bucket, its shard cache in `cache_dir`."""
    return serving("--data-dir", URL, "--cache-dir", str(cache_dir), "--cache-size", CACHE_SIZE)


async def measure(source: str, spec: BatchSpec, servers: dict[str, ServerProcess], cold: Path) -> Stream:
    """One epoch from `source`; a cold one from a new server whose shard cache is `cold` (new, empty)."""
    if source != "cold":
        return await stream_epoch(servers[source].target, spec)
    try:
        with from_bucket(cold) as server:
            connect = await warm_up(server.target)
            return dataclasses.replace(await stream_epoch(server.target, spec), connect_seconds=connect)
    finally:
        shutil.rmtree(cold, ignore_errors=True)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    shard_bytes = args.shard_size_mib << 20
    specs = batch_specs(args.batch_size, args.max_length)
    rates: dict[str, dict[str, list[float]]] = {name: {s: [] for s in SOURCES} for name in SETTINGS}
    first_batch: dict[str, dict[str, list[float]]] = {name: {s: [] for s in SOURCES} for name in SETTINGS}
    delivered: dict[str, set[tuple[int, int]]] = {name: set() for name in SETTINGS}
    connect: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-object-storage-") as temporary, moto_server() as moto:
        folder = Path(temporary)
        os.environ.update(moto.environment())  # for this process's writes and the servers it starts
        os.environ.pop("AWS_PROFILE", None)
        make_bucket(BUCKET)
        started = time.perf_counter()
        destinations = [LocalStorage(folder / "data"), open_storage(URL)]
        manifest = write_corpus(destinations, args.tokens, shard_bytes, seed=0)
        seconds = time.perf_counter() - started
        log(
            f"corpus: {manifest.token_count:,} tokens in {len(manifest.shards)} shards of "
            f"{args.shard_size_mib} MiB, written locally and to {URL} in {seconds:.1f} s"
        )
        with (
            serving("--data-dir", str(folder / "data"), "--cache-dir", str(folder / "local-cache")) as local,
            from_bucket(folder / "warm") as warm,
        ):
            servers = {"local": local, "warm": warm}
            for server in servers.values():  # page cache, window orders, and the warm shard cache
                await warm_up(server.target)
                for name, spec in specs.items():
                    delivered[name].add((await stream_epoch(server.target, spec)).delivered)
            for number in range(args.rounds):
                order = SOURCES[number % 3 :] + SOURCES[: number % 3]
                for name, spec in specs.items():
                    for source in order:
                        stream = await measure(source, spec, servers, folder / "cold")
                        delivered[name].add(stream.delivered)
                        rates[name][source].append(stream.tokens_per_s)
                        first_batch[name][source].append(stream.first_batch_seconds)
                        if stream.connect_seconds is not None:
                            connect.append(stream.connect_seconds)
                    row = {s: rates[name][s][-1] for s in SOURCES}
                    log(
                        f"round {number + 1} {name}: "
                        + ", ".join(f"{s} {row[s] / 1e6:.1f} M tokens/s" for s in SOURCES)
                        + f"; warm/local {row['warm'] / row['local']:.2f}, "
                        f"cold/local {row['cold'] / row['local']:.2f}"
                    )
    for name, streams in delivered.items():
        if len(streams) != 1:
            raise AssertionError(f"{name}: the sources delivered different tokens (count, sum): {streams}")
    ((count, _),) = delivered["in order"]
    figures: dict[str, Any] = {}
    for name in SETTINGS:
        local_rates = rates[name]["local"]
        ratios = {s: [v / b for v, b in zip(rates[name][s], local_rates, strict=True)] for s in TARGETS}
        figures[name] = {
            "tokens_per_s": rates[name],
            "median_tokens_per_s": {s: statistics.median(rates[name][s]) for s in SOURCES},
            "first_batch_s": first_batch[name],
            "ratios": ratios,
            "median_ratio": {s: statistics.median(ratios[s]) for s in TARGETS},
            "met": {s: statistics.median(ratios[s]) >= TARGETS[s] for s in TARGETS},
        }
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "corpus": {
            "tokens": manifest.token_count,
            "shards": len(manifest.shards),
            "shard_bytes": shard_bytes,
            "delivered_tokens_per_epoch": count,
        },
        "batch": {"batch_size": args.batch_size, "max_length": args.max_length, "stride": args.max_length},
        "rounds": args.rounds,
        "cache_size": CACHE_SIZE,
        "targets": {f"{s}/local": f">= {t}" for s, t in TARGETS.items()},
        "figures": figures,
        # Not in the figures: a new server's first call to the object store (a missing manifest).
        "cold_server_first_storage_call_s": connect,
    }


def table(results: dict[str, Any]) -> str:
    """Medians, then each round's figure, tokens/s in millions."""
    rows = [("setting", "source", "M tokens/s", "per round", "/ local", "per round", "target")]
    for name, figures in results["figures"].items():
        for source in SOURCES:
            row = [name, source, f"{figures['median_tokens_per_s'][source] / 1e6:.1f}"]
            row.append(" ".join(f"{v / 1e6:.1f}" for v in figures["tokens_per_s"][source]))
            if source in TARGETS:
                met = "met" if figures["met"][source] else "NOT met"
                row += [
                    f"{figures['median_ratio'][source]:.2f}",
                    " ".join(f"{r:.2f}" for r in figures["ratios"][source]),
                    f">= {TARGETS[source]} ({met})",
                ]
            rows.append((*row, "", "", "")[:7])
    widths = [max(len(row[i]) for row in rows) for i in range(7)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.partition("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=64_000_000, help="tokens in the corpus")
    parser.add_argument("--shard-size-mib", type=int, default=16, help="shard size (MiB)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=1024, help="tokens per window (and the stride)")
    parser.add_argument("--smoke", action="store_true", help="a few MB, one round: seconds, for CI")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    if args.smoke:
        args.tokens, args.shard_size_mib, args.rounds = 2_000_000, 1, 1
    results = asyncio.run(run(args))
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        log(f"wrote {args.json}")


if __name__ == "__main__":
    main()
