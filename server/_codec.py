"""The server's side of the tensor codec: request tensors decoded into checked values (a
malformed one is InvalidInput), torch results encoded, and replies encoded around the tensor
a lookup writes in place. The wire format itself is `embedserve.tensor`, shared with the client.
"""

from __future__ import annotations

import ctypes
import math
import platform
from functools import cache
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import torch
from embedserve.tensor import TensorFormatError, dtype_name, from_tensor_pb, tensor_field_head
from embedserve.v1 import tensor_pb2

from .core import OUTPUT_DTYPES, InvalidInput
from .core.embedding import tensor_bytes

_INTEGER_DTYPES = (tensor_pb2.DTYPE_INT32, tensor_pb2.DTYPE_INT64, tensor_pb2.DTYPE_UINT16)
_WIRE_DTYPE_BY_TORCH = {
    torch.int32: tensor_pb2.DTYPE_INT32,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
}


def token_ids_from_pb(tensor: tensor_pb2.Tensor, field: str = "token_ids") -> npt.NDArray[np.integer]:
    """Decodes an integer tensor of token IDs; a malformed one is InvalidInput."""
    if tensor.dtype not in _INTEGER_DTYPES:
        if tensor.dtype == tensor_pb2.DTYPE_UNSPECIFIED and not tensor.shape and not tensor.data:
            # An unset message field reads as an empty Tensor: say so, not "dtype 0".
            raise InvalidInput(f"{field} is missing: a Tensor of DTYPE_INT32, DTYPE_INT64 or DTYPE_UINT16")
        raise InvalidInput(
            f"{field} must be DTYPE_INT32, DTYPE_INT64 or DTYPE_UINT16, got {_dtype_label(tensor.dtype)}"
        )
    try:
        return from_tensor_pb(tensor)  # type: ignore[return-value]
    except TensorFormatError as exc:
        raise InvalidInput(f"{field}: {exc}") from None


def _dtype_label(dtype: int) -> str:
    try:
        return tensor_pb2.Dtype.Name(dtype)  # type: ignore[arg-type]
    except ValueError:
        return f"unknown dtype {dtype}"


def array_from_pb(tensor: tensor_pb2.Tensor, field: str) -> npt.NDArray[np.generic]:
    """Decodes any tensor; a malformed one is InvalidInput."""
    try:
        return from_tensor_pb(tensor)
    except TensorFormatError as exc:
        raise InvalidInput(f"{field}: {exc}") from None


def output_dtype_from_pb(dtype: tensor_pb2.Dtype.ValueType, field: str = "output_dtype") -> torch.dtype:
    if dtype == tensor_pb2.DTYPE_UNSPECIFIED:
        return torch.float32
    try:
        name = dtype_name(dtype)
    except TensorFormatError:
        raise InvalidInput(f"{field} {dtype} is not a known dtype") from None
    if name not in OUTPUT_DTYPES:
        raise InvalidInput(f"{field} must be float32, float16 or bfloat16, got {name}")
    return OUTPUT_DTYPES[name]


def wire_dtype(dtype: torch.dtype) -> tensor_pb2.Dtype.ValueType:
    return _WIRE_DTYPE_BY_TORCH[dtype]


def tensor_pb_from_torch(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    """Encodes a CPU tensor as raw little-endian bytes (x86-64 and arm64 hosts are little-endian)."""
    return tensor_pb2.Tensor(
        dtype=wire_dtype(tensor.dtype), shape=list(tensor.shape), data=tensor_bytes(tensor).tobytes()
    )


class ReplyMemory(Protocol):
    """Where a reply encoded around its tensor is built: the message and a writable view of it."""

    def allocate(self, size: int) -> tuple[bytes | bytearray, memoryview]: ...


class BytearrayReplies:
    """Any Python: the reply is built in a bytearray and copied into bytes once at the end."""

    def allocate(self, size: int) -> tuple[bytes | bytearray, memoryview]:
        message = bytearray(size)
        return message, memoryview(message)


class InPlaceBytesReplies:
    """CPython: a new bytes object, which no one else holds yet, is written through ctypes before
    anyone sees it; a result is then written once, by the lookup, and copied only by gRPC."""

    @staticmethod
    @cache
    def supported() -> bool:
        """Whether new bytes objects can be filled in place here (checked once on a sample)."""
        if platform.python_implementation() != "CPython":
            return False
        try:
            sample = _uninitialized_bytes(64)
            _writable_view(sample)[:] = bytes(range(64))
        except (AttributeError, OSError, TypeError, ValueError):
            return False
        return sample == bytes(range(64))

    def allocate(self, size: int) -> tuple[bytes | bytearray, memoryview]:
        message = _uninitialized_bytes(size)
        return message, _writable_view(message)


@cache
def default_reply_memory() -> ReplyMemory:
    """The one choice of reply memory: bytes filled in place where that works, else a bytearray."""
    return InPlaceBytesReplies() if InPlaceBytesReplies.supported() else BytearrayReplies()


@cache
def _new_bytes() -> Any:
    function = ctypes.pythonapi.PyBytes_FromStringAndSize
    function.restype = ctypes.py_object
    function.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    return function


def _uninitialized_bytes(size: int) -> bytes:
    return _new_bytes()(None, size)  # type: ignore[no-any-return]


def _writable_view(message: bytes) -> memoryview:
    """The memory of a bytes object no one else holds yet, writable; the view keeps it alive."""
    # A bytes object's characters start one byte before the end of its fixed-size part.
    memory = (ctypes.c_char * len(message)).from_address(id(message) + bytes.__basicsize__ - 1)
    memory._message = message  # type: ignore[attr-defined]
    return memoryview(memory).cast("B")


class TensorReply:
    """A reply message whose one tensor field is filled in place: the lookup writes its result
    into `tensor`, a view of the reply's own bytes, and `message()` is what gRPC sends.

    The bytes equal SerializeToString() of the parent with that field (and `trailer`, the
    encoded fields numbered after it) set. gRPC copies a reply once into its own buffers and
    accepts only `bytes`; `memory` (default_reply_memory() unless given) says how the message
    is built around the tensor.
    """

    def __init__(
        self,
        field_number: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        trailer: bytes = b"",
        *,
        memory: ReplyMemory | None = None,
    ) -> None:
        head = tensor_field_head(field_number, shape, wire_dtype(dtype))
        count = math.prod(shape)
        size = len(head) + count * dtype.itemsize + len(trailer)
        self._message, view = (default_reply_memory() if memory is None else memory).allocate(size)
        view[: len(head)] = head
        view[size - len(trailer) :] = trailer
        self.tensor = (
            torch.frombuffer(view, dtype=dtype, offset=len(head), count=count).view(shape)
            if count
            else torch.empty(shape, dtype=dtype)
        )

    def message(self) -> bytes:
        return self._message if isinstance(self._message, bytes) else bytes(self._message)
