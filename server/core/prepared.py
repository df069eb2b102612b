"""Prepared corpora: text tokenized once into a flat token file and a JSON sidecar.

`embedserve prepare a.txt b.jsonl.gz shards/*.parquet --out books` writes `books.tokens` (the
token IDs, little-endian uint16 when the vocabulary fits, as GPT-2's does, else uint32) and
`books.json` (what produced them: the encoding's name and files' sha256 included) into the data
folder. Documents are joined with <|endoftext|> between them; where they come from
(a whole text file, a line of a `.jsonl`, a row of a Parquet or Arrow file) is
`document_sources`. The server memory-maps the token file, so a corpus larger than RAM streams,
and several processes share one copy.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .document_sources import DEFAULT_BATCH_ROWS, DEFAULT_TEXT_COLUMN, open_sources
from .errors import InvalidInput
from .stretch_encoding import plan_stretches
from .tokenizer import ENDOFTEXT, Tokenizer

PREPARED_FORMAT = 1
PREPARED_KIND = "embedserve-prepared-corpus"
SEPARATOR_POLICY = "endoftext-between-documents"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_BATCH_BYTES = 4 << 20  # text encoded per round across the threads
_TASK_CHARS = 64 << 10  # text one thread encodes at a time (short documents grouped)
_PIECE_CHARS = 1 << 20  # a long document is encoded in pieces of about this many characters


@dataclass(frozen=True)
class PreparedCorpus:
    name: str
    tokens: npt.NDArray[np.unsignedinteger]  # memory-mapped, read-only
    meta: dict[str, Any]


def prepare_corpus(
    inputs: Sequence[Path],
    name: str,
    data_dir: Path,
    tokenizer: Tokenizer,
    *,
    text_column: str = DEFAULT_TEXT_COLUMN,
    threads: int | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
) -> dict[str, Any]:
    """Tokenizes the inputs into `<data_dir>/<name>.tokens` + `<name>.json`; returns the sidecar.

    `inputs` are files, globs or saved datasets (`document_sources.open_sources`); `text_column`
    is the text field of JSON lines and the text column of Parquet and Arrow files, read
    `batch_rows` rows at a time. `progress(input_bytes_done, input_bytes_total, tokens)` is called
    after each round (bytes of a Parquet or Arrow file are counted as its rows are read). The
    files appear only when complete (written under temporary names, then renamed).
    """
    if not _NAME.match(name) or name.endswith((".json", ".tokens")):
        raise InvalidInput(f"--out {name!r}: use letters, digits, '_', '.', '-' (no extension)")
    if not inputs:
        raise InvalidInput("nothing to prepare: name at least one input file")
    if not tokenizer.separator:
        raise InvalidInput(f"the {tokenizer.name} encoding has no {ENDOFTEXT} to join documents with")
    sources = open_sources(inputs, text_column=text_column, batch_rows=batch_rows)
    sizes = [source.path.stat().st_size for source in sources]
    wire = np.dtype("<u2") if tokenizer.n_vocab <= 1 << 16 else np.dtype("<u4")
    data_dir.mkdir(parents=True, exist_ok=True)
    tokens_path = data_dir / f"{name}.tokens"
    sidecar_path = data_dir / f"{name}.json"
    staging = data_dir / f".{name}.tokens.partial"
    total_bytes = sum(sizes)
    separator = np.array([tokenizer.encode(ENDOFTEXT, allowed_special={ENDOFTEXT})[0]], dtype=wire).tobytes()
    digest = hashlib.sha256()
    read: list[dict[str, Any]] = []
    token_count = documents = 0
    done_bytes = 0
    threads = threads or os.cpu_count() or 1

    def encode(text: str) -> bytes:
        return tokenizer.encode(text, allowed_special={ENDOFTEXT}).astype(wire).tobytes()

    try:
        with staging.open("wb") as out, ThreadPoolExecutor(threads) as pool:

            def flush(batch: list[str]) -> None:
                nonlocal token_count, documents
                # Tasks of about _TASK_CHARS characters: a piece of a long document, or many short
                # documents joined by <|endoftext|>, which encodes as the documents one by one with
                # the separator between them do (the encoder splits at special tokens first), and
                # costs one call instead of one a document.
                tasks: list[tuple[bool, list[str]]] = []  # (starts a document, texts to join)
                chars = _TASK_CHARS
                for text in batch:
                    # Cut where the tokens cannot change (Tokenizer.cut_before), so that one long
                    # document uses every thread.
                    spans = plan_stretches(text, tokenizer.cut_before, _PIECE_CHARS)
                    pieces = [text[start:end] for start, end in spans] if len(spans) > 1 else [text]
                    for number, piece in enumerate(pieces):
                        if chars >= _TASK_CHARS:
                            tasks.append((number == 0, []))
                            chars = 0
                        elif number == 0:
                            tasks[-1][1].append(ENDOFTEXT)
                        tasks[-1][1].append(piece)
                        chars += len(piece)
                parts: list[bytes] = []
                # tiktoken releases the GIL: every core encodes a task at a time.
                for (starts_document, _), data in zip(
                    tasks, pool.map(encode, ["".join(texts) for _, texts in tasks]), strict=True
                ):
                    if starts_document and (documents or parts):
                        parts.append(separator)
                    parts.append(data)
                documents += len(batch)
                written = b"".join(parts)
                out.write(written)
                digest.update(written)
                token_count += len(written) // wire.itemsize

            for source, size in zip(sources, sizes, strict=True):
                batch: list[str] = []
                batch_bytes = 0
                count = 0
                for documents_read in source.batches():
                    for text in documents_read.texts:
                        batch.append(text)
                        batch_bytes += len(text)
                        count += 1
                        if batch_bytes >= _BATCH_BYTES:
                            flush(batch)
                            batch, batch_bytes = [], 0
                            if progress is not None:
                                progress(
                                    done_bytes + min(documents_read.position, size), total_bytes, token_count
                                )
                flush(batch)
                done_bytes += size
                if progress is not None:
                    progress(done_bytes, total_bytes, token_count)
                read.append({"path": str(source.path.resolve()), "bytes": size, "documents": count})
        meta = {
            "kind": PREPARED_KIND,
            "format": PREPARED_FORMAT,
            "tokenizer": tokenizer.name,
            "tokenizer_identity": tokenizer.identity,
            "tokenizer_sha256": tokenizer.vocabulary_sha256,
            "vocab_size": tokenizer.n_vocab,
            "dtype": "uint16" if wire.itemsize == 2 else "uint32",
            "token_count": token_count,
            "documents": documents,
            "separator": {"policy": SEPARATOR_POLICY, "token_id": int(np.frombuffer(separator, wire)[0])},
            "sources": read,
            "tokens_file": tokens_path.name,
            "tokens_sha256": digest.hexdigest(),
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        os.replace(staging, tokens_path)
        partial_sidecar = data_dir / f".{name}.json.partial"
        partial_sidecar.write_text(json.dumps(meta, indent=2) + "\n")
        os.replace(partial_sidecar, sidecar_path)
    finally:
        staging.unlink(missing_ok=True)
    return meta


def read_sidecar(path: Path) -> dict[str, Any] | None:
    """The sidecar's content when `path` is a prepared corpus's sidecar, else None."""
    try:
        if path.stat().st_size > 1 << 20:
            return None
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("kind") == PREPARED_KIND else None


def open_prepared(name: str, meta: dict[str, Any], tokens_path: Path, tokenizer: Tokenizer) -> PreparedCorpus:
    """Memory-maps a prepared corpus's token file (already resolved inside the data folder by the
    caller) after checking it was made for this tokenizer."""
    if meta.get("format") != PREPARED_FORMAT:
        raise InvalidInput(
            f"corpus {name!r}: prepared format {meta.get('format')}, this server reads {PREPARED_FORMAT}"
        )
    if meta.get("tokenizer") != tokenizer.name or meta.get("vocab_size") != tokenizer.n_vocab:
        raise InvalidInput(
            f"corpus {name!r} was prepared with {meta.get('tokenizer')} ({meta.get('vocab_size')} tokens), "
            f"this server tokenizes with {tokenizer.name} ({tokenizer.n_vocab})"
        )
    # A sidecar written by hand may leave the digests out: the name and size are then all it pins.
    if meta.get("tokenizer_sha256", tokenizer.vocabulary_sha256) != tokenizer.vocabulary_sha256:
        raise InvalidInput(
            f"corpus {name!r} was prepared with other {tokenizer.name} files (sha256 "
            f"{meta.get('tokenizer_sha256')}) than this server's ({tokenizer.vocabulary_sha256})"
        )
    dtype = {"uint16": "<u2", "uint32": "<u4"}.get(str(meta.get("dtype")))
    if dtype is None:
        raise InvalidInput(f"corpus {name!r}: unknown token dtype {meta.get('dtype')!r}")
    count = int(meta["token_count"])
    if tokens_path.stat().st_size != count * np.dtype(dtype).itemsize:
        raise InvalidInput(f"corpus {name!r}: {tokens_path.name} does not hold {count} tokens (truncated?)")
    tokens = np.memmap(tokens_path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype)
    return PreparedCorpus(name, tokens, meta)


def progress_reporter(
    label: str, write: Callable[[str], None], every_seconds: float = 2.0
) -> Callable[[int, int, int], None]:
    """A progress callback for prepare_corpus that hands `write` one line every few seconds (and
    at the end); the caller decides where lines go (the CLI prints them to stderr)."""
    started = time.monotonic()
    last = [float("-inf")]  # the first round is always told

    def report(done: int, total: int, tokens: int) -> None:
        now = time.monotonic()
        if now - last[0] < every_seconds and done < total:
            return
        last[0] = now
        elapsed = max(now - started, 1e-9)
        percent = 100 * done / total if total else 100.0
        write(
            f"{label}: {percent:5.1f}% of {total / 1e6:.1f} MB, {tokens:,} tokens, "
            f"{done / 1e6 / elapsed:.1f} MB/s"
        )

    return report
