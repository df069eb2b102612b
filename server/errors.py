"""The one table from domain errors to gRPC status codes, and the handler wrappers that apply it."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from embedserve.status_details import (
    DETAILS_KEY,
    LimitInfo,
    error_info_status,
    limit_exceeded_status,
    not_in_vocabulary_status,
    overloaded_trailers,
)

from .core import (
    CorruptData,
    EmbedServeCoreError,
    InvalidInput,
    LimitExceeded,
    NotFound,
    NotInVocabulary,
    NotPermitted,
    NotReady,
    Overloaded,
    PreconditionFailed,
    StartupError,
    Unavailable,
)

_LOGGER = logging.getLogger(__name__)
Context = grpc.aio.ServicerContext[Any, Any]

STATUS_BY_ERROR: tuple[tuple[type[EmbedServeCoreError], grpc.StatusCode], ...] = (
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),  # LimitExceeded included: retrying cannot help
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (Unavailable, grpc.StatusCode.UNAVAILABLE),
    (CorruptData, grpc.StatusCode.DATA_LOSS),
    (NotPermitted, grpc.StatusCode.PERMISSION_DENIED),
    (StartupError, grpc.StatusCode.FAILED_PRECONDITION),
    (PreconditionFailed, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_for(error: BaseException) -> grpc.StatusCode:
    for error_type, code in STATUS_BY_ERROR:
        if isinstance(error, error_type):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: Context, method: str, error: Exception) -> NoReturn:
    code = status_for(error)
    if code is grpc.StatusCode.INTERNAL:
        _LOGGER.exception("%s failed", method, exc_info=error)
        await context.abort(code, f"internal error in {method}; see the server log")
    if isinstance(error, LimitExceeded):
        # The limit travels as structured detail too: clients split on that, not on the text.
        details = limit_exceeded_status(
            code.value[0], str(error), LimitInfo(error.limit, error.allowed, error.requested)
        )
        await context.abort(code, str(error), trailing_metadata=((DETAILS_KEY, details),))
    if isinstance(error, Overloaded):
        # What is full and when to retry: gRPC's own retry honours the pushback, other clients
        # read the RetryInfo.
        trailers = overloaded_trailers(
            code.value[0], str(error), error.reason, error.retry_after, error.metadata
        )
        await context.abort(code, str(error), trailing_metadata=trailers)
    if isinstance(error, PreconditionFailed) and error.reason is not None:
        details = error_info_status(code.value[0], str(error), error.reason, error.metadata)
        await context.abort(code, str(error), trailing_metadata=((DETAILS_KEY, details),))
    if isinstance(error, NotInVocabulary):
        details = not_in_vocabulary_status(code.value[0], str(error), error.words)
        await context.abort(code, str(error), trailing_metadata=((DETAILS_KEY, details),))
    await context.abort(code, str(error))


_Servicer = TypeVar("_Servicer")
_Request = TypeVar("_Request")
_Reply = TypeVar("_Reply")


def unary_errors(
    handler: Callable[[_Servicer, _Request, Context], Awaitable[_Reply]],
) -> Callable[[_Servicer, _Request, Context], Awaitable[_Reply]]:
    """Maps errors a unary handler raises to status codes (aborts pass through)."""

    async def wrapper(self: _Servicer, request: _Request, context: Context) -> _Reply:
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, handler.__qualname__, error)

    return wrapper


def stream_errors(
    handler: Callable[[_Servicer, _Request, Context], AsyncIterator[_Reply]],
) -> Callable[[_Servicer, _Request, Context], AsyncIterator[_Reply]]:
    """The same for handlers that stream their replies."""

    async def wrapper(self: _Servicer, request: _Request, context: Context) -> AsyncIterator[_Reply]:
        try:
            async for reply in handler(self, request, context):
                yield reply
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, handler.__qualname__, error)

    return wrapper
