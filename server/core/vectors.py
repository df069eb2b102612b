"""Word vectors answering as gensim's KeyedVectors (4.x) does, batched on a device.

Queries follow gensim's code line by line where it decides the answer: how
terms are normalised and weighted (most_similar's get_mean_vector, cosmul's
Levy & Goldberg objective), which inputs are left out of the results, and the
topn and restrict_vocab rules. The search itself is one matrix product of the
queries against the vocabulary, in row blocks with a running top-k, so no
[queries x vocabulary] score matrix is ever held in memory. Scores are formed in
gensim's order, dot(vectors, query) / norms, so they agree with gensim's to
float32 rounding.
"""

from __future__ import annotations

import itertools
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
import torch

from .errors import InvalidInput, LimitExceeded, NotFound

_LOGGER = logging.getLogger(__name__)
FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
Method = Literal["add", "mul"]
# gensim's epsilon in most_similar_cosmul's denominator.
COSMUL_EPSILON = 0.000001
# (vocabulary block, its norms, a [queries, rows] buffer it may fill) -> scores
_Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Mask(Protocol):
    """See WordVectors._masker."""

    def __call__(self, scores: torch.Tensor, start: int, stop: int, rows_first: bool = False) -> None: ...


# Columns per group in the two-stage top-k.
_TOPK_GROUP = 64
_GPU_SCORE_BUFFER_ELEMENTS = 64 * 1024 * 1024
# On CPU: rows per block for many queries, and the score buffer a few queries may fill instead.
_CPU_BLOCK_ROWS = 8192
_CPU_SCORE_BUFFER_ELEMENTS = 1024 * 1024
# The prefilter pays only where few (query, column group) pairs need a second look: early in a
# scan, when the k-th best scores so far are still low, blocks are scored in float32 alone.
_PREFILTER_MAX_HIT_SHARE = 0.2
# Columns per query and block that the candidate scan (see _search_candidates) scores again in
# float32, at least: enough that the best column left out rarely comes within the margin.
_PREFILTER_CANDIDATES = 32
# On CPU, 3CosAdd blocks of at least this many queries are scored rows first, [rows, queries] =
# unit rows @ queries^T: MKL's product for a tall, narrow output ran 1.3-2.5x faster than for its
# transpose (2-core AMD EPYC, 16 to 2048 queries); for fewer queries it was slower.
_ROWS_FIRST_QUERIES = 16
# ... in blocks of at least this many rows (not _CPU_BLOCK_ROWS): 512 queries' [2048, 512] block of
# scores (4 MiB) scanned 1.17-1.29x faster than in 8192-row blocks, being still in cache when its
# maxima are taken.
_CPU_ROWS_FIRST_BLOCK_ROWS = 2048
# Query vectors are summed term position by term position for all queries at once, until fewer
# than this many queries have terms left; those go on term by term.
_FEW_QUERIES = 8


def prefilter_margin(query_norms: torch.Tensor, dim: int) -> torch.Tensor:
    """How far a bfloat16 product of a query with a unit row can fall from the float32 one.

    Rounding each factor to bfloat16 (8 significant bits) moves each term by at most
    2 * 2**-8 + 2**-16 of itself, so the sum by that share of |q| |u| = |q| (Cauchy-Schwarz);
    rounding the float32-accumulated result to bfloat16 adds 2**-8 of it, and accumulation
    (in either precision) dim * 2**-24 each: under 2**-6 + dim * 2**-22 of |q| in all.
    """
    return query_norms * (2**-6 + dim * 2**-22)


def bfloat16_prefilter_available(device: torch.device) -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so the prefilter pays."""
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


# Built per term of the one-message-per-query form (and by core callers): slotted, and not frozen
# (a frozen dataclass's __init__ costs twice as much).
@dataclass(slots=True)
class Term:
    """One positive or negative term: a word or a raw vector, with an optional weight (3CosAdd only)."""

    word: str | None = None
    vector: FloatArray | None = None
    weight: float | None = None


@dataclass(slots=True)
class SimilarityQuery:
    positive: Sequence[Term] = ()
    negative: Sequence[Term] = ()
    topn: int = 10
    restrict_vocab: int | None = None
    method: Method = "add"


@dataclass(slots=True)
class QueryColumns:
    """Many most_similar queries as columns (what a packed request carries).

    Query i has positive_counts[i] positive terms, then negative_counts[i] negative ones; the
    terms of all queries follow each other, query by query.
    """

    words: Sequence[str]  # per term; "" for a raw-vector term
    positive_counts: IntArray
    negative_counts: IntArray
    topn: IntArray
    restrict_vocab: IntArray  # 0 searches the whole vocabulary, as gensim's `if restrict_vocab:`
    cosmul: BoolArray
    weights: npt.NDArray[np.float64] | None = None  # per term; NaN: the default, +1 or -1
    vector_terms: IntArray = field(default_factory=lambda: np.zeros(0, np.int64))  # increasing
    vectors: FloatArray | None = None  # [len(vector_terms), dim]

    def __len__(self) -> int:
        return len(self.topn)


@dataclass(slots=True)
class PreparedBatch:
    """Queries reduced to what the search needs, one entry per query."""

    topn: IntArray
    end: IntArray  # search rows [0, end)
    cosmul: BoolArray
    add_vectors: FloatArray  # [queries, dim]: 3CosAdd query vectors (zero for 3CosMul queries)
    # (query, row) pairs never returned: each query's own words (inside its end).
    excluded_query: IntArray
    excluded_row: IntArray
    # 3CosMul: every such query's term vectors, query by query, its positive terms first.
    term_vectors: FloatArray
    term_start: IntArray
    positive_count: IntArray
    negative_count: IntArray

    def __len__(self) -> int:
        return len(self.topn)

    def take(self, index: IntArray) -> PreparedBatch:
        """The queries at these indexes, in this order."""
        renumbered = np.full(len(self), -1, np.int64)
        renumbered[index] = np.arange(len(index))
        new_query = renumbered[self.excluded_query]
        kept = new_query >= 0
        return PreparedBatch(
            topn=self.topn[index],
            end=self.end[index],
            cosmul=self.cosmul[index],
            add_vectors=self.add_vectors[index],
            excluded_query=new_query[kept],
            excluded_row=self.excluded_row[kept],
            term_vectors=self.term_vectors,
            term_start=self.term_start[index],
            positive_count=self.positive_count[index],
            negative_count=self.negative_count[index],
        )

    @staticmethod
    def concat(batches: Sequence[PreparedBatch]) -> PreparedBatch:
        """The queries of several batches (e.g. from concurrent requests) in one."""
        if len(batches) == 1:
            return batches[0]
        query_offsets = np.cumsum([0] + [len(b) for b in batches])
        term_offsets = np.cumsum([0] + [len(b.term_vectors) for b in batches])
        return PreparedBatch(
            topn=np.concatenate([b.topn for b in batches]),
            end=np.concatenate([b.end for b in batches]),
            cosmul=np.concatenate([b.cosmul for b in batches]),
            add_vectors=np.concatenate([b.add_vectors for b in batches]),
            excluded_query=np.concatenate(
                [b.excluded_query + offset for b, offset in zip(batches, query_offsets[:-1], strict=True)]
            ),
            excluded_row=np.concatenate([b.excluded_row for b in batches]),
            term_vectors=np.concatenate([b.term_vectors for b in batches]),
            term_start=np.concatenate(
                [b.term_start + offset for b, offset in zip(batches, term_offsets[:-1], strict=True)]
            ),
            positive_count=np.concatenate([b.positive_count for b in batches]),
            negative_count=np.concatenate([b.negative_count for b in batches]),
        )


@dataclass(slots=True)
class RankedLists:
    """One ranked list per query, flat: query i's is the next counts[i] rows and scores, best first."""

    counts: IntArray
    rows: IntArray
    scores: FloatArray

    def __len__(self) -> int:
        return len(self.counts)

    @classmethod
    def from_best(cls, scores: FloatArray, rows: IntArray, topn: IntArray) -> RankedLists:
        """From each query's best [queries, k] (sorted best first, -inf for none), cut at its topn."""
        ranked = (np.arange(scores.shape[1]) < topn[:, None]) & (scores != -np.inf)
        return cls(ranked.sum(axis=1), rows[ranked], scores[ranked])

    def split(self, sizes: Sequence[int]) -> list[RankedLists]:
        """Consecutive parts of these many queries each."""
        parts: list[RankedLists] = []
        query = entry = 0
        for size in sizes:
            counts = self.counts[query : query + size]
            entries = int(counts.sum())
            parts.append(
                RankedLists(counts, self.rows[entry : entry + entries], self.scores[entry : entry + entries])
            )
            query, entry = query + size, entry + entries
        return parts

    def words(self, vocabulary: Sequence[str]) -> list[str]:
        return [vocabulary[row] for row in self.rows.tolist()]

    def lists(self, vocabulary: Sequence[str]) -> list[list[tuple[str, float]]]:
        """As gensim returns them: per query, [(word, score), ...]."""
        pairs = list(zip(self.words(vocabulary), self.scores.tolist(), strict=True))
        lists: list[list[tuple[str, float]]] = []
        start = 0
        for count in self.counts.tolist():
            lists.append(pairs[start : start + count])
            start += count
        return lists


