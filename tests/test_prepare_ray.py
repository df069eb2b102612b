"""`embedserve prepare --engine ray`: the corpus of the in-process engine, made by Ray Data tasks.

One local Ray instance (2 CPUs) serves the module: starting Ray takes seconds. Every test holds
the Ray engine to prepare_corpus on the same inputs in the same order: the same tokens, byte for
byte, and the same document offsets, however the shards are cut. Skipped without Ray, unless
EMBEDSERVE_REQUIRE_RAY=1.
"""

from __future__ import annotations

import gzip
import importlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from embedserve.server.cli import main
from embedserve.server.core import InvalidInput, NotFound, Tokenizer, load_gpt2_tokenizer
from embedserve.server.core.corpus import CorpusStore
from embedserve.server.core.document_sources import source_for
from embedserve.server.core.manifest import CorpusManifest, read_manifest
from embedserve.server.core.prepare_engines import prepare_engine
from embedserve.server.core.prepare_ray import RayEngine, file_documents
from embedserve.server.core.prepared import prepare_corpus
from embedserve.server.core.storage import FsspecStorage, LocalStorage, Storage

from .conftest import free_port
from .corpus_files import document_starts

try:
    import ray
except ImportError:
    if os.environ.get("EMBEDSERVE_REQUIRE_RAY") == "1":
        raise
    pytest.skip("Ray is not installed (pip install 'embedserve[ray]')", allow_module_level=True)

VERDICT = Path(__file__).resolve().parents[2] / "shared" / "data" / "the-verdict.txt"
BUCKET = "corpora"
# Documents that test the joins: empty ones, a literal separator, Unicode line separators (a line
# break for str.splitlines, not for JSON lines), CRLF.
ODD_DOCUMENTS = [
    "",
    "a literal <|endoftext|> inside",
    "line\u2028separator \x85 NEL",
    "crlf\r\nend",
    "ü 数字",
]


def _prose(seed: int, sentences: int) -> str:
    rng = np.random.default_rng(seed)
    if VERDICT.is_file():
        pool = VERDICT.read_text(encoding="utf-8").replace("\n", " ").split(". ")
    else:
        pool = [f"sentence {n} of the painter Jack Gisburn" for n in range(200)]
    return ". ".join(pool[int(i)] for i in rng.integers(0, len(pool), sentences)) + "."


