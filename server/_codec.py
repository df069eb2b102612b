"""Request and reply tensors on the server side: proto <-> numpy / torch."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from embedserve.client.tensor import TensorFormatError, dtype_name, from_tensor_pb
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
        raise InvalidInput(f"{field} must be int32, int64 or uint16, got dtype {tensor.dtype}")
    try:
        return from_tensor_pb(tensor)  # type: ignore[return-value]
    except TensorFormatError as exc:
        raise InvalidInput(f"{field}: {exc}") from None


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


def varint(value: int) -> bytes:
    """Protobuf's base-128 encoding of a non-negative integer."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def encode_varint_field(field_number: int, value: int) -> bytes:
    """The wire bytes of a non-negative integer field (what SerializeToString writes for it)."""
    return varint(field_number << 3) + varint(value)


def encode_tensor_field(field_number: int, tensor: torch.Tensor) -> bytes:
    """The wire bytes of `Tensor` as field `field_number` of its parent message, in one copy.

    Equal to the parent's SerializeToString() with only that field set (a test holds it to
    that), without building the message first: protobuf would copy the data into the message
    and again into the serialized reply, which for a 2 MB result costs more than the lookup.
    """
    data = tensor_bytes(tensor).data
    body = bytearray(b"\x08" + varint(wire_dtype(tensor.dtype)))
    if tensor.dim():
        packed = b"".join(varint(int(d)) for d in tensor.shape)
        body += b"\x12" + varint(len(packed)) + packed
    if len(data):
        body += b"\x1a" + varint(len(data))
    head = varint(field_number << 3 | 2) + varint(len(body) + len(data)) + bytes(body)
    return b"".join((head, data))
