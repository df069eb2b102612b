"""StreamingDataset: a DataLoader over StreamBatches, checkpointable, split across workers."""

from __future__ import annotations

import torch
from embedserve.client.torch import StreamingDataset
from torch.utils.data import DataLoader

from .conftest import ServerThread

TEXT = " ".join(f"token{i % 53} x {i}" for i in range(2500))


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


def test_workers_split_a_rank_and_still_read_everything_once(tiny_server: ServerThread) -> None:
    alone = _windows(list(DataLoader(_dataset(tiny_server.target, drop_last=False), batch_size=None)))
    loader = DataLoader(
        _dataset(tiny_server.target, drop_last=False),
        batch_size=None,
        num_workers=2,
        multiprocessing_context="spawn",  # workers must not inherit this process's gRPC state
    )
    split = _windows(list(loader))
    assert sorted(split) == sorted(alone)
    assert len(split) == len(alone)
