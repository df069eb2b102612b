"""The synchronous Client, the CLI's client commands, and `embedserve serve` as a real process."""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import grpc
import numpy as np
import pytest
import tiktoken
import torch
from embedserve.client import Client, InvalidArgumentError, NotFoundError
from embedserve.server import ServerConfig, parse_server_config
from embedserve.server.cli import OPENMP_WAITING, main
from embedserve.server.config import (
    _FLAGS,
    DEFAULT_CONTEXT_LENGTH,
    DEFAULT_DIM,
    DEFAULT_VOCAB_SIZE,
    _optional_int,
    _optional_path,
    _optional_str,
    env_name,
)
from embedserve.server.core.embedding import resolve_device

from .conftest import ServerThread, free_port, start_cli_server


def test_sync_client_mirrors_the_async_one(server: ServerThread) -> None:
    with Client(server.target) as client:
        ids = client.tokenize("Hello, world")
        assert ids == [15496, 11, 995]
        assert client.tokenize_batch(["a", "b c"]) == [[64], [65, 269]]
        assert client.detokenize(ids) == "Hello, world"
        vectors = client.embed([ids, ids])
        assert vectors.shape == (2, 3, 256)
        streamed = list(client.embed_stream([ids, ids[:1]]))
        np.testing.assert_array_equal(streamed[0], vectors[0])
        batches = client.stream_batches(
            text="word " * 500, batch_size=4, max_length=8, stride=8, shuffle=False
        )
        first = next(batches)
        assert first.inputs.shape == (4, 8)
        batches.close()
        assert client.info().dim == 256
        with pytest.raises(InvalidArgumentError) as raised:
            client.embed([99999])
        assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(NotFoundError):
            list(client.stream_batches(corpus="absent.txt"))


async def test_sync_client_works_inside_a_running_event_loop(server: ServerThread) -> None:
    # As in Jupyter, where a loop is already running in the caller's thread.
    with Client(server.target) as client:
        assert client.tokenize("loop") == [26268]


