"""A sharded corpus's manifest: `NAME.json`, what its token stream is made of.

A corpus is the concatenation of its shards' tokens, in the manifest's order. Each shard is a
file of little-endian token IDs (after `header_bytes` of header, for imported formats that have
one) with its own sha256, and optionally a file of its documents' start offsets (little-endian
uint64, token positions within the shard). The manifest is written last and replaced whole, so a
reader sees one complete version of the corpus. docs/training-data.md documents the schema.

A format-1 sidecar (`embedserve prepare` before shards) reads as a manifest of one shard, with its
old identity, so its cursors keep working.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from .errors import InvalidInput, NotFound
from .storage import Storage
from .tokenizer import Tokenizer

MANIFEST_KIND = "embedserve-corpus"
MANIFEST_FORMAT = 2
LEGACY_KIND = "embedserve-prepared-corpus"
LEGACY_FORMAT = 1
SEPARATOR_POLICY = "endoftext-between-documents"
# Largest manifest read: a few hundred bytes a shard, so ~1M shards.
MAX_MANIFEST_BYTES = 256 << 20
TOKEN_DTYPES = {"uint16": "<u2", "uint32": "<u4", "int32": "<i4"}
OFFSETS_DTYPE = np.dtype("<u8")


@dataclass(frozen=True)
class DocumentOffsets:
    """A shard's document starts: a file of uint64 token offsets within the shard."""

    file: str
    count: int
    sha256: str


@dataclass(frozen=True)
class ShardEntry:
    file: str  # relative to the manifest's folder
    tokens: int
    documents: int  # documents that start in this shard
    bytes: int  # the file's size, header included
    sha256: str  # of the whole file
    header_bytes: int = 0
    document_offsets: DocumentOffsets | None = None


@dataclass(frozen=True)
class CorpusManifest:
    name: str
    tokenizer: str
    tokenizer_identity: str
    tokenizer_sha256: dict[str, str] | None  # the encoding's files' sha256, by file
    vocab_size: int
    dtype: str
    shards: tuple[ShardEntry, ...]
    separator_token_id: int | None = None
    sources: tuple[dict[str, Any], ...] = ()
    created: str = ""
    updated: str = ""
    generation: int = 1  # 1 when prepared, one more at each append
    origin: str = "prepare"  # or the imported format: nanogpt, llmc, megatron
    legacy_identity: str | None = field(default=None, compare=False)

    @classmethod
    def new(
        cls,
        name: str,
        tokenizer: Tokenizer,
        dtype: np.dtype[Any],
        shards: Sequence[ShardEntry],
        *,
        separator_token_id: int | None,
        sources: Sequence[dict[str, Any]],
        created: str = "",
        origin: str = "prepare",
    ) -> CorpusManifest:
        """The first generation of a corpus of `dtype` tokens made with `tokenizer`."""
        dtypes = {np.dtype(code): name for name, code in TOKEN_DTYPES.items()}
        return cls(
            name=name,
            tokenizer=tokenizer.name,
            tokenizer_identity=tokenizer.identity,
            tokenizer_sha256=tokenizer.vocabulary_sha256,
            vocab_size=tokenizer.n_vocab,
            dtype=dtypes[np.dtype(dtype)],
            shards=tuple(shards),
            separator_token_id=separator_token_id,
            sources=tuple(sources),
            created=created or now(),
            updated=now(),
            origin=origin,
        )

    @property
    def token_count(self) -> int:
        return sum(shard.tokens for shard in self.shards)

    @property
    def documents(self) -> int:
        return sum(shard.documents for shard in self.shards)

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(TOKEN_DTYPES[self.dtype])

    @property
    def identity(self) -> str:
        """What cursors carry: a digest of the token dtype and each shard's sha256 and length, so
        an append or a re-prepare makes a new identity (and old cursors are refused)."""
        if self.legacy_identity is not None:
            return self.legacy_identity
        body = json.dumps(
            {
                "dtype": self.dtype,
                "shards": [[shard.sha256, shard.tokens, shard.header_bytes] for shard in self.shards],
            },
            separators=(",", ":"),
        )
        return hashlib.sha256(body.encode()).hexdigest()

    def with_shards(self, added: Sequence[ShardEntry], sources: Sequence[dict[str, Any]]) -> CorpusManifest:
        """This manifest with shards appended: a new generation."""
        return replace(
            self,
            shards=(*self.shards, *added),
            sources=(*self.sources, *sources),
            updated=now(),
            generation=self.generation + 1,
            legacy_identity=None,
        )

    def to_json(self) -> str:
        shards = []
        for shard in self.shards:
            entry = asdict(shard)
            if shard.document_offsets is None:
                del entry["document_offsets"]
            if not shard.header_bytes:
                del entry["header_bytes"]
            shards.append(entry)
        body: dict[str, Any] = {
            "kind": MANIFEST_KIND,
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "origin": self.origin,
            "generation": self.generation,
            "tokenizer": self.tokenizer,
            "tokenizer_identity": self.tokenizer_identity,
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size,
            "dtype": self.dtype,
            "token_count": self.token_count,
            "documents": self.documents,
            "separator": (
                None
                if self.separator_token_id is None
                else {"policy": SEPARATOR_POLICY, "token_id": self.separator_token_id}
            ),
            "identity": self.identity,
            "shards": shards,
            "sources": list(self.sources),
            "created": self.created,
            "updated": self.updated,
        }
        return json.dumps(body, indent=1) + "\n"

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """InvalidInput unless the corpus was made for this tokenizer (name, size and files)."""
        if self.tokenizer != tokenizer.name or self.vocab_size != tokenizer.n_vocab:
            raise InvalidInput(
                f"corpus {self.name!r} was prepared with {self.tokenizer} ({self.vocab_size} tokens), "
                f"this server tokenizes with {tokenizer.name} ({tokenizer.n_vocab})"
            )
        if self.tokenizer_sha256 not in (None, tokenizer.vocabulary_sha256):
            raise InvalidInput(
                f"corpus {self.name!r} was prepared with other {tokenizer.name} files (sha256 "
                f"{self.tokenizer_sha256}) than this server's ({tokenizer.vocabulary_sha256})"
            )


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def is_manifest(data: object) -> bool:
    return isinstance(data, dict) and data.get("kind") in (MANIFEST_KIND, LEGACY_KIND)


