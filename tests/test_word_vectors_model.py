"""WordVectors answers as gensim's KeyedVectors does: same words, same order, scores within 1e-5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from embedserve.server.core import NotFound
from embedserve.server.core.word_vectors import SimilarityQuery, Term, WordVectors
from gensim.models import KeyedVectors

from .word_vector_cases import (
    CPU,
    FIXTURES,
    assert_same_ranking,
    gensim_answer,
    glove_reference_of,
    load_glove,
    load_pair,
    ours,
    random_queries,
    similarity_query,
    with_scanner,
)


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def pair(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[WordVectors, KeyedVectors]:
    return load_pair(request.param, tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def glove(vector_cache: Path) -> WordVectors:
    return load_glove(vector_cache)


@pytest.fixture(scope="module")
def glove_reference(glove: WordVectors) -> KeyedVectors:
    return glove_reference_of(glove)


def test_random_queries_match_gensim(pair: tuple[WordVectors, KeyedVectors]) -> None:
    model, kv = pair
    rng = np.random.default_rng(1234)
    for q in random_queries(rng, kv, 150):
        got = ours(model, q["positive"], q["negative"], q["topn"], q["restrict"], q["cosmul"])
        assert_same_ranking(got, gensim_answer(kv, q))


def test_many_queries_in_one_scan_equal_one_at_a_time(pair: tuple[WordVectors, KeyedVectors]) -> None:
    model, kv = pair
    queries = [similarity_query(q) for q in random_queries(np.random.default_rng(7), kv, 60)]
    together = model.most_similar(queries)
    for query, result in zip(queries, together, strict=True):
        assert_same_ranking(result, model.most_similar([query])[0])


def test_batches_searched_together_answer_each_as_alone(pair: tuple[WordVectors, KeyedVectors]) -> None:
    """search_many (concurrent requests in one scan) keeps each batch's exclusions, restrict_vocab,
    topn and 3CosMul terms with its own queries."""
    model, kv = pair
    rng = np.random.default_rng(17)
    batches = []
    for size in (1, 7, 3, 12):
        batches.append([similarity_query(q) for q in random_queries(rng, kv, size)])
    together = model.search_many([model.prepare(b) for b in batches])
    # The GPU's candidate scan (built here on the CPU) keeps them apart as well.
    candidates = with_scanner(
        WordVectors(model.words, np.asarray(model.vectors), name="c", source="c", device=CPU), "candidates"
    )
    by_candidates = candidates.search_many([candidates.prepare(b) for b in batches])
    for ranked, candidate_ranked in zip(together, by_candidates, strict=True):
        for got, expected in zip(candidate_ranked.lists(model.words), ranked.lists(model.words), strict=True):
            assert_same_ranking(got, expected)
    assert [len(r) for r in together] == [1, 7, 3, 12]
    for batch, ranked in zip(batches, together, strict=True):
        for got, expected in zip(ranked.lists(model.words), model.most_similar(batch), strict=True):
            assert_same_ranking(got, expected)


def test_cosmul_honours_restrict_vocab_which_gensim_ignores(pair: tuple[WordVectors, KeyedVectors]) -> None:
    model, kv = pair
    word = kv.index_to_key[5]
    everything = kv.most_similar_cosmul(positive=[word], topn=len(kv))
    first_50 = [(w, s) for w, s in everything if kv.key_to_index[w] < 50][:10]
    assert_same_ranking(ours(model, [word], [], 10, 50, cosmul=True), first_50)


def test_pairs_and_odd_one_out_match_gensim(pair: tuple[WordVectors, KeyedVectors]) -> None:
    model, kv = pair
    words = kv.index_to_key[:40]
    pairs = [(words[i], words[(i * 7 + 3) % 40]) for i in range(40)]
    np.testing.assert_allclose(model.similarity(pairs), [kv.similarity(a, b) for a, b in pairs], atol=1e-6)
    cosine, euclidean = model.distance(pairs)
    np.testing.assert_allclose(cosine, [kv.distance(a, b) for a, b in pairs], atol=1e-6)
    np.testing.assert_allclose(euclidean, [np.linalg.norm(kv[a] - kv[b]) for a, b in pairs], rtol=1e-6)
    for start in range(0, 30, 5):
        group = words[start : start + 5]
        assert model.doesnt_match(group) == kv.doesnt_match(group)
    vectors, missing = model.get_vectors([words[3], "no-such-word-xyz"])
    np.testing.assert_array_equal(vectors[0], kv[words[3]])
    assert missing == ["no-such-word-xyz"]


def test_topn_zero_is_empty_like_gensim(pair: tuple[WordVectors, KeyedVectors]) -> None:
    model, kv = pair
    word = kv.index_to_key[0]
    assert ours(model, [word], [], 0, None) == kv.most_similar(word, topn=0) == []
    assert len(ours(model, [word], [], 10**4, None)) == len(kv) - 1


def test_unknown_words_are_not_found(pair: tuple[WordVectors, KeyedVectors]) -> None:
    """(The query errors, which most_similar raises from prepare, are test_word_vectors_query's.)"""
    model, kv = pair
    word = kv.index_to_key[0]
    with pytest.raises(NotFound, match='"nope1", "nope2"'):
        ours(model, [word, "nope1"], ["nope2", "nope1"], 10, None)
    with pytest.raises(NotFound, match='"ghost"'):
        model.similarity([(word, "ghost")])
    with pytest.raises(NotFound, match='"ghost"'):
        model.doesnt_match([word, "ghost"])


def test_cosmul_on_a_float16_model_matches_float32() -> None:
    """A core caller may pass float16 vectors, as before the columnar search: 3CosMul's term
    matrix is float32 all the same."""
    rng = np.random.default_rng(4)
    vectors: Any = rng.standard_normal((300, 8)).astype(np.float16)  # outside the annotated float32
    words = [f"w{i}" for i in range(300)]
    half = WordVectors(words, vectors, name="h", source="h", device=CPU, prefilter=False)
    single = WordVectors(words, vectors.astype(np.float32), name="s", source="s", device=CPU, prefilter=False)
    query = SimilarityQuery((Term("w1"), Term("w2")), (Term("w3"),), 5, None, "mul")
    got, expected = half.most_similar([query])[0], single.most_similar([query])[0]
    assert [w for w, _ in got] == [w for w, _ in expected]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in expected], rtol=5e-3)  # float16 norms


def test_glove_king_woman_man_is_queen(glove: WordVectors, glove_reference: KeyedVectors) -> None:
    assert (glove.vocab_size, glove.dim) == (400000, 50)
    got = ours(glove, ["king", "woman"], ["man"], 10, None)
    assert got[0][0] == "queen"
    assert_same_ranking(
        got, glove_reference.most_similar(positive=["king", "woman"], negative=["man"], topn=10)
    )


def test_glove_random_queries_match_gensim(glove: WordVectors, glove_reference: KeyedVectors) -> None:
    for q in random_queries(np.random.default_rng(99), glove_reference, 12):
        assert_same_ranking(
            ours(glove, q["positive"], q["negative"], q["topn"], q["restrict"], q["cosmul"]),
            gensim_answer(glove_reference, q),
        )
