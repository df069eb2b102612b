"""Token files other projects wrote, served as they are: `embedserve import FORMAT FILES --out NAME`.

Each format is one `TokenFormat`, chosen by name in `token_format`:

- `nanogpt`: nanoGPT's `train.bin`/`val.bin` (data/openwebtext/prepare.py): raw little-endian
  uint16 token IDs, no header, each document followed by <|endoftext|>;
- `llmc`: llm.c's shards (dev/data/data_common.py `write_datafile`): a header of 256 little-endian
  int32 (magic, version, token count, zeros), then the tokens: magic 20240520 version 1 is GPT-2's
  uint16, magic 20240801 version 7 Llama 3's uint32; each document preceded by its delimiter
  (<|endoftext|>, or <|begin_of_text|> for Llama 3), and a document may run on into the next shard;
- `megatron`: Megatron-LM's `PREFIX.bin` + `PREFIX.idx` (megatron/core/datasets/indexed_dataset.py):
  the .bin is the tokens with no header, the .idx holds the dtype, each sequence's length and byte
  pointer, and the document index (the sequence where each document starts, then the count);
- `embedserve`: a single-file corpus of `embedserve prepare` before shards (a format-1 sidecar and
  its `.tokens` file), documents joined by <|endoftext|>.

The files become the corpus's shards byte for byte (a header stays in the file: the manifest's
`header_bytes` skips it); nothing is re-tokenized. A file already inside the destination (a local
data folder) is referenced where it is; any other is copied under `NAME.shards/`. Each file is read
once: hashed (the manifest's sha256, which the server checks shards fetched from object storage
against), copied when it must be, and its tokens checked against the tokenizer's vocabulary (the
server then serves them unscanned). Document starts go to a `.docs` file per shard, as for a
prepared corpus.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

import numpy as np
import numpy.typing as npt

from .errors import EmbedServeCoreError, InvalidInput, NotFound
from .manifest import (
    LEGACY_FORMAT,
    LEGACY_KIND,
    MANIFEST_KIND,
    MAX_MANIFEST_BYTES,
    OFFSETS_DTYPE,
    TOKEN_DTYPES,
    CorpusManifest,
    DocumentOffsets,
    ShardEntry,
    commit_manifest,
    parse_manifest,
)
from .prepared import check_corpus_name, current_manifest, remove_corpus_files
from .shard_writer import new_run, shard_folder
from .storage import COPY_CHUNK_BYTES, LocalStorage, Storage, check_relative, is_url
from .tokenizer import ENDOFTEXT, Tokenizer

_LOGGER = logging.getLogger(__name__)

Starts = npt.NDArray[np.uint64]
BEGIN_OF_TEXT = "<|begin_of_text|>"

LLMC_HEADER_BYTES = 256 * 4
# (magic, version) -> token dtype, as llm.c's HEADERS_INFO writes them ("gpt-2", "llama-3").
LLMC_HEADERS = {(20240520, 1): "uint16", (20240801, 7): "uint32"}
LLMC_EVAL_MAGIC = 20240522  # write_evalfile: HellaSwag/MMLU examples, not a token stream

MEGATRON_MAGIC = b"MMIDIDX\x00\x00"
MEGATRON_VERSION = 1
# Megatron's DType enum: the .idx's dtype code -> numpy name.
MEGATRON_DTYPES = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float64",
    7: "float32",
    8: "uint16",
}
# Magic (9 bytes), version (<Q), dtype code (<B), sequence count (<Q), document count (<Q).
_MEGATRON_FIXED = 9 + 8 + 1 + 8 + 8


@dataclass(frozen=True)
class TokenFile:
    """One input as a shard: the file that holds its tokens, where they lie, how its documents are
    found, and what the manifest records of it."""

    path: Path  # the file that becomes the shard
    dtype: str  # a TOKEN_DTYPES key
    header_bytes: int
    tokens: int
    sources: tuple[dict[str, Any], ...]
    marker: int | None = None  # the token whose positions the read collects
    index_starts: Starts | None = None  # document starts an index gives (Megatron)
    expected_sha256: str | None = None  # what a sidecar says the file's sha256 is
    separator_token_id: int | None = None
    created: str | None = None

    @property
    def itemsize(self) -> int:
        return np.dtype(TOKEN_DTYPES[self.dtype]).itemsize

    @property
    def size(self) -> int:
        return self.header_bytes + self.tokens * self.itemsize


class TokenFormat(ABC):
    """One project's token files: how to read their layout and find their documents."""

    name: ClassVar[str]
    origin: ClassVar[str]  # the manifest's origin

    def open_all(self, inputs: Sequence[Path], tokenizer: Tokenizer) -> list[TokenFile]:
        return [self.open(path, tokenizer) for path in inputs]

    @abstractmethod
    def open(self, path: Path, tokenizer: Tokenizer) -> TokenFile:
        """The file's layout from its header or index, its size checked; InvalidInput naming the
        file and what was expected."""

    @abstractmethod
    def document_starts(self, file: TokenFile, markers: npt.NDArray[np.int64]) -> Starts:
        """Where documents start in the file's tokens, given the positions of its marker."""


