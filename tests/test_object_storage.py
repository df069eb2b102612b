"""Corpora in object storage: prepared into a real S3-compatible server on 127.0.0.1 (moto's server
mode), served through the shard cache, equal to the same corpus on local disk; and the bad cases:
a missing bucket or object, wrong credentials, a shard that does not match its manifest, and the
object server going away mid-epoch."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from embedserve.client import (
    Client,
    DataLossError,
    NotFoundError,
    PermissionDeniedError,
)
from embedserve.server import ServerConfig
from embedserve.server.cli import main

from .conftest import ServerThread, start_server
from .corpus_files import prepared_tokens

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")

BUCKET = "corpora"
SECRET = "not-a-real-secret-but-never-shown"
SHARD_SIZE = "4KiB"


class ObjectStore:
    """moto's S3 server on 127.0.0.1, stoppable and restartable on the same port (its state
    lives in this process, so a restart keeps the buckets)."""

    def __init__(self) -> None:
        self._server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.port: int = self._server._server.server_port
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key=SECRET,
            region_name="us-east-1",
        )

    def stop(self) -> None:
        self._server.stop()

    def restart(self) -> None:
        self._server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()


@pytest.fixture(scope="module")
def store() -> Iterator[ObjectStore]:
    running = ObjectStore()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "AWS_ENDPOINT_URL": running.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            patch.setenv(name, value)
        patch.delenv("AWS_PROFILE", raising=False)
        running.client().create_bucket(Bucket=BUCKET)
        yield running
    running.stop()


def _text(seed: int, paragraphs: int) -> str:
    """Varied English-like text from the notebook's corpus when present, else from words."""
    verdict = Path(__file__).resolve().parents[2] / "shared" / "data" / "the-verdict.txt"
    rng = random.Random(seed)
    if verdict.exists():
        sentences = verdict.read_text().replace("\n", " ").split(". ")
    else:
        words = [
            "the",
            "a",
            "painter",
            "said",
            "Jack",
            "Gisburn",
            "genius",
            "fellow",
            "money",
            "wife",
            "picture",
            "never",
        ]
        sentences = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    return "\n\n".join(". ".join(rng.sample(sentences, 6)) + "." for _ in range(paragraphs))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("inputs")
    paths = []
    for number in range(3):
        path = folder / f"part-{number}.txt"
        path.write_text(_text(number, 40))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def prepared(store: ObjectStore, inputs: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same corpus prepared into the bucket and into a local folder (returned)."""
    local = tmp_path_factory.mktemp("local")
    for data_dir in (f"s3://{BUCKET}/team", str(local)):
        arguments = ["prepare", *map(str, inputs), "--out", "books", "--data-dir", data_dir]
        assert main([*arguments, "--shard-size", SHARD_SIZE]) == 0
    return local


def _serve(data_dir: str, cache: Path, cache_size: str = "1GiB") -> ServerThread:
    return start_server(
        ServerConfig(
            port=0,
            device="cpu",
            word_vectors="none",
            dim=8,
            data_dir=data_dir,
            cache_dir=cache,
            cache_size=cache_size,
        )
    )


def _batches(target: str, **settings: Any) -> list[tuple[list[list[int]], list[list[int]]]]:
    with Client(target, timeout=60) as client:
        return [
            (batch.inputs.tolist(), batch.targets.tolist())
            for batch in client.stream_batches(corpus="books", **settings)
        ]


SETTINGS: list[dict[str, Any]] = [
    {"batch_size": 4, "max_length": 32, "stride": 32, "shuffle": False},
    {"batch_size": 3, "max_length": 64, "stride": 17, "shuffle": True, "seed": 7, "drop_last": False},
    {"batch_size": 2, "max_length": 16, "stride": 16, "shuffle": True, "seed": 1, "rank": 1, "world_size": 3},
    {"batch_size": 5, "max_length": 128, "stride": 64, "shuffle": True, "seed": 3, "epoch": 1, "epochs": 2},
]


def test_a_corpus_in_object_storage_streams_as_it_does_from_local_disk(
    store: ObjectStore, prepared: Path, tmp_path: Path
) -> None:
    listed = store.client().list_objects_v2(Bucket=BUCKET, Prefix="team/")["Contents"]
    names = sorted(item["Key"] for item in listed)
    assert "team/books.json" in names
    assert sum(name.endswith(".tokens") for name in names) > 5  # many shards
    remote, local = _serve(f"s3://{BUCKET}/team", tmp_path / "cache"), _serve(str(prepared), tmp_path / "c2")
    try:
        for settings in SETTINGS:
            assert _batches(remote.target, **settings) == _batches(local.target, **settings), settings
    finally:
        remote.stop()
        local.stop()
    cached = sorted((tmp_path / "cache" / "shards").glob("*.shard"))
    assert cached  # fetched shards are kept under their sha256, read-only
    assert all(len(path.stem) == 64 and path.stat().st_mode & 0o222 == 0 for path in cached)


def test_a_corpus_larger_than_the_cache_streams_with_the_cache_bounded(
    store: ObjectStore, prepared: Path, tmp_path: Path
) -> None:
    tokens = prepared_tokens(prepared, "books")
    cache_bytes = 3 * 4096  # three of its shards, of about a dozen
    assert tokens.nbytes > 3 * cache_bytes
    server = _serve(f"s3://{BUCKET}/team", tmp_path / "cache", cache_size=str(cache_bytes))
    try:
        batches = _batches(server.target, batch_size=4, max_length=32, stride=32, shuffle=False)
    finally:
        server.stop()
    windows = [row for inputs, _ in batches for row in inputs]
    assert windows == [tokens[i : i + 32].tolist() for i in range(0, len(tokens) - 32, 32)]
    kept = sum(path.stat().st_size for path in (tmp_path / "cache" / "shards").glob("*.shard"))
    assert 0 < kept <= cache_bytes


def test_a_missing_bucket_or_corpus_is_not_found_naming_the_url(
    store: ObjectStore, prepared: Path, tmp_path: Path
) -> None:
    for data_dir, corpus in (("s3://no-such-bucket/x", "books"), (f"s3://{BUCKET}/team", "nothing")):
        server = _serve(data_dir, tmp_path / "cache")
        try:
            with Client(server.target) as client, pytest.raises(NotFoundError) as raised:
                next(iter(client.stream_batches(corpus=corpus, batch_size=1, max_length=4)))
            assert f"{data_dir}/{corpus}.json" in str(raised.value)
        finally:
            server.stop()
    # prepare says the same of a bucket that is not there, and writes nothing
    source = tmp_path / "a.txt"
    source.write_text("some text to prepare")
    assert main(["prepare", str(source), "--out", "x", "--data-dir", "s3://no-such-bucket/x"]) == 1


@contextlib.contextmanager
def _authenticating(store: ObjectStore) -> Iterator[None]:
    """moto checks signatures from the next request on (an unknown key is refused)."""
    import urllib.request

    def reset(count: str) -> None:
        request = urllib.request.Request(
            f"{store.endpoint}/moto-api/reset-auth",
            data=count.encode(),
            headers={"Content-Type": "text/plain"},
        )
        with urllib.request.urlopen(request, timeout=10):
            pass

    reset("0")
    try:
        yield
    finally:
        reset("inf")


def test_wrong_credentials_are_refused_saying_so_and_no_secret_is_shown(
    store: ObjectStore, prepared: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong_secret = "wrong-secret-that-must-not-leak"
    with pytest.MonkeyPatch.context() as patch, _authenticating(store):
        patch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY0000")
        patch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
        server = _serve(f"s3://{BUCKET}/team", tmp_path / "cache")
        try:
            with Client(server.target) as client, pytest.raises(PermissionDeniedError) as raised:
                next(iter(client.stream_batches(corpus="books", batch_size=1, max_length=4)))
        finally:
            server.stop()
    message = str(raised.value)
    assert "access denied" in message
    assert "InvalidAccessKeyId" in message
    assert "AWS_ACCESS_KEY_ID" in message  # says where credentials come from
    for secret in (wrong_secret, SECRET):
        assert secret not in message
        assert all(secret not in record.getMessage() for record in caplog.records)


def test_a_shard_that_does_not_match_its_manifest_is_never_served(
    store: ObjectStore, inputs: list[Path], tmp_path: Path
) -> None:
    prefix = "tampered"
    arguments = ["prepare", str(inputs[0]), "--out", "books", "--data-dir", f"s3://{BUCKET}/{prefix}"]
    assert main([*arguments, "--shard-size", SHARD_SIZE]) == 0
    s3 = store.client()
    key = sorted(
        item["Key"]
        for item in s3.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/")["Contents"]
        if item["Key"].endswith(".tokens")
    )[0]
    body = bytearray(s3.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    body[10] ^= 0xFF  # same size, one token changed
    s3.put_object(Bucket=BUCKET, Key=key, Body=bytes(body))
    server = _serve(f"s3://{BUCKET}/{prefix}", tmp_path / "cache")
    try:
        with Client(server.target) as client, pytest.raises(DataLossError) as raised:
            list(client.stream_batches(corpus="books", batch_size=1, max_length=4, shuffle=False))
    finally:
        server.stop()
    assert key in str(raised.value)
    assert "does not match the manifest" in str(raised.value)
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}/books.json")["Body"].read())
    (entry,) = [shard for shard in manifest["shards"] if key.endswith(shard["file"])]
    cached = {path.stem for path in (tmp_path / "cache" / "shards").glob("*.shard")}
    assert entry["sha256"] not in cached  # nothing unverified is kept
    assert hashlib.sha256(body).hexdigest() not in cached


def test_the_object_store_going_away_mid_epoch_loses_and_repeats_no_window(
    store: ObjectStore, prepared: Path, tmp_path: Path
) -> None:
    """The store stops while the stream needs shards it has not cached (the cache holds two), and
    comes back a moment later: the stream recovers or fails UNAVAILABLE and the client resumes
    from its cursor; either way every window arrives exactly once."""
    tokens = prepared_tokens(prepared, "books")
    server = _serve(f"s3://{BUCKET}/team", tmp_path / "cache", cache_size=str(2 * 4096))
    received: list[list[int]] = []
    try:
        with Client(server.target, timeout=120) as client:
            stream = client.stream_batches(
                corpus="books", batch_size=2, max_length=16, stride=16, shuffle=False
            )
            for number, batch in enumerate(stream):
                received += batch.inputs.tolist()
                if number == 20:
                    store.stop()
                    threading.Timer(1.5, store.restart).start()
    finally:
        server.stop()
        for _ in range(50):  # the restart may still be on its way
            with contextlib.suppress(Exception):
                store.client().head_bucket(Bucket=BUCKET)
                break
            time.sleep(0.1)
    expected = [tokens[i : i + 16].tolist() for i in range(0, len(tokens) - 16, 16)]
    assert len(received) == len(expected)
    assert received == expected


def test_prepare_appends_new_shards_to_an_object_storage_corpus(
    store: ObjectStore, inputs: list[Path], tmp_path: Path
) -> None:
    url = f"s3://{BUCKET}/appended"
    first = ["prepare", str(inputs[0]), "--out", "books", "--data-dir", url, "--shard-size", SHARD_SIZE]
    assert main(first) == 0
    s3 = store.client()
    before = {
        item["Key"]: item["ETag"]
        for item in s3.list_objects_v2(Bucket=BUCKET, Prefix="appended/")["Contents"]
    }
    assert main([*first[:1], *map(str, inputs[1:]), *first[2:], "--append"]) == 0
    after = {
        item["Key"]: item["ETag"]
        for item in s3.list_objects_v2(Bucket=BUCKET, Prefix="appended/")["Contents"]
    }
    # The existing shards are untouched; only the manifest changed, and new shards came.
    assert {key: tag for key, tag in after.items() if key in before and not key.endswith(".json")} == {
        key: tag for key, tag in before.items() if not key.endswith(".json")
    }
    assert len(after) > len(before)
    local = tmp_path / "local"
    assert main(["prepare", *map(str, inputs), "--out", "books", "--data-dir", str(local)]) == 0
    server = _serve(url, tmp_path / "cache")
    try:
        with Client(server.target) as client:
            got = [
                b.inputs.tolist()
                for b in client.stream_batches(
                    corpus="books", batch_size=1, max_length=64, stride=64, shuffle=False
                )
            ]
    finally:
        server.stop()
    expected = prepared_tokens(local, "books")
    assert got == [[expected[i : i + 64].tolist()] for i in range(0, len(expected) - 64, 64)]


def test_urls_are_shown_without_their_credentials() -> None:
    from embedserve.server.core.storage import redact

    assert redact("s3://KEY:SECRET@bucket/prefix") == "s3://bucket/prefix"
    assert redact("s3://bucket/prefix") == "s3://bucket/prefix"