def test_cli_client_commands(
    server: ServerThread,
    capsys: pytest.CaptureFixture[str],
    data_dir: Path,
    reference_encoding: tiktoken.Encoding,
) -> None:
    target = ["--target", server.target]
    assert main(["tokenize", "Hello, world", *target]) == 0
    assert capsys.readouterr().out.strip() == "15496 11 995"
    assert main(["embed", "40", "367", *target]) == 0
    assert "shape [2, 256]" in capsys.readouterr().out
    assert main(["info", *target]) == 0
    assert "vocab_size: 50257" in capsys.readouterr().out
    assert (
        main(
            [
                "batches",
                "--file",
                str(data_dir / "small.txt"),
                "--batch-size",
                "2",
                "--max-length",
                "4",
                "--stride",
                "4",
                "--no-shuffle",
                "--embeddings",
                *target,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "inputs [2, 4], targets [2, 4], embeddings [2, 4, 256]" in out
    ids = reference_encoding.encode((data_dir / "small.txt").read_text())
    first_inputs = np.array2string(np.array([ids[0:4], ids[4:8]]), max_line_width=120)
    first_targets = np.array2string(np.array([ids[1:5], ids[5:9]]), max_line_width=120)
    assert f"first batch inputs:\n{first_inputs}\nfirst batch targets:\n{first_targets}\n" in out
    assert f"batches: {(len(ids) - 4 + 3) // 4 // 2}" in out  # windows at 0, 4, ... below len - 4
    assert (
        main(["batches", "--corpus", "nested/inner.txt", "--batch-size", "2", "--max-length", "4", *target])
        == 0
    )
    assert "received" in capsys.readouterr().out
    assert main(["embed", "50257", *target]) == 1
    assert "INVALID_ARGUMENT" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["tokenize"],
        ["batches"],
        ["embed"],
        ["info"],
        ["similar"],
        ["similarity"],
        ["analogies"],
        ["health"],
        ["prepare"],
        ["prepare-vectors"],
    ],
)
def test_help_everywhere(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    assert "usage: embedserve" in capsys.readouterr().out


def test_every_flag_reads_its_environment_variable() -> None:
    environ = {
        "EMBEDSERVE_HOST": "0.0.0.0",
        "EMBEDSERVE_PORT": "6000",
        "EMBEDSERVE_VOCAB_SIZE": "6",
        "EMBEDSERVE_DIM": "3",
        "EMBEDSERVE_CONTEXT_LENGTH": "8",
        "EMBEDSERVE_SEED": "7",
        "EMBEDSERVE_DEVICE": "cpu",
        "EMBEDSERVE_WEIGHTS": "/w.safetensors",
        "EMBEDSERVE_TOKEN_EMBEDDING_KEY": "a",
        "EMBEDSERVE_POSITION_EMBEDDING_KEY": "b",
        "EMBEDSERVE_DATA_DIR": "/data",
        "EMBEDSERVE_BPE_DIR": "/bpe",
        "EMBEDSERVE_MAX_MESSAGE_BYTES": "1000",
        "EMBEDSERVE_MAX_TOKENS_PER_REQUEST": "10",
        "EMBEDSERVE_MAX_TEXTS_PER_REQUEST": "11",
        "EMBEDSERVE_MAX_BATCH_SIZE": "12",
        "EMBEDSERVE_WORD_VECTORS": "none",
        "EMBEDSERVE_CACHE_DIR": "/cache",
        "EMBEDSERVE_MAX_TOPN": "13",
        "EMBEDSERVE_WORD_VECTOR_PREFILTER": "off",
        "EMBEDSERVE_MAX_QUERIES_PER_REQUEST": "14",
        "EMBEDSERVE_LOG_LEVEL": "DEBUG",
    }
    config = parse_server_config([], environ)
    assert config == ServerConfig(
        host="0.0.0.0",
        port=6000,
        vocab_size=6,
        dim=3,
        context_length=8,
        seed=7,
        device="cpu",
        weights=Path("/w.safetensors"),
        token_embedding_key="a",
        position_embedding_key="b",
        data_dir=Path("/data"),
        bpe_dir=Path("/bpe"),
        max_message_bytes=1000,
        max_tokens_per_request=10,
        max_texts_per_request=11,
        max_batch_size=12,
        word_vectors="none",
        cache_dir=Path("/cache"),
        max_topn=13,
        word_vector_prefilter="off",
        max_queries_per_request=14,
        log_level="DEBUG",
    )
    assert parse_server_config(["--port", "7000"], environ).port == 7000
    assert parse_server_config([], {}) == ServerConfig()


def test_the_defaults_are_the_issues() -> None:
    config = parse_server_config([], {})
    assert config.address == "127.0.0.1:50051"
    assert (config.seed, config.device, config.dtype) == (123, "auto", "float32")
    assert (DEFAULT_VOCAB_SIZE, DEFAULT_DIM, DEFAULT_CONTEXT_LENGTH) == (50257, 256, 1024)
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")


def test_every_server_flag_has_a_variable() -> None:
    """All of ServerConfig, including flags added after the test above was written."""
    samples: dict[object, tuple[str, object]] = {
        _optional_path: ("/some/where", Path("/some/where")),
        _optional_int: ("17", 17),
        _optional_str: ("custom", "custom"),
        int: ("17", 17),
        float: ("2.5", 2.5),
        str: ("custom", "custom"),
    }
    defaults = ServerConfig()
    for field in fields(ServerConfig):
        expected: object
        if field.name == "api_keys":
            text, expected = "k1,k2", ("k1", "k2")
        elif field.name == "insecure":
            text, expected = "1", True
        else:
            text, expected = samples[_FLAGS[field.name][0]]
        assert expected != getattr(defaults, field.name), field.name
        parsed = parse_server_config([], {env_name(field.name): text})
        assert getattr(parsed, field.name) == expected, field.name


def test_serve_sets_openmp_waiting_before_torch_loads() -> None:
    """libgomp reads its variables once, when torch loads: `serve` sets them first, and only
    where the operator set neither."""
    probe = (
        "import os, sys\n"
        "from embedserve.server import cli\n"
        "assert 'torch' not in sys.modules, 'the CLI must not load torch before it tunes OpenMP'\n"
        "operator = {'OMP_WAIT_POLICY': 'PASSIVE'}\n"
        "assert not cli.tune_openmp(operator) and operator == {'OMP_WAIT_POLICY': 'PASSIVE'}\n"
        "assert cli.tune_openmp(os.environ)\n"
        "import torch\n"
        "assert not cli.tune_openmp({})  # too late once torch is loaded\n"
        "print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])\n"
    )
    environ = {k: v for k, v in os.environ.items() if k not in OPENMP_WAITING}
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=environ
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [OPENMP_WAITING["OMP_WAIT_POLICY"], OPENMP_WAITING["GOMP_SPINCOUNT"]]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_runs_and_stops_cleanly_on_a_signal(signum: int) -> None:
    server = start_cli_server("--vocab-size", "6", "--dim", "3", "--seed", "123", "--device", "cpu")
    try:
        with Client(f"127.0.0.1:{server.port}") as client:
            np.testing.assert_allclose(
                client.embed([2, 3, 5, 1], include_positional=False)[0], [1.2753, -0.2010, -0.1606], atol=1e-4
            )
    finally:
        assert server.terminate(signum=signum) == 0, server.log
    assert "shutting down" in server.log


def test_serve_refuses_bad_startup_config_clearly(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "embedserve.server",
            "serve",
            "--port",
            "0",
            "--weights",
            str(tmp_path / "x.pt"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--weights" in result.stderr
    assert "no such file" in result.stderr

    # A metrics port already taken stops the start as clearly, before anything is served.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        result = subprocess.run(
            [sys.executable, "-m", "embedserve.server", "serve", "--port", "0", "--vocab-size", "6",
             "--dim", "3", "--device", "cpu", "--word-vectors", "none", "--metrics-port", busy],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"cannot serve metrics on 127.0.0.1:{busy}" in result.stderr
    assert "listening on" not in result.stderr


def test_sync_embed_stream_pulls_in_a_worker_thread(server: ServerThread) -> None:
    with Client(server.target) as client:

        def windows() -> Iterator[list[int]]:
            for text in ("one", "two words", "three more words"):
                yield client.tokenize(text)  # the same Client, called from the producer

        shapes = [e.shape for e in client.embed_stream(windows())]
        assert shapes == [(1, 256), (2, 256), (3, 256)]

        def broken() -> Iterator[list[int]]:
            yield [1]
            raise RuntimeError("producer broke")

        with pytest.raises(RuntimeError, match="producer broke"):
            list(client.embed_stream(broken()))


def test_sync_clients_leave_no_threads_behind(server: ServerThread) -> None:
    def client_threads() -> int:
        return sum(t.name == "embedserve-client" for t in threading.enumerate())

    before = client_threads()
    with pytest.raises(ValueError, match="positive"):
        Client(server.target, timeout=0)
    for _ in range(3):
        client = Client(server.target)
        client.info()
        del client
    gc.collect()
    with Client(server.target) as client:
        client.info()
    assert client_threads() == before


def test_nonsense_limits_and_environment_are_refused_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    from embedserve.server.app import load_components
    from embedserve.server.core import StartupError

    with pytest.raises(StartupError, match="--max-batch-size must be positive"):
        load_components(ServerConfig(max_batch_size=0, device="cpu"))
    monkeypatch.setenv("EMBEDSERVE_TIMEOUT", "abc")
    with pytest.raises(SystemExit) as exited:
        main(["info"])
    assert exited.value.code == 2


def test_sigterm_while_word_vectors_load_exits_cleanly(tmp_path: Path) -> None:
    source = tmp_path / "vectors.txt"
    rng = np.random.default_rng(0)
    with source.open("w") as out:
        for index in range(60_000):
            out.write(f"w{index} " + " ".join(f"{v:.4f}" for v in rng.standard_normal(20)) + "\n")
    cache = tmp_path / "cache"
    server = start_cli_server(
        "--vocab-size", "6", "--dim", "3", "--device", "cpu", "--word-vectors", str(source),
        env={"EMBEDSERVE_CACHE_DIR": str(cache)},
    )  # fmt: skip
    assert server.terminate() == 0, server.log
    assert "shutting down" in server.log
    # Whether the read finished first or not, no half-written cache is left behind.
    leftovers = [p.name for p in cache.glob("*")] if cache.exists() else []
    assert all((cache / name / "meta.json").is_file() for name in leftovers), leftovers


def test_workers_share_one_port_and_stop_together() -> None:
    port = free_port()
    server = start_cli_server(
        "--port", str(port), "--workers", "2", "--vocab-size", "6", "--dim", "3", "--device", "cpu",
        "--word-vectors", "none",
    )  # fmt: skip
    try:
        children_file = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children")
        workers = children_file.read_text().split()
        assert len(workers) == 2
        deadline = time.monotonic() + 30
        while server.log.count("listening on") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        for _ in range(8):  # a fresh connection each time: the kernel spreads them over the workers
            with Client(f"127.0.0.1:{port}") as client:
                np.testing.assert_allclose(
                    client.embed([2, 3, 5, 1], include_positional=False)[0],
                    [1.2753, -0.2010, -0.1606],
                    atol=1e-4,
                )
    finally:
        assert server.terminate() == 0, server.log
    assert server.log.count("shutting down") == 2
