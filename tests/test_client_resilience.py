"""The client retries idempotent calls on UNAVAILABLE and RESOURCE_EXHAUSTED."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import numpy as np
import pytest
from embedserve.client import AsyncClient, EmbedServeError, InternalError
from embedserve.client.tensor import to_tensor_pb
from embedserve.server import ServerConfig
from embedserve.v1 import tokenizer_pb2

from .conftest import start_server

Context = grpc.aio.ServicerContext[Any, Any]


async def _flaky_server(
    failures: list[grpc.StatusCode], details: str = "try again"
) -> tuple[grpc.aio.Server, int, list[int]]:
    """A TokenizerService whose Tokenize fails with the given codes, then answers [7, 8, 9]."""
    calls = [0]

    async def tokenize(
        request: tokenizer_pb2.TokenizeRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        calls[0] += 1
        if calls[0] <= len(failures):
            await context.abort(failures[calls[0] - 1], details)
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


async def test_calls_reset_in_transit_are_retried_but_server_failures_are_not() -> None:
    # What a client behind nginx sees when the replica serving its call dies mid-call.
    reset = "Stream removed (RST_STREAM (Received RST_STREAM with error code 2))"
    server, port, calls = await _flaky_server([grpc.StatusCode.INTERNAL] * 2, details=reset)
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            assert await client.tokenize("anything") == [7, 8, 9]
        assert calls[0] == 3
    finally:
        await server.stop(None)
    server, port, calls = await _flaky_server([grpc.StatusCode.INTERNAL] * 2)
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(InternalError):
                await client.tokenize("anything")
        assert calls[0] == 1
    finally:
        await server.stop(None)


async def test_connections_past_their_maximum_age_are_replaced_without_failing_calls() -> None:
    config = ServerConfig(
        port=0, device="cpu", word_vectors="none", vocab_size=6, dim=3, max_connection_age=0.3, grace=1.0
    )
    running = start_server(config)
    try:
        async with AsyncClient(running.target, connections=1) as client:
            deadline = time.monotonic() + 1.5
            calls = 0
            while time.monotonic() < deadline:  # spans several connection lifetimes
                assert (await client.embed([1, 2])).shape == (2, 3)
                calls += 1
                await asyncio.sleep(0.02)
        assert calls > 20
    finally:
        running.stop()
