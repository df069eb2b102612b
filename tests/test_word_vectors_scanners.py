"""The scan strategies, each built directly: every one answers as gensim and as the others do.

Which path a scan took is read from the ScanLog it is given (blocks by kind, the candidate
scan's rescans), never by patching the scanners' insides.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from embedserve.server.core.word_vectors import (
    SCANNER_NAMES,
    Bfloat16PrefilterScan,
    CandidateScan,
    ColumnsFirstScan,
    RowsFirstScan,
    ScanLog,
    SimilarityQuery,
    Term,
    WordVectors,
    bfloat16_rows,
    prefilter_margin,
)
from gensim.models import KeyedVectors

from .word_vector_cases import (
    CPU,
    EVERY_SCANNER,
    FIXTURES,
    SCANNERS,
    assert_same_ranking,
    gensim_answer,
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


def test_the_tests_build_every_scanner_the_factory_knows() -> None:
    assert set(SCANNERS) == set(SCANNER_NAMES)
    for name, build in SCANNERS.items():
        model = WordVectors(["a"], np.ones((1, 4), np.float32), name="a", source="a", device=CPU)
        assert build(model.search_rows, None).name == name


class _ManyBlocks:
    """20,000 random rows (one zero), 120 random queries in 256-row blocks: every scanner's
    answers, computed once each, and gensim's."""

    def __init__(self) -> None:
        rng = np.random.default_rng(11)
        self.kv = KeyedVectors(16)
        self.kv.add_vectors(
            [f"w{i}" for i in range(20_000)], rng.standard_normal((20_000, 16), dtype=np.float32)
        )
        self.kv.vectors[17] = 0  # a zero vector is never returned
        self.specs = list(random_queries(rng, self.kv, 120))
        with np.errstate(invalid="ignore", divide="ignore"):  # gensim divides by the zero vector's norm
            self.expected = [[(w, s) for w, s in gensim_answer(self.kv, q) if w != "w17"] for q in self.specs]
        self._answers: dict[str, tuple[list[list[tuple[str, float]]], ScanLog]] = {}

    def answers(self, scanner_name: str) -> tuple[list[list[tuple[str, float]]], ScanLog]:
        if scanner_name not in self._answers:
            model = WordVectors(
                self.kv.index_to_key, self.kv.vectors, name="t", source="t", device=CPU, block_rows=256
            )
            with_scanner(model, scanner_name, block_rows=256)
            log = ScanLog()
            got = model.most_similar([similarity_query(q) for q in self.specs], log)
            self._answers[scanner_name] = (got, log)
        return self._answers[scanner_name]


@pytest.fixture(scope="module")
def many_blocks() -> _ManyBlocks:
    return _ManyBlocks()


@EVERY_SCANNER
def test_every_scanner_matches_gensim_and_the_others(scanner_name: str, many_blocks: _ManyBlocks) -> None:
    """Past the first block the CPU scan collects only scores above each query's k-th best so far
    (with the prefilter, from a bfloat16 scan); many 64-column-aligned blocks and a whole batch in
    one scan exercise that path and its merges, for every scanner; each gives gensim's answers
    and every other scanner's."""
    got, log = many_blocks.answers(scanner_name)
    for result, expected in zip(got, many_blocks.expected, strict=True):
        assert_same_ranking(result, expected)
    for other in sorted(set(SCANNERS) - {scanner_name}):
        for result, expected in zip(got, many_blocks.answers(other)[0], strict=True):
            assert_same_ranking(result, expected)
    prefiltered, candidates = log.count("prefiltered"), log.count("candidates")
    rows_first = log.count("rows-first")
    assert (prefiltered > 20) == (scanner_name == "prefilter"), prefiltered
    assert (candidates > 20) == (scanner_name == "candidates"), candidates
    # (with the prefilter, the blocks before it pays are scored rows first in float32)
    assert (rows_first > 0) == (scanner_name in ("rows-first", "prefilter")), rows_first
    assert rows_first > 20 or scanner_name != "rows-first", rows_first
    if scanner_name == "columns-first":
        assert log.count("columns-first") > 20
    if (
        scanner_name == "candidates"
    ):  # on vectors without clusters of near-ties, almost every query is settled
        assert log.rescanned_queries + log.fallback_queries <= len(many_blocks.specs) // 10, log


def test_small_blocks_give_the_same_answers(pair: tuple[WordVectors, KeyedVectors]) -> None:
    model, kv = pair
    blocked = WordVectors(
        model.words, np.asarray(model.vectors), name="b", source="b", device=CPU, block_rows=7
    )
    for q in random_queries(np.random.default_rng(3), kv, 30):
        args = (q["positive"], q["negative"], q["topn"], q["restrict"], q["cosmul"])
        assert_same_ranking(ours(blocked, *args), ours(model, *args))


