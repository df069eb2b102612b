"""Prepared corpora: `embedserve prepare` output, and StreamBatches serving it memory-mapped."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from embedserve.client import AsyncClient, InvalidArgumentError
from embedserve.server import ServerConfig
from embedserve.server.cli import main
from embedserve.server.core import InvalidInput, load_gpt2_tokenizer
from embedserve.server.core.corpus import CorpusStore
from embedserve.server.core.prepared import prepare_corpus, progress_reporter
from embedserve.server.core.stretch_encoding import plan_stretches
from embedserve.server.core.tokenizer import GPT2_CUT_BEFORE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import start_server
from .corpus_files import document_starts, manifest_of, prepared_tokens, shard_paths

DOCUMENTS = [
    "I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow enough.",
    "Ünïcödé text, 数字 123, and a literal <|endoftext|> inside a document.",
    "",
    "Short.",
]


def _write_inputs(folder: Path) -> list[Path]:
    first = folder / "a.txt"
    first.write_text(DOCUMENTS[0])
    records = folder / "b.jsonl.gz"
    with gzip.open(records, "wt", encoding="utf-8") as out:
        for text in DOCUMENTS[1:]:
            out.write(json.dumps({"text": text, "id": 7}) + "\n")
        out.write("\n")  # blank lines are skipped
    return [first, records]


def test_prepare_writes_tokens_joined_by_endoftext(
    tmp_path: Path, reference_encoding: tiktoken.Encoding
) -> None:
    data_dir = tmp_path / "data"
    tokenizer = load_gpt2_tokenizer(None, {})
    manifest = prepare_corpus(_write_inputs(tmp_path), "books", data_dir, tokenizer, threads=2)
    expected = reference_encoding.encode("<|endoftext|>".join(DOCUMENTS), allowed_special={"<|endoftext|>"})
    assert prepared_tokens(data_dir, "books").tolist() == expected
    meta = manifest_of(data_dir, "books")
    assert meta["kind"] == "embedserve-corpus"
    assert meta["format"] == 2
    assert meta["token_count"] == len(expected) == manifest.token_count
    assert meta["documents"] == 4
    assert meta["dtype"] == "uint16"
    assert meta["separator"] == {"policy": "endoftext-between-documents", "token_id": 50256}
    assert meta["identity"] == manifest.identity
    (shard,) = meta["shards"]
    raw = (data_dir / shard["file"]).read_bytes()
    assert shard["sha256"] == hashlib.sha256(raw).hexdigest()
    assert shard["bytes"] == len(raw)
    # A document's own "<|endoftext|>" text is not a boundary: each document starts after the one
    # separator prepare put before it.
    lengths = [len(reference_encoding.encode(d, allowed_special={"<|endoftext|>"})) for d in DOCUMENTS]
    assert document_starts(data_dir, "books") == [sum(lengths[:k]) + k for k in range(len(DOCUMENTS))]
    assert [s["documents"] for s in meta["sources"]] == [1, 3]
    # No partial files: the manifest, and the shard folder's token and offset files.
    assert sorted(p.name for p in data_dir.iterdir()) == ["books.json", "books.shards"]
    assert sorted(p.suffix for p in (data_dir / "books.shards").iterdir()) == [".docs", ".tokens"]

    store = CorpusStore(data_dir, tokenizer)
    for name in ("books", "books.json"):
        assert store.tokens(name).tolist() == expected


def test_prepare_refuses_bad_input_clearly(tmp_path: Path) -> None:
    tokenizer = load_gpt2_tokenizer(None, {})
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(InvalidInput, match=r"broken.jsonl:2: no string field 'text'"):
        prepare_corpus([broken], "x", tmp_path / "data", tokenizer)
    with pytest.raises(InvalidInput, match="--out"):
        prepare_corpus([broken], "../escape", tmp_path / "data", tokenizer)
    assert not list((tmp_path / "data").rglob("*.*"))  # nothing half-written


def test_cli_prepare_then_stream_equals_the_text(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], reference_encoding: tiktoken.Encoding
) -> None:
    data_dir = tmp_path / "data"
    inputs = _write_inputs(tmp_path)
    assert main(["prepare", *map(str, inputs), "--out", "books", "--data-dir", str(data_dir)]) == 0
    assert "books:" in capsys.readouterr().out
    (data_dir / "plain.txt").write_text("<|endoftext|>".join(DOCUMENTS))
    running = start_server(
        ServerConfig(port=0, device="cpu", word_vectors="none", data_dir=str(data_dir), dim=8)
    )

    async def collect(corpus: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        async with AsyncClient(running.target) as client:
            return [
                (b.inputs, b.targets, b.embeddings)
                async for b in client.stream_batches(
                    batch_size=2,
                    max_length=4,
                    stride=3,
                    shuffle=True,
                    seed=5,
                    include_embeddings=True,
                    corpus=corpus,
                )
            ]

    try:
        prepared = asyncio.run(collect(corpus="books"))
        plain = asyncio.run(collect(corpus="plain.txt"))
        assert len(prepared) == len(plain) > 3
        for (got_inputs, targets, embeddings), (want_inputs, want_targets, want_embeddings) in zip(
            prepared, plain, strict=True
        ):
            np.testing.assert_array_equal(got_inputs, want_inputs)
            np.testing.assert_array_equal(targets, want_targets)
            np.testing.assert_array_equal(embeddings, want_embeddings)
        shard_paths(data_dir, "books")[0].write_bytes(b"\0\0")  # truncated
        with pytest.raises(InvalidArgumentError, match="truncated"):
            asyncio.run(collect(corpus="books"))
    finally:
        running.stop()


PIECES = [
    "a",
    "bc",
    " ",
    "  ",
    "\n",
    "\n\n",
    " \n",
    "\t",
    "é",
    "12",
    "'s",
    "!",
    "数",
    "\r\n",
    "\u3000",
    "\xa0",
]
PIECES += ["<|endoftext|>", "<", "<|"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=st.lists(
        st.sampled_from(PIECES),
        max_size=400,
    ),
    piece_chars=st.integers(1, 60),
)
def test_long_documents_split_where_the_encoding_cannot_change(
    parts: list[str], piece_chars: int, reference_encoding: tiktoken.Encoding
) -> None:
    """Special tokens built from fragments too: prepare cuts documents with <|endoftext|> allowed."""
    text = "".join(parts)
    pieces = [text[start:end] for start, end in plan_stretches(text, GPT2_CUT_BEFORE, piece_chars)]
    assert "".join(pieces) == text
    special = {"<|endoftext|>"}
    joined = [i for piece in pieces for i in reference_encoding.encode(piece, allowed_special=special)]
    assert joined == reference_encoding.encode(text, allowed_special=special)


def test_progress_goes_to_the_callers_writer_every_few_seconds_and_at_the_end() -> None:
    """The core prints nothing: the reporter hands its lines to `write` (the CLI's stderr)."""
    lines: list[str] = []
    report = progress_reporter("prepare books", lines.append, every_seconds=3600)
    report(1_000_000, 4_000_000, 250_000)  # the first round
    report(2_000_000, 4_000_000, 500_000)  # within the hour: held back
    report(4_000_000, 4_000_000, 1_000_000)  # the end is always told
    assert len(lines) == 2
    assert lines[0].startswith("prepare books:  25.0% of 4.0 MB, 250,000 tokens, ")
    assert lines[1].startswith("prepare books: 100.0% of 4.0 MB, 1,000,000 tokens, ")
    assert all(line.endswith(" MB/s") for line in lines)
