"""embedserve.tensor, the codec both sides share: arrays to Tensor messages and back, and replies
decoded with the tensor's bytes left in the received message."""

from __future__ import annotations

import numpy as np
import pytest
from embedserve import tensor as codec
from embedserve.client import tensor as client_tensor
from embedserve.tensor import from_tensor_pb, split_tensor_field, tensor_field_head, to_tensor_pb
from embedserve.v1 import embedding_pb2, tensor_pb2
from google.protobuf.message import DecodeError


def test_the_client_splits_a_replys_tensor_bytes_off_as_protobuf_would_parse_them() -> None:
    """Embed replies are decoded with the tensor's bytes left in the received message; whatever
    the layout, the result equals protobuf's own parse (and odd layouts fall back to it)."""
    data = np.arange(12, dtype=np.float32).tobytes()
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, 4], data=data)
    region = embedding_pb2.SharedMemoryOutput(handle="h", offset=8)
    full = embedding_pb2.EmbedResponse(embeddings=tensor, written_to=region, written_bytes=48)
    tensor_bytes = tensor.SerializeToString()
    tensor_field = b"\x0a" + bytes([len(tensor_bytes)]) + tensor_bytes
    rest = full.SerializeToString()[len(tensor_field) :]
    shuffled_tensor = (
        tensor_pb2.Tensor(data=data).SerializeToString()
        + tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, 4]).SerializeToString()
    )
    layouts = {
        "as serialized": (full.SerializeToString(), True),
        "tensor last": (rest + tensor_field, True),
        "data first in the tensor": (b"\x0a" + bytes([len(shuffled_tensor)]) + shuffled_tensor + rest, True),
        "tensor field twice (merged)": (tensor_field + rest + tensor_field, False),
        "no tensor": (rest, False),
    }
    for name, (raw, split) in layouts.items():
        expected = embedding_pb2.EmbedResponse.FromString(raw)
        message, view = split_tensor_field(raw, embedding_pb2.EmbedResponse, 1)
        assert (view is not None) == split, name
        if view is not None:
            assert message.embeddings.data == b"", name
            assert view.obj is raw, name  # not a copy
            message.embeddings.data = bytes(view)
        assert message == expected, name
        if split:
            decoded = from_tensor_pb(message.embeddings, view)
            assert np.array_equal(decoded, np.arange(12, dtype=np.float32).reshape(3, 4)), name

    streamed = embedding_pb2.EmbedStreamResponse(embeddings=tensor, sequence_id=300).SerializeToString()
    stream_message, stream_view = split_tensor_field(streamed, embedding_pb2.EmbedStreamResponse, 1)
    assert stream_message.sequence_id == 300
    assert stream_view is not None
    assert bytes(stream_view) == data
    short = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, 5], data=data)
    message, view = split_tensor_field(
        embedding_pb2.EmbedResponse(embeddings=short).SerializeToString(), embedding_pb2.EmbedResponse, 1
    )
    with pytest.raises(ValueError, match="needs 60 bytes, got 48"):
        from_tensor_pb(message.embeddings, view)
    for garbage in (b"\x0a\xff", b"\x0b", full.SerializeToString()[:-3]):
        with pytest.raises(DecodeError):
            embedding_pb2.EmbedResponse.FromString(garbage)
        with pytest.raises(DecodeError):
            split_tensor_field(garbage, embedding_pb2.EmbedResponse, 1)


def test_the_client_module_re_exports_the_shared_codec() -> None:
    for name in client_tensor.__all__:
        assert getattr(client_tensor, name) is getattr(codec, name), name


@pytest.mark.parametrize("dtype", ["int32", "int64", "float32", "float16", "uint16"])
def test_arrays_round_trip_and_heads_match_protobufs_encoding(dtype: str) -> None:
    array = (np.arange(24) % 7).reshape(2, 3, 4).astype(dtype)
    message = to_tensor_pb(array)
    assert np.array_equal(from_tensor_pb(message), array)
    encoded = embedding_pb2.EmbedResponse(embeddings=message).SerializeToString()
    head = tensor_field_head(1, array.shape, message.dtype)
    assert encoded == head + array.tobytes()
    empty = embedding_pb2.EmbedResponse(embeddings=tensor_pb2.Tensor(dtype=message.dtype, shape=[0, 3]))
    assert empty.SerializeToString() == tensor_field_head(1, (0, 3), message.dtype)
