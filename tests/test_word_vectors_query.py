"""word_vectors.query: queries prepared as gensim's most_similar prepares them, held to gensim alone."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
from embedserve.server.core import InvalidInput, LimitExceeded, NotFound
from embedserve.server.core.word_vectors import (
    PreparedBatch,
    QueryColumns,
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


def _small_vocabulary() -> QueryVocabulary:
    vectors = np.random.default_rng(5).standard_normal((4, 8)).astype(np.float32)
    return QueryVocabulary({"a": 0, "b": 1, "c": 2, "d": 3}, vectors, np.linalg.norm(vectors, axis=1))


def _packed(
    weights: list[float] | None, vectors: Any, *, words: int = 1, cosmul: bool = False
) -> QueryColumns:
    """One query: `words` words ("a", "b", ...) then the raw vectors, all positive, as columns."""
    raw = np.asarray(vectors)
    terms = words + len(raw)
    return QueryColumns(
        words=["a", "b", "c", "d"][:words] + [""] * len(raw),
        positive_counts=np.array([terms]),
        negative_counts=np.array([0]),
        topn=np.array([3]),
        restrict_vocab=np.array([0]),
        cosmul=np.array([cosmul]),
        weights=None if weights is None else np.array(weights, np.float64),
        vector_terms=np.arange(words, terms),
        vectors=raw,
        field_prefix="packed.",
    )


HUGE = np.float32(2e38)  # two of these overflow float32's sum (3.4e38)
FLOAT16_MAX = np.float16(65504)
OVERFLOWS: dict[str, tuple[list[SimilarityQuery] | QueryColumns, str]] = {
    "a weight": (
        [SimilarityQuery((Term("a"),)), SimilarityQuery((Term("a"), Term("b", weight=1e308)))],
        r"^queries\[1\]\.positive\[1\]\.weight: query 1's weighted mean .* overflow float32",
    ),
    "a negative term's weight": (
        [SimilarityQuery((Term("a"),), (Term("b"), Term("c", weight=-1e39)))],
        r"^queries\[0\]\.negative\[1\]\.weight: ",
    ),
    "weights that overflow together": (
        [SimilarityQuery((Term("a", weight=5e38), Term("b", weight=5e38)))],  # a's alone is in range
        r"^queries\[0\]\.positive\[1\]\.weight: ",
    ),
    "a packed weight": (_packed([math.nan, 1e308], [np.ones(8, np.float32)]), r"^packed\.weights\[1\]: "),
    "float32 raw vectors": (
        [SimilarityQuery((Term("a"), Term(vector=np.full(8, HUGE)), Term(vector=np.full(8, HUGE))))],
        r"^queries\[0\]\.positive\[2\]\.vector: query 0's weighted mean",
    ),
    "a float32 raw vector's weight": (
        [SimilarityQuery((Term(vector=np.full(8, HUGE), weight=2.0),))],
        r"^queries\[0\]\.positive\[0\]\.vector: ",  # the larger factor is named
    ),
    "packed float32 raw vectors": (_packed(None, np.full((2, 8), HUGE)), r"^packed\.vectors\[1\]: "),
    "a float16 raw vector times a weight": (
        _packed([math.nan, 1e35], np.full((1, 8), FLOAT16_MAX, np.float16).astype(np.float32)),
        r"^packed\.weights\[1\]: ",
    ),
    "the sum of |weights| (zero vectors)": (
        [SimilarityQuery((Term(vector=np.zeros(8, np.float32), weight=1e308),) * 2)],
        r"^queries\[0\]\.positive\[1\]\.weight: query 0's sum of \|weights\| overflows float64",
    ),
    "float64 values beyond float32's": (
        [SimilarityQuery((Term(vector=np.full(8, 1e39)),))],
        r"^queries\[0\]\.positive\[0\]\.vector: a raw vector holds values beyond float32's range",
    ),
    "float64 columns beyond float32's": (
        _packed(None, np.full((2, 8), 1e39) * [[1e-39], [1]]),
        r"^packed\.vectors\[1\]: a raw vector holds values beyond float32's range",
    ),
    "float32's largest value and a weight": (
        [SimilarityQuery((Term(vector=np.full(8, np.finfo(np.float32).max)), Term("a", weight=1e32)))],
        r"^queries\[0\]\.positive\[1\]\.weight: ",
    ),
    "3CosMul positive raw vectors": (
        [SimilarityQuery((Term("a"), *[Term(vector=np.full(8, 1e5, np.float32))] * 5), method="mul")],
        r"^queries\[0\]\.positive\[4\]\.vector: query 0's 3CosMul scores would overflow float32",
    ),
    "3CosMul negative raw vectors": (
        [SimilarityQuery((Term("a"),), (Term(vector=np.full(8, 1e20, np.float32)),), method="mul")],
        r"^queries\[0\]\.negative\[0\]\.vector: .* over its negative raw vectors",
    ),
    "3CosMul packed float16 raw vectors": (
        _packed(None, np.full((4, 8), FLOAT16_MAX, np.float16).astype(np.float32), cosmul=True),
        r"^packed\.vectors\[3\]: ",
    ),
    "a packed raw vector's NaN": (
        _packed(None, np.array([[1.0] * 8, [math.nan] * 8], np.float32)),
        r"^packed\.vectors\[1\]: a raw vector holds NaN or infinite values",
    ),
}


@pytest.mark.parametrize("case", sorted(OVERFLOWS))
def test_arithmetic_that_would_overflow_is_refused_naming_the_field(case: str) -> None:
    """Issue 31: weights and raw vectors whose products leave float32's range (1e308 used to answer
    NaN scores, with numpy's overflow warnings) are refused before any arithmetic, naming the
    field as the request wrote it."""
    queries, message = OVERFLOWS[case]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidInput, match=message):
            prepare(queries, _small_vocabulary(), max_topn=10)


def test_a_weight_is_bounded_by_its_words_own_components() -> None:
    """Over float32's largest value, but a's unit vector has no component over 0.61: in range."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = prepare([SimilarityQuery((Term("a", weight=5e38),))], _small_vocabulary(), max_topn=10)
    assert np.isfinite(batch.add_vectors).all()


