"""Every failed call raises an EmbedServeError subclass that keeps its grpc.StatusCode."""

from __future__ import annotations

from collections.abc import Mapping

import grpc


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


def error_from_rpc(error: grpc.RpcError) -> EmbedServeError:
    """The typed exception for a failed call."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    return _ERROR_BY_CODE.get(code, EmbedServeError)(code, details or "")
