"""Tokenize and Detokenize over gRPC: tiktoken's IDs, special tokens, deadlines."""

from __future__ import annotations

import grpc
import pytest
import tiktoken
from embedserve.client import (
    AsyncClient,
    EmbedServeError,
    InvalidArgumentError,
)

from .conftest import ServerThread


async def test_tokenize_batch_detokenize_and_specials(
    server: ServerThread, reference_encoding: tiktoken.Encoding
) -> None:
    texts = ["Hello, world.", "", "Akwirw ier", "<|endoftext|> special"]
    async with AsyncClient(server.target) as client:
        with pytest.raises(InvalidArgumentError, match="disallowed special token") as raised:
            await client.tokenize_batch(texts)
        assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT
        allowed = await client.tokenize_batch(texts, allowed_special={"<|endoftext|>"})
        assert await client.tokenize_batch(texts, allowed_special="all") == allowed
        assert allowed == [reference_encoding.encode(t, allowed_special="all") for t in texts]
        assert await client.detokenize(allowed[0]) == "Hello, world."
        assert await client.detokenize(allowed[3]) == texts[3]


async def test_timeouts_are_deadline_exceeded(server: ServerThread) -> None:
    async with AsyncClient(server.target, timeout=1e-6) as client:
        with pytest.raises(EmbedServeError) as raised:
            await client.tokenize("x" * 100_000)
    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
