"""Sharded corpora: windows, shuffle, ranks, epochs and cursors are defined over the concatenation
of the shards, so the same text prepared as one shard or as many streams the same batches; an
append adds shards without touching the old ones, readers see the old manifest or the new one,
and a cursor of the old corpus is refused with SOURCE_CHANGED."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from embedserve.client import AsyncClient, FailedPreconditionError
from embedserve.server import ServerConfig
from embedserve.server.core import InvalidInput, Tokenizer, load_gpt2_tokenizer
from embedserve.server.core.corpus import CorpusStore
from embedserve.server.core.limits import RequestLimits
from embedserve.server.core.manifest import read_manifest
from embedserve.server.core.prepared import prepare_corpus
from embedserve.server.core.storage import LocalStorage
from embedserve.server.core.stream_plan import StreamRequest, StreamSource, plan_stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import start_server
from .corpus_files import document_starts, prepared_tokens

TEXTS = [
    "I HAD always thought Jack Gisburn rather a cheap genius--though a good fellow enough. " * 7,
    "Ünïcödé text, 数字 123, and a literal <|endoftext|> inside a document.",
    "",
    "Short.",
    "It was no great surprise to me to hear that, in the height of his glory, he had dropped his "
    "painting, married a rich widow, and established himself in a villa on the Riviera. " * 5,
]
LIMITS = RequestLimits(
    max_message_bytes=1 << 24,
    max_tokens_per_request=1 << 20,
    max_texts_per_request=64,
    max_batch_size=64,
    max_queries_per_request=10,
    max_terms_per_request=10,
    max_results_per_request=10,
)


class _Model:
    vocab_size = 50257
    dim = 4
    context_length = 1024


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_gpt2_tokenizer(None, {})


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory, tokenizer: Tokenizer) -> Path:
    """The same documents as one shard ("one"), as shards of 7 tokens ("many"), and prepared in
    two parts, the second appended ("appended")."""
    folder = tmp_path_factory.mktemp("corpora")
    inputs = []
    for number, text in enumerate(TEXTS):
        path = folder / f"doc-{number}.txt"
        path.write_text(text)
        inputs.append(path)
    data = folder / "data"
    prepare_corpus(inputs, "one", data, tokenizer)
    prepare_corpus(inputs, "many", data, tokenizer, shard_bytes=14)
    prepare_corpus(inputs[:2], "appended", data, tokenizer, shard_bytes=30)
    prepare_corpus(inputs[2:], "appended", data, tokenizer, shard_bytes=30, append=True)
    return data


def test_the_corpora_hold_the_same_tokens_and_documents(corpora: Path) -> None:
    one = prepared_tokens(corpora, "one")
    assert len(read_manifest(LocalStorage(corpora), "many").shards) > 20
    for name in ("many", "appended"):
        np.testing.assert_array_equal(prepared_tokens(corpora, name), one)
        assert document_starts(corpora, name) == document_starts(corpora, "one")
    assert len(document_starts(corpora, "one")) == len(TEXTS)


def _batches(store: CorpusStore, name: str, request: StreamRequest) -> list[tuple[Any, ...]]:
    source = StreamSource(store.open(name), "gpt2", 50257)
    plan = plan_stream(request, source, limits=LIMITS, model=_Model(), embeddings_itemsize=4)
    return [
        (batch.epoch, batch.index, *(window.tolist() for window in plan.windows(batch)))
        for batch in plan.batches()
    ]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    max_length=st.integers(1, 40),
    stride=st.integers(1, 40),
    batch_size=st.integers(1, 6),
    shuffle=st.booleans(),
    seed=st.integers(0, 2**64 - 1),
    drop_last=st.booleans(),
    world=st.integers(1, 3).flatmap(lambda size: st.tuples(st.just(size), st.integers(0, size - 1))),
    epoch=st.integers(0, 3),
    epochs=st.integers(0, 2),
)
def test_one_shard_or_many_stream_identical_batches(
    corpora: Path,
    tokenizer: Tokenizer,
    max_length: int,
    stride: int,
    batch_size: int,
    shuffle: bool,
    seed: int,
    drop_last: bool,
    world: tuple[int, int],
    epoch: int,
    epochs: int,
) -> None:
    store = CorpusStore(corpora, tokenizer)
    world_size, rank = world
    request = StreamRequest(
        max_length=max_length,
        stride=stride,
        batch_size=batch_size,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        epoch=epoch,
        epochs=epochs,
        rank=rank,
        world_size=world_size,
    )
    try:
        expected = _batches(store, "one", request)
    except Exception as error:  # a setting the corpus cannot serve is refused the same way
        with pytest.raises(type(error)):
            _batches(store, "many", request)
        return
    assert _batches(store, "many", request) == expected
    assert _batches(store, "appended", request) == expected


def test_an_append_leaves_the_existing_shards_alone_and_readers_see_whole_versions(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    first, more = tmp_path / "first.txt", tmp_path / "more.txt"
    first.write_text(TEXTS[0] + TEXTS[4])
    more.write_text(TEXTS[4])
    data = tmp_path / "data"
    prepare_corpus([first], "books", data, tokenizer, shard_bytes=64)
    shards = {path: path.read_bytes() for path in (data / "books.shards").iterdir()}
    inodes = {path: path.stat().st_ino for path in shards}
    store = CorpusStore(data, tokenizer)
    seen: set[int] = set()
    failures: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                tokens = store.tokens("books")  # a whole version: every shard it lists is there
                seen.add(len(tokens))
            except BaseException as error:
                failures.append(error)
                return

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(5):
            prepare_corpus([more], "books", data, tokenizer, shard_bytes=64, append=True)
    finally:
        stop.set()
        reader.join()
    assert not failures
    assert len(seen) >= 2  # it read more than one version, each complete
    for path, content in shards.items():  # the first shards were never rewritten
        assert path.read_bytes() == content
        assert path.stat().st_ino == inodes[path]
    manifest = read_manifest(LocalStorage(data), "books")
    assert manifest.generation == 6
    all_at_once = prepare_corpus([first, *[more] * 5], "together", data, tokenizer)
    np.testing.assert_array_equal(prepared_tokens(data, "books"), prepared_tokens(data, "together"))
    assert all_at_once.identity != manifest.identity  # another sharding: another identity


def test_a_cursor_of_a_corpus_appended_to_since_is_refused_with_source_changed(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    first = tmp_path / "first.txt"
    first.write_text(TEXTS[0] * 3)
    data = tmp_path / "data"
    prepare_corpus([first], "books", data, tokenizer, shard_bytes=200)
    running = start_server(ServerConfig(port=0, device="cpu", word_vectors="none", data_dir=str(data), dim=8))
    spec: dict[str, Any] = {"batch_size": 2, "max_length": 8, "stride": 8, "shuffle": True, "seed": 4}

    async def run() -> None:
        async with AsyncClient(running.target) as client:
            stream = client.stream_batches(corpus="books", **spec)
            batch = await anext(stream)
            await stream.aclose()
            resumed = client.stream_batches(corpus="books", cursor=batch.cursor, **spec)
            await anext(resumed)  # before the append the cursor resumes
            await resumed.aclose()
            await asyncio.to_thread(prepare_corpus, [first], "books", data, tokenizer, append=True)
            with pytest.raises(FailedPreconditionError) as refused:
                await anext(client.stream_batches(corpus="books", cursor=batch.cursor, **spec))
            assert refused.value.reason == "SOURCE_CHANGED"
            assert "changed since the cursor was made" in refused.value.details

    try:
        asyncio.run(run())
    finally:
        running.stop()


def test_appends_at_once_both_land_and_a_failed_one_leaves_nothing(
    tmp_path: Path, tokenizer: Tokenizer
) -> None:
    parts = []
    for number, text in enumerate(TEXTS):
        path = tmp_path / f"part-{number}.txt"
        path.write_text(text)
        parts.append(path)
    data = tmp_path / "data"
    prepare_corpus(parts[:1], "books", data, tokenizer, shard_bytes=16)
    # Two appends at once: the lock on the corpus makes one wait for the other, so neither's
    # documents are lost (the order between them is whichever came first).
    appends = [
        threading.Thread(
            target=prepare_corpus, args=([part], "books", data, tokenizer), kwargs={"append": True}
        )
        for part in (parts[1], parts[3])
    ]
    for thread in appends:
        thread.start()
    for thread in appends:
        thread.join()
    manifest = read_manifest(LocalStorage(data), "books")
    assert manifest.generation == 3
    assert manifest.documents == 3
    before = sorted(path.name for path in (data / "books.shards").iterdir())
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    first = tmp_path / "many.jsonl"  # read, encoded and partly written before the broken file fails
    first.write_text(
        "".join(f'{{"text": "{number} fine words, {"more " * 20_000}"}}\n' for number in range(60))
    )
    with pytest.raises(InvalidInput, match=r"broken\.jsonl:2"):
        prepare_corpus([first, broken], "books", data, tokenizer, shard_bytes=1 << 16, append=True)
    assert sorted(path.name for path in (data / "books.shards").iterdir()) == before  # no orphans
    assert read_manifest(LocalStorage(data), "books") == manifest
