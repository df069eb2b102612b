"""Info over gRPC: what a server on pretrained tables reports (and serves), an unreachable server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from embedserve.client import (
    AsyncClient,
    EmbedServeError,
    InvalidArgumentError,
    to_torch,
)
from embedserve.server import ServerConfig
from safetensors.torch import save_file

from .conftest import start_server


async def test_a_server_on_pretrained_tables_serves_them(tmp_path: Path) -> None:
    # GPT-2's names with the prefix Hugging Face checkpoints carry, and other tensors beside them.
    generator = torch.Generator().manual_seed(5)
    token, position = torch.randn(50257, 8, generator=generator), torch.randn(16, 8, generator=generator)
    weights = tmp_path / "gpt2-like.safetensors"
    save_file(
        {
            "transformer.wte.weight": token,
            "transformer.wpe.weight": position,
            "lm_head.weight": token.clone(),
        },
        str(weights),
    )
    running = start_server(ServerConfig(port=0, device="cpu", word_vectors="none", weights=weights))
    try:
        async with AsyncClient(running.target) as client:
            info = await client.info()
            assert (info.vocab_size, info.dim, info.context_length) == (50257, 8, 16)
            assert (info.dtype, info.device, info.tokenizer) == ("float32", "cpu", "gpt2")
            assert str(weights) in info.weights_source
            ids = [[15, 50256, 0], [7, 7, 7]]
            expected = token[torch.tensor(ids)] + position[:3]
            np.testing.assert_array_equal(await client.embed(ids), expected.numpy())
            as_torch = to_torch(await client.embed(ids))  # the README's way to torch tensors
            assert torch.equal(as_torch, expected)
            as_torch += 1  # a copy of its own, not the read-only reply
            assert to_torch(np.array(ids, np.int32)).dtype == torch.int64  # as nn.Embedding takes
            np.testing.assert_array_equal(
                await client.embed([50256], position_offset=15), (token[50256] + position[15])[None].numpy()
            )
            with pytest.raises(InvalidArgumentError, match="exceeds the context length 16"):
                await client.embed([1, 2], position_offset=15)
            settings: dict[str, Any] = {"batch_size": 2, "max_length": 3, "stride": 3, "shuffle": False}
            (batch,) = [
                b
                async for b in client.stream_batches(
                    text="a b c d e f g h", include_embeddings=True, **settings
                )
            ]
            assert batch.inputs.dtype == np.int32  # as on the wire: int32 tensors
            assert batch.embeddings is not None
            np.testing.assert_array_equal(
                batch.embeddings, (token[torch.tensor(batch.inputs, dtype=torch.long)] + position[:3]).numpy()
            )
    finally:
        running.stop()


async def test_unreachable_server_is_unavailable() -> None:
    async with AsyncClient("127.0.0.1:1", timeout=2) as client:
        with pytest.raises(EmbedServeError) as raised:
            await client.info()
    assert raised.value.code is grpc.StatusCode.UNAVAILABLE
