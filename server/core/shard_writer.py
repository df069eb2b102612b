"""Writing a corpus's shards: a token stream cut into files of at most `shard_bytes`.

Every engine writes through here (in-process prepare, the Ray engine, imports), so shard files,
their document offsets and their manifest entries are made one way. A shard file is named
`NAME.shards/<label>-<run>.tokens`: the run is new for each prepare or append, so a new shard
never replaces a file an existing manifest lists.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

import numpy as np

from .manifest import OFFSETS_DTYPE, DocumentOffsets, ShardEntry
from .storage import Storage

DEFAULT_SHARD_BYTES = 256 << 20


def shard_folder(corpus: str) -> str:
    return f"{corpus}.shards"


def new_run() -> str:
    """A label unique to one prepare or append, in its shard files' names."""
    return secrets.token_hex(4)


def write_shard(
    storage: Storage,
    file: str,
    tokens: bytes | memoryview,
    dtype: np.dtype[Any],
    document_starts: Sequence[int] | np.ndarray[Any, Any] = (),
) -> ShardEntry:
    """Writes one shard (and its document offsets when it has documents); its manifest entry."""
    data = memoryview(tokens).cast("B")
    with storage.writer(file) as out:
        out.write(data)
    offsets = None
    starts = np.asarray(document_starts, dtype=OFFSETS_DTYPE)
    if len(starts):
        offsets_file = file.removesuffix(".tokens") + ".docs"
        raw = starts.tobytes()
        with storage.writer(offsets_file) as out:
            out.write(raw)
        offsets = DocumentOffsets(offsets_file, len(starts), hashlib.sha256(raw).hexdigest())
    return ShardEntry(
        file=file,
        tokens=len(data) // dtype.itemsize,
        documents=len(starts),
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        document_offsets=offsets,
    )


class ShardWriter:
    """Cuts a token stream into shards as it arrives: `add` bytes of tokens (with the positions,
    within those tokens, where documents start), then `finish` for the manifest entries."""

    def __init__(
        self,
        storage: Storage,
        corpus: str,
        dtype: np.dtype[Any],
        *,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        run: str | None = None,
        first_number: int = 0,
    ) -> None:
        self._storage = storage
        self._corpus = corpus
        self._dtype = dtype
        # Whole tokens per shard, at least one.
        self._shard_tokens = max(1, shard_bytes // dtype.itemsize)
        self._run = run or new_run()
        self._number = first_number
        self._pending: list[bytes] = []
        self._pending_tokens = 0
        self._pending_starts: list[int] = []
        self._start_next = False  # a document starts at the next token added (it began at an add's end)
        self.entries: list[ShardEntry] = []

    def add(self, tokens: bytes, document_starts: Sequence[int] = ()) -> None:
        count = len(tokens) // self._dtype.itemsize
        offset = 0  # tokens of this call already placed
        starts = list(document_starts)
        if self._start_next and count:
            starts.insert(0, 0)
            self._start_next = False
        if count in starts:  # an empty document at the very end starts with what comes next
            self._start_next = True
        while offset < count:
            take = min(count - offset, self._shard_tokens - self._pending_tokens)
            base = self._pending_tokens - offset
            self._pending_starts.extend(s + base for s in starts if offset <= s < offset + take)
            item = self._dtype.itemsize
            self._pending.append(tokens[offset * item : (offset + take) * item])
            self._pending_tokens += take
            offset += take
            if self._pending_tokens == self._shard_tokens:
                self._flush()

    def _flush(self) -> None:
        if not self._pending_tokens:
            return
        file = f"{shard_folder(self._corpus)}/{self._number:05d}-{self._run}.tokens"
        self.entries.append(
            write_shard(self._storage, file, b"".join(self._pending), self._dtype, self._pending_starts)
        )
        self._number += 1
        self._pending, self._pending_tokens, self._pending_starts = [], 0, []

    def finish(self) -> list[ShardEntry]:
        self._flush()
        return self.entries
