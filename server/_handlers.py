"""Helpers for interceptors that wrap gRPC method handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

_FACTORY_BY_KIND: dict[str, Callable[..., Any]] = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def _kind(handler: Any) -> str:
    return next(kind for kind in _FACTORY_BY_KIND if getattr(handler, kind) is not None)


def behaviour_of(handler: Any) -> Callable[..., Any]:
    """The handler's function, whichever of the four kinds it is."""
    return getattr(handler, _kind(handler))  # type: ignore[no-any-return]


def rebuilt(
    handler: Any, behaviour: Callable[..., Any], request_deserializer: Callable[[bytes], Any] | None = None
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind and serializers as `handler`, running `behaviour` instead."""
    return _FACTORY_BY_KIND[_kind(handler)](  # type: ignore[no-any-return]
        behaviour,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


async def replies_of(result: Any) -> AsyncIterator[Any]:
    """The replies of a streaming handler, in either style grpc.aio accepts: an async generator,
    or a coroutine that writes through context.write (as grpc.health.v1's Watch does)."""
    if hasattr(result, "__aiter__"):
        async for reply in result:
            yield reply
    else:
        await result
