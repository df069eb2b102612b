"""Window plans over a large prepared-style corpus: time to plan an epoch, to read its batches, and
the anonymous memory that took (RssAnon: what the process holds, not the file pages it maps).

    .venv/bin/python bench/window_plans.py --tokens 50000000           # shuffled, stride 1
    .venv/bin/python bench/window_plans.py --tokens 50000000 --no-shuffle

It imports whichever embedserve is first on the path, so an older checkout staged on PYTHONPATH
measures the code before a change; alternate the two in one session (see bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from embedserve.server import core


def anonymous_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=50_000_000, help="corpus size in tokens")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20_000, help="batches read (from the epoch's start)")
    parser.add_argument("--no-shuffle", action="store_true")
    parser.add_argument(
        "--folder", type=Path, default=Path(tempfile.gettempdir()) / "embedserve-window-plans"
    )
    args = parser.parse_args()

    args.folder.mkdir(parents=True, exist_ok=True)
    corpus = args.folder / f"corpus-{args.tokens}.tokens"
    if not corpus.exists():
        np.random.default_rng(0).integers(0, 50257, args.tokens, dtype=np.uint16).tofile(corpus)
    tokens = np.memmap(corpus, dtype=np.uint16, mode="r")
    settings = {
        "num_tokens": len(tokens),
        "max_length": args.max_length,
        "stride": args.stride,
        "batch_size": args.batch_size,
        "shuffle": not args.no_shuffle,
        "seed": 3,
        "drop_last": True,
    }
    mapped = "orders" in inspect.signature(core.plan_windows).parameters
    orders = args.folder / f"orders-{time.monotonic_ns()}"
    if mapped:  # the code with memory-mapped orders: a fresh folder, so the order is computed here
        settings["orders"] = core.MappedOrders(orders)
    before = anonymous_mib()
    started = time.perf_counter()
    plan = core.plan_windows(**settings)
    planned = time.perf_counter() - started
    started = time.perf_counter()
    count = min(args.batches, plan.num_batches)
    for index in range(count):
        core.gather_windows(tokens, plan.batch_starts(index), args.max_length)
    read = time.perf_counter() - started
    shutil.rmtree(orders, ignore_errors=True)
    print(
        json.dumps(
            {
                "code": "mapped orders" if mapped else "in-memory orders",
                "windows": plan.num_windows,
                "plan_s": round(planned, 3),
                "batches_per_s": round(count / read),
                "anonymous_mib": round(anonymous_mib() - before, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