class NanoGptFormat(TokenFormat):
    """nanoGPT: uint16 tokens, no header, <|endoftext|> appended after each document. A document
    starts at 0 and right after each <|endoftext|> (not after the file's last one)."""

    name = origin = "nanogpt"

    def open(self, path: Path, tokenizer: Tokenizer) -> TokenFile:
        size = _size(path)
        if size % 2:
            raise InvalidInput(
                f"{path}: {size} bytes is not a whole number of uint16 tokens (nanoGPT writes 2 "
                "bytes a token); truncated?"
            )
        return TokenFile(
            path,
            "uint16",
            0,
            size // 2,
            (_source(path, self.name),),
            marker=_marker(tokenizer, (ENDOFTEXT,), path, self.name),
        )

    def document_starts(self, file: TokenFile, markers: npt.NDArray[np.int64]) -> Starts:
        return _after_markers(file.tokens, markers)


class LlmcFormat(TokenFormat):
    """llm.c: a 256 x int32 header, then the tokens; each document's delimiter comes before it, so
    a document starts at each delimiter. A shard that does not begin with one begins with the end
    of the previous shard's last document (fineweb.py splits documents across shards)."""

    name = origin = "llmc"

    def open(self, path: Path, tokenizer: Tokenizer) -> TokenFile:
        size = _size(path)
        with path.open("rb") as source:
            raw = source.read(LLMC_HEADER_BYTES)
        if len(raw) < LLMC_HEADER_BYTES:
            raise InvalidInput(
                f"{path}: {size} bytes, shorter than llm.c's {LLMC_HEADER_BYTES}-byte header; truncated?"
            )
        magic, version, count = (int(value) for value in np.frombuffer(raw, "<i4", count=3))
        dtype = LLMC_HEADERS.get((magic, version))
        if dtype is None:
            known = "; ".join(f"magic {m} version {v} ({d} tokens)" for (m, v), d in LLMC_HEADERS.items())
            if magic == LLMC_EVAL_MAGIC:
                found = f"magic {magic}: an llm.c eval file (HellaSwag/MMLU examples), not tokens"
            elif magic in {m for m, _ in LLMC_HEADERS}:
                found = f"magic {magic} with version {version}"
            else:
                found = f"magic {magic}"
            raise InvalidInput(f"{path}: {found}; llm.c token files have {known}")
        itemsize = np.dtype(TOKEN_DTYPES[dtype]).itemsize
        expected = LLMC_HEADER_BYTES + count * itemsize
        if count < 0 or size != expected:
            raise InvalidInput(
                f"{path}: its header says {count} {dtype} tokens ({expected} bytes with the header), "
                f"the file is {size} bytes; truncated?"
            )
        names = (ENDOFTEXT,) if dtype == "uint16" else (BEGIN_OF_TEXT, ENDOFTEXT)
        return TokenFile(
            path,
            dtype,
            LLMC_HEADER_BYTES,
            count,
            (_source(path, self.name),),
            marker=_marker(tokenizer, names, path, self.name),
        )

    def document_starts(self, file: TokenFile, markers: npt.NDArray[np.int64]) -> Starts:
        return markers.astype(OFFSETS_DTYPE)


