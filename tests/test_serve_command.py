"""`embedserve serve` as a real process: OpenMP set-up, signals, startup refusals, workers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from embedserve.client import Client
from embedserve.server.cli import OPENMP_WAITING

from .conftest import free_port, start_cli_server


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
