"""Prometheus metrics and per-call timings."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from email.message import Message
from pathlib import Path

import grpc
import numpy as np
import pytest
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

from .conftest import ServerThread, free_port, outside_address, start_cli_server

TINY = ServerConfig(port=0, device="cpu", word_vectors="none", log_level="WARNING")
SMALL_FLAGS = ("--vocab-size", "6", "--dim", "3", "--device", "cpu", "--word-vectors", "none")


def _scrape(host: str, port: int, authorization: str | None = None) -> tuple[int, Message, str]:
    """(status, headers, body) of GET http://host:port/metrics."""
    headers = {} if authorization is None else {"Authorization": authorization}
    request = urllib.request.Request(f"http://{host}:{port}/metrics", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, reply.headers, reply.read().decode()
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, refused.headers, refused.read().decode()


def _assert_unreachable_from_outside(port: int) -> None:
    """Nothing answers `port` on this machine's non-loopback address (when it has one)."""
    outside = outside_address()
    if outside is not None:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((outside, port), timeout=5).close()


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


def test_metrics_of_workers_add_up_on_loopback_behind_the_token(tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    server = start_cli_server(
        "--port", str(port), "--workers", "2", "--metrics-port", str(metrics_port), *SMALL_FLAGS,
        env={"TMPDIR": str(tmp_path), "EMBEDSERVE_METRICS_TOKEN": "m-workers-never-logged"},
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
        status, headers, body = _scrape("127.0.0.1", metrics_port)
        assert (status, headers["WWW-Authenticate"]) == (401, 'Bearer realm="embedserve metrics"')
        assert "embedserve_calls_total" not in body
        status, _, body = _scrape("127.0.0.1", metrics_port, "Bearer m-workers-never-logged")
        assert status == 200
        assert f'embedserve_calls_total{{code="OK",method="Tokenize"}} {calls}.0' in body, body
        assert 'embedserve_model_load_seconds{model="embedding"}' in body
        _assert_unreachable_from_outside(metrics_port)  # the parent binds 127.0.0.1 by default
    finally:
        assert server.terminate() == 0, server.log
    assert not list(tmp_path.glob("embedserve-metrics-*")), "the metrics folder is removed at exit"
    assert f"metrics of 2 workers on http://127.0.0.1:{metrics_port}/metrics (bearer token required)" in (
        server.log
    )
    assert "never-logged" not in server.log


def test_metrics_listen_on_loopback_by_default(default_components: Components) -> None:
    config = replace(TINY, metrics_port=free_port())
    assert config.metrics_host == "127.0.0.1"
    running = ServerThread(config, replace(default_components, config=config))
    listener = running.server.serve_metrics()
    try:
        assert listener.server_address[0] == "127.0.0.1"
        status, _, body = _scrape("127.0.0.1", config.metrics_port)  # no token asked
        assert status == 200
        assert "embedserve_call_seconds" in body
        _assert_unreachable_from_outside(config.metrics_port)
    finally:
        listener.shutdown()
        listener.server_close()
        running.stop()


def test_the_metrics_token_guards_every_scrape_and_api_keys_do_not_open_it() -> None:
    port = free_port()
    server = start_cli_server(
        *SMALL_FLAGS, "--api-key", "k-api-never-logged", "--metrics-port", str(port),
        "--metrics-host", "0.0.0.0", "--metrics-token", "m-token-never-logged", "--log-level", "DEBUG",
    )  # fmt: skip
    try:
        for host in ("127.0.0.1", *filter(None, [outside_address()])):
            for refused in (
                None, "Bearer", "Bearer wrong", "Bearer m-token-never-logged-but-longer",
                "Bearer k-api-never-logged", "Basic m-token-never-logged", "m-token-never-logged",
            ):  # fmt: skip
                status, headers, body = _scrape(host, port, refused)
                assert status == 401, (host, refused)
                assert headers["WWW-Authenticate"].startswith("Bearer"), (host, refused)
                assert "embedserve_" not in body, (host, refused)
            status, headers, body = _scrape(host, port, "Bearer m-token-never-logged")
            assert status == 200, host
            assert headers["Content-Type"].startswith("text/plain")
            assert "embedserve_call_seconds" in body
    finally:
        assert server.terminate() == 0, server.log
    assert f"metrics on http://0.0.0.0:{port}/metrics (bearer token required)" in server.log
    assert "never-logged" not in server.log, "a token or key reached the log"


@pytest.mark.parametrize("workers", [1, 2])
def test_exposed_metrics_without_a_token_refuse_to_start(workers: int) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "embedserve.server", "serve", "--port", str(free_port()), "--workers",
         str(workers), "--metrics-port", str(free_port()), "--metrics-host", "0.0.0.0", *SMALL_FLAGS],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--metrics-host 0.0.0.0 is reachable from other machines" in result.stderr
    assert "--metrics-token (EMBEDSERVE_METRICS_TOKEN)" in result.stderr
    assert "--insecure (EMBEDSERVE_INSECURE=1)" in result.stderr
    assert "listening on" not in result.stderr


def test_insecure_serves_exposed_metrics_without_a_token() -> None:
    port = free_port()
    server = start_cli_server(
        *SMALL_FLAGS, "--metrics-port", str(port), "--metrics-host", "0.0.0.0", "--insecure"
    )
    try:
        status, _, body = _scrape(outside_address() or "127.0.0.1", port)
        assert status == 200
        assert "embedserve_call_seconds" in body
    finally:
        assert server.terminate() == 0, server.log
