"""Prometheus metrics (`--metrics-port`): calls by method and status, latency, batching, queues, streams."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess, start_http_server

from ._handlers import behaviour_of, rebuilt, replies_of
from .config import PROMETHEUS_MULTIPROCESS_VARIABLE

if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """One registry per server process; `serve` exposes it over HTTP."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "embedserve_calls",
            "RPCs finished, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "embedserve_call_seconds", "RPC duration (whole stream for streams)", ["method"],
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        # multiprocess_mode: how `--workers` processes' values add up (ignored with one process).
        self.open_streams = Gauge(
            "embedserve_open_streams", "streams in progress", ["method"], registry=self.registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.queue_seconds = Histogram(
            "embedserve_embed_queue_seconds", "time an Embed lookup waited for the device",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.batch_requests = Histogram(
            "embedserve_embed_batch_requests", "requests merged into one device lookup",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry,
        )  # fmt: skip
        self.batch_tokens = Histogram(
            "embedserve_embed_batch_tokens", "tokens in one device lookup",
            buckets=(64, 256, 1024, 4096, 16384, 65536, 262144), registry=self.registry,
        )  # fmt: skip
        self.queue_tokens = Gauge(
            "embedserve_embed_queue_tokens", "tokens waiting for the device", registry=self.registry,
            multiprocess_mode="livesum",
        )  # fmt: skip
        self.model_load_seconds = Gauge(
            "embedserve_model_load_seconds", "time to load each model", ["model"], registry=self.registry,
            multiprocess_mode="max",
        )  # fmt: skip

    def serve_http(self, port: int, host: str) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def finished_calls(self) -> dict[str, dict[str, int]]:
        """Calls finished so far: {method: {status code: count}}."""
        counts: dict[str, dict[str, int]] = {}
        for metric in self.calls.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    by_code = counts.setdefault(sample.labels["method"], {})
                    by_code[sample.labels["code"]] = int(sample.value)
        return counts


def serve_workers_http(port: int, host: str) -> None:
    """Serves the sum over every `--workers` process (prometheus-client's multiprocess mode).

    The variable must have been set before prometheus_client was first imported in this process
    and its workers; each worker then writes its values to files there.
    """
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=os.environ[PROMETHEUS_MULTIPROCESS_VARIABLE])  # type: ignore[no-untyped-call]
    start_http_server(port, addr=host, registry=registry)


def worker_exited(pid: int) -> None:
    """Drops the live gauges of a worker that has exited."""
    multiprocess.mark_process_dead(pid, os.environ[PROMETHEUS_MULTIPROCESS_VARIABLE])  # type: ignore[no-untyped-call]


def add_timings(context: Any, **seconds: float) -> None:
    """Appends `embedserve-<name>-ms` entries to the call's trailing metadata (keeping what is there)."""
    timings = tuple((f"embedserve-{name}-ms", f"{1000 * value:.3f}") for name, value in seconds.items())
    context.set_trailing_metadata((*(context.trailing_metadata() or ()), *timings))


def _code(context: Any, error: BaseException | None) -> str:
    """The call's final status code: what the handler set or aborted with, else from how it ended."""
    code = context.code()
    if code is not None:
        return str(getattr(code, "name", code))
    if error is None:
        return "OK"
    if isinstance(error, asyncio.CancelledError | GeneratorExit) or context.cancelled():
        # The client went away or its deadline passed: gRPC stops the handler either way.
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "UNKNOWN"


class MetricsInterceptor(_ServerInterceptor):
    """Counts every call by method and final status code, and times it; every reply's trailing
    metadata carries `embedserve-server-ms`, the time the server spent on the call."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler: Any = await continuation(handler_call_details)  # None for unknown methods
        if handler is None:
            return None  # type: ignore[return-value]  # gRPC answers UNIMPLEMENTED
        method = (handler_call_details.method or "").rsplit("/", 1)[-1]
        metrics = self._metrics

        def finish(context: Any, started: float, error: BaseException | None) -> None:
            metrics.calls.labels(method, _code(context, error)).inc()
            metrics.latency.labels(method).observe(time.perf_counter() - started)

        inner = behaviour_of(handler)
        if handler.response_streaming:

            async def streamed(request: Any, context: Any) -> AsyncIterator[Any]:
                started, error = time.perf_counter(), None
                metrics.open_streams.labels(method).inc()
                try:
                    async for reply in replies_of(inner(request, context)):
                        yield reply
                except BaseException as raised:
                    error = raised
                    raise
                finally:
                    metrics.open_streams.labels(method).dec()
                    add_timings(context, server=time.perf_counter() - started)
                    finish(context, started, error)

            return rebuilt(handler, streamed)

        async def unary(request: Any, context: Any) -> Any:
            started, error = time.perf_counter(), None
            try:
                return await inner(request, context)
            except BaseException as raised:
                error = raised
                raise
            finally:
                add_timings(context, server=time.perf_counter() - started)
                finish(context, started, error)

        return rebuilt(handler, unary)
