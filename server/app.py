"""The composition root: load the components, register every servicer, serve."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from embedserve.v1 import batches_pb2, embedding_pb2, tokenizer_pb2_grpc, word_vectors_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .config import (
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_DIM,
    ConfigError,
    MemoryBudgetSetting,
    ServerConfig,
    parse_size,
)
from .core import (
    OUTPUT_DTYPES,
    CorpusStore,
    EmbeddingModel,
    InvalidInput,
    MappedOrders,
    StartupError,
    Tokenizer,
    load_embedding_tables,
    load_tokenizer,
    resolve_device,
    seeded_embedding_tables,
)
from .core.allocator import AllocatorTrimmer, tune_allocator
from .core.corpus import WINDOW_ORDERS_FOLDER
from .core.device_thread import DeviceThread
from .core.memory_budget import MemoryBudget, format_bytes, memory_limit_bytes
from .core.shard_cache import ShardCache
from .core.shared_memory import SharedMemoryRegistry
from .core.storage import is_url
from .core.stream_plan import BatchObserver
from .core.vector_sources import default_cache_dir, load_word_vectors
from .core.word_vector_slot import WordVectorSlot
from .health_service import HealthStatuses
from .malformed import MalformedRequestInterceptor
from .metrics import Metrics, MetricsInterceptor
from .reflection import enable_reflection
from .security import ApiKeyInterceptor, check_exposure, server_credentials
from .services import (
    BatchesServicer,
    EmbeddingServicer,
    TokenizerServicer,
    add_encoding_servicer,
    embed_batcher,
)
from .word_vectors_service import WordVectorsServicer, disabled_word_vectors_handler

_LOGGER = logging.getLogger(__name__)
__all__ = ["Components", "EmbedServer", "build_server", "load_components", "serve", "tune_allocator"]


@dataclass(frozen=True)
class Components:
    """Everything the servicers share; built once, before any server exists."""

    config: ServerConfig
    tokenizer: Tokenizer
    model: EmbeddingModel
    corpora: CorpusStore
    word_vectors: WordVectorSlot
    # The lease on the process's thread for the device, on which the model and the slot take theirs:
    # all torch work runs there (core/device_thread.py). Closed last.
    device_thread: DeviceThread
    shared_memory: SharedMemoryRegistry
    load_seconds: dict[str, float] = field(default_factory=dict)

    def close(self, timeout: float = 10.0) -> bool:
        """False when a word-vector load is still running after `timeout` seconds."""
        self.shared_memory.close()
        self.model.close()
        stopped = self.word_vectors.close(timeout)
        # Last: nothing here submits to it any more (a load that is still running stops at its next
        # step there). The thread itself stops once no Components or model of the process holds it.
        self.device_thread.close()
        return stopped


def load_components(config: ServerConfig, environ: Mapping[str, str] | None = None) -> Components:
    """Loads the tokenizer and the embedding tables; StartupError says what is wrong."""
    try:
        config.validate()  # parsed flags are checked already; a config built in Python is checked here
    except ConfigError as error:
        raise StartupError(str(error)) from None
    started = time.perf_counter()
    tokenizer = load_tokenizer(config.tokenizer, config.bpe_dir, os.environ if environ is None else environ)
    if config.weights is not None:
        tables = load_embedding_tables(
            config.weights,
            token_key=config.token_embedding_key,
            position_key=config.position_embedding_key,
            vocab_size=config.vocab_size,
            dim=config.dim,
            context_length=config.context_length,
        )
    else:
        tables = seeded_embedding_tables(
            config.vocab_size or tokenizer.n_vocab,
            config.dim or DEFAULT_DIM,
            config.context_length or DEFAULT_CONTEXT_LENGTH,
            config.seed,
        )
    if config.data_dir and not is_url(config.data_dir) and not Path(config.data_dir).is_dir():
        raise StartupError(f"--data-dir {config.data_dir} is not a folder")
    device = resolve_device(config.device)
    device_thread = DeviceThread.shared(device)  # all torch work of this process on the device runs there
    model = EmbeddingModel(tables, device, OUTPUT_DTYPES[config.dtype], device_thread=device_thread)
    cache_dir = config.cache_dir or default_cache_dir(os.environ if environ is None else environ)
    word_vectors = WordVectorSlot(
        config.word_vectors,
        lambda cancel: load_word_vectors(
            config.word_vectors,
            cache_dir=cache_dir,
            device=device,
            max_topn=config.max_topn,
            prefilter=config.word_vector_prefilter,
            cancel=cancel,
            device_thread=device_thread,
        ),
        device_thread=device_thread,
    )
    _LOGGER.info(
        "embedding %d x %d + positional %d x %d from %s on %s, loaded in %.2f s",
        model.vocab_size,
        model.dim,
        model.context_length,
        model.dim,
        model.source,
        model.device,
        time.perf_counter() - started,
    )
    try:
        corpora = CorpusStore(
            config.data_dir,
            tokenizer,
            window_orders=_window_orders(config.data_dir, cache_dir),
            shard_cache=ShardCache(cache_dir / "shards", parse_size(config.cache_size)),
        )
    except InvalidInput as error:  # a URL whose filesystem is not installed
        raise StartupError(f"--data-dir: {error}") from None
    if corpora.storage is not None and not corpora.storage.is_local:
        threading.Thread(target=corpora.storage.warm_up, name="storage-warm-up", daemon=True).start()
        _LOGGER.info(
            "corpora from %s, through a shard cache of %s in %s",
            corpora.storage.location,  # without credentials
            config.cache_size,
            cache_dir / "shards",
        )
    return Components(
        config,
        tokenizer,
        model,
        corpora,
        word_vectors,
        device_thread,
        _shared_memory(config),
        load_seconds={"embedding": time.perf_counter() - started},
    )


def _shared_memory(config: ServerConfig) -> SharedMemoryRegistry:
    registry = SharedMemoryRegistry(max_per_connection=config.shared_memory_regions)
    registry.remove_abandoned()
    return registry


def _window_orders(data_dir: str | None, cache_dir: Path) -> MappedOrders:
    """Beside the corpora when their folder is local and writable (every server on them shares the
    files), else in the server's cache folder."""
    if data_dir and not is_url(data_dir) and os.access(data_dir, os.W_OK):
        return MappedOrders(Path(data_dir) / WINDOW_ORDERS_FOLDER)
    return MappedOrders(cache_dir / "window-orders")


