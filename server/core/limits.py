"""The server's per-request limits (the --max-* flags), checked in one place.

Each check raises LimitExceeded naming the limit, its value and what the request asked for, so
the message a user reads and the detail a client acts on come from the same values.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import numpy.typing as npt

from .errors import LimitExceeded

# Room for a reply's fields besides its tensors' bytes.
REPLY_OVERHEAD_BYTES = 4096


def _flag(limit: str) -> str:
    return "--" + limit.replace("_", "-")


def check_count(count: int, what: str, *, limit: str, allowed: int) -> None:
    """LimitExceeded when `count` `what` (e.g. 5000 "texts") are more than the limit allows."""
    if count > allowed:
        raise LimitExceeded(
            f"{count} {what} are over the server's {_flag(limit)} {allowed}",
            limit=limit,
            allowed=allowed,
            requested=count,
        )


def result_bound(topn: npt.ArrayLike, restrict_vocab: npt.ArrayLike, vocab_size: int) -> int:
    """The most ranked results these queries can return: each one's topn, capped by the rows it
    may rank (restrict_vocab where given, i.e. > 0, and the vocabulary). Values prepare() will
    refuse (negative ones, a restrict_vocab per query that does not match) count as nothing."""
    topn = np.asarray(topn, np.int64)
    restrict = np.asarray(restrict_vocab, np.int64)
    if restrict.shape != topn.shape:
        restrict = np.zeros_like(topn)
    rows = np.where(restrict > 0, np.minimum(restrict, vocab_size), vocab_size)
    return int(np.clip(np.minimum(topn, rows), 0, None).sum())


@dataclass(frozen=True)
class RequestLimits:
    """The limits one request is held to; the servicers take them from the server's config."""

    max_message_bytes: int
    max_tokens_per_request: int
    max_texts_per_request: int
    max_batch_size: int
    max_queries_per_request: int
    max_terms_per_request: int
    max_results_per_request: int

    @classmethod
    def of(cls, settings: object) -> RequestLimits:
        """The limits `settings` (the server's config) holds under these fields' names."""
        return cls(**{field.name: getattr(settings, field.name) for field in fields(cls)})

    def check_texts(self, count: int) -> None:
        check_count(count, "texts", limit="max_texts_per_request", allowed=self.max_texts_per_request)

    def check_tokens(self, count: int) -> None:
        check_count(count, "token IDs", limit="max_tokens_per_request", allowed=self.max_tokens_per_request)

    def check_queries(self, count: int, what: str) -> None:
        """`what`: the request's items as the message names them (queries, pairs, words)."""
        check_count(count, what, limit="max_queries_per_request", allowed=self.max_queries_per_request)

    def check_terms(self, count: int) -> None:
        check_count(count, "terms", limit="max_terms_per_request", allowed=self.max_terms_per_request)

    def check_results(self, topn: npt.ArrayLike, restrict_vocab: npt.ArrayLike, vocab_size: int) -> None:
        """MostSimilar's queries may rank up to result_bound(...) results in all."""
        results = result_bound(topn, restrict_vocab, vocab_size)
        if results > self.max_results_per_request:
            raise LimitExceeded(
                f"up to {results} ranked results (the queries' topn, capped by the vocabulary each "
                f"may rank) are over the server's --max-results-per-request "
                f"{self.max_results_per_request}; ask for fewer queries or a smaller topn",
                limit="max_results_per_request",
                allowed=self.max_results_per_request,
                requested=results,
            )

    def check_reply_bytes(self, nbytes: int, what: str) -> None:
        """`what` (e.g. "the 300 token IDs") would be a reply of about `nbytes` bytes."""
        if nbytes + REPLY_OVERHEAD_BYTES > self.max_message_bytes:
            raise LimitExceeded(
                f"{what} would be {nbytes} bytes, "
                f"over the server's --max-message-bytes {self.max_message_bytes}",
                limit="max_message_bytes",
                allowed=self.max_message_bytes,
                requested=nbytes,
            )
