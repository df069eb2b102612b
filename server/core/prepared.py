"""Prepared corpora: text tokenized once into shards of token IDs and a manifest.

`embedserve prepare a.txt b.jsonl.gz shards/*.parquet --out books` writes the shards
`books.shards/*.tokens` (token IDs, little-endian uint16 when the vocabulary fits, as GPT-2's does,
else uint32; at most --shard-size each) and the manifest `books.json` (manifest.py: what produced
them, each shard's sha256 and document offsets) into the data folder, a local folder or object
storage. Documents are joined with <|endoftext|> between them; where they come from (a whole
text file, a line of a `.jsonl`, a row of a Parquet or Arrow file) is `document_sources`. The
encoder is `bpe_backends.choose_encoder`'s: tiktoken, or fastokens where the fast-bpe extra is
installed (the same tokens; docs/performance.md#preparing-corpora has both rates).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .bpe_backends import choose_encoder
from .document_sources import DEFAULT_BATCH_ROWS, DEFAULT_TEXT_COLUMN, DocumentSource, open_sources
from .errors import EmbedServeCoreError, InvalidInput, NotFound
from .manifest import CorpusManifest, ShardEntry, commit_manifest, read_manifest
from .shard_writer import DEFAULT_SHARD_BYTES, ShardWriter, shard_folder
from .storage import LocalStorage, Storage
from .stretch_encoding import plan_stretches
from .tokenizer import ENDOFTEXT, Tokenizer

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")
_BATCH_BYTES = 4 << 20  # text read per round (a round also ends with each input file)
_TASK_CHARS = 64 << 10  # text one thread encodes at a time (short documents grouped)
_PIECE_CHARS = 1 << 20  # a long document is encoded in pieces of about this many characters
_TASKS_AHEAD = 4  # tasks encoding or queued per thread while the oldest is written


def prepare_corpus(
    inputs: Sequence[Path],
    name: str,
    destination: Storage | Path,
    tokenizer: Tokenizer,
    *,
    text_column: str = DEFAULT_TEXT_COLUMN,
    threads: int | None = None,
    progress: Callable[[int, int, int], None] | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    append: bool = False,
) -> CorpusManifest:
    """Tokenizes the inputs into shards of `<name>.shards/` and the manifest `<name>.json` in
    `destination` (a Storage, or a local folder); returns the manifest.

    `inputs` are files, globs or saved datasets (`document_sources.open_sources`); `text_column`
    is the text field of JSON lines and the text column of Parquet and Arrow files, read
    `batch_rows` rows at a time. `progress(input_bytes_done, input_bytes_total, tokens)` is called
    after each round (bytes of a Parquet or Arrow file are counted as its rows are read). Shards are
    written whole (each under a temporary name, or staged then uploaded) and the manifest last, so
    a reader sees the previous corpus or the new one. With `append`, the documents are added
    after the existing corpus's, in new shards; the tokens are those of preparing every input at once.
    """
    check_corpus_name(name)
    if not inputs:
        raise InvalidInput("nothing to prepare: name at least one input file")
    if not tokenizer.separator:
        raise InvalidInput(f"the {tokenizer.name} encoding has no {ENDOFTEXT} to join documents with")
    storage = destination if isinstance(destination, Storage) else LocalStorage(destination)
    sources = open_sources(inputs, text_column=text_column, batch_rows=batch_rows)  # checked first
    with corpus_writer_lock(storage, name):
        return _prepare_locked(sources, name, storage, tokenizer, threads, progress, shard_bytes, append)


def _prepare_locked(
    sources: Sequence[DocumentSource],
    name: str,
    storage: Storage,
    tokenizer: Tokenizer,
    threads: int | None,
    progress: Callable[[int, int, int], None] | None,
    shard_bytes: int,
    append: bool,
) -> CorpusManifest:
    previous = manifest_to_extend(storage, name, tokenizer, append)
    sizes = [source.path.stat().st_size for source in sources]
    wire = np.dtype("<u2") if tokenizer.n_vocab <= 1 << 16 else np.dtype("<u4")
    if previous is not None and previous.numpy_dtype != wire:
        raise InvalidInput(
            f"corpus {name!r} holds {previous.dtype} tokens; this tokenizer writes {wire.name}"
        )
    separator_id = tokenizer.encode(ENDOFTEXT, allowed_special={ENDOFTEXT})[0]
    writer = ShardWriter(
        storage, name, wire, shard_bytes=shard_bytes, first_number=len(previous.shards) if previous else 0
    )
    total_bytes = sum(sizes)
    read: list[dict[str, Any]] = []
    # After an existing corpus, the first new document follows a separator, as if prepared together.
    documents = previous.documents if previous is not None and previous.token_count else 0
    token_count = 0
    done_bytes = 0
    threads = threads or os.cpu_count() or 1
    encoder = choose_encoder(tokenizer)

    def encode(task: _Task) -> tuple[bytes, list[int]]:
        """On a pool thread: the task's tokens as written (after the separator prepare puts before
        it, if any), and where its documents start among them."""
        ids = encoder.encode(task.text())
        head = 1 if task.separator_before else 0
        tokens = np.empty(head + len(ids), dtype=wire)
        tokens[:head] = separator_id
        tokens[head:] = ids
        separators = np.flatnonzero(tokens == separator_id)
        if len(separators) == len(task.firsts) - (not task.after_separator):
            # Only the separators between documents (no document holds "<|endoftext|>" text).
            return tokens.tobytes(), [0] * (not task.after_separator) + (separators + 1).tolist()
        skip, literals = task.literals()
        return tokens.tobytes(), document_starts_of(
            tokens, separator_id, task.after_separator, literals, skip
        )

    # Tasks are written in order while later ones encode: the threads never wait for the writing
    # (hashing, storage) or the reading of the next input, and a long document is written as its
    # pieces are encoded.
    pending: deque[tuple[_Task, Future[tuple[bytes, list[int]]]]] = deque()
    ahead = threads * _TASKS_AHEAD

    def write_oldest() -> None:
        nonlocal token_count
        task, future = pending.popleft()
        data, starts = future.result()
        writer.add(data, starts)
        token_count += len(data) // wire.itemsize
        if progress is not None and task.progress_bytes is not None:
            progress(task.progress_bytes, total_bytes, token_count)

    def submit(batch: list[str], progress_bytes: int | None) -> None:
        nonlocal documents
        for task in _round_tasks(batch, tokenizer.cut_before, documents == 0, progress_bytes):
            pending.append((task, pool.submit(encode, task)))
            while len(pending) > ahead:
                write_oldest()
        documents += len(batch)

    try:
        with ThreadPoolExecutor(threads) as pool:
            try:
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
                                submit(batch, done_bytes + min(documents_read.position, size))
                                batch, batch_bytes = [], 0
                    done_bytes += size
                    submit(batch, done_bytes)
                    read.append({"path": str(source.path.resolve()), "bytes": size, "documents": count})
                while pending:
                    write_oldest()
            finally:
                for _, future in pending:  # after an error: what has not started never will
                    future.cancel()
        shards = writer.finish()
        if previous is not None:
            manifest = previous.with_shards(shards, read)
        else:
            manifest = CorpusManifest.new(
                name, tokenizer, wire, shards, separator_token_id=int(separator_id), sources=read
            )
        replaced = current_manifest(storage, name) if not append else None
        commit_manifest(storage, manifest)
    except BaseException:
        # Nothing of a failed run stays behind: no manifest names these shards.
        remove_shard_files(storage, writer.entries)
        raise
    if replaced is not None:  # prepared again: the old corpus's files go (open mappings keep theirs)
        remove_corpus_files(storage, replaced, keep=manifest)
    return manifest


@dataclass
class _Task:
    """One call of the encoder: a piece of a long document, or short documents (and maybe the last
    piece of a long one) joined by <|endoftext|>, which encodes as the documents one by one with the
    separator between them do (the encoder splits at special tokens first)."""

    pieces: list[str]  # of documents, in order: whole documents, or pieces of one
    firsts: list[int]  # the pieces that begin a document
    separator_before: bool  # it begins with a document that follows another: prepare writes the separator
    after_separator: bool  # its first document follows a separator (all but the corpus's first)
    progress_bytes: int | None = None  # input bytes done once it is written (the round's last task)

    def text(self) -> str:
        """What the encoder is given: the pieces, with <|endoftext|> before each document after the
        first piece."""
        if len(self.pieces) == 1:
            return self.pieces[0]
        firsts = set(self.firsts) - {0}
        return "".join(
            ENDOFTEXT + piece if number in firsts else piece for number, piece in enumerate(self.pieces)
        )

    def literals(self) -> tuple[int, list[int]]:
        """The documents' own "<|endoftext|>" texts: in the pieces before the first document begins
        (the rest of one begun earlier), and in each document that begins here."""
        counts = [piece.count(ENDOFTEXT) for piece in self.pieces]
        bounds = [*self.firsts, len(self.pieces)]
        return sum(counts[: bounds[0]]), [sum(counts[a:b]) for a, b in itertools.pairwise(bounds)]


def _round_tasks(
    batch: list[str], cut_before: str, corpus_start: bool, progress_bytes: int | None
) -> Iterator[_Task]:
    """A round's tasks, in order, each about _TASK_CHARS or one piece (a round without documents has
    one empty task, which reports its progress). A document longer than _PIECE_CHARS is cut where
    its tokens cannot change (Tokenizer.cut_before), so that one long document uses every thread."""
    task: _Task | None = None
    chars = _TASK_CHARS
    for text in batch:
        spans = plan_stretches(text, cut_before, _PIECE_CHARS)
        for number, (start, end) in enumerate(spans):
            if chars >= _TASK_CHARS:
                if task is not None:
                    yield task
                follows = task is not None or not corpus_start
                task = _Task([], [], number == 0 and follows, follows)
                chars = 0
            assert task is not None
            if number == 0:
                task.firsts.append(len(task.pieces))
            task.pieces.append(text[start:end] if len(spans) > 1 else text)
            chars += end - start
    task = task or _Task([], [], False, True)
    task.progress_bytes = progress_bytes
    yield task


def document_starts_of(
    tokens: npt.NDArray[np.unsignedinteger],
    separator: int,
    after_separator: bool,
    literals: list[int],
    skip: int = 0,
) -> list[int]:
    """Where documents start in some consecutive tokens. Each document after the corpus's first follows
    the separator prepare put before it; a document's own "<|endoftext|>" text (`literals[k]` of
    them in document k, and `skip` in the rest of a document before the first) also encodes as the
    separator, and those are skipped."""
    separators = np.flatnonzero(tokens == separator).tolist()
    starts: list[int] = []
    seen = skip
    for number, literal in enumerate(literals):
        if number == 0 and not after_separator:
            starts.append(0)
        else:
            starts.append(separators[seen] + 1)
            seen += 1
        seen += literal
    return starts


def check_corpus_name(name: str) -> None:
    if not _NAME.match(name) or name.endswith((".json", ".tokens", ".shards")):
        raise InvalidInput(f"--out {name!r}: use letters, digits, '_', '.', '-' (no extension)")


def current_manifest(storage: Storage, name: str) -> CorpusManifest | None:
    try:
        return read_manifest(storage, name)
    except (NotFound, InvalidInput):
        return None


def manifest_to_extend(
    storage: Storage, name: str, tokenizer: Tokenizer, append: bool
) -> CorpusManifest | None:
    """The corpus an append extends, checked; None when not appending."""
    if not append:
        return None
    try:
        previous = read_manifest(storage, name)
    except NotFound:
        raise NotFound(f"--append: there is no corpus {name!r} in {storage.location} to append to") from None
    previous.check_tokenizer(tokenizer)
    if previous.legacy_identity is not None:
        raise InvalidInput(
            f"corpus {name!r} is a single-file corpus from before shards; convert it first "
            f"(embedserve import embedserve {name}.json --out {name}; see docs/training-data.md)"
        )
    return previous


@contextlib.contextmanager
def corpus_writer_lock(storage: Storage, name: str) -> Iterator[None]:
    """One writer (prepare, append) of a corpus at a time in a local folder: a second one waits,
    then extends what the first committed. The lock is on the corpus's shard folder, so it leaves
    no file behind (an empty folder is removed). Object storage has no lock: one writer there."""
    if not isinstance(storage, LocalStorage):
        yield
        return
    folder = storage.path(shard_folder(name))
    folder.mkdir(parents=True, exist_ok=True)
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)
        with contextlib.suppress(OSError):  # not empty, or another writer's now
            folder.rmdir()


def remove_shard_files(storage: Storage, entries: Iterable[ShardEntry]) -> None:
    """Deletes these shards' files and their document offsets."""
    for entry in entries:
        storage.delete(entry.file)
        if entry.document_offsets is not None:
            storage.delete(entry.document_offsets.file)


def remove_corpus_files(storage: Storage, old: CorpusManifest, *, keep: CorpusManifest) -> None:
    """Deletes the files of `old` that `keep` does not list, of those in the corpus's own shard
    folder only (an imported corpus may list a user's files where they are: those stay)."""
    kept = {shard.file for shard in keep.shards} | {
        shard.document_offsets.file for shard in keep.shards if shard.document_offsets
    }
    own = shard_folder(old.name) + "/"
    for shard in old.shards:
        for file in (shard.file, shard.document_offsets.file if shard.document_offsets else None):
            if file and file not in kept and file.startswith(own):
                # The new corpus is committed already: a file left behind is only litter.
                with contextlib.suppress(EmbedServeCoreError, OSError):
                    storage.delete(file)


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
