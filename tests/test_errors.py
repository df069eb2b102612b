"""The error table (server/errors.py) end to end: bad and hostile input gets a clear status on
every RPC, never INTERNAL, and the server stays up; every --max-* limit is named when hit."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from embedserve.client import (
    AsyncClient,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
)
from embedserve.v1 import embedding_pb2, embedding_pb2_grpc, tensor_pb2, tokenizer_pb2, tokenizer_pb2_grpc

from .conftest import ServerThread, drain, stream_status


async def test_bad_input_gets_clear_statuses_and_the_server_stays_up(server: ServerThread) -> None:
    async with AsyncClient(server.target) as client:
        with pytest.raises(InvalidArgumentError, match=r"token id 50257 at position \[0, 1\]"):
            await client.embed([[1, 50257, 2]])
        with pytest.raises(InvalidArgumentError, match=r"token id -3 at position \[2\]"):
            await client.embed([0, 1, -3])
        with pytest.raises(InvalidArgumentError, match=r"token id 60000 at position \[1, 0\]"):
            await client.embed([[0, 1, 2], [60000, 3, -1], [99999, 0, 0]])  # the first in row-major order
        with pytest.raises(InvalidArgumentError, match="exceeds the context length 1024"):
            await client.embed(np.zeros((1, 1000), dtype=np.int32), position_offset=30)
        with pytest.raises(InvalidArgumentError, match="empty"):
            await client.embed(np.zeros((0,), dtype=np.int32))
        with pytest.raises(InvalidArgumentError, match="texts is empty"):
            await client.tokenize_batch([])
        # Empty text and no IDs are each other's round trip, as in tiktoken: not errors.
        assert await client.tokenize("") == []
        assert await client.detokenize([]) == ""
        with pytest.raises(InvalidArgumentError, match="empty"):
            await drain(client.embed_stream([[1, 2], []]))
        for bad in ({"batch_size": 0}, {"max_length": -4}, {"stride": 0}):
            settings = {"text": "word " * 100, "batch_size": 2, "max_length": 4, "stride": 4, **bad}
            assert await stream_status(client.stream_batches(**settings)) is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="needs at least 257"):
            await drain(client.stream_batches(text="too short"))
        with pytest.raises(InvalidArgumentError, match="exceeds the context length"):
            await drain(client.stream_batches(text="word " * 3000, max_length=2000, include_embeddings=True))
        with pytest.raises(NotFoundError, match="not found"):
            await drain(client.stream_batches(corpus="no-such-corpus.txt"))
        for escape in ("../outside.txt", "/etc/passwd", "nested/../../x"):
            assert await stream_status(client.stream_batches(corpus=escape)) in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
            )
        assert (await client.embed([1, 2])).shape == (2, 256)
        assert await client.tokenize("still alive") == [24219, 6776]


async def test_hostile_shapes_and_names_are_not_internal(server: ServerThread) -> None:
    hostile = [
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[0, 2**62], data=b""),
        # Found by the reliability suite: no dimension alone is huge, their product is.
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[0, 2**31, 2**31, 2**31], data=b""),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[1] * 65, data=b"\0" * 4),
    ]
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        for tensor in hostile:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Embed(embedding_pb2.EmbedRequest(token_ids=tensor))
            assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    async with AsyncClient(server.target) as client:
        assert await stream_status(client.stream_batches(corpus="x" * 5000)) is grpc.StatusCode.NOT_FOUND
    async with grpc.aio.insecure_channel(server.target) as channel:
        tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        many_empty_texts = tokenizer_pb2.DetokenizeRequest(
            token_ids=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[0], data=b""), lengths=[0] * 5000
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await tokenizer.Detokenize(many_empty_texts)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-texts-per-request 4096" in (raised.value.details() or "")


async def test_request_limits_name_the_limit(small_limits_server: ServerThread) -> None:
    async with AsyncClient(small_limits_server.target) as client:
        info = await client.info()
        assert info.limits.max_tokens_per_request == 2048
        with pytest.raises(InvalidArgumentError, match="--max-tokens-per-request 2048"):
            await client.embed(np.zeros((3, 700), dtype=np.int32))
        with pytest.raises(InvalidArgumentError, match="--max-message-bytes 1048576"):
            await client.embed(np.zeros((2, 1000), dtype=np.int32))
        with pytest.raises(InvalidArgumentError, match="--max-texts-per-request 3"):
            await client.tokenize_batch(["a", "b", "c", "d"])
        with pytest.raises(InvalidArgumentError, match="--max-batch-size 16"):
            await drain(client.stream_batches(text="word " * 2000, batch_size=17, max_length=4, stride=4))
        with pytest.raises(InvalidArgumentError, match="--max-message-bytes"):
            await drain(
                client.stream_batches(
                    text="word " * 5000, batch_size=16, max_length=256, stride=256, include_embeddings=True
                )
            )
        # The transport's own limit: a request larger than the server accepts.
        with pytest.raises(ResourceExhaustedError):
            await client.tokenize("x" * (2 << 20))
        assert await client.tokenize("fine") == [38125]
