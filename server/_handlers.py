"""Helpers for interceptors that wrap gRPC method handlers."""

from __future__ import annotations

import asyncio
import contextlib
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
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


def forget_locals(error: BaseException) -> None:
    """Drops the local variables of the finished frames in `error`'s traceback, and in those of
    the errors it was raised from or during. gRPC keeps a call's failure after the call (in a
    reference cycle, or longer), and with it every frame the failure passed through: a request's
    text, its plan, its replies. The tracebacks keep their lines for the log."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)  # frames still running are left as they are
        pending += [current.__context__, current.__cause__]


# A batch that core fails because the call has ended (the client cancelled, the deadline passed)
# completes together with the operation that tells grpc.aio the call was cancelled, in either
# order. Until that notice has been handled, grpc.aio takes the failure for a fault of the server
# and logs it as an ERROR with a traceback ("ExecuteBatchError raised in core by servicer method");
# once handled, it cancels the handler's task and logs at DEBUG. A handler whose batch failed
# therefore waits this long for that cancellation before re-raising the failure.
CALL_END_WAIT_SECONDS = 1.0


async def _after_failed_batch() -> None:
    """Waits for gRPC to cancel this handler's task (CancelledError) if its call has ended; the
    caller re-raises the failure if it returns, so a failure with the call still open is logged."""
    await asyncio.sleep(CALL_END_WAIT_SECONDS)


async def answered(result: Awaitable[Any]) -> Any:
    """A unary handler's reply; a failed batch (an abort on an ended call) waits as above."""
    try:
        return await result
    except grpc.aio.InternalError:  # ExecuteBatchError: core refused an operation on the call
        await _after_failed_batch()
        raise


async def write_replies(result: Any, context: Any) -> None:
    """Runs a streaming handler (either style, as replies_of) and writes its replies itself with
    context.write, grpc.aio's reader-writer style, so that a write that fails because the call
    has ended waits for gRPC to take the call for cancelled instead of reaching gRPC first."""
    try:
        if hasattr(result, "__aiter__"):
            async with contextlib.aclosing(result):  # the handler's finally runs now, not at GC
                async for reply in result:
                    try:
                        await context.write(reply)
                    finally:
                        # A failed write's traceback keeps this frame, and gRPC keeps the call's
                        # failure in a reference cycle: not the reply with it.
                        reply = None
        else:
            await result
    except grpc.aio.InternalError:
        await _after_failed_batch()
        raise
