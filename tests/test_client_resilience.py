"""The client retries idempotent calls on UNAVAILABLE and RESOURCE_EXHAUSTED."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
from embedserve.client import AsyncClient, EmbedServeError
from embedserve.client.tensor import to_tensor_pb
from embedserve.v1 import tokenizer_pb2

Context = grpc.aio.ServicerContext[Any, Any]


async def _flaky_server(failures: list[grpc.StatusCode]) -> tuple[grpc.aio.Server, int, list[int]]:
    """A TokenizerService whose Tokenize fails with the given codes, then answers [7, 8, 9]."""
    calls = [0]

    async def tokenize(
        request: tokenizer_pb2.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        calls[0] += 1
        if calls[0] <= len(failures):
            await context.abort(failures[calls[0] - 1], "try again")
        reply = tokenizer_pb2.TokenizeResponse(
            token_ids=to_tensor_pb(np.array([7, 8, 9], np.int32)), lengths=[3]
        )
        return reply.SerializeToString()

    handler = grpc.unary_unary_rpc_method_handler(
        tokenize, request_deserializer=tokenizer_pb2.TokenizeRequest.FromString
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("embedserve.v1.TokenizerService", {"Tokenize": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, calls


async def test_idempotent_calls_are_retried_with_backoff() -> None:
    server, port, calls = await _flaky_server(
        [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED]
    )
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            assert await client.tokenize("anything") == [7, 8, 9]
        assert calls[0] == 3
    finally:
        await server.stop(None)
    server, port, calls = await _flaky_server([grpc.StatusCode.INVALID_ARGUMENT])
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(EmbedServeError, match="INVALID_ARGUMENT"):
                await client.tokenize("anything")
        assert calls[0] == 1  # not retryable
    finally:
        await server.stop(None)