def memory_budget(config: ServerConfig, metrics: Metrics) -> MemoryBudget:
    """The server's memory budget (--memory-budget, --memory-wait); the metrics follow it."""
    limit = memory_limit_bytes()
    total = MemoryBudgetSetting.parse(config.memory_budget).bytes_of(limit, config.workers)
    metrics.memory_budget.set(total)
    _LOGGER.info(
        "memory budget %s (--memory-budget %s; memory limit %s)",
        format_bytes(total), config.memory_budget, format_bytes(limit),
    )  # fmt: skip

    def changed(budget: MemoryBudget) -> None:
        metrics.memory_in_use.set(budget.in_use_bytes)
        metrics.memory_peak.set(budget.peak_bytes)

    return MemoryBudget(total, config.memory_wait, on_change=changed)


def channel_options(config: ServerConfig) -> list[tuple[str, int]]:
    age = (
        [
            ("grpc.max_connection_age_ms", max(1, int(config.max_connection_age * 1000))),
            ("grpc.max_connection_age_grace_ms", max(1, int(config.grace * 1000))),
        ]
        if config.max_connection_age > 0
        else []
    )
    streams = (
        [("grpc.max_concurrent_streams", config.max_concurrent_streams)]
        if config.max_concurrent_streams
        else []
    )
    return [
        *age,
        *streams,
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Several worker processes share one port only when asked to; otherwise a second server
        # on the same port is an error rather than a silent split of the traffic.
        ("grpc.so_reuseport", 1 if config.workers > 1 else 0),
        # Clients ping idle connections every minute (keepalive); allow it.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


TOKENIZER_SERVICE = "embedserve.v1.TokenizerService"
_BATCHES = batches_pb2.DESCRIPTOR.services_by_name["BatchesService"]
_EMBEDDING = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"]
BATCHES_SERVICE = _BATCHES.full_name
EMBEDDING_SERVICE = _EMBEDDING.full_name
WORD_VECTORS_SERVICE = "embedserve.v1.WordVectorsService"


@dataclass(eq=False)
class EmbedServer:
    """What build_server makes: the gRPC server on its bound port, and what it owns beside it
    (the health statuses, the metrics, the draining signal streams watch), with the steps that
    start and stop it."""

    grpc_server: grpc.aio.Server
    port: int
    config: ServerConfig
    health: HealthStatuses
    metrics: Metrics
    memory_budget: MemoryBudget
    draining: asyncio.Event
    # Health updates still being applied (the loop keeps only weak references to tasks).
    health_updates: set[asyncio.Task[None]] = field(default_factory=set, repr=False)

    async def start(self) -> None:
        await self.grpc_server.start()

    async def enter_shutdown(self) -> None:
        """Every service NOT_SERVING (so balancers stop sending), and streams end at their next
        reply boundary with UNAVAILABLE (so clients resume elsewhere), before the server stops."""
        await self.health.enter_graceful_shutdown()
        self.draining.set()

    async def stop(self, grace: float | None) -> None:
        """Stops the gRPC server, letting calls in flight finish for `grace` seconds (None: none)."""
        await self.grpc_server.stop(grace)

    def health_listener(self) -> grpc.aio.Server:
        """A plaintext server beside this one answering its health statuses alone, with no key,
        on --health-port; the caller starts and stops it.

        Orchestrators' gRPC probes (Kubernetes', a container HEALTHCHECK) speak neither TLS nor
        mutual TLS; this port gives them the statuses alone, never data or reflection."""
        config = self.config
        listener = grpc.aio.server(options=[("grpc.so_reuseport", 1 if config.workers > 1 else 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, listener)
        _listen(listener, replace(config, port=config.health_port).address, None)
        return listener

    def serve_metrics(self) -> WSGIServer:
        """Serves the metrics over HTTP on --metrics-host:--metrics-port, asking for --metrics-token
        when set; StartupError when that address cannot be bound. The listener's thread lives as
        long as the process (`shutdown()` on what this returns stops it)."""
        return self.metrics.serve_http(self.config)


def _track_health(
    health: HealthStatuses,
    served: list[str],
    word_vectors: WordVectorSlot,
    updates: set[asyncio.Task[None]],
) -> None:
    """grpc.health.v1: every service SERVING, WordVectors NOT_SERVING until its model is loaded.
    `updates` holds the update tasks until they are done."""
    loop = asyncio.get_running_loop()
    serving = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING

    def set_status(name: str, status: health_pb2.HealthCheckResponse.ServingStatus.ValueType) -> None:
        task = loop.create_task(health.set(name, status))
        updates.add(task)
        task.add_done_callback(updates.discard)

    for name in ["", *served]:
        set_status(name, serving)
    if not word_vectors.enabled:
        return
    set_status(WORD_VECTORS_SERVICE, not_serving)

    def on_loaded(ready: bool) -> None:
        if loop.is_closed():  # the server stopped before the model finished loading
            return
        with contextlib.suppress(RuntimeError):  # closed in between
            loop.call_soon_threadsafe(set_status, WORD_VECTORS_SERVICE, serving if ready else not_serving)

    word_vectors.add_done_callback(on_loaded)
    word_vectors.start()


def build_server(
    config: ServerConfig,
    components: Components | None = None,
    *,
    on_stream_batch: BatchObserver | None = None,
) -> EmbedServer:
    """Registers every servicer and binds the port; the caller starts the server.

    Pass `components` to share loaded models between servers (tests do). `on_stream_batch` is
    told of every batch StreamBatches gathers (a seam for tests; see core.stream_plan).
    """
    if components is None:
        components = load_components(config)
    check_exposure(config)
    credentials = server_credentials(config)
    metrics = Metrics()
    interceptors: list[Any] = [MetricsInterceptor(metrics)]
    if config.api_keys:
        interceptors.append(ApiKeyInterceptor(config.api_keys))
    interceptors.append(MalformedRequestInterceptor())  # innermost: it wraps the servicers' handlers
    server = grpc.aio.server(options=channel_options(config), interceptors=interceptors)
    for model, seconds in components.load_seconds.items():
        metrics.model_load_seconds.labels(model).set(seconds)
    components.word_vectors.add_done_callback(
        lambda ready: metrics.model_load_seconds.labels("word_vectors").set(
            components.word_vectors.load_seconds
        )
    )
    budget = memory_budget(config, metrics)  # one per server: it lives on its loop
    tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(
        TokenizerServicer(components.tokenizer, config, budget), server
    )
    batcher = embed_batcher(components.model, config, metrics)  # one per server: it lives on its loop
    draining = asyncio.Event()
    add_encoding_servicer(
        BatchesServicer(
            components.tokenizer,
            components.corpora,
            components.model,
            config,
            batcher,
            draining,
            budget,
            on_batch=on_stream_batch,
        ),
        _BATCHES,
        server,
    )
    add_encoding_servicer(
        EmbeddingServicer(
            components.model,
            components.tokenizer,
            config,
            batcher,
            components.shared_memory,
            draining,
            budget,
        ),
        _EMBEDDING,
        server,
    )
    health = HealthStatuses()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    served = [TOKENIZER_SERVICE, BATCHES_SERVICE, EMBEDDING_SERVICE]
    if components.word_vectors.enabled:
        word_vectors_pb2_grpc.add_WordVectorsServiceServicer_to_server(
            WordVectorsServicer(components.word_vectors, config, budget), server
        )
    else:  # absent from health and reflection, but a call says why
        server.add_generic_rpc_handlers((disabled_word_vectors_handler(WORD_VECTORS_SERVICE),))
    health_updates: set[asyncio.Task[None]] = set()
    _track_health(health, served, components.word_vectors, health_updates)
    names = [*served, WORD_VECTORS_SERVICE] if components.word_vectors.enabled else served
    enable_reflection(server, [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name])
    port = _listen(server, config.address, credentials)
    return EmbedServer(server, port, config, health, metrics, budget, draining, health_updates)


def _listen(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise StartupError(f"cannot listen on {address}")
    return port


async def serve(config: ServerConfig, *, grace_seconds: float | None = None) -> bool:
    """Runs the server until SIGINT or SIGTERM, then lets in-flight calls finish.

    Returns False when a background load could not be stopped; the caller should then end the
    process without running native destructors under that thread.
    """
    # Handlers first: a signal that arrives while loading still ends the process cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    components = await asyncio.to_thread(load_components, config)
    if stop.is_set():  # told to stop while loading: never start serving
        _LOGGER.info("stopped while loading")
        return await asyncio.to_thread(components.close, config.grace)
    try:
        server = build_server(config, components)
        probes = server.health_listener() if config.health_port else None
        if config.metrics_port:  # before serving: a port in use stops the start, not a running server
            server.serve_metrics()
            _LOGGER.info(
                "metrics on http://%s:%d/metrics%s", config.metrics_host, config.metrics_port,
                " (bearer token required)" if config.metrics_token is not None else "",
            )  # fmt: skip
    except StartupError:
        await asyncio.to_thread(components.close, config.grace)
        raise
    # Everything imported and loaded so far (torch's, gRPC's and protobuf's objects) lives as long
    # as the process. Out of the collector's generations, a full collection no longer walks them
    # and pauses every call in flight. (The word vectors freeze their vocabulary again once loaded.)
    gc.freeze()
    grace = config.grace if grace_seconds is None else grace_seconds
    stop_by = None
    # Memory back to the kernel after bursts (none with --memory-trim-interval 0).
    budget = server.memory_budget
    trimmer = asyncio.create_task(
        AllocatorTrimmer(lambda: budget.released_bytes, config.memory_trim_interval).run()
    )
    try:
        await server.start()
        if probes is not None:
            await probes.start()
            _LOGGER.info("health checks (plaintext) on %s:%d", config.host, config.health_port)
        _LOGGER.info("embedserve listening on %s:%d", config.host, server.port)
        await stop.wait()
        _LOGGER.info("shutting down (grace %.1f s)", grace)
        stop_by = time.monotonic() + grace
        await server.enter_shutdown()
        await server.stop(grace)
        # One line an operator (or the reliability suite) can check: nothing cut off at shutdown.
        _LOGGER.info("calls finished: %s", json.dumps(server.metrics.finished_calls(), sort_keys=True))
    finally:
        trimmer.cancel()
        await server.stop(0)  # no-op after the graceful stop; ends a failed start
        if probes is not None:  # last: probes see NOT_SERVING while calls drain
            await probes.stop(None)
        # A load still running gets what is left of the grace period (at least a moment).
        left = grace if stop_by is None else max(0.1, stop_by - time.monotonic())
        stopped = await asyncio.to_thread(components.close, left)
    return stopped
