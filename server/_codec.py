"""Request and reply tensors on the server side: proto <-> numpy / torch."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from embedserve.client.tensor import TensorFormatError, dtype_name, from_tensor_pb
from embedserve.v1 import tensor_pb2

from .core import OUTPUT_DTYPES, InvalidInput

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
    contiguous = tensor.detach().contiguous()
    raw = contiguous.view(torch.int16) if contiguous.dtype == torch.bfloat16 else contiguous
    return tensor_pb2.Tensor(
        dtype=wire_dtype(contiguous.dtype),
        shape=list(contiguous.shape),
        data=raw.numpy().tobytes(),
    )
