"""`embedserve prepare` on one machine: the Ray engine (a local Ray instance) against the in-process
engine (prepared.prepare_corpus), on the same text files, each in turn over several rounds.

    .venv/bin/python bench/prepare_ray.py                 # ~40 MB in 40 files, 2 CPUs, 3 rounds
    .venv/bin/python bench/prepare_ray.py --smoke         # seconds: tiny files, one round

Ray's start-up (ray.init, and a first small prepare that starts and warms its workers) is timed
apart and left out of the rounds. The engines alternate (which goes first swaps every round), and
the ratio is the median of the rounds' ray/local ratios. Both corpora must hold the same tokens:
it exits 1 when they differ.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from embedserve.server.core import Tokenizer, load_gpt2_tokenizer
from embedserve.server.core.manifest import read_manifest
from embedserve.server.core.prepare_ray import RayEngine
from embedserve.server.core.prepared import prepare_corpus
from embedserve.server.core.storage import LocalStorage

VERDICT = Path(__file__).resolve().parents[2] / "shared" / "data" / "the-verdict.txt"


def write_inputs(folder: Path, files: int, file_bytes: int) -> list[Path]:
    """Text files of the-verdict's paragraphs in a new order each (words when it is absent)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if VERDICT.is_file():
        paragraphs = [p for p in VERDICT.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    else:
        words = [
            "the",
            "painter",
            "said",
            "Jack",
            "Gisburn",
            "genius",
            "fellow",
            "money",
            "wife",
            "picture",
            "never",
        ]
        paragraphs = [" ".join(rng.choice(words, 60)) for _ in range(200)]
    paths = []
    for number in range(files):
        path = folder / f"text-{number:03d}.txt"
        if not path.exists() or path.stat().st_size < file_bytes:
            chosen: list[str] = []
            size = 0
            while size < file_bytes:
                paragraph = paragraphs[int(rng.integers(len(paragraphs)))]
                chosen.append(paragraph)
                size += len(paragraph.encode()) + 2
            path.write_text("\n\n".join(chosen), encoding="utf-8")
        paths.append(path)
    return paths


def corpus_sha256(folder: Path) -> str:
    """Of the corpus's tokens, its shards concatenated in the manifest's order."""
    digest = hashlib.sha256()
    for shard in read_manifest(LocalStorage(folder), "bench").shards:
        digest.update((folder / shard.file).read_bytes())
    return digest.hexdigest()


def run_local(inputs: list[Path], folder: Path, tokenizer: Tokenizer, cpus: int) -> float:
    started = time.perf_counter()
    prepare_corpus(inputs, "bench", folder, tokenizer, threads=cpus)
    return time.perf_counter() - started


def run_ray(inputs: list[Path], folder: Path, tokenizer: Tokenizer) -> float:
    started = time.perf_counter()
    RayEngine(None).prepare([str(path) for path in inputs], "bench", LocalStorage(folder), tokenizer)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=float, default=40.0, help="text in all (default 40)")
    parser.add_argument("--files", type=int, default=40, help="files the text is spread over")
    parser.add_argument("--cpus", type=int, default=2, help="Ray's CPUs and the local engine's threads")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny files, one round")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()) / "embedserve-prepare-ray")
    args = parser.parse_args()
    if args.smoke:
        args.megabytes, args.files, args.rounds = 0.2, 4, 1

    import ray

    tokenizer = load_gpt2_tokenizer(None, os.environ)
    file_bytes = int(args.megabytes * 1e6 / args.files)
    inputs = write_inputs(args.folder / f"inputs-{args.files}x{file_bytes}", args.files, file_bytes)
    total_mb = sum(path.stat().st_size for path in inputs) / 1e6
    output = Path(tempfile.mkdtemp(prefix="corpora-", dir=args.folder))
    figures: dict[str, Any] = {"input_mb": round(total_mb, 2), "files": args.files, "cpus": args.cpus}

    started = time.perf_counter()
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, logging_level=logging.WARNING)
    figures["ray_init_s"] = round(time.perf_counter() - started, 2)
    try:
        figures["ray_warmup_s"] = round(run_ray(inputs[:1], output / "warmup", tokenizer), 2)
        rounds = []
        for number in range(args.rounds):
            times: dict[str, float] = {}
            order = ["local", "ray"] if number % 2 == 0 else ["ray", "local"]
            for engine in order:
                folder = output / f"{engine}-{number}"
                if engine == "local":
                    times[engine] = run_local(inputs, folder, tokenizer, args.cpus)
                else:
                    times[engine] = run_ray(inputs, folder, tokenizer)
            if corpus_sha256(output / f"local-{number}") != corpus_sha256(output / f"ray-{number}"):
                print(f"round {number}: the engines' tokens differ", file=sys.stderr)
                return 1
            for engine in order:
                shutil.rmtree(output / f"{engine}-{number}")
            rounds.append({**times, "ratio": times["ray"] / times["local"]})
            print(
                f"round {number}: local {times['local']:.2f} s ({total_mb / times['local']:.1f} MB/s), "
                f"ray {times['ray']:.2f} s ({total_mb / times['ray']:.1f} MB/s), "
                f"ray/local {times['ray'] / times['local']:.2f}",
                flush=True,
            )
    finally:
        ray.shutdown()
        shutil.rmtree(output, ignore_errors=True)
    figures["rounds"] = rounds
    figures["ratio_median"] = round(statistics.median(r["ratio"] for r in rounds), 3)
    print(
        f"{total_mb:.1f} MB in {args.files} files, {args.cpus} CPUs: "
        f"ray/local time {figures['ratio_median']:.2f} "
        f"(median of {len(rounds)}); Ray start {figures['ray_init_s']} s, first prepare "
        f"{figures['ray_warmup_s']} s (not counted)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps(figures, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
