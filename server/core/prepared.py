"""Prepared corpora: text tokenized once into a flat token file and a JSON sidecar.

`embedserve prepare a.txt b.jsonl.gz --out books` writes `books.tokens` (GPT-2 token IDs,
uint16 little-endian, since the vocabulary fits) and `books.json` (what produced them) into
the data folder. Documents are joined with <|endoftext|> between them: each plain-text file is
one document, each line of a `.jsonl` file is one (its text field). The server memory-maps the
token file, so a corpus larger than RAM streams, and several processes share one copy.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from .errors import InvalidInput, NotFound
from .tokenizer import ENDOFTEXT, Tokenizer

PREPARED_FORMAT = 1
PREPARED_KIND = "embedserve-prepared-corpus"
SEPARATOR_POLICY = "endoftext-between-documents"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_BATCH_BYTES = 4 << 20  # text encoded per round across the threads


@dataclass(frozen=True)
class PreparedCorpus:
    name: str
    tokens: npt.NDArray[np.unsignedinteger]  # memory-mapped, read-only
    meta: dict[str, Any]


def _open_text(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _documents(path: Path, text_field: str) -> Iterator[str]:
    """The documents of one input: a whole text file, or the text field of each JSON line."""
    base = path.name[:-3] if path.suffix == ".gz" else path.name
    try:
        with _open_text(path) as handle:
            if not base.endswith(".jsonl"):
                yield handle.read()
                return
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InvalidInput(f"{path}:{number}: not JSON ({error.msg})") from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise InvalidInput(f"{path}:{number}: no string field {text_field!r}")
                yield text
    except UnicodeDecodeError as error:
        raise InvalidInput(f"{path}: not UTF-8 text ({error.reason})") from None
    except (OSError, EOFError) as error:
        raise InvalidInput(f"{path}: cannot be read ({error})") from None


def _safe_cut(text: str, newline: int) -> bool:
    """Whether a piece may end right after text[newline] (a newline): see split_for_encoding."""

    def starts_a_word(index: int) -> bool:
        # A special token ("<|endoftext|>") would end the text before it, changing the whitespace.
        return index < len(text) and not text[index].isspace() and text[index] != "<"

    if newline == 0 or text[newline - 1].isspace() or newline + 1 >= len(text):
        return False
    if starts_a_word(newline + 1):
        return True
    # One whitespace character, then a word: the whole text also ends a token after the newline.
    return text[newline + 1].isspace() and starts_a_word(newline + 2)


def split_for_encoding(text: str, piece_chars: int = 1 << 20) -> list[str]:
    """Pieces of a long text that encode, one by one and joined, exactly as the whole text does.

    A piece ends after a newline that follows a non-space character and precedes either a
    non-space character or exactly one whitespace character and then a non-space one (a
    paragraph break "\n\n" is cut between its newlines). GPT-2's pre-tokenizer ends a token
    right there in the whole text too, so no token spans the cut and BPE, which works inside
    those tokens, gives the same IDs (a property test holds it to that). Pieces let one long
    document use every core.
    """
    pieces = []
    start = 0
    while len(text) - start > 2 * piece_chars:
        cut = text.find("\n", start + piece_chars)
        while cut != -1 and not _safe_cut(text, cut):
            cut = text.find("\n", cut + 1)
        if cut == -1:
            break
        pieces.append(text[start : cut + 1])
        start = cut + 1
    pieces.append(text[start:])
    return pieces


def prepare_corpus(
    inputs: Sequence[Path],
    name: str,
    data_dir: Path,
    tokenizer: Tokenizer,
    *,
    text_field: str = "text",
    threads: int | None = None,
    progress: Callable[[int, int, int], None] | None = None,
) -> dict[str, Any]:
    """Tokenizes the inputs into `<data_dir>/<name>.tokens` + `<name>.json`; returns the sidecar.

    `progress(input_bytes_done, input_bytes_total, tokens)` is called after each round. The
    files appear only when complete (written under temporary names, then renamed).
    """
    if not _NAME.match(name) or name.endswith((".json", ".tokens")):
        raise InvalidInput(f"--out {name!r}: use letters, digits, '_', '.', '-' (no extension)")
    if not inputs:
        raise InvalidInput("nothing to prepare: name at least one input file")
    for path in inputs:
        if not path.is_file():
            raise NotFound(f"{path}: no such file")
    wire = np.dtype("<u2") if tokenizer.n_vocab <= 1 << 16 else np.dtype("<u4")
    data_dir.mkdir(parents=True, exist_ok=True)
    tokens_path = data_dir / f"{name}.tokens"
    sidecar_path = data_dir / f"{name}.json"
    staging = data_dir / f".{name}.tokens.partial"
    total_bytes = sum(path.stat().st_size for path in inputs)
    separator = np.array([tokenizer.encode(ENDOFTEXT, allowed_special={ENDOFTEXT})[0]], dtype=wire).tobytes()
    digest = hashlib.sha256()
    sources: list[dict[str, Any]] = []
    token_count = documents = 0
    done_bytes = 0
    threads = threads or os.cpu_count() or 1

    def encode(text: str) -> bytes:
        return tokenizer.encode(text, allowed_special={ENDOFTEXT}).astype(wire).tobytes()

    try:
        with staging.open("wb") as out, ThreadPoolExecutor(threads) as pool:

            def flush(batch: list[str]) -> None:
                nonlocal token_count, documents
                pieces = [
                    (number, piece) for number, text in enumerate(batch) for piece in split_for_encoding(text)
                ]
                current = -1
                # tiktoken releases the GIL: every core encodes a piece at a time.
                for (number, _), data in zip(pieces, pool.map(encode, [p for _, p in pieces]), strict=True):
                    if number != current:
                        if documents:
                            out.write(separator)
                            digest.update(separator)
                            token_count += 1
                        documents += 1
                        current = number
                    out.write(data)
                    digest.update(data)
                    token_count += len(data) // wire.itemsize

            for path in inputs:
                batch: list[str] = []
                batch_bytes = 0
                count = 0
                for text in _documents(path, text_field):
                    batch.append(text)
                    batch_bytes += len(text)
                    count += 1
                    if batch_bytes >= _BATCH_BYTES:
                        flush(batch)
                        batch, batch_bytes = [], 0
                        if progress is not None:
                            progress(done_bytes, total_bytes, token_count)
                flush(batch)
                done_bytes += path.stat().st_size
                if progress is not None:
                    progress(done_bytes, total_bytes, token_count)
                sources.append(
                    {"path": str(path.resolve()), "bytes": path.stat().st_size, "documents": count}
                )
        meta = {
            "kind": PREPARED_KIND,
            "format": PREPARED_FORMAT,
            "tokenizer": tokenizer.name,
            "tokenizer_sha256": tokenizer.vocabulary_sha256,
            "vocab_size": tokenizer.n_vocab,
            "dtype": "uint16" if wire.itemsize == 2 else "uint32",
            "token_count": token_count,
            "documents": documents,
            "separator": {"policy": SEPARATOR_POLICY, "token_id": int(np.frombuffer(separator, wire)[0])},
            "sources": sources,
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
