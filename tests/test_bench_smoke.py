"""CI's seconds-long run of the WordVectors benchmark: it must agree with gensim; no time is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "word_vectors.py"


def test_word_vectors_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--word-vectors", "none", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (synthetic,) = json.loads(out.read_text())["results"]
    assert synthetic["matched"] == synthetic["compared"] > 0
    assert synthetic["server_ms"] > 0
