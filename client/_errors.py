"""Every failed call raises an EmbedServeError subclass that keeps its grpc.StatusCode."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import grpc
from embedserve.status_details import (
    LimitInfo,
    limit_from_trailers,
    missing_words_from_trailers,
    reason_from_trailers,
    retry_delay_from_trailers,
)

_T = TypeVar("_T")
# Attempts of one call that was dropped on its way, or refused by an overloaded server.
RETRY_ATTEMPTS = 5


class EmbedServeError(Exception):
    """A call to the server failed; `.code` is the grpc.StatusCode, `.details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgumentError(EmbedServeError):
    """The request is malformed or over a limit; retrying it will fail again."""


class LimitExceededError(InvalidArgumentError):
    """The request is over one of the server's limits; `.limit` says which (from the status
    details, not the message): its name, flag, value and what was asked for."""

    def __init__(self, code: grpc.StatusCode, details: str, limit: LimitInfo) -> None:
        super().__init__(code, details)
        self.limit = limit


class NotFoundError(EmbedServeError):
    """A named corpus (or word) does not exist on the server. For words, `.missing_words` lists
    every one the request named that the model lacks (from the status details, not the message)."""

    def __init__(self, code: grpc.StatusCode, details: str, missing_words: Sequence[str] = ()) -> None:
        super().__init__(code, details)
        self.missing_words = list(missing_words)


class ResourceExhaustedError(EmbedServeError):
    """The server is overloaded or a message exceeded a size limit. `.retry_after` is the delay in
    seconds the server asked for (from the status details) when retrying can help, else None;
    the clients have already retried such refusals until their timeout."""

    def __init__(self, code: grpc.StatusCode, details: str, retry_after: float | None = None) -> None:
        super().__init__(code, details)
        self.retry_after = retry_after


class FailedPreconditionError(EmbedServeError):
    """The server cannot serve this request in its current state or configuration. `reason` names
    the conflict when the server says (SOURCE_CHANGED: a cursor's corpus has changed since)."""

    def __init__(self, code: grpc.StatusCode, details: str, reason: str | None = None) -> None:
        super().__init__(code, details)
        self.reason = reason


class UnavailableError(EmbedServeError):
    """The server cannot be reached or is not ready; retrying later can succeed."""


class DeadlineExceededError(EmbedServeError):
    """The call's timeout ran out."""


class UnauthenticatedError(EmbedServeError):
    """The call lacked valid credentials."""


class PermissionDeniedError(EmbedServeError):
    """The credentials do not allow this call."""


class DataLossError(EmbedServeError):
    """Stored data failed its integrity check (a corpus shard whose sha256 does not match its
    manifest); it was not served, and retrying reads the same data."""


class CallCancelledError(EmbedServeError):
    """The call was cancelled (a CANCELLED status from the server arrives as UnavailableError)."""


class InternalError(EmbedServeError):
    """The server failed unexpectedly; its log has the details."""


_ERROR_BY_CODE: Mapping[grpc.StatusCode, type[EmbedServeError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.CANCELLED: CallCancelledError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.INTERNAL: InternalError,
}


def _dropped(code: grpc.StatusCode, details: str) -> str | None:
    """Why a call was dropped on its way, or None when the server answered it.

    Two failures say nothing about the request and everything about availability:
    - INTERNAL "RST_STREAM": the transport reset the call, e.g. an L7 proxy whose upstream replica
      died mid-call;
    - CANCELLED as a status: a server that was shutting down dropped the call before running it
      (a call this client cancels raises asyncio.CancelledError instead).
    """
    if code is grpc.StatusCode.INTERNAL and "RST_STREAM" in details:
        return f"the call was reset in transit ({details})"
    if code is grpc.StatusCode.CANCELLED:
        return f"the server dropped the call, likely shutting down ({details})"
    return None


def _code_and_details(error: grpc.RpcError) -> tuple[grpc.StatusCode, str]:
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (error.details() if callable(getattr(error, "details", None)) else str(error)) or ""
    return code, details


def error_from_rpc(error: grpc.RpcError) -> EmbedServeError:
    """The typed exception for a failed call; a dropped call (see _dropped) is UnavailableError."""
    code, details = _code_and_details(error)
    reason = _dropped(code, details)
    if reason is not None:
        return UnavailableError(grpc.StatusCode.UNAVAILABLE, reason)
    trailers = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        limit = limit_from_trailers(trailers)
        if limit is not None:
            return LimitExceededError(code, details, limit)
    if code is grpc.StatusCode.NOT_FOUND:
        return NotFoundError(code, details, missing_words_from_trailers(trailers) or ())
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ResourceExhaustedError(code, details, retry_delay_from_trailers(trailers))
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return FailedPreconditionError(code, details, reason_from_trailers(trailers))
    return _ERROR_BY_CODE.get(code, EmbedServeError)(code, details)


def retry_pause(error: grpc.RpcError, attempt: int) -> float | None:
    """How long to wait before trying a call again that failed with `error` (attempt 0 is the
    first retry), or None when retrying cannot help: a dropped call (see _dropped) is retried
    with exponential backoff, and a refusal that carries a retry hint (an overloaded server)
    after that hint, with jitter so that refused clients do not come back all at once."""
    code, details = _code_and_details(error)
    if _dropped(code, details) is not None:
        return 0.05 * 2.0**attempt
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        trailers = error.trailing_metadata() if callable(getattr(error, "trailing_metadata", None)) else None
        hint = retry_delay_from_trailers(trailers)
        if hint is not None:
            return max(hint, 0.1 * 2.0**attempt) * random.uniform(1.0, 1.5)
    return None


async def call_idempotent(method: Callable[..., Awaitable[_T]], request: Any, seconds: float) -> _T:
    """One unary call of a method that changes nothing on the server, within `seconds`.

    gRPC's retry policy (the channel's service config) already retries UNAVAILABLE answers; a
    dropped call and an overloaded server's refusal (see retry_pause) are retried here, the
    latter after the delay the server asked for, whatever the request's size (gRPC's own retries
    leave out requests larger than their buffer).
    """
    deadline = time.monotonic() + seconds
    for attempt in range(RETRY_ATTEMPTS):
        try:
            return await method(request, timeout=max(0.0, deadline - time.monotonic()))
        except grpc.RpcError as error:
            pause = retry_pause(error, attempt)
            if pause is None or attempt + 1 >= RETRY_ATTEMPTS or time.monotonic() + pause >= deadline:
                raise error_from_rpc(error) from None
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")
