"""Seeded tables equal the notebook's; weights files load by GPT-2's names; bad input is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from embedserve.server.core import (
    EmbeddingModel,
    InvalidInput,
    LimitExceeded,
    StartupError,
    load_embedding_tables,
    seeded_embedding_tables,
)
from safetensors.torch import save_file

NOTEBOOK_ROWS_2_3_5_1 = [
    [1.2753, -0.2010, -0.1606],
    [-0.4015, 0.9666, -1.1481],
    [-2.8400, -0.7849, -1.4096],
    [0.9178, 1.5810, 1.3010],
]


def test_seeded_tables_are_the_notebooks() -> None:
    tables = seeded_embedding_tables(6, 3, 4, 123)
    model = EmbeddingModel(tables, torch.device("cpu"))
    got = model.embed(np.array([2, 3, 5, 1]), include_positional=False)
    np.testing.assert_allclose(got.numpy(), NOTEBOOK_ROWS_2_3_5_1, atol=1e-4)


def test_seeding_reproduces_torch_exactly_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(999)
    before = torch.random.get_rng_state()
    tables = seeded_embedding_tables(50257, 256, 1024, 123)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(123)
    token_layer = torch.nn.Embedding(50257, 256)
    pos_layer = torch.nn.Embedding(1024, 256)
    assert torch.equal(tables.token, token_layer.weight.detach())
    assert torch.equal(tables.position, pos_layer.weight.detach())


def test_input_embeddings_are_token_plus_position() -> None:
    torch.manual_seed(123)
    token_layer = torch.nn.Embedding(50257, 256)
    pos_layer = torch.nn.Embedding(1024, 256)
    inputs = torch.tensor([[40, 367, 2885, 1464], [1807, 3619, 402, 271]])
    expected = token_layer(inputs) + pos_layer(torch.arange(4))
    model = EmbeddingModel(seeded_embedding_tables(50257, 256, 1024, 123), torch.device("cpu"))
    got = model.embed(inputs.numpy().astype(np.int32))
    assert got.shape == (2, 4, 256)
    assert torch.equal(got, expected.detach())
    shifted = model.embed(inputs.numpy()[0], position_offset=10)
    assert torch.equal(shifted, (token_layer(inputs[0]) + pos_layer(torch.arange(10, 14))).detach())
    half = model.embed(inputs.numpy(), output_dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, expected.detach().to(torch.bfloat16))


@pytest.mark.parametrize(
    ("ids", "kwargs", "message"),
    [
        (
            np.array([[1, 2], [3, 6]]),
            {},
            r"token id 6 at position \[1, 1\] is outside the vocabulary \[0, 6\)",
        ),
        (np.array([0, -1]), {}, r"token id -1 at position \[1\]"),
        (np.array([1, 2, 3]), {"position_offset": 2}, "exceeds the context length 4"),
        (
            np.array([1, 2, 3, 4, 5]),
            {},
            "sequence length 5 \\+ position_offset 0 exceeds the context length 4",
        ),
        (np.array([1]), {"position_offset": -1}, "position_offset must be >= 0"),
        (np.zeros((2, 0), dtype=np.int32), {}, "empty"),
        (np.zeros((1, 1, 1), dtype=np.int32), {}, r"must be \[T\] or \[B, T\]"),
        (np.array([0.5]), {}, "must be integers"),
    ],
)
def test_check_refuses_bad_input(ids: np.ndarray, kwargs: dict[str, Any], message: str) -> None:
    model = EmbeddingModel(seeded_embedding_tables(6, 3, 4, 123), torch.device("cpu"))
    with pytest.raises(InvalidInput, match=message):
        model.check(ids, **kwargs)


def test_embed_itself_refuses_out_of_range_ids() -> None:
    # Even without check(): on CUDA such an index would poison the device.
    model = EmbeddingModel(seeded_embedding_tables(6, 3, 4, 123), torch.device("cpu"))
    with pytest.raises(InvalidInput, match="token id 6"):
        model.embed(np.array([[1, 6]]))


def test_long_sequences_without_positions_are_fine_and_limits_hold() -> None:
    model = EmbeddingModel(seeded_embedding_tables(6, 3, 4, 123), torch.device("cpu"))
    model.check(np.arange(6).repeat(3), include_positional=False)
    with pytest.raises(LimitExceeded, match="--max-tokens-per-request 4"):
        model.check(np.array([1, 2, 3, 4, 5]), include_positional=False, max_tokens=4)


def _gpt2_like_state(prefix: str = "") -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        f"{prefix}wte.weight": torch.randn(50, 8, generator=generator),
        f"{prefix}wpe.weight": torch.randn(16, 8, generator=generator),
        f"{prefix}h.0.ln_1.weight": torch.ones(8),
    }


@pytest.mark.parametrize("prefix", ["", "transformer."])
def test_gpt2_names_from_safetensors_and_state_dicts(tmp_path: Path, prefix: str) -> None:
    state = _gpt2_like_state(prefix)
    save_file(state, str(tmp_path / "model.safetensors"))
    torch.save(state, tmp_path / "model.pt")
    torch.save({"model_state_dict": state, "optimizer_state_dict": {}}, tmp_path / "checkpoint.pth")
    for name in ("model.safetensors", "model.pt", "checkpoint.pth"):
        tables = load_embedding_tables(tmp_path / name)
        assert torch.equal(tables.token, state[f"{prefix}wte.weight"])
        assert torch.equal(tables.position, state[f"{prefix}wpe.weight"])


def test_custom_keys_and_clear_errors(tmp_path: Path) -> None:
    state = {"emb.tok": torch.zeros(10, 4), "emb.pos": torch.zeros(5, 4), "other": torch.zeros(5, 3)}
    save_file(state, str(tmp_path / "custom.safetensors"))
    path = tmp_path / "custom.safetensors"
    tables = load_embedding_tables(path, token_key="emb.tok", position_key="emb.pos", dim=4)
    assert tables.token.shape == (10, 4)
    with pytest.raises(
        StartupError, match=r"no token embedding table under wte.weight or .* \(keys: emb.pos, emb.tok"
    ):
        load_embedding_tables(path)
    with pytest.raises(StartupError, match="the file's dim is 4 but --dim is 256"):
        load_embedding_tables(path, token_key="emb.tok", position_key="emb.pos", dim=256)
    with pytest.raises(StartupError, match="differ in width"):
        load_embedding_tables(path, token_key="emb.tok", position_key="other")
    with pytest.raises(StartupError, match="vocab"):
        load_embedding_tables(path, token_key="emb.tok", position_key="emb.pos", vocab_size=50257)
    with pytest.raises(StartupError, match="context"):
        load_embedding_tables(path, token_key="emb.tok", position_key="emb.pos", context_length=1024)
    with pytest.raises(StartupError, match="no such file"):
        load_embedding_tables(tmp_path / "absent.pt")
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint at all")
    with pytest.raises(StartupError, match="cannot read it"):
        load_embedding_tables(tmp_path / "junk.bin")
