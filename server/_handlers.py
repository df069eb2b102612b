"""Helpers for interceptors that wrap gRPC method handlers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any


async def replies_of(result: Any) -> AsyncIterator[Any]:
    """The replies of a streaming handler, in either style grpc.aio accepts: an async generator,
    or a coroutine that writes through context.write (as grpc.health.v1's Watch does)."""
    if hasattr(result, "__aiter__"):
        async for reply in result:
            yield reply
    else:
        await result
