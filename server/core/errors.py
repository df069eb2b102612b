"""Domain errors raised by the core; the transport maps each to one status code."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence


class EmbedServeCoreError(Exception):
    """Base of every error the core raises on purpose."""


class InvalidInput(EmbedServeCoreError):
    """The request is malformed or out of range; retrying it cannot succeed."""


class LimitExceeded(InvalidInput):
    """The request is larger than a configured limit.

    limit is the ServerConfig field (its flag is --limit-with-dashes); allowed its value and
    requested what the request asked for, when known. The transport sends them as structured
    detail, so a client can split its request without reading the message.
    """

    def __init__(self, message: str, *, limit: str, allowed: int, requested: int | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.allowed = allowed
        self.requested = requested

    @property
    def flag(self) -> str:
        return "--" + self.limit.replace("_", "-")


class NotFound(EmbedServeCoreError):
    """A named thing (a corpus file, a word) does not exist."""


class NotInVocabulary(NotFound):
    """Words a request names that the model does not have; `words` lists every one, in order.
    The transport sends them as structured detail, so a client need not parse the message."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = list(words)
        # JSON's quoting: the same for every word, whatever quotes the word itself holds.
        quoted = ", ".join(json.dumps(word, ensure_ascii=False) for word in self.words)
        super().__init__(f"not in the vocabulary: {quoted}")


class Overloaded(EmbedServeCoreError):
    """The server is too busy right now; retrying later can succeed.

    `reason` names what is full (QUEUE_FULL, MEMORY_BUDGET), `retry_after` is about how many
    seconds to wait before retrying, and `metadata` adds figures a client may read. The transport
    sends them as structured detail and as gRPC's retry pushback, which the clients honour.
    """

    def __init__(
        self,
        message: str,
        *,
        reason: str = "OVERLOADED",
        retry_after: float | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after
        self.metadata = dict(metadata or {})


class NotReady(EmbedServeCoreError):
    """The component is still loading or already shutting down."""


class Cancelled(NotReady):
    """Work stopped part-way: the server is shutting down, or the call it was for has ended."""


class Unavailable(EmbedServeCoreError):
    """Something the server depends on (an object store) cannot be reached now; retrying can succeed."""


class CorruptData(EmbedServeCoreError):
    """Stored data does not match its recorded digest or size: it is never served."""


class NotPermitted(EmbedServeCoreError):
    """The caller may not do this, whatever it sends (e.g. shared memory from another host)."""


class PreconditionFailed(EmbedServeCoreError):
    """The request conflicts with state it refers to (a stream cursor made under other settings).

    `reason`, when set, names the conflict for programs (SOURCE_CHANGED: the cursor's corpus has
    changed since, e.g. appended to); the transport sends it, with `metadata`, as an ErrorInfo.
    """

    def __init__(self, message: str, *, reason: str | None = None, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.reason = reason
        self.metadata = dict(metadata or {})


class StartupError(EmbedServeCoreError):
    """The configuration cannot be served (bad weights, bad vocabulary files...)."""
