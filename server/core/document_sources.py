"""Where a prepared corpus's documents come from: one class per input format, one function choosing.

`open_sources(inputs, text_column=...)` turns the inputs of `embedserve prepare` into one
`DocumentSource` per file, in order:
- a directory saved by `datasets.Dataset.save_to_disk`: its `data-*.arrow` files, in the order
  its `state.json` lists them;
- a glob (`shards/*.parquet`): the files it matches, sorted; a glob matching nothing is an error;
- a file, by its suffix: `.parquet` (`ParquetFile`), `.arrow`/`.arrows`/`.feather`/`.ipc`
  (`ArrowFile`: the Arrow IPC file format or the stream format), `.jsonl` (`JsonLines`, one
  document per line, its text field), anything else plain UTF-8 text (`TextFile`, the whole file
  one document); `.gz` of text or JSON lines is read too.

In a Parquet or Arrow file each row of the text column is one document and nulls are skipped.
Sources yield their documents a batch at a time, reading record batches (never a whole table),
so a file larger than memory is read in bounded memory. Each is checked when opened (the file is
there, the column exists and holds strings), before anything is tokenized.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Protocol

from .errors import InvalidInput, NotFound

_LOGGER = logging.getLogger(__name__)

DEFAULT_TEXT_COLUMN = "text"
DEFAULT_BATCH_ROWS = 8192  # documents per batch a source yields (Parquet, Arrow and JSON lines)
_PARQUET_SUFFIXES = (".parquet",)
_ARROW_SUFFIXES = (".arrow", ".arrows", ".feather", ".ipc")


@dataclass(frozen=True)
class DocumentBatch:
    """Some consecutive documents of one file, and how far into the file (bytes) they end: exact
    for text, estimated from rows or record batches for Parquet and Arrow (for progress only)."""

    texts: list[str]
    position: int


class DocumentSource(Protocol):
    """One input file's documents, in order, a batch at a time."""

    @property
    def path(self) -> Path: ...

    def batches(self) -> Iterator[DocumentBatch]: ...


@contextlib.contextmanager
def _open_text(path: Path) -> Iterator[tuple[IO[str], BinaryIO]]:
    """The file as UTF-8 text (gunzipped for `.gz`), and the raw file under it, whose position
    says how much of the file (compressed, for `.gz`) has been read."""
    with path.open("rb") as raw:
        binary = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
        with io.TextIOWrapper(binary, encoding="utf-8") as handle:
            yield handle, raw


@contextlib.contextmanager
def _text_errors(path: Path) -> Iterator[None]:
    try:
        yield
    except UnicodeDecodeError as error:
        raise InvalidInput(f"{path}: not UTF-8 text ({error.reason})") from None
    except (OSError, EOFError) as error:
        raise InvalidInput(f"{path}: cannot be read ({error})") from None


@dataclass(frozen=True)
class TextFile:
    """A plain UTF-8 text file (or one gzipped): the whole file is one document."""

    path: Path

    def batches(self) -> Iterator[DocumentBatch]:
        with _text_errors(self.path), _open_text(self.path) as (handle, raw):
            text = handle.read()
            yield DocumentBatch([text], raw.tell())


@dataclass(frozen=True)
class JsonLines:
    """A `.jsonl` file (or one gzipped): each non-blank line is a JSON object, one document (its
    string field `field`)."""

    path: Path
    field: str = DEFAULT_TEXT_COLUMN
    batch_rows: int = DEFAULT_BATCH_ROWS

    def batches(self) -> Iterator[DocumentBatch]:
        texts: list[str] = []
        with _text_errors(self.path), _open_text(self.path) as (handle, raw):
            for number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InvalidInput(f"{self.path}:{number}: not JSON ({error.msg})") from None
                text = record.get(self.field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise InvalidInput(f"{self.path}:{number}: no string field {self.field!r}")
                texts.append(text)
                if len(texts) >= self.batch_rows:
                    yield DocumentBatch(texts, raw.tell())
                    texts = []
            yield DocumentBatch(texts, raw.tell())


@contextlib.contextmanager
def _arrow_errors(path: Path, what: str) -> Iterator[None]:
    import pyarrow as pa

    try:
        yield
    except (pa.ArrowException, OSError) as error:
        raise InvalidInput(f"{path}: cannot be read as {what} ({error})") from None


def text_column_index(schema: Any, column: str, path: Path | str) -> int:
    """The index of the text column in an Arrow schema; InvalidInput unless it holds strings."""
    import pyarrow as pa

    names = list(schema.names)
    if names.count(column) != 1:
        if column in names:
            raise InvalidInput(f"{path}: {names.count(column)} columns are named {column!r}")
        raise InvalidInput(
            f"{path}: no column {column!r} (choose one with --text-column); its columns: "
            + ", ".join(repr(name) for name in names)
        )
    kind = schema.field(column).type
    view = getattr(pa.types, "is_string_view", lambda _: False)
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or view(kind)):
        raise InvalidInput(f"{path}: column {column!r} holds {kind}, not text (string or large_string)")
    return names.index(column)


def _strings(array: Any) -> list[str]:
    return [text for text in array.to_pylist() if text is not None]


