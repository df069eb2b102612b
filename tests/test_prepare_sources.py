"""`embedserve prepare` from Parquet files, globs, Arrow IPC files and streams, and folders saved by
`datasets`: the tokens equal tiktoken's over the same texts joined by <|endoftext|>."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
import tiktoken
from embedserve.server.cli import main
from embedserve.server.core import InvalidInput, NotFound, Tokenizer, load_gpt2_tokenizer
from embedserve.server.core.document_sources import ArrowFile, JsonLines, ParquetFile, open_sources
from embedserve.server.core.prepared import prepare_corpus

from .corpus_files import prepared_tokens

ROWS: list[str | None] = [
    "I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow enough.",
    None,  # nulls are skipped
    "Ünïcödé text, 数字 123, emoji 🙂, and a literal <|endoftext|> inside a row.",
    "",  # an empty string is a document
    "Two lines\nand a paragraph break\n\nthen more.",
    "Short.",
    None,
    " leading space and trailing newline\n",
    "ends in half a special token <|endoftext",
    "|> and this one starts with its other half",
]
TEXTS = [text for text in ROWS if text is not None]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_gpt2_tokenizer(None, {})


def _prepared(*arguments: Any, **options: Any) -> dict[str, Any]:
    """prepare_corpus's manifest, as its JSON reads."""
    manifest: dict[str, Any] = json.loads(prepare_corpus(*arguments, **options).to_json())
    return manifest


def _expected(encoding: tiktoken.Encoding, texts: Sequence[str]) -> list[int]:
    return encoding.encode("<|endoftext|>".join(texts), allowed_special={"<|endoftext|>"})


def _prepare_with_cli(data_dir: Path, *arguments: str) -> tuple[list[int], dict[str, object]]:
    assert main(["prepare", *arguments, "--out", "corpus", "--data-dir", str(data_dir)]) == 0
    tokens = prepared_tokens(data_dir, "corpus").tolist()
    return tokens, json.loads((data_dir / "corpus.json").read_text())


def _sources(meta: dict[str, object]) -> list[tuple[str, int]]:
    entries = meta["sources"]
    assert isinstance(entries, list)
    return [(Path(entry["path"]).name, entry["documents"]) for entry in entries]


def test_parquet_with_row_groups_nulls_and_unicode(
    tmp_path: Path, reference_encoding: tiktoken.Encoding
) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"id": list(range(len(ROWS))), "text": ROWS}), path, row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups >= 3

    tokens, meta = _prepare_with_cli(tmp_path / "data", str(path))

    assert tokens == _expected(reference_encoding, TEXTS)
    assert meta["documents"] == len(TEXTS)
    assert meta["sources"] == [
        {"path": str(path.resolve()), "bytes": path.stat().st_size, "documents": len(TEXTS)}
    ]


def test_a_glob_reads_its_matches_in_sorted_order(
    tmp_path: Path, reference_encoding: tiktoken.Encoding, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.table({"text": TEXTS[3:]}), shards / "part-1.parquet")  # written first, read second
    pq.write_table(pa.table({"text": TEXTS[:3]}), shards / "part-0.parquet")
    (shards / "notes.txt").write_text("not matched")

    tokens, meta = _prepare_with_cli(tmp_path / "data", str(shards / "*.parquet"))

    assert tokens == _expected(reference_encoding, TEXTS)
    assert _sources(meta) == [("part-0.parquet", 3), ("part-1.parquet", len(TEXTS) - 3)]
    capsys.readouterr()
    assert main(["prepare", str(shards / "*.arrow"), "--out", "x", "--data-dir", str(tmp_path / "data")]) == 1
    assert "matches no file" in capsys.readouterr().err


def _write_ipc_file(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):
            writer.write_batch(batch)


def _write_ipc_stream(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        for batch in table.to_batches(max_chunksize=2):
            writer.write_batch(batch)


def _write_feather(path: Path, table: pa.Table) -> None:
    feather.write_feather(table, str(path), chunksize=2)  # Feather v2 is the IPC file format


@pytest.mark.parametrize(
    ("name", "write"),
    [("rows.arrow", _write_ipc_file), ("rows.arrow", _write_ipc_stream), ("rows.feather", _write_feather)],
    ids=["ipc-file", "ipc-stream", "feather"],
)
def test_arrow_ipc_files_and_streams(
    tmp_path: Path,
    tokenizer: Tokenizer,
    reference_encoding: tiktoken.Encoding,
    name: str,
    write: Callable[[Path, pa.Table], None],
) -> None:
    path = tmp_path / name
    table = pa.table({"text": pa.array(ROWS, pa.large_string()), "id": list(range(len(ROWS)))})
    write(path, table)

    meta = _prepared([path], "corpus", tmp_path / "data", tokenizer, threads=2)

    tokens = prepared_tokens(tmp_path / "data", "corpus").tolist()
    assert tokens == _expected(reference_encoding, TEXTS)
    assert _sources(meta) == [(name, len(TEXTS))]
    batches = list(ArrowFile(path, "text", batch_rows=1).batches())
    assert [batch.texts for batch in batches if batch.texts] == [[text] for text in TEXTS]


def test_a_folder_saved_by_datasets(tmp_path: Path, reference_encoding: tiktoken.Encoding) -> None:
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ROWS, "n": list(range(len(ROWS)))}).save_to_disk(
        str(folder), num_shards=2
    )
    order = [entry["filename"] for entry in json.loads((folder / "state.json").read_text())["_data_files"]]
    assert len(order) == 2

    tokens, meta = _prepare_with_cli(tmp_path / "data", str(folder))

    assert tokens == _expected(reference_encoding, TEXTS)
    assert [name for name, _ in _sources(meta)] == order
    assert sum(count for _, count in _sources(meta)) == len(TEXTS)

    splits = tmp_path / "splits"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(str(splits))
    with pytest.raises(InvalidInput, match=r"DatasetDict \(splits: train\); name one split's folder"):
        open_sources([splits])


