"""The composition root: load the components, register every servicer, serve."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from embedserve.v1 import batches_pb2_grpc, embedding_pb2_grpc, tokenizer_pb2_grpc

from .config import DEFAULT_CONTEXT_LENGTH, DEFAULT_DIM, DEFAULT_VOCAB_SIZE, ServerConfig
from .core import (
    CorpusStore,
    EmbeddingModel,
    StartupError,
    Tokenizer,
    load_embedding_tables,
    load_gpt2_tokenizer,
    resolve_device,
    seeded_embedding_tables,
)
from .services import BatchesServicer, EmbeddingServicer, TokenizerServicer

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Components:
    """Everything the servicers share; built once, before any server exists."""

    config: ServerConfig
    tokenizer: Tokenizer
    model: EmbeddingModel
    corpora: CorpusStore

    def close(self) -> None:
        self.model.close()


def load_components(config: ServerConfig, environ: Mapping[str, str] | None = None) -> Components:
    """Loads the tokenizer and the embedding tables; StartupError says what is wrong."""
    for name in ("max_message_bytes", "max_tokens_per_request", "max_texts_per_request", "max_batch_size"):
        if getattr(config, name) <= 0:
            raise StartupError(f"--{name.replace('_', '-')} must be positive, got {getattr(config, name)}")
    if not 0 <= config.port < 65536:
        raise StartupError(f"--port must be in [0, 65535], got {config.port}")
    started = time.perf_counter()
    tokenizer = load_gpt2_tokenizer(config.bpe_dir, os.environ if environ is None else environ)
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
            config.vocab_size or DEFAULT_VOCAB_SIZE,
            config.dim or DEFAULT_DIM,
            config.context_length or DEFAULT_CONTEXT_LENGTH,
            config.seed,
        )
    if config.data_dir is not None and not config.data_dir.is_dir():
        raise StartupError(f"--data-dir {config.data_dir} is not a folder")
    model = EmbeddingModel(tables, resolve_device(config.device))
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
    return Components(config, tokenizer, model, CorpusStore(config.data_dir, tokenizer))


def channel_options(config: ServerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


def build_server(config: ServerConfig, components: Components | None = None) -> tuple[grpc.aio.Server, int]:
    """Registers every servicer and binds the port; the caller starts the server.

    Pass `components` to share loaded models between servers (tests do).
    """
    if components is None:
        components = load_components(config)
    server = grpc.aio.server(options=channel_options(config))
    tokenizer_pb2_grpc.add_TokenizerServiceServicer_to_server(
        TokenizerServicer(components.tokenizer, config), server
    )
    batches_pb2_grpc.add_BatchesServiceServicer_to_server(
        BatchesServicer(components.tokenizer, components.corpora, components.model, config), server
    )
    embedding_pb2_grpc.add_EmbeddingServiceServicer_to_server(
        EmbeddingServicer(components.model, components.tokenizer, config), server
    )
    try:
        port = server.add_insecure_port(config.address)
    except RuntimeError as exc:
        raise StartupError(f"cannot listen on {config.address}: {exc}") from None
    if port == 0:
        raise StartupError(f"cannot listen on {config.address}")
    return server, port


async def serve(config: ServerConfig, *, grace_seconds: float = 5.0) -> None:
    """Runs the server until SIGINT or SIGTERM, then lets in-flight calls finish."""
    components = await asyncio.to_thread(load_components, config)
    server, port = build_server(config, components)
    await server.start()
    _LOGGER.info("embedserve listening on %s:%d", config.host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
        _LOGGER.info("shutting down (grace %.1f s)", grace_seconds)
        await server.stop(grace_seconds)
    finally:
        components.close()
