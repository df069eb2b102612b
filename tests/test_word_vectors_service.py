"""WordVectors over gRPC: the notebook's questions on the GloVe default, batching, health, errors, CLI."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from embedserve.client import (
    AsyncClient,
    Client,
    EmbedServeError,
    InvalidArgumentError,
    NotFoundError,
    Query,
    UnavailableError,
    WordNotFoundError,
)
from embedserve.client._word_vectors import WordVectorsInfo, _packed, _query_chunks
from embedserve.client.tensor import to_tensor_pb
from embedserve.server.app import Components
from embedserve.server.cli import main
from embedserve.server.core.limits import result_bound
from embedserve.server.core.word_vector_slot import WordVectorSlot
from embedserve.v1 import word_vectors_pb2, word_vectors_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import ServerThread, requires_glove
from .word_vector_cases import TEST_DATA

pytestmark = requires_glove


@pytest.fixture(scope="module")
def loaded(server: ServerThread, default_components: Components) -> ServerThread:
    assert default_components.word_vectors.wait(120), "GloVe did not load"
    return server


async def test_the_notebooks_questions_on_glove(loaded: ServerThread) -> None:
    async with AsyncClient(loaded.target) as client:
        wv = client.word_vectors
        info = await wv.info()
        assert (info.model, info.vocab_size, info.dim) == ("glove-6b-50d", 400000, 50)
        computer = await wv.get_vector("computer")
        assert computer.shape == (50,)
        assert computer.dtype == np.float32
        analogy = await wv.most_similar(positive=["king", "woman"], negative=["man"], topn=10)
        assert analogy[0][0] == "queen"
        assert len(analogy) == 10
        assert (await wv.most_similar_cosmul(positive=["king", "woman"], negative=["man"]))[0][0] == "queen"
        assert 0.5 < await wv.similarity("woman", "man") < 1
        assert await wv.distance("woman", "man") == pytest.approx(
            1 - await wv.similarity("woman", "man"), abs=1e-6
        )
        woman, man = await wv.get_vector("woman"), await wv.get_vector("man")
        assert await wv.euclidean_distance("woman", "man") == pytest.approx(
            float(np.linalg.norm(woman - man)), 1e-6
        )
        assert await wv.doesnt_match(["breakfast", "cereal", "dinner", "lunch"]) == "cereal"
        by_vector = await wv.most_similar(positive=[computer], topn=3)
        assert by_vector[0][0] == "computer"
        weighted = await wv.most_similar(positive=[("king", 2.0), "woman"], negative=["man"], topn=3)
        assert len(weighted) == 3


async def test_batch_forms_and_concurrent_calls_agree(loaded: ServerThread) -> None:
    words = ["france", "paris", "tokyo", "river", "music", "python", "green", "seven"]
    async with AsyncClient(loaded.target) as client:
        wv = client.word_vectors
        single = [await wv.most_similar(positive=[w], topn=5) for w in words]
        batch = await wv.most_similar_batch([Query(positive=[w], topn=5) for w in words])
        concurrent = await asyncio.gather(*(wv.most_similar(positive=[w], topn=5) for w in words))
        for a, b, c in zip(single, batch, concurrent, strict=True):
            assert [w for w, _ in a] == [w for w, _ in b] == [w for w, _ in c]
            np.testing.assert_allclose([s for _, s in a], [s for _, s in c], atol=1e-6)
        similarities = await wv.similarity_batch([("woman", "man"), ("king", "queen")])
        assert similarities[0] == pytest.approx(await wv.similarity("woman", "man"), abs=1e-7)
    async with grpc.aio.insecure_channel(loaded.target) as channel:
        call = word_vectors_pb2_grpc.WordVectorsServiceStub(channel).MostSimilar(
            word_vectors_pb2.MostSimilarRequest(
                queries=[word_vectors_pb2.SimilarityQuery(positive=[word_vectors_pb2.QueryTerm(word="king")])]
            )
        )
        assert (await call).result_counts == [10]
        trailing = dict(await call.trailing_metadata())
    # The coalesced search's timings, like Embed's: time waiting for a batch, time that batch ran.
    assert float(trailing["embedserve-queue-ms"]) >= 0
    assert 0 < float(trailing["embedserve-compute-ms"]) <= float(trailing["embedserve-server-ms"])


async def test_errors_name_every_missing_word(loaded: ServerThread) -> None:
    async with AsyncClient(loaded.target) as client:
        wv = client.word_vectors
        with pytest.raises(WordNotFoundError, match='"qwzx1", "qwzx2"') as raised:
            await wv.most_similar(positive=["king", "qwzx1"], negative=["qwzx2"])
        assert isinstance(raised.value, KeyError)
        assert isinstance(raised.value, NotFoundError)
        assert raised.value.code is grpc.StatusCode.NOT_FOUND
        assert raised.value.missing_words == ["qwzx1", "qwzx2"]  # from the status details
        with pytest.raises(KeyError):
            await wv.get_vector("qwzx1")
        vectors, missing = await wv.get_vectors(["king", "qwzx1"])
        assert missing == ["qwzx1"]
        assert not vectors[1].any()
        with pytest.raises(InvalidArgumentError, match="at least one positive or negative term"):
            await wv.most_similar()
        with pytest.raises(InvalidArgumentError, match="topn must be >= 0"):
            await wv.most_similar(positive=["king"], topn=-1)
        with pytest.raises(InvalidArgumentError, match="--max-topn"):
            await wv.most_similar(positive=["king"], topn=10**6)
        with pytest.raises(InvalidArgumentError, match=r"vectors are \[50\]"):
            await wv.most_similar(positive=[np.ones(3)])
        with pytest.raises(InvalidArgumentError, match="queries is empty"):
            await wv.most_similar_batch([])
        assert await wv.most_similar(positive=["king"], topn=0) == []


def _per_query_message(query: Query) -> word_vectors_pb2.SimilarityQuery:
    """A query as one SimilarityQuery message (the form grpcurl users write)."""

    def terms(values: Any) -> list[word_vectors_pb2.QueryTerm]:
        built = []
        for value in values or []:
            item, weight = value if isinstance(value, tuple) else (value, None)
            term = word_vectors_pb2.QueryTerm()
            if isinstance(item, str):
                term.word = item
            else:
                term.vector.CopyFrom(to_tensor_pb(np.asarray(item, np.float32)))
            if weight is not None:
                term.weight = weight
            built.append(term)
        return built

    message = word_vectors_pb2.SimilarityQuery(
        positive=terms(query.positive),
        negative=terms(query.negative),
        topn=query.topn,
        method=word_vectors_pb2.SIMILARITY_METHOD_COS_MUL
        if query.cosmul
        else word_vectors_pb2.SIMILARITY_METHOD_COS_ADD,
    )
    if query.restrict_vocab is not None:
        message.restrict_vocab = query.restrict_vocab
    return message


async def test_packed_and_per_query_requests_answer_alike(loaded: ServerThread) -> None:
    """The SDK's packed columns and one message per query are two spellings of the same queries:
    words, raw vectors, weights, negative-only, 3CosMul, restrict_vocab and topn 0 in one request."""
    async with AsyncClient(loaded.target) as client:
        france: Any = await client.word_vectors.get_vector("france")
    queries: list[Query] = [
        Query(positive=["king", "woman"], negative=["man"], topn=5),
        Query(positive=[("king", 2.0), "woman"], negative=[("man", -0.5)], topn=3),
        Query(positive=[france, "berlin"], negative=["paris"], topn=4),
        Query(positive=["france", "berlin"], negative=["paris"], topn=3, cosmul=True),
        Query(positive=["computer"], topn=5, restrict_vocab=1000),
        Query(positive=["computer"], topn=0),
        Query(negative=["king"], topn=2),
        Query(positive=[france * 2, "germany"], topn=2, cosmul=True),
    ]
    async with grpc.aio.insecure_channel(loaded.target) as channel:
        stub = word_vectors_pb2_grpc.WordVectorsServiceStub(channel)
        packed = await stub.MostSimilar(word_vectors_pb2.MostSimilarRequest(packed=_packed(queries)))
        one_each = await stub.MostSimilar(
            word_vectors_pb2.MostSimilarRequest(queries=[_per_query_message(q) for q in queries])
        )
    assert list(packed.result_counts) == [5, 3, 4, 3, 5, 0, 2, 2]
    assert packed == one_each
    assert packed.words[0] == "queen"
    assert "king" not in packed.words[5:8]  # a weighted input is still left out of its results


async def test_packed_queries_that_do_not_add_up_are_invalid_argument(loaded: ServerThread) -> None:
    vector = np.ones((1, 50), np.float32)
    good: dict[str, Any] = {
        "words": ["king", "woman", "man"],
        "positive_counts": [2],
        "negative_counts": [1],
        "topn": [3],
    }

    def packed(**change: Any) -> word_vectors_pb2.PackedQueries:
        return word_vectors_pb2.PackedQueries(**{**good, **change})

    cos_mul = word_vectors_pb2.SIMILARITY_METHOD_COS_MUL
    cases: list[tuple[str, dict[str, Any]]] = [
        ("negative_counts has 2 values for 1 queries", {"negative_counts": [1, 0]}),
        ("restrict_vocab has 2 values for 1 queries", {"restrict_vocab": [0, 5]}),
        ("methods has 2 values for 1 queries", {"methods": [1, 1]}),
        ("2 words for 3 terms", {"words": ["king", "woman"]}),
        ("term counts must be >= 0", {"positive_counts": [4], "negative_counts": [-1]}),
        (
            "query 1: a query needs at least one positive or negative term",
            {"positive_counts": [3, 0], "negative_counts": [0, 0], "topn": [3, 3]},
        ),
        (
            "3CosMul needs at least one positive term",
            {"positive_counts": [0], "negative_counts": [3], "methods": [cos_mul]},
        ),
        ("unknown similarity method 7", {"methods": [7]}),
        ("weights has 1 values for 3 terms", {"weights": [1.0]}),
        ("weights apply to 3CosAdd only", {"weights": [math.nan, math.nan, 2.0], "methods": [cos_mul]}),
        ("a weight must be finite", {"weights": [math.inf, math.nan, math.nan]}),
        ("query 0: topn must be >= 0, got -1", {"topn": [-1]}),
        (
            "query 1: topn 10001 is over the server's --max-topn 10000",
            {"topn": [3, 10001], "positive_counts": [2, 1], "negative_counts": [0, 0]},
        ),
        ("4097 queries are over the server's --max-queries-per-request 4096", {"topn": [1] * 4097}),
        (
            "65537 terms are over the server's --max-terms-per-request 65536",
            {"words": ["king"] * 65537, "positive_counts": [65537], "negative_counts": [0]},
        ),
        ("restrict_vocab must be >= 0", {"restrict_vocab": [-5]}),
        (
            r"raw vectors of shape \[0, 50\] for 1 raw-vector terms",
            {"words": ["", "woman", "man"], "vector_terms": [0]},
        ),
        (
            r"raw vectors of shape \[1, 3\] for 1 raw-vector terms; this model's vectors are \[50\]",
            {
                "words": ["", "woman", "man"],
                "vector_terms": [0],
                "vectors": to_tensor_pb(np.ones((1, 3), np.float32)),
            },
        ),
        (
            "vector_terms must be increasing indexes below 3",
            {"words": ["", "woman", "man"], "vector_terms": [3], "vectors": to_tensor_pb(vector)},
        ),
        (
            "vector_terms must be increasing",
            {
                "words": ["", "", "man"],
                "vector_terms": [1, 0],
                "vectors": to_tensor_pb(np.ones((2, 50), np.float32)),
            },
        ),
        ("a raw-vector term has a word", {"vector_terms": [0], "vectors": to_tensor_pb(vector)}),
        (
            "NaN or infinite",
            {"words": ["", "woman", "man"], "vector_terms": [0], "vectors": to_tensor_pb(vector * np.nan)},
        ),
        (
            "float32 or float16",
            {
                "words": ["", "woman", "man"],
                "vector_terms": [0],
                "vectors": to_tensor_pb(np.ones((1, 50), np.int32)),
            },
        ),
    ]
    async with grpc.aio.insecure_channel(loaded.target) as channel:
        stub = word_vectors_pb2_grpc.WordVectorsServiceStub(channel)
        assert (await stub.MostSimilar(word_vectors_pb2.MostSimilarRequest(packed=packed()))).words[
            0
        ] == "queen"
        both = word_vectors_pb2.MostSimilarRequest(
            queries=[_per_query_message(Query(positive=["king"]))], packed=packed()
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.MostSimilar(both)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "queries or packed, not both" in (raised.value.details() or "")
        for message, change in cases:
            request = word_vectors_pb2.MostSimilarRequest(packed=packed(**change))
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.MostSimilar(request)
            assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT, message
            assert re.search(message, raised.value.details() or ""), (message, raised.value.details())
        # A term's word may be "" where the vocabulary has no such word: NOT_FOUND like any other.
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.MostSimilar(
                word_vectors_pb2.MostSimilarRequest(packed=packed(words=["", "woman", "man"]))
            )
        assert raised.value.code() is grpc.StatusCode.NOT_FOUND
        one_each = [_per_query_message(Query(positive=["king"], topn=1)) for _ in range(4)]
        one_each[3].positive[0].weight = math.nan
        with pytest.raises(grpc.aio.AioRpcError, match="a weight must be finite"):
            await stub.MostSimilar(word_vectors_pb2.MostSimilarRequest(queries=one_each))
        one_each = [_per_query_message(Query(positive=["king"] * 16400, topn=1)) for _ in range(4)]
        with pytest.raises(grpc.aio.AioRpcError, match="65600 terms are over"):
            await stub.MostSimilar(word_vectors_pb2.MostSimilarRequest(queries=one_each))
    async with AsyncClient(loaded.target) as client:
        # float16 raw vectors answer as the same values in float32 (here exactly representable).
        halves = np.round(np.linspace(-1, 1, 50) * 64) / 64
        in_float16 = word_vectors_pb2.MostSimilarRequest(
            packed=word_vectors_pb2.PackedQueries(
                words=[""],
                positive_counts=[1],
                negative_counts=[0],
                topn=[5],
                vector_terms=[0],
                vectors=to_tensor_pb(halves[None].astype(np.float16)),
            )
        )
        async with grpc.aio.insecure_channel(loaded.target) as channel:
            reply = await word_vectors_pb2_grpc.WordVectorsServiceStub(channel).MostSimilar(in_float16)
        expected = await client.word_vectors.similar_by_vector(halves.astype(np.float32), topn=5)
        assert list(reply.words) == [w for w, _ in expected]
        with pytest.raises(ValueError, match="raw vectors of different shapes"):
            await client.word_vectors.most_similar(positive=[np.ones(50), np.ones(3)])
        with pytest.raises(InvalidArgumentError, match="weights apply to 3CosAdd only"):
            await client.word_vectors.most_similar_cosmul(positive=["king"], negative=[("man", 2.0)])


async def test_overflowing_weights_and_vectors_are_invalid_argument(loaded: ServerThread) -> None:
    """Issue 31: a finite weight of 1e308 answered OK with NaN scores (and numpy warned of
    overflows); weights and raw vectors whose products leave float32's range are INVALID_ARGUMENT
    naming the field as the request wrote it, in both forms, and what stays in range answers
    without a warning."""
    pb = word_vectors_pb2
    float16_max = np.full(50, 65504, np.float16)  # float16's largest: length 4.6e5 in 50 dimensions

    def vector(values: Any, weight: float | None = None) -> word_vectors_pb2.QueryTerm:
        term = pb.QueryTerm(vector=to_tensor_pb(values))
        if weight is not None:
            term.weight = weight
        return term

    def packed(words: list[str], **columns: Any) -> word_vectors_pb2.MostSimilarRequest:
        counts = {"positive_counts": [len(words)], "negative_counts": [0], "topn": [3]}
        return pb.MostSimilarRequest(packed=pb.PackedQueries(words=words, **{**counts, **columns}))

    king = pb.QueryTerm(word="king")
    cos_mul = pb.SIMILARITY_METHOD_COS_MUL
    refused = [
        (
            "queries[1].positive[0].weight",
            pb.MostSimilarRequest(
                queries=[
                    pb.SimilarityQuery(positive=[king]),
                    pb.SimilarityQuery(positive=[pb.QueryTerm(word="queen", weight=1e308)]),
                ]
            ),
        ),
        ("packed.weights[1]", packed(["king", "woman"], weights=[math.nan, 1e308])),
        (
            "packed.vectors[1]",
            packed(["", ""], vector_terms=[0, 1], vectors=to_tensor_pb(np.full((2, 50), 2e38, np.float32))),
        ),
        (
            "queries[0].negative[1].vector",
            pb.MostSimilarRequest(
                queries=[
                    pb.SimilarityQuery(positive=[king], negative=[vector(np.full(50, 2e38, np.float32))] * 2)
                ]
            ),
        ),
        (
            "queries[0].positive[1].weight",
            pb.MostSimilarRequest(
                queries=[pb.SimilarityQuery(positive=[king, vector(float16_max, weight=1e35)])]
            ),
        ),
        (
            "queries[0].positive[3].vector",
            pb.MostSimilarRequest(
                queries=[pb.SimilarityQuery(positive=[vector(float16_max)] * 4, method=cos_mul)]
            ),
        ),
        (
            "packed.vectors[0]",
            packed(
                ["king", ""],
                negative_counts=[1],
                positive_counts=[1],
                vector_terms=[1],
                vectors=to_tensor_pb(np.full((1, 50), 1e38, np.float32)),
                methods=[cos_mul],
            ),
        ),
    ]
    plain = pb.MostSimilarRequest(queries=[pb.SimilarityQuery(positive=[king], topn=5)])
    heavy = pb.MostSimilarRequest(
        queries=[pb.SimilarityQuery(positive=[pb.QueryTerm(word="king", weight=1e30)], topn=5)]
    )
    in_range = pb.MostSimilarRequest(
        queries=[
            pb.SimilarityQuery(positive=[king, vector(float16_max)] * 3, method=cos_mul),
            pb.SimilarityQuery(positive=[vector(np.full(50, 3e38, np.float32)), king]),
        ],
        packed=None,
    )
    with warnings.catch_warnings(record=True) as caught:  # the server runs in this process
        warnings.simplefilter("always")
        async with grpc.aio.insecure_channel(loaded.target) as channel:
            stub = word_vectors_pb2_grpc.WordVectorsServiceStub(channel)
            for field, request in refused:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await stub.MostSimilar(request)
                assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT, field
                details = raised.value.details() or ""
                assert details.startswith(f"{field}: "), (field, details)
                assert "overflow" in details
            expected = await stub.MostSimilar(plain)
            weighted = await stub.MostSimilar(heavy)
            answered = await stub.MostSimilar(in_range)
    assert [w.message for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert weighted.words == expected.words
    assert list(answered.result_counts) == [10, 10]
    assert np.isfinite(np.frombuffer(answered.scores.data, np.float32)).all()


async def test_results_are_bounded_by_max_results_per_request(loaded: ServerThread) -> None:
    """The sum over a call's queries of topn, capped by the rows each may rank: 105 queries of
    topn 10000 would have answered with 1.05M (word, score) pairs, about 2 GB of server memory."""

    def request(**query: Any) -> word_vectors_pb2.MostSimilarRequest:
        return word_vectors_pb2.MostSimilarRequest(packed=_packed([Query(positive="king", **query)] * 105))

    async with grpc.aio.insecure_channel(loaded.target) as channel:
        stub = word_vectors_pb2_grpc.WordVectorsServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.MostSimilar(request(topn=10000))
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert re.search(r"1050000 ranked results .* --max-results-per-request 1048576", str(raised.value))
        # restrict_vocab caps what a query can return, and so what it counts for.
        capped = await stub.MostSimilar(request(topn=10000, restrict_vocab=100))
        assert list(capped.result_counts) == [100] * 105  # "king" is not among them
    async with AsyncClient(loaded.target) as client:
        info = await client.word_vectors.info()
    assert (info.max_queries_per_request, info.max_terms_per_request) == (4096, 65536)
    assert info.max_results_per_request == 1 << 20


async def test_batches_over_the_servers_limits_are_split(default_components: Components) -> None:
    """The SDK asks the server's limits once and sends a larger batch as several requests, whose
    answers are the same as one query (or pair, or word) at a time."""
    assert default_components.word_vectors.wait(120), "GloVe did not load"
    config = replace(
        default_components.config,
        max_queries_per_request=3,
        max_terms_per_request=7,
        max_results_per_request=25,
    )
    server = ServerThread(config, replace(default_components, config=config))
    queries = [
        Query(positive=["king", "woman"], negative=["man"], topn=5),
        Query(positive=["paris", "germany"], negative=["france"], topn=10),
        Query(positive=["computer"], topn=10),  # 25 results so far: the next one starts a request
        Query(positive=["king"], topn=1),
        Query(positive=["a", "b", "c", "d"], negative=["e", "f"], topn=2),  # 7 terms with the last
        Query(positive=["water"], topn=3, cosmul=True),
        Query(positive=["one", "two"], topn=10000, restrict_vocab=10),  # 10 results at most
        Query(positive=["good"], topn=4),
    ]
    words = ["king", "queen", "nosuchword", "paris", "nosuchword", "berlin", "another-missing-word"]
    pairs = [("king", "queen"), ("man", "woman"), ("paris", "france"), ("cat", "dog"), ("a", "the")]
    try:
        async with AsyncClient(server.target) as client:
            vectors = client.word_vectors
            info_calls = [0]
            ask_info = vectors.info

            async def counted_info() -> WordVectorsInfo:
                info_calls[0] += 1
                return await ask_info()

            vectors.info = counted_info  # type: ignore[method-assign]
            split = await vectors.most_similar_batch(queries)
            assert len(split) == len(queries)
            for query, ranked in zip(queries, split, strict=True):
                [alone] = await vectors.most_similar_batch([query])
                assert [w for w, _ in ranked] == [w for w, _ in alone]
                # A product's blocking depends on how many queries share it: float32 rounding.
                np.testing.assert_allclose([s for _, s in ranked], [s for _, s in alone], atol=1e-6)
            got, missing = await vectors.get_vectors(words)
            assert missing == ["nosuchword", "another-missing-word"]
            for word, row in zip(words, got, strict=True):
                expected, _ = await vectors.get_vectors([word])
                np.testing.assert_array_equal(row, expected[0])
            assert await vectors.similarity_batch(pairs) == [await vectors.similarity(*p) for p in pairs]
            assert await vectors.distance_batch(pairs) == (
                [await vectors.distance(*p) for p in pairs],
                [await vectors.euclidean_distance(*p) for p in pairs],
            )
            assert info_calls == [1]
            # A single query over a limit goes alone, and the server says which limit (the SDK
            # asks the limits again, finds them unchanged, and does not resend).
            with pytest.raises(InvalidArgumentError, match="8 terms are over"):
                await vectors.most_similar_batch([queries[0], Query(positive=["king"] * 8)])
            assert info_calls == [2]
            # A failing chunk fails the batch with its own error (the rest are cancelled).
            with pytest.raises(WordNotFoundError, match="nosuchword"):
                await vectors.most_similar_batch([*queries, Query(positive="nosuchword"), *queries])
            assert info_calls == [2]
            # Limits asked before the server's changed (a restart, another replica): the refused
            # chunk makes the SDK ask again, once, and the batch goes through.
            vectors._info = replace(await vectors.info(), max_queries_per_request=1000)
            assert len(await vectors.most_similar_batch(queries)) == len(queries)
            assert info_calls == [3]
    finally:
        server.stop()


def test_query_chunks_respect_each_limit_and_keep_the_order() -> None:
    limits = WordVectorsInfo(
        model="m",
        vocab_size=1000,
        dim=2,
        source="s",
        device="cpu",
        max_topn=100,
        max_queries_per_request=3,
        max_terms_per_request=5,
        max_results_per_request=30,
    )

    def sizes(queries: list[Query], info: WordVectorsInfo = limits) -> list[int]:
        chunks = _query_chunks(queries, info)
        assert [q for chunk in chunks for q in chunk] == queries
        return [len(chunk) for chunk in chunks]

    one_term = Query(positive="a", topn=1)
    assert sizes([one_term] * 7) == [3, 3, 1]  # queries
    assert sizes([Query(positive=["a", "b"], negative="c", topn=1)] * 3) == [1, 1, 1]  # terms: 3 + 3 > 5
    assert sizes([Query(positive="a", topn=20)] * 3) == [1, 1, 1]  # results: 20 + 20 > 30
    # restrict_vocab caps a query's results, and so does the vocabulary.
    assert sizes([Query(positive="a", topn=100, restrict_vocab=10)] * 4) == [3, 1]
    assert sizes([Query(positive="a", topn=100)] * 2, replace(limits, vocab_size=15)) == [2]
    # A query over a limit by itself goes alone; a limit of 0 (not reported) is no limit.
    assert sizes([one_term, Query(positive=["a"] * 9), one_term]) == [1, 1, 1]
    assert sizes([one_term] * 7, replace(limits, max_queries_per_request=0)) == [5, 2]
    # The server's own count: topn capped by restrict_vocab (> 0) and the vocabulary; what
    # prepare() refuses (negative values) counts as nothing.
    topn = np.array([5, 50, 50, 50, -3])
    assert result_bound(topn, np.array([0, 0, 20, 500, 0]), vocab_size=30) == 5 + 30 + 20 + 30


async def test_large_requests_are_computed_off_the_event_loop(
    loaded: ServerThread, default_components: Components, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call of many terms or pairs runs in a worker thread: on the event loop, one query of
    65,536 terms held every other call for about half a second."""
    model = default_components.word_vectors.model
    calls: list[tuple[str, bool]] = []  # (method, whether it ran on the event loop's thread)

    def spied(name: str, work: Any) -> Any:
        def run(*args: Any) -> Any:
            try:
                asyncio.get_running_loop()
                calls.append((name, True))
            except RuntimeError:
                calls.append((name, False))
            return work(*args)

        return run

    for method in ("prepare", "get_vectors", "similarity", "distance", "doesnt_match"):
        monkeypatch.setattr(model, method, spied(method, getattr(model, method)))
    async with AsyncClient(loaded.target) as client:
        words = client.word_vectors
        assert (await words.most_similar(["king", "woman"], ["man"], topn=1))[0][0] == "queen"
        assert (await words.most_similar(["king"] * 300, topn=1))[0][0] == "prince"
        await words.get_vectors(["king"] * 2)
        await words.get_vectors(["king"] * 300)
        await words.similarity_batch([("woman", "man")] * 2)
        await words.similarity_batch([("woman", "man")] * 300)
        await words.distance_batch([("woman", "man")] * 2)
        await words.distance_batch([("woman", "man")] * 300)
        await words.doesnt_match(["breakfast", "cereal", "dinner", "lunch"])
        await words.doesnt_match(["breakfast", "cereal", "dinner", "lunch"] * 75)
    assert calls == [
        ("prepare", True),
        ("prepare", False),
        ("get_vectors", True),
        ("get_vectors", False),
        ("similarity", True),
        ("similarity", False),
        ("distance", True),
        ("similarity", True),  # distance's cosine part
        ("distance", False),
        ("similarity", False),
        ("doesnt_match", True),
        ("doesnt_match", False),
    ]


