"""Two replicas (with API keys) behind a real nginx (deploy/nginx/embedserve.conf), all on
127.0.0.1: calls spread over both; when one replica is killed under load, or both are restarted
in turn, unary calls still succeed (client retries, nginx's next upstream) and a StreamBatches
consumer resumes on the other replica with no window lost or repeated."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from embedserve.client import AsyncClient, Batch, UnauthenticatedError

from .conftest import CliServer, free_port, start_cli_server

API_KEY = "load-balanced-key"  # replicas require it; nginx passes the header through
NGINX_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "embedserve.conf"
REPLICA_FLAGS = ("--device", "cpu", "--word-vectors", "none", "--dim", "64", "--context-length", "64")
TEXT = " ".join(f"replica{i % 389} serves window {i}" for i in range(6000))
# 256 kB batches (with their embeddings): too many to sit in transport buffers, so killing the
# replica really cuts the stream.
STREAM: dict[str, Any] = {
    "batch_size": 16, "max_length": 64, "stride": 8, "shuffle": True, "seed": 11, "include_embeddings": True,
}  # fmt: skip


def _nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        if os.environ.get("EMBEDSERVE_REQUIRE_NGINX"):
            pytest.fail("nginx is required (EMBEDSERVE_REQUIRE_NGINX) but not installed")
        pytest.skip("nginx is not installed (.ci/run installs the Debian package)")
    return found


def render_nginx_config(folder: Path, listen_port: int, replica_ports: list[int]) -> Path:
    """deploy/nginx/embedserve.conf with local addresses, inside a minimal nginx.conf."""
    shipped = NGINX_CONFIG.read_text()
    upstreams = re.findall(r"^\s*server embedserve-\d+:50051 .*;$", shipped, flags=re.MULTILINE)
    assert len(upstreams) == len(replica_ports), "the shipped config lists one server per replica"
    for line, port in zip(upstreams, replica_ports, strict=True):
        shipped = shipped.replace(line, re.sub(r"embedserve-\d+:50051", f"127.0.0.1:{port}", line))
    shipped = shipped.replace("listen 50051 http2;", f"listen 127.0.0.1:{listen_port} http2;")
    (folder / "embedserve.conf").write_text(shipped)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {folder / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers could not open the temp paths otherwise
    main = folder / "nginx.conf"
    main.write_text(
        f"{user}worker_processes 1;\ndaemon off;\npid {folder / 'nginx.pid'};\n"
        f"error_log {folder / 'error.log'} info;\n"
        "events { worker_connections 1024; }\n"
        f"http {{\n    access_log {folder / 'access.log'};\n{temp_paths}\n"
        f"    include {folder / 'embedserve.conf'};\n}}\n"
    )
    return main


class Nginx:
    def __init__(self, folder: Path, replica_ports: list[int]) -> None:
        self.folder = folder
        self.port = free_port()
        config = render_nginx_config(folder, self.port, replica_ports)
        binary = _nginx_binary()
        check = subprocess.run([binary, "-t", "-c", str(config), "-e", str(folder / "error.log")],
                               capture_output=True, text=True)  # fmt: skip
        assert check.returncode == 0, check.stderr
        self.process = subprocess.Popen(
            [binary, "-c", str(config), "-e", str(folder / "error.log")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise AssertionError(f"nginx did not start:\n{self.log}") from None
                time.sleep(0.05)
        self.target = f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text() if path.exists() else ""

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Replica:
    """`embedserve serve` on a fixed port (so a restarted replica is where nginx expects it)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        self.server = self._start()

    def _start(self) -> CliServer:
        flags = ["--port", str(self.port), "--metrics-port", str(self.metrics_port), "--grace", "10"]
        flags += ["--api-key", API_KEY]
        return start_cli_server(*REPLICA_FLAGS, *flags)

    def _metric(self, name: str, labels: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        found = re.search(rf"^{name}\{{{re.escape(labels)}\}} (\S+)$", text, flags=re.MULTILINE)
        return float(found.group(1)) if found else 0.0

    def calls(self, method: str) -> float:
        """OK calls of `method` this replica has finished, from its Prometheus metrics."""
        return self._metric("embedserve_calls_total", f'code="OK",method="{method}"')

    def open_streams(self, method: str) -> float:
        return self._metric("embedserve_open_streams", f'method="{method}"')

    def kill(self) -> None:
        self.server.process.kill()
        self.server.process.wait(10)

    def restart(self) -> None:
        """A rolling update's step: SIGTERM (the replica drains), then a new one on the same port."""
        assert self.server.terminate() == 0, self.server.log
        self.server = self._start()

    def stop(self) -> None:
        if self.server.process.poll() is None:
            self.server.terminate()


@pytest.fixture
def balanced(tmp_path: Path) -> Iterator[tuple[Nginx, list[Replica]]]:
    _nginx_binary()
    replicas = [Replica(), Replica()]
    nginx = None
    try:
        nginx = Nginx(tmp_path, [replica.port for replica in replicas])
        yield nginx, replicas
    finally:
        if nginx is not None:
            nginx.stop()
        for replica in replicas:
            replica.stop()


def _windows(batches: list[Batch]) -> list[tuple[int, ...]]:
    return [tuple(row) for batch in batches for row in batch.inputs.tolist()]


async def test_calls_spread_over_both_replicas(balanced: tuple[Nginx, list[Replica]]) -> None:
    nginx, replicas = balanced
    # One connection to nginx, calls spread over the replicas behind it.
    async with AsyncClient(nginx.target, connections=1, api_key=API_KEY) as client:
        texts = [f"call {i} through nginx" for i in range(40)]
        answers = await asyncio.gather(*(client.tokenize(text) for text in texts))
        assert answers[3] == await client.tokenize(texts[3])
        embedded = await client.embed(np.arange(64).reshape(2, 32))
    assert embedded.shape == (2, 32, 64)
    async with AsyncClient(nginx.target) as keyless:
        with pytest.raises(UnauthenticatedError):
            await keyless.tokenize("no key")
    served = [replica.calls("Tokenize") for replica in replicas]
    assert sum(served) == 41
    assert min(served) >= 10, f"round robin should spread 41 calls over both replicas, got {served}"


async def test_a_replica_killed_under_load_loses_no_call_and_no_window(
    balanced: tuple[Nginx, list[Replica]],
) -> None:
    nginx, replicas = balanced
    async with AsyncClient(nginx.target, api_key=API_KEY) as client:
        expected = [batch async for batch in client.stream_batches(text=TEXT, **STREAM)]
        assert len(expected) > 40
        reference = await client.embed(np.arange(256).reshape(8, 32))

        received: list[Batch] = []
        stream = client.stream_batches(text=TEXT, **STREAM)
        for _ in range(5):
            received.append(await anext(stream))
        streaming = [replica.open_streams("StreamBatches") for replica in replicas]
        assert sorted(streaming) == [0.0, 1.0], streaming
        victim = replicas[streaming.index(1.0)]

        stop_load = asyncio.Event()
        outcomes: list[str] = []

        async def unary_load(worker: int) -> None:
            while not stop_load.is_set():
                try:
                    tokens = await client.tokenize(f"load from worker {worker}")
                    embedded = await client.embed(np.arange(256).reshape(8, 32))
                    assert len(tokens) > 0
                    outcomes.append("OK" if np.array_equal(embedded, reference) else "WRONG")
                except Exception as error:  # recorded, so the test reports every failure
                    outcomes.append(f"{type(error).__name__}: {error}")
                    await asyncio.sleep(0.01)

        load = [asyncio.create_task(unary_load(worker)) for worker in range(8)]
        await asyncio.sleep(0.5)
        assert victim.open_streams("StreamBatches") == 1.0, "the stream is still open when its replica dies"
        victim.kill()
        received += [batch async for batch in stream]  # reconnects through nginx, resumes from its cursor
        await asyncio.sleep(0.5)
        stop_load.set()
        await asyncio.gather(*load)

    failures = [outcome for outcome in outcomes if outcome != "OK"]
    assert not failures, f"{len(failures)} of {len(outcomes)} calls failed: {sorted(set(failures))[:5]}"
    assert len(outcomes) > 20
    print(f"{len(outcomes)} unary call pairs through nginx while a replica died, all answered")
    assert [batch.index for batch in received] == [batch.index for batch in expected]
    assert _windows(received) == _windows(expected)
    for got, want in zip(received, expected, strict=True):
        assert got.embeddings is not None
        assert want.embeddings is not None
        assert np.array_equal(got.embeddings, want.embeddings)
    survivor = next(replica for replica in replicas if replica is not victim)
    assert survivor.calls("StreamBatches") >= 1  # the resumed stream


async def test_a_rolling_restart_drops_no_call(balanced: tuple[Nginx, list[Replica]]) -> None:
    nginx, replicas = balanced
    async with AsyncClient(nginx.target, api_key=API_KEY) as client:
        expected = [batch async for batch in client.stream_batches(text=TEXT, **STREAM)]
        reference = await client.embed(np.arange(256).reshape(8, 32))
        stop_load = asyncio.Event()
        outcomes: list[str] = []

        async def unary_load() -> None:
            while not stop_load.is_set():
                try:
                    embedded = await client.embed(np.arange(256).reshape(8, 32))
                    outcomes.append("OK" if np.array_equal(embedded, reference) else "WRONG")
                except Exception as error:  # recorded, so the test reports every failure
                    outcomes.append(f"{type(error).__name__}: {error}")
                    await asyncio.sleep(0.01)

        async def consume() -> list[Batch]:
            received = []
            async for batch in client.stream_batches(text=TEXT, **STREAM):
                received.append(batch)
                await asyncio.sleep(0.02)  # a training step: the stream outlives both restarts
            return received

        load = [asyncio.create_task(unary_load()) for _ in range(8)]
        consumer = asyncio.create_task(consume())
        for replica in replicas:  # one at a time, as a Deployment with maxUnavailable 0 does
            await asyncio.sleep(0.5)
            await asyncio.to_thread(replica.restart)
        await asyncio.sleep(0.5)
        stop_load.set()
        await asyncio.gather(*load)
        received = await consumer

    failures = [outcome for outcome in outcomes if outcome != "OK"]
    assert not failures, f"{len(failures)} of {len(outcomes)} calls failed: {sorted(set(failures))[:5]}"
    assert len(outcomes) > 50
    print(f"{len(outcomes)} calls through nginx during a rolling restart of both replicas, all answered")
    assert _windows(received) == _windows(expected)
