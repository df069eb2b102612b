"""Window plans equal the notebook's GPTDatasetV1 + DataLoader, shuffle included."""

from __future__ import annotations

import numpy as np
import pytest
import tiktoken
import torch
from embedserve.server.core import InvalidInput, LimitExceeded, count_windows, gather_windows, plan_windows

from .notebook_reference import GPTDatasetV1, create_dataloader_v1

FIRST_BATCH = [
    [40, 367, 2885, 1464],
    [1807, 3619, 402, 271],
    [10899, 2138, 257, 7026],
    [15632, 438, 2016, 257],
    [922, 5891, 1576, 438],
    [568, 340, 373, 645],
    [1049, 5975, 284, 502],
    [284, 3285, 326, 11],
]


def _all_batches(tokens: np.ndarray, **settings: int | bool) -> list[tuple[np.ndarray, np.ndarray]]:
    plan = plan_windows(num_tokens=len(tokens), **settings)  # type: ignore[arg-type]
    return [gather_windows(tokens, plan.batch_starts(i), plan.max_length) for i in range(plan.num_batches)]


def test_first_batch_of_the_verdict(reference_encoding: tiktoken.Encoding, verdict_text: str) -> None:
    tokens = np.asarray(reference_encoding.encode(verdict_text), dtype=np.int32)
    batches = _all_batches(
        tokens, max_length=4, stride=4, batch_size=8, shuffle=False, seed=0, drop_last=True
    )
    inputs, targets = batches[0]
    assert inputs.tolist() == FIRST_BATCH
    assert targets.tolist() == [
        [*row[1:], nxt]
        for row, nxt in zip(FIRST_BATCH, [1807, 10899, 15632, 922, 568, 1049, 284, 287], strict=True)
    ]
    assert len(batches) == 161


@pytest.mark.parametrize(
    ("max_length", "stride"), [(4, 4), (4, 1), (256, 128), (2, 5), (1024, 1), (5153, 1), (100, 7)]
)
def test_window_count_equals_gptdatasetv1(
    reference_encoding: tiktoken.Encoding, verdict_text: str, max_length: int, stride: int
) -> None:
    dataset = GPTDatasetV1(verdict_text, reference_encoding, max_length, stride)
    assert count_windows(5154, max_length, stride) == len(dataset)


@pytest.mark.parametrize(
    ("batch_size", "max_length", "stride", "shuffle", "seed", "drop_last"),
    [
        (8, 4, 4, False, 0, True),
        (8, 4, 4, True, 123, True),
        (4, 256, 128, True, 0, True),
        (3, 16, 5, True, 7, False),
        (5, 32, 32, False, 0, False),
        (2, 64, 3, True, 2**63 + 11, False),
    ],
)
def test_batches_equal_the_notebook_dataloader(
    reference_encoding: tiktoken.Encoding,
    verdict_text: str,
    batch_size: int,
    max_length: int,
    stride: int,
    shuffle: bool,
    seed: int,
    drop_last: bool,
) -> None:
    text = verdict_text[:6000]
    loader = create_dataloader_v1(
        text,
        reference_encoding,
        batch_size=batch_size,
        max_length=max_length,
        stride=stride,
        shuffle=shuffle,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )
    expected = [(x.numpy(), y.numpy()) for x, y in loader]
    tokens = np.asarray(reference_encoding.encode(text, allowed_special={"<|endoftext|>"}), dtype=np.int32)
    got = _all_batches(
        tokens,
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
    )
    assert len(got) == len(expected)
    for (x, y), (ex, ey) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(x, ex)
        np.testing.assert_array_equal(y, ey)


def test_drop_last_counts_like_the_dataloader() -> None:
    kwargs = {"num_tokens": 1000, "max_length": 10, "stride": 10, "shuffle": False, "seed": 0}
    assert plan_windows(batch_size=7, drop_last=True, **kwargs).num_batches == 99 // 7  # type: ignore[arg-type]
    plan = plan_windows(batch_size=7, drop_last=False, **kwargs)  # type: ignore[arg-type]
    assert plan.num_batches == 15
    assert len(plan.batch_starts(14)) == 99 - 14 * 7


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        ({"batch_size": 0}, InvalidInput, "batch_size must be positive"),
        ({"max_length": -1}, InvalidInput, "max_length must be positive"),
        ({"stride": 0}, InvalidInput, "stride must be positive"),
        ({"max_length": 100}, InvalidInput, "needs at least 101"),
        ({"batch_size": 50}, InvalidInput, "make no full batch"),
        ({"batch_size": 5000}, LimitExceeded, "--max-batch-size 4096"),
        ({"seed": -1}, InvalidInput, "seed"),
    ],
)
def test_bad_settings(settings: dict[str, int], error: type[Exception], message: str) -> None:
    base = {"num_tokens": 100, "max_length": 4, "stride": 4, "batch_size": 2, "seed": 0}
    with pytest.raises(error, match=message):
        plan_windows(**{**base, **settings}, shuffle=True, drop_last=True, max_batch_size=4096)  # type: ignore[arg-type]