def test_text_column_names_the_column_and_the_jsonl_field(
    tmp_path: Path, reference_encoding: tiktoken.Encoding
) -> None:
    table = tmp_path / "body.parquet"
    pq.write_table(pa.table({"body": TEXTS[:3], "text": ["not this"] * 3}), table)
    records = tmp_path / "body.jsonl"
    records.write_text("".join(json.dumps({"body": text}) + "\n" for text in TEXTS[3:]))
    expected = _expected(reference_encoding, TEXTS)

    tokens, _ = _prepare_with_cli(tmp_path / "new", str(table), str(records), "--text-column", "body")
    assert tokens == expected
    tokens, _ = _prepare_with_cli(tmp_path / "old", str(table), str(records), "--text-field", "body")
    assert tokens == expected


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_a_missing_column_names_the_columns_there_are(
    tmp_path: Path, tokenizer: Tokenizer, suffix: str
) -> None:
    path = tmp_path / f"rows{suffix}"
    table = pa.table({"body": ["a"], "id": [1]})
    if suffix == ".parquet":
        pq.write_table(table, path)
    else:
        _write_ipc_stream(path, table)
    with pytest.raises(
        InvalidInput, match=r"no column 'text' \(choose one with --text-column\); its columns: 'body', 'id'"
    ):
        prepare_corpus([path], "x", tmp_path / "data", tokenizer)
    assert not (tmp_path / "data").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("values", "kind"),
    [(pa.array([1, 2], pa.int64()), "int64"), (pa.array([b"a", b"b"], pa.binary()), "binary")],
    ids=["int64", "binary"],
)
def test_a_column_that_is_not_text_is_refused_with_its_type(
    tmp_path: Path, tokenizer: Tokenizer, values: pa.Array, kind: str
) -> None:
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": values}), path)
    with pytest.raises(InvalidInput, match=f"column 'text' holds {kind}, not text"):
        prepare_corpus([path], "x", tmp_path / "data", tokenizer)


def test_unreadable_inputs_are_refused_clearly(tmp_path: Path, tokenizer: Tokenizer) -> None:
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(InvalidInput, match=r"fake\.parquet: cannot be read as Parquet"):
        open_sources([fake])
    (tmp_path / "fake.arrow").write_text("not arrow")
    with pytest.raises(InvalidInput, match=r"fake\.arrow: cannot be read as Arrow IPC"):
        open_sources([tmp_path / "fake.arrow"])
    with pytest.raises(InvalidInput, match="not a dataset saved by save_to_disk"):
        open_sources([tmp_path])
    with pytest.raises(NotFound, match="no such file"):
        open_sources([tmp_path / "missing.parquet"])
    (tmp_path / "x.jsonl").write_text("")
    assert [type(source) for source in open_sources([tmp_path / "x.jsonl"])] == [JsonLines]


def test_parquet_streams_record_batches_in_bounded_memory(
    tmp_path: Path, tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding
) -> None:
    """200,000 rows in 40 row groups, read 1,000 rows at a time: Arrow never holds more than a few
    row groups' worth (pre-buffering the file would hold ~40% of it at once)."""
    texts = [f"document {i}: ünïcödé {i * 7919 % 100003}" for i in range(200_000)]
    path = tmp_path / "big.parquet"
    column = pa.array(texts)
    pq.write_table(pa.table({"text": column, "id": pa.array(range(len(texts)))}), path, row_group_size=5_000)

    source = ParquetFile(path, "text", batch_rows=1_000)
    baseline = pa.total_allocated_bytes()
    peak = 0
    sizes: list[int] = []
    positions: list[int] = []
    first_and_last: list[str] = []
    for batch in source.batches():
        peak = max(peak, pa.total_allocated_bytes() - baseline)
        sizes.append(len(batch.texts))
        positions.append(batch.position)
        first_and_last += [batch.texts[0], batch.texts[-1]]
    assert sizes == [1_000] * 200
    assert first_and_last[0] == texts[0]
    assert first_and_last[-1] == texts[-1]
    assert positions == sorted(positions)
    assert positions[-1] == path.stat().st_size
    assert peak < column.nbytes / 5, (peak, column.nbytes)

    reported: list[tuple[int, int]] = []
    meta = _prepared(
        [path],
        "big",
        tmp_path / "data",
        tokenizer,
        batch_rows=1_000,
        progress=lambda d, t, _: reported.append((d, t)),
    )
    assert meta["documents"] == len(texts)
    assert reported[-1] == (path.stat().st_size, path.stat().st_size)
    tokens = prepared_tokens(tmp_path / "data", "big")
    assert tokens.tolist() == _expected(reference_encoding, texts)
