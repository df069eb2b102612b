"""Requests that do not parse get INVALID_ARGUMENT, not gRPC's UNKNOWN.

gRPC turns an exception in a request deserializer into UNKNOWN ("Exception deserializing
request!"), which reads like a server fault. This interceptor makes every deserializer total: bad
bytes (truncated, not protobuf, invalid UTF-8 in a string field) become a MalformedRequest value,
and the handler answers it with INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from ._handlers import behaviour_of, rebuilt, replies_of
from .core import InvalidInput

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor


class MalformedRequest:
    def __init__(self, method: str, error: Exception) -> None:
        self.message = f"the request to {method} is not a valid message: {type(error).__name__}: {error}"


def _total(deserializer: Callable[[bytes], Any] | None, method: str) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as error:
            return MalformedRequest(method, error)

    return deserialize


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if isinstance(request, MalformedRequest):
            raise InvalidInput(request.message)  # the handler's error mapping answers it
        yield request


class MalformedRequestInterceptor(_ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: Any = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler  # type: ignore[no-any-return]
        method = handler_call_details.method or "this method"
        deserializer = _total(handler.request_deserializer, method)
        inner = behaviour_of(handler)
        request_streaming = handler.request_streaming

        if handler.response_streaming:

            async def streamed(request: Any, context: Any) -> AsyncIterator[Any]:
                parsed = await _parsed(request, context, request_streaming)
                async for reply in replies_of(inner(parsed, context)):
                    yield reply

            return rebuilt(handler, streamed, deserializer)

        async def unary(request: Any, context: Any) -> Any:
            return await inner(await _parsed(request, context, request_streaming), context)

        return rebuilt(handler, unary, deserializer)


async def _parsed(request: Any, context: Any, streaming: bool) -> Any:
    """The request (or request stream), with a malformed message answered INVALID_ARGUMENT."""
    if streaming:
        return _checked(request)
    if isinstance(request, MalformedRequest):
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
    return request
