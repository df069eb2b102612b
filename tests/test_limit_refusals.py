"""A request over a server limit is refused with the limit as structured detail (google.rpc
ErrorInfo in the status details), which raw stubs and the SDK read without parsing messages."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import pytest
from embedserve.client import AsyncClient, InvalidArgumentError, LimitExceededError
from embedserve.status_details import DETAILS_KEY, DOMAIN, LIMIT_EXCEEDED, LimitInfo, limit_from_trailers
from embedserve.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from google.rpc import error_details_pb2, status_pb2

from .conftest import ServerThread


async def _drain(stream: AsyncIterator[Any]) -> None:
    async for _ in stream:
        pass


async def test_a_raw_stub_reads_the_limit_from_the_status_details(small_limits_server: ServerThread) -> None:
    async with grpc.aio.insecure_channel(small_limits_server.target) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=["a", "b", "c", "d"]))
    error = raised.value
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    trailers: Any = error.trailing_metadata() or ()
    [blob] = [value for key, value in trailers if key == DETAILS_KEY]
    assert isinstance(blob, bytes)
    status = status_pb2.Status.FromString(blob)
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert status.message == error.details()
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == (LIMIT_EXCEEDED, DOMAIN)
    assert dict(info.metadata) == {
        "limit": "max_texts_per_request",
        "flag": "--max-texts-per-request",
        "allowed": "3",
        "requested": "4",
    }


async def test_each_limit_is_named_in_the_detail(small_limits_server: ServerThread) -> None:
    async with AsyncClient(small_limits_server.target) as client:
        cases = [
            (
                client.embed(np.zeros((3, 700), dtype=np.int32)),
                LimitInfo("max_tokens_per_request", 2048, 2100),
            ),
            (client.tokenize_batch(["a", "b", "c", "d"]), LimitInfo("max_texts_per_request", 3, 4)),
            (
                _drain(client.stream_batches(text="word " * 2000, batch_size=17, max_length=4, stride=4)),
                LimitInfo("max_batch_size", 16, 17),
            ),
        ]
        for call, expected in cases:
            with pytest.raises(LimitExceededError) as raised:
                await call
            assert raised.value.limit == expected
            assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT
            assert expected.flag in raised.value.details
        with pytest.raises(LimitExceededError) as too_large:
            await client.embed(np.zeros((2, 1000), dtype=np.int32))
        assert too_large.value.limit.limit == "max_message_bytes"
        assert too_large.value.limit.allowed == 1 << 20


async def test_other_invalid_input_carries_no_limit(small_limits_server: ServerThread) -> None:
    async with AsyncClient(small_limits_server.target) as client:
        with pytest.raises(InvalidArgumentError) as raised:
            await client.embed(np.full((1, 4), 60000, dtype=np.int32))
    assert not isinstance(raised.value, LimitExceededError)


async def test_a_window_past_the_context_length_is_a_limit(server: ServerThread) -> None:
    # The default model's 1,024 positions: 1,000 IDs from offset 100 reach position 1,099.
    expected = LimitInfo("context_length", 1024, 1100)
    async with AsyncClient(server.target) as client:
        with pytest.raises(LimitExceededError) as unary:
            await client.embed(np.zeros((1, 1000), dtype=np.int32), position_offset=100)
        assert unary.value.limit == expected
        assert "--context-length" in unary.value.details
        with pytest.raises(LimitExceededError) as streamed:
            await _drain(client.embed_stream([np.zeros(1000, dtype=np.int32)], position_offset=100))
        assert streamed.value.limit == expected
        # Without positions there is no such limit.
        embedded = await client.embed(
            np.zeros((1, 1000), dtype=np.int32), position_offset=100, include_positional=False
        )
        assert embedded.shape == (1, 1000, 256)


def test_damaged_or_foreign_details_are_no_limit() -> None:
    assert limit_from_trailers(None) is None
    assert limit_from_trailers([(DETAILS_KEY, b"\xff\xff not a status")]) is None
    foreign = error_details_pb2.ErrorInfo(
        reason=LIMIT_EXCEEDED, domain="elsewhere", metadata={"allowed": "1"}
    )
    status = status_pb2.Status(code=3, message="m")
    status.details.add().Pack(foreign)
    assert limit_from_trailers([(DETAILS_KEY, status.SerializeToString())]) is None
