"""Shared-memory output regions for clients on the same host (as Triton's system shared memory).

A client creates a POSIX shared-memory region (a file under /dev/shm) and registers it; the
server maps it and hands back an unguessable handle, which only that client knows, so one
client cannot write into another's region. The lookup writes its result straight into
the mapping: no serialization, no transport. Regions are released when their
session ends (the caller's job) and all of them when the registry closes.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import re
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InvalidInput, NotFound

SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


@dataclass
class _Region:
    name: str
    size: int
    mapping: mmap.mmap


class SharedMemoryRegistry:
    def __init__(self, folder: Path = SHM_DIR, max_regions: int = 1024) -> None:
        self._folder = folder
        self._max_regions = max_regions
        self._regions: dict[str, _Region] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._regions)

    def register(self, name: str, byte_size: int) -> str:
        """Maps the region `name` (its first byte_size bytes); returns its handle."""
        name = name.lstrip("/")
        if not _NAME.match(name):
            raise InvalidInput(f"shared-memory name {name!r}: use letters, digits, '_', '.', '-' only")
        if byte_size <= 0:
            raise InvalidInput("byte_size must be positive")
        path = self._folder / name
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise NotFound(f"no shared-memory region {name!r} on the server's host") from None
        except OSError as error:
            raise InvalidInput(f"shared-memory region {name!r}: {error.strerror}") from None
        try:
            size = os.fstat(descriptor).st_size
            if byte_size > size:
                raise InvalidInput(f"byte_size {byte_size} is larger than region {name!r} ({size} bytes)")
            mapping = mmap.mmap(descriptor, byte_size, access=mmap.ACCESS_WRITE)
        finally:
            os.close(descriptor)
        with self._lock:
            if len(self._regions) >= self._max_regions:
                mapping.close()
                raise InvalidInput(f"the server holds {self._max_regions} regions already")
            handle = secrets.token_urlsafe(18)
            self._regions[handle] = _Region(name, byte_size, mapping)
        return handle

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
        with self._lock:
            region = self._regions.pop(handle, None)
        if region is not None:
            with contextlib.suppress(BufferError):  # a write still holds a view; it goes with it
                region.mapping.close()

    def close(self) -> None:
        for handle in list(self._regions):
            self.release(handle)
