"""Stream planning (core, no gRPC): a request's settings, cursor and limits become a checked plan
that names the stream's batches, sizes its replies and resumes exactly where a cursor says."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
from embedserve.server.core import (
    InvalidInput,
    LimitExceeded,
    PreconditionFailed,
    WindowPlan,
    gather_windows,
    iterate_batches,
    plan_windows,
)
from embedserve.server.core.corpus_tokens import ArrayTokens
from embedserve.server.core.cursor import Position
from embedserve.server.core.limits import REPLY_OVERHEAD_BYTES, RequestLimits
from embedserve.server.core.stream_plan import (
    MAX_BATCHES_PER_MESSAGE,
    StreamPlan,
    StreamRequest,
    StreamSource,
    plan_stream,
)

TOKENS = (np.arange(1000, dtype=np.int32) * 7) % 500
SOURCE = StreamSource(ArrayTokens(TOKENS, "sha-of-the-tokens"), "gpt2", 50257)
LIMITS = RequestLimits(
    max_message_bytes=1 << 20,
    max_tokens_per_request=1 << 20,
    max_texts_per_request=10,
    max_batch_size=64,
    max_queries_per_request=10,
    max_terms_per_request=10,
    max_results_per_request=10,
)
REQUEST = StreamRequest(max_length=8, stride=4, batch_size=4, shuffle=True, seed=3)


@dataclass(frozen=True)
class Tables:
    vocab_size: int = 500
    dim: int = 16
    context_length: int = 32


def _plan(request: StreamRequest = REQUEST, source: StreamSource = SOURCE, **limits: int) -> StreamPlan:
    return plan_stream(
        request, source, limits=replace(LIMITS, **limits), model=Tables(), embeddings_itemsize=4
    )


def _indices(plan: StreamPlan) -> list[tuple[int, int]]:
    return [(batch.epoch, batch.index) for batch in plan.batches()]


def test_the_plan_is_the_window_plan_of_each_epoch() -> None:
    plan = _plan(replace(REQUEST, epoch=2, epochs=2))
    assert (plan.start, plan.last_epoch) == (Position(2, 0), 3)

    def direct(epoch: int) -> WindowPlan:
        return plan_windows(
            num_tokens=len(TOKENS), max_length=8, stride=4, batch_size=4, shuffle=True, seed=3,
            drop_last=False, epoch=epoch,
        )  # fmt: skip

    expected = list(iterate_batches(direct, epoch=2, index=0, last_epoch=3))
    got = list(plan.batches())
    assert [(b.epoch, b.index, b.next_epoch, b.next_index) for b in got] == [
        (b.epoch, b.index, b.next_epoch, b.next_index) for b in expected
    ]
    for mine, theirs in zip(got, expected, strict=True):
        np.testing.assert_array_equal(mine.starts, theirs.starts)
        inputs, targets = plan.windows(mine)
        want_inputs, want_targets = gather_windows(TOKENS, theirs.starts, 8)
        np.testing.assert_array_equal(inputs, want_inputs)
        np.testing.assert_array_equal(targets, want_targets)


def test_unset_fields_mean_one_rank_one_epoch_one_batch_per_message() -> None:
    plan = _plan(StreamRequest(max_length=8, stride=8, batch_size=2))
    settings = plan.settings
    assert (settings.rank, settings.world_size, settings.shuffle, settings.seed) == (0, 1, False, 0)
    assert (settings.source_sha256, settings.tokenizer) == ("sha-of-the-tokens", "gpt2")
    assert (plan.start, plan.last_epoch, plan.batches_per_message) == (Position(0, 0), 0, 1)
    sharded = _plan(replace(REQUEST, rank=1, world_size=3))
    assert (sharded.settings.rank, sharded.settings.world_size) == (1, 3)


def test_a_cursor_resumes_right_after_its_batch() -> None:
    request = replace(REQUEST, epochs=2)
    whole = _plan(request)
    batches = list(whole.batches())
    for cut in (0, 5, len(batches) // 2 - 1, len(batches) // 2, len(batches) - 1):
        resumed = _plan(replace(request, cursor=whole.cursor_after(batches[cut])))
        assert _indices(resumed) == [(b.epoch, b.index) for b in batches[cut + 1 :]]


def test_a_cursor_of_another_stream_or_an_earlier_epoch_is_refused() -> None:
    batch = next(_plan().batches())
    cursor = _plan().cursor_after(batch)
    with pytest.raises(PreconditionFailed, match=r"another stream: seed \(cursor 3, request 4\)"):
        _plan(replace(REQUEST, seed=4, cursor=cursor))
    with pytest.raises(PreconditionFailed, match="source has changed since the cursor was made"):
        _plan(replace(REQUEST, cursor=cursor), replace(SOURCE, tokens=ArrayTokens(TOKENS, "other")))
    with pytest.raises(PreconditionFailed, match="cannot be read"):
        _plan(replace(REQUEST, cursor=b"garbage"))
    with pytest.raises(PreconditionFailed, match="before this request's first epoch 1"):
        _plan(replace(REQUEST, epoch=1, cursor=cursor))


def test_reply_sizing_packs_as_many_batches_as_the_message_holds() -> None:
    plan = _plan(replace(REQUEST, batches_per_message=10))
    assert plan.batch_bytes == 2 * 4 * 4 * 8 + 1024
    assert plan.batches_per_message == 10
    assert _plan(replace(REQUEST, batches_per_message=10_000)).batches_per_message == MAX_BATCHES_PER_MESSAGE
    capped = _plan(replace(REQUEST, batches_per_message=10), max_message_bytes=3 * plan.batch_bytes + 10_000)
    assert capped.batches_per_message == 3 + 10_000 // plan.batch_bytes
    with_embeddings = _plan(replace(REQUEST, include_embeddings=True))
    assert with_embeddings.batch_bytes == plan.batch_bytes + 4 * 8 * 16 * 4
    assert with_embeddings.include_embeddings


def test_limits_name_themselves() -> None:
    with pytest.raises(LimitExceeded, match="over the server's --max-batch-size 2") as raised:
        _plan(max_batch_size=2)
    assert (raised.value.limit, raised.value.allowed, raised.value.requested) == ("max_batch_size", 2, 4)
    nbytes = 2 * 4 * 4 * 8 + 1024
    with pytest.raises(LimitExceeded, match=r"a batch of 4 x 8 would be \d+ bytes") as raised:
        _plan(max_message_bytes=nbytes + REPLY_OVERHEAD_BYTES - 1)
    assert (raised.value.limit, raised.value.requested) == ("max_message_bytes", nbytes)
    assert _plan(max_message_bytes=nbytes + REPLY_OVERHEAD_BYTES).batches_per_message == 1


def test_embeddings_need_positions_and_rows_for_every_window() -> None:
    with pytest.raises(InvalidInput, match="max_length 40 exceeds the context length 32"):
        _plan(replace(REQUEST, max_length=40, include_embeddings=True))
    past_the_table = replace(SOURCE, tokens=ArrayTokens(np.append(TOKENS, 500).astype(np.int32), "sha"))
    with pytest.raises(
        InvalidInput, match=r"token id 500, outside the embedding model's vocabulary \[0, 500\)"
    ):
        _plan(replace(REQUEST, include_embeddings=True), past_the_table)
    assert _plan(REQUEST, past_the_table).batch_bytes > 0  # without embeddings any IDs stream


def test_a_mapped_corpus_of_a_covered_tokenizer_is_not_scanned(tmp_path: Path) -> None:
    """A prepared corpus holds only its tokenizer's IDs: when the model covers that tokenizer, the
    mapped file is trusted, not read through for its largest ID."""
    path = tmp_path / "corpus.tokens"
    np.append(TOKENS, 499).astype("<u2").tofile(path)
    mapped = np.memmap(path, dtype="<u2", mode="r")
    covered = StreamSource(ArrayTokens(mapped, "sha", ids_checked=True), "small", 500)
    assert _plan(replace(REQUEST, include_embeddings=True), covered).include_embeddings
    np.append(TOKENS, 900).astype("<u2").tofile(path)
    uncovered = StreamSource(
        ArrayTokens(np.memmap(path, dtype="<u2", mode="r"), "sha", ids_checked=True), "gpt2", 50257
    )
    with pytest.raises(InvalidInput, match="token id 900"):
        _plan(replace(REQUEST, include_embeddings=True), uncovered)


def test_settings_are_checked_before_the_cursor() -> None:
    """Errors come in a fixed order: the window settings, then the cursor, then the reply's size."""
    with pytest.raises(InvalidInput, match="batch_size must be positive"):
        _plan(replace(REQUEST, batch_size=0, cursor=b"garbage"))
    with pytest.raises(PreconditionFailed):
        _plan(replace(REQUEST, cursor=b"garbage"), max_message_bytes=1)
