"""embedserve.v1.Tensor <-> numpy, shared by the client and the server: raw little-endian,
row-major bytes.

Decoded arrays are read-only `np.frombuffer` views (`np.array(a)` gives a writable
copy). protobuf copies a bytes field each time it is read, so replies that carry one
large tensor are decoded with `split_tensor_field`, which leaves the tensor's bytes
in the received message and hands them out without a copy; `tensor_field_head` and
`encode_varint_field` are the other direction, for replies encoded around a tensor
written in place. numpy has no bfloat16, so bfloat16 tensors decode to float32
(exactly: bfloat16 is the top half of a float32).

This module needs only numpy and protobuf: no torch, tiktoken or gensim, and nothing of
the client or the server.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np
import numpy.typing as npt
from google.protobuf.message import Message

from embedserve.v1 import tensor_pb2

__all__ = [
    "DTYPE_BY_NAME",
    "MAX_DIMENSIONS",
    "NAME_BY_DTYPE",
    "NUMPY_DTYPES",
    "TensorFormatError",
    "dtype_name",
    "encode_varint_field",
    "from_tensor_pb",
    "split_tensor_field",
    "tensor_field_decoder",
    "tensor_field_head",
    "tensor_shape",
    "to_tensor_pb",
    "varint",
]

NUMPY_DTYPES: Mapping[tensor_pb2.Dtype.ValueType, np.dtype[np.generic]] = {
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_UINT16: np.dtype("<u2"),
    # Carried as its raw 16-bit patterns; see from_tensor_pb.
    tensor_pb2.DTYPE_BFLOAT16: np.dtype("<u2"),
}
DTYPE_BY_NAME: Mapping[str, tensor_pb2.Dtype.ValueType] = {
    "int32": tensor_pb2.DTYPE_INT32,
    "int64": tensor_pb2.DTYPE_INT64,
    "float32": tensor_pb2.DTYPE_FLOAT32,
    "float16": tensor_pb2.DTYPE_FLOAT16,
    "bfloat16": tensor_pb2.DTYPE_BFLOAT16,
    "uint16": tensor_pb2.DTYPE_UINT16,
}
NAME_BY_DTYPE: Mapping[tensor_pb2.Dtype.ValueType, str] = {
    value: name for name, value in DTYPE_BY_NAME.items()
}


MAX_DIMENSIONS = 8


class TensorFormatError(ValueError):
    """A Tensor message whose dtype, shape and bytes do not agree."""


def dtype_name(dtype: tensor_pb2.Dtype.ValueType) -> str:
    try:
        return NAME_BY_DTYPE[dtype]
    except KeyError:
        raise TensorFormatError(f"unknown tensor dtype {dtype}") from None


def to_tensor_pb(array: npt.ArrayLike, dtype: str | None = None) -> tensor_pb2.Tensor:
    """Encodes an array; `dtype` names the wire type (default: the array's own)."""
    values = np.asarray(array)
    name = dtype or values.dtype.name
    if name not in DTYPE_BY_NAME or name == "bfloat16":
        raise TensorFormatError(
            f"cannot send {values.dtype} arrays; use one of int32, int64, float32, float16, uint16"
        )
    wire = NUMPY_DTYPES[DTYPE_BY_NAME[name]]
    if values.dtype != wire:
        if not np.can_cast(values.dtype, wire, casting="same_kind"):
            raise TensorFormatError(f"cannot send {values.dtype} values as {name}")
        values = values.astype(wire)
    return tensor_pb2.Tensor(
        dtype=DTYPE_BY_NAME[name], shape=list(values.shape), data=np.ascontiguousarray(values).tobytes()
    )


def tensor_shape(
    tensor: tensor_pb2.Tensor, max_elements: int | None = None, data: memoryview | None = None
) -> tuple[int, ...]:
    """The tensor's shape, checked against its dtype and byte count (of `data` when given)."""
    itemsize = NUMPY_DTYPES[tensor.dtype].itemsize if tensor.dtype in NUMPY_DTYPES else None
    if itemsize is None:
        raise TensorFormatError(f"unknown tensor dtype {tensor.dtype}")
    shape = tuple(int(d) for d in tensor.shape)
    if len(shape) > MAX_DIMENSIONS:
        raise TensorFormatError(f"tensor has {len(shape)} dimensions, more than {MAX_DIMENSIONS}")
    if any(d < 0 for d in shape):
        raise TensorFormatError(f"tensor shape {list(shape)} has a negative dimension")
    elements = math.prod(shape)
    if max_elements is not None and elements > max_elements:
        raise TensorFormatError(f"tensor shape {list(shape)} has {elements} elements, over {max_elements}")
    # An empty tensor still needs a shape numpy can hold: [0, 2**31, 2**31] cannot be reshaped to.
    if math.prod(d for d in shape if d) > 2**40:
        raise TensorFormatError(f"tensor shape {list(shape)} is too large")
    data_bytes = len(tensor.data) if data is None else data.nbytes
    if elements * itemsize != data_bytes:
        raise TensorFormatError(
            f"tensor of shape {list(shape)} and dtype {NAME_BY_DTYPE[tensor.dtype]} needs "
            f"{elements * itemsize} bytes, got {data_bytes}"
        )
    return shape


def from_tensor_pb(tensor: tensor_pb2.Tensor, data: memoryview | None = None) -> npt.NDArray[np.generic]:
    """Decodes a tensor (bfloat16 is widened to float32, which copies).

    `data`, when given, holds the tensor's bytes in place of its `data` field (see
    split_tensor_field); the array is then a view of it.
    """
    shape = tensor_shape(tensor, data=data)
    source = tensor.data if data is None else data
    raw = np.frombuffer(source, dtype=NUMPY_DTYPES[tensor.dtype]).reshape(shape)
    if tensor.dtype == tensor_pb2.DTYPE_BFLOAT16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw


_Message = TypeVar("_Message", bound=Message)
_TENSOR_DATA_FIELD = 3  # Tensor.data


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


def encode_message_field(field_number: int, encoded: bytes) -> bytes:
    """The wire bytes of an embedded message field whose message is already `encoded`."""
    return varint(field_number << 3 | 2) + varint(len(encoded)) + encoded


def tensor_field_head(field_number: int, shape: tuple[int, ...], dtype: tensor_pb2.Dtype.ValueType) -> bytes:
    """The wire bytes of a `Tensor` as field `field_number` of its parent, up to where its data
    begins: what SerializeToString writes before the data, for data of this shape and dtype."""
    data_bytes = math.prod(shape) * NUMPY_DTYPES[dtype].itemsize
    body = bytearray(b"\x08" + varint(dtype))
    if shape:
        packed = b"".join(varint(int(d)) for d in shape)
        body += b"\x12" + varint(len(packed)) + packed
    if data_bytes:
        body += b"\x1a" + varint(data_bytes)
    return varint(field_number << 3 | 2) + varint(len(body) + data_bytes) + bytes(body)


def _read_varint(raw: bytes, at: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if at >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        byte = raw[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _fields(raw: bytes, start: int, end: int) -> list[tuple[int, int, int, int, int]]:
    """The fields of the message in raw[start:end]: (number, wire type, field start, value start, end)."""
    fields = []
    at = start
    while at < end:
        field_start = at
        tag, at = _read_varint(raw, at, end)
        number, wire_type = tag >> 3, tag & 7
        value_start = at
        if wire_type == 0:
            _, at = _read_varint(raw, at, end)
        elif wire_type == 1:
            at += 8
        elif wire_type == 2:
            length, value_start = _read_varint(raw, at, end)
            at = value_start + length
        elif wire_type == 5:
            at += 4
        else:
            raise ValueError(f"wire type {wire_type}")
        if at > end:
            raise ValueError("truncated field")
        fields.append((number, wire_type, field_start, value_start, at))
    return fields


def split_tensor_field(
    raw: bytes, message_type: type[_Message], field_number: int
) -> tuple[_Message, memoryview | None]:
    """Parses raw as message_type, except the data of its Tensor field `field_number`, which is
    returned as a view of raw (None when that tensor has no data, or raw is laid out in a way
    this does not handle: then the message is parsed whole, data included)."""
    try:
        top = _fields(raw, 0, len(raw))
        found = [field for field in top if field[0] == field_number]
        if len(found) == 1 and found[0][1] == 2:
            _, _, field_start, tensor_start, field_end = found[0]
            inner = _fields(raw, tensor_start, field_end)
            data = [field for field in inner if field[0] == _TENSOR_DATA_FIELD]
            if len(data) == 1 and data[0][1] == 2:
                _, _, data_field_start, data_start, data_end = data[0]
                message = message_type.FromString(raw[:field_start] + raw[field_end:])
                tensor = tensor_pb2.Tensor.FromString(
                    raw[tensor_start:data_field_start] + raw[data_end:field_end]
                )
                getattr(message, message_type.DESCRIPTOR.fields_by_number[field_number].name).CopyFrom(tensor)
                return message, memoryview(raw)[data_start:data_end]
    except ValueError:
        pass  # protobuf's own parser has the last word on malformed messages
    return message_type.FromString(raw), None


def tensor_field_decoder(
    message_type: type[_Message], field_number: int
) -> Callable[[bytes], tuple[_Message, memoryview | None]]:
    """A gRPC response deserializer that splits off the data of one tensor field."""
    return lambda raw: split_tensor_field(raw, message_type, field_number)
