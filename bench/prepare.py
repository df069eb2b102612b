"""Preparing corpora: `embedserve prepare` (prepared.prepare_corpus, threads of this process) against
`litdata.optimize` with as many worker processes, on the same text files.

    .venv/bin/python bench/prepare.py --rounds 3 --json bench/prepare.json
    .venv/bin/python bench/prepare.py --no-fastokens --rounds 3    # as an install without the extra
    .venv/bin/python bench/prepare.py --smoke --json out.json        # tests/test_bench_smoke.py

Two datasets, generated once into --folder from a seed (shuffled sentences of the-verdict.txt when
../shared is there, among sentences of its words, made-up words, numbers and a little non-Latin
text): "many", 100 files of about 2 MB, and "one", a single file of about 200 MB. Each file is one
document, as prepare reads a text file.

LitData tokenizes each file the way its README tokenizes a corpus: a function that opens a file,
encodes it with tiktoken's GPT-2 encoding (encode_to_numpy, tiktoken's fastest call) and yields
the token array, with `item_loader=TokensLoader()` and its README's chunk size. It runs with
start_method="fork": LitData's default, spawn, adds about ten seconds of worker start-up a run
here. It hands out whole files, so on "one" a single worker encodes.

Each round times prepare and LitData on each dataset, alternating which goes first; a dataset's
ratio is the median of its rounds' ratios (the VM's speed varies between rounds). The encoders are
also timed alone on the same text, cut as prepare cuts it, on --threads threads: the most any
pipeline could reach with them. `--no-fastokens` hides fastokens from this process, so prepare
uses tiktoken (bpe_backends.choose_encoder), as an install without the fast-bpe extra does.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VERDICT = REPO.parent / "shared" / "data" / "the-verdict.txt"
MB = 1e6
_SYLLABLES = [consonant + vowel for consonant in "bdgklmnprstvz" for vowel in "aeiou"] + ["str", "qu"]
_EXTRAS = [
    "café",
    "naïve",
    "résumé",
    "日本語の文章",
    "Привет",
    "мир",
    "🙂",
    "🚀",
    "x=f(y)+3*z",
    "[1,",
    "2]",
    "--",
    "(see",
    "above)",
    "e.g.",
    "\tindented",
    "don't",
    "we'll",
    "it's",
    "O'Brien",
]
_FALLBACK_WORDS = ["the", "of", "and", "a", "to", "in", "he", "was", "it", "his", "that", "with", "had"]


@dataclass(frozen=True)
class Dataset:
    name: str
    files: int
    file_bytes: int
    seed: int


FULL = (Dataset("many", 100, 2_000_000, 1), Dataset("one", 1, 200_000_000, 2))
SMOKE = (Dataset("many", 4, 60_000, 1), Dataset("one", 1, 400_000, 2))


def sentences(seed: int, count: int) -> list[str]:
    """The-verdict's sentences (when at hand) and `count` made-up ones, from a seed."""
    rng = random.Random(seed)
    verdict = VERDICT.read_text(encoding="utf-8") if VERDICT.is_file() else ""
    real = [s for s in re.split(r"(?<=[.!?])\s+", verdict) if s.strip()]
    words = re.findall(r"[A-Za-z']+", verdict) or _FALLBACK_WORDS
    made: list[str] = []
    for _ in range(count):
        out = []
        for _ in range(rng.randint(4, 24)):
            draw = rng.random()
            if draw < 0.55:
                out.append(rng.choice(words))
            elif draw < 0.85:
                out.append("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))))
            elif draw < 0.95:
                number = rng.randint(0, 10 ** rng.randint(1, 7))
                out.append(f"{number:,}" if draw < 0.9 else f"{number / 997:.4f}")
            else:
                out.append(rng.choice(_EXTRAS))
        text = " ".join(out)
        made.append(text[:1].upper() + text[1:] + rng.choice(".!?;:,"))
    return real + made


def text_of(pool: list[str], size: int, rng: random.Random) -> str:
    """About `size` bytes of paragraphs of 1 to 8 sentences drawn from `pool`."""
    mean = sum(len(s.encode()) + 1 for s in pool) / len(pool)
    drawn = rng.choices(pool, k=max(1, int(size / mean)))
    paragraphs = []
    at = 0
    while at < len(drawn):
        step = rng.randint(1, 8)
        paragraphs.append(" ".join(drawn[at : at + step]))
        at += step
    return "\n\n".join(paragraphs) + "\n"


def dataset_files(folder: Path, dataset: Dataset) -> list[Path]:
    """The dataset's files, written on first use (kept in `folder` for the next run)."""
    where = folder / f"data-{dataset.name}-{dataset.files}x{dataset.file_bytes}-{dataset.seed}"
    files = [where / f"{number:04d}.txt" for number in range(dataset.files)]
    if (where / "complete").is_file():
        return files
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    pool = sentences(dataset.seed, 100_000 if dataset.file_bytes * dataset.files > 10_000_000 else 2_000)
    rng = random.Random(dataset.seed)
    for path in files:
        path.write_text(text_of(pool, dataset.file_bytes, rng), encoding="utf-8")
    (where / "complete").write_text("")
    return files


def litdata_tokenize(path: str, encoding: Any, separator: int) -> Iterator[np.ndarray[Any, Any]]:
    """LitData's fn: one file's tokens, then <|endoftext|> (the README's `eos=True`)."""
    text = Path(path).read_text(encoding="utf-8")
    ids = encoding.encode_to_numpy(text, allowed_special={"<|endoftext|>"})
    yield np.append(ids, separator).astype(np.uint16)


def run_litdata(files: list[Path], out: Path, threads: int, encoding: Any) -> int:
    """litdata.optimize over the files; the tokens it wrote."""
    from litdata import TokensLoader, optimize  # type: ignore[import-untyped,import-not-found,unused-ignore]

    optimize(
        fn=partial(litdata_tokenize, encoding=encoding, separator=encoding.eot_token),
        inputs=[str(path) for path in files],
        output_dir=str(out),
        num_workers=threads,
        chunk_size=2049 * 8012,
        item_loader=TokensLoader(),
        start_method="fork",
        verbose=False,
    )
    index = json.loads((out / "index.json").read_text())
    return sum(int(chunk["dim"]) for chunk in index["chunks"])


def run_prepare(files: list[Path], out: Path, threads: int, tokenizer: Any) -> int:
    """embedserve prepare, in this process; the tokens it wrote."""
    from embedserve.server.core.prepared import prepare_corpus

    out.mkdir(parents=True)
    return int(prepare_corpus(files, "bench", out, tokenizer, threads=threads).token_count)


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (LitData's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run: Callable[[Path], int], out: Path) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and tokens of one run."""
    shutil.rmtree(out, ignore_errors=True)
    started, cpu = time.perf_counter(), cpu_seconds()
    tokens = run(out)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    shutil.rmtree(out, ignore_errors=True)
    return seconds, cpu, tokens


def encoder_rate(encode: Callable[[str], Any], files: list[Path], threads: int, cut_before: str) -> float:
    """MB/s of `encode` alone on `threads` threads, over the files' text cut as prepare cuts it."""
    from embedserve.server.core.stretch_encoding import plan_stretches

    pieces = []
    total = 0
    for path in files:
        text = path.read_text(encoding="utf-8")
        total += len(text.encode())
        pieces += [text[start:end] for start, end in plan_stretches(text, cut_before, 1 << 20)]
    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        for _ in pool.map(encode, pieces):
            pass
        seconds = time.perf_counter() - started
    return total / MB / seconds


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="prepare's threads and LitData's workers")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--datasets", default="many,one", help="comma-separated: many, one")
    parser.add_argument(
        "--folder", type=Path, default=Path(tempfile.gettempdir()) / "embedserve-prepare-bench"
    )
    parser.add_argument("--no-fastokens", action="store_true", help="prepare with tiktoken: hide fastokens")
    parser.add_argument("--smoke", action="store_true", help="tiny datasets, one round: seconds")
    parser.add_argument("--json", type=Path, metavar="OUT")
    args = parser.parse_args()
    if args.no_fastokens:
        sys.modules["fastokens"] = None  # type: ignore[assignment]  # its import fails: tiktoken is chosen
    from embedserve.server.core.bpe_backends import FastokensEncoder, TiktokenEncoder, choose_encoder
    from embedserve.server.core.tokenizer import load_gpt2_tokenizer

    importlib.import_module("litdata")  # before the clock: it imports torch
    tokenizer = load_gpt2_tokenizer()
    wanted = args.datasets.split(",")
    datasets = [d for d in (SMOKE if args.smoke else FULL) if d.name in wanted]
    rounds = 1 if args.smoke else args.rounds
    work = args.folder / f"run-{os.getpid()}"
    encoders: dict[str, Callable[[str], Any]] = {"tiktoken": TiktokenEncoder(tokenizer).encode}
    fast = None if args.no_fastokens else FastokensEncoder.build(tokenizer)
    if fast is not None:
        encoders["fastokens"] = fast.encode
    report: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "threads": args.threads,
        "rounds": rounds,
        "prepare_encoder": choose_encoder(tokenizer).name,
        "litdata_start_method": "fork",
        "datasets": {},
    }
    print(f"prepare encodes with {report['prepare_encoder']}; {args.threads} threads / workers")
    try:
        for dataset in datasets:
            files = dataset_files(args.folder, dataset)
            size = sum(path.stat().st_size for path in files)
            runs: dict[str, Callable[[Path], int]] = {
                "prepare": partial(run_prepare, files, threads=args.threads, tokenizer=tokenizer),
                "litdata": partial(run_litdata, files, threads=args.threads, encoding=tokenizer.encoding),
            }
            rates: dict[str, list[float]] = {name: [] for name in runs}
            cpu: dict[str, list[float]] = {name: [] for name in runs}
            tokens: dict[str, int] = {}
            for number in range(rounds):
                order = list(runs) if number % 2 == 0 else list(reversed(runs))
                for name in order:
                    seconds, cpu_used, tokens[name] = timed(runs[name], work / name)
                    rates[name].append(size / MB / seconds)
                    cpu[name].append(cpu_used / (size / MB))
                print(
                    f"{dataset.name} round {number + 1}: "
                    + ", ".join(
                        f"{name} {rates[name][-1]:.1f} MB/s ({cpu[name][-1]:.3f} CPU s/MB)" for name in runs
                    )
                )
            # Prepare puts <|endoftext|> between documents; LitData's fn ends each file with it.
            if tokens["prepare"] != tokens["litdata"] - 1:
                raise SystemExit(f"{dataset.name}: the token counts differ: {tokens}")
            ratios = [p / q for p, q in zip(rates["prepare"], rates["litdata"], strict=True)]
            alone = {
                name: encoder_rate(encode, files, args.threads, tokenizer.cut_before)
                for name, encode in encoders.items()
            }
            figures = {
                "files": len(files),
                "bytes": size,
                "tokens": tokens["prepare"],
                "prepare_mb_s": [round(rate, 2) for rate in rates["prepare"]],
                "litdata_mb_s": [round(rate, 2) for rate in rates["litdata"]],
                "ratio": round(statistics.median(ratios), 2),
                # CPU seconds per MB: what each side spends, whatever else the machine runs.
                "prepare_cpu_s_per_mb": [round(c, 4) for c in cpu["prepare"]],
                "litdata_cpu_s_per_mb": [round(c, 4) for c in cpu["litdata"]],
                "encoders_alone_mb_s": {name: round(rate, 2) for name, rate in alone.items()},
            }
            report["datasets"][dataset.name] = figures
            print(
                f"{dataset.name}: {len(files)} files, {size / MB:.0f} MB: prepare "
                f"{statistics.median(rates['prepare']):.1f} MB/s, LitData "
                f"{statistics.median(rates['litdata']):.1f} MB/s, ratio {figures['ratio']:.2f}; encoders "
                f"alone on {args.threads} threads: "
                + ", ".join(f"{name} {rate:.1f} MB/s" for name, rate in alone.items())
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
