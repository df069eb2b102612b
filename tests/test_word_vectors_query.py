"""word_vectors.query: queries prepared as gensim's most_similar prepares them, held to gensim alone."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from embedserve.server.core import InvalidInput, LimitExceeded, NotFound
from embedserve.server.core.word_vectors import (
    PreparedBatch,
    QueryVocabulary,
    SimilarityQuery,
    Term,
    prepare,
)
from gensim.models import KeyedVectors

from .word_vector_cases import FIXTURES, TEST_DATA, gensim_terms


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def kv(request: pytest.FixtureRequest) -> KeyedVectors:
    filename, load_reference = FIXTURES[request.param]
    return load_reference(str(TEST_DATA / filename))


def vocabulary_of(kv: KeyedVectors) -> QueryVocabulary:
    """What prepare() reads, taken from gensim's own model."""
    kv.fill_norms()
    return QueryVocabulary(kv.key_to_index, kv.vectors, kv.norms)


def prepared(kv: KeyedVectors, queries: list[SimilarityQuery]) -> PreparedBatch:
    return prepare(queries, vocabulary_of(kv), max_topn=10000)


def query(
    positive: list[Any], negative: list[Any], topn: int, restrict: int | None, cosmul: bool = False
) -> SimilarityQuery:
    return SimilarityQuery(
        gensim_terms(positive), gensim_terms(negative), topn, restrict, "mul" if cosmul else "add"
    )


def test_query_vectors_are_gensims_bit_for_bit(kv: KeyedVectors) -> None:
    """A batch's 3CosAdd query vectors equal most_similar's get_mean_vector exactly, to the sign of
    zeros: words, raw vectors and weights, positive and negative, single words, and a few long
    queries (whose tails are summed term by term), in one batch of mixed lengths."""
    rng = np.random.default_rng(21)
    words = kv.index_to_key
    specs = []
    for index in range(200):
        items: list[Any] = []
        for _ in range(int(rng.integers(1, 5)) if index % 40 else 30 + index // 40):
            value: Any = words[int(rng.integers(len(words)))]
            if rng.random() < 0.2:
                value = rng.standard_normal(kv.vector_size).astype(np.float32)
            items.append((value, float(rng.normal(0, 2))) if rng.random() < 0.3 else value)
        split = int(rng.integers(0, len(items) + 1))
        specs.append((items[:split], items[split:]))
    queries = [SimilarityQuery(gensim_terms(p), gensim_terms(n)) for p, n in specs]
    batch = prepared(kv, queries)
    for (positive, negative), add_vector in zip(specs, batch.add_vectors, strict=True):
        # most_similar's own preparation of keys and weights (gensim 4.x).
        weight = np.concatenate((np.ones(len(positive)), -1.0 * np.ones(len(negative))))
        keys = []
        for index, item in enumerate(positive + negative):
            if isinstance(item, tuple):
                keys.append(item[0])
                weight[index] = item[1]
            else:
                keys.append(item)
        expected = kv.get_mean_vector(keys, weight, pre_normalize=True, post_normalize=True)
        np.testing.assert_array_equal(add_vector.view(np.uint32), expected.view(np.uint32))


def test_a_word_alone_negated_keeps_positive_zeros() -> None:
    """gensim's 0 + (-1 * v) leaves +0.0 where v is 0."""
    zero = np.zeros((1, 8), np.float32)
    zero[0, 0] = 1.0
    single = QueryVocabulary({"x": 0}, zero, np.linalg.norm(zero, axis=1))
    negated = prepare([SimilarityQuery((), (Term("x"),))], single, max_topn=10).add_vectors[0]
    assert not np.signbit(negated[1:]).any()
    assert negated[0] == -1.0


def test_weights_must_be_finite() -> None:
    vocabulary = QueryVocabulary({"a": 0, "b": 1}, np.eye(2, dtype=np.float32), np.ones(2, np.float32))
    for weight in (math.nan, math.inf):
        with pytest.raises(InvalidInput, match="a weight must be finite"):
            prepare([SimilarityQuery((Term("a", weight=weight),))], vocabulary, max_topn=10)


def test_errors_are_clear(kv: KeyedVectors) -> None:
    word = kv.index_to_key[0]
    with pytest.raises(NotFound, match='"nope1", "nope2"'):
        prepared(kv, [query([word, "nope1"], ["nope2", "nope1"], 10, None)])
    with pytest.raises(InvalidInput, match="at least one positive or negative term"):
        prepared(kv, [query([], [], 10, None)])
    with pytest.raises(InvalidInput, match="3CosMul needs at least one positive"):
        prepared(kv, [query([], [word], 10, None, cosmul=True)])
    with pytest.raises(InvalidInput, match="topn must be >= 0"):
        prepared(kv, [query([word], [], -1, None)])
    with pytest.raises(LimitExceeded, match="--max-topn 10000"):
        prepared(kv, [query([word], [], 10001, None)])
    with pytest.raises(InvalidInput, match="restrict_vocab must be >= 0"):
        prepared(kv, [query([word], [], 10, -3)])
    with pytest.raises(InvalidInput, match=rf"this model's vectors are \[{kv.vector_size}\]"):
        prepared(kv, [query([np.zeros(kv.vector_size + 1, dtype=np.float32)], [], 10, None)])
    with pytest.raises(InvalidInput, match="NaN"):
        prepared(kv, [query([np.full(kv.vector_size, np.nan, dtype=np.float32)], [], 10, None)])
