"""CI's seconds-long runs of the benchmarks: answers must be right; no time is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import requires_glove

BENCH = Path(__file__).resolve().parents[1] / "bench" / "word_vectors.py"
SERVING = Path(__file__).resolve().parents[1] / "bench" / "serving.py"


def test_word_vectors_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--smoke",
            "--word-vectors",
            "none",
            "--client-process",
            "--scanners",
            "columns-first,rows-first,prefilter,candidates",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (synthetic,) = json.loads(out.read_text())["results"]
    assert synthetic["matched"] == synthetic["compared"] > 0
    assert synthetic["server_ms"] > 0
    assert synthetic["server_apart_ms"] > 0  # the same calls from a client in another process
    assert synthetic["search_float32_ms"] > 0
    assert synthetic["scanner"] in ("rows-first", "prefilter")  # the server's choice on a CPU
    # Every scanner, picked by name, times the same search.
    assert set(synthetic["search_by_scanner_ms"]) == {
        "columns-first",
        "rows-first",
        "prefilter",
        "candidates",
    }
    assert all(ms > 0 for ms in synthetic["search_by_scanner_ms"].values())


def test_serving_benchmark_smoke(tmp_path: Path) -> None:
    """Every section runs end to end against real server processes and reports a figure."""
    out = tmp_path / "serving.json"
    result = subprocess.run(
        [sys.executable, str(SERVING), "--smoke", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(out.read_text())["rows"]
    sections = {row["section"] for row in rows}
    assert {"a", "b", "d", "f"} <= sections
    assert all(row["value"] > 0 for row in rows)


def test_window_plans_benchmark_smoke(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "bench" / "window_plans.py"
    figures = []
    for order in ([], ["--no-shuffle"]):
        result = subprocess.run(
            [
                sys.executable,
                str(script),
                "--tokens",
                "2000000",
                "--batches",
                "200",
                "--folder",
                str(tmp_path),
                *order,
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        figures.append(json.loads(result.stdout))
    assert [f["code"] for f in figures] == ["mapped orders"] * 2
    assert all(f["windows"] == 2_000_000 - 256 and f["batches_per_s"] > 0 for f in figures)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus-2000000.tokens"]  # the orders are removed


@requires_glove
def test_device_thread_benchmark_smoke(tmp_path: Path) -> None:
    out = tmp_path / "device-thread.json"
    command = [sys.executable, str(SERVING.parent / "device_thread.py"), "--tree", "this=", "--smoke"]
    result = subprocess.run([*command, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())["figures"]
    assert figures["mix_most_similar_queries_s"]["medians"]["this"] > 0
    assert figures["embed_4_tokens_s"]["medians"]["this"] > 0


def test_object_storage_bench_smoke(tmp_path: Path) -> None:
    """Local disk, a warm and a cold shard cache of a moto S3 server deliver the same tokens."""
    pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    out = tmp_path / "object-storage.json"
    command = [sys.executable, str(SERVING.parent / "object_storage.py"), "--smoke", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(out.read_text())
    assert results["corpus"]["shards"] > 1
    for setting in ("in order", "shuffled"):
        figures = results["figures"][setting]
        assert all(rate > 0 for rate in figures["median_tokens_per_s"].values())
        assert set(figures["median_ratio"]) == {"warm", "cold"}


def test_prepare_bench_smoke(tmp_path: Path) -> None:
    """prepare and litdata.optimize write the same number of tokens from the same small files."""
    pytest.importorskip("litdata")
    out = tmp_path / "prepare.json"
    command = [sys.executable, str(SERVING.parent / "prepare.py"), "--smoke", "--folder", str(tmp_path)]
    result = subprocess.run([*command, "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert set(report["datasets"]) == {"many", "one"}
    for figures in report["datasets"].values():
        assert figures["tokens"] > 0
        assert figures["prepare_mb_s"][0] > 0
        assert figures["litdata_mb_s"][0] > 0
        assert "tiktoken" in figures["encoders_alone_mb_s"]
