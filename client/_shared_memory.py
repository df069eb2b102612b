"""Shared-memory output regions: Embed results written by a same-host server into this process's memory."""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import types
from pathlib import Path
from stat import S_ISREG
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from embedserve.v1 import embedding_pb2, embedding_pb2_grpc, tensor_pb2

from ._errors import error_from_rpc
from ._runner import Runner
from .tensor import NUMPY_DTYPES

SHM_DIR = Path("/dev/shm")


class SharedMemoryRegion:
    """A region under /dev/shm that the server creates for this client and writes results into
    while the session is open.

    Use as `async with client.shared_memory(nbytes) as region:` and pass `output=region` to
    `embed`. The arrays returned are views into the region: the next embed into the same bytes
    overwrites them, and they must not be used once the region is closed. The server must run on
    this host, as this user (the region is its file, mode 0600).
    """

    def __init__(self, stub: embedding_pb2_grpc.EmbeddingServiceAsyncStub, byte_size: int) -> None:
        if byte_size <= 0:
            raise ValueError("byte_size must be positive")
        self.byte_size = byte_size
        self._stub = stub
        self._memory: mmap.mmap | None = None
        self._session: Any = None
        self.handle = ""
        self.name = ""

    async def __aenter__(self) -> SharedMemoryRegion:
        try:
            self._session = self._stub.SharedMemorySession(
                embedding_pb2.SharedMemorySessionRequest(byte_size=self.byte_size)
            )
            first = await self._session.read()
            if not isinstance(first, embedding_pb2.SharedMemorySessionResponse):  # grpc.aio.EOF
                raise ConnectionError("the server ended the shared-memory session at once")
            self._memory = _map_region(first.name, self.byte_size)
            self.handle, self.name = first.handle, first.name
        except grpc.RpcError as error:
            await self.close()
            raise error_from_rpc(error) from None
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Ends the session (the server removes the region) and unmaps it here."""
        if self._session is not None:
            self._session.cancel()
            self._session = None
        if self._memory is not None:
            memory, self._memory = self._memory, None
            with contextlib.suppress(BufferError):  # arrays still view it; it goes when they do
                memory.close()

    def output(self, offset: int) -> embedding_pb2.SharedMemoryOutput:
        if self._memory is None or not self.handle:
            raise RuntimeError("the region is not open; use `async with client.shared_memory(n)`")
        return embedding_pb2.SharedMemoryOutput(handle=self.handle, offset=offset)

    def array(self, described: tensor_pb2.Tensor, offset: int, nbytes: int) -> npt.NDArray[Any]:
        """The result the server wrote at offset, as described by the reply's data-less tensor."""
        if self._memory is None:
            raise RuntimeError("the region is closed")
        shape = tuple(int(d) for d in described.shape)
        dtype = NUMPY_DTYPES[described.dtype]
        count = math.prod(shape)
        if count * dtype.itemsize != nbytes:
            raise ValueError(f"the server wrote {nbytes} bytes for a {list(shape)} {dtype} result")
        raw = np.frombuffer(self._memory, dtype=dtype, count=count, offset=offset).reshape(shape)
        if described.dtype == tensor_pb2.DTYPE_BFLOAT16:
            return (raw.astype(np.uint32) << 16).view(np.float32)  # widened, as from_tensor_pb does
        return raw


def _map_region(name: str, byte_size: int) -> mmap.mmap:
    """Maps the region the server created: a regular file of exactly byte_size bytes."""
    if not name or "/" in name or name.startswith("."):
        raise ConnectionError(f"the server named no usable shared-memory region ({name!r})")
    descriptor = os.open(SHM_DIR / name, os.O_RDWR | os.O_NOFOLLOW)
    try:
        stat = os.fstat(descriptor)
        if not S_ISREG(stat.st_mode) or stat.st_size != byte_size:
            raise ConnectionError(f"{SHM_DIR / name} is not the {byte_size}-byte region the server created")
        return mmap.mmap(descriptor, byte_size)
    finally:
        os.close(descriptor)


class SyncSharedMemoryRegion:
    """SharedMemoryRegion for the synchronous Client: `with client.shared_memory(n) as region:`."""

    def __init__(self, region: SharedMemoryRegion, run: Runner) -> None:
        self._region = region  # Client.embed hands it to AsyncClient.embed
        self._run = run
        self._open = False

    @property
    def byte_size(self) -> int:
        return self._region.byte_size

    @property
    def handle(self) -> str:
        """The server's name for the region while the session is open ("" before)."""
        return self._region.handle

    @handle.setter
    def handle(self, handle: str) -> None:
        self._region.handle = handle

    @property
    def name(self) -> str:
        """The region's name under /dev/shm while the session is open ("" before)."""
        return self._region.name

    def __enter__(self) -> SyncSharedMemoryRegion:
        self._run(self._region.__aenter__())
        self._open = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Ends the session (the server unmaps the region) and frees the memory; closing the Client
        closes its regions, and closing a closed region does nothing."""
        if self._open:
            self._open = False
            self._run(self._region.close())

    def output(self, offset: int) -> embedding_pb2.SharedMemoryOutput:
        return self._region.output(offset)

    def array(self, described: tensor_pb2.Tensor, offset: int, nbytes: int) -> npt.NDArray[Any]:
        """The result the server wrote at offset, as described by the reply's data-less tensor."""
        return self._region.array(described, offset, nbytes)