def test_large_but_finite_arithmetic_is_answered_as_gensim_without_warnings(kv: KeyedVectors) -> None:
    """What stays in range is answered as before: large weights on words bit for bit gensim's,
    and raw vectors up to float32's largest values, with no numpy warning on the way."""
    words = kv.index_to_key[:3]
    specs: list[tuple[list[Any], list[Any]]] = [
        ([(words[0], 1e30), (words[1], 1.0)], [(words[2], -0.5)]),
        ([(words[0], 2.0)], [(words[1], 1e-300)]),
        ([(words[0], 1e38), (words[1], 1e38)], []),
        ([(words[0], 0.0), (np.zeros(kv.vector_size, np.float32), 1e300)], []),
    ]
    big = np.full(kv.vector_size, 1.6e38, np.float32)  # two sum to 3.2e38, under float32's 3.4e38
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = prepared(kv, [SimilarityQuery(gensim_terms(p), gensim_terms(n)) for p, n in specs])
        edges = prepared(
            kv,
            [
                SimilarityQuery(gensim_terms([np.full(kv.vector_size, np.finfo(np.float32).max)])),
                SimilarityQuery(gensim_terms([big, big])),
                SimilarityQuery(
                    gensim_terms([words[0], np.full(kv.vector_size, 6e4, np.float16)] * 2), method="mul"
                ),
            ],
        )
    for (positive, negative), add_vector in zip(specs, batch.add_vectors, strict=True):
        keys = [item[0] for item in positive + negative]
        weights = np.array([item[1] for item in positive + negative], np.float64)
        expected = kv.get_mean_vector(keys, weights, pre_normalize=True, post_normalize=True)
        np.testing.assert_array_equal(add_vector.view(np.uint32), expected.view(np.uint32))
    assert np.isfinite(batch.add_vectors).all()
    np.testing.assert_allclose(np.linalg.norm(edges.add_vectors[:2], axis=1), 1, rtol=1e-6)
    assert np.isfinite(edges.term_vectors).all()
