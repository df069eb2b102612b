"""Byte-pair encoders for `embedserve prepare`: tiktoken, or a faster one that gives its tokens.

prepare_corpus encodes each piece of text with `BpeEncoder.encode`, which returns exactly
`tokenizer.encode(text, allowed_special={"<|endoftext|>"})`. One class per backend;
`choose_encoder` is the one place that picks one, and logs its choice:

- TiktokenEncoder: tiktoken itself, the reference; always there.
- FastokensEncoder: the Rust BPE of the `fastokens` package (`pip install 'embedserve[fast-bpe]'`),
  about three times tiktoken's rate on a core (docs/performance.md, "Preparing corpora"). Only for
  encodings that split text with GPT-2's pattern and have no special token but <|endoftext|>.
  fastokens splits with PCRE2, whose `\\s` also matches U+180E (MONGOLIAN VOWEL SEPARATOR), which
  tiktoken's regex does not count as whitespace; it is given the pattern with that character moved
  to where tiktoken puts it (`FASTOKENS_GPT2_PATTERN`), and every other code point already splits
  alike. A text it refuses (a lone surrogate, which tiktoken refuses too; a limit of PCRE2's) goes
  to tiktoken instead. It checks itself against tiktoken when built and stands down on any
  difference; tests/test_bpe_backends.py holds it to tiktoken on Unicode's code points in several
  contexts and on generated texts. One call runs on one core: prepare's threads are the parallelism.

Where tiktoken refuses a text outright (its regex gives up on a run of about a million spaces
before a non-space), fastokens encodes it as the pattern says.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from .errors import InvalidInput
from .tokenizer import ENDOFTEXT, GPT2_PAT_STR, Tokenizer

_LOGGER = logging.getLogger(__name__)

BACKENDS = ("auto", "tiktoken", "fastokens")
# GPT2_PAT_STR for PCRE2: U+180E is whitespace to PCRE2 and punctuation to tiktoken's regex.
FASTOKENS_GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?(?:[^\s\p{L}\p{N}]|\x{180E})++"""
    r"""|[^\S\x{180E}]++$|[^\S\x{180E}]+(?![\S\x{180E}])|[^\S\x{180E}]"""
)
# What a new encoder must encode as tiktoken does before it is used: contractions, runs of
# whitespace of every kind, digits, punctuation, letters of several scripts, U+180E, separators.
SELF_CHECK_TEXT = (
    "I'm sure they'll say it's 'fine'--isn't it?  Yes!!\n\n\t 12345 3.14159\u00a0and\u3000more "
    "na\u00efve caf\u00e9 \u65e5\u672c\u8a9e \u041f\u0440\u0438\u0432\u0435\u0442 \U0001f642\U0001f680 "
    "x\u180ey 1\u180e's x  \u180ey "
    "\u180e\u180e1 a\u180e  b\u180e<|endoftext|>   \n  trailing \r\n\u2028\u0085end   "
)

TokenArray = npt.NDArray[np.integer[Any]]


class BpeEncoder(Protocol):
    """tokenizer.encode(text, allowed_special={"<|endoftext|>"}), safe to call from many threads."""

    @property
    def name(self) -> str: ...

    def encode(self, text: str) -> TokenArray: ...


class TiktokenEncoder:
    """tiktoken, the reference (its errors as the Tokenizer maps them)."""

    name = "tiktoken"

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._allowed = tokenizer.allowed({ENDOFTEXT})

    def encode(self, text: str) -> TokenArray:
        return self._tokenizer.encode_checked(text, self._allowed)


class FastokensEncoder:
    """fastokens' BPE over the tokenizer's own vocabulary (nothing is downloaded); tiktoken for what
    it refuses. Build it with `FastokensEncoder.build`, which says None where it cannot be used."""

    name = "fastokens"

    def __init__(self, fast: Any, reference: TiktokenEncoder) -> None:
        self._fast = fast
        self._reference = reference

    @classmethod
    def build(cls, tokenizer: Tokenizer) -> FastokensEncoder | None:
        """The encoder for `tokenizer`, or None (and why, logged) where it would not match tiktoken
        or fastokens is not installed."""
        if not tokenizer.gpt2_pattern or tokenizer.special_tokens != {ENDOFTEXT}:
            _LOGGER.info("fastokens: for GPT-2's pattern with <|endoftext|> alone, not %s", tokenizer.name)
            return None
        try:
            import fastokens  # type: ignore[import-untyped,import-not-found,unused-ignore]
        except ImportError:
            return None
        definition = tokenizer.definition()
        if definition["pat_str"] != GPT2_PAT_STR:
            return None
        # One core a call, so that prepare's threads (--threads) are all the parallelism: fastokens
        # splits a call over every core unless FASTOKENS_BPE_THREADS (read as a tokenizer is built)
        # says otherwise.
        os.environ.setdefault("FASTOKENS_BPE_THREADS", "1")
        with tempfile.TemporaryDirectory(prefix="embedserve-bpe-") as folder:
            vocabulary = Path(folder) / f"{tokenizer.name}.tiktoken"  # tiktoken's format
            ranks: dict[bytes, int] = definition["mergeable_ranks"]
            vocabulary.write_bytes(
                b"".join(base64.b64encode(token) + b" %d\n" % rank for token, rank in ranks.items())
            )
            fast = fastokens.Tokenizer.from_tiktoken(
                str(vocabulary),
                pattern=FASTOKENS_GPT2_PATTERN,
                special_tokens={ENDOFTEXT: int(definition["special_tokens"][ENDOFTEXT])},
            )
        encoder = cls(fast, TiktokenEncoder(tokenizer))
        expected = encoder._reference.encode(SELF_CHECK_TEXT)
        got = encoder.encode(SELF_CHECK_TEXT)
        if not np.array_equal(got, expected):
            _LOGGER.warning(
                "fastokens %s encodes differently from tiktoken; prepare uses tiktoken",
                getattr(fastokens, "__version__", "?"),
            )
            return None
        return encoder

    def encode(self, text: str) -> TokenArray:
        try:
            ids, _ = self._fast.encode_batch_flat([text])
        except Exception:  # a lone surrogate (tiktoken replaces it), a PCRE2 limit: tiktoken's tokens
            return self._reference.encode(text)
        return np.frombuffer(ids, dtype="<u4")


@functools.lru_cache(maxsize=4)
def _fastokens_for(tokenizer: Tokenizer) -> FastokensEncoder | None:
    return FastokensEncoder.build(tokenizer)


def choose_encoder(tokenizer: Tokenizer, backend: str = "auto") -> BpeEncoder:
    """The encoder prepare uses: fastokens where it is installed and matches this tokenizer
    ("auto"), else tiktoken; `backend` names one ("fastokens" where it cannot be used is an error)."""
    if backend not in BACKENDS:
        raise InvalidInput(f"BPE backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    chosen: BpeEncoder | None = None
    if backend in ("auto", "fastokens"):
        chosen = _fastokens_for(tokenizer)
        if chosen is None and backend == "fastokens":
            raise InvalidInput(
                f"the fastokens backend cannot encode {tokenizer.name} here: "
                "pip install 'embedserve[fast-bpe]' (GPT-2's pattern only)"
            )
    if chosen is None:
        chosen = TiktokenEncoder(tokenizer)
    _LOGGER.info("prepare encodes %s with %s", tokenizer.name, chosen.name)
    return chosen
