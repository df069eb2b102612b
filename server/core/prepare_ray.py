"""`embedserve prepare --engine ray`: the same corpus as prepared.prepare_corpus, made by Ray Data
tasks on a Ray cluster (or a local Ray instance).

- The driver expands the inputs in order (local paths or object-storage URLs; files, globs and
  save_to_disk folders) and checks them as document_sources does, before any task starts.
- Consecutive files read the same way form one Ray Dataset: text, JSON lines and Arrow files with
  `read_binary_files` (a task reads a file whole and parses it as document_sources does: a text
  file is one document, a `.jsonl` line one, an Arrow row one), Parquet with `read_parquet` (the
  text column, a record batch at a time; nulls skipped). Datasets run one after another, in order.
- `map_batches` tasks tokenize the documents, each preceded by <|endoftext|> (the corpus's first
  document's is dropped, unless it continues an existing corpus), with the encoding's definition
  from the object store: nothing is read or downloaded on a worker but the inputs.
- The same tasks write their tokens (a Datasink that Ray fuses into them: the tokens never pass
  through the object store) as shards, with their document offsets, straight to the destination,
  as `NAME.shards/<dataset>-<task>-<part>-<run>.tokens`: the names sort in document order. Only
  the shards' manifest entries come back to the driver.
- The driver commits the manifest last, so a reader sees the previous corpus or the new one.

The tokens and document offsets are those of the in-process engine; only where shards are cut
differs (each task's tokens are cut into equal shards of at most --shard-size).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import logging
import math
import os
import re
import socket
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import numpy.typing as npt

from .bpe_backends import BpeEncoder, choose_encoder
from .document_sources import (
    DEFAULT_BATCH_ROWS,
    DEFAULT_TEXT_COLUMN,
    ArrowFile,
    JsonLines,
    ParquetFile,
    TextFile,
    open_sources,
    text_column_index,
)
from .errors import EmbedServeCoreError, InvalidInput, NotFound, Unavailable
from .manifest import OFFSETS_DTYPE, CorpusManifest, DocumentOffsets, ShardEntry, commit_manifest
from .prepared import (
    check_corpus_name,
    current_manifest,
    document_starts_of,
    manifest_to_extend,
    remove_corpus_files,
)
from .shard_writer import DEFAULT_SHARD_BYTES, new_run, shard_folder, write_shard
from .storage import FsspecStorage, LocalStorage, Storage, is_url, open_storage, redact, storage_errors
from .stretch_encoding import plan_stretches
from .tokenizer import ENDOFTEXT, Tokenizer

_LOGGER = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'embedserve[ray]'"
_CHUNK_CHARS = 64 << 10  # short documents' text joined into one encode call
_PIECE_CHARS = 1 << 20  # a longer document is encoded in pieces of about this many characters
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_NUMBERED = re.compile(r"^(\d+)-")
_PARQUET, _ARROW, _JSONL, _TEXT = "parquet", "arrow", "jsonl", "text"
# A worker's tokenizers and encoders, rebuilt once per worker process.
_ENCODERS: dict[str, tuple[Tokenizer, BpeEncoder]] = {}


@dataclass(frozen=True)
class _InputFile:
    """One file of the inputs: what Ray reads, how, and how the manifest names it."""

    location: str  # an absolute local path or a URL
    kind: str  # _TEXT, _JSONL, _ARROW or _PARQUET
    size: int
    shown: str  # for messages and the manifest's sources (a URL without credentials)
    protocol: str = ""  # "" for a local file

    @property
    def key(self) -> str:
        """The file as Ray's `path` column names it (a URL without its scheme)."""
        return _path_key(self.location)


@dataclass(frozen=True)
class _EncodingRef:
    """What a task needs to rebuild the tokenizer: its definition, put in the object store once."""

    key: str
    definition: Any  # ray.ObjectRef of Tokenizer.definition()
    gpt2_pattern: bool


@dataclass(frozen=True)
class _ReadJob:
    """What a tokenizing task knows of the run it belongs to."""

    encoding: _EncodingRef
    wire: str  # the shards' token dtype, e.g. "<u2"
    separator_id: int
    text_column: str
    kinds: dict[str, str]  # file key -> kind
    shown: dict[str, str]  # file key -> name for messages
    only_file: str = ""  # the file key when the rows carry no path column