class MegatronFormat(TokenFormat):
    """Megatron-LM: `PREFIX.bin` (tokens, no header) described by `PREFIX.idx`. An input names the
    prefix, the .bin or the .idx (both of a prefix name it once). Documents are Megatron's: each
    starts at its first sequence's pointer; an empty document starts nowhere."""

    name = origin = "megatron"

    def open_all(self, inputs: Sequence[Path], tokenizer: Tokenizer) -> list[TokenFile]:
        prefixes = dict.fromkeys(
            path.with_suffix("") if path.suffix in (".bin", ".idx") else path for path in inputs
        )
        return [self.open(prefix, tokenizer) for prefix in prefixes]

    def open(self, path: Path, tokenizer: Tokenizer) -> TokenFile:
        prefix = path.with_suffix("") if path.suffix in (".bin", ".idx") else path
        bin_path, idx_path = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
        bin_size, idx_size = _size(bin_path), _size(idx_path)
        with idx_path.open("rb") as source:
            fixed = source.read(_MEGATRON_FIXED)
        if len(fixed) < _MEGATRON_FIXED:
            raise InvalidInput(
                f"{idx_path}: {idx_size} bytes, shorter than a Megatron index's "
                f"{_MEGATRON_FIXED}-byte header; truncated?"
            )
        if fixed[:9] != MEGATRON_MAGIC:
            raise InvalidInput(
                f"{idx_path}: begins with {fixed[:9]!r}, a Megatron index begins with {MEGATRON_MAGIC!r}"
            )
        version = int.from_bytes(fixed[9:17], "little")
        if version != MEGATRON_VERSION:
            raise InvalidInput(f"{idx_path}: index version {version}, expected {MEGATRON_VERSION}")
        code = fixed[17]
        sequences = int.from_bytes(fixed[18:26], "little")
        documents = int.from_bytes(fixed[26:34], "little")
        numpy_name = MEGATRON_DTYPES.get(code)
        if numpy_name is None:
            raise InvalidInput(
                f"{idx_path}: unknown dtype code {code}; Megatron's are "
                + ", ".join(f"{c} ({n})" for c, n in MEGATRON_DTYPES.items())
            )
        if numpy_name not in ("uint16", "int32"):
            raise InvalidInput(
                f"{idx_path}: tokens of dtype {numpy_name} (code {code}); embedserve serves Megatron "
                "token files of uint16 (code 8) or int32 (code 4)"
            )
        expected = _MEGATRON_FIXED + sequences * (4 + 8) + documents * 8
        if idx_size == expected + sequences and sequences:
            raise InvalidInput(f"{idx_path}: a multimodal index (sequence modes); only text is served")
        if idx_size != expected:
            raise InvalidInput(
                f"{idx_path}: {sequences} sequences and {documents} document entries take {expected} "
                f"bytes, the file is {idx_size}; truncated?"
            )
        lengths = np.fromfile(idx_path, "<i4", count=sequences, offset=_MEGATRON_FIXED).astype(np.int64)
        pointers = np.fromfile(idx_path, "<i8", count=sequences, offset=_MEGATRON_FIXED + 4 * sequences)
        index = np.fromfile(idx_path, "<i8", count=documents, offset=_MEGATRON_FIXED + 12 * sequences)
        if (lengths < 0).any():
            raise InvalidInput(f"{idx_path}: a sequence of negative length")
        itemsize = np.dtype(TOKEN_DTYPES[numpy_name]).itemsize
        bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)  # token offsets
        moved = np.flatnonzero(pointers != bounds[:-1] * itemsize)
        if moved.size:
            first = int(moved[0])
            raise InvalidInput(
                f"{idx_path}: sequence {first} points at byte {int(pointers[first])}, expected "
                f"{int(bounds[first]) * itemsize} (the sequences before it, back to back)"
            )
        tokens = int(bounds[-1])
        if bin_size != tokens * itemsize:
            raise InvalidInput(
                f"{bin_path}: its index describes {tokens} {numpy_name} tokens ({tokens * itemsize} "
                f"bytes), the file is {bin_size} bytes; truncated?"
            )
        if (
            documents < 1
            or index[0] != 0
            or index[-1] != sequences
            or (documents > 1 and (np.diff(index) < 0).any())
        ):
            raise InvalidInput(
                f"{idx_path}: its document index must rise from 0 to the sequence count ({sequences})"
            )
        edges = bounds[index]  # each document's first token, then the end
        starts = edges[:-1][edges[1:] > edges[:-1]].astype(OFFSETS_DTYPE)
        record = _source(bin_path, self.name) | {"index": str(idx_path.resolve())}
        return TokenFile(bin_path, numpy_name, 0, tokens, (record,), index_starts=starts)

    def document_starts(self, file: TokenFile, markers: npt.NDArray[np.int64]) -> Starts:
        assert file.index_starts is not None
        return file.index_starts


