"""Prometheus metrics (`--metrics-port`): calls by method and status, latency, batching, queues, streams.

`serve_metrics_http` owns the HTTP listener: its address (`--metrics-host`) and its credential
(`--metrics-token`), for one server process and for the parent of `--workers` alike.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app, multiprocess
from prometheus_client.exposition import ThreadingWSGIServer

from ._handlers import answered, behaviour_of, forget_locals, rebuilt, write_replies
from .config import PROMETHEUS_MULTIPROCESS_VARIABLE, ServerConfig
from .core import StartupError

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
        self.memory_budget = Gauge(
            "embedserve_memory_budget_bytes", "working memory requests may hold at once (--memory-budget)",
            registry=self.registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.memory_in_use = Gauge(
            "embedserve_memory_reserved_bytes", "working memory requests hold now, of the budget",
            registry=self.registry, multiprocess_mode="livesum",
        )  # fmt: skip
        self.memory_peak = Gauge(
            "embedserve_memory_reserved_peak_bytes", "the most working memory requests have held at once",
            registry=self.registry, multiprocess_mode="max",
        )  # fmt: skip
        self.model_load_seconds = Gauge(
            "embedserve_model_load_seconds", "time to load each model", ["model"], registry=self.registry,
            multiprocess_mode="max",
        )  # fmt: skip

    def serve_http(self, config: ServerConfig) -> WSGIServer:
        return serve_metrics_http(self.registry, config)

    def finished_calls(self) -> dict[str, dict[str, int]]:
        """Calls finished so far: {method: {status code: count}}."""
        counts: dict[str, dict[str, int]] = {}
        for metric in self.calls.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    by_code = counts.setdefault(sample.labels["method"], {})
                    by_code[sample.labels["code"]] = int(sample.value)
        return counts


_WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _QuietHandler(WSGIRequestHandler):
    """Logs no line per scrape (as prometheus-client's own handler)."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _bearer_required(app: _WsgiApp, token: str) -> _WsgiApp:
    """`app` for requests whose `Authorization` is `Bearer <token>`; 401 for any other."""
    expected = token.encode()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        scheme, _, offered = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        # WSGI hands header values over as latin-1 text: encoding it gives back the bytes sent.
        if scheme.lower() == "bearer" and hmac.compare_digest(offered.strip().encode("latin-1"), expected):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [("WWW-Authenticate", 'Bearer realm="embedserve metrics"'), ("Content-Type", "text/plain")],
        )
        return [b"missing or wrong metrics token (Authorization: Bearer TOKEN)\n"]

    return guarded


def serve_metrics_http(registry: CollectorRegistry, config: ServerConfig) -> WSGIServer:
    """Serves `registry` at http://--metrics-host:--metrics-port/metrics from a daemon thread;
    with --metrics-token, only to scrapes that send `Authorization: Bearer TOKEN`.

    StartupError when the address cannot be bound. Returns the listener (`shutdown()` stops it).
    """
    app: _WsgiApp = make_wsgi_app(registry)
    if config.metrics_token is not None:
        app = _bearer_required(app, config.metrics_token)
    host, port = config.metrics_host.strip("[]"), config.metrics_port
    try:
        family, *_, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]

        class Listener(ThreadingWSGIServer):
            address_family = family  # IPv6 addresses need AF_INET6

        listener: WSGIServer = make_server(str(address[0]), port, app, Listener, handler_class=_QuietHandler)
    except OSError as error:  # a name that does not resolve, a port in use
        raise StartupError(
            f"cannot serve metrics on {config.metrics_host}:{port}: {error.strerror}"
        ) from None
    threading.Thread(target=listener.serve_forever, name="metrics-http", daemon=True).start()
    return listener


def serve_workers_http(config: ServerConfig) -> WSGIServer:
    """Serves the sum over every `--workers` process (prometheus-client's multiprocess mode),
    bound and guarded as one process's metrics are (serve_metrics_http).

    The variable must have been set before prometheus_client was first imported in this process
    and its workers; each worker then writes its values to files there.
    """
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=os.environ[PROMETHEUS_MULTIPROCESS_VARIABLE])  # type: ignore[no-untyped-call]
    return serve_metrics_http(registry, config)


def worker_exited(pid: int) -> None:
    """Drops the live gauges of a worker that has exited."""
    multiprocess.mark_process_dead(pid, os.environ[PROMETHEUS_MULTIPROCESS_VARIABLE])  # type: ignore[no-untyped-call]


def add_timings(context: Any, **seconds: float) -> None:
    """Appends `embedserve-<name>-ms` entries to the call's trailing metadata (keeping what is there)."""
    timings = tuple((f"embedserve-{name}-ms", f"{1000 * value:.3f}") for name, value in seconds.items())
    context.set_trailing_metadata((*(context.trailing_metadata() or ()), *timings))


# A client whose deadline passes cancels the call itself, and that cancel reaches the server a
# little before the server's copy of the deadline (which started when the call arrived): measured
# 1-5 ms before it on one machine, about a round trip. A cancel this close counts as the deadline.
_DEADLINE_SLACK_SECONDS = 0.05


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
        deadline_passed = remaining is not None and remaining <= _DEADLINE_SLACK_SECONDS
        return "DEADLINE_EXCEEDED" if deadline_passed else "CANCELLED"
    return "UNKNOWN"


class MetricsInterceptor(_ServerInterceptor):
    """Counts every call by method and final status code, and times it; every reply's trailing
    metadata carries `embedserve-server-ms`, the time the server spent on the call.

    The outermost interceptor, so it also writes every stream's replies (write_replies): a cancel
    or a passed deadline then ends the call as gRPC's own cancellation, logged at DEBUG, never as
    a failed write logged at ERROR.
    """

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

            async def streamed(request: Any, context: Any) -> None:
                started, error = time.perf_counter(), None
                metrics.open_streams.labels(method).inc()
                try:
                    await write_replies(inner(request, context), context)
                except BaseException as raised:
                    error = raised
                    forget_locals(raised)
                    raise
                finally:
                    metrics.open_streams.labels(method).dec()
                    add_timings(context, server=time.perf_counter() - started)
                    finish(context, started, error)
                    # The frame would hold the exception and its traceback the frame: a cycle
                    # that keeps the call's replies in memory until a full garbage collection.
                    error = None

            return rebuilt(handler, streamed)

        async def unary(request: Any, context: Any) -> Any:
            started, error = time.perf_counter(), None
            try:
                return await answered(inner(request, context))
            except BaseException as raised:
                error = raised
                forget_locals(raised)
                raise
            finally:
                add_timings(context, server=time.perf_counter() - started)
                finish(context, started, error)
                error = None  # no cycle through the traceback (as above)

        return rebuilt(handler, unary)
