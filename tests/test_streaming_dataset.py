"""StreamingDataset: a DataLoader over StreamBatches, checkpointable, split across workers."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from embedserve.client.torch import StreamingDataset
from torch.utils.data import DataLoader

from .conftest import ServerThread

TEXT = " ".join(f"token{i % 53} x {i}" for i in range(2500))
SHORT_TEXT = " ".join(f"token{i % 53} x {i}" for i in range(300))  # about 180 batches of 2


def _dataset(target: str, drop_last: bool = True) -> StreamingDataset:
    return StreamingDataset(
        target, text=TEXT, batch_size=2, max_length=8, stride=4, seed=1, epochs=2, drop_last=drop_last
    )


def _windows(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for inputs, _ in batches for row in inputs]


def test_checkpoint_and_resume_gives_the_same_batches(tiny_server: ServerThread) -> None:
    full = list(DataLoader(_dataset(tiny_server.target), batch_size=None))
    dataset = _dataset(tiny_server.target)
    first: list[tuple[torch.Tensor, torch.Tensor]] = []
    for batch in DataLoader(dataset, batch_size=None):
        first.append(batch)
        if len(first) == 7:
            break
    checkpoint = dataset.state_dict()
    restored = _dataset(tiny_server.target)
    restored.load_state_dict(checkpoint)
    rest = list(DataLoader(restored, batch_size=None))
    assert len(first) + len(rest) == len(full)
    for (a, b), (want_a, want_b) in zip(first + rest, full, strict=True):
        assert torch.equal(a, want_a)
        assert torch.equal(b, want_b)
        assert a.dtype == torch.int64


@pytest.mark.slow  # each spawned worker imports torch
def test_workers_split_a_rank_and_still_read_everything_once(tiny_server: ServerThread) -> None:
    alone = _windows(
        list(DataLoader(_one_epoch(tiny_server.target, drop_last=False, epochs=2), batch_size=None))
    )
    loader = DataLoader(
        _one_epoch(tiny_server.target, drop_last=False, epochs=2),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="spawn",  # workers must not inherit this process's gRPC state
    )
    split = _windows(list(loader))
    assert sorted(split) == sorted(alone)
    assert len(split) == len(alone)


def _one_epoch(target: str, **settings: Any) -> StreamingDataset:
    return StreamingDataset(target, text=SHORT_TEXT, batch_size=2, max_length=8, stride=4, seed=1, **settings)


def test_each_pass_starts_over_and_set_epoch_moves_on(tiny_server: ServerThread) -> None:
    """At num_workers=0 as with workers (tests/test_training_loaders.py): a pass per iteration."""
    dataset = _one_epoch(tiny_server.target)
    loader = DataLoader(dataset, batch_size=None)
    first = _windows(list(loader))
    assert _windows(list(loader)) == first
    dataset.set_epoch(1)
    epoch_1 = _windows(list(loader))
    assert sorted(epoch_1) == sorted(first)
    assert epoch_1 != first


def test_a_loaded_state_serves_the_next_pass_only(tiny_server: ServerThread) -> None:
    full = _windows(list(DataLoader(_one_epoch(tiny_server.target), batch_size=None)))
    dataset = _one_epoch(tiny_server.target)
    first = _windows(list(itertools.islice(DataLoader(dataset, batch_size=None), 5)))
    restored = _one_epoch(tiny_server.target)
    restored.load_state_dict(dataset.state_dict())
    assert restored.state_dict() == dataset.state_dict()  # before the pass, as loaded
    loader = DataLoader(restored, batch_size=None)
    assert first + _windows(list(loader)) == full
    assert _windows(list(loader)) == full  # the pass after starts over


def test_a_state_saved_at_a_pass_end_continues_in_the_next_epoch(tiny_server: ServerThread) -> None:
    dataset = _one_epoch(tiny_server.target)
    list(DataLoader(dataset, batch_size=None))
    state = dataset.state_dict()
    dataset.set_epoch(1)
    epoch_1 = _windows(list(DataLoader(dataset, batch_size=None)))
    same_epoch = _one_epoch(tiny_server.target)
    same_epoch.load_state_dict(state)
    assert list(DataLoader(same_epoch, batch_size=None)) == []  # epoch 0 has nothing left
    next_epoch = _one_epoch(tiny_server.target)
    next_epoch.load_state_dict(state)
    next_epoch.set_epoch(1)
    assert _windows(list(DataLoader(next_epoch, batch_size=None))) == epoch_1


def test_a_state_loads_only_into_the_split_that_saved_it() -> None:
    """A state of worker 1 of 2 (or of another rank) says so instead of restarting from scratch."""
    dataset = _one_epoch("127.0.0.1:1")  # refused before any connection
    dataset.load_state_dict({"cursors": {1: b"cursor"}, "shards": 2})
    with pytest.raises(ValueError, match=r"into 2 sub-shards.*into 1 \(world_size=1, num_workers=0 or 1\)"):
        iter(dataset)
    other_rank = _one_epoch("127.0.0.1:1", rank=1, world_size=2)
    other_rank.load_state_dict({"cursors": {0: b"cursor"}, "shards": 2})
    with pytest.raises(ValueError, match=r"sub-shards \[0\], not of this reader's sub-shard 1"):
        iter(other_rank)
