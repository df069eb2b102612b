"""vector_sources: where word vectors come from, and the cache that makes a restart fast."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from embedserve.server.core import Cancelled, StartupError
from embedserve.server.core.vector_sources import load_word_vectors
from gensim.models import KeyedVectors

from .word_vector_cases import CPU, TEST_DATA


def test_convert_once_then_memory_map(tmp_path: Path) -> None:
    source = tmp_path / "vectors.txt"
    shutil.copy(TEST_DATA / "test_glove.txt", source)
    cache = tmp_path / "cache"
    first = load_word_vectors(str(source), cache_dir=cache, device=CPU)
    (folder,) = cache.iterdir()
    written = (folder / "vectors.npy").stat().st_mtime_ns
    second = load_word_vectors(str(source), cache_dir=cache, device=CPU)
    assert first is not None
    assert second is not None
    assert (folder / "vectors.npy").stat().st_mtime_ns == written
    assert isinstance(second.vectors, np.memmap)
    assert second.words == first.words
    rounded = torch.from_numpy(np.load(folder / "unit.npy")).bfloat16().view(torch.int16).numpy()
    assert np.array_equal(np.load(folder / "unit_bfloat16.npy").view(np.int16), rounded)
    assert load_word_vectors("none", cache_dir=cache, device=CPU) is None
    source.write_text(source.read_text().replace("the 0.418", "the 0.5", 1))
    third = load_word_vectors(str(source), cache_dir=cache, device=CPU)
    assert third is not None
    assert len(list(cache.iterdir())) == 2
    assert third.vectors[0, 0] == np.float32(0.5)


def test_native_gensim_files_load(tmp_path: Path) -> None:
    kv = KeyedVectors.load_word2vec_format(str(TEST_DATA / "euclidean_vectors.bin"), binary=True)
    kv.save(str(tmp_path / "model.kv"))
    model = load_word_vectors(str(tmp_path / "model.kv"), cache_dir=tmp_path / "cache", device=CPU)
    assert model is not None
    assert model.words == kv.index_to_key


def test_gzip_text_and_gensim_data_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gzip

    import gensim.downloader

    packed = tmp_path / "glove.txt.gz"
    packed.write_bytes(gzip.compress((TEST_DATA / "test_glove.txt").read_bytes()))
    model = load_word_vectors(str(packed), cache_dir=tmp_path / "cache", device=CPU)
    assert model is not None
    assert model.words[0] == "the"

    reference = KeyedVectors.load_word2vec_format(str(TEST_DATA / "euclidean_vectors.bin"), binary=True)
    requested: list[str] = []

    def fake_load(name: str) -> KeyedVectors:  # gensim-data needs the network; this stands in for it
        requested.append(name)
        return reference

    monkeypatch.setattr(gensim.downloader, "load", fake_load)
    named = load_word_vectors("word2vec-tiny-test", cache_dir=tmp_path / "cache", device=CPU)
    assert named is not None
    assert named.source == "gensim-data:word2vec-tiny-test"
    assert named.words == reference.index_to_key
    again = load_word_vectors("word2vec-tiny-test", cache_dir=tmp_path / "cache", device=CPU)
    assert again is not None
    assert requested == ["word2vec-tiny-test"]  # the second start read the cache

    def offline(name: str) -> KeyedVectors:
        raise OSError("no network")

    monkeypatch.setattr(gensim.downloader, "load", offline)
    with pytest.raises(StartupError, match="not a file, and gensim-data could not provide it"):
        load_word_vectors("word2vec-google-news-300", cache_dir=tmp_path / "cache", device=CPU)


def test_slow_reads_log_progress(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from embedserve.server.core import vector_sources

    caplog.set_level("INFO", logger="embedserve.server.core.vector_sources")
    with vector_sources._progress_log("word vectors slow.bin", every_seconds=0.05):
        import time

        time.sleep(0.3)
    assert any("word vectors slow.bin: still reading after" in r.message for r in caplog.records)
    load_word_vectors(str(TEST_DATA / "test_glove.txt"), cache_dir=tmp_path, device=CPU)
    messages = [r.message for r in caplog.records]
    assert any(m.startswith("reading word vectors") for m in messages)
    assert any(m.startswith("converting") for m in messages)


class _SetAfter(threading.Event):
    """An event that reads as set from its `calls`-th check on: cancellation part-way through."""

    def __init__(self, calls: int) -> None:
        super().__init__()
        self.checks_left = calls

    def is_set(self) -> bool:
        self.checks_left -= 1
        return self.checks_left < 0


def test_cancelling_a_conversion_leaves_no_partial_cache(tmp_path: Path) -> None:
    from embedserve.server.core import vector_sources

    count = 250_000  # three conversion blocks
    loaded = vector_sources._Loaded(
        [f"w{i}" for i in range(count)], np.ones((count, 4), dtype=np.float32), "test"
    )
    folder = tmp_path / "cache" / "model"
    with pytest.raises(Cancelled):
        vector_sources._write_cache(folder, loaded, "model", _SetAfter(calls=1))
    assert list((tmp_path / "cache").iterdir()) == []  # the staging folder is gone, nothing half-written
    vector_sources._write_cache(folder, loaded, "model", threading.Event())
    assert (folder / "meta.json").is_file()
    source = tmp_path / "vectors.txt"
    shutil.copy(TEST_DATA / "test_glove.txt", source)
    stopped = threading.Event()
    stopped.set()
    with pytest.raises(Cancelled):
        load_word_vectors(str(source), cache_dir=tmp_path / "other", device=CPU, cancel=stopped)
    assert not any((tmp_path / "other").glob("*/meta.json"))
