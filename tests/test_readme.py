"""The README's client example runs as printed and prints what its comments say."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from .conftest import VERDICT_PATH, ServerThread

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
