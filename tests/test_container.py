"""The image itself: built from the Dockerfile with podman (deploy/container/build-offline.sh, offline)
and run as containers that publish their gRPC port on 127.0.0.1 only. It keeps its HEALTHCHECK,
runs as uid 10001, refuses to serve exposed without protection, requires its API keys, and passes
the conformance suite.

Skips without podman, or where podman cannot run a container; EMBEDSERVE_REQUIRE_CONTAINER=1 (CI)
makes those failures instead."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest
from embedserve.client import Client, UnauthenticatedError

from .conformance.runner import run_cases
from .conftest import VERDICT_PATH, free_port

_LOGGER = logging.getLogger(__name__)

CONTAINER_DIR = Path(__file__).resolve().parents[1] / "deploy" / "container"
BUILD_SCRIPT = CONTAINER_DIR / "build-offline.sh"
IMAGE = "localhost/embedserve:test"
API_KEY = "container-test-key"
# The conformance suite's `tiny` server: the notebook's 6 x 3 example.
TINY_ARGS = ("serve", "--vocab-size", "6", "--dim", "3", "--context-length", "4", "--seed", "123",
             "--word-vectors", "none")  # fmt: skip
HEALTHY_WITHIN_S = 120.0
BUILD_TIMEOUT_S = 3600.0
# build-offline.sh's exit statuses that mean "not on this machine" rather than "the build broke".
_MISSING_TOOL, _CANNOT_RUN = 2, 3

pytestmark = pytest.mark.slow


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("EMBEDSERVE_REQUIRE_CONTAINER") == "1":
        pytest.fail(f"containers are required here (EMBEDSERVE_REQUIRE_CONTAINER=1): {reason}")
    pytest.skip(reason)


def _podman_env() -> dict[str, str]:
    """podman's settings for this machine (no systemd, capped limits), as build-offline.sh uses them."""
    conf = os.environ.get("CONTAINERS_CONF", str(CONTAINER_DIR / "containers.conf"))
    return {**os.environ, "CONTAINERS_CONF": conf}


def podman(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, env=_podman_env()
    )
    if check:
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.stdout}{result.stderr}"
    return result


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The Dockerfile's image, built (or found current in the caches) by build-offline.sh."""
    if shutil.which("podman") is None:
        _unavailable("podman is not installed (apt-get install podman runc debootstrap)")
    log = tmp_path_factory.mktemp("container-build") / "build-offline.log"
    started = time.monotonic()
    with log.open("w") as out:
        built = subprocess.run(
            ["bash", str(BUILD_SCRIPT), IMAGE],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=BUILD_TIMEOUT_S,
            # The image gets the versions installed where the tests run.
            env={**_podman_env(), "EMBEDSERVE_PYTHON": sys.executable},
        )
    tail = "\n".join(log.read_text().splitlines()[-40:])
    if built.returncode in (_MISSING_TOOL, _CANNOT_RUN):
        _unavailable(f"build-offline.sh cannot build here:\n{tail}")
    assert built.returncode == 0, f"build-offline.sh failed:\n{tail}"
    _LOGGER.info("image %s ready in %.1f s", IMAGE, time.monotonic() - started)
    return IMAGE


@dataclass(frozen=True)
class Container:
    name: str
    port: int  # the host port published, on 127.0.0.1, for the container's 50051
    healthy_after_s: float

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def inspect(self, template: str) -> str:
        return podman("inspect", "--format", template, self.name).stdout.strip()


def _logs(name: str) -> str:
    result = podman("logs", name, check=False)
    return (result.stdout + result.stderr)[-6000:]


def _wait_healthy(name: str, started: float) -> float:
    """Seconds from `podman run` until the image's own HEALTHCHECK passes."""
    while True:
        if podman("healthcheck", "run", name, check=False).returncode == 0:
            return time.monotonic() - started
        state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
        if state != "running":
            raise AssertionError(f"container {name} is {state or 'gone'}:\n{_logs(name)}")
        if time.monotonic() - started > HEALTHY_WITHIN_S:
            raise AssertionError(f"container {name} not healthy within {HEALTHY_WITHIN_S} s:\n{_logs(name)}")
        time.sleep(0.5)


