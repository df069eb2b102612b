"""The README's client example runs as printed and prints what its comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from embedserve.client import Client

from .conftest import VERDICT_PATH, CliServer, ServerThread

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_async_example(server: ServerThread, verdict_text: str, tmp_path: Path) -> None:
    example = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)[0]
    assert '"127.0.0.1:50051"' in example
    script = example.replace('"127.0.0.1:50051"', repr(server.target)).replace(
        '"the-verdict.txt"', repr(str(VERDICT_PATH))
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "5154"
    assert lines[1].startswith("[[   40   367  2885  1464]")
    assert "(8, 4) (8, 4)" in lines
    assert lines[-1] == "(8, 4, 256)"


def test_readme_sync_example(server: ServerThread, verdict_text: str, tmp_path: Path) -> None:
    example = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)[1]
    assert "with Client() as client:" in example
    script = (
        f"raw_text = open({str(VERDICT_PATH)!r}, encoding='utf-8').read()\n"
        + example.replace("Client()", f"Client({server.target!r})")
        + "print(inputs.dtype, tuple(targets.shape), vectors.dtype, tuple(vectors.shape))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "torch.int64 (8, 4) torch.float32 (1, 4, 256)"


def test_readme_first_command_serves() -> None:
    """`bash server/serve.sh` (the README's first command) brings a server up and takes flags."""
    text = README.read_text()
    assert "bash server/serve.sh    # installs into .venv on first run" in text
    script = README.parent / "server" / "serve.sh"
    server = CliServer(
        "--vocab-size", "6", "--dim", "3", "--seed", "123", "--device", "cpu", "--word-vectors", "none",
        program=["bash", str(script)],
    )  # fmt: skip
    try:
        with Client(server.target) as client:
            assert client.info().vocab_size == 6
    finally:
        assert server.terminate() == 0, server.log