class ParquetFile:
    """A Parquet file: each non-null value of one string column is a document. Read a record batch
    of `batch_rows` rows at a time, only that column (memory is bounded by a row group's column
    chunk, however large the file)."""

    def __init__(self, path: Path, column: str = DEFAULT_TEXT_COLUMN, batch_rows: int = DEFAULT_BATCH_ROWS):
        import pyarrow.parquet as pq

        self.path = path
        self.column = column
        self.batch_rows = batch_rows
        with _arrow_errors(path, "Parquet"), pq.ParquetFile(path) as reader:
            text_column_index(reader.schema_arrow, column, path)

    def batches(self) -> Iterator[DocumentBatch]:
        import pyarrow.parquet as pq

        size = self.path.stat().st_size
        # pre_buffer would read ahead every row group's column chunk: memory would grow with the file.
        with _arrow_errors(self.path, "Parquet"), pq.ParquetFile(self.path, pre_buffer=False) as reader:
            total = max(reader.metadata.num_rows, 1)
            rows = 0
            # No Arrow thread pool: one column is decoded, and a pool busy at exit can abort.
            for batch in reader.iter_batches(
                batch_size=self.batch_rows, columns=[self.column], use_threads=False
            ):
                rows += batch.num_rows
                yield DocumentBatch(_strings(batch.column(0)), size * rows // total)


class ArrowFile:
    """An Arrow IPC file (`.arrow`, `.feather` v2) or IPC stream (what `save_to_disk` writes):
    each non-null value of one string column is a document. Memory-mapped and read a record batch
    at a time, each cut into slices of at most `batch_rows` rows."""

    def __init__(self, path: Path, column: str = DEFAULT_TEXT_COLUMN, batch_rows: int = DEFAULT_BATCH_ROWS):
        self.path = path
        self.column = column
        self.batch_rows = batch_rows
        with self._reader() as (reader, _):
            self._index = text_column_index(reader.schema, column, path)

    @contextlib.contextmanager
    def _reader(self) -> Iterator[tuple[Any, Any]]:
        """An IPC file reader or, when the file is not in the file format, a stream reader; and
        the memory-mapped file under it."""
        import pyarrow as pa

        with _arrow_errors(self.path, "Arrow IPC"):
            with pa.memory_map(str(self.path)) as mapped:
                try:
                    reader = pa.ipc.open_file(mapped)
                except pa.ArrowInvalid:
                    reader = None
                if reader is not None:
                    yield reader, mapped
                    return
            with pa.memory_map(str(self.path)) as mapped, pa.ipc.open_stream(mapped) as stream:
                yield stream, mapped

    def batches(self) -> Iterator[DocumentBatch]:
        import pyarrow as pa

        size = self.path.stat().st_size
        with self._reader() as (reader, mapped):
            if isinstance(reader, pa.ipc.RecordBatchFileReader):
                count = reader.num_record_batches
                record_batches = (
                    (reader.get_batch(i), size * (i + 1) // max(count, 1)) for i in range(count)
                )
            else:
                record_batches = ((batch, mapped.tell()) for batch in reader)
            for batch, position in record_batches:
                column = batch.column(self._index)
                for start in range(0, len(column), self.batch_rows):
                    yield DocumentBatch(_strings(column.slice(start, self.batch_rows)), position)


def saved_dataset_files(folder: Path) -> list[Path]:
    """The Arrow files of a dataset saved by `datasets.Dataset.save_to_disk`, in its order."""
    if (folder / "dataset_dict.json").is_file():
        splits = sorted(p.name for p in folder.iterdir() if (p / "state.json").is_file())
        raise InvalidInput(
            f"{folder}: a DatasetDict (splits: {', '.join(splits) or 'none'}); name one split's folder, "
            f"e.g. {folder / (splits[0] if splits else 'train')}"
        )
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise InvalidInput(f"{folder}: a folder, but not a dataset saved by save_to_disk (no state.json)")
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        names = [str(entry["filename"]) for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InvalidInput(f"{state_path}: not a datasets state file ({error!r})") from None
    files = []
    for name in names:
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise InvalidInput(f"{state_path}: lists {name!r}, which is not a file in {folder}")
        files.append(path)
    return files


def _expand(spec: Path) -> list[Path]:
    """The files one input names: itself, a saved dataset's files, or a glob's matches (sorted)."""
    if spec.is_dir():
        return saved_dataset_files(spec)
    if spec.exists() or not any(character in str(spec) for character in "*?["):
        if not spec.is_file():
            raise NotFound(f"{spec}: no such file")
        return [spec]
    matches = sorted(Path(match) for match in glob.glob(str(spec), recursive=True))
    if not matches:
        raise NotFound(f"{spec}: the pattern matches no file")
    return [file for match in matches for file in _expand(match)]


def source_for(
    path: Path, *, text_column: str = DEFAULT_TEXT_COLUMN, batch_rows: int = DEFAULT_BATCH_ROWS
) -> DocumentSource:
    """The source reading one file, chosen by its suffix (see the module's docstring)."""
    name = path.name.lower()
    source: DocumentSource
    if name.endswith(_PARQUET_SUFFIXES):
        source = ParquetFile(path, text_column, batch_rows)
    elif name.endswith(_ARROW_SUFFIXES):
        source = ArrowFile(path, text_column, batch_rows)
    elif path.name.removesuffix(".gz").endswith(".jsonl"):
        source = JsonLines(path, text_column, batch_rows)
    else:
        source = TextFile(path)
    _LOGGER.debug("%s: read as %s", path, type(source).__name__)
    return source


def open_sources(
    inputs: Sequence[Path], *, text_column: str = DEFAULT_TEXT_COLUMN, batch_rows: int = DEFAULT_BATCH_ROWS
) -> list[DocumentSource]:
    """One source per file the inputs name, in order; NotFound or InvalidInput before any is read."""
    if batch_rows < 1:
        raise InvalidInput(f"batch_rows must be positive, not {batch_rows}")
    return [
        source_for(path, text_column=text_column, batch_rows=batch_rows)
        for spec in inputs
        for path in _expand(spec)
    ]