def test_rows_first_scan_answers_as_columns_first() -> None:
    """60 queries over 20,480 rows in the default blocks: a first block of 17,472 rows (group
    candidates) and a second one collected above the thresholds, rows first; the same words as
    the [queries, rows] scan, with restrict_vocab and the queries' own words left out."""
    rng = np.random.default_rng(29)
    words = [f"w{i}" for i in range(20_480)]
    model = WordVectors(
        words, rng.standard_normal((20_480, 16), dtype=np.float32), name="r", source="r", device=CPU
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
    model.scanner = RowsFirstScan(ColumnsFirstScan(model.search_rows))
    log = ScanLog()
    rows_first = model.most_similar(queries, log)
    assert log.rows("rows-first") == [17_472, 3_008]
    model.scanner = ColumnsFirstScan(model.search_rows)
    columns_first_log = ScanLog()
    for got, expected in zip(rows_first, model.most_similar(queries, columns_first_log), strict=True):
        assert_same_ranking(got, expected)
    assert columns_first_log.count("rows-first") == 0


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


@pytest.mark.parametrize("scanner_name", ["prefilter", "candidates"])
@pytest.mark.parametrize("topn", [1, 10, 100])
def test_prefilter_answers_are_the_float32_scans_among_near_ties(topn: int, scanner_name: str) -> None:
    """Clusters of near-duplicate rows put many scores closer together than bfloat16 can tell
    apart, around every query's k-th best: the prefilter must still find exactly what float32 does.
    (The candidate scan then finds queries it cannot settle and scans them again.)"""
    rng = np.random.default_rng(topn)
    centres = rng.standard_normal((600, 24)).astype(np.float32)
    vectors = (centres.repeat(40, axis=0) + 1e-3 * rng.standard_normal((24_000, 24))).astype(np.float32)
    if scanner_name == "prefilter":  # the candidate scan is tried hardest with each cluster in one block
        vectors = vectors[rng.permutation(len(vectors))]
    vectors[1234] = 0
    words = [f"w{i}" for i in range(len(vectors))]
    exact = WordVectors(words, vectors, name="e", source="e", device=CPU, block_rows=512)
    exact.scanner = ColumnsFirstScan(exact.search_rows, block_rows=512)
    fast = with_scanner(
        WordVectors(words, vectors, name="f", source="f", device=CPU, block_rows=512), scanner_name, 512
    )
    queries = []
    for index in range(150):
        positive = [Term(word=words[int(i)]) for i in rng.integers(0, len(words), 1 + index % 3)]
        negative = [Term(vector=rng.standard_normal(24).astype(np.float32))] if index % 4 == 0 else []
        restrict = int(rng.integers(5_000, 24_000)) if index % 5 == 0 else None
        queries.append(SimilarityQuery(tuple(positive), tuple(negative), topn, restrict))
    expected_results = exact.most_similar(queries)
    log = ScanLog()
    got = fast.most_similar(queries, log)
    assert log.count("prefiltered") or log.count("candidates"), "the prefilter never ran"
    if scanner_name == "candidates" and topn <= 16:
        # More near-ties than candidates per block (40 > 32): queries the scan cannot settle.
        assert log.rescanned_queries
    for result, expected in zip(got, expected_results, strict=True):
        assert_same_ranking(result, expected)


@EVERY_SCANNER
def test_vectors_holding_nan_or_infinity_are_never_returned(
    scanner_name: str, caplog: pytest.LogCaptureFixture
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
        model = WordVectors(words, vectors, name="d", source="d", device=CPU, block_rows=256, prefilter=True)
    assert "4 vectors hold NaN or infinite values" in caplog.text
    assert isinstance(model.scanner, Bfloat16PrefilterScan), "the kernels' check looks past the damaged rows"
    with_scanner(model, scanner_name, block_rows=256)
    reference = WordVectors(words, zeroed, name="z", source="z", device=CPU, block_rows=256)
    reference.scanner = ColumnsFirstScan(reference.search_rows, block_rows=256)
    queries = [
        SimilarityQuery(positive=(Term(words[int(i)]),), topn=int(rng.integers(1, 40)))
        for i in rng.choice([i for i in range(len(words)) if i not in damaged], 60)
    ] + [SimilarityQuery(positive=(Term(vector=vectors[10] + vectors[20]),), topn=9000)]
    for got, expected in zip(model.most_similar(queries), reference.most_similar(queries), strict=True):
        assert not {words[i] for i in damaged} & {w for w, _ in got}
        assert all(np.isfinite(score) for _, score in got)
        assert_same_ranking(got, expected)


@EVERY_SCANNER
def test_an_empty_vocabulary_answers_nothing(scanner_name: str) -> None:
    """(With nothing to keep, the candidate scan leaves the query to the float32 scan.)"""
    model = with_scanner(
        WordVectors([], np.zeros((0, 4), np.float32), name="e", source="e", device=CPU, prefilter=True),
        scanner_name,
    )
    query = SimilarityQuery(positive=(Term(vector=np.ones(4, np.float32)),), topn=5)
    log = ScanLog()
    assert model.most_similar([query], log) == [[]]
    assert log.fallback_queries == (1 if scanner_name == "candidates" else 0)
    assert model.most_similar([]) == []


def test_default_blocks_grow_for_few_queries_in_whole_column_groups() -> None:
    """Fewer queries get more rows per block (a lone query's scan is then a step or two), always
    in whole groups of 64 columns, so that the threshold collection and the bfloat16 prefilter
    still run on every block past the first ones."""
    rng = np.random.default_rng(8)
    vectors = rng.standard_normal((60_000, 16)).astype(np.float32)
    words = [f"w{i}" for i in range(len(vectors))]
    model = WordVectors(words, vectors, name="d", source="d", device=CPU)
    prefilter = Bfloat16PrefilterScan(ColumnsFirstScan(model.search_rows), bfloat16_rows(model.search_rows))
    rows_first = RowsFirstScan(ColumnsFirstScan(model.search_rows))
    for scanner in (prefilter, rows_first):
        sizes = {
            queries: scanner.rows_per_block(queries, len(words)) for queries in (1, 3, 10, 30, 100, 1000)
        }
        assert sizes[1] == len(words)  # one block
        assert all(rows % 64 == 0 or rows == len(words) for rows in sizes.values()), sizes  # or one block
        assert sizes[10] > sizes[100] > sizes[1000], sizes
    assert prefilter.rows_per_block(1000, len(words)) == 8192
    assert rows_first.rows_per_block(1000, len(words)) == 2048  # rows first: smaller blocks, still in cache
    model.scanner = prefilter
    queries = [SimilarityQuery((Term(words[int(i)]),), topn=10) for i in rng.integers(0, len(words), 100)]
    exact = WordVectors(words, vectors, name="e", source="e", device=CPU)
    exact.scanner = ColumnsFirstScan(exact.search_rows)
    log = ScanLog()
    for got, expected in zip(model.most_similar(queries, log), exact.most_similar(queries), strict=True):
        assert_same_ranking(got, expected)
    assert log.count("prefiltered"), "the prefilter never ran with the default blocks"


def test_a_topn_too_large_for_the_candidate_buffer_is_scanned_in_float32() -> None:
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((3000, 16)).astype(np.float32)
    words = [f"w{i}" for i in range(len(vectors))]
    model = WordVectors(words, vectors, name="b", source="b", device=CPU, block_rows=512)
    # 4 queries x max(2 x 10, 32) candidates x 16 dims fit a budget of 4096 elements; topn 100 does not.
    model.scanner = CandidateScan(
        ColumnsFirstScan(model.search_rows, block_rows=512),
        bfloat16_rows(model.search_rows),
        rescoring_buffer_elements=4096,
    )
    reference = WordVectors(words, vectors, name="r", source="r", device=CPU, block_rows=512)
    reference.scanner = ColumnsFirstScan(reference.search_rows, block_rows=512)
    for topn, scanned_by_candidates in ((10, True), (100, False)):
        queries = [SimilarityQuery(positive=(Term(words[i]),), topn=topn) for i in (1, 20, 300, 2999)]
        log = ScanLog()
        for got, expected in zip(
            model.most_similar(queries, log), reference.most_similar(queries), strict=True
        ):
            assert_same_ranking(got, expected)
        assert bool(log.count("candidates")) == scanned_by_candidates
        assert (log.rescanned_queries + log.fallback_queries == len(queries)) == (not scanned_by_candidates)
        assert (log.fallback_queries == len(queries)) == (not scanned_by_candidates)


def test_a_scanner_of_other_rows_is_refused() -> None:
    first = WordVectors(["a"], np.ones((1, 4), np.float32), name="a", source="a", device=CPU)
    second = WordVectors(["a"], np.ones((1, 4), np.float32), name="b", source="b", device=CPU)
    with pytest.raises(ValueError, match="another model's rows"):
        second.scanner = ColumnsFirstScan(first.search_rows)
