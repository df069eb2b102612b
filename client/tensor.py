"""numpy arrays <-> embedserve.v1.Tensor: raw little-endian, row-major bytes.

Decoding is zero-copy (`np.frombuffer` over the message's bytes), so decoded
arrays are read-only; `np.array(a)` gives a writable copy. numpy has no
bfloat16, so bfloat16 tensors decode to float32 (exactly: bfloat16 is the top
half of a float32).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt
from embedserve.v1 import tensor_pb2

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


def tensor_shape(tensor: tensor_pb2.Tensor, max_elements: int | None = None) -> tuple[int, ...]:
    """The tensor's shape, checked against its dtype and byte count."""
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
    if elements * itemsize != len(tensor.data):
        raise TensorFormatError(
            f"tensor of shape {list(shape)} and dtype {NAME_BY_DTYPE[tensor.dtype]} needs "
            f"{elements * itemsize} bytes, got {len(tensor.data)}"
        )
    return shape


def from_tensor_pb(tensor: tensor_pb2.Tensor) -> npt.NDArray[np.generic]:
    """Decodes a tensor without copying (bfloat16 is widened to float32, which copies)."""
    shape = tensor_shape(tensor)
    raw = np.frombuffer(tensor.data, dtype=NUMPY_DTYPES[tensor.dtype]).reshape(shape)
    if tensor.dtype == tensor_pb2.DTYPE_BFLOAT16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw
