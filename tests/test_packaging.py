"""One distribution `embedserve`: the wheel's layout, a wheel install, and a torch-free client import."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import embedserve.client
import embedserve.server
import embedserve.v1
import pytest

from .conftest import CliServer

REPO = Path(__file__).resolve().parents[1]


def test_client_import_pulls_in_no_torch_tiktoken_or_gensim() -> None:
    code = (
        "import sys, embedserve.client, embedserve.v1.embedding_pb2;"
        "print(sorted(m for m in ('torch', 'tiktoken', 'gensim', 'safetensors') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_editable_install_maps_the_top_level_folders() -> None:
    assert Path(embedserve.server.__file__).parent == REPO / "server"
    assert Path(embedserve.client.__file__).parent == REPO / "client"
    assert Path(embedserve.v1.__file__).parent == REPO / "protos" / "embedserve" / "v1"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("embedserve-*.whl")
    return built


def test_wheel_holds_only_the_embedserve_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert top_level == {"embedserve", wheel.name.split("-py3")[0] + ".dist-info"}
    for expected in (
        "embedserve/v1/embedding_pb2.py",
        "embedserve/v1/embedding_pb2.pyi",
        "embedserve/v1/embedding_pb2_grpc.py",
        "embedserve/v1/embedding.proto",
        "embedserve/server/core/tokenizer.py",
        "embedserve/client/py.typed",
    ):
        assert expected in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "embedserve = embedserve.server.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_wheel_install_serves(wheel: Path, tmp_path: Path) -> None:
    # pip installs the wheel (its files, its console script) into a folder of its own; the
    # dependencies come from this environment.
    site = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet", "--target", str(site),
         str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    script = site / "bin" / "embedserve"
    assert script.is_file()
    env = {"PYTHONPATH": str(site), "PATH": f"{site / 'bin'}:/usr/bin:/bin"}
    server = CliServer(
        "--vocab-size", "6", "--dim", "3", "--seed", "123", "--device", "cpu", "--word-vectors", "none",
        env=env, program=[sys.executable, str(script), "serve"],
    )  # fmt: skip
    try:
        code = (
            "import embedserve.server.app as app, embedserve.client as c;"
            f"assert app.__file__.startswith({str(site)!r}), app.__file__;"
            f"client = c.Client({server.target!r});"
            "print([round(v, 4) for v in client.embed([2], include_positional=False)[0].tolist()]);"
            "client.close()"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "[1.2753, -0.201, -0.1606]"
    finally:
        assert server.terminate() == 0, server.log


def test_repository_layout_is_the_design_cards() -> None:
    for folder in ("protos/embedserve/v1", "server", "client", "tests"):
        assert (REPO / folder).is_dir(), folder
    for file in ("Dockerfile", "pyproject.toml", "README.md", ".ci/run"):
        assert (REPO / file).is_file(), file
