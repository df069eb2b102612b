"""Corpus files served by name from the server's --data-dir, tokenized once."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath

import numpy as np
import numpy.typing as npt

from .errors import InvalidInput, NotFound
from .prepared import open_prepared, read_sidecar
from .tokenizer import Tokenizer
from .window_orders import InMemoryOrders, OrderStore

TokenIds = npt.NDArray[np.integer]
# Where the server keeps the shuffled window orders of the corpora it serves (see window_orders.py).
WINDOW_ORDERS_FOLDER = ".window-orders"


def tokens_sha256(ids: TokenIds) -> str:
    """sha256 of token IDs as little-endian int32: the identity of an encoded text."""
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i4").tobytes()).hexdigest()


class CorpusStore:
    """Resolves corpus names safely inside one folder and caches their tokens.

    A name is a relative path with no `..`; after symlinks are resolved it must
    still lie inside the data folder, so nothing outside it is ever read.
    """

    def __init__(
        self,
        data_dir: Path | None,
        tokenizer: Tokenizer,
        *,
        max_cached: int = 8,
        window_orders: OrderStore | None = None,
    ) -> None:
        """window_orders keeps the corpora's shuffled window orders (in memory unless given)."""
        self._root = data_dir.resolve() if data_dir is not None else None
        self.window_orders: OrderStore = window_orders or InMemoryOrders()
        self._tokenizer = tokenizer
        self._max_cached = max_cached
        self._cache: OrderedDict[tuple[Path, int, int], tuple[TokenIds, str]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def data_dir(self) -> Path | None:
        return self._root

    def _prepared_sidecar(self, name: str) -> tuple[Path, dict[str, object]] | None:
        for candidate in (name, name + ".json"):
            try:
                path = self.resolve(candidate)
            except NotFound:
                continue
            if path.suffix == ".json":
                meta = read_sidecar(path)
                if meta is not None:
                    return path, meta
        return None

    def _token_file(self, name: str, sidecar: Path, meta: dict[str, object]) -> Path:
        """The sidecar's token file, resolved like a corpus name: a symlink out of the folder is missing."""
        assert self._root is not None  # a sidecar was resolved, so there is a data folder
        tokens_file = str(meta.get("tokens_file", ""))
        if not tokens_file or PurePosixPath(tokens_file).name != tokens_file:
            raise NotFound(f"corpus {name!r}: its sidecar names no token file beside it")
        try:
            return self.resolve((sidecar.parent.relative_to(self._root) / tokens_file).as_posix())
        except NotFound:
            raise NotFound(f"corpus {name!r}: its token file {tokens_file!r} is missing") from None

    def resolve(self, name: str) -> Path:
        """The file a corpus name refers to; NotFound unless it is a file inside the data folder."""
        if self._root is None:
            raise NotFound(f"corpus {name!r}: this server has no --data-dir")
        if not name or "\0" in name or "\\" in name:
            raise InvalidInput(f"corpus name {name!r} is not a relative path")
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise InvalidInput(f"corpus name {name!r} must be a relative path inside the data folder")
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

    def tokens(self, name: str) -> TokenIds:
        """The corpus's GPT-2 token IDs: a prepared corpus's memory-mapped token file (named by its
        name or its sidecar), or a text file encoded as the notebook encodes (<|endoftext|> allowed)."""
        return self.tokens_and_hash(name)[0]

    def tokens_and_hash(self, name: str) -> tuple[TokenIds, str]:
        """tokens(name) and a sha256 that names exactly those tokens (for stream cursors)."""
        prepared = self._prepared_sidecar(name)
        if prepared is not None:
            sidecar, meta = prepared
            corpus = open_prepared(name, meta, self._token_file(name, sidecar, meta), self._tokenizer)
            return corpus.tokens, str(meta["tokens_sha256"])
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
        entry = (ids, tokens_sha256(ids))
        with self._lock:
            self._cache[key] = entry
            while len(self._cache) > self._max_cached:
                self._cache.popitem(last=False)
        return entry