class EmbedserveFormat(TokenFormat):
    """A corpus `embedserve prepare` wrote before shards: its format-1 sidecar `NAME.json` names
    the token file (beside it) and its sha256. Documents are joined by its separator, so one
    starts at 0 and after each separator. The sources, separator and creation time carry over."""

    name = "embedserve"
    origin = "prepare"

    def open_all(self, inputs: Sequence[Path], tokenizer: Tokenizer) -> list[TokenFile]:
        if len(inputs) != 1:
            raise InvalidInput(f"embedserve: name one format-1 sidecar (NAME.json), not {len(inputs)} files")
        return [self.open(inputs[0], tokenizer)]

    def open(self, path: Path, tokenizer: Tokenizer) -> TokenFile:
        if _size(path) > MAX_MANIFEST_BYTES:
            raise InvalidInput(f"{path}: larger than a sidecar can be")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise InvalidInput(f"{path}: not a JSON sidecar ({error})") from None
        kind, version = (data.get("kind"), data.get("format")) if isinstance(data, dict) else (None, None)
        if (kind, version) != (LEGACY_KIND, LEGACY_FORMAT):
            already = " (already a sharded manifest)" if kind == MANIFEST_KIND else ""
            raise InvalidInput(
                f"{path}: kind {kind!r} format {version!r}{already}; expected the single-file "
                f"corpus sidecar, kind {LEGACY_KIND!r} format {LEGACY_FORMAT}"
            )
        legacy = parse_manifest(data, path.stem)
        legacy.check_tokenizer(tokenizer)
        (shard,) = legacy.shards
        tokens_path = path.parent.joinpath(*check_relative(shard.file, f"{path}: tokens_file").parts)
        size = _size(tokens_path)
        if size != shard.bytes:
            raise InvalidInput(
                f"{tokens_path}: {size} bytes, the sidecar says {shard.tokens} {legacy.dtype} tokens "
                f"({shard.bytes} bytes); truncated?"
            )
        separator = legacy.separator_token_id
        return TokenFile(
            tokens_path,
            legacy.dtype,
            0,
            shard.tokens,
            legacy.sources,
            marker=separator if separator is not None else _marker(tokenizer, (ENDOFTEXT,), path, self.name),
            expected_sha256=shard.sha256 or None,
            separator_token_id=separator,
            created=legacy.created or None,
        )

    def document_starts(self, file: TokenFile, markers: npt.NDArray[np.int64]) -> Starts:
        return _after_markers(file.tokens, markers)


FORMATS: dict[str, type[TokenFormat]] = {
    cls.name: cls for cls in (NanoGptFormat, LlmcFormat, MegatronFormat, EmbedserveFormat)
}


