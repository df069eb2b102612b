"""The client API, run against AsyncClient and the synchronous Client alike (see client_twins.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import grpc
import numpy as np
import numpy.typing as npt
import pytest
from embedserve.client import (
    AsyncClient,
    BatchSpec,
    InvalidArgumentError,
    NotFoundError,
    Query,
    WordNotFoundError,
)
from embedserve.server import ServerConfig
from embedserve.server.app import load_components

from .client_twins import CLIENT_KINDS, open_client
from .conftest import ServerThread

WORDS = [f"w{index}" for index in range(200)]


@pytest.fixture(params=CLIENT_KINDS)
async def client(request: pytest.FixtureRequest, server: ServerThread) -> AsyncIterator[AsyncClient]:
    async with open_client(request.param, server.target) as opened:
        yield opened


async def test_each_client_tokenizes_embeds_and_streams(client: AsyncClient) -> None:
    ids = await client.tokenize("Hello, world")
    assert ids == [15496, 11, 995]
    assert await client.tokenize_batch(["a", "b c"]) == [[64], [65, 269]]
    assert await client.detokenize(ids) == "Hello, world"
    vectors = await client.embed([ids, ids])
    assert vectors.shape == (2, 3, 256)
    streamed = [embedded async for embedded in client.embed_stream([ids, ids[:1]])]
    np.testing.assert_array_equal(streamed[0], vectors[0])
    batches = client.stream_batches(text="word " * 500, batch_size=4, max_length=8, stride=8, shuffle=False)
    first = await anext(batches)
    assert first.inputs.shape == (4, 8)
    await batches.aclose()
    assert (await client.info()).dim == 256
    with pytest.raises(InvalidArgumentError) as raised:
        await client.embed([99999])
    assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(NotFoundError):
        _ = [batch async for batch in client.stream_batches(corpus="absent.txt")]


async def test_a_batch_spec_and_its_keywords_give_the_same_stream(client: AsyncClient) -> None:
    text = " ".join(f"token{i % 31} x {i}" for i in range(400))
    spec = BatchSpec(batch_size=3, max_length=8, stride=5, seed=4, epochs=2)
    by_keywords = [
        batch
        async for batch in client.stream_batches(
            text=text, batch_size=3, max_length=8, stride=5, seed=4, epochs=2
        )
    ]
    by_spec = [batch async for batch in client.stream_batches(text=text, spec=spec)]
    # Keywords change the fields of a spec given with them.
    overridden = [
        batch async for batch in client.stream_batches(text=text, spec=spec.replace(seed=0), seed=4)
    ]
    assert len(by_keywords) > 4
    assert {batch.epoch for batch in by_keywords} == {0, 1}
    for got in (by_spec, overridden):
        assert [(batch.index, batch.epoch, batch.cursor) for batch in got] == [
            (batch.index, batch.epoch, batch.cursor) for batch in by_keywords
        ]
        for batch, expected in zip(got, by_keywords, strict=True):
            np.testing.assert_array_equal(batch.inputs, expected.inputs)
            np.testing.assert_array_equal(batch.targets, expected.targets)
    with pytest.raises(TypeError):
        client.stream_batches(text=text, spec=spec, batch_sise=3)  # type: ignore[call-arg]


# Word vectors: a small random model, so the expected answers come from numpy here.


@pytest.fixture(scope="module")
def vectors() -> npt.NDArray[np.float32]:
    return np.random.default_rng(11).standard_normal((len(WORDS), 8)).astype(np.float32)


@pytest.fixture(scope="module")
def vectors_server(
    tmp_path_factory: pytest.TempPathFactory, vectors: npt.NDArray[np.float32]
) -> Iterator[ServerThread]:
    folder = tmp_path_factory.mktemp("small-vectors")
    source = folder / "vectors.txt"
    source.write_text(
        "".join(
            f"{word} " + " ".join(repr(float(v)) for v in row) + "\n"
            for word, row in zip(WORDS, vectors, strict=True)
        )
    )
    config = ServerConfig(
        port=0, vocab_size=6, dim=3, device="cpu", word_vectors=str(source), cache_dir=folder / "cache"
    )
    components = load_components(config)
    running = ServerThread(config, components)  # which starts loading the vectors
    assert components.word_vectors.wait(60), "the word vectors did not load"
    assert components.word_vectors.model is not None
    yield running
    running.stop()
    components.close()


@pytest.fixture(params=CLIENT_KINDS)
async def vectors_client(
    request: pytest.FixtureRequest, vectors_server: ServerThread
) -> AsyncIterator[AsyncClient]:
    async with open_client(request.param, vectors_server.target) as opened:
        yield opened


def _ranked(vectors: npt.NDArray[np.float32], word: str, topn: int) -> list[str]:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    scores = unit @ unit[WORDS.index(word)]
    order = [index for index in np.argsort(-scores) if WORDS[index] != word]
    return [WORDS[index] for index in order[:topn]]


async def test_each_client_answers_word_vector_queries(
    vectors_client: AsyncClient, vectors: npt.NDArray[np.float32]
) -> None:
    wv = vectors_client.word_vectors
    info = await wv.info()
    assert (info.vocab_size, info.dim) == (len(WORDS), 8)
    np.testing.assert_allclose(await wv.get_vector("w7"), vectors[7], rtol=1e-6)
    ranked = await wv.most_similar(positive=["w3"], topn=5)
    assert [word for word, _ in ranked] == _ranked(vectors, "w3", 5)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert ranked[0][1] == pytest.approx(float(unit[3] @ unit[WORDS.index(ranked[0][0])]), abs=1e-5)
    assert await wv.similar_by_word("w3", topn=5) == ranked
    assert await wv.similarity("w1", "w2") == pytest.approx(float(unit[1] @ unit[2]), abs=1e-5)
    assert await wv.distance("w1", "w2") == pytest.approx(1 - float(unit[1] @ unit[2]), abs=1e-5)
    batch = await wv.most_similar_batch([Query(positive=["w3"], topn=5), Query(positive=["w9"], topn=2)])
    # A batch is scanned together: the same words, the scores within float32 rounding.
    assert [word for word, _ in batch[0]] == [word for word, _ in ranked]
    assert [score for _, score in batch[0]] == pytest.approx([score for _, score in ranked], abs=1e-5)
    assert [word for word, _ in batch[1]] == _ranked(vectors, "w9", 2)
    with pytest.raises(WordNotFoundError) as missing:
        await wv.get_vector("absent")
    assert isinstance(missing.value, KeyError)
