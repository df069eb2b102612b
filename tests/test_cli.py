"""The CLI's client commands (`embedserve tokenize`, `batches`, `embed`, `info`, ...) and its help."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tiktoken
from embedserve.server.cli import main

from .conftest import ServerThread


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


def test_the_batches_command_flags_are_the_batch_spec_fields() -> None:
    """`embedserve batches` declares no stream setting of its own: its flags are BatchSpec's."""
    from embedserve.client import BatchSpec
    from embedserve.server.cli import build_parser

    args = build_parser({}).parse_args(["batches", "--corpus", "x"])
    assert BatchSpec.from_arguments(args) == BatchSpec()
    args = build_parser({}).parse_args(
        ["batches", "--corpus", "x", "--batch-size", "2", "--no-shuffle", "--embeddings", "--world-size", "2"]
    )
    assert BatchSpec.from_arguments(args) == BatchSpec(
        batch_size=2, shuffle=False, include_embeddings=True, world_size=2
    )
