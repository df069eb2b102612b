"""server/_codec.py: request tensors decoded into checked values, and replies encoded around the
tensor a lookup writes in place, byte for byte as protobuf encodes them."""

from __future__ import annotations

import gc
import sys

import pytest
import torch
from embedserve.server import _codec
from embedserve.server._codec import (
    BytearrayReplies,
    InPlaceBytesReplies,
    ReplyMemory,
    TensorReply,
    default_reply_memory,
)
from embedserve.server.core import InvalidInput
from embedserve.tensor import encode_varint_field
from embedserve.v1 import embedding_pb2, tensor_pb2


@pytest.mark.parametrize(
    "memory", [InPlaceBytesReplies(), BytearrayReplies()], ids=["bytes filled in place", "bytearray"]
)
def test_hand_encoded_replies_equal_protobufs_encoding(memory: ReplyMemory) -> None:
    """Embed and EmbedStream replies are encoded around the tensor the lookup writes into;
    byte for byte as protobuf would, on CPython (bytes filled in place) and elsewhere."""
    for shape in [(8, 256, 256), (3,), (1, 1, 1), (0, 5), (2, 300), (130, 2)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            tensor = torch.randn(shape).to(dtype)
            expected = embedding_pb2.EmbedResponse(embeddings=_codec.tensor_pb_from_torch(tensor))
            reply = TensorReply(1, shape, dtype, memory=memory)
            reply.tensor.copy_(tensor)
            assert reply.message() == expected.SerializeToString()
            for sequence_id in (1, 127, 128, 2**40):
                streamed = embedding_pb2.EmbedStreamResponse(
                    embeddings=expected.embeddings, sequence_id=sequence_id
                )
                trailer = encode_varint_field(2, sequence_id)
                reply = TensorReply(1, shape, dtype, trailer, memory=memory)
                reply.tensor.copy_(tensor)
                assert reply.message() == streamed.SerializeToString()


def test_a_reply_filled_in_place_lives_as_long_as_its_tensor() -> None:
    """The lookup may still write into a reply whose caller has gone (cancelled): its tensor
    alone keeps the message's memory alive."""
    assert isinstance(default_reply_memory(), InPlaceBytesReplies)  # CPython
    reply = TensorReply(1, (4, 64), torch.float32)
    message, tensor = reply.message(), reply.tensor
    alone = sys.getrefcount(b"x" * 1000)  # a bytes object held by one name
    del reply
    gc.collect()
    assert sys.getrefcount(message) == alone + 1  # `message`, and the tensor's view
    tensor.fill_(1.5)
    assert message.endswith(torch.full((4,), 1.5).numpy().tobytes())
    del tensor
    gc.collect()
    assert sys.getrefcount(message) == alone


def test_malformed_request_tensors_are_invalid_input() -> None:
    int32 = tensor_pb2.DTYPE_INT32
    expected = "token_ids must be DTYPE_INT32, DTYPE_INT64 or DTYPE_UINT16, got DTYPE_FLOAT32"
    with pytest.raises(InvalidInput, match=expected):
        _codec.token_ids_from_pb(tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1], data=b"\0" * 4))
    with pytest.raises(InvalidInput, match="token_ids is missing"):
        _codec.token_ids_from_pb(tensor_pb2.Tensor())  # what an unset field reads as
    with pytest.raises(InvalidInput, match="got DTYPE_UNSPECIFIED"):
        _codec.token_ids_from_pb(tensor_pb2.Tensor(shape=[1], data=b"\1\0\0\0"))
    with pytest.raises(InvalidInput, match="token_ids: tensor of shape"):
        _codec.token_ids_from_pb(tensor_pb2.Tensor(dtype=int32, shape=[2, 2], data=b"\0" * 12))
    with pytest.raises(InvalidInput, match="must be float32, float16 or bfloat16, got int32"):
        _codec.output_dtype_from_pb(int32)
    with pytest.raises(InvalidInput, match="77 is not a known dtype"):
        _codec.output_dtype_from_pb(77)  # type: ignore[arg-type]
    assert _codec.output_dtype_from_pb(tensor_pb2.DTYPE_UNSPECIFIED) == torch.float32
    assert _codec.token_ids_from_pb(tensor_pb2.Tensor(dtype=int32, shape=[1], data=b"\1\0\0\0")).tolist() == [
        1
    ]
