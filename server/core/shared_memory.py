"""Shared-memory output regions for clients on the server's host (as Triton's system shared memory,
but created by the server).

For each session the server creates a new POSIX shared-memory object (a file under /dev/shm)
under an unguessable name, mode 0600, and hands the client its name and a handle; the client maps
it, and Embed writes results straight into it: no serialization, no transport. The server reads
and writes no object it did not create itself for that session, so no request can make it write
into someone else's memory or tell whether another file exists. Each connection holds at most
`max_per_connection` regions; a region is unmapped and removed when its session ends (the
caller's job), and every one when the registry closes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import re
import secrets
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidInput, NotFound, Overloaded, PreconditionFailed

_LOGGER = logging.getLogger(__name__)
SHM_DIR = Path("/dev/shm")
REGION_PREFIX = "embedserve-region-"
SHARED_MEMORY_FULL_REASON = "SHARED_MEMORY_FULL"
# Created by a server process (its pid, then 128 random bits): what a later server may clean up.
_OURS = re.compile(rf"^{REGION_PREFIX}(\d+)-[0-9a-f]{{32}}$")


@dataclass(frozen=True)
class RegionGrant:
    """What a session hands its client: where to map the region, and the handle Embed names."""

    handle: str
    name: str
    byte_size: int


@dataclass
class _Region:
    path: Path
    identity: tuple[int, int]  # (st_dev, st_ino) of the file this server created
    connection: str
    size: int
    mapping: mmap.mmap


class SharedMemoryRegistry:
    def __init__(self, folder: Path = SHM_DIR, max_per_connection: int = 16) -> None:
        self._folder = folder
        self._max_per_connection = max_per_connection
        self._regions: dict[str, _Region] = {}
        self._per_connection: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def enabled(self) -> bool:
        return self._max_per_connection > 0

    def create(self, connection: str, byte_size: int) -> RegionGrant:
        """A new region of byte_size bytes for a session on `connection` (any name of the
        client's connection: its regions are counted against the per-connection cap)."""
        if not self.enabled:
            raise PreconditionFailed("shared memory is off on this server (--shared-memory-regions 0)")
        if byte_size <= 0:
            raise InvalidInput("byte_size must be positive")
        with self._lock:
            if self._per_connection[connection] >= self._max_per_connection:
                raise InvalidInput(
                    f"this connection holds {self._max_per_connection} shared-memory regions already "
                    "(--shared-memory-regions); end a session first"
                )
            self._per_connection[connection] += 1
        try:
            region = self._new_region(connection, byte_size)
        except BaseException:
            with self._lock:
                self._forget_connection(connection)
            raise
        handle = secrets.token_urlsafe(18)
        with self._lock:
            self._regions[handle] = region
        return RegionGrant(handle, region.path.name, byte_size)

    def _new_region(self, connection: str, byte_size: int) -> _Region:
        path = self._folder / f"{REGION_PREFIX}{os.getpid()}-{secrets.token_hex(16)}"
        # O_EXCL: a new file or nothing (never one that someone placed there); 0600: this user only.
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            # Allocated now, not on first write: a write into a sparse file on a full /dev/shm
            # would kill the process (SIGBUS) instead of failing here.
            os.posix_fallocate(descriptor, 0, byte_size)
            mapping = mmap.mmap(descriptor, byte_size, access=mmap.ACCESS_WRITE)
            stat = os.fstat(descriptor)
        except OSError as error:
            os.unlink(path)
            raise Overloaded(
                f"no room for a shared-memory region of {byte_size} bytes under {self._folder}: "
                f"{error.strerror}",
                reason=SHARED_MEMORY_FULL_REASON,
            ) from None
        finally:
            os.close(descriptor)
        return _Region(path, (stat.st_dev, stat.st_ino), connection, byte_size, mapping)

    def _forget_connection(self, connection: str) -> None:
        self._per_connection[connection] -= 1
        if self._per_connection[connection] <= 0:
            del self._per_connection[connection]

    def check(self, handle: str, offset: int, nbytes: int) -> None:
        """Raises unless a result of nbytes fits at offset in the region."""
        region = self._regions.get(handle)
        if region is None:
            raise NotFound("no such shared-memory region handle (expired with its session?)")
        if offset < 0 or offset + nbytes > region.size:
            raise InvalidInput(
                f"{nbytes} bytes at offset {offset} do not fit the region's {region.size} bytes"
            )

    def view(self, handle: str, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A CPU tensor over the region at offset, for a result to be written into.

        The view holds the mapping's buffer (through numpy: torch.frombuffer would keep the
        object but not its buffer), so a region released meanwhile is unmapped only once the
        view is gone.
        """
        nbytes = math.prod(shape) * dtype.itemsize
        self.check(handle, offset, nbytes)
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        mapping = self._regions[handle].mapping
        raw = np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=offset)
        return torch.from_numpy(raw).view(dtype).view(shape)

    def release(self, handle: str) -> None:
        """Unmaps the region and removes its file (if it is still the one this server created)."""
        with self._lock:
            region = self._regions.pop(handle, None)
            if region is not None:
                self._forget_connection(region.connection)
        if region is None:
            return
        with contextlib.suppress(OSError):
            stat = os.stat(region.path, follow_symlinks=False)
            if (stat.st_dev, stat.st_ino) == region.identity:
                os.unlink(region.path)
        with contextlib.suppress(BufferError):  # a write still holds a view; it goes with it
            region.mapping.close()

    def close(self) -> None:
        for handle in list(self._regions):
            self.release(handle)

    def remove_abandoned(self) -> int:
        """Removes regions that server processes of this user left behind when they died (a
        region of a live process stays); returns how many."""
        removed = 0
        with contextlib.suppress(OSError):
            for entry in os.scandir(self._folder):
                matched = _OURS.match(entry.name)
                if matched is None or _alive(int(matched.group(1))):
                    continue
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_uid == os.getuid() and entry.is_file(
                        follow_symlinks=False
                    ):
                        os.unlink(entry.path)
                        removed += 1
        if removed:
            _LOGGER.info("removed %d shared-memory regions left by server processes that ended", removed)
        return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
