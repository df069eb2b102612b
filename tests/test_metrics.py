"""Prometheus metrics and per-call timings."""

from __future__ import annotations

import contextlib
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
from embedserve.client import AsyncClient, Client, EmbedServeError
from embedserve.server import ServerConfig
from embedserve.server.app import Components
from embedserve.v1 import (
    batches_pb2,
    batches_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    tensor_pb2,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from prometheus_client import generate_latest

from .conftest import ServerThread, free_port, start_cli_server

TINY = ServerConfig(port=0, device="cpu", word_vectors="none", log_level="WARNING")


async def test_calls_batches_and_timings_are_measured(default_components: Components) -> None:
    running = ServerThread(TINY, replace(default_components, config=TINY))
    try:
        async with AsyncClient(running.target) as client:
            for _ in range(3):
                await client.embed(np.arange(16).reshape(2, 8))
            with contextlib.suppress(EmbedServeError):
                await client.embed([99999])
            _ = [b async for b in client.stream_batches(text="a b c d e f g h i j k", max_length=2, stride=2)]
        async with grpc.aio.insecure_channel(running.target) as channel:
            call = embedding_pb2_grpc.EmbeddingServiceStub(channel).Embed(
                embedding_pb2.EmbedRequest(
                    token_ids=tensor_pb2.Tensor(
                        dtype=tensor_pb2.DTYPE_INT32, shape=[2], data=np.array([1, 2], np.int32).tobytes()
                    )
                )
            )
            await call
            trailing = dict(await call.trailing_metadata())
            tokenize = tokenizer_pb2_grpc.TokenizerServiceStub(channel).Tokenize(
                tokenizer_pb2.TokenizeRequest(texts=["timed"])
            )
            await tokenize
            tokenize_trailing = dict(await tokenize.trailing_metadata())
            stream = batches_pb2_grpc.BatchesServiceStub(channel).StreamBatches(
                batches_pb2.StreamBatchesRequest(text="a b c d e f", batch_size=1, max_length=2, stride=2)
            )
            assert len([reply async for reply in stream]) == 2
            stream_trailing = dict(await stream.trailing_metadata())
        queue_ms, compute_ms = (
            float(trailing["embedserve-queue-ms"]),
            float(trailing["embedserve-compute-ms"]),
        )
        assert queue_ms >= 0
        assert compute_ms > 0
        assert float(trailing["embedserve-server-ms"]) >= compute_ms
        assert float(tokenize_trailing["embedserve-server-ms"]) > 0
        assert float(stream_trailing["embedserve-server-ms"]) > 0
        text = generate_latest(running.server.metrics.registry).decode()
    finally:
        running.stop()
    assert "embedserve_embed_queue_seconds_count 4.0" in text
    assert "embedserve_embed_batch_requests_count 4.0" in text
    assert "embedserve_embed_batch_requests_sum 4.0" in text
    assert 'embedserve_calls_total{code="OK",method="Embed"} 4.0' in text
    assert 'embedserve_calls_total{code="INVALID_ARGUMENT",method="Embed"} 1.0' in text
    assert 'embedserve_calls_total{code="OK",method="StreamBatches"} 2.0' in text
    assert 'embedserve_calls_total{code="OK",method="Tokenize"} 1.0' in text
    assert "embedserve_embed_batch_tokens_count 4.0" in text
    assert 'embedserve_model_load_seconds{model="embedding"}' in text
    assert 'embedserve_open_streams{method="StreamBatches"} 0.0' in text


def test_metrics_port_serves_prometheus_text() -> None:
    port = free_port()
    server = start_cli_server("--device", "cpu", "--word-vectors", "none", "--metrics-port", str(port))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            body = reply.read().decode()
        assert "embedserve_call_seconds" in body
    finally:
        assert server.terminate() == 0, server.log


def test_metrics_of_workers_add_up(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    server = start_cli_server(
        "--port", str(port), "--workers", "2", "--metrics-port", str(metrics_port), "--vocab-size", "6",
        "--dim", "3", "--device", "cpu", "--word-vectors", "none",
        env={"TMPDIR": str(tmp_path)},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while server.log.count("listening on") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        calls = 16
        for _ in range(calls):  # a fresh connection each time: the kernel spreads them over the workers
            with Client(f"127.0.0.1:{port}") as client:
                assert client.tokenize("hello world") == [31373, 995]
        (folder,) = tmp_path.glob("embedserve-metrics-*")
        assert len(list(folder.glob("counter_*.db"))) == 2, "both workers served calls"
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
            body = reply.read().decode()
        assert f'embedserve_calls_total{{code="OK",method="Tokenize"}} {calls}.0' in body, body
        assert 'embedserve_model_load_seconds{model="embedding"}' in body
    finally:
        assert server.terminate() == 0, server.log
    assert not list(tmp_path.glob("embedserve-metrics-*")), "the metrics folder is removed at exit"