def _not_in_vocabulary(missing: Sequence[str]) -> NotFound:
    return NotFound(f"not in the vocabulary: {', '.join(repr(w) for w in missing)}")


def _unitvec(vector: FloatArray) -> FloatArray:
    """gensim.matutils.unitvec for a dense float vector (a zero vector stays zero)."""
    norm = np.sqrt(np.sum(vector**2))
    if norm > 0:
        return (vector / norm).astype(vector.dtype)  # type: ignore[no-any-return]
    return vector


@dataclass(frozen=True)
class AnalogySection:
    name: str
    correct: int
    incorrect: int


@dataclass(frozen=True)
class AnalogyReport:
    """evaluate_word_analogies' figures: sections, the total, and how many questions had unknown words."""

    sections: list[AnalogySection]
    correct: int
    incorrect: int
    questions: int
    out_of_vocabulary: int

    @property
    def accuracy(self) -> float:
        answered = self.correct + self.incorrect
        return self.correct / answered if answered else 0.0


def unit_rows(vectors: FloatArray, norms: FloatArray, out: FloatArray | None = None) -> FloatArray:
    """Each row over its norm in float32, as gensim's get_vector(norm=True); zero rows stay zero."""
    out = np.empty(vectors.shape, np.float32) if out is None else out
    step = 65536
    for start in range(0, vectors.shape[0], step):
        block_norms = np.asarray(norms[start : start + step], dtype=np.float32)
        safe = np.where(block_norms > 0, block_norms, np.float32(1))
        with np.errstate(invalid="ignore"):  # a damaged row (inf / inf) is never ranked anyway
            out[start : start + step] = (
                np.asarray(vectors[start : start + step], dtype=np.float32) / safe[:, None]
            )
    return out


