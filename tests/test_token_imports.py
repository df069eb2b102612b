"""`embedserve import`: token files written as nanoGPT, llm.c and Megatron-LM write them (their
writers replicated below), served as they are, and an old single-file corpus converted."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import tiktoken
from embedserve.client import AsyncClient
from embedserve.server import ServerConfig
from embedserve.server.cli import build_parser, main
from embedserve.server.core import InvalidInput, NotFound, Tokenizer, load_gpt2_tokenizer
from embedserve.server.core.corpus import CorpusStore
from embedserve.server.core.manifest import read_manifest
from embedserve.server.core.storage import FsspecStorage, LocalStorage
from embedserve.server.core.token_imports import FORMATS, import_corpus

from .conftest import start_server
from .corpus_files import document_starts, manifest_of

EXTRA_DOCUMENTS = ["Ünïcödé text, 数字 123.", "Short.", "A last one. It has two sentences."]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_gpt2_tokenizer(None, {})


@pytest.fixture(scope="module")
def documents(verdict_text: str) -> list[str]:
    """Real text: the-verdict's paragraphs, then a few more."""
    return [part for part in verdict_text.split("\n\n") if part.strip()] + EXTRA_DOCUMENTS


# --- the projects' writers, replicated -------------------------------------------------------


def write_nanogpt(path: Path, documents: Sequence[str], enc: tiktoken.Encoding) -> list[list[int]]:
    """nanoGPT data/openwebtext/prepare.py: each document's ids with eot appended, then the
    concatenation written into a uint16 np.memmap in contiguous batches. Returns each document's ids."""
    dset = []
    for text in documents:
        ids = enc.encode_ordinary(text)  # encode_ordinary ignores any special tokens
        ids.append(enc.eot_token)  # add the end of text token, e.g. 50256 for gpt2 bpe
        dset.append(ids)
    arr_len = np.sum([len(ids) for ids in dset], dtype=np.uint64)
    arr = np.memmap(path, dtype=np.uint16, mode="w+", shape=(int(arr_len),))
    total_batches = 4
    idx = 0
    for batch_idx in range(total_batches):
        batch = dset[batch_idx * len(dset) // total_batches : (batch_idx + 1) * len(dset) // total_batches]
        if not batch:
            continue
        arr_batch = np.concatenate([np.array(ids) for ids in batch])
        arr[idx : idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
    del arr
    return dset


LLMC_HEADERS_INFO: dict[str, dict[str, Any]] = {
    "gpt-2": {"magic": 20240520, "version": 1, "token_dtype": np.uint16},
    "llama-3": {"magic": 20240801, "version": 7, "token_dtype": np.uint32},
}


def write_datafile(filename: Path, toks: Sequence[int], model_desc: str = "gpt-2") -> None:
    """llm.c dev/data/data_common.py write_datafile."""
    assert len(toks) < 2**31, "token count too large"  # ~2.1B tokens
    info = LLMC_HEADERS_INFO[model_desc]
    header = np.zeros(256, dtype=np.int32)  # header is always 256 int32 values
    header[0] = info["magic"]
    header[1] = info["version"]
    header[2] = len(toks)  # number of tokens after the 256*4 bytes of header
    toks_np = np.array(toks, dtype=info["token_dtype"])
    with open(filename, "wb") as f:
        f.write(header.tobytes())
        f.write(toks_np.tobytes())


def write_llmc_shards(
    folder: Path, documents: Sequence[str], enc: tiktoken.Encoding, shard_size: int
) -> list[Path]:
    """llm.c dev/data/fineweb.py with tokenize_gpt2: eot before each document; shards of
    shard_size tokens, a document split across two where it does not fit."""
    paths: list[Path] = []
    all_tokens_np = np.empty((shard_size,), dtype=np.uint16)
    token_count = 0
    shard_index = 0
    eot = enc._special_tokens["<|endoftext|>"]
    for doc in documents:
        tokens = np.array([eot, *enc.encode_ordinary(doc)]).astype(np.uint16)
        if token_count + len(tokens) < shard_size:
            all_tokens_np[token_count : token_count + len(tokens)] = tokens
            token_count += len(tokens)
        else:
            paths.append(folder / f"fineweb_train_{shard_index:06d}.bin")
            remainder = shard_size - token_count
            all_tokens_np[token_count : token_count + remainder] = tokens[:remainder]
            write_datafile(paths[-1], all_tokens_np.tolist())
            shard_index += 1
            all_tokens_np[0 : len(tokens) - remainder] = tokens[remainder:]
            token_count = len(tokens) - remainder
    if token_count != 0:
        paths.append(folder / f"fineweb_train_{shard_index:06d}.bin")
        write_datafile(paths[-1], (all_tokens_np[:token_count]).tolist())
    return paths


MEGATRON_INDEX_HEADER = b"MMIDIDX\x00\x00"
# Megatron's DType enum.
MEGATRON_CODES: dict[type[np.number[Any]], int] = {
    np.uint8: 1,
    np.int8: 2,
    np.int16: 3,
    np.int32: 4,
    np.int64: 5,
    np.float64: 6,
    np.float32: 7,
    np.uint16: 8,
}


class MegatronBuilder:
    """Megatron-LM megatron/core/datasets/indexed_dataset.py IndexedDatasetBuilder (add_document,
    finalize) and _IndexWriter, without torch."""

    def __init__(self, bin_path: Path, dtype: type[np.number[Any]] = np.int32) -> None:
        self.data_file = open(bin_path, "wb")  # noqa: SIM115 (closed by finalize, as Megatron's)
        self.dtype = dtype
        self.sequence_lengths: list[int] = []
        self.document_indices = [0]

    def add_document(self, tokens: Sequence[int], lengths: list[int]) -> None:
        np_array = np.array(tokens, dtype=self.dtype)
        self.data_file.write(np_array.tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def finalize(self, idx_path: Path, code: int | None = None) -> None:
        self.data_file.close()
        with open(idx_path, "wb") as idx_writer:
            idx_writer.write(MEGATRON_INDEX_HEADER)
            idx_writer.write(struct.pack("<Q", 1))
            idx_writer.write(struct.pack("<B", MEGATRON_CODES[self.dtype] if code is None else code))
            itemsize = np.int64(np.dtype(self.dtype).itemsize)
            curr_ptr = np.int64(0)
            sequence_pointers = []
            for length in self.sequence_lengths:
                sequence_pointers.append(curr_ptr.item())
                curr_ptr += length * itemsize
            idx_writer.write(struct.pack("<Q", len(self.sequence_lengths)))
            idx_writer.write(struct.pack("<Q", len(self.document_indices)))
            idx_writer.write(np.array(self.sequence_lengths, dtype=np.int32).tobytes(order="C"))
            idx_writer.write(np.array(sequence_pointers, dtype=np.int64).tobytes(order="C"))
            idx_writer.write(np.array(self.document_indices, dtype=np.int64).tobytes(order="C"))


def write_megatron(
    prefix: Path,
    documents: Sequence[str],
    enc: tiktoken.Encoding,
    dtype: type[np.number[Any]],
    *,
    code: int | None = None,
) -> list[list[int]]:
    """tools/preprocess_data.py with --split-sentences and --append-eod: a document's sentences are
    its sequences, the eod added to its last. Returns each document's ids."""
    builder = MegatronBuilder(Path(f"{prefix}.bin"), dtype)
    written = []
    for text in documents:
        sentences = [piece + ". " for piece in text.split(". ")] if text else []
        doc_ids: list[int] = []
        sentence_lens: list[int] = []
        for sentence in sentences:
            sentence_ids = enc.encode_ordinary(sentence)
            if len(sentence_ids) > 0:
                doc_ids.extend(sentence_ids)
                sentence_lens.append(len(sentence_ids))
        if len(doc_ids) > 0:
            doc_ids.append(enc.eot_token)
            sentence_lens[-1] += 1
        builder.add_document(doc_ids, sentence_lens)
        written.append(doc_ids)
    builder.finalize(Path(f"{prefix}.idx"), code)
    return written


def starts_of(docs: Sequence[Sequence[int]]) -> list[int]:
    """Where each non-empty document starts in their concatenation."""
    starts, position = [], 0
    for ids in docs:
        if ids:
            starts.append(position)
        position += len(ids)
    return starts


def flat(docs: Sequence[Sequence[int]]) -> list[int]:
    return [token for ids in docs for token in ids]


# --- each format ------------------------------------------------------------------------------


def test_nanogpt_bin_is_copied_in_and_served_with_its_documents(
    tmp_path: Path, tokenizer: Tokenizer, documents: list[str]
) -> None:
    source = tmp_path / "owt" / "train.bin"
    source.parent.mkdir()
    docs = write_nanogpt(source, documents, tokenizer.encoding)
    data_dir = tmp_path / "data"
    manifest = import_corpus("nanogpt", [source], "owt", LocalStorage(data_dir), tokenizer, copy=False)
    assert CorpusStore(data_dir, tokenizer).tokens("owt").tolist() == flat(docs)
    # Documents start at 0 and after each eot but the last.
    assert document_starts(data_dir, "owt") == starts_of(docs)
    assert manifest.documents == len(documents)
    meta = manifest_of(data_dir, "owt")
    assert meta["origin"] == "nanogpt"
    assert meta["dtype"] == "uint16"
    assert meta["separator"] is None
    (shard,) = meta["shards"]
    assert shard["file"].startswith("owt.shards/")
    assert "header_bytes" not in shard
    copied = (data_dir / shard["file"]).read_bytes()
    assert copied == source.read_bytes()
    assert shard["sha256"] == hashlib.sha256(copied).hexdigest()
    assert shard["bytes"] == len(copied)
    assert meta["sources"] == [{"path": str(source.resolve()), "bytes": len(copied), "format": "nanogpt"}]


def test_a_file_inside_the_data_folder_is_referenced_in_place_unless_copy(
    tmp_path: Path, tokenizer: Tokenizer, documents: list[str]
) -> None:
    data_dir = tmp_path / "data"
    (data_dir / "nanogpt").mkdir(parents=True)
    source = data_dir / "nanogpt" / "val.bin"
    docs = write_nanogpt(source, documents[:5], tokenizer.encoding)
    storage = LocalStorage(data_dir)
    manifest = import_corpus("nanogpt", [str(source)], "val", storage, tokenizer, copy=False)
    assert [shard.file for shard in manifest.shards] == ["nanogpt/val.bin"]
    assert CorpusStore(data_dir, tokenizer).tokens("val").tolist() == flat(docs)
    assert sorted(p.suffix for p in (data_dir / "val.shards").iterdir()) == [".docs"]

    again = import_corpus("nanogpt", [source], "val", storage, tokenizer, copy=True)
    assert again.shards[0].file.startswith("val.shards/")
    assert CorpusStore(data_dir, tokenizer).tokens("val").tolist() == flat(docs)
    # Replacing the corpus removed its old offsets file and never the user's file.
    assert source.exists()
    assert sorted(p.suffix for p in (data_dir / "val.shards").iterdir()) == [".bin", ".docs"]

    # A link in the data folder to a file outside it is copied: the server never reads outside.
    outside = tmp_path / "outside.bin"
    outside.write_bytes(source.read_bytes())
    (data_dir / "link.bin").symlink_to(outside)
    linked = import_corpus("nanogpt", [data_dir / "link.bin"], "linked", storage, tokenizer, copy=False)
    assert linked.shards[0].file.startswith("linked.shards/")


def test_llmc_shards_keep_their_header_and_documents_run_across_shards(
    tmp_path: Path, tokenizer: Tokenizer, documents: list[str]
) -> None:
    paths = write_llmc_shards(tmp_path, documents, tokenizer.encoding, shard_size=700)
    assert len(paths) > 2
    eot = tokenizer.encoding.eot_token
    docs = [[eot, *tokenizer.encoding.encode_ordinary(text)] for text in documents]
    data_dir = tmp_path / "data"
    manifest = import_corpus("llmc", paths, "fineweb", LocalStorage(data_dir), tokenizer, copy=False)
    assert CorpusStore(data_dir, tokenizer).tokens("fineweb").tolist() == flat(docs)
    assert document_starts(data_dir, "fineweb") == starts_of(docs)
    assert manifest.documents == len(documents)
    assert [shard.header_bytes for shard in manifest.shards] == [1024] * len(paths)
    assert [shard.tokens for shard in manifest.shards[:-1]] == [700] * (len(paths) - 1)
    for shard, path in zip(manifest.shards, paths, strict=True):
        assert (data_dir / shard.file).read_bytes() == path.read_bytes()
        assert shard.bytes == path.stat().st_size == 1024 + 2 * shard.tokens


@pytest.mark.parametrize(("dtype", "name"), [(np.uint16, "uint16"), (np.int32, "int32")])
def test_megatron_keeps_its_document_boundaries(
    tmp_path: Path, tokenizer: Tokenizer, documents: list[str], dtype: type[np.number[Any]], name: str
) -> None:
    # An empty document (Megatron keeps it in its index) starts nowhere.
    texts = [*documents[:6], "", *documents[6:]]
    first = write_megatron(tmp_path / "a_text_document", texts, tokenizer.encoding, dtype)
    second = write_megatron(tmp_path / "b_text_document", documents[:3], tokenizer.encoding, dtype)
    data_dir = tmp_path / "data"
    inputs = [
        tmp_path / "a_text_document.bin",
        tmp_path / "a_text_document.idx",
        tmp_path / "b_text_document",
    ]
    manifest = import_corpus("megatron", inputs, "mega", LocalStorage(data_dir), tokenizer, copy=False)
    assert manifest.dtype == name
    assert len(manifest.shards) == 2
    tokens = CorpusStore(data_dir, tokenizer).tokens("mega")
    assert tokens.dtype == np.dtype(name)
    assert tokens.tolist() == flat(first) + flat(second)
    assert document_starts(data_dir, "mega") == starts_of(first + second)
    assert manifest.documents == len(texts) - 1 + 3
    assert manifest.sources[0]["index"] == str((tmp_path / "a_text_document.idx").resolve())


def test_a_single_file_corpus_converts_to_a_manifest_in_place(tmp_path: Path, tokenizer: Tokenizer) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    texts = ["First document.", "Second, with a literal <|endoftext|> inside.", "Third."]
    ids = tokenizer.encode("<|endoftext|>".join(texts), allowed_special={"<|endoftext|>"})
    raw = ids.astype("<u2").tobytes()
    (data_dir / "books.tokens").write_bytes(raw)
    sidecar = {  # as `embedserve prepare` wrote it before shards (format 1)
        "kind": "embedserve-prepared-corpus",
        "format": 1,
        "tokenizer": tokenizer.name,
        "tokenizer_identity": tokenizer.identity,
        "tokenizer_sha256": tokenizer.vocabulary_sha256,
        "vocab_size": tokenizer.n_vocab,
        "dtype": "uint16",
        "token_count": len(ids),
        "documents": 3,
        "separator": {"policy": "endoftext-between-documents", "token_id": 50256},
        "sources": [{"path": "/somewhere/books.jsonl", "bytes": 123, "documents": 3}],
        "tokens_file": "books.tokens",
        "tokens_sha256": hashlib.sha256(raw).hexdigest(),
        "created": "2024-01-02T03:04:05+00:00",
    }
    (data_dir / "books.json").write_text(json.dumps(sidecar, indent=2))
    assert CorpusStore(data_dir, tokenizer).tokens("books").tolist() == ids.tolist()

    manifest = import_corpus(
        "embedserve", [data_dir / "books.json"], "books", LocalStorage(data_dir), tokenizer, copy=False
    )
    meta = manifest_of(data_dir, "books")
    assert meta["kind"] == "embedserve-corpus"
    assert meta["format"] == 2
    assert meta["origin"] == "prepare"
    assert [shard["file"] for shard in meta["shards"]] == ["books.tokens"]
    assert meta["sources"] == sidecar["sources"]
    assert meta["created"] == sidecar["created"]
    assert meta["separator"] == sidecar["separator"]
    assert manifest.shards[0].sha256 == sidecar["tokens_sha256"]
    assert CorpusStore(data_dir, tokenizer).tokens("books").tolist() == ids.tolist()
    # Documents start after each separator: the literal one in a document counts, as prepare's did.
    assert document_starts(data_dir, "books") == [0] + [i + 1 for i, t in enumerate(ids) if t == 50256]

    # A token file that changed since its sidecar was written is refused.
    (data_dir / "old.tokens").write_bytes(raw[:-2] + b"\x00\x00")
    (data_dir / "old.json").write_text(json.dumps(sidecar | {"tokens_file": "old.tokens"}))
    with pytest.raises(InvalidInput, match=r"sha256 .*its sidecar says"):
        import_corpus(
            "embedserve", [data_dir / "old.json"], "old", LocalStorage(data_dir), tokenizer, copy=False
        )
    # And a manifest is not a sidecar.
    with pytest.raises(InvalidInput, match="already a sharded manifest"):
        import_corpus(
            "embedserve", [data_dir / "books.json"], "x", LocalStorage(data_dir), tokenizer, copy=False
        )


def test_import_into_object_storage_copies_each_file(tmp_path: Path, tokenizer: Tokenizer) -> None:
    source = tmp_path / "train.bin"
    write_nanogpt(source, ["One document.", "Another."], tokenizer.encoding)
    url = f"memory://imports-{tmp_path.name}"
    storage = FsspecStorage(url)  # fsspec's in-memory filesystem
    manifest = import_corpus("nanogpt", [source], "owt", storage, tokenizer, copy=False)
    assert read_manifest(storage, "owt") == manifest
    (shard,) = manifest.shards
    assert storage.read_bytes(shard.file, limit=1 << 20) == source.read_bytes()
    assert shard.sha256 == hashlib.sha256(source.read_bytes()).hexdigest()


# --- served end to end -------------------------------------------------------------------------


def test_imported_corpora_stream_as_windows_of_their_tokens(
    tmp_path: Path, tokenizer: Tokenizer, documents: list[str]
) -> None:
    data_dir = tmp_path / "data"
    storage = LocalStorage(data_dir)
    paths = write_llmc_shards(tmp_path, documents, tokenizer.encoding, shard_size=500)
    import_corpus("llmc", paths, "fineweb", storage, tokenizer, copy=False)
    write_megatron(tmp_path / "m", documents, tokenizer.encoding, np.int32)
    import_corpus("megatron", [tmp_path / "m"], "mega", storage, tokenizer, copy=False)
    running = start_server(
        ServerConfig(port=0, device="cpu", word_vectors="none", data_dir=str(data_dir), dim=8)
    )

    async def collect(corpus: str) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
        async with AsyncClient(running.target) as client:
            batches = [
                b
                async for b in client.stream_batches(
                    corpus=corpus, batch_size=4, max_length=16, stride=12, shuffle=False, drop_last=False
                )
            ]
        return np.concatenate([b.inputs for b in batches]), np.concatenate([b.targets for b in batches])

    try:
        for corpus in ("fineweb", "mega"):
            tokens = CorpusStore(data_dir, tokenizer).tokens(corpus).astype(np.int64)
            inputs, targets = asyncio.run(collect(corpus))
            starts = range(0, len(tokens) - 16, 12)
            assert len(inputs) == len(starts) > 100
            np.testing.assert_array_equal(inputs, np.stack([tokens[s : s + 16] for s in starts]))
            np.testing.assert_array_equal(targets, np.stack([tokens[s + 1 : s + 17] for s in starts]))
    finally:
        running.stop()


def test_cli_import_prints_one_line(
    tmp_path: Path, tokenizer: Tokenizer, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "train.bin"
    docs = write_nanogpt(source, ["One document.", "Another one."], tokenizer.encoding)
    data_dir = tmp_path / "data"
    argv = ["import", "nanogpt", str(source), "--out", "owt", "--data-dir", str(data_dir)]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    assert out[0].startswith(f"owt: {len(flat(docs))} uint16 tokens, 2 documents in 1 shards of nanogpt")
    assert "1 copied, 0 in place" in out[0]
    source.write_bytes(source.read_bytes()[:-1])
    assert main(argv) == 1
    assert "truncated" in capsys.readouterr().err
    monkeypatch.delenv("EMBEDSERVE_DATA_DIR", raising=False)
    assert main(["import", "llmc", str(source), "--out", "x"]) == 2  # no --data-dir
    # The command takes every format token_imports knows.
    for name in FORMATS:
        assert build_parser({}).parse_args(["import", name, "f", "--out", "x"]).format == name


# --- refusals ----------------------------------------------------------------------------------


def _refused(tmp_path: Path, tokenizer: Tokenizer, format: str, inputs: Sequence[Path], match: str) -> None:
    data_dir = tmp_path / "data"
    with pytest.raises(InvalidInput, match=match):
        import_corpus(format, inputs, "bad", LocalStorage(data_dir), tokenizer, copy=False)
    # Nothing is left behind: no manifest, no shard or offsets file.
    assert not (data_dir / "bad.json").exists()
    assert not (data_dir / "bad.shards").exists() or not any((data_dir / "bad.shards").iterdir())


def test_wrong_magic_is_refused(tmp_path: Path, tokenizer: Tokenizer) -> None:
    path = tmp_path / "shard.bin"
    write_datafile(path, [1, 2, 3])
    raw = bytearray(path.read_bytes())
    raw[0:4] = struct.pack("<i", 20240522)  # an eval file's
    path.write_bytes(bytes(raw))
    _refused(
        tmp_path, tokenizer, "llmc", [path], rf"{re.escape(str(path))}: magic 20240522: an llm\.c eval file"
    )
    raw[0:4] = struct.pack("<i", 12345)
    path.write_bytes(bytes(raw))
    _refused(
        tmp_path, tokenizer, "llmc", [path], "magic 12345; llm.c token files have magic 20240520 version 1"
    )
    raw[0:8] = struct.pack("<ii", 20240520, 2)
    path.write_bytes(bytes(raw))
    _refused(tmp_path, tokenizer, "llmc", [path], "magic 20240520 with version 2")

    write_megatron(tmp_path / "m", ["Some text."], tokenizer.encoding, np.uint16)
    idx = tmp_path / "m.idx"
    idx.write_bytes(b"MMIDIDX\x00\x01" + idx.read_bytes()[9:])
    _refused(tmp_path, tokenizer, "megatron", [idx], r"m\.idx: begins with .*a Megatron index begins with")


def test_truncated_files_are_refused(tmp_path: Path, tokenizer: Tokenizer, documents: list[str]) -> None:
    nanogpt = tmp_path / "train.bin"
    write_nanogpt(nanogpt, documents[:3], tokenizer.encoding)
    nanogpt.write_bytes(nanogpt.read_bytes()[:-1])
    _refused(
        tmp_path, tokenizer, "nanogpt", [nanogpt], r"train\.bin: \d+ bytes is not a whole number of uint16"
    )

    (llmc,) = write_llmc_shards(tmp_path, documents[:3], tokenizer.encoding, shard_size=10_000)
    count = (llmc.stat().st_size - 1024) // 2
    llmc.write_bytes(llmc.read_bytes()[:-2])
    _refused(
        tmp_path,
        tokenizer,
        "llmc",
        [llmc],
        rf"header says {count} uint16 tokens \({1024 + 2 * count} bytes with the header\), the file is "
        rf"{1024 + 2 * count - 2} bytes; truncated\?",
    )
    llmc.write_bytes(llmc.read_bytes()[:100])
    _refused(tmp_path, tokenizer, "llmc", [llmc], "100 bytes, shorter than llm.c's 1024-byte header")

    docs = write_megatron(tmp_path / "m", documents[:3], tokenizer.encoding, np.uint16)
    total = len(flat(docs))
    bin_path = tmp_path / "m.bin"
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    _refused(
        tmp_path,
        tokenizer,
        "megatron",
        [bin_path],
        rf"m\.bin: its index describes {total} uint16 tokens \({2 * total} bytes\), "
        rf"the file is {2 * total - 2}",
    )
    write_megatron(tmp_path / "m", documents[:3], tokenizer.encoding, np.uint16)
    idx = tmp_path / "m.idx"
    idx.write_bytes(idx.read_bytes()[:-8])
    _refused(tmp_path, tokenizer, "megatron", [idx], r"m\.idx: .* sequences and 4 document entries take")


def test_tokens_past_the_vocabulary_are_refused(tmp_path: Path, tokenizer: Tokenizer) -> None:
    # Made with a larger vocabulary than GPT-2's 50,257 tokens.
    nanogpt = tmp_path / "train.bin"
    np.array([10, 20, 50256, 60000, 5], dtype=np.uint16).tofile(nanogpt)
    _refused(
        tmp_path,
        tokenizer,
        "nanogpt",
        [nanogpt],
        r"token 60000 at position 3 is outside the gpt2 vocabulary \[0, 50257\)",
    )
    llama = tmp_path / "llama.bin"
    write_datafile(llama, [128000, 9906, 1917], "llama-3")
    _refused(tmp_path, tokenizer, "llmc", [llama], "token 128000 at position 0 is outside")
    builder = MegatronBuilder(tmp_path / "neg.bin", np.int32)
    builder.add_document([5, -1, 7], [3])
    builder.finalize(tmp_path / "neg.idx")
    _refused(tmp_path, tokenizer, "megatron", [tmp_path / "neg"], "token -1 at position 1 is outside")


def test_megatron_dtypes_embedserve_cannot_serve_are_refused(tmp_path: Path, tokenizer: Tokenizer) -> None:
    write_megatron(tmp_path / "wide", ["Some text."], tokenizer.encoding, np.int64)
    _refused(
        tmp_path,
        tokenizer,
        "megatron",
        [tmp_path / "wide"],
        r"wide\.idx: tokens of dtype int64 \(code 5\); embedserve serves Megatron token files of uint16",
    )
    write_megatron(tmp_path / "odd", ["Some text."], tokenizer.encoding, np.int32, code=9)
    _refused(
        tmp_path,
        tokenizer,
        "megatron",
        [tmp_path / "odd"],
        r"odd\.idx: unknown dtype code 9; Megatron's are 1",
    )


def test_files_of_different_dtypes_are_refused(tmp_path: Path, tokenizer: Tokenizer) -> None:
    write_megatron(tmp_path / "a", ["Some text."], tokenizer.encoding, np.uint16)
    write_megatron(tmp_path / "b", ["More text."], tokenizer.encoding, np.int32)
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    listed = re.escape(f"{a} (uint16), {b} (int32)")
    _refused(tmp_path, tokenizer, "megatron", [a, b], rf"different dtypes, one corpus holds one: {listed}")


def test_a_failure_after_a_copy_removes_the_copy(tmp_path: Path, tokenizer: Tokenizer) -> None:
    good, bad = tmp_path / "good.bin", tmp_path / "bad.bin"
    write_nanogpt(good, ["Fine."], tokenizer.encoding)
    np.array([1, 2, 65000], dtype=np.uint16).tofile(bad)
    _refused(tmp_path, tokenizer, "nanogpt", [good, bad], r"bad\.bin: token 65000")


def test_unknown_format_and_missing_files(tmp_path: Path, tokenizer: Tokenizer) -> None:
    storage = LocalStorage(tmp_path / "data")
    with pytest.raises(InvalidInput, match="unknown token file format 'arrow'; known: nanogpt, llmc"):
        import_corpus("arrow", [tmp_path / "x"], "x", storage, tokenizer, copy=False)
    with pytest.raises(InvalidInput, match=r"--out '\.\./x'"):
        import_corpus("nanogpt", [tmp_path / "x"], "../x", storage, tokenizer, copy=False)
    with pytest.raises(NotFound, match=r"absent\.bin not found"):
        import_corpus("nanogpt", [tmp_path / "absent.bin"], "x", storage, tokenizer, copy=False)
