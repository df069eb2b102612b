"""The client retries idempotent calls on UNAVAILABLE, and on RESOURCE_EXHAUSTED when the server
says when to retry."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import grpc
import numpy as np
import pytest
from embedserve.client import AsyncClient, EmbedServeError, InternalError, ResourceExhaustedError
from embedserve.client._errors import RETRY_ATTEMPTS
from embedserve.client.tensor import to_tensor_pb
from embedserve.server import ServerConfig
from embedserve.status_details import overloaded_trailers
from embedserve.v1 import tokenizer_pb2

from .conftest import start_server

Context = grpc.aio.ServicerContext[Any, Any]


async def _flaky_server(
    failures: list[grpc.StatusCode],
    details: str = "try again",
    deadlines: list[float | None] | None = None,
    retry_after: float | None = None,
) -> tuple[grpc.aio.Server, int, list[int]]:
    """A TokenizerService whose Tokenize fails with the given codes, then answers [7, 8, 9];
    each call's remaining time goes into `deadlines`. With `retry_after`, a RESOURCE_EXHAUSTED
    carries the retry hint embedserve's server sends when it is overloaded."""
    calls = [0]

    async def tokenize(request: tokenizer_pb2.TokenizeRequest, context: Context) -> bytes:
        calls[0] += 1
        if deadlines is not None:
            deadlines.append(context.time_remaining())
        if calls[0] <= len(failures):
            code = failures[calls[0] - 1]
            hinted = retry_after is not None and code is grpc.StatusCode.RESOURCE_EXHAUSTED
            trailers = (
                overloaded_trailers(code.value[0], details, "MEMORY_BUDGET", retry_after, {})
                if hinted
                else ()
            )
            await context.abort(code, details, trailing_metadata=trailers)
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
        [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.RESOURCE_EXHAUSTED],
        retry_after=0.4,
    )
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            started = time.monotonic()
            assert await client.tokenize("anything") == [7, 8, 9]
            assert time.monotonic() - started >= 0.8  # the server's hint, twice
        assert calls[0] == 4
    finally:
        await server.stop(None)
    # Without a hint, RESOURCE_EXHAUSTED is a size limit (a message too large): not retried.
    for code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED):
        server, port, calls = await _flaky_server([code])
        try:
            async with AsyncClient(f"127.0.0.1:{port}") as client:
                with pytest.raises(EmbedServeError, match=code.name):
                    await client.tokenize("anything")
            assert calls[0] == 1  # not retryable
        finally:
            await server.stop(None)


async def test_a_large_request_refused_for_memory_is_retried_after_the_hint() -> None:
    """gRPC's own retries leave out requests larger than their buffer; the client retries those."""
    server, port, calls = await _flaky_server([grpc.StatusCode.RESOURCE_EXHAUSTED] * 2, retry_after=0.3)
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            assert await client.tokenize("x" * (1 << 20)) == [7, 8, 9]
        assert calls[0] == 3
    finally:
        await server.stop(None)
    server, port, calls = await _flaky_server([grpc.StatusCode.RESOURCE_EXHAUSTED] * 9, retry_after=0.1)
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(ResourceExhaustedError) as raised:
                await client.tokenize("x" * (1 << 20))
            assert raised.value.retry_after == pytest.approx(0.1)
        assert calls[0] == RETRY_ATTEMPTS  # then it gives up, with the hint in hand
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


class _FreezableProxy:
    """A loopback TCP proxy that can stop forwarding without closing anything: what a client's idle
    connection sees of a replica that vanished (a powered-off host, a dropped NAT or LB entry)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.frozen = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._connect, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink))
            self._tasks.add(task)

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while chunk := await source.read(65536):
            if not self.frozen:  # frozen: bytes vanish, and nothing tells either end
                sink.write(chunk)
                await sink.drain()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._server is not None:
            self._server.close()


@pytest.mark.parametrize("pings_when_idle", [True, False])
async def test_idle_connections_are_pinged_so_a_vanished_server_is_noticed(pings_when_idle: bool) -> None:
    server, port, _ = await _flaky_server([])
    proxy = _FreezableProxy(port)
    proxy_port = await proxy.start()
    # The default pings every minute; the same mechanism, quicker. Without BDP probing, whose
    # own ping (sent after each reply) could notice a freeze that follows a call at once.
    # (These options override the client's defaults, which this test also shows.)
    options: list[tuple[str, int]] = [
        ("grpc.keepalive_time_ms", 300),
        ("grpc.http2.ping_timeout_ms", 1000),  # room for a busy machine to answer in time
        ("grpc.http2.bdp_probe", 0),
    ]
    if not pings_when_idle:  # what the client did before: ping only while calls are in flight
        options.append(("grpc.keepalive_permit_without_calls", 0))
    try:
        async with AsyncClient(f"127.0.0.1:{proxy_port}", connections=1, options=options) as client:
            assert await client.tokenize("anything") == [7, 8, 9]
            channel = client._channel
            await asyncio.sleep(1.5)  # idle for five ping intervals: pinging must not stop after two
            assert channel.get_state() is grpc.ChannelConnectivity.READY
            proxy.frozen = True  # no call in flight from here on: only a ping can notice
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 4)
            noticed = channel.get_state() is not grpc.ChannelConnectivity.READY
        assert noticed == pings_when_idle
    finally:
        await proxy.close()
        await server.stop(None)


async def test_round_robin_over_several_addresses_spreads_the_calls() -> None:
    # docs/operations.md's client-side balancing: one name resolving to every replica, round_robin.
    # Here the "name" lists two loopback replicas itself, as a headless Service's DNS would.
    config = ServerConfig(port=0, device="cpu", word_vectors="none", vocab_size=6, dim=3)
    replicas = [start_server(config), start_server(config)]
    try:
        target = "ipv4:" + ",".join(f"127.0.0.1:{replica.port}" for replica in replicas)
        options = [("grpc.lb_policy_name", "round_robin")]
        async with AsyncClient(target, connections=1, options=options) as client:
            for _ in range(40):
                assert await client.tokenize("hello world") == [31373, 995]
        served = [
            replica.server.metrics.finished_calls().get("Tokenize", {}).get("OK", 0) for replica in replicas
        ]
        # pick_first (gRPC's default) would send all 40 to one replica.
        assert sum(served) == 40
        assert min(served) >= 10, served
    finally:
        for replica in replicas:
            replica.stop()


async def test_every_call_has_a_finite_deadline_by_default() -> None:
    remaining: list[float | None] = []
    server, port, _ = await _flaky_server([], deadlines=remaining)
    try:
        async with AsyncClient(f"127.0.0.1:{port}") as client:
            await client.tokenize("x")
        async with AsyncClient(f"127.0.0.1:{port}", timeout=2.5) as client:
            await client.tokenize("x")
    finally:
        await server.stop(None)
    default, overridden = remaining
    assert default is not None
    assert 25 < default <= 30.1  # 30 s unless told otherwise (the server's clock reads a little over)
    assert overridden is not None
    assert 0 < overridden <= 2.6
