"""Corpora served by name from the server's --data-dir: manifests of shards, or text files."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath

import numpy as np
import numpy.typing as npt

from .corpus_tokens import ArrayTokens, CorpusTokens, ShardedTokens
from .errors import InvalidInput, NotFound
from .manifest import MAX_MANIFEST_BYTES, CorpusManifest, is_manifest, parse_manifest, read_manifest
from .shard_cache import ShardCache
from .shard_sources import CachedShards, LocalShards
from .storage import LocalStorage, Storage, check_relative, open_storage
from .tokenizer import Tokenizer
from .window_orders import InMemoryOrders, OrderStore

TokenIds = npt.NDArray[np.integer]
# Where the server keeps the shuffled window orders of the corpora it serves (see window_orders.py).
WINDOW_ORDERS_FOLDER = ".window-orders"


def tokens_sha256(ids: TokenIds) -> str:
    """sha256 of token IDs as little-endian int32: the identity of an encoded text."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i4").tobytes()).hexdigest()


class CorpusStore:
    """Resolves corpus names inside one data folder (local, or object storage) to their tokens.

    Locally, a name is a relative path with no `..`; after symlinks are resolved it must still lie
    inside the data folder, so nothing outside it is ever read. A name is a manifest (`NAME` or
    `NAME.json`: a prepared, appended or imported corpus, or a single-file corpus from before
    shards) or a UTF-8 text file, tokenized once and cached. In object storage only manifests are
    served; their shards are read through `shard_cache`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None,
        tokenizer: Tokenizer,
        *,
        max_cached: int = 8,
        window_orders: OrderStore | None = None,
        shard_cache: ShardCache | None = None,
    ) -> None:
        """window_orders keeps the corpora's shuffled window orders (in memory unless given);
        shard_cache is where shards from object storage are kept (needed for a URL data_dir)."""
        self._storage = open_storage(data_dir) if data_dir is not None and str(data_dir) else None
        self._root = self._storage.root.resolve() if isinstance(self._storage, LocalStorage) else None
        self.window_orders: OrderStore = window_orders or InMemoryOrders()
        self._tokenizer = tokenizer
        self._max_cached = max_cached
        self._shard_cache = shard_cache
        self._cache: OrderedDict[tuple[Path, int, int], ArrayTokens] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def data_dir(self) -> Path | None:
        return self._root

    @property
    def storage(self) -> Storage | None:
        return self._storage

    def resolve(self, name: str) -> Path:
        """The local file a corpus name refers to; NotFound unless it is a file inside the data folder."""
        if self._storage is None:
            raise NotFound(f"corpus {name!r}: this server has no --data-dir")
        relative = check_relative(name, "corpus name")
        if self._root is None:
            raise NotFound(f"corpus {name!r}: {self._storage.location} is object storage")
        candidate = self._root.joinpath(*relative.parts)
        try:
            resolved = candidate.resolve(strict=True)
            inside = resolved.is_relative_to(self._root) and resolved.is_file()
        except (OSError, RuntimeError):  # missing, unreadable, name too long, symlink loop
            inside = False
        # The server's own files there (window orders, staging) are not corpora.
        if not inside or resolved.relative_to(self._root).parts[0] == WINDOW_ORDERS_FOLDER:
            raise NotFound(f"corpus {name!r} not found in the data folder")
        return resolved

    def manifest(self, name: str) -> CorpusManifest | None:
        """The corpus's manifest when `name` (or `name.json`) is one; None for anything else."""
        if self._storage is None:
            raise NotFound(f"corpus {name!r}: this server has no --data-dir")
        check_relative(name, "corpus name")
        stem = name.removesuffix(".json")
        if self._root is not None:
            for candidate in (name, stem + ".json"):
                try:
                    path = self.resolve(candidate)
                except NotFound:
                    continue
                if path.suffix == ".json":
                    return _manifest_of(path, stem)
            return None
        try:
            return read_manifest(self._storage, stem)
        except NotFound:
            raise NotFound(
                f"corpus {name!r}: no manifest {self._storage.url_of(stem + '.json')} (a corpus in "
                "object storage is served after `embedserve prepare --data-dir URL`)"
            ) from None

    def open(self, name: str) -> CorpusTokens:
        """The corpus's tokens, as the stream reads them."""
        manifest = self.manifest(name)
        if manifest is not None:
            return self._sharded(manifest)
        return self._text(name)

    def _sharded(self, manifest: CorpusManifest) -> CorpusTokens:
        manifest.check_tokenizer(self._tokenizer)
        shards: LocalShards | CachedShards
        if self._root is not None:
            folder = PurePosixPath(manifest.name).parent
            shards = LocalShards(
                manifest, lambda file: self.resolve(_shard_name(folder, file, manifest.name))
            )
            may_wait = False
        else:
            assert self._storage is not None
            if self._shard_cache is None:
                raise NotFound(f"corpus {manifest.name!r}: this server has no shard cache for object storage")
            shards = CachedShards(manifest, self._storage, self._shard_cache)
            may_wait = True
        if len(manifest.shards) == 1 and manifest.legacy_identity is not None:
            array = shards.shard(0)
            return ArrayTokens(array, manifest.identity, ids_checked=True)
        return ShardedTokens(
            manifest.identity,
            [shard.tokens for shard in manifest.shards],
            manifest.numpy_dtype,
            shards,
            may_wait=may_wait,
        )

    def _text(self, name: str) -> ArrayTokens:
        path = self.resolve(name)
        try:
            stat = path.stat()
        except OSError as exc:
            raise NotFound(f"corpus {name!r} cannot be read: {exc.strerror}") from None
        key = (path, stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"corpus {name!r} is not UTF-8 text: {exc}") from None
        except OSError as exc:
            raise NotFound(f"corpus {name!r} cannot be read: {exc.strerror}") from None
        ids = self._tokenizer.encode(text, allowed_special=self._tokenizer.separator)
        ids.setflags(write=False)
        entry = ArrayTokens(ids, tokens_sha256(ids))
        with self._lock:
            self._cache[key] = entry
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return entry

    def tokens(self, name: str) -> TokenIds:
        """Every token of the corpus in one array (for tests and tools: a sharded corpus is read whole)."""
        source = self.open(name)
        if isinstance(source, ArrayTokens):
            return source.tokens
        whole: TokenIds = source.spans(np.zeros(1, dtype=np.int64), source.num_tokens)[0]
        return whole


def _shard_name(folder: PurePosixPath, file: str, corpus: str) -> str:
    """A shard's name in the data folder: its manifest's folder joined with the manifest's entry,
    which must itself be a relative path (checked again by resolve)."""
    relative = check_relative(file, f"corpus {corpus!r}: shard file")
    return (folder / relative).as_posix()


def _manifest_of(path: Path, name: str) -> CorpusManifest | None:
    """The manifest in a local .json file, or None when the file is not a corpus manifest."""
    try:
        if path.stat().st_size > MAX_MANIFEST_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return parse_manifest(data, name) if is_manifest(data) else None
