"""Every failed call raises an EmbedServeError subclass that keeps its grpc.StatusCode."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc

_T = TypeVar("_T")
# A call reset by the transport (an L7 proxy whose upstream replica died mid-call) arrives as
# INTERNAL "RST_STREAM"; the server never saw it fail, so it is unavailability, not a server bug.
TRANSPORT_RESET_ATTEMPTS = 4


class EmbedServeError(Exception):
    """A call to the server failed; `.code` is the grpc.StatusCode, `.details` the server's message."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgumentError(EmbedServeError):
    """The request is malformed or over a limit; retrying it will fail again."""


class NotFoundError(EmbedServeError):
    """A named corpus (or word) does not exist on the server."""


class ResourceExhaustedError(EmbedServeError):
    """The server is overloaded or a message exceeded a size limit."""


class FailedPreconditionError(EmbedServeError):
    """The server cannot serve this request in its current configuration."""


class UnavailableError(EmbedServeError):
    """The server cannot be reached or is not ready; retrying later can succeed."""


class DeadlineExceededError(EmbedServeError):
    """The call's timeout ran out."""


class UnauthenticatedError(EmbedServeError):
    """The call lacked valid credentials."""


class PermissionDeniedError(EmbedServeError):
    """The credentials do not allow this call."""


class CallCancelledError(EmbedServeError):
    """The call was cancelled."""


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
    grpc.StatusCode.INTERNAL: InternalError,
}


def _is_transport_reset(code: grpc.StatusCode, details: str) -> bool:
    return code is grpc.StatusCode.INTERNAL and "RST_STREAM" in details


def error_from_rpc(error: grpc.RpcError) -> EmbedServeError:
    """The typed exception for a failed call; a call reset by the transport is UnavailableError."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (error.details() if callable(getattr(error, "details", None)) else str(error)) or ""
    if _is_transport_reset(code, details):
        return UnavailableError(grpc.StatusCode.UNAVAILABLE, f"the call was reset in transit ({details})")
    return _ERROR_BY_CODE.get(code, EmbedServeError)(code, details)


async def call_idempotent(method: Callable[..., Awaitable[_T]], request: Any, seconds: float) -> _T:
    """One unary call of a method that changes nothing on the server, within `seconds`.

    gRPC's retry policy (the channel's service config) already retries UNAVAILABLE answers; a call
    reset in transit never reaches it as such, so that case is retried here.
    """
    deadline = time.monotonic() + seconds
    for attempt in range(TRANSPORT_RESET_ATTEMPTS):
        try:
            return await method(request, timeout=max(0.0, deadline - time.monotonic()))
        except grpc.RpcError as error:
            details = error.details() if callable(getattr(error, "details", None)) else ""
            code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
            pause = 0.05 * 2**attempt
            retry = _is_transport_reset(code, details or "") and attempt + 1 < TRANSPORT_RESET_ATTEMPTS
            if not retry or time.monotonic() + pause >= deadline:
                raise error_from_rpc(error) from None
            await asyncio.sleep(pause)
    raise AssertionError("unreachable")
