"""Request limits (core, no gRPC): each check names its flag, its value and what was asked for."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from embedserve.server import ServerConfig
from embedserve.server.core import LimitExceeded
from embedserve.server.core.limits import REPLY_OVERHEAD_BYTES, RequestLimits, check_count

LIMITS = RequestLimits(
    max_message_bytes=10_000,
    max_tokens_per_request=100,
    max_texts_per_request=3,
    max_batch_size=8,
    max_queries_per_request=4,
    max_terms_per_request=6,
    max_results_per_request=50,
)


def test_the_limits_are_the_configs() -> None:
    config = ServerConfig(max_texts_per_request=7, max_results_per_request=9)
    limits = RequestLimits.of(config)
    assert (limits.max_texts_per_request, limits.max_results_per_request) == (7, 9)
    assert limits.max_message_bytes == config.max_message_bytes


@pytest.mark.parametrize(
    ("check", "count", "message", "limit"),
    [
        (LIMITS.check_texts, 4, "4 texts are over the server's --max-texts-per-request 3",
         "max_texts_per_request"),
        (LIMITS.check_tokens, 101, "101 token IDs are over the server's --max-tokens-per-request 100",
         "max_tokens_per_request"),
        (LIMITS.check_terms, 7, "7 terms are over the server's --max-terms-per-request 6",
         "max_terms_per_request"),
    ],
)  # fmt: skip
def test_counts_over_a_limit_are_refused_with_its_name(
    check: Callable[[int], None], count: int, message: str, limit: str
) -> None:
    check(count - 1)  # at the limit: fine
    with pytest.raises(LimitExceeded) as raised:
        check(count)
    assert str(raised.value) == message
    assert (raised.value.limit, raised.value.requested) == (limit, count)
    assert raised.value.flag == "--" + limit.replace("_", "-")


def test_queries_are_named_as_the_request_names_them() -> None:
    LIMITS.check_queries(4, "pairs")
    with pytest.raises(LimitExceeded) as raised:
        LIMITS.check_queries(5, "pairs")
    assert str(raised.value) == "5 pairs are over the server's --max-queries-per-request 4"
    with pytest.raises(LimitExceeded) as raised:
        check_count(2, "widgets", limit="max_widgets", allowed=1)
    assert (str(raised.value), raised.value.allowed) == ("2 widgets are over the server's --max-widgets 1", 1)


def test_a_reply_must_fit_a_message_with_room_for_its_other_fields() -> None:
    LIMITS.check_reply_bytes(10_000 - REPLY_OVERHEAD_BYTES, "the reply")
    with pytest.raises(LimitExceeded) as raised:
        LIMITS.check_reply_bytes(10_000 - REPLY_OVERHEAD_BYTES + 1, "the reply")
    assert str(raised.value) == "the reply would be 5905 bytes, over the server's --max-message-bytes 10000"
    assert (raised.value.limit, raised.value.allowed) == ("max_message_bytes", 10_000)
    assert raised.value.requested == 5905


def test_ranked_results_count_each_querys_topn_capped_by_what_it_may_rank() -> None:
    LIMITS.check_results(np.array([20, 20, 100]), np.array([0, 0, 10]), vocab_size=1000)  # 20 + 20 + 10
    with pytest.raises(LimitExceeded, match="up to 51 ranked results") as raised:
        LIMITS.check_results(np.array([20, 20, 100]), np.array([0, 0, 11]), vocab_size=1000)
    assert (raised.value.limit, raised.value.requested) == ("max_results_per_request", 51)