@contextlib.contextmanager
def running(image: str, *args: str, env: Mapping[str, str]) -> Iterator[Container]:
    """A container of `image` (with `args` after it) on podman's bridge network, its 50051 published
    on a free port of 127.0.0.1 alone; healthy when yielded, removed afterwards."""
    name = f"embedserve-test-{uuid.uuid4().hex[:12]}"
    port = free_port()
    variables = [f"--env={key}={value}" for key, value in env.items()]
    started = time.monotonic()
    try:
        podman("run", "--detach", "--name", name, "--publish", f"127.0.0.1:{port}:50051", *variables,
               image, *args)  # fmt: skip
        container = Container(name, port, _wait_healthy(name, started))
        _LOGGER.info("%s %s healthy after %.1f s", image, " ".join(args), container.healthy_after_s)
        yield container
    finally:
        podman("rm", "--force", "--time", "5", name, check=False)


@pytest.fixture(scope="module")
def default_container(image: str) -> Iterator[Container]:
    """The image's own command (`serve`, GloVe included), with an API key."""
    with running(image, env={"EMBEDSERVE_API_KEYS": API_KEY}) as container:
        yield container


@pytest.fixture(scope="module")
def tiny_container(image: str) -> Iterator[Container]:
    """The conformance suite's tiny server, unprotected on the container's private address."""
    with running(image, *TINY_ARGS, env={"EMBEDSERVE_INSECURE": "1"}) as container:
        yield container


def test_the_image_keeps_its_healthcheck_user_and_command(image: str) -> None:
    config = json.loads(podman("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    # Kept only in the docker format (build-offline.sh's --format docker): OCI images have no HEALTHCHECK.
    # podman shows it beside Config rather than inside it.
    healthcheck = json.loads(podman("image", "inspect", "--format", "{{json .HealthCheck}}", image).stdout)
    assert healthcheck["Test"] == ["CMD", "embedserve", "health", "--timeout", "3"]
    assert config["User"] == "10001:10001"
    assert (config["Entrypoint"], config["Cmd"]) == (["embedserve"], ["serve"])


def test_the_default_command_refuses_to_serve_unprotected_and_says_what_to_set(image: str) -> None:
    refused = podman("run", "--rm", image, timeout=120, check=False)
    assert refused.returncode != 0, refused.stdout + refused.stderr
    assert "EMBEDSERVE_INSECURE" in refused.stdout + refused.stderr, refused.stderr


def test_the_server_runs_as_uid_10001(default_container: Container) -> None:
    status = podman("exec", default_container.name, "cat", "/proc/1/status").stdout
    uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == ["10001"] * 4  # real, effective, saved, file system


def test_only_the_grpc_port_is_published_and_only_on_loopback(default_container: Container) -> None:
    assert default_container.inspect("{{.HostConfig.NetworkMode}}") == "bridge"
    ports = json.loads(default_container.inspect("{{json .NetworkSettings.Ports}}"))
    published = {port: bindings for port, bindings in ports.items() if bindings}
    assert published == {"50051/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(default_container.port)}]}


def test_the_healthcheck_passes_and_health_inside_says_serving(default_container: Container) -> None:
    assert podman("healthcheck", "run", default_container.name, check=False).returncode == 0
    health = podman("exec", default_container.name, "embedserve", "health")
    assert "SERVING" in health.stdout


def test_the_api_key_is_required_through_the_published_port(default_container: Container) -> None:
    with Client(default_container.target, timeout=20) as client, pytest.raises(UnauthenticatedError):
        client.tokenize("hello world")
    with Client(default_container.target, timeout=20, api_key=API_KEY) as client:
        assert client.tokenize("hello world") == [31373, 995]


def test_the_conformance_suite_passes_against_the_containers(
    default_container: Container, tiny_container: Container
) -> None:
    # The key goes to both: the tiny server has no keys and ignores the header.
    results = run_cases(
        targets={"default": default_container.target, "tiny": tiny_container.target},
        verdict=VERDICT_PATH if VERDICT_PATH.is_file() else None,
        api_key=API_KEY,
    )
    failed = [f"{result.name}: {result.detail}" for result in results if result.outcome == "failed"]
    assert not failed, "\n".join(failed)
    assert any(result.outcome == "passed" for result in results)