def token_format(name: str) -> TokenFormat:
    """The reader of the named format: nanogpt, llmc, megatron or embedserve."""
    chosen = FORMATS.get(name)
    if chosen is None:
        raise InvalidInput(f"unknown token file format {name!r}; known: {', '.join(FORMATS)}")
    _LOGGER.info("reading %s token files with %s", name, chosen.__name__)
    return chosen()


def import_corpus(
    format: str,
    inputs: Sequence[str | Path],
    name: str,
    storage: Storage,
    tokenizer: Tokenizer,
    *,
    copy: bool,
    progress: Callable[[int, int, int], None] | None = None,
) -> CorpusManifest:
    """Makes the corpus `name` in `storage` of the token files `inputs`, in order; returns its
    manifest (written last, replacing any corpus of that name).

    The user asserts the files were made with `tokenizer`: the manifest records it, and every
    token is checked to lie in its vocabulary. A file inside `storage`'s local folder is referenced
    where it is unless `copy`; any other is copied into `NAME.shards/`. `progress(bytes_done,
    bytes_total, tokens)` is called as the files are read. On an error nothing is left behind: the
    files this call wrote are removed and the previous corpus stays.
    """
    check_corpus_name(name)
    if not inputs:
        raise InvalidInput("nothing to import: name at least one token file")
    for given in inputs:
        if is_url(str(given)):
            raise InvalidInput(f"{given}: token files are read from this machine; download it first")
    reader = token_format(format)
    files = reader.open_all([Path(given) for given in inputs], tokenizer)
    dtypes = {file.dtype for file in files}
    if len(dtypes) > 1:
        listed = ", ".join(f"{file.path} ({file.dtype})" for file in files)
        raise InvalidInput(f"the files hold tokens of different dtypes, one corpus holds one: {listed}")
    run = new_run()
    total = sum(file.size for file in files)
    done = tokens_done = 0
    written: list[str] = []
    entries: list[ShardEntry] = []

    def advance(data_bytes: int, tokens: int) -> None:
        nonlocal done, tokens_done
        done += data_bytes
        tokens_done += tokens
        if progress is not None:
            progress(done, total, tokens_done)

    try:
        for number, file in enumerate(files):
            stem = f"{shard_folder(name)}/{number:05d}-{run}"
            target = None if copy else _inside(storage, file.path)
            if target is None:
                target = stem + (file.path.suffix or ".tokens")
                written.append(target)
                with storage.writer(target) as out:
                    sha256, markers = _read(file, tokenizer, out, advance)
            else:
                sha256, markers = _read(file, tokenizer, None, advance)
            if file.expected_sha256 is not None and sha256 != file.expected_sha256:
                raise InvalidInput(
                    f"{file.path}: sha256 {sha256}, its sidecar says {file.expected_sha256}; "
                    "the file changed after it was prepared"
                )
            starts = reader.document_starts(file, markers)
            offsets = None
            if len(starts):
                offsets_file = stem + ".docs"
                raw = np.asarray(starts, dtype=OFFSETS_DTYPE).tobytes()
                written.append(offsets_file)
                storage.write_bytes(offsets_file, raw)
                offsets = DocumentOffsets(offsets_file, len(starts), hashlib.sha256(raw).hexdigest())
            entries.append(
                ShardEntry(
                    file=target,
                    tokens=file.tokens,
                    documents=len(starts),
                    bytes=file.size,
                    sha256=sha256,
                    header_bytes=file.header_bytes,
                    document_offsets=offsets,
                )
            )
        manifest = CorpusManifest.new(
            name,
            tokenizer,
            np.dtype(TOKEN_DTYPES[files[0].dtype]),
            entries,
            separator_token_id=files[0].separator_token_id,
            sources=[source for file in files for source in file.sources],
            created=files[0].created or "",
            origin=reader.origin,
        )
        previous = current_manifest(storage, name)
        commit_manifest(storage, manifest)
    except BaseException:
        for leftover in written:
            with contextlib.suppress(EmbedServeCoreError, OSError):
                storage.delete(leftover)
        raise
    if previous is not None:
        remove_corpus_files(storage, previous, keep=manifest)
    return manifest