def test_an_analogy_evaluation_stops_when_its_call_ends(
    loaded: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A full evaluation takes seconds; a client that gives up must not leave it running."""
    questions = (TEST_DATA / "questions-words.txt").read_text() + f"\n{secrets.token_hex(8)}\n"  # uncached
    with (
        caplog.at_level(logging.INFO, logger="embedserve.server.core.word_vectors.analogies"),
        grpc.insecure_channel(loaded.target) as channel,
    ):
        stub = word_vectors_pb2_grpc.WordVectorsServiceStub(channel)
        request = word_vectors_pb2.EvaluateAnalogiesRequest(questions=questions)
        with pytest.raises(grpc.RpcError) as ended:
            stub.EvaluateAnalogies(request, timeout=0.5)
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10
        while "analogy evaluation stopped" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
    assert "analogy evaluation stopped: its call ended first" in caplog.text


def test_sync_client_and_cli(
    loaded: ServerThread, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with Client(loaded.target) as client:
        assert (
            client.word_vectors.most_similar(positive=["king", "woman"], negative=["man"], topn=1)[0][0]
            == "queen"
        )
        assert client.word_vectors.similarity("woman", "man") > 0.5
    target = ["--target", loaded.target]
    assert main(["similar", "king", "woman", "--negative", "man", "-n", "3", *target]) == 0
    assert capsys.readouterr().out.splitlines()[0].startswith("queen\t")
    assert main(["similarity", "woman", "man", *target]) == 0
    assert "similarity 0." in capsys.readouterr().out
    questions = tmp_path / "q.txt"
    questions.write_text(
        ": capital-common-countries\nAthens Greece Baghdad Iraq\nAthens Greece Bangkok Thailand\n"
    )
    assert main(["analogies", "--file", str(questions), *target]) == 0
    out = capsys.readouterr().out
    assert "capital-common-countries" in out
    assert "Total accuracy" in out
    assert main(["similar", "qwzx1", *target]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


async def test_health_is_not_serving_until_loaded_and_none_disables(default_components: Components) -> None:
    gate = threading.Event()
    real = default_components.word_vectors

    def slow_load(cancel: threading.Event) -> object:
        gate.wait(60)
        real.wait(120)
        return real.model

    slot = WordVectorSlot("glove-6b-50d", slow_load)  # type: ignore[arg-type]
    running = ServerThread(default_components.config, replace(default_components, word_vectors=slot))
    try:
        async with grpc.aio.insecure_channel(running.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            service = "embedserve.v1.WordVectorsService"
            check = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
            overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
            assert overall.status == health_pb2.HealthCheckResponse.SERVING
            async with AsyncClient(running.target) as client:
                with pytest.raises(UnavailableError, match="still loading"):
                    await client.word_vectors.info()
                gate.set()
                assert await asyncio.to_thread(slot.wait, 60)
                for _ in range(100):
                    check = await health.Check(health_pb2.HealthCheckRequest(service=service))
                    if check.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                    await asyncio.sleep(0.05)
                assert check.status == health_pb2.HealthCheckResponse.SERVING
                assert (await client.word_vectors.info()).vocab_size == 400000
    finally:
        gate.set()
        running.stop()

    disabled = replace(default_components, word_vectors=WordVectorSlot("none", lambda cancel: None))
    running = ServerThread(default_components.config, disabled)
    try:
        async with AsyncClient(running.target) as client:
            with pytest.raises(EmbedServeError) as raised:
                await client.word_vectors.info()
            assert raised.value.code is grpc.StatusCode.UNIMPLEMENTED
            assert (await client.embed([1])).shape == (1, 256)
    finally:
        running.stop()