@dataclass(frozen=True)
class _ShardJob:
    """What a task knows: where shards go and how they are named and cut."""

    destination: str  # the data folder or URL, as open_storage takes it
    folder: str
    wire: str
    separator_id: int
    shard_tokens: int
    prefix: int  # the dataset's number: shard names sort by it first
    label: str  # the run label of new_run()
    drop_leading: bool  # the first task drops its leading separator: this starts the corpus


@dataclass(frozen=True)
class _Written:
    """One task's result."""

    task: int
    entries: tuple[ShardEntry, ...]
    documents: dict[str, int]  # file key -> documents read
    tokens: int
    dropped_leading: bool
    ends_on_start: bool  # an empty document ends its tokens: it starts at the next task's first token


class RayEngine:
    """Ray Data tasks on a Ray cluster (--ray-address, RAY_ADDRESS) or, with no address, on a
    local Ray instance started for the run and shut down after it. When this process is already
    connected to Ray (ray.init was called), that connection is used and left open."""

    def __init__(self, address: str | None) -> None:
        try:
            import ray
            import ray.data  # noqa: F401  (ray[data]: pyarrow, pandas)
        except ImportError as error:
            raise InvalidInput(
                f"--engine ray needs Ray Data, which is not installed ({error}): {INSTALL_HINT}"
            ) from None
        self.address = address

    def prepare(
        self,
        inputs: Sequence[str],
        name: str,
        storage: Storage,
        tokenizer: Tokenizer,
        *,
        text_column: str = DEFAULT_TEXT_COLUMN,
        threads: int | None = None,
        progress: Callable[[int, int, int], None] | None = None,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        append: bool = False,
        batch_rows: int = DEFAULT_BATCH_ROWS,
    ) -> CorpusManifest:
        """Tokenizes `inputs` into the corpus `name` in `storage` (see the module's docstring);
        `threads` is the CPUs of a local Ray instance (default: every core)."""
        check_corpus_name(name)
        if not inputs:
            raise InvalidInput("nothing to prepare: name at least one input file")
        if not tokenizer.separator:
            raise InvalidInput(f"the {tokenizer.name} encoding has no {ENDOFTEXT} to join documents with")
        if batch_rows < 1:
            raise InvalidInput(f"batch_rows must be positive, not {batch_rows}")
        previous = manifest_to_extend(storage, name, tokenizer, append)
        wire = np.dtype("<u2") if tokenizer.n_vocab <= 1 << 16 else np.dtype("<u4")
        if previous is not None and previous.numpy_dtype != wire:
            raise InvalidInput(
                f"corpus {name!r} holds {previous.dtype} tokens; this tokenizer writes {wire.name}"
            )
        files = expand_inputs(inputs, text_column=text_column, batch_rows=batch_rows)
        destination = _destination(storage)
        separator_id = int(tokenizer.encode(ENDOFTEXT, allowed_special={ENDOFTEXT})[0])
        # As prepare_corpus: after an existing corpus with documents, the first new document follows
        # a separator; otherwise the first document starts the token stream.
        continues = previous is not None and previous.token_count > 0 and previous.documents > 0
        label = new_run()
        total_bytes = sum(file.size for file in files)
        with self._connected(threads), _data_context():
            import ray

            encoding = _EncodingRef(
                f"{tokenizer.identity}/{tokenizer.name}/{tokenizer.n_vocab}",
                ray.put(tokenizer.definition()),
                tokenizer.gpt2_pattern,
            )
            written: list[_Written] = []
            prefix = _first_prefix(previous)
            done_bytes = 0
            tokens = 0
            for run in _runs(files, text_column):
                job = _ShardJob(
                    destination=destination,
                    folder=shard_folder(name),
                    wire=wire.str,
                    separator_id=separator_id,
                    shard_tokens=max(1, shard_bytes // wire.itemsize),
                    prefix=prefix,
                    label=label,
                    drop_leading=not continues,
                )
                results = _write_run(run, job, encoding, text_column, batch_rows)
                if job.drop_leading:
                    results = _start_corpus(storage, results, wire)
                documents = sum(sum(result.documents.values()) for result in results)
                continues = continues or documents > 0
                if any(result.entries for result in results):
                    prefix += 1
                written += results
                tokens += sum(result.tokens for result in results)
                done_bytes += sum(file.size for file in run)
                if progress is not None:
                    progress(done_bytes, total_bytes, tokens)
        shards = _carry_starts(storage, written)
        if [shard.file for shard in shards] != sorted(shard.file for shard in shards):
            raise RuntimeError("the Ray engine's shard names do not sort in document order")
        counts: Counter[str] = Counter()
        for result in written:
            counts.update(result.documents)
        occurrences = Counter(file.key for file in files)  # a file named twice is read twice
        read = [
            {"path": file.shown, "bytes": file.size, "documents": counts[file.key] // occurrences[file.key]}
            for file in files
        ]
        if previous is not None:
            manifest = previous.with_shards(shards, read)
        else:
            manifest = CorpusManifest.new(
                name, tokenizer, wire, shards, separator_token_id=separator_id, sources=read
            )
        replaced = current_manifest(storage, name) if not append else None
        commit_manifest(storage, manifest)
        if replaced is not None:  # prepared again: the old corpus's files go
            remove_corpus_files(storage, replaced, keep=manifest)
        return manifest

    @contextlib.contextmanager
    def _connected(self, threads: int | None) -> Iterator[None]:
        """Connected to Ray for the block: the cluster at `address`, this process's existing
        connection, or a local instance started (and shut down) here."""
        import ray

        if ray.is_initialized():
            _LOGGER.info("prepare on the Ray cluster this process is already connected to")
            yield
            return
        if self.address:
            _LOGGER.info("prepare on the Ray cluster at %s", self.address)
            if threads:
                _LOGGER.info("--threads does not apply to a Ray cluster: its resources decide")
            _check_reachable(self.address)
            try:
                ray.init(address=self.address)
            except (ConnectionError, TimeoutError, ValueError, RuntimeError) as error:
                raise Unavailable(f"cannot connect to the Ray cluster at {self.address}: {error}") from None
        else:
            cpus = threads or os.cpu_count() or 1
            _LOGGER.info("prepare on a local Ray instance with %d CPUs", cpus)
            # address="local": a new instance, even where RAY_ADDRESS names a cluster.
            ray.init(address="local", num_cpus=cpus, include_dashboard=False)
        try:
            yield
        finally:
            ray.shutdown()


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Unavailable when nothing listens at a `host:port` (or `ray://host:port`) address: Ray itself
    would retry connecting for minutes. Other forms (`auto`, `local`) are left to Ray."""
    match = re.fullmatch(r"(?:ray://)?\[?([^\[\]/]+?)\]?:(\d+)", address)
    if match is None:
        return
    try:
        with socket.create_connection((match.group(1), int(match.group(2))), timeout=timeout):
            pass
    except OSError as error:
        raise Unavailable(f"the Ray cluster at {address} cannot be reached: {error}") from None


@contextlib.contextmanager
def _data_context() -> Iterator[None]:
    """Ray Data settings for the block, restored after it: blocks (and the tasks' numbers)
    keep the data's order, and a task's domain error reaches the driver as itself."""
    from ray.data import DataContext

    context = DataContext.get_current()
    settings = {
        "raise_original_map_exception": True,
        # The DataSourceV2 Parquet reader (the default from Ray 2.60) lists and samples for seconds
        # before each dataset reads anything; the V1 reader reads the same rows in the same order.
        "use_datasource_v2": False,
        # Ray Data keeps half the CPUs for the write operator by default: on a small cluster that
        # leaves tokenizing one task at a time, while writes mostly wait on storage.
        "op_resource_reservation_enabled": False,
    }
    saved = {name: getattr(context, name) for name in settings if hasattr(context, name)}
    saved_order = context.execution_options.preserve_order
    context.execution_options.preserve_order = True
    for name in saved:
        setattr(context, name, settings[name])
    try:
        yield
    except Exception as error:
        domain = _domain_error(error)
        if domain is None or domain is error:
            raise
        raise domain from None
    finally:
        context.execution_options.preserve_order = saved_order
        for name, value in saved.items():
            setattr(context, name, value)


def _domain_error(error: BaseException) -> EmbedServeCoreError | None:
    """The domain error a Ray task raised, when one is behind `error` (Ray wraps a task's
    exception in a RayTaskError that keeps the original as `cause`)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending:
        candidate = pending.pop()
        if candidate is None or id(candidate) in seen:
            continue
        seen.add(id(candidate))
        if isinstance(candidate, EmbedServeCoreError) and not hasattr(candidate, "cause"):
            return candidate
        cause = getattr(candidate, "cause", None)
        pending += [candidate.__cause__, candidate.__context__]
        if isinstance(cause, BaseException):
            pending.append(cause)
    return None


def _destination(storage: Storage) -> str:
    """Where the tasks write, as open_storage takes it: a Storage holds a lock and a live
    filesystem, which stay in this process; each task opens its own."""
    if isinstance(storage, LocalStorage):
        return str(storage.root.resolve())
    if isinstance(storage, FsspecStorage):
        return storage.url  # with any credentials it holds: the tasks need them too
    raise InvalidInput(f"--engine ray writes to a folder or an fsspec URL, not to a {type(storage).__name__}")


def _filesystem(url: str) -> Any:
    """A new fsspec filesystem for the URL (not fsspec's cached instance: Ray pickles it to its
    tasks), with the environment's credentials."""
    import fsspec  # type: ignore[import-untyped]

    protocol = url.split("://", 1)[0].lower()
    try:
        filesystem_class = fsspec.get_filesystem_class(protocol)
    except (ImportError, ValueError) as error:
        extra = " (pip install 'embedserve[s3]')" if protocol in ("s3", "s3a") else ""
        raise InvalidInput(
            f"{redact(url)}: no filesystem for {protocol}:// is installed{extra}: {error}"
        ) from None
    return filesystem_class(skip_instance_cache=True, **filesystem_class._get_kwargs_from_urls(url))


def _first_prefix(previous: CorpusManifest | None) -> int:
    """The first dataset number of new shards: past every numbered name of the existing corpus, so
    that the new names sort after its shards' (whichever engine wrote them)."""
    if previous is None:
        return 0
    numbers = [
        int(match.group(1)) + 1
        for shard in previous.shards
        if (match := _NUMBERED.match(PurePosixPath(shard.file).name))
    ]
    return max([len(previous.shards), *numbers])


def _path_key(location: str) -> str:
    return _SCHEME.sub("", location)


# Inputs


def _kind_of(name: str) -> str:
    """The reader of a file, chosen by its suffix as document_sources.source_for chooses."""
    lowered = name.lower()
    if lowered.endswith(".parquet"):
        return _PARQUET
    if lowered.endswith((".arrow", ".arrows", ".feather", ".ipc")):
        return _ARROW
    if name.removesuffix(".gz").endswith(".jsonl"):
        return _JSONL
    return _TEXT


def _check_compression(file: _InputFile) -> None:
    """Ray decompresses by suffix (.bz2, .zst, ...); document_sources reads only .gz compressed.
    Refused here, so the engines read the same bytes."""
    if file.kind not in (_TEXT, _JSONL):
        return
    import pyarrow as pa

    try:
        codec = pa.Codec.detect(file.location).name
    except (ValueError, TypeError):
        codec = "snappy" if file.location.endswith(".snappy") else None
    if codec is not None and codec != "gzip":
        raise InvalidInput(f"{file.shown}: {codec}-compressed; prepare reads text and .jsonl plain or .gz")


def expand_inputs(
    inputs: Sequence[str], *, text_column: str = DEFAULT_TEXT_COLUMN, batch_rows: int = DEFAULT_BATCH_ROWS
) -> list[_InputFile]:
    """The files the inputs name, in order, checked (NotFound, InvalidInput) before anything is read:
    local inputs through document_sources.open_sources, URLs through fsspec with the same rules."""
    files: list[_InputFile] = []
    for spec in inputs:
        if is_url(spec):
            files += _expand_url(spec, text_column)
            continue
        for source in open_sources([Path(spec)], text_column=text_column, batch_rows=batch_rows):
            path = source.path.resolve()
            kind = {ParquetFile: _PARQUET, ArrowFile: _ARROW, JsonLines: _JSONL, TextFile: _TEXT}[
                type(source)
            ]
            files.append(_InputFile(str(path), kind, path.stat().st_size, str(path)))
    for file in files:
        _check_compression(file)
    return files


def _expand_url(spec: str, text_column: str) -> list[_InputFile]:
    """A URL's files: itself, a saved dataset's Arrow files, or a glob's matches (sorted)."""
    filesystem = _filesystem(spec)
    protocol = _SCHEME.match(spec)
    scheme = protocol.group(0) if protocol else ""
    shown = redact(spec)
    with storage_errors(spec):
        path = filesystem._strip_protocol(spec).rstrip("/")
        if any(character in path for character in "*?[") and not filesystem.exists(path):
            matches = sorted(filesystem.glob(path))
            if not matches:
                raise NotFound(f"{shown}: the pattern matches no file")
            return [file for match in matches for file in _expand_url(scheme + match, text_column)]
        if filesystem.isdir(path):
            names = _saved_dataset_files(filesystem, path, shown)
            return [file for name in names for file in _expand_url(f"{scheme}{path}/{name}", text_column)]
        if not filesystem.isfile(path):
            raise NotFound(f"{shown}: no such file")
        file = _InputFile(scheme + path, _kind_of(path), int(filesystem.size(path)), shown, scheme)
        if file.kind == _PARQUET:
            import pyarrow as pa
            import pyarrow.parquet as pq

            try:
                with filesystem.open(path, "rb") as handle:
                    schema = pq.read_schema(handle)
            except (pa.ArrowException, OSError) as error:
                raise InvalidInput(f"{shown}: cannot be read as Parquet ({error})") from None
            text_column_index(schema, text_column, shown)
    return [file]


def _saved_dataset_files(filesystem: Any, folder: str, shown: str) -> list[str]:
    """The Arrow files of a folder in object storage written by `Dataset.save_to_disk`, in order."""
    if filesystem.exists(f"{folder}/dataset_dict.json"):
        raise InvalidInput(f"{shown}: a DatasetDict; name one split's folder")
    if not filesystem.exists(f"{folder}/state.json"):
        raise InvalidInput(f"{shown}: a folder, but not a dataset saved by save_to_disk (no state.json)")
    try:
        state = json.loads(filesystem.cat_file(f"{folder}/state.json"))
        names = [str(entry["filename"]) for entry in state["_data_files"]]
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidInput(f"{shown}/state.json: not a datasets state file ({error!r})") from None
    for name in names:
        if PurePosixPath(name).name != name:
            raise InvalidInput(f"{shown}/state.json: lists {name!r}, which is not a file in {shown}")
    return names


def _runs(files: Sequence[_InputFile], text_column: str) -> list[list[_InputFile]]:
    """Consecutive files one Ray read takes together: the same reader on the same filesystem.
    Ray's `path` column replaces a Parquet column of that name, so with --text-column path each
    Parquet file is a run of its own."""
    runs: list[list[_InputFile]] = []
    for file in files:
        reader = file.kind == _PARQUET
        if (
            runs
            and (runs[-1][0].kind == _PARQUET) == reader
            and runs[-1][0].protocol == file.protocol
            and not (reader and text_column == "path")
        ):
            runs[-1].append(file)
        else:
            runs.append([file])
    return runs


# Tasks


def _write_run(
    run: Sequence[_InputFile], job: _ShardJob, encoding: _EncodingRef, text_column: str, batch_rows: int
) -> list[_Written]:
    """One Ray Dataset over `run`'s files: read, tokenize and write its shards; the tasks' results,
    in order."""
    import ray.data

    protocol = run[0].protocol
    filesystem = _filesystem(run[0].location) if protocol else None
    locations = [file.location for file in run]
    read_job = _ReadJob(
        encoding=encoding,
        wire=job.wire,
        separator_id=job.separator_id,
        text_column=text_column,
        kinds={file.key: file.kind for file in run},
        shown={file.key: file.shown for file in run},
    )
    if run[0].kind == _PARQUET:
        with_paths = text_column != "path"
        dataset = ray.data.read_parquet(locations, include_paths=with_paths, filesystem=filesystem)
        dataset = dataset.select_columns([text_column, "path"] if with_paths else [text_column])
        if not with_paths:
            read_job = dataclasses.replace(read_job, only_file=run[0].key)
        dataset = dataset.map_batches(
            functools.partial(_tokenize_rows, job=read_job), batch_size=batch_rows, batch_format="pyarrow"
        )
    else:
        # Ray sizes read tasks by bytes, so a few MB of files would be one task on one CPU: ask
        # for two blocks per CPU (a file is never split, documents stay whole). More blocks balance
        # the CPUs better at the end but cost each task's start and its own shard files.
        cpus = ray.cluster_resources().get("CPU", 1)  # type: ignore[no-untyped-call]
        blocks = min(len(locations), 2 * max(1, int(cpus)))
        dataset = ray.data.read_binary_files(
            locations, include_paths=True, filesystem=filesystem, override_num_blocks=blocks
        )
        # A batch is a read block (one file or several, up to Ray's block size): the tokenizing
        # then runs in the task that read the files (a batch size would keep Ray from fusing them).
        dataset = dataset.map_batches(
            functools.partial(_tokenize_files, job=read_job), batch_size=None, batch_format="pyarrow"
        )
    sink = _shard_sink(job)
    # With the map's resources and no bundling of its input (min_bytes_per_write), Ray fuses the
    # write into the tokenizing task.
    dataset.write_datasink(sink)
    results: list[_Written] = sorted(sink.results, key=lambda result: result.task)
    return results


def _shard_sink(job: _ShardJob) -> Any:
    """A Ray Datasink whose writes cut their tokens into shards (the class needs Ray, so it is made
    here)."""
    from ray.data import Datasink
    from ray.data.datasource.datasink import WriteResult

    class ShardSink(Datasink[_Written]):
        def __init__(self) -> None:
            self.results: list[_Written] = []

        def write(self, blocks: Iterable[Any], ctx: Any) -> _Written:
            return write_shards(job, _token_rows(blocks), ctx.task_idx)

        def on_write_complete(self, write_result: WriteResult[_Written]) -> None:
            self.results = list(write_result.write_returns)

        def get_name(self) -> str:
            return "WriteShards"

    return ShardSink()


def _encoder(reference: _EncodingRef) -> tuple[Tokenizer, BpeEncoder]:
    """The tokenizer on a worker, rebuilt from its definition, and the encoder prepare_corpus would
    choose for it (bpe_backends.choose_encoder): made once per worker process."""
    made = _ENCODERS.get(reference.key)
    if made is None:
        import ray
        import tiktoken

        definition = ray.get(reference.definition)
        tokenizer = Tokenizer(
            tiktoken.Encoding(**definition), "ray-object-store", {}, gpt2_pattern=reference.gpt2_pattern
        )
        made = _ENCODERS[reference.key] = (tokenizer, choose_encoder(tokenizer))
    return made


def _encode_documents(texts: Sequence[str], job: _ReadJob) -> tuple[bytes, bytes]:
    """Each document preceded by <|endoftext|>; the tokens, and where each document starts among
    them (uint64), after its separator. Short documents are joined and encoded together (they
    encode as one by one: the encoder splits at special tokens first; prepared.document_starts_of
    tells a document's own "<|endoftext|>" text from a separator), a long one in pieces cut where
    its tokens cannot change (Tokenizer.cut_before), as prepare_corpus does."""
    tokenizer, encoder = _encoder(job.encoding)
    separator = np.array([job.separator_id], dtype=job.wire)
    parts: list[bytes] = []
    starts: list[int] = []
    chunk: list[str] = []
    chars = tokens = 0

    def flush() -> None:
        nonlocal chars, tokens
        if not chunk:
            return
        ids = encoder.encode("".join(chunk)).astype(job.wire)
        literals = [text.count(ENDOFTEXT) for text in chunk[1::2]]
        starts.extend(tokens + start for start in document_starts_of(ids, job.separator_id, True, literals))
        parts.append(ids.tobytes())
        tokens += len(ids)
        chunk.clear()
        chars = 0

    for text in texts:
        if len(text) > _PIECE_CHARS:
            flush()
            spans = plan_stretches(text, tokenizer.cut_before, _PIECE_CHARS)
            ids = np.concatenate([separator, *(encoder.encode(text[a:b]).astype(job.wire) for a, b in spans)])
            starts.append(tokens + 1)
            parts.append(ids.tobytes())
            tokens += len(ids)
            continue
        chunk += (ENDOFTEXT, text)
        chars += len(text)
        if chars >= _CHUNK_CHARS:
            flush()
    flush()
    return b"".join(parts), np.asarray(starts, dtype="<u8").tobytes()


def _token_table(rows: Sequence[tuple[str, list[str]]], job: _ReadJob) -> Any:
    """The tokenizing tasks' output: a row per run of consecutive documents of one file, with their
    tokens and starts."""
    import pyarrow as pa

    merged: list[tuple[str, list[str]]] = []
    for key, texts in rows:
        if merged and merged[-1][0] == key:
            merged[-1][1].extend(texts)
        else:
            merged.append((key, list(texts)))
    encoded = [_encode_documents(texts, job) for _, texts in merged]
    return pa.table(
        {
            "tokens": pa.array([tokens for tokens, _ in encoded], pa.large_binary()),
            "starts": pa.array([starts for _, starts in encoded], pa.large_binary()),
            "documents": pa.array([len(texts) for _, texts in merged], pa.int64()),
            "file": pa.array([key for key, _ in merged], pa.string()),
        }
    )


def _tokenize_files(batch: Any, job: _ReadJob) -> Any:
    """Files read whole (text, JSON lines, Arrow): their documents' tokens."""
    rows = []
    for data, location in zip(
        batch.column("bytes").to_pylist(), batch.column("path").to_pylist(), strict=True
    ):
        key = _path_key(location)
        rows.append((key, file_documents(data, job.kinds[key], job.shown[key], job.text_column)))
    return _token_table(rows, job)


def _tokenize_rows(batch: Any, job: _ReadJob) -> Any:
    """Rows of Parquet files' text column: the tokens of those that are not null."""
    texts = batch.column(job.text_column).to_pylist()
    keys = [job.only_file] * len(texts) if job.only_file else batch.column("path").to_pylist()
    rows = [(_path_key(key), [text]) for key, text in zip(keys, texts, strict=True) if text is not None]
    return _token_table(rows, job)


def file_documents(data: bytes, kind: str, shown: str, text_column: str = DEFAULT_TEXT_COLUMN) -> list[str]:
    """The documents of a file read whole (already gunzipped), as document_sources reads them from
    disk: a text file is one document; a JSON line, or an Arrow row not null, is one."""
    if kind == _ARROW:
        return _arrow_documents(data, shown, text_column)
    try:
        # TextIOWrapper, as document_sources: the same UTF-8 decoding and universal newlines.
        with io.TextIOWrapper(io.BytesIO(data), encoding="utf-8") as handle:
            if kind == _TEXT:
                return [handle.read()]
            texts: list[str] = []
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InvalidInput(f"{shown}:{number}: not JSON ({error.msg})") from None
                text = record.get(text_column) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise InvalidInput(f"{shown}:{number}: no string field {text_column!r}")
                texts.append(text)
            return texts
    except UnicodeDecodeError as error:
        raise InvalidInput(f"{shown}: not UTF-8 text ({error.reason})") from None


def _arrow_documents(data: bytes, shown: str, text_column: str) -> list[str]:
    """An Arrow IPC file or stream's text column, nulls skipped."""
    import pyarrow as pa

    try:
        buffer = pa.py_buffer(data)
        try:
            reader: Any = pa.ipc.open_file(buffer)
            batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        except pa.ArrowInvalid:
            reader = pa.ipc.open_stream(buffer)
            batches = list(reader)
        index = text_column_index(reader.schema, text_column, shown)
        return [text for batch in batches for text in batch.column(index).to_pylist() if text is not None]
    except (pa.ArrowException, OSError) as error:
        raise InvalidInput(f"{shown}: cannot be read as Arrow IPC ({error})") from None


def _token_rows(blocks: Iterable[Any]) -> Iterator[tuple[bytes, bytes, int, str]]:
    from ray.data.block import BlockAccessor

    for block in blocks:
        table = BlockAccessor.for_block(block).to_arrow()
        yield from zip(
            table.column("tokens").to_pylist(),
            table.column("starts").to_pylist(),
            table.column("documents").to_pylist(),
            table.column("file").to_pylist(),
            strict=True,
        )


def write_shards(job: _ShardJob, rows: Iterable[tuple[bytes, bytes, int, str]], task: int) -> _Written:
    """A task's writing: its rows' tokens (each document preceded by a separator) and document starts,
    cut into equal shards of at most job.shard_tokens, written with their document offsets."""
    wire = np.dtype(job.wire)
    pieces: list[bytes] = []
    starts_of: list[npt.NDArray[np.uint64]] = []
    documents: Counter[str] = Counter()
    base = 0
    for tokens, starts, count, key in rows:
        pieces.append(tokens)
        starts_of.append(np.frombuffer(starts, dtype="<u8") + np.uint64(base))
        base += len(tokens) // wire.itemsize
        documents[key] += count
    data: npt.NDArray[Any] = np.frombuffer(b"".join(pieces), dtype=wire)
    starts_all = np.concatenate(starts_of).astype(np.int64) if starts_of else np.zeros(0, np.int64)
    # The run's first task drops the separator before its first document when that starts the
    # corpus (_start_corpus drops it later where this task read no documents).
    dropped = bool(job.drop_leading and task == 0 and len(data))
    if dropped:
        data, starts_all = data[1:], starts_all - 1
    # An empty document ending the task starts at the next task's first token (_carry_starts).
    ends_on_start = bool(len(starts_all)) and int(starts_all[-1]) == len(data)
    starts_all = starts_all[starts_all < len(data)]
    entries = []
    parts = math.ceil(len(data) / job.shard_tokens)
    bounds = [len(data) * part // parts for part in range(parts + 1)] if parts else []
    storage = open_storage(job.destination)
    for part, (low, high) in enumerate(itertools.pairwise(bounds)):
        if max(task, part) >= 10**6:
            raise InvalidInput(f"{part} shards in one task: choose a larger --shard-size")
        file = f"{job.folder}/{job.prefix:05d}-{task:06d}-{part:06d}-{job.label}.tokens"
        inside = starts_all[(starts_all >= low) & (starts_all < high)] - low
        entries.append(write_shard(storage, file, data[low:high].data, wire, inside))
    return _Written(task, tuple(entries), dict(documents), len(data), dropped, ends_on_start)


def _start_corpus(storage: Storage, results: Sequence[_Written], wire: np.dtype[Any]) -> list[_Written]:
    """The run's results, starting the corpus: where task 0 read no documents, the first task with
    documents left the separator before its first document (its first token) in its first shard,
    which is rewritten without it."""
    at = next((index for index, result in enumerate(results) if any(result.documents.values())), None)
    if at is None or results[at].dropped_leading:
        return list(results)
    result = results[at]
    first, *rest = result.entries
    data = storage.read_bytes(first.file, limit=first.bytes)[wire.itemsize :]
    starts = np.zeros(0, OFFSETS_DTYPE)
    if first.document_offsets is not None:
        raw = storage.read_bytes(first.document_offsets.file, limit=first.tokens * OFFSETS_DTYPE.itemsize)
        starts = np.frombuffer(raw, OFFSETS_DTYPE) - 1  # documents start after a separator: from 1
    if data:
        entries = [write_shard(storage, first.file, data, wire, starts), *rest]
    else:  # the shard held the separator only: its document starts in the next
        storage.delete(first.file)
        entries = rest
    fixed = dataclasses.replace(
        result, entries=tuple(entries), tokens=result.tokens - 1, dropped_leading=True
    )
    return [*results[:at], fixed, *results[at + 1 :]]


def _carry_starts(storage: Storage, written: Sequence[_Written]) -> list[ShardEntry]:
    """The tasks' shards in order, with the start of an empty document that ended a task
    added to the next shard's offsets (as ShardWriter carries it from one `add` to the next; past the
    corpus's last token none is kept)."""
    shards: list[ShardEntry] = []
    carried = False
    for result in written:
        entries = list(result.entries)
        if carried and entries:
            entries[0] = _with_first_start(storage, entries[0])
            carried = False
        carried = carried or result.ends_on_start
        shards += entries
    return shards


def _with_first_start(storage: Storage, shard: ShardEntry) -> ShardEntry:
    """The shard with a document starting at its first token, its offsets file rewritten."""
    old = b""
    if shard.document_offsets is not None:
        old = storage.read_bytes(
            shard.document_offsets.file, limit=(shard.tokens + 1) * OFFSETS_DTYPE.itemsize
        )
    raw = np.zeros(1, OFFSETS_DTYPE).tobytes() + old
    file = shard.file.removesuffix(".tokens") + ".docs"
    storage.write_bytes(file, raw)
    count = len(raw) // OFFSETS_DTYPE.itemsize
    offsets = DocumentOffsets(file, count, hashlib.sha256(raw).hexdigest())
    return dataclasses.replace(shard, documents=count, document_offsets=offsets)
