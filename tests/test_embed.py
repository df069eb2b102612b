"""Embed over gRPC: the notebook's golden rows, options and dtypes, malformed tensors, message limits."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from embedserve.client import (
    AsyncClient,
    ResourceExhaustedError,
)
from embedserve.v1 import embedding_pb2, embedding_pb2_grpc, tensor_pb2

from .conftest import ServerThread
from .notebook_reference import notebook_tables
from .test_core_embedding import NOTEBOOK_ROWS_2_3_5_1


async def test_tiny_model_golden_rows(tiny_server: ServerThread) -> None:
    async with AsyncClient(tiny_server.target) as client:
        rows = await client.embed([2, 3, 5, 1], include_positional=False)
        info = await client.info()
    assert rows.shape == (4, 3)
    np.testing.assert_allclose(rows, NOTEBOOK_ROWS_2_3_5_1, atol=1e-4)
    assert (info.vocab_size, info.dim, info.context_length) == (6, 3, 4)
    assert info.weights_source == "seed:123"


async def test_embed_options_and_dtypes(server: ServerThread) -> None:
    token_layer, pos_layer = notebook_tables()
    ids = np.array([[40, 367, 2885], [1807, 3619, 402]], dtype=np.int64)
    expected = (token_layer(torch.from_numpy(ids)) + pos_layer(torch.arange(7, 10))).detach()
    async with AsyncClient(server.target) as client:
        full = await client.embed(ids, position_offset=7)
        half = await client.embed(ids, position_offset=7, dtype="float16")
        brain = await client.embed(ids, position_offset=7, dtype="bfloat16")
        plain = await client.embed(ids[0].tolist(), include_positional=False)
    np.testing.assert_array_equal(full, expected.numpy())
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, expected.half().numpy())
    assert brain.dtype == np.float32
    np.testing.assert_array_equal(brain, expected.bfloat16().float().numpy())
    np.testing.assert_array_equal(plain, token_layer(torch.from_numpy(ids[0])).detach().numpy())


async def test_malformed_tensors_are_invalid_argument(server: ServerThread) -> None:
    bad_tensors = [
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[2, 2], data=b"\0" * 12),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1], data=b"\0" * 4),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[-1], data=b""),
        tensor_pb2.Tensor(dtype=77, shape=[1], data=b"\0" * 4),  # type: ignore[arg-type]
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[2**40, 2**40], data=b""),
    ]
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        for tensor in bad_tensors:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Embed(embedding_pb2.EmbedRequest(token_ids=tensor))
            assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT, tensor
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Embed(
                embedding_pb2.EmbedRequest(
                    token_ids=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[1], data=b"\0" * 4),
                    options=embedding_pb2.EmbedOptions(output_dtype=tensor_pb2.DTYPE_INT32),
                )
            )
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_client_side_message_limit(server: ServerThread) -> None:
    async with AsyncClient(server.target, max_message_bytes=64 * 1024) as client:
        with pytest.raises(ResourceExhaustedError):
            await client.embed(np.zeros((1, 128), dtype=np.int32))
