"""Who runs `embedserve prepare`: threads of this process, or a Ray cluster.

Each engine reads the same sources and writes the same corpus (shards through shard_writer, the
manifest last); `prepare_engine` picks one by name, in this one place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

from .document_sources import DEFAULT_BATCH_ROWS, DEFAULT_TEXT_COLUMN
from .errors import InvalidInput
from .manifest import CorpusManifest
from .prepared import prepare_corpus
from .shard_writer import DEFAULT_SHARD_BYTES
from .storage import Storage, is_url
from .tokenizer import Tokenizer

_LOGGER = logging.getLogger(__name__)
ENGINES = ("local", "ray")


class PrepareEngine(Protocol):
    def prepare(
        self,
        inputs: Sequence[str],
        name: str,
        storage: Storage,
        tokenizer: Tokenizer,
        *,
        text_column: str = DEFAULT_TEXT_COLUMN,
        threads: int | None = None,
        progress: Callable[[int, int, int], None] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        append: bool = False,
        batch_rows: int = DEFAULT_BATCH_ROWS,
    ) -> CorpusManifest:
        """Tokenizes `inputs` into the corpus `name` in `storage`; returns its manifest."""
        ...


class LocalEngine:
    """Threads of this process (prepared.prepare_corpus): no cluster, no extra dependency."""

    def prepare(
        self,
        inputs: Sequence[str],
        name: str,
        storage: Storage,
        tokenizer: Tokenizer,
        *,
        text_column: str = DEFAULT_TEXT_COLUMN,
        threads: int | None = None,
        progress: Callable[[int, int, int], None] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        append: bool = False,
        batch_rows: int = DEFAULT_BATCH_ROWS,
    ) -> CorpusManifest:
        remote = [source for source in inputs if is_url(source)]
        if remote:
            raise InvalidInput(
                f"the local engine reads local files; {remote[0]} is a URL (use --engine ray, which reads "
                "object storage, or copy the files here)"
            )
        return prepare_corpus(
            [Path(source) for source in inputs],
            name,
            storage,
            tokenizer,
            text_column=text_column,
            threads=threads,
            progress=progress,
            shard_bytes=shard_bytes,
            append=append,
            batch_rows=batch_rows,
        )


def prepare_engine(engine: str, *, ray_address: str = "") -> PrepareEngine:
    """The engine named by --engine."""
    if engine == "local":
        return LocalEngine()
    if engine == "ray":
        from .prepare_ray import RayEngine  # needs embedserve[ray]

        return RayEngine(address=ray_address or None)
    raise InvalidInput(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
