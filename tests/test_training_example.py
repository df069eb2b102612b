"""docs/examples/train_gpt_input.py, run as the docs say: stopped mid-epoch and resumed in a fresh
process, it sees exactly the batches, and reaches exactly the losses, of an uninterrupted run."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from .conftest import TINY_CONFIG, ServerThread, start_server

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "train_gpt_input.py"
DOC = REPO / "docs" / "training-data.md"
# 26 windows of 16 tokens: with 2 workers and batches of 4, an epoch is 6 batches.
STORY = " ".join(f"w{i % 41} {i}" for i in range(140))


@pytest.fixture(scope="module")
def corpus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    data_dir = tmp_path_factory.mktemp("training-data")
    (data_dir / "story.txt").write_text(STORY)
    running = start_server(replace(TINY_CONFIG, data_dir=str(data_dir)))
    yield running
    running.stop()


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("train_gpt_input", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def _flags(target: str, steps: int, checkpoint: Path, workers: int) -> list[str]:
    model = ["--max-length", "16", "--stride", "16", "--dim", "16", "--heads", "2"]
    run = ["--steps", str(steps), "--checkpoint", str(checkpoint), "--num-workers", str(workers)]
    return ["--target", target, "--corpus", "story.txt", *model, *run, "--save-every", "100"]


def _start(target: str, steps: int, checkpoint: Path) -> subprocess.Popen[str]:
    """The example in a process of its own, with 2 workers forked by the default start method."""
    command = [sys.executable, str(EXAMPLE), *_flags(target, steps, checkpoint, 2)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _lines(run: subprocess.Popen[str]) -> list[dict[str, Any]]:
    out, err = run.communicate(timeout=180)
    assert run.returncode == 0, err[-4000:]
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
def test_a_resumed_run_sees_exactly_the_batches_of_an_uninterrupted_one(
    corpus_server: ServerThread, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = corpus_server.target
    first = _start(target, 4, tmp_path / "run.pt")
    # Meanwhile, the uninterrupted run here, without workers (this process runs a gRPC server, so
    # it cannot fork any): the order of the windows, so the batches, are those of 2 workers.
    _example().main(_flags(target, 9, tmp_path / "whole.pt", 0))
    uninterrupted = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    before = _lines(first)
    after = _lines(_start(target, 9, tmp_path / "run.pt"))  # a fresh process, from run.pt

    assert [line["step"] for line in uninterrupted] == list(range(1, 10))
    assert [line["epoch"] for line in uninterrupted] == [0] * 6 + [1] * 3
    epoch_0 = {line["batch"] for line in uninterrupted[:6]}
    assert len(epoch_0) == 6
    assert not epoch_0 & {line["batch"] for line in uninterrupted[6:]}  # set_epoch gave new batches
    resumed = before + after
    assert [line["step"] for line in after] == list(range(5, 10))
    assert [(line["epoch"], line["batch"]) for line in resumed] == [
        (line["epoch"], line["batch"]) for line in uninterrupted
    ]
    # The model and the optimizer came back too: the same losses, to rounding.
    for got, want in zip(resumed, uninterrupted, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got["step"]


def test_the_documented_commands_are_the_examples() -> None:
    """Every `docs/examples/train_gpt_input.py` command in the docs parses with the example's flags."""
    example = _example()
    text = DOC.read_text(encoding="utf-8").replace("\\\n", " ")
    commands = re.findall(r"^python docs/examples/train_gpt_input\.py (.+)$", text, flags=re.MULTILINE)
    assert len(commands) >= 2
    for command in commands:
        args = example.parse_args(shlex.split(command, comments=True))
        assert args.steps > 0