class WordVectors:
    """A vocabulary and its raw vectors (on the host), with unit-length copies on a torch device.

    Searches score against the unit rows: dot(unit(v), q) is gensim's dot(v, q) / |v| up to float32
    rounding (about 1e-7), and saves a pass over every block of scores.
    """

    def __init__(
        self,
        words: Sequence[str],
        vectors: FloatArray,
        *,
        name: str,
        source: str,
        device: torch.device,
        norms: FloatArray | None = None,
        unit: FloatArray | None = None,
        block_rows: int | None = None,
        max_topn: int = 10000,
        prefilter: bool | None = None,
        unit_bfloat16: npt.NDArray[np.uint16] | None = None,
    ) -> None:
        """prefilter: scan 3CosAdd queries in bfloat16 first and score in float32 only the
        columns that may rank (None: where bfloat16_prefilter_available says it pays). Results
        are the float32 scan's: see _search. unit_bfloat16: the unit rows already rounded to
        bfloat16 (as uint16 bits, e.g. memory-mapped from the cache).
        """
        if vectors.ndim != 2 or vectors.shape[0] != len(words):
            raise ValueError(f"{len(words)} words but vectors of shape {vectors.shape}")
        self.name = name
        self.source = source
        self.device = device
        self.words = list(words)
        self.key_to_index: dict[str, int] = {}
        for index, word in enumerate(self.words):
            self.key_to_index.setdefault(word, index)
        self.vectors = vectors
        self.norms: FloatArray = np.linalg.norm(vectors, axis=1) if norms is None else norms
        # Plain ndarray views of the (possibly memory-mapped) arrays: np.memmap indexing is slow per row.
        self._rows: FloatArray = np.asarray(vectors)
        self._row_norms: FloatArray = np.asarray(self.norms)
        # None: 8192 rows, more for a few queries (see _rows_per_block); a number: that many on CPU.
        self._block_rows = block_rows or _CPU_BLOCK_ROWS
        self._scaled_blocks = block_rows is None
        self.max_topn = max_topn
        with warnings.catch_warnings():
            # Memory-mapped caches are read-only; nothing here writes to them.
            warnings.simplefilter("ignore", UserWarning)
            unit = unit_rows(self._rows, self._row_norms) if unit is None else unit
            self._unit = torch.from_numpy(unit).to(device)
            self._unit_bfloat16: torch.Tensor | None = None
            self._prefilter_enabled = True
            if bfloat16_prefilter_available(device) if prefilter is None else prefilter:
                # Otherwise cuBLAS may sum a bfloat16 product's partial sums in bfloat16
                # (split-K), beyond the margin, which assumes float32 accumulation. Only bfloat16
                # matrix products are affected, and the server runs no others.
                if (
                    device.type == "cuda"
                    and torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
                ):
                    _LOGGER.info("bfloat16 matrix products: reduced-precision reductions off")
                    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
                self._unit_bfloat16 = (
                    self._unit.to(torch.bfloat16)
                    if unit_bfloat16 is None
                    else torch.from_numpy(unit_bfloat16).view(torch.bfloat16).to(device)
                )
                if not self._prefilter_within_margin():
                    _LOGGER.warning(
                        "bfloat16 products on %s stray past the prefilter's margin; scanning in float32",
                        device,
                    )
                    self._unit_bfloat16 = None
        # Off the CPU the prefilter cannot collect columns above a threshold without reading back
        # to the host every block; it keeps a few candidates per block instead and checks once,
        # at the end, that nothing it left out could rank (see _search_candidates).
        self.candidate_scan = device.type != "cpu"
        # gensim would score a zero vector NaN; here it is never returned. Nor is a vector holding
        # NaN or infinities (a damaged file), whose every score gensim would make NaN.
        damaged = ~np.isfinite(self.norms)
        never_ranked = damaged | (self.norms == 0)
        if np.any(damaged):
            _LOGGER.warning(
                "%s: %d vectors hold NaN or infinite values; they are never returned",
                name,
                int(np.sum(damaged)),
            )
        self._never_ranked = torch.from_numpy(never_ranked).to(device) if np.any(never_ranked) else None

    @property
    def prefilter(self) -> bool:
        """Whether 3CosAdd scans use the bfloat16 prefilter."""
        return self._unit_bfloat16 is not None and self._prefilter_enabled

    @prefilter.setter
    def prefilter(self, enabled: bool) -> None:
        """Turns a prefilter the model was built with off and on again (benchmarks compare both)."""
        if enabled and self._unit_bfloat16 is None:
            raise ValueError("this model was built without the bfloat16 prefilter")
        self._prefilter_enabled = enabled

    def _prefilter_within_margin(self) -> bool:
        """The margin assumes products accumulate in float32, which is this machine's kernels'
        business: a check on some rows against the others, before any query relies on it."""
        assert self._unit_bfloat16 is not None
        sample = self._unit[: min(4096, self.vocab_size)]
        queries = sample[:: max(1, len(sample) // 64)]
        with torch.inference_mode():
            approximate = torch.mm(queries.to(torch.bfloat16), self._unit_bfloat16[: len(sample)].T)
            exact = torch.mm(queries, sample.T)
            # Rows holding NaN (never ranked) say nothing about the kernels.
            error = torch.where(exact.isfinite(), (approximate.float() - exact).abs(), 0)
            return bool((error <= prefilter_margin(queries.norm(dim=1), self.dim)[:, None] / 2).all())

    @property
    def vocab_size(self) -> int:
        return len(self.words)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    # Lookups

    def missing(self, words: Sequence[str]) -> list[str]:
        return list(dict.fromkeys(w for w in words if w not in self.key_to_index))

    def _require(self, words: Sequence[str]) -> None:
        missing = self.missing(words)
        if missing:
            raise _not_in_vocabulary(missing)

    def get_vectors(self, words: Sequence[str]) -> tuple[FloatArray, list[str]]:
        """Raw vectors [len(words), D]; rows of missing words are zero and the words are listed."""
        out = np.zeros((len(words), self.dim), dtype=np.float32)
        for row, word in enumerate(words):
            index = self.key_to_index.get(word)
            if index is not None:
                out[row] = self._rows[index]
        return out, self.missing(words)

    def unit_vector(self, word: str) -> FloatArray:
        """get_vector(word, norm=True)."""
        index = self.key_to_index[word]
        return self._rows[index] / self._row_norms[index]  # type: ignore[no-any-return]

    # Pairs

    def similarity(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """KeyedVectors.similarity for each pair: dot(unitvec(v1), unitvec(v2))."""
        self._require([w for pair in pairs for w in pair])
        return [
            float(
                np.dot(_unitvec(self._rows[self.key_to_index[a]]), _unitvec(self._rows[self.key_to_index[b]]))
            )
            for a, b in pairs
        ]

    def distance(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[float], list[float]]:
        """(cosine distance as KeyedVectors.distance, euclidean norm of the raw difference)."""
        cosine = [1 - s for s in self.similarity(pairs)]
        euclidean = [
            float(np.linalg.norm(self._rows[self.key_to_index[a]] - self._rows[self.key_to_index[b]]))
            for a, b in pairs
        ]
        return cosine, euclidean

    def doesnt_match(self, words: Sequence[str]) -> str:
        """KeyedVectors.doesnt_match, except that unknown words are NotFound rather than skipped."""
        if not words:
            raise InvalidInput("doesnt_match needs at least one word")
        self._require(words)
        vectors = np.vstack([self.unit_vector(w) for w in words]).astype(np.float32)
        mean = _unitvec(vectors.mean(axis=0)).astype(np.float32)
        dists = np.dot(vectors, mean)
        return sorted(zip(dists, words, strict=True), reverse=True)[-1][1]

    # Queries

    def _checked_shape(self, vector: FloatArray) -> FloatArray:
        if vector.shape != (self.dim,):
            raise InvalidInput(
                f"a raw vector has shape {list(vector.shape)}; this model's vectors are [{self.dim}]"
            )
        return vector.astype(np.float32, copy=False)  # prepare() checks every raw vector's values

    def query_columns(self, queries: Sequence[SimilarityQuery]) -> QueryColumns:
        """Queries, one object each, as the columns that prepare() reads."""
        words: list[str] = []
        weights: list[float] = []
        vector_terms: list[int] = []
        vectors: list[FloatArray] = []
        for query in queries:
            if query.method not in ("add", "mul"):
                raise InvalidInput(f"unknown method {query.method!r}")
            for term in (*query.positive, *query.negative):
                if (term.word is None) == (term.vector is None):
                    raise InvalidInput("each term is either a word or a vector")
                if term.vector is not None:
                    vector_terms.append(len(words))
                    vectors.append(self._checked_shape(term.vector))
                words.append(term.word or "")
                if term.weight is not None and not math.isfinite(term.weight):
                    raise InvalidInput("a weight must be finite")
                weights.append(math.nan if term.weight is None else term.weight)
        return QueryColumns(
            words=words,
            positive_counts=np.array([len(q.positive) for q in queries], np.int64),
            negative_counts=np.array([len(q.negative) for q in queries], np.int64),
            topn=np.array([q.topn for q in queries], np.int64),
            restrict_vocab=np.array([q.restrict_vocab or 0 for q in queries], np.int64),
            cosmul=np.array([q.method == "mul" for q in queries], np.bool_),
            weights=np.array(weights, np.float64) if not all(map(math.isnan, weights)) else None,
            vector_terms=np.array(vector_terms, np.int64),
            vectors=np.stack(vectors) if vectors else None,
        )

    def _mean_vectors(
        self,
        queries: int,
        term_query: IntArray,
        term_position: IntArray,
        weights: npt.NDArray[np.float64],
        vectors: FloatArray,
    ) -> FloatArray:
        """most_similar's query vectors, get_mean_vector(pre_normalize=True, post_normalize=True),
        for many queries at once with gensim's operations in gensim's order, row-wise.

        In gensim's order for each query: float64 weight times the float32 unit (or raw) vector,
        added into a float32 mean, term after term; then divided by the sum of absolute weights in
        float64, scaled to unit length, and cast to float32. Many queries go term position by term
        position, all at once; the tails of the few longest, or a batch of fewer than _FEW_QUERIES
        queries, term by term (_add_tails). Per term: its query, its position in the query
        (positive terms first), its weight and its vector. Bit for bit gensim's under numpy 2
        (under numpy 1, gensim itself multiplies in float32).
        """
        means = np.zeros((queries, self.dim), np.float32)
        totals = np.zeros(queries, np.float64)
        if queries < _FEW_QUERIES:  # terms come query by query, each query's in position order
            self._add_tails(means, totals, term_query, weights, vectors, np.arange(len(term_query)))
            return self._normalized(means, totals)
        by_position = np.argsort(term_position, kind="stable")  # query order within each position
        bounds = np.searchsorted(term_position[by_position], np.arange(term_position.max(initial=-1) + 2))
        for position in range(len(bounds) - 1):
            at = by_position[bounds[position] : bounds[position + 1]]  # at most one term of each query
            if len(at) < _FEW_QUERIES:
                # The long tails of a few queries: a step per term costs less than one per position.
                tail = by_position[bounds[position] :]
                tail = tail[np.argsort(term_query[tail], kind="stable")]  # by query, then position
                self._add_tails(means, totals, term_query, weights, vectors, tail)
                break
            members, weights_at = term_query[at], weights[at]
            vectors_at = vectors if len(at) == len(vectors) else vectors[at]
            if len(members) == queries:  # every query, in order: no gather and scatter
                if position == 0 and (np.abs(weights_at) == 1).all():
                    # 0 + (1 * v) is v + 0 and 0 + (-1 * v) is 0 - v, exactly (zeros included).
                    np.add(vectors_at, 0, out=means)
                    np.subtract(0, vectors_at, out=means, where=(weights_at < 0)[:, None])
                else:
                    means += weights_at[:, None] * vectors_at
                totals += np.abs(weights_at)
                continue
            means[members] = means[members] + weights_at[:, None] * vectors_at
            totals[members] += np.abs(weights_at)
        return self._normalized(means, totals)

    @staticmethod
    def _normalized(means: FloatArray, totals: npt.NDArray[np.float64]) -> FloatArray:
        """get_mean_vector's end: divided by the total weight, scaled to unit length in float64,
        then float32."""
        averaged = means.astype(np.float64)
        if not (totals == 1).all():  # x / 1 is x: most queries' weights sum to 1
            weighted = totals > 0
            averaged[weighted] /= totals[weighted, None]
        lengths = np.sqrt(np.einsum("ij,ij->i", averaged, averaged))
        if (lengths > 0).all():
            averaged /= lengths[:, None]
        else:
            nonzero = lengths > 0
            averaged[nonzero] /= lengths[nonzero, None]
        return averaged.astype(np.float32)

    def _add_tails(
        self,
        means: FloatArray,
        totals: npt.NDArray[np.float64],
        term_query: IntArray,
        weights: npt.NDArray[np.float64],
        vectors: FloatArray,
        tail: IntArray,
    ) -> None:
        """_mean_vectors' sums over the rest of each query's terms (`tail`: by query, then by
        position), term by term in gensim's order: float32 mean += float64 weight * vector,
        total += |weight|."""
        product = np.empty(self.dim, np.float64)
        queries = term_query[tail].tolist()
        for term, query, weight in zip(tail.tolist(), queries, weights[tail].tolist(), strict=True):
            np.multiply(vectors[term], weight, out=product, dtype=np.float64)
            mean = means[query]
            np.add(mean, product, out=mean, casting="same_kind")
            totals[query] += abs(weight)

    def prepare(self, queries: QueryColumns | Sequence[SimilarityQuery]) -> PreparedBatch:
        """Checks queries and reduces them to what the search needs (cheap; raises on bad input)."""
        columns = queries if isinstance(queries, QueryColumns) else self.query_columns(queries)
        count = len(columns)
        topn = np.asarray(columns.topn, np.int64)
        positive = np.asarray(columns.positive_counts, np.int64)
        negative = np.asarray(columns.negative_counts, np.int64)
        restrict = np.asarray(columns.restrict_vocab, np.int64)
        cosmul = np.asarray(columns.cosmul, np.bool_)
        if topn.ndim != 1:
            raise InvalidInput(f"topn must be one value per query, got shape {list(topn.shape)}")
        for name, values in (
            ("positive_counts", positive),
            ("negative_counts", negative),
            ("restrict_vocab", restrict),
            ("methods", cosmul),
        ):
            if values.shape != (count,):
                raise InvalidInput(f"{name} has {values.size} values for {count} queries")
        if min(positive.min(initial=0), negative.min(initial=0)) < 0:
            raise InvalidInput("term counts must be >= 0")
        terms_per_query = positive + negative
        _check_each(terms_per_query > 0, "a query needs at least one positive or negative term")
        _check_each(~cosmul | (positive > 0), "3CosMul needs at least one positive term")
        term_count = int(terms_per_query.sum())
        words = columns.words
        if len(words) != term_count:
            raise InvalidInput(f"{len(words)} words for {term_count} terms")

        vector_terms = np.asarray(columns.vector_terms, np.int64)
        raw = np.zeros((0, self.dim), np.float32) if columns.vectors is None else columns.vectors
        if raw.shape != (len(vector_terms), self.dim):
            raise InvalidInput(
                f"raw vectors of shape {list(raw.shape)} for {len(vector_terms)} raw-vector terms; "
                f"this model's vectors are [{self.dim}]"
            )
        is_vector = np.zeros(term_count, np.bool_)
        if len(vector_terms):
            if vector_terms[0] < 0 or vector_terms[-1] >= term_count or (np.diff(vector_terms) <= 0).any():
                raise InvalidInput(f"vector_terms must be increasing indexes below {term_count}")
            if not np.isfinite(raw).all():
                raise InvalidInput("a raw vector holds NaN or infinite values")
            if any(words[index] for index in vector_terms.tolist()):
                raise InvalidInput("a raw-vector term has a word")
            is_vector[vector_terms] = True
        rows = np.fromiter(map(self.key_to_index.get, words, itertools.repeat(-1)), np.int64, term_count)
        rows[is_vector] = -1
        missing = np.flatnonzero((rows < 0) & ~is_vector)
        if len(missing):
            raise _not_in_vocabulary(list(dict.fromkeys(words[index] for index in missing.tolist())))

        _check_each(topn >= 0, "topn must be >= 0, got {}", topn)
        if (topn > self.max_topn).any():
            query = int(np.argmax(topn > self.max_topn))
            raise LimitExceeded(
                f"query {query}: topn {topn[query]} is over the server's --max-topn {self.max_topn}"
            )
        _check_each(restrict >= 0, "restrict_vocab must be >= 0, got {}", restrict)

        term_query = np.repeat(np.arange(count), terms_per_query)
        term_position = np.arange(term_count) - (np.cumsum(terms_per_query) - terms_per_query)[term_query]
        weights = np.where(term_position < positive[term_query], 1.0, -1.0)
        if columns.weights is not None:
            given = np.asarray(columns.weights, np.float64)
            if given.shape != (term_count,):
                raise InvalidInput(f"weights has {len(given)} values for {term_count} terms")
            explicit = ~np.isnan(given)
            if (explicit & cosmul[term_query]).any():
                raise InvalidInput("weights apply to 3CosAdd only")
            if not (np.isfinite(given[explicit])).all():
                raise InvalidInput("a weight must be finite")
            weights = np.where(explicit, given, weights)

        # Each term's vector: a word's unit vector (gensim's get_vector(norm=True)), a raw vector as given.
        word_terms = ~is_vector
        if len(vector_terms):
            word_index = np.flatnonzero(word_terms)
            word_rows = rows[word_index]
            vectors = np.empty((term_count, self.dim), np.float32)
            vectors[word_index] = self._rows[word_rows] / self._row_norms[word_rows][:, None]
            vectors[vector_terms] = raw
        else:
            word_rows = rows
            vectors = (self._rows[rows] / self._row_norms[rows][:, None]).astype(np.float32, copy=False)
        add_terms = ~cosmul[term_query]
        if cosmul.any():
            add_vectors = self._mean_vectors(
                count, term_query[add_terms], term_position[add_terms], weights[add_terms], vectors[add_terms]
            )
        else:
            add_vectors = self._mean_vectors(count, term_query, term_position, weights, vectors)

        # gensim: `if restrict_vocab:` so 0 searches everything.
        end = np.where(restrict > 0, np.minimum(restrict, self.vocab_size), self.vocab_size)
        word_query = term_query[word_terms]
        inside = word_rows < end[word_query]
        stride = max(1, self.vocab_size)
        # Sorted, then each pair once (np.unique hashes, which costs more at these sizes).
        excluded = np.sort(word_query[inside] * stride + word_rows[inside])
        excluded = (
            excluded[np.concatenate(([True], excluded[1:] != excluded[:-1]))] if len(excluded) else excluded
        )
        mul_terms = np.where(cosmul, terms_per_query, 0)
        return PreparedBatch(
            topn=topn,
            end=end,
            cosmul=cosmul,
            add_vectors=add_vectors,
            excluded_query=excluded // stride,
            excluded_row=excluded % stride,
            term_vectors=vectors[~add_terms],
            term_start=np.cumsum(mul_terms) - mul_terms,
            positive_count=np.where(cosmul, positive, 0),
            negative_count=np.where(cosmul, negative, 0),
        )

    def most_similar(self, queries: Sequence[SimilarityQuery]) -> list[list[tuple[str, float]]]:
        """One ranked (word, score) list per query; all queries share one blocked scan."""
        return self.search(self.prepare(queries)).lists(self.words)

    def search_many(self, batches: Sequence[PreparedBatch]) -> list[RankedLists]:
        """Several prepared batches (e.g. concurrent requests) in one scan, answered each."""
        return self.search(PreparedBatch.concat(batches)).split([len(b) for b in batches])

    def search(self, batch: PreparedBatch) -> RankedLists:
        """The scan itself, for queries from prepare()."""
        searched = batch.topn > 0
        if len(batch) and searched.all() and not batch.cosmul.any():  # the common case: one group
            with torch.inference_mode():
                scores, rows = self._search_add(batch)
            return RankedLists.from_best(scores.cpu().numpy(), rows.cpu().numpy(), batch.topn)
        width = min(int(batch.topn.max()) if len(batch) else 0, self.vocab_size)
        best_scores = np.full((len(batch), width), -np.inf, np.float32)
        best_rows = np.zeros((len(batch), width), np.int64)
        with torch.inference_mode():
            for cosmul in (False, True):
                members = np.flatnonzero(searched & (batch.cosmul == cosmul))
                if not len(members):
                    continue
                group = batch if len(members) == len(batch) else batch.take(members)
                if cosmul:
                    scores, rows = self._search(group, self._mul_scorer(group))
                else:
                    scores, rows = self._search_add(group)
                best_scores[members, : scores.shape[1]] = scores.cpu().numpy()
                best_rows[members, : rows.shape[1]] = rows.cpu().numpy()
        return RankedLists.from_best(best_scores, best_rows, batch.topn)

    def _search_add(self, group: PreparedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The scan of 3CosAdd queries (with topn > 0): the candidate scan where it is on, else _search."""
        queries = torch.from_numpy(group.add_vectors).to(self.device)
        if self.prefilter and self.candidate_scan and self._candidates_fit(group):
            return self._search_candidates(group, queries)
        return self._search(group, self._add_scorer(queries), exact_queries=queries)

    def _add_scorer(self, queries: torch.Tensor) -> _Scorer:
        def score(unit_block: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            # Into a reused buffer: a fresh [queries, rows] tensor per block costs as much as the product.
            return torch.mm(queries, unit_block.T, out=out)

        return score

    def _mul_scorer(self, group: PreparedBatch) -> _Scorer:
        term_matrix = torch.from_numpy(group.term_vectors).to(self.device)
        ones_column = len(group.term_vectors)  # a column of ones pads the ragged products

        def padded(starts: IntArray, counts: IntArray) -> torch.Tensor:
            offsets = np.arange(max(1, int(counts.max())))
            columns = np.where(offsets < counts[:, None], starts[:, None] + offsets, ones_column)
            return torch.from_numpy(columns).to(self.device)

        positive_index = padded(group.term_start, group.positive_count)
        negative_index = padded(group.term_start + group.positive_count, group.negative_count)

        def score(unit_block: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            shifted = (1 + torch.mm(term_matrix, unit_block.T)) / 2  # [terms, rows]
            shifted = torch.cat([shifted, torch.ones_like(shifted[:1])])
            numerator = shifted[positive_index].prod(dim=1)  # [queries, rows]
            denominator = shifted[negative_index].prod(dim=1) + COSMUL_EPSILON
            return numerator / denominator

        return score

    def _search(
        self,
        group: PreparedBatch,
        score: _Scorer,
        exact_queries: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocked scan of one group of queries: each one's k best (scores, rows), best first.

        With the bfloat16 prefilter (exact_queries given, the float32 3CosAdd query matrix),
        once every query has a k-th best so far, a block is scored in bfloat16 and only the
        columns whose bfloat16 score comes within prefilter_margin of it are scored again in
        float32 (a max per group of 64 columns finds them); no float32 score that could enter
        the top k is skipped, so the results are the float32 scan's.
        """
        end = int(group.end.max())
        k = _group_k(group)
        block_rows = self._rows_per_block(len(group), end)
        if group.cosmul[0]:
            if self.device.type == "cpu":
                block_rows = self._block_rows  # its intermediates outweigh a few queries' scores
            # 3CosMul holds every term's scores and each query's gathered products per block row.
            width = max(1, int(group.positive_count.max())) + max(1, int(group.negative_count.max()))
            per_row = len(group.term_vectors) + 1 + len(group) * (width + 2)
            fitting = _GPU_SCORE_BUFFER_ELEMENTS // per_row // _TOPK_GROUP * _TOPK_GROUP
            block_rows = max(_TOPK_GROUP, min(block_rows, fitting))
        mask = self._masker(group)
        buffer_size = len(group) * min(block_rows, end)
        buffer = torch.empty(buffer_size, device=self.device)
        queries_t = None
        if exact_queries is not None and self.device.type == "cpu" and len(group) >= _ROWS_FIRST_QUERIES:
            queries_t = exact_queries.T.contiguous()
        prefilter = None
        if exact_queries is not None and self.prefilter:
            prefilter = (exact_queries, prefilter_margin(exact_queries.norm(dim=1), self.dim))
            approximate_queries = exact_queries.to(torch.bfloat16)
            approximate_buffer = torch.empty(buffer_size, dtype=torch.bfloat16, device=self.device)
        best = _RunningTopK(len(group), k, self.device, prefilter)
        for start in range(0, end, block_rows):
            stop = min(start + block_rows, end)
            rows = stop - start
            if (
                best.prefilter_bits is not None  # only ever set with a prefilter
                and rows % _TOPK_GROUP == 0
                and best.hit_share <= _PREFILTER_MAX_HIT_SHARE
            ):
                approximate = torch.mm(
                    approximate_queries,
                    self._unit_bfloat16[start:stop].T,  # type: ignore[index]
                    out=approximate_buffer[: len(group) * rows].view(len(group), rows),
                )
                mask(approximate, start, stop)
                best.add_prefiltered_block(approximate.view(torch.int16), start, self._unit[start:stop])
                continue
            if queries_t is not None:
                scores_t = torch.mm(
                    self._unit[start:stop], queries_t, out=buffer[: len(group) * rows].view(rows, len(group))
                )
                mask(scores_t, start, stop, rows_first=True)
                best.add_block(scores_t, start, rows_first=True)
                continue
            scores = score(self._unit[start:stop], buffer[: len(group) * rows].view(len(group), rows))
            mask(scores, start, stop)
            best.add_block(scores, start)
        return best.result()

    def _masker(self, group: PreparedBatch) -> _Mask:
        """mask(scores, start, stop, rows_first=False): -inf where a block's scores must never rank
        (zero or damaged rows, rows past a query's restrict_vocab, the query's own inputs); scores
        are [queries, rows], or [rows, queries] where rows_first."""
        # Exclusions sorted by row: each block masks its slice in one indexed write.
        order = np.argsort(group.excluded_row, kind="stable")
        excluded_starts = group.excluded_row[order]
        excluded_rows = torch.from_numpy(excluded_starts).to(self.device)
        excluded_queries = torch.from_numpy(group.excluded_query[order]).to(self.device)
        query_ends = torch.from_numpy(group.end).to(self.device)[:, None]
        smallest_end = int(group.end.min())

        def mask(scores: torch.Tensor, start: int, stop: int, rows_first: bool = False) -> None:
            if self._never_ranked is not None:
                never = self._never_ranked[start:stop]
                scores.masked_fill_(never[:, None] if rows_first else never, -math.inf)
            if smallest_end < stop:  # some query's restrict_vocab ends inside this block
                rows = torch.arange(start, stop, device=self.device)
                past_end = rows[:, None] >= query_ends.T if rows_first else rows[None, :] >= query_ends
                scores.masked_fill_(past_end, -math.inf)
            first, last = np.searchsorted(excluded_starts, (start, stop)).tolist()
            if first < last:
                queries, rows = excluded_queries[first:last], excluded_rows[first:last] - start
                scores.index_put_(
                    (rows, queries) if rows_first else (queries, rows),
                    torch.tensor(-math.inf, dtype=scores.dtype, device=self.device),
                )

        return mask

    def _candidates_fit(self, group: PreparedBatch) -> bool:
        """Whether the candidate scan's float32 rescoring of a block (queries x candidates x dim)
        fits the score buffer's budget; a large topn is scanned in float32 instead."""
        k = _group_k(group)
        return k > 0 and len(group) * _candidate_count(k) * self.dim <= _GPU_SCORE_BUFFER_ELEMENTS

    def _search_candidates(
        self, group: PreparedBatch, queries: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The bfloat16 prefilter without a host round trip per block (for GPUs).

        Each block is scored in bfloat16; its `candidates` best columns by that score are scored
        again in float32 and merged into the running top k, and the best bfloat16 score left
        out is kept. A column left out scores at most that plus prefilter_margin in float32, so
        once the scan is over, a query whose every block left out less than its k-th best minus
        the margin has the float32 scan's answer (to float32 rounding: the rescoring sums in
        another order than the scan's product, so words tied within about 1e-7 may swap); the few
        others are scanned again in float32. No read-back until the scan is over.
        """
        assert self._unit_bfloat16 is not None
        end = int(group.end.max())
        k = _group_k(group)
        candidates = _candidate_count(k)
        block_rows = self._rows_per_block(len(group), end)
        mask = self._masker(group)
        approximate_queries = queries.to(torch.bfloat16)
        buffer = torch.empty(len(group) * min(block_rows, end), dtype=torch.bfloat16, device=self.device)
        best = _RunningTopK(len(group), k, self.device)
        left_out = torch.full((len(group),), -math.inf, device=self.device)
        for start in range(0, end, block_rows):
            stop = min(start + block_rows, end)
            rows = stop - start
            approximate = torch.mm(
                approximate_queries,
                self._unit_bfloat16[start:stop].T,
                out=buffer[: len(group) * rows].view(len(group), rows),
            )
            mask(approximate, start, stop)
            columns, block_left_out = _approximate_candidates(approximate, candidates)
            left_out = torch.maximum(left_out, block_left_out)
            # float32 scores of the candidates; a masked column stays -inf.
            exact = torch.bmm(self._unit[start:stop][columns], queries[:, :, None])[:, :, 0]
            exact.masked_fill_(approximate.gather(1, columns) == -math.inf, -math.inf)
            best.merge(exact, columns + start)
        best_scores, best_rows = best.result()
        kth = best_scores[:, -1]
        margin = prefilter_margin(queries.norm(dim=1), self.dim)
        settled = (left_out == -math.inf) | (left_out + margin < kth)
        unsettled = (~settled).nonzero().flatten()
        if unsettled.numel():
            again = unsettled.cpu().numpy()
            rescanned_scores, rescanned_rows = self._search(
                group.take(again), self._add_scorer(queries[unsettled])
            )
            best_scores[unsettled] = -math.inf
            best_scores[unsettled, : rescanned_scores.shape[1]] = rescanned_scores
            best_rows[unsettled, : rescanned_rows.shape[1]] = rescanned_rows
        return best_scores, best_rows

    def _rows_per_block(self, queries: int, end: int) -> int:
        """Vocabulary rows scored per step.

        On CPU a block sized for the caches, with more rows for fewer queries (a lone query's
        scan in 8192-row steps spends more on the steps than on the product); on a GPU as many
        rows as keep the score buffer near 256 MiB, since each step there costs kernel launches
        rather than cache misses.
        """
        if self.device.type == "cpu":
            if not self._scaled_blocks:
                return self._block_rows
            # Whole column groups: the threshold collection and the prefilter take no others.
            rows = _CPU_SCORE_BUFFER_ELEMENTS // max(1, queries) // _TOPK_GROUP * _TOPK_GROUP
            rows_first = queries >= _ROWS_FIRST_QUERIES and not self.prefilter
            return max(_CPU_ROWS_FIRST_BLOCK_ROWS if rows_first else self._block_rows, min(end, rows))
        return max(self._block_rows, min(end, _GPU_SCORE_BUFFER_ELEMENTS // max(1, queries)))

    # Evaluation

    def evaluate_analogies(
        self,
        questions: str,
        *,
        restrict_vocab: int = 300000,
        case_insensitive: bool = True,
        batch_size: int = 512,
    ) -> AnalogyReport:
        """KeyedVectors.evaluate_word_analogies on the text of a questions-words file (3CosAdd, topn 5)."""
        ok_keys = self.words[:restrict_vocab]
        fold = str.upper if case_insensitive else str
        ok_vocab = {fold(k): self.key_to_index[k] for k in reversed(ok_keys)}
        sections: list[tuple[str, list[tuple[str, str, str, str]]]] = []
        questions_seen = out_of_vocabulary = 0
        for line_no, line in enumerate(questions.splitlines()):
            if line.startswith(": "):
                sections.append((line.lstrip(": ").strip(), []))
                continue
            if not sections:
                raise InvalidInput(f"missing section header before line #{line_no}")
            parts = [fold(word) for word in line.split()]
            if len(parts) != 4:
                continue
            questions_seen += 1
            if any(word not in ok_vocab for word in parts):
                out_of_vocabulary += 1
                continue
            sections[-1][1].append((parts[0], parts[1], parts[2], parts[3]))

        report_sections: list[AnalogySection] = []
        for name, quads in sections:
            correct = 0
            for first in range(0, len(quads), batch_size):
                chunk = quads[first : first + batch_size]
                answers = self.most_similar(
                    [
                        SimilarityQuery(
                            positive=(Term(self.words[ok_vocab[b]]), Term(self.words[ok_vocab[c]])),
                            negative=(Term(self.words[ok_vocab[a]]),),
                            topn=5,
                            restrict_vocab=restrict_vocab,
                        )
                        for a, b, c, _ in chunk
                    ]
                )
                for (a, b, c, expected), sims in zip(chunk, answers, strict=True):
                    predicted = None
                    for word, _ in sims:
                        predicted = fold(word)
                        if predicted in ok_vocab and predicted not in {a, b, c}:
                            break
                    correct += predicted == expected
            report_sections.append(AnalogySection(name, correct, len(quads) - correct))
        total_correct = sum(s.correct for s in report_sections)
        total_incorrect = sum(s.incorrect for s in report_sections)
        return AnalogyReport(
            report_sections, total_correct, total_incorrect, questions_seen, out_of_vocabulary
        )


def _group_k(group: PreparedBatch) -> int:
    """How many best rows a scan of these queries together keeps for each."""
    return min(int(group.topn.max()), int(group.end.max()))


def _check_each(valid: BoolArray, problem: str, values: IntArray | None = None) -> None:
    """InvalidInput naming the first query where valid is False (and its value, for a {} in problem)."""
    if not valid.all():
        query = int(np.argmin(valid))
        detail = problem if values is None else problem.format(values[query])
        raise InvalidInput(f"query {query}: {detail}")


def _candidate_count(k: int) -> int:
    return max(2 * k, _PREFILTER_CANDIDATES)


def _approximate_candidates(approximate: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of each row's `count` best bfloat16 scores, and per row a bound on the scores
    of the columns left out (-inf when none is)."""
    queries, columns = approximate.shape
    if count >= columns:
        index = torch.arange(columns, device=approximate.device).expand(queries, columns)
        return index, torch.full((queries,), -math.inf, device=approximate.device)
    if columns % _TOPK_GROUP or columns < 4 * _TOPK_GROUP * count:
        values, index = torch.topk(approximate, count + 1, dim=1)
        return index[:, :count], values[:, count].float()
    # The best columns lie in the column groups (of 64) with the best maxima: the groups not
    # taken hold nothing above the last maximum taken.
    maxima = approximate.view(queries, columns // _TOPK_GROUP, _TOPK_GROUP).amax(dim=2)
    group_maxima, groups = torch.topk(maxima, count, dim=1)
    offsets = torch.arange(_TOPK_GROUP, device=approximate.device)
    in_groups = (groups[:, :, None] * _TOPK_GROUP + offsets).view(queries, count * _TOPK_GROUP)
    values, index = torch.topk(approximate.gather(1, in_groups), count + 1, dim=1)
    bound = torch.maximum(group_maxima[:, -1], values[:, count]).float()
    return in_groups.gather(1, index[:, :count]), bound


def _group_candidates(
    scores: torch.Tensor, maxima: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of each row's `groups` column groups with the largest maxima, and their scores."""
    if groups == 1:
        best_groups = maxima.argmax(dim=1, keepdim=True)
    else:
        best_groups = torch.topk(maxima, groups, dim=1, sorted=False).indices
    offsets = torch.arange(_TOPK_GROUP, device=scores.device)
    columns = (best_groups[:, :, None] * _TOPK_GROUP + offsets).view(scores.shape[0], groups * _TOPK_GROUP)
    return scores.gather(1, columns), columns


def _block_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates for the k best of each row, as (scores, columns); the caller's top-k picks them.

    The k best of a row lie in the k column groups (of 64) with the largest maxima, so a cheap
    max per group picks groups and only their columns are kept. (Among exactly tied scores it
    may keep a different one, as topk itself may.)
    """
    rows, columns = scores.shape
    if columns % _TOPK_GROUP or columns < 4 * _TOPK_GROUP * k:
        return torch.topk(scores, k, dim=1, sorted=False)
    maxima = scores.view(rows, columns // _TOPK_GROUP, _TOPK_GROUP).amax(dim=2)
    return _group_candidates(scores, maxima, k)


def _row_block_candidates(scores_t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """_block_candidates for a [rows, queries] block: candidates as ([queries, n] scores, rows)."""
    rows, queries = scores_t.shape
    if rows % _TOPK_GROUP or rows < 4 * _TOPK_GROUP * k:
        values, index = torch.topk(scores_t, k, dim=0, sorted=False)
        return values.T, index.T
    maxima = scores_t.view(rows // _TOPK_GROUP, _TOPK_GROUP, queries).amax(dim=1)  # [groups, queries]
    if k == 1:
        best_groups = maxima.argmax(dim=0, keepdim=True)
    else:
        best_groups = torch.topk(maxima, k, dim=0, sorted=False).indices  # [k, queries]
    offsets = torch.arange(_TOPK_GROUP, device=scores_t.device)
    row_index = (best_groups[:, None, :] * _TOPK_GROUP + offsets[None, :, None]).view(
        k * _TOPK_GROUP, queries
    )
    return scores_t.gather(0, row_index).T, row_index.T


class _RunningTopK:
    """The k best (score, vocabulary row) of each query over a blocked scan, sorted best first.

    On CPU, once every query has k finite scores, a block is not merged by top-k's any more:
    a max per column group finds the few (query, group) pairs holding a score above the
    query's k-th best so far, those scores are collected, and the collection is merged now
    and then. That replaces two top-k's over every row of every block by one reduction and
    a little work. (A GPU keeps merging every block: the threshold test there would read
    back to the host each block and stall the stream.)
    """

    def __init__(
        self,
        queries: int,
        k: int,
        device: torch.device,
        prefilter: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """prefilter: the float32 query matrix and each query's prefilter_margin, for
        add_prefiltered_block."""
        self.k = k
        self.scores = torch.full((queries, 0), -math.inf, device=device)
        self.rows = torch.zeros((queries, 0), dtype=torch.int64, device=device)
        self._collect = device.type == "cpu"
        self._thresholds: torch.Tensor | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_count = 0
        self._prefilter = prefilter
        # Per query, the int16 bits of a bfloat16 value at most (k-th best - margin): a column
        # group may hold a score above the k-th best only where its best bfloat16 score's bits
        # are greater. None until every query has a k-th best above its margin (int16 order is
        # value order only for positive bfloat16 values); follows _thresholds.
        self.prefilter_bits: torch.Tensor | None = None
        # The share of (query, column group) pairs of the last block that had to be looked at.
        self.hit_share = 1.0

    def _set_thresholds(self, thresholds: torch.Tensor | None) -> None:
        self._thresholds = thresholds
        self.prefilter_bits = None
        if thresholds is None or self._prefilter is None:
            return
        lowest = thresholds - self._prefilter[1]
        if bool((lowest > 0).all()):
            rounded = lowest.to(torch.bfloat16)
            bits = rounded.view(torch.int16)
            # Rounded down, not to nearest: one bfloat16 step less where rounding went up.
            self.prefilter_bits = torch.where(rounded.float() > lowest, bits - 1, bits)

    def add_prefiltered_block(
        self, approximate_bits: torch.Tensor, start: int, unit_block: torch.Tensor
    ) -> None:
        """A block scored in bfloat16 (as int16 bits, masked with -inf), once prefilter_bits is
        set: the columns that may hold a score above the k-th best are scored again in float32
        and collected."""
        lowest_bits = self.prefilter_bits
        assert lowest_bits is not None
        assert self._thresholds is not None
        assert self._prefilter is not None
        queries, columns = approximate_bits.shape
        grouped = approximate_bits.view(queries, columns // _TOPK_GROUP, _TOPK_GROUP)
        query_index, group_index = (grouped.amax(dim=2) > lowest_bits[:, None]).nonzero(as_tuple=True)
        self.hit_share = query_index.numel() / (queries * grouped.shape[1])
        if query_index.numel() == 0:
            return
        hit, offset = (grouped[query_index, group_index] > lowest_bits[query_index, None]).nonzero(
            as_tuple=True
        )
        query_index, column = query_index[hit], group_index[hit] * _TOPK_GROUP + offset
        values = (unit_block[column] * self._prefilter[0][query_index]).sum(dim=1)
        above = values > self._thresholds[query_index]
        self._add_pending(query_index[above], values[above], column[above] + start)

    def add_block(self, scores: torch.Tensor, start: int, rows_first: bool = False) -> None:
        """A block of float32 scores, [queries, rows], or [rows, queries] where rows_first (CPU)."""
        rows = scores.shape[0] if rows_first else scores.shape[1]
        if self._thresholds is not None and rows % _TOPK_GROUP == 0:
            self._collect_above_thresholds(scores, start, rows_first)
            return
        candidates = _row_block_candidates if rows_first else _block_candidates
        candidate_scores, candidate_rows = candidates(scores, min(self.k, rows))
        self.merge(candidate_scores, candidate_rows + start)
        if self._collect and self.scores.shape[1] == self.k:
            kth = self.scores[:, -1]
            self._set_thresholds(kth.clone() if bool(kth.isfinite().all()) else None)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._flush()
        return self.scores, self.rows

    def merge(self, candidate_scores: torch.Tensor, candidate_rows: torch.Tensor) -> None:
        """Candidates (scores and vocabulary rows, [queries, n]) into the k best."""
        merged_scores = torch.cat([self.scores, candidate_scores], dim=1)
        merged_rows = torch.cat([self.rows, candidate_rows], dim=1)
        self.scores, keep = torch.topk(merged_scores, min(self.k, merged_scores.shape[1]), dim=1)
        self.rows = torch.gather(merged_rows, 1, keep)

    def _collect_above_thresholds(self, scores: torch.Tensor, start: int, rows_first: bool) -> None:
        assert self._thresholds is not None
        # (query, column group) pairs whose best score beats the query's k-th best so far; rows first,
        # in group order, which _flush's sort by query makes the same order as the other's.
        if rows_first:
            grouped = scores.view(scores.shape[0] // _TOPK_GROUP, _TOPK_GROUP, scores.shape[1])
            maxima = grouped.amax(dim=1)
            group_index, query_index = (maxima > self._thresholds[None, :]).nonzero(as_tuple=True)
        else:
            grouped = scores.view(scores.shape[0], scores.shape[1] // _TOPK_GROUP, _TOPK_GROUP)
            maxima = grouped.amax(dim=2)
            query_index, group_index = (maxima > self._thresholds[:, None]).nonzero(as_tuple=True)
        self.hit_share = query_index.numel() / maxima.numel()
        if query_index.numel() == 0:
            return
        # [hits, 64]
        values = grouped[group_index, :, query_index] if rows_first else grouped[query_index, group_index]
        hit, offset = (values > self._thresholds[query_index, None]).nonzero(as_tuple=True)
        self._add_pending(
            query_index[hit], values[hit, offset], group_index[hit] * _TOPK_GROUP + offset + start
        )

    def _add_pending(self, query_index: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> None:
        self._pending.append((query_index, values, rows))
        self._pending_count += query_index.numel()
        # Merged often enough that the k-th best (which decides what is looked at) stays fresh.
        if self._pending_count >= self.scores.shape[0] * min(self.k, 4):
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        query_index = torch.cat([p[0] for p in self._pending])
        values = torch.cat([p[1] for p in self._pending])
        rows = torch.cat([p[2] for p in self._pending])
        self._pending, self._pending_count = [], 0
        order = torch.argsort(query_index, stable=True)
        query_index, values, rows = query_index[order], values[order], rows[order]
        per_query = torch.bincount(query_index, minlength=self.scores.shape[0])
        slots = torch.arange(query_index.numel()) - (torch.cumsum(per_query, 0) - per_query)[query_index]
        width = int(per_query.max())
        packed_scores = self.scores.new_full((self.scores.shape[0], width), -math.inf)
        packed_rows = self.rows.new_zeros((self.scores.shape[0], width))
        packed_scores[query_index, slots] = values
        packed_rows[query_index, slots] = rows
        self.merge(packed_scores, packed_rows)
        self._set_thresholds(self.scores[:, -1].clone())
