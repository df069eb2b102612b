"""Window orders: the DataLoader's shuffled order, computed once into a memory-mapped file for large
corpora (no per-window memory in the server process), and no storage at all unshuffled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from embedserve.client import Client, NotFoundError
from embedserve.server.config import ServerConfig
from embedserve.server.core import (
    InMemoryOrders,
    MappedOrders,
    gather_windows,
    load_gpt2_tokenizer,
    plan_windows,
    shuffled_window_order,
)
from embedserve.server.core.prepared import prepare_corpus
from embedserve.server.core.window_orders import SequentialOrder

from .conftest import start_server
from .corpus_files import prepared_tokens


def dataloader_order(num_windows: int, seed: int) -> list[int]:
    """The order DataLoader(shuffle=True) with a seeded generator reads a dataset of num_windows."""
    dataset: list[int] = list(range(num_windows))
    loader: torch.utils.data.DataLoader[int] = torch.utils.data.DataLoader(
        dataset,  # type: ignore[arg-type]  # a list is a map-style dataset to DataLoader
        batch_size=None,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    return [int(index) for index in loader]


@pytest.mark.parametrize(("num_windows", "seed"), [(1, 0), (97, 123), (10_000, 2**63 + 5)])
def test_a_mapped_order_is_the_dataloaders(tmp_path: Path, num_windows: int, seed: int) -> None:
    store = MappedOrders(tmp_path / "orders", min_windows=0)
    mapped = store.shuffled(num_windows, seed, 0)
    assert np.asarray(mapped).tolist() == dataloader_order(num_windows, seed)
    assert np.asarray(InMemoryOrders().shuffled(num_windows, seed, 0)).tolist() == dataloader_order(
        num_windows, seed
    )
    for epoch in (1, 5):  # later epochs: the in-memory order of the same epoch
        expected = shuffled_window_order(num_windows, seed, epoch)
        assert np.array_equal(np.asarray(store.shuffled(num_windows, seed, epoch)), expected)
    assert mapped[3:7].dtype == np.int64
    assert np.array_equal(mapped[3:7], np.asarray(mapped)[3:7])


def test_an_order_is_written_once_and_shared(tmp_path: Path) -> None:
    folder = tmp_path / "orders"
    first = MappedOrders(folder, min_windows=0)
    first.shuffled(5000, 7, 0)
    path = first.path_for(5000, 7, 0)
    assert path.name == "randperm-5000-0000000000000007.int32"
    assert path.stat().st_size == 5000 * 4
    written = path.stat().st_ino
    second = MappedOrders(folder, min_windows=0)  # another server process on the same folder
    assert np.array_equal(np.asarray(second.shuffled(5000, 7, 0)), shuffled_window_order(5000, 7))
    assert path.stat().st_ino == written  # read, not rewritten
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # no partial files left


def test_only_the_newest_orders_are_kept(tmp_path: Path) -> None:
    store = MappedOrders(tmp_path, min_windows=0, keep=2)
    for epoch in range(4):
        order = store.shuffled(300, 1, epoch)
        os.utime(store.path_for(300, 1, epoch), (1000 + epoch, 1000 + epoch))
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted(store.path_for(300, 1, epoch).name for epoch in (2, 3))
    assert len(np.asarray(order)) == 300  # the newest is still readable


def test_small_orders_stay_in_memory_and_unshuffled_ones_need_nothing(tmp_path: Path) -> None:
    store = MappedOrders(tmp_path / "orders", min_windows=1000)
    assert np.array_equal(np.asarray(store.shuffled(999, 3, 0)), shuffled_window_order(999, 3))
    assert not (tmp_path / "orders").exists()
    plan = plan_windows(
        num_tokens=10**12, max_length=4, stride=1, batch_size=8, shuffle=False, seed=0, drop_last=True
    )
    assert isinstance(plan.order, SequentialOrder)
    assert plan.num_windows == 10**12 - 4
    last = (10**12 - 4) // 8 - 1  # drop_last: the tail of 4 windows is not read
    assert plan.batch_starts(plan.num_batches - 1).tolist() == list(range(8 * last, 8 * last + 8))


# Plans a shuffled epoch over a synthetic corpus of NUM_TOKENS stride-1 windows, reads its first
# and last batches, and prints how much anonymous memory (not file pages) that took.
_MEASURE = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    from embedserve.server.core import InMemoryOrders, MappedOrders, gather_windows, plan_windows

    def anonymous_mib():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024

    folder, kind, num_tokens = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    tokens = np.memmap(folder / "corpus.tokens", dtype=np.uint16, mode="r")
    orders = MappedOrders(folder / "orders") if kind == "mapped" else InMemoryOrders()
    before = anonymous_mib()
    plan = plan_windows(num_tokens=num_tokens, max_length=64, stride=1, batch_size=8, shuffle=True,
                        seed=11, drop_last=True, orders=orders)
    first = gather_windows(tokens, plan.batch_starts(0), 64)[0]
    last = gather_windows(tokens, plan.batch_starts(plan.num_batches - 1), 64)[0]
    print(json.dumps({"windows": plan.num_windows, "anonymous_mib": anonymous_mib() - before,
                      "first": first[:, 0].tolist(), "last": last[:, 0].tolist()}))
    """
)
NUM_TOKENS = 24_000_000


