"""prepare's BPE backends give tiktoken's tokens exactly: the fast one (fastokens, the fast-bpe
extra) on every code point in several contexts and on generated texts, or it is not used."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import tiktoken
from embedserve.server.core import InvalidInput, Tokenizer, load_gpt2_tokenizer
from embedserve.server.core.bpe_backends import (
    SELF_CHECK_TEXT,
    FastokensEncoder,
    TiktokenEncoder,
    choose_encoder,
)
from embedserve.server.core.tokenizer import ENDOFTEXT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# Where splitting rules differ, they differ on one character between others (letters, digits,
# spaces, an apostrophe, a line end).
CONTEXTS = ["x{c}y", " {c}{c}1", "1{c}'s", "x  {c}y\n", "{c} {c}"]
# Planes 0-3 and 14 whole (where Unicode assigns characters, and where a version's new ones land);
# a sample of the rest (unassigned, or private use).
CODE_POINTS = [p for p in range(0x40000) if not 0xD800 <= p <= 0xDFFF]
CODE_POINTS += [*range(0xE0000, 0xF0000), *range(0x40000, 0xE0000, 251), *range(0xF0000, 0x110000, 251)]
PIECES = [" ", "  ", "   ", "\n", "\n\n", "\t", "\r\n", "\u00a0", "\u3000", "\u2028", "\u180e", "\x85"]
PIECES += ["a", "Zq", "word", " word", "1", "234", "3.14", ".", "!?", "--", "'s", "'ll", "'", "'S", "é"]
PIECES += ["中文", "🙂", "\u0301", "ǅ", "Ⅻ", "٣", "<|endoftext|>", "<|endoftext", "|>", "aaaa"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_gpt2_tokenizer()


@pytest.fixture(scope="module")
def fast(tokenizer: Tokenizer) -> FastokensEncoder:
    pytest.importorskip("fastokens", reason="the fast-bpe extra is not installed")
    encoder = FastokensEncoder.build(tokenizer)
    assert encoder is not None, "fastokens is installed but not used: it fails the self-check"
    return encoder


def reference(encoding: tiktoken.Encoding, text: str) -> list[int]:
    return list(encoding.encode(text, allowed_special={ENDOFTEXT}))


def test_every_code_point_splits_as_tiktoken_does(
    fast: FastokensEncoder, reference_encoding: tiktoken.Encoding
) -> None:
    """Unicode's code points (CODE_POINTS), 4096 a text: where a text differs, the code points at
    fault are named. (PCRE2's \\s matching U+180E was found this way: bpe_backends.py.)"""
    wrong = []
    for block in range(0, len(CODE_POINTS), 4096):
        chars = [chr(p) for p in CODE_POINTS[block : block + 4096]]
        text = "".join(context.format(c=c) for c in chars for context in CONTEXTS)
        if fast.encode(text).tolist() != reference(reference_encoding, text):
            for c in chars:
                one = "".join(context.format(c=c) for context in CONTEXTS)
                if fast.encode(one).tolist() != reference(reference_encoding, one):
                    wrong.append(f"U+{ord(c):04X}")
    assert not wrong


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=st.lists(st.sampled_from(PIECES) | st.text(max_size=8), max_size=80))
def test_generated_texts_encode_as_tiktoken_does(
    fast: FastokensEncoder, reference_encoding: tiktoken.Encoding, parts: list[str]
) -> None:
    text = "".join(parts)
    assert fast.encode(text).tolist() == reference(reference_encoding, text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    piece=st.sampled_from(["a", " ", "\n", "7", "!", "日", " a", "\u180e", "'s", "\u00a0"]),
    count=st.integers(1, 40_000),
    before=st.sampled_from(["", "x", " ", "1"]),
    after=st.sampled_from(["", "x", " ", "\n", ENDOFTEXT]),
)
def test_long_runs_encode_as_tiktoken_does(
    fast: FastokensEncoder,
    reference_encoding: tiktoken.Encoding,
    piece: str,
    count: int,
    before: str,
    after: str,
) -> None:
    """Long runs of one character, long words with no space, long numbers: one pre-tokenizer piece."""
    text = before + piece * count + after
    assert fast.encode(text).tolist() == reference(reference_encoding, text)


def test_the_self_check_text_and_real_text(
    fast: FastokensEncoder, reference_encoding: tiktoken.Encoding, verdict_text: str
) -> None:
    for text in (SELF_CHECK_TEXT, verdict_text, verdict_text.replace(" ", "\u180e")):
        assert fast.encode(text).tolist() == reference(reference_encoding, text)


def test_what_fastokens_refuses_goes_to_tiktoken(fast: FastokensEncoder, tokenizer: Tokenizer) -> None:
    """A lone surrogate: the fast encoder hands the text to tiktoken, so it fails as tiktoken fails."""
    text = "ok \ud800 then"
    with pytest.raises(InvalidInput) as from_tiktoken:
        TiktokenEncoder(tokenizer).encode(text)
    with pytest.raises(InvalidInput) as from_fast:
        fast.encode(text)
    assert str(from_fast.value) == str(from_tiktoken.value)


def test_encoders_are_safe_to_share_between_threads(fast: FastokensEncoder, verdict_text: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    texts = [verdict_text[i:] for i in range(0, 4000, 97)]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(fast.encode, texts))
    assert all(np.array_equal(a, fast.encode(t)) for a, t in zip(together, texts, strict=True))


def test_choose_encoder_prefers_fastokens_and_logs(
    fast: FastokensEncoder, tokenizer: Tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="embedserve.server.core.bpe_backends"):
        assert choose_encoder(tokenizer).name == "fastokens"
    assert "prepare encodes gpt2 with fastokens" in caplog.text
    assert choose_encoder(tokenizer, "tiktoken").name == "tiktoken"


def test_tiktoken_is_chosen_for_other_patterns() -> None:
    """Another split pattern (the PCRE2 translation is GPT-2's only): tiktoken, and asking for
    fastokens is refused."""
    encoding = tiktoken.Encoding(
        name="bytes",
        pat_str=r"\S+|\s+",
        mergeable_ranks={bytes([b]): b for b in range(256)},
        special_tokens={ENDOFTEXT: 256},
    )
    other = Tokenizer(encoding, "test", {})
    assert choose_encoder(other).name == "tiktoken"
    with pytest.raises(InvalidInput, match="fastokens"):
        choose_encoder(other, "fastokens")


def test_an_unknown_backend_is_refused(tokenizer: Tokenizer) -> None:
    with pytest.raises(InvalidInput, match="choose one of auto, tiktoken, fastokens"):
        choose_encoder(tokenizer, "rust")