def parse_manifest(data: dict[str, Any], name: str) -> CorpusManifest:
    """The manifest a parsed NAME.json holds (either format); InvalidInput saying what is wrong."""
    kind, version = data.get("kind"), data.get("format")
    if kind == LEGACY_KIND and version == LEGACY_FORMAT:
        return _from_legacy(data, name)
    if kind != MANIFEST_KIND or version != MANIFEST_FORMAT:
        raise InvalidInput(
            f"corpus {name!r}: manifest {kind} format {version}; this server reads {MANIFEST_KIND} "
            f"format {MANIFEST_FORMAT} (and {LEGACY_KIND} format {LEGACY_FORMAT})"
        )
    try:
        dtype = str(data["dtype"])
        if dtype not in TOKEN_DTYPES:
            raise InvalidInput(f"corpus {name!r}: unknown token dtype {dtype!r}")
        shards = tuple(_shard(entry) for entry in data["shards"])
        separator = data.get("separator")
        manifest = CorpusManifest(
            name=name,
            tokenizer=str(data["tokenizer"]),
            tokenizer_identity=str(data.get("tokenizer_identity", data["tokenizer"])),
            tokenizer_sha256=data.get("tokenizer_sha256"),
            vocab_size=int(data["vocab_size"]),
            dtype=dtype,
            shards=shards,
            separator_token_id=int(separator["token_id"]) if isinstance(separator, dict) else None,
            sources=tuple(data.get("sources", ())),
            created=str(data.get("created", "")),
            updated=str(data.get("updated", "")),
            generation=int(data.get("generation", 1)),
            origin=str(data.get("origin", "prepare")),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidInput(f"corpus {name!r}: malformed manifest ({type(error).__name__}: {error})") from None
    if "token_count" in data and int(data["token_count"]) != manifest.token_count:
        raise InvalidInput(f"corpus {name!r}: manifest's token_count is not the sum of its shards'")
    return manifest


def _shard(entry: dict[str, Any]) -> ShardEntry:
    offsets = entry.get("document_offsets")
    return ShardEntry(
        file=str(entry["file"]),
        tokens=int(entry["tokens"]),
        documents=int(entry.get("documents", 0)),
        bytes=int(entry["bytes"]),
        sha256=str(entry["sha256"]),
        header_bytes=int(entry.get("header_bytes", 0)),
        document_offsets=(
            None
            if offsets is None
            else DocumentOffsets(str(offsets["file"]), int(offsets["count"]), str(offsets["sha256"]))
        ),
    )


def _from_legacy(data: dict[str, Any], name: str) -> CorpusManifest:
    """A format-1 sidecar as a manifest of its one token file, keeping its identity."""
    dtype = str(data.get("dtype"))
    if dtype not in ("uint16", "uint32"):
        raise InvalidInput(f"corpus {name!r}: unknown token dtype {dtype!r}")
    count = int(data["token_count"])
    separator = data.get("separator")
    shard = ShardEntry(
        file=str(data.get("tokens_file", "")),
        tokens=count,
        documents=int(data.get("documents", 0)),
        bytes=count * np.dtype(TOKEN_DTYPES[dtype]).itemsize,
        sha256=str(data.get("tokens_sha256", "")),
    )
    return CorpusManifest(
        name=name,
        tokenizer=str(data.get("tokenizer")),
        tokenizer_identity=str(data.get("tokenizer_identity", data.get("tokenizer"))),
        tokenizer_sha256=data.get("tokenizer_sha256"),
        vocab_size=int(data.get("vocab_size", 0)),
        dtype=dtype,
        shards=(shard,),
        separator_token_id=int(separator["token_id"]) if isinstance(separator, dict) else None,
        sources=tuple(data.get("sources", ())),
        created=str(data.get("created", "")),
        legacy_identity=str(data.get("tokens_sha256", "")),
    )


def manifest_file(name: str) -> str:
    return f"{name}.json"


def read_manifest(storage: Storage, name: str) -> CorpusManifest:
    """The corpus's manifest from `storage`; NotFound naming where it looked."""
    raw = storage.read_bytes(manifest_file(name), limit=MAX_MANIFEST_BYTES)
    try:
        data = json.loads(raw)
    except ValueError as error:
        raise InvalidInput(f"{storage.url_of(manifest_file(name))} is not JSON: {error}") from None
    if not is_manifest(data):
        raise NotFound(f"{storage.url_of(manifest_file(name))} is not an embedserve corpus manifest")
    return parse_manifest(data, name)


def commit_manifest(storage: Storage, manifest: CorpusManifest) -> None:
    """Replaces the manifest whole: readers see the previous version or this one."""
    storage.write_bytes(manifest_file(manifest.name), manifest.to_json().encode())