@pytest.mark.slow
def test_a_large_shuffled_plan_holds_no_per_window_memory(tmp_path: Path) -> None:
    """24M windows: in memory the order is 4 bytes a window; mapped, the process holds none of it."""
    rng = np.random.default_rng(0)
    rng.integers(0, 50257, NUM_TOKENS, dtype=np.uint16).tofile(tmp_path / "corpus.tokens")

    def measure(kind: str) -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(tmp_path), kind, str(NUM_TOKENS)],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        result: dict[str, object] = json.loads(done.stdout)
        return result

    in_memory, mapped = measure("in-memory"), measure("mapped")
    print(f"anonymous memory for {NUM_TOKENS - 64} windows: in memory {in_memory['anonymous_mib']:.1f} MiB, "
          f"mapped {mapped['anonymous_mib']:.1f} MiB")  # fmt: skip
    windows = NUM_TOKENS - 64
    assert in_memory["windows"] == mapped["windows"] == windows
    assert (mapped["first"], mapped["last"]) == (in_memory["first"], in_memory["last"])  # the same order
    assert float(in_memory["anonymous_mib"]) > 0.9 * windows * 4 / 2**20  # type: ignore[arg-type]
    assert float(mapped["anonymous_mib"]) < 16  # type: ignore[arg-type]
    # Once written, the next process maps it: the same figure, nothing recomputed.
    again = measure("mapped")
    assert again["first"] == mapped["first"]
    assert float(again["anonymous_mib"]) < 16  # type: ignore[arg-type]


@pytest.mark.slow
def test_the_server_maps_a_large_corpuss_order_beside_it(tmp_path: Path) -> None:
    tokenizer = load_gpt2_tokenizer(None, {})
    data_dir = tmp_path / "data"
    text = tmp_path / "words.txt"
    words = [f"w{i % 997}" for i in range(600_000)]  # "w123" is 2 tokens: about 1.2M windows
    text.write_text(" ".join(words))
    manifest = prepare_corpus([text], "words", data_dir, tokenizer)
    running = start_server(
        ServerConfig(port=0, device="cpu", word_vectors="none", data_dir=str(data_dir), dim=8)
    )
    try:
        with Client(running.target, timeout=120) as client:
            batches = client.stream_batches(
                corpus="words", batch_size=4, max_length=8, stride=1, shuffle=True, seed=5, drop_last=True
            )
            first = next(iter(batches))
            order_file = next((data_dir / ".window-orders").iterdir()).name
            with pytest.raises(NotFoundError):  # the server's own files are not corpora
                next(
                    iter(
                        client.stream_batches(
                            corpus=f".window-orders/{order_file}", batch_size=1, max_length=2
                        )
                    )
                )
    finally:
        running.stop()
    orders = sorted((data_dir / ".window-orders").iterdir())
    num_windows = manifest.token_count - 8
    assert [p.name for p in orders] == [
        MappedOrders(data_dir / ".window-orders").path_for(num_windows, 5, 0).name
    ]
    tokens = prepared_tokens(data_dir, "words")
    expected = shuffled_window_order(num_windows, 5)[:4]
    inputs, targets = gather_windows(tokens, expected, 8)
    assert first.inputs.tolist() == inputs.tolist()
    assert first.targets.tolist() == targets.tolist()
