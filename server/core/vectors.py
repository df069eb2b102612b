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

import bisect
import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from .errors import InvalidInput, LimitExceeded, NotFound

_LOGGER = logging.getLogger(__name__)
FloatArray = npt.NDArray[np.float32]
Method = Literal["add", "mul"]
# gensim's epsilon in most_similar_cosmul's denominator.
COSMUL_EPSILON = 0.000001
# (vocabulary block, its norms, a [queries, rows] buffer it may fill) -> scores
_Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Columns per group in the two-stage top-k.
_TOPK_GROUP = 64
_GPU_SCORE_BUFFER_ELEMENTS = 64 * 1024 * 1024
# The prefilter pays only where few (query, column group) pairs need a second look: early in a
# scan, when the k-th best scores so far are still low, blocks are scored in float32 alone.
_PREFILTER_MAX_HIT_SHARE = 0.2
# Columns per query and block that the candidate scan (see _search_candidates) scores again in
# float32, at least: enough that the best column left out rarely comes within the margin.
_PREFILTER_CANDIDATES = 32


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


# Built per query term on every request: slotted, and not frozen (a frozen dataclass's __init__
# costs twice as much).
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
class PreparedQuery:
    """A query reduced to what the search needs."""

    topn: int
    end: int  # search rows [0, end)
    excluded: list[int]
    # The vocabulary row of each term, positive then negative (-1: a raw vector).
    term_rows: list[int] = field(default_factory=list)
    add_vector: FloatArray | None = None
    mul_positive: list[FloatArray] = field(default_factory=list)
    mul_negative: list[FloatArray] = field(default_factory=list)


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
        block_rows: int = 8192,
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
        self._block_rows = block_rows
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

    def _check_vector(self, vector: FloatArray) -> FloatArray:
        if vector.shape != (self.dim,):
            raise InvalidInput(
                f"a raw vector has shape {list(vector.shape)}; this model's vectors are [{self.dim}]"
            )
        if not np.all(np.isfinite(vector)):
            raise InvalidInput("a raw vector holds NaN or infinite values")
        return vector.astype(np.float32, copy=False)

    def _mean_vectors(
        self, queries: Sequence[SimilarityQuery], word_rows: Sequence[Sequence[int]]
    ) -> FloatArray:
        """most_similar's query vectors, get_mean_vector(pre_normalize=True, post_normalize=True),
        for many queries at once with gensim's operations in gensim's order, row-wise.

        Term position by term position, as gensim's loop: float64 weight times the float32 unit
        (or raw) vector, added into a float32 mean; then divided by the sum of absolute weights
        in float64, scaled to unit length, and cast to float32. word_rows: per query, the
        vocabulary row of each term (positive then negative; -1 for a raw vector).
        """
        # Every term once, flattened: its query, position, weight, and row or raw vector.
        term_query: list[int] = []
        term_position: list[int] = []
        term_weight: list[float] = []
        term_row: list[int] = []
        raw: list[tuple[int, FloatArray]] = []
        for member, (query, rows) in enumerate(zip(queries, word_rows, strict=True)):
            positives = len(query.positive)
            for position, (term, row) in enumerate(
                zip((*query.positive, *query.negative), rows, strict=True)
            ):
                term_query.append(member)
                term_position.append(position)
                weight = term.weight
                term_weight.append((1.0 if position < positives else -1.0) if weight is None else weight)
                term_row.append(row)
                if row < 0:
                    raw.append((len(term_row) - 1, self._check_vector(term.vector)))  # type: ignore[arg-type]
        query_of = np.array(term_query, dtype=np.int64)
        position_of = np.array(term_position, dtype=np.int64)
        weight_of = np.array(term_weight, dtype=np.float64)
        row_of = np.array(term_row, dtype=np.int64)
        vectors = np.empty((len(term_row), self.dim), np.float32)
        by_word = row_of >= 0
        if by_word.any():
            word_index = row_of[by_word]
            vectors[by_word] = self._rows[word_index] / self._row_norms[word_index][:, None]
        for flat, vector in raw:
            vectors[flat] = vector
        means = np.zeros((len(queries), self.dim), np.float32)
        totals = np.zeros(len(queries), np.float64)
        for position in range(int(position_of.max()) + 1 if len(position_of) else 0):
            at = position_of == position  # at most one term of each query
            members, weights = query_of[at], weight_of[at]
            means[members] = means[members] + weights[:, None] * vectors[at]
            totals[members] += np.abs(weights)
        averaged = means.astype(np.float64)
        weighted = totals > 0
        averaged[weighted] /= totals[weighted, None]
        lengths = np.sqrt(np.sum(averaged**2, axis=1))
        nonzero = lengths > 0
        averaged[nonzero] /= lengths[nonzero, None]
        return averaged.astype(np.float32)

    def _prepare(self, query: SimilarityQuery) -> PreparedQuery:
        """The query checked and reduced (its 3CosAdd vector is left to prepare())."""
        terms = [*query.positive, *query.negative]
        if not terms:
            raise InvalidInput("a query needs at least one positive or negative term")
        if query.method == "mul" and not query.positive:
            raise InvalidInput("3CosMul needs at least one positive term")
        key_to_index = self.key_to_index
        rows: list[int] = []
        missing: list[str] = []
        for term in terms:
            word = term.word
            if (word is None) == (term.vector is None):
                raise InvalidInput("each term is either a word or a vector")
            if word is None:
                rows.append(-1)
                continue
            row = key_to_index.get(word)
            if row is None:
                missing.append(word)
                row = -1
            rows.append(row)
        if missing:
            raise _not_in_vocabulary(list(dict.fromkeys(missing)))
        if query.topn < 0:
            raise InvalidInput(f"topn must be >= 0, got {query.topn}")
        if query.topn > self.max_topn:
            raise LimitExceeded(f"topn {query.topn} is over the server's --max-topn {self.max_topn}")
        restrict = query.restrict_vocab
        if restrict is not None and restrict < 0:
            raise InvalidInput(f"restrict_vocab must be >= 0, got {restrict}")
        # gensim: `if restrict_vocab:` so 0 and None both search everything.
        end = min(restrict, self.vocab_size) if restrict else self.vocab_size
        excluded = sorted({row for row in rows if row >= 0})
        prepared = PreparedQuery(topn=query.topn, end=end, excluded=excluded, term_rows=rows)
        if query.method == "add":
            pass  # prepare() computes the add vectors of all queries together
        elif query.method == "mul":
            # Words are unit-normalised; raw vectors are used as given, as gensim does.
            def as_vector(term: Term) -> FloatArray:
                return (
                    self._check_vector(term.vector)
                    if term.vector is not None
                    else self.unit_vector(term.word or "")
                )

            prepared.mul_positive = [as_vector(t) for t in query.positive]
            prepared.mul_negative = [as_vector(t) for t in query.negative]
        else:
            raise InvalidInput(f"unknown method {query.method!r}")
        return prepared

    def prepare(self, queries: Sequence[SimilarityQuery]) -> list[PreparedQuery]:
        """Checks queries and reduces them to their query vectors (cheap; raises on bad input)."""
        prepared = [self._prepare(q) for q in queries]
        add = [i for i, q in enumerate(queries) if q.method == "add"]
        if add:
            vectors = self._mean_vectors([queries[i] for i in add], [prepared[i].term_rows for i in add])
            for i, vector in zip(add, vectors, strict=True):
                prepared[i].add_vector = vector
        return prepared

    def most_similar(self, queries: Sequence[SimilarityQuery]) -> list[list[tuple[str, float]]]:
        """One ranked (word, score) list per query; all queries share one blocked scan."""
        return self.search(self.prepare(queries))

    def search(self, prepared: Sequence[PreparedQuery]) -> list[list[tuple[str, float]]]:
        """The scan itself, for queries from prepare() (possibly from many requests)."""
        results: list[list[tuple[str, float]]] = [[] for _ in prepared]
        add = [i for i, p in enumerate(prepared) if p.add_vector is not None and p.topn > 0]
        mul = [i for i, p in enumerate(prepared) if p.add_vector is None and p.topn > 0]
        with torch.inference_mode():
            if add:
                queries = self._add_queries([prepared[i] for i in add])
                if self.prefilter and self.candidate_scan and self._candidates_fit(add, prepared):
                    self._search_candidates(add, prepared, results, queries)
                else:
                    self._search(add, prepared, results, self._add_scorer(queries), exact_queries=queries)
            if mul:
                self._search(mul, prepared, results, self._mul_scorer([prepared[i] for i in mul]))
        return results

    def _add_queries(self, group: list[PreparedQuery]) -> torch.Tensor:
        return torch.from_numpy(np.stack([p.add_vector for p in group if p.add_vector is not None])).to(
            self.device
        )

    def _add_scorer(self, queries: torch.Tensor) -> _Scorer:
        def score(unit_block: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            # Into a reused buffer: a fresh [queries, rows] tensor per block costs as much as the product.
            return torch.mm(queries, unit_block.T, out=out)

        return score

    def _mul_scorer(self, group: list[PreparedQuery]) -> _Scorer:
        terms: list[FloatArray] = []
        positive_columns: list[list[int]] = []
        negative_columns: list[list[int]] = []
        for p in group:
            positive_columns.append(list(range(len(terms), len(terms) + len(p.mul_positive))))
            terms.extend(p.mul_positive)
            negative_columns.append(list(range(len(terms), len(terms) + len(p.mul_negative))))
            terms.extend(p.mul_negative)
        term_matrix = torch.from_numpy(np.stack(terms).astype(np.float32)).to(self.device)
        ones_column = len(terms)  # a column of ones pads the ragged products

        def padded(columns: list[list[int]]) -> torch.Tensor:
            width = max(1, *(len(c) for c in columns))
            return torch.tensor([c + [ones_column] * (width - len(c)) for c in columns], device=self.device)

        positive_index, negative_index = padded(positive_columns), padded(negative_columns)

        def score(unit_block: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            shifted = (1 + torch.mm(term_matrix, unit_block.T)) / 2  # [terms, rows]
            shifted = torch.cat([shifted, torch.ones_like(shifted[:1])])
            numerator = shifted[positive_index].prod(dim=1)  # [queries, rows]
            denominator = shifted[negative_index].prod(dim=1) + COSMUL_EPSILON
            return numerator / denominator

        return score

    def _search(
        self,
        members: list[int],
        prepared: Sequence[PreparedQuery],
        results: list[list[tuple[str, float]]],
        score: _Scorer,
        exact_queries: torch.Tensor | None = None,
    ) -> None:
        """The blocked scan of one group of queries.

        With the bfloat16 prefilter (exact_queries given, the float32 3CosAdd query matrix),
        once every query has a k-th best so far, a block is scored in bfloat16 and only the
        columns whose bfloat16 score comes within prefilter_margin of it are scored again in
        float32 (a max per group of 64 columns finds them); no float32 score that could enter
        the top k is skipped, so the results are the float32 scan's.
        """
        group = [prepared[i] for i in members]
        end = max(p.end for p in group)
        k = _group_k(group)
        block_rows = self._rows_per_block(len(group), end)
        mask = self._masker(group)
        buffer_size = len(group) * min(block_rows, end)
        buffer = torch.empty(buffer_size, device=self.device)
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
            scores = score(self._unit[start:stop], buffer[: len(group) * rows].view(len(group), rows))
            mask(scores, start, stop)
            best.add_block(scores, start)
        self._fill_results(members, prepared, results, *best.result())

    def _fill_results(
        self,
        members: list[int],
        prepared: Sequence[PreparedQuery],
        results: list[list[tuple[str, float]]],
        best_scores: torch.Tensor,
        best_rows: torch.Tensor,
    ) -> None:
        top_scores, top_rows = best_scores.cpu().tolist(), best_rows.cpu().tolist()
        for row, member in enumerate(members):
            topn = prepared[member].topn
            results[member] = [
                (self.words[index], float(value))
                for index, value in zip(top_rows[row][:topn], top_scores[row][:topn], strict=True)
                if value != -math.inf
            ]

    def _masker(self, group: list[PreparedQuery]) -> Callable[[torch.Tensor, int, int], None]:
        """mask(scores, start, stop): -inf where a block's scores must never rank (zero or damaged
        rows, rows past a query's restrict_vocab, the query's own inputs)."""
        # Exclusions as (query, row) pairs sorted by row: each block masks its slice in one indexed write.
        pairs = sorted((index, row) for row, p in enumerate(group) for index in p.excluded if index < p.end)
        excluded_rows = torch.tensor([index for index, _ in pairs], dtype=torch.int64, device=self.device)
        excluded_queries = torch.tensor([row for _, row in pairs], dtype=torch.int64, device=self.device)
        excluded_starts = [index for index, _ in pairs]
        query_ends = torch.tensor([p.end for p in group], dtype=torch.int64, device=self.device)[:, None]
        smallest_end = min(p.end for p in group)

        def mask(scores: torch.Tensor, start: int, stop: int) -> None:
            if self._never_ranked is not None:
                scores.masked_fill_(self._never_ranked[start:stop], -math.inf)
            if smallest_end < stop:  # some query's restrict_vocab ends inside this block
                columns = torch.arange(start, stop, device=self.device)[None, :]
                scores.masked_fill_(columns >= query_ends, -math.inf)
            first, last = (
                bisect.bisect_left(excluded_starts, start),
                bisect.bisect_left(excluded_starts, stop),
            )
            if first < last:
                scores.index_put_(
                    (excluded_queries[first:last], excluded_rows[first:last] - start),
                    torch.tensor(-math.inf, dtype=scores.dtype, device=self.device),
                )

        return mask

    def _candidates_fit(self, members: list[int], prepared: Sequence[PreparedQuery]) -> bool:
        """Whether the candidate scan's float32 rescoring of a block (queries x candidates x dim)
        fits the score buffer's budget; a large topn is scanned in float32 instead."""
        group = [prepared[i] for i in members]
        k = _group_k(group)
        return k > 0 and len(group) * _candidate_count(k) * self.dim <= _GPU_SCORE_BUFFER_ELEMENTS

    def _search_candidates(
        self,
        members: list[int],
        prepared: Sequence[PreparedQuery],
        results: list[list[tuple[str, float]]],
        queries: torch.Tensor,
    ) -> None:
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
        group = [prepared[i] for i in members]
        end = max(p.end for p in group)
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
        unsettled = (~settled).nonzero().flatten().cpu().tolist()
        self._fill_results(members, prepared, results, best_scores, best_rows)  # unsettled: refilled
        if unsettled:
            again = [members[i] for i in unsettled]
            subset = queries[torch.tensor(unsettled, device=self.device)]
            self._search(again, prepared, results, self._add_scorer(subset))

    def _rows_per_block(self, queries: int, end: int) -> int:
        """Vocabulary rows scored per step.

        On CPU a block sized for the caches; on a GPU as many rows as keep the score buffer near
        256 MiB, since each step there costs kernel launches rather than cache misses.
        """
        if self.device.type == "cpu":
            return self._block_rows
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


def _group_k(group: Sequence[PreparedQuery]) -> int:
    """How many best rows a scan of these queries together keeps for each."""
    return min(max(p.topn for p in group), max(p.end for p in group))


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

    def add_block(self, scores: torch.Tensor, start: int) -> None:
        if self._thresholds is not None and scores.shape[1] % _TOPK_GROUP == 0:
            self._collect_above_thresholds(scores, start)
            return
        candidate_scores, candidate_columns = _block_candidates(scores, min(self.k, scores.shape[1]))
        self.merge(candidate_scores, candidate_columns + start)
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

    def _collect_above_thresholds(self, scores: torch.Tensor, start: int) -> None:
        assert self._thresholds is not None
        queries, columns = scores.shape
        grouped = scores.view(queries, columns // _TOPK_GROUP, _TOPK_GROUP)
        query_index, group_index = (grouped.amax(dim=2) > self._thresholds[:, None]).nonzero(as_tuple=True)
        self.hit_share = query_index.numel() / (queries * grouped.shape[1])
        if query_index.numel() == 0:
            return
        values = grouped[query_index, group_index]  # [hits, 64]
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