def _read(
    file: TokenFile,
    tokenizer: Tokenizer,
    out: IO[bytes] | None,
    advance: Callable[[int, int], None],
) -> tuple[str, npt.NDArray[np.int64]]:
    """Reads the file once: its sha256, and the positions of its marker token; copies it into
    `out` when given. InvalidInput at the first token outside the tokenizer's vocabulary."""
    dtype = np.dtype(TOKEN_DTYPES[file.dtype])
    signed = dtype.kind == "i"
    digest = hashlib.sha256()
    found: list[npt.NDArray[np.int64]] = []
    position = 0  # tokens read
    size = 0
    # Whole tokens a chunk: the chunk size is a multiple of every token size.
    with file.path.open("rb") as source:
        header = source.read(file.header_bytes)
        digest.update(header)
        size += len(header)
        if out is not None:
            out.write(header)
        advance(len(header), 0)
        while chunk := source.read(COPY_CHUNK_BYTES):
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
            size += len(chunk)
            tokens = np.frombuffer(chunk, dtype=dtype, count=len(chunk) // dtype.itemsize)
            if tokens.size and (int(tokens.max()) >= tokenizer.n_vocab or (signed and int(tokens.min()) < 0)):
                bad = int(np.flatnonzero((tokens >= tokenizer.n_vocab) | (tokens < 0))[0])
                raise InvalidInput(
                    f"{file.path}: token {int(tokens[bad])} at position {position + bad} is outside "
                    f"the {tokenizer.name} vocabulary [0, {tokenizer.n_vocab}); the file was made with "
                    "another tokenizer (name its encoding with --tokenizer)"
                )
            if file.marker is not None:
                found.append(np.flatnonzero(tokens == file.marker).astype(np.int64) + position)
            position += len(tokens)
            advance(len(chunk), len(tokens))
    if size != file.size:
        raise InvalidInput(f"{file.path}: {size} bytes read, {file.size} expected; it changed while read")
    markers = np.concatenate(found) if found else np.zeros(0, np.int64)
    return digest.hexdigest(), markers


def _after_markers(tokens: int, markers: npt.NDArray[np.int64]) -> Starts:
    """Documents separated (or ended) by a marker: one at 0, and one after each marker that is
    not the file's last token."""
    starts = markers + 1
    starts = starts[starts < tokens]
    head = [0] if tokens else []
    return np.concatenate([np.array(head, dtype=np.int64), starts]).astype(OFFSETS_DTYPE)


def _marker(tokenizer: Tokenizer, names: Sequence[str], path: Path, format: str) -> int:
    """The ID of the first of `names` the tokenizer has: the token that delimits documents."""
    for token in names:
        if token in tokenizer.special_tokens:
            return int(tokenizer.encode(token, allowed_special={token})[0])
    raise InvalidInput(
        f"{path}: {format} files delimit documents with {' or '.join(names)}, which the "
        f"{tokenizer.name} encoding does not have"
    )


def _inside(storage: Storage, path: Path) -> str | None:
    """The file's name in the storage's local folder when it lies inside it (symlinks resolved)."""
    if not isinstance(storage, LocalStorage):
        return None
    root = storage.root.resolve()
    resolved = path.resolve()
    if not resolved.is_relative_to(root):
        return None
    name = resolved.relative_to(root).as_posix()
    try:
        check_relative(name)
    except InvalidInput:
        return None
    return name


def _size(path: Path) -> int:
    try:
        if not path.is_file():
            if path.exists():
                raise InvalidInput(f"{path} is not a file")
            raise NotFound(f"{path} not found")
        return path.stat().st_size
    except PermissionError:
        raise InvalidInput(f"{path}: permission denied") from None


def _source(path: Path, format: str) -> dict[str, Any]:
    return {"path": str(path.resolve()), "bytes": _size(path), "format": format}
