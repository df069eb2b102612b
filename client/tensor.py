"""numpy arrays <-> embedserve.v1.Tensor: the client's names for the shared codec.

The codec itself is `embedserve.tensor`, which the server imports too; these names stay here
so that code written against `embedserve.client.tensor` keeps working.
"""

from embedserve.tensor import (
    DTYPE_BY_NAME,
    MAX_DIMENSIONS,
    NAME_BY_DTYPE,
    NUMPY_DTYPES,
    TensorFormatError,
    dtype_name,
    from_tensor_pb,
    split_tensor_field,
    tensor_field_decoder,
    tensor_shape,
    to_tensor_pb,
)

__all__ = [
    "DTYPE_BY_NAME",
    "MAX_DIMENSIONS",
    "NAME_BY_DTYPE",
    "NUMPY_DTYPES",
    "TensorFormatError",
    "dtype_name",
    "from_tensor_pb",
    "split_tensor_field",
    "tensor_field_decoder",
    "tensor_shape",
    "to_tensor_pb",
]
