"""A bounded on-disk cache of shards fetched from object storage.

Each shard is stored under its sha256, so the same shard in two corpora (or two generations of
one) is fetched once, and a shard whose object changed is a different entry. A fetch writes a
temporary file, hashing it as it arrives; only a file whose size and sha256 match the manifest is
renamed into place, so nothing unverified is ever served. Least recently used shards are evicted
to stay under the size limit; server processes sharing the folder coordinate with file locks. A
shard evicted while a stream has it mapped stays readable by that stream (the mapping keeps the
file) until the stream moves on.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .errors import CorruptData, StartupError
from .manifest import ShardEntry
from .storage import Storage

_LOGGER = logging.getLogger(__name__)
_SUFFIX = ".shard"
# A shard in use is marked recently used at most this often (a utime per batch would cost more
# than the batch).
_TOUCH_SECONDS = 5.0


class ShardCache:
    """Verified shards in `folder`, at most `max_bytes` of them."""

    def __init__(self, folder: Path, max_bytes: int, *, prefetch_threads: int = 2) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self._prefetcher = ThreadPoolExecutor(prefetch_threads, thread_name_prefix="shard-prefetch")
        self._in_flight: dict[str, Future[Path]] = {}
        self._lock = threading.Lock()
        self._touched: dict[str, float] = {}

    def path_for(self, sha256: str) -> Path:
        return self.folder / f"{sha256}{_SUFFIX}"

    def has(self, entry: ShardEntry) -> bool:
        return self.path_for(entry.sha256).exists()

    def fetch(self, storage: Storage, entry: ShardEntry) -> Path:
        """The verified local copy of a shard, fetched first when it is not here."""
        path = self.path_for(entry.sha256)
        if path.exists():
            self._touch(entry.sha256, path)
            return path
        with self._lock:
            pending = self._in_flight.get(entry.sha256)
        if pending is not None:  # a prefetch is already bringing it
            with contextlib.suppress(Exception):
                return pending.result()
        return self._fetch(storage, entry)

    def prefetch(self, storage: Storage, entries: list[ShardEntry]) -> None:
        """Fetches these shards in the background, in order, as far as half the cache allows."""
        room = self.max_bytes // 2
        for entry in entries:
            room -= entry.bytes
            if room < 0:
                return
            with self._lock:
                if entry.sha256 in self._in_flight or self.path_for(entry.sha256).exists():
                    continue
                future = self._prefetcher.submit(self._fetch, storage, entry)
                self._in_flight[entry.sha256] = future
            future.add_done_callback(functools.partial(self._done, entry.sha256))

    def _done(self, sha256: str, _: Future[Path]) -> None:
        with self._lock:
            future = self._in_flight.pop(sha256, None)
        if future is not None and future.exception() is not None:
            # The stream's own fetch will try again and report the failure to its caller.
            _LOGGER.debug("prefetch of shard %s failed: %s", sha256, future.exception())

    def _touch(self, sha256: str, path: Path) -> None:
        now = time.monotonic()
        if now - self._touched.get(sha256, float("-inf")) >= _TOUCH_SECONDS:
            self._touched[sha256] = now
            with contextlib.suppress(FileNotFoundError):
                os.utime(path)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _fetch(self, storage: Storage, entry: ShardEntry) -> Path:
        if entry.bytes > self.max_bytes:
            raise StartupError(
                f"shard {entry.file} is {entry.bytes} bytes, more than the whole shard cache "
                f"(--cache-size {self.max_bytes}); raise --cache-size"
            )
        path = self.path_for(entry.sha256)
        with self._locked(entry.sha256):  # one process fetches; the others then find it
            if path.exists():
                return path
            with self._locked("evict"):
                self._make_room(entry.bytes)
            started = time.perf_counter()
            handle, temporary = tempfile.mkstemp(dir=self.folder, prefix=".fetch-", suffix=".partial")
            os.close(handle)
            os.unlink(temporary)
            try:
                digest = hashlib.sha256()
                size = storage.download(entry.file, Path(temporary), digest.update)
                if size != entry.bytes or digest.hexdigest() != entry.sha256:
                    raise CorruptData(
                        f"{storage.url_of(entry.file)} does not match the manifest: "
                        f"{size} bytes with sha256 {digest.hexdigest()}, expected {entry.bytes} bytes "
                        f"with sha256 {entry.sha256}; it is not served"
                    )
                os.chmod(temporary, 0o444)
                os.replace(temporary, path)
            finally:
                Path(temporary).unlink(missing_ok=True)
            # Fetches running side by side each made room for themselves only: enforce the
            # limit again, now that this one is in (it is the most recent, so evicted last).
            with self._locked("evict"):
                self._make_room(0)
        _LOGGER.info(
            "fetched shard %s (%d bytes) in %.2f s",
            storage.url_of(entry.file),
            entry.bytes,
            time.perf_counter() - started,
        )
        return path

    def cached_bytes(self) -> int:
        total = 0
        for shard in self.folder.glob(f"*{_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                total += shard.stat().st_size
        return total

    def _make_room(self, incoming: int) -> None:
        """Evicts least recently used shards until `incoming` more bytes fit."""
        entries: list[tuple[float, int, Path]] = []
        for shard in self.folder.glob(f"*{_SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                stat = shard.stat()
                entries.append((stat.st_mtime, stat.st_size, shard))
        used = sum(size for _, size, _ in entries)
        for _, size, shard in sorted(entries):
            if used + incoming <= self.max_bytes:
                break
            shard.unlink(missing_ok=True)
            used -= size
            _LOGGER.info("evicted shard %s from the cache (%d bytes)", shard.name, size)

    def close(self) -> None:
        self._prefetcher.shutdown(wait=False, cancel_futures=True)