def _write_inputs(folder: Path) -> list[Path]:
    """Text files (plain, CRLF, gzipped, empty), JSON lines, Parquet with nulls and several row
    groups, and an Arrow IPC stream, in an order that mixes Ray's readers."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number in range(3):
        path = folder / f"text-{number}.txt"
        path.write_text(_prose(number, 40 + 10 * number), encoding="utf-8")
        paths.append(path)
    (folder / "crlf.txt").write_bytes(b"first line\r\nsecond\rthird\n")
    # Longer than the piece a long document is encoded in (1M characters).
    (folder / "long.txt").write_text("\n\n".join(_prose(n, 20) for n in range(600)), encoding="utf-8")
    with gzip.open(folder / "packed.txt.gz", "wt", encoding="utf-8") as out:
        out.write(_prose(7, 30))
    (folder / "empty.txt").write_text("")
    with (folder / "records.jsonl").open("w", encoding="utf-8") as out:
        for number, text in enumerate([*ODD_DOCUMENTS, _prose(8, 12)]):
            out.write(json.dumps({"text": text, "id": number}, ensure_ascii=False) + "\n\n")
    texts = [None if n % 5 == 3 else _prose(100 + n, 3) for n in range(40)]
    pq.write_table(pa.table({"text": texts, "n": list(range(40))}), folder / "rows.parquet", row_group_size=7)
    more = pa.table({"text": pa.array([_prose(200 + n, 2) for n in range(9)], pa.large_string())})
    pq.write_table(more, folder / "more.parquet", row_group_size=4)
    with pa.ipc.new_stream(folder / "rows.arrow", pa.schema([("text", pa.large_string())])) as stream:
        stream.write_table(pa.table({"text": pa.array(["arrow one", None, "arrow two"], pa.large_string())}))
    names = ("crlf.txt", "long.txt", "packed.txt.gz", "empty.txt", "records.jsonl")
    paths += [folder / name for name in names]
    paths += [folder / "rows.parquet", folder / "more.parquet", folder / "rows.arrow", paths[0]]  # twice
    return paths


@pytest.fixture(scope="module")
def object_store() -> Iterator[dict[str, str] | None]:
    """moto's S3 server, and its endpoint and test credentials in the environment, set before Ray
    starts so that its workers have them too; None without moto, boto3 or s3fs."""
    try:
        boto3 = importlib.import_module("boto3")
        importlib.import_module("s3fs")
        moto_server = importlib.import_module("moto.server")
    except ImportError:
        yield None
        return
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    environment = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server._server.server_port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield environment
    server.stop()


@pytest.fixture(scope="module")
def ray_instance(object_store: dict[str, str] | None) -> Iterator[None]:
    """One local Ray instance with 2 CPUs for the module; the engine uses it (and leaves it up)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_gpt2_tokenizer(None, {})


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _write_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def local_corpus(inputs: list[Path], tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The in-process engine's corpus of every input: what the Ray engine must match."""
    folder = tmp_path_factory.mktemp("local")
    prepare_corpus(inputs, "books", folder, tokenizer, threads=2)
    return folder


def _tokens(folder: Path, tokenizer: Tokenizer) -> npt.NDArray[Any]:
    return CorpusStore(folder, tokenizer).tokens("books")


def _assert_same_corpus(ray_folder: Path, local_folder: Path, tokenizer: Tokenizer) -> None:
    expected = _tokens(local_folder, tokenizer)
    tokens = _tokens(ray_folder, tokenizer)
    assert tokens.dtype == expected.dtype
    assert tokens.tobytes() == expected.tobytes()
    assert document_starts(ray_folder, "books") == document_starts(local_folder, "books")
    ours, theirs = (read_manifest(LocalStorage(f), "books") for f in (ray_folder, local_folder))
    assert ours.documents == theirs.documents
    assert ours.documents == sum(source["documents"] for source in ours.sources)
    assert [s["documents"] for s in ours.sources] == [s["documents"] for s in theirs.sources]
    assert [s["path"] for s in ours.sources] == [s["path"] for s in theirs.sources]
    assert (ours.tokenizer, ours.tokenizer_sha256, ours.dtype, ours.separator_token_id) == (
        theirs.tokenizer,
        theirs.tokenizer_sha256,
        theirs.dtype,
        theirs.separator_token_id,
    )
    _assert_names_sort_in_order(ours)


def _assert_names_sort_in_order(manifest: CorpusManifest) -> None:
    files = [shard.file for shard in manifest.shards]
    assert files == sorted(files), "shard names sort in document order"
    assert all(PurePosixPath(file).parent.name == "books.shards" for file in files)


@pytest.mark.usefixtures("ray_instance")
@pytest.mark.parametrize("shard_size", [256 << 20, 1024])
def test_tokens_match_the_local_engine(
    inputs: list[Path], local_corpus: Path, tokenizer: Tokenizer, tmp_path: Path, shard_size: int
) -> None:
    manifest = RayEngine(None).prepare(
        [str(path) for path in inputs], "books", LocalStorage(tmp_path), tokenizer, shard_bytes=shard_size
    )
    _assert_same_corpus(tmp_path, local_corpus, tokenizer)
    assert all(shard.bytes <= shard_size for shard in manifest.shards)
    if shard_size == 1024:
        assert len(manifest.shards) > 100
    assert ray.is_initialized(), "a connection the engine did not make stays up"
    # Nothing but the manifest and the shards' files.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["books.json", "books.shards"]
    listed = {shard.file for shard in manifest.shards} | {
        shard.document_offsets.file for shard in manifest.shards if shard.document_offsets
    }
    assert {f"books.shards/{p.name}" for p in (tmp_path / "books.shards").iterdir()} == listed


@pytest.mark.usefixtures("ray_instance")
def test_append_continues_the_corpus(
    inputs: list[Path], local_corpus: Path, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    """Ray, then Ray --append, then the local engine's --append: the corpus of all inputs at once."""
    storage = LocalStorage(tmp_path)
    engine = RayEngine(None)
    engine.prepare([str(p) for p in inputs[:4]], "books", storage, tokenizer, shard_bytes=1024)
    appended = engine.prepare([str(p) for p in inputs[4:11]], "books", storage, tokenizer, append=True)
    assert appended.generation == 2
    _assert_names_sort_in_order(appended)
    prepare_corpus(inputs[11:], "books", tmp_path, tokenizer, append=True, shard_bytes=1024)
    _assert_same_corpus(tmp_path, local_corpus, tokenizer)


@pytest.mark.usefixtures("ray_instance")
@pytest.mark.parametrize("shard_size", [2, 1 << 20])
def test_a_corpus_whose_first_inputs_hold_no_documents(
    tokenizer: Tokenizer, tmp_path: Path, shard_size: int
) -> None:
    """The first task then reads nothing: the corpus still starts without a separator."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": pa.array([None, None], pa.string())}), nulls)
    blank = tmp_path / "blank.txt"
    blank.write_text("")
    story = tmp_path / "story.txt"
    story.write_text("I HAD always thought Jack Gisburn rather a cheap genius.")
    inputs = [str(empty), str(nulls), str(blank), str(story)]
    ray_folder, local_folder = tmp_path / "ray", tmp_path / "local"
    RayEngine(None).prepare(inputs, "books", LocalStorage(ray_folder), tokenizer, shard_bytes=shard_size)
    prepare_corpus([Path(p) for p in inputs], "books", local_folder, tokenizer, shard_bytes=shard_size)
    _assert_same_corpus(ray_folder, local_folder, tokenizer)


@pytest.mark.usefixtures("ray_instance")
def test_prepared_again_replaces_the_corpus(inputs: list[Path], tokenizer: Tokenizer, tmp_path: Path) -> None:
    engine = RayEngine(None)
    first = engine.prepare([str(inputs[0])], "books", LocalStorage(tmp_path), tokenizer)
    second = engine.prepare([str(inputs[1])], "books", LocalStorage(tmp_path), tokenizer)
    on_disk = {f"books.shards/{p.name}" for p in (tmp_path / "books.shards").iterdir()}
    assert {shard.file for shard in first.shards}.isdisjoint(on_disk)
    assert {shard.file for shard in second.shards} <= on_disk
    expected = tokenizer.encode(inputs[1].read_text(encoding="utf-8"))
    assert _tokens(tmp_path, tokenizer).tolist() == expected.tolist()


@pytest.mark.usefixtures("ray_instance")
def test_object_storage_in_and_out(
    object_store: dict[str, str] | None, inputs: list[Path], local_corpus: Path, tokenizer: Tokenizer
) -> None:
    """Inputs read from s3:// (a glob among them) and shards written to s3:// by the tasks."""
    if object_store is None:
        pytest.skip("moto[server], boto3 and s3fs are needed (the dev extra installs them)")
    client = importlib.import_module("boto3").client("s3")
    for path in inputs:
        client.put_object(Bucket=BUCKET, Key=f"in/{path.name}", Body=path.read_bytes())
    # The local inputs' order with text-0..2 named by a glob (its matches are sorted).
    urls = [f"s3://{BUCKET}/in/text-*.txt"] + [f"s3://{BUCKET}/in/{p.name}" for p in inputs[3:]]
    storage = FsspecStorage(f"s3://{BUCKET}/team")
    manifest = prepare_engine("ray").prepare(urls, "books", storage, tokenizer, shard_bytes=64 << 10)
    stored = read_manifest(storage, "books")
    assert stored == manifest
    assert [s["path"] for s in manifest.sources][:3] == [f"s3://{BUCKET}/in/text-{n}.txt" for n in range(3)]
    tokens = b"".join(storage.read_bytes(shard.file, limit=1 << 20) for shard in manifest.shards)
    assert tokens == _tokens(local_corpus, tokenizer).tobytes()
    assert _object_starts(storage, manifest) == document_starts(local_corpus, "books")
    _assert_names_sort_in_order(manifest)
    # A write task's storage error reaches the driver as the domain error it is.
    with pytest.raises(NotFound, match="s3://no-such-bucket/"):
        prepare_engine("ray").prepare(urls[:1], "books", FsspecStorage("s3://no-such-bucket/x"), tokenizer)


@pytest.mark.usefixtures("ray_instance")
def test_a_saved_dataset_in_object_storage(
    object_store: dict[str, str] | None, tokenizer: Tokenizer, tmp_path: Path
) -> None:
    """A folder written by `Dataset.save_to_disk`, uploaded: its Arrow files in its state's order."""
    if object_store is None:
        pytest.skip("moto[server], boto3 and s3fs are needed (the dev extra installs them)")
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    folder = tmp_path / "saved"
    texts = [_prose(300 + n, 2) for n in range(30)]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(folder), num_shards=3)
    client = importlib.import_module("boto3").client("s3")
    for path in folder.iterdir():
        client.put_object(Bucket=BUCKET, Key=f"saved/{path.name}", Body=path.read_bytes())
    prepare_corpus([folder], "books", tmp_path / "local", tokenizer)
    manifest = RayEngine(None).prepare(
        [f"s3://{BUCKET}/saved"], "books", LocalStorage(tmp_path / "ray"), tokenizer
    )
    assert _tokens(tmp_path / "ray", tokenizer).tobytes() == _tokens(tmp_path / "local", tokenizer).tobytes()
    state = json.loads((folder / "state.json").read_text())
    expected = [f"s3://{BUCKET}/saved/{entry['filename']}" for entry in state["_data_files"]]
    assert [source["path"] for source in manifest.sources] == expected


def _object_starts(storage: Storage, manifest: CorpusManifest) -> list[int]:
    starts: list[int] = []
    base = 0
    for shard in manifest.shards:
        if shard.document_offsets is not None:
            raw = storage.read_bytes(shard.document_offsets.file, limit=1 << 20)
            starts += (np.frombuffer(raw, dtype="<u8") + base).tolist()
        base += shard.tokens
    return starts


@pytest.mark.usefixtures("ray_instance")
def test_cli_runs_the_ray_engine(
    inputs: list[Path],
    local_corpus: Path,
    tokenizer: Tokenizer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    arguments = ["prepare", *map(str, inputs), "--out", "books", "--data-dir", str(tmp_path)]
    assert main([*arguments, "--engine", "ray", "--shard-size", "4KiB"]) == 0
    assert "books:" in capsys.readouterr().out
    _assert_same_corpus(tmp_path, local_corpus, tokenizer)


@pytest.mark.usefixtures("ray_instance")
def test_a_task_error_reaches_the_driver_as_itself(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """A bad JSON line is found by the task that reads the file: the same InvalidInput as locally,
    and no manifest."""
    records = tmp_path / "bad.jsonl"
    records.write_text('{"text": "fine"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(InvalidInput, match=r"bad\.jsonl:2: no string field 'text'") as raised:
        RayEngine(None).prepare([str(records)], "books", LocalStorage(tmp_path / "out"), tokenizer)
    assert "Traceback" not in str(raised.value)
    assert not (tmp_path / "out" / "books.json").exists()


def test_inputs_are_checked_before_ray_starts(tmp_path: Path, tokenizer: Tokenizer) -> None:
    """Missing files, a Parquet file without the text column and compression other than gzip are
    refused by the driver (no Ray connection is needed for that)."""
    engine = RayEngine(None)
    storage = LocalStorage(tmp_path / "out")
    with pytest.raises(NotFound, match="no such file"):
        engine.prepare([str(tmp_path / "absent.txt")], "books", storage, tokenizer)
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "rows.parquet")
    with pytest.raises(InvalidInput, match="no column 'text'"):
        engine.prepare([str(tmp_path / "rows.parquet")], "books", storage, tokenizer)
    (tmp_path / "notes.txt.bz2").write_bytes(b"BZh9")
    with pytest.raises(InvalidInput, match="bz2-compressed"):
        engine.prepare([str(tmp_path / "notes.txt.bz2")], "books", storage, tokenizer)
    with pytest.raises(InvalidInput, match="--out"):
        engine.prepare([str(tmp_path / "rows.parquet")], "books.json", storage, tokenizer)


def test_a_file_read_whole_gives_the_documents_of_document_sources(tmp_path: Path) -> None:
    """What a task parses from a file's bytes is what document_sources reads from the file."""
    paths = _write_inputs(tmp_path)
    for path in paths:
        if path.suffix == ".parquet":
            continue
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        kind = {".arrow": "arrow", ".jsonl": "jsonl"}.get(path.suffix, "text")
        expected = [text for batch in source_for(path).batches() for text in batch.texts]
        assert file_documents(data, kind, str(path)) == expected, path
    assert file_documents(b"\xef\xbb\xbfbom", "text", "x") == ["\ufeffbom"]
    with pytest.raises(InvalidInput, match="not UTF-8"):
        file_documents(b"\xff", "text", "x")


def test_a_cluster_that_cannot_be_reached_is_unavailable(tmp_path: Path) -> None:
    """Ray would retry for minutes; the engine says at once that nothing listens there."""
    (tmp_path / "a.txt").write_text("text")
    address = f"127.0.0.1:{free_port()}"
    command = [sys.executable, "-m", "embedserve.server.cli", "prepare", str(tmp_path / "a.txt")]
    command += ["--out", "books", "--data-dir", str(tmp_path), "--engine", "ray", "--ray-address", address]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"the Ray cluster at {address} cannot be reached" in result.stderr
    assert not (tmp_path / "books.json").exists()


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails, as where it is absent
    with pytest.raises(InvalidInput, match=r"pip install 'embedserve\[ray\]'"):
        prepare_engine("ray")
