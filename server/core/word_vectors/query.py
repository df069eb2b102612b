"""Query semantics: most_similar queries reduced to what a scan needs, as gensim's KeyedVectors (4.x).

This follows gensim's code line by line where it decides the answer: how terms are normalised and
weighted (most_similar's get_mean_vector, cosmul's Levy & Goldberg objective), which inputs are
left out of the results, and the topn and restrict_vocab rules. Nothing here touches a device:
`prepare` needs only a vocabulary's index, raw rows and norms, so it is tested against gensim alone.
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from ..errors import InvalidInput, LimitExceeded, NotInVocabulary

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
Method = Literal["add", "mul"]
TermAttribute = Literal["weight", "vector"]  # a term's field that a refusal names
# Query vectors are summed term position by term position for all queries at once, until fewer
# than this many queries have terms left; those go on term by term.
_FEW_QUERIES = 8
FLOAT32_MAX = float(np.finfo(np.float32).max)
# 3CosMul: a bound on the product of (1 + cos) / 2 over a query's positive terms, and over its
# negative ones (see _check_cosmul_products).
COSMUL_PRODUCT_LIMIT = 2.0**64


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
    # How refusals name a term's weight or raw vector: as these columns after field_prefix
    # ("packed." gives `packed.weights[3]`, `packed.vectors[0]`), or, for the columns that
    # query_columns makes, as its queries' terms (`queries[0].positive[1].weight`).
    field_prefix: str = ""
    from_queries: bool = False

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


@dataclass(frozen=True)
class QueryVocabulary:
    """What preparing queries reads of a model: gensim's key_to_index, vectors and norms.

    vectors and norms: plain ndarrays (np.memmap indexing is slow per row); norms as
    np.linalg.norm(vectors, axis=1), which is gensim's fill_norms.
    """

    key_to_index: Mapping[str, int]
    vectors: FloatArray
    norms: FloatArray

    @property
    def size(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def not_in_vocabulary(missing: Sequence[str]) -> NotInVocabulary:
    return NotInVocabulary(missing)


def _checked_shape(vector: FloatArray, dim: int, name: str) -> FloatArray:
    if vector.shape != (dim,):
        raise InvalidInput(f"a raw vector has shape {list(vector.shape)}; this model's vectors are [{dim}]")
    _check_float32_range(vector, name)
    return vector.astype(np.float32, copy=False)  # prepare() checks every raw vector's values


def _check_float32_range(vectors: npt.NDArray[np.generic], name: str) -> None:
    """Refuses finite values that float32 cannot hold (a wider float's), before a cast makes them
    infinite; NaN and infinities are prepare()'s to refuse."""
    if vectors.dtype.kind == "f" and vectors.dtype.itemsize > 4 and (np.abs(vectors) > FLOAT32_MAX).any():
        raise InvalidInput(f"{name}: a raw vector holds values beyond float32's range")


def query_columns(queries: Sequence[SimilarityQuery], dim: int) -> QueryColumns:
    """Queries, one object each, as the columns that prepare() reads (raw vectors of `dim` values)."""
    words: list[str] = []
    weights: list[float] = []
    vector_terms: list[int] = []
    vectors: list[FloatArray] = []
    for number, query in enumerate(queries):
        if query.method not in ("add", "mul"):
            raise InvalidInput(f"unknown method {query.method!r}")
        for position, term in enumerate((*query.positive, *query.negative)):
            if (term.word is None) == (term.vector is None):
                raise InvalidInput("each term is either a word or a vector")
            if term.vector is not None:
                vector_terms.append(len(words))
                name = _query_term_field(number, position, len(query.positive), "vector")
                vectors.append(_checked_shape(term.vector, dim, name))
            words.append(term.word or "")
            if term.weight is not None and not math.isfinite(term.weight):
                name = _query_term_field(number, position, len(query.positive), "weight")
                raise InvalidInput(f"{name}: a weight must be finite, got {term.weight}")
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
        from_queries=True,
    )


def _query_term_field(query: int, position: int, positive: int, attribute: str) -> str:
    """How a query object's term field is written: `queries[0].negative[1].weight`."""
    if position < positive:
        return f"queries[{query}].positive[{position}].{attribute}"
    return f"queries[{query}].negative[{position - positive}].{attribute}"


def mean_vectors(
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
    means = np.zeros((queries, vectors.shape[1]), np.float32)
    totals = np.zeros(queries, np.float64)
    if queries < _FEW_QUERIES:  # terms come query by query, each query's in position order
        _add_tails(means, totals, term_query, weights, vectors, np.arange(len(term_query)))
        return _normalized(means, totals)
    by_position = np.argsort(term_position, kind="stable")  # query order within each position
    bounds = np.searchsorted(term_position[by_position], np.arange(term_position.max(initial=-1) + 2))
    for position in range(len(bounds) - 1):
        at = by_position[bounds[position] : bounds[position + 1]]  # at most one term of each query
        if len(at) < _FEW_QUERIES:
            # The long tails of a few queries: a step per term costs less than one per position.
            tail = by_position[bounds[position] :]
            tail = tail[np.argsort(term_query[tail], kind="stable")]  # by query, then position
            _add_tails(means, totals, term_query, weights, vectors, tail)
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
    return _normalized(means, totals)


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
    means: FloatArray,
    totals: npt.NDArray[np.float64],
    term_query: IntArray,
    weights: npt.NDArray[np.float64],
    vectors: FloatArray,
    tail: IntArray,
) -> None:
    """mean_vectors' sums over the rest of each query's terms (`tail`: by query, then by
    position), term by term in gensim's order: float32 mean += float64 weight * vector,
    total += |weight|."""
    product = np.empty(vectors.shape[1], np.float64)
    queries = term_query[tail].tolist()
    for term, query, weight in zip(tail.tolist(), queries, weights[tail].tolist(), strict=True):
        np.multiply(vectors[term], weight, out=product, dtype=np.float64)
        mean = means[query]
        np.add(mean, product, out=mean, casting="same_kind")
        totals[query] += abs(weight)


def prepare(
    queries: QueryColumns | Sequence[SimilarityQuery], vocabulary: QueryVocabulary, *, max_topn: int
) -> PreparedBatch:
    """Checks queries and reduces them to what the search needs (cheap; raises on bad input)."""
    dim, vocab_size = vocabulary.dim, vocabulary.size
    columns = queries if isinstance(queries, QueryColumns) else query_columns(queries, dim)
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
    raw = np.zeros((0, dim), np.float32) if columns.vectors is None else columns.vectors
    if raw.shape != (len(vector_terms), dim):
        raise InvalidInput(
            f"raw vectors of shape {list(raw.shape)} for {len(vector_terms)} raw-vector terms; "
            f"this model's vectors are [{dim}]"
        )
    is_vector = np.zeros(term_count, np.bool_)

    def term_field(term: int, attribute: TermAttribute) -> str:
        return _term_field(columns, positive, negative, vector_terms, term, attribute)

    if len(vector_terms):
        if vector_terms[0] < 0 or vector_terms[-1] >= term_count or (np.diff(vector_terms) <= 0).any():
            raise InvalidInput(f"vector_terms must be increasing indexes below {term_count}")
        finite = np.isfinite(raw).all(axis=1)
        if not finite.all():
            name = term_field(int(vector_terms[np.argmin(finite)]), "vector")
            raise InvalidInput(f"{name}: a raw vector holds NaN or infinite values")
        if raw.dtype != np.float32:  # a core caller's wider floats: as float32, from here on
            for row, vector in enumerate(raw):
                _check_float32_range(vector, term_field(int(vector_terms[row]), "vector"))
            raw = raw.astype(np.float32)
        if any(words[index] for index in vector_terms.tolist()):
            raise InvalidInput("a raw-vector term has a word")
        is_vector[vector_terms] = True
    key_to_index = vocabulary.key_to_index
    rows = np.fromiter(map(key_to_index.get, words, itertools.repeat(-1)), np.int64, term_count)
    rows[is_vector] = -1
    missing = np.flatnonzero((rows < 0) & ~is_vector)
    if len(missing):
        raise not_in_vocabulary(list(dict.fromkeys(words[index] for index in missing.tolist())))

    _check_each(topn >= 0, "topn must be >= 0, got {}", topn)
    if (topn > max_topn).any():
        query = int(np.argmax(topn > max_topn))
        raise LimitExceeded(
            f"query {query}: topn {topn[query]} is over the server's --max-topn {max_topn}",
            limit="max_topn",
            allowed=max_topn,
            requested=int(topn[query]),
        )
    _check_each(restrict >= 0, "restrict_vocab must be >= 0, got {}", restrict)

    term_query = np.repeat(np.arange(count), terms_per_query)
    term_position = np.arange(term_count) - (np.cumsum(terms_per_query) - terms_per_query)[term_query]
    weights = np.where(term_position < positive[term_query], 1.0, -1.0)
    explicit = np.zeros(term_count, np.bool_)
    if columns.weights is not None:
        given = np.asarray(columns.weights, np.float64)
        if given.shape != (term_count,):
            raise InvalidInput(f"weights has {len(given)} values for {term_count} terms")
        explicit = ~np.isnan(given)
        if (explicit & cosmul[term_query]).any():
            raise InvalidInput("weights apply to 3CosAdd only")
        infinite = explicit & ~np.isfinite(given)
        if infinite.any():
            term = int(np.argmax(infinite))
            raise InvalidInput(f"{term_field(term, 'weight')}: a weight must be finite, got {given[term]}")
        weights = np.where(explicit, given, weights)

    # Each term's vector: a word's unit vector (gensim's get_vector(norm=True)), a raw vector as given.
    word_terms = ~is_vector
    model_rows, model_norms = vocabulary.vectors, vocabulary.norms
    if len(vector_terms):
        word_index = np.flatnonzero(word_terms)
        word_rows = rows[word_index]
        vectors = np.empty((term_count, dim), np.float32)
        vectors[word_index] = model_rows[word_rows] / model_norms[word_rows][:, None]
        vectors[vector_terms] = raw
    else:
        word_rows = rows
        vectors = (model_rows[rows] / model_norms[rows][:, None]).astype(np.float32, copy=False)
    add_terms = ~cosmul[term_query]
    # Only given weights and raw vectors can take the arithmetic out of range: +-1 times unit vectors
    # sums to at most the term count.
    if columns.weights is not None or len(vector_terms):
        _check_weighted_sums(count, term_query, add_terms, weights, explicit, vectors, is_vector, term_field)
        if cosmul.any() and len(vector_terms):
            _check_cosmul_products(
                count, term_query, term_position, positive, add_terms, vectors, is_vector, term_field
            )
    if cosmul.any():
        add_vectors = mean_vectors(
            count, term_query[add_terms], term_position[add_terms], weights[add_terms], vectors[add_terms]
        )
    else:
        add_vectors = mean_vectors(count, term_query, term_position, weights, vectors)

    # gensim: `if restrict_vocab:` so 0 searches everything.
    end = np.where(restrict > 0, np.minimum(restrict, vocab_size), vocab_size)
    word_query = term_query[word_terms]
    inside = word_rows < end[word_query]
    stride = max(1, vocab_size)
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


def _term_field(
    columns: QueryColumns,
    positive: IntArray,
    negative: IntArray,
    vector_terms: IntArray,
    term: int,
    attribute: TermAttribute,
) -> str:
    """How the client wrote a term's weight or raw vector: `packed.weights[3]`, `packed.vectors[0]`
    (the raw vectors' row), `queries[0].positive[1].weight` (see QueryColumns.field_prefix)."""
    if columns.from_queries:
        ends = np.cumsum(positive + negative)
        query = int(np.searchsorted(ends, term, side="right"))
        start = int(ends[query] - positive[query] - negative[query])
        return _query_term_field(query, term - start, int(positive[query]), attribute)
    if attribute == "weight":
        return f"{columns.field_prefix}weights[{term}]"
    return f"{columns.field_prefix}vectors[{int(np.searchsorted(vector_terms, term))}]"


TermField = Callable[[int, TermAttribute], str]  # prepare's term_field


def _check_weighted_sums(
    count: int,
    term_query: IntArray,
    add_terms: BoolArray,
    weights: npt.NDArray[np.float64],
    explicit: BoolArray,
    vectors: FloatArray,
    is_vector: BoolArray,
    term_field: TermField,
) -> None:
    """Refuses a 3CosAdd query whose mean_vectors arithmetic could leave float32's range.

    Each component of the float32 mean is a sum of weight x component, so it stays below the sum
    over the query's terms of |weight| x the largest |component| of the term's vector (at most 1
    for a word's unit vector), and rounding each partial sum to float32 adds at most 2**-24 of it
    per term after the first: refused unless that sum, and that rounding, stay within float32's
    largest value (the first product is the bound itself, exactly: one term may reach it). The
    float64 steps after it (over the sum of |weights|, which must be finite too, then to unit
    length) stay in range: the quotient's components are at most about the largest |component|.
    """
    terms = np.flatnonzero(add_terms)
    queries = term_query[terms]
    limits = FLOAT32_MAX / (1 + (np.bincount(queries, minlength=count) - 1).clip(0) * 2.0**-22)
    absolute = np.abs(weights[terms])
    raw = is_vector[terms]
    largest = np.ones(len(terms))
    largest[raw] = np.abs(vectors[terms[raw]]).max(axis=1, initial=0)
    with np.errstate(over="ignore"):  # a bound past float64's range is inf: over the limit all the same
        bounds = absolute * largest
        over = np.bincount(queries, bounds, minlength=count) > limits
        if over.any():  # the words' own largest components, for those queries only
            exact = over[queries] & ~raw
            largest[exact] = np.abs(vectors[terms[exact]]).max(axis=1, initial=0)
            bounds = absolute * largest
            over = np.bincount(queries, bounds, minlength=count) > limits
        if over.any():
            query = int(np.argmax(over))
            term = _first_past(terms, bounds, queries == query, FLOAT32_MAX, 2.0**-22)
            # The larger factor is named, never a weight left unset (a word's cannot cross the limit).
            at = int(np.searchsorted(terms, term))
            blamed: TermAttribute = (
                "vector" if raw[at] and (not explicit[term] or largest[at] > absolute[at]) else "weight"
            )
            raise InvalidInput(
                f"{term_field(term, blamed)}: query {query}'s weighted mean of term vectors would overflow "
                f"float32: the sum over its terms of |weight| x the largest |component| of the term's "
                f"vector (1 at most for a word) must stay below {FLOAT32_MAX:.4g}"
            )
        total_over = ~np.isfinite(np.bincount(queries, absolute, minlength=count))
    if total_over.any():  # possible only with zero vectors: no product bounds their weights
        query = int(np.argmax(total_over))
        term = _first_past(terms, absolute, queries == query, sys.float_info.max)
        raise InvalidInput(
            f"{term_field(term, 'weight')}: query {query}'s sum of |weights| overflows float64"
        )


def _check_cosmul_products(
    count: int,
    term_query: IntArray,
    term_position: IntArray,
    positive: IntArray,
    add_terms: BoolArray,
    vectors: FloatArray,
    is_vector: BoolArray,
    term_field: TermField,
) -> None:
    """Refuses a 3CosMul query whose scores could leave float32's range.

    A term's (1 + cos) / 2 lies within (1 + |v|) / 2 of 0, |v| its vector's length (1 for a
    word's unit vector, a raw vector's as given), so every partial product over a query's positive
    terms, or over its negative ones, is at most the product of max(1, (1 + |v|) / 2) over them:
    refused unless that is below COSMUL_PRODUCT_LIMIT, 2**64. A denominator, the negative product
    plus 1e-6 in float32, is then finite and either 0 or at least 2**-44 in magnitude (where the
    sum cancels, both lie on float32's grid of 2**-44), so a score is at most 2**108, far below
    float32's largest value (about 2**128) whatever the rounding. Exactly 0 takes a negative
    product of exactly -1e-6, which only raw negative vectors longer than 1 can give (as in
    gensim); that depends on the vocabulary's rows and is not refused here.
    """
    terms = np.flatnonzero(~add_terms & is_vector)
    if not len(terms):
        return
    lengths = np.linalg.norm(vectors[terms].astype(np.float64), axis=1)
    logs = np.log2(np.maximum(1.0, (1 + lengths) / 2))
    queries = term_query[terms]
    sides = queries * 2 + (term_position[terms] >= positive[queries])  # 2q: positive, 2q + 1: negative
    limit = math.log2(COSMUL_PRODUCT_LIMIT)
    over = np.bincount(sides, logs, minlength=2 * count) > limit
    if over.any():
        side = int(np.argmax(over))
        term = _first_past(terms, logs, sides == side, limit)
        kind = "negative" if side % 2 else "positive"
        raise InvalidInput(
            f"{term_field(term, 'vector')}: query {side // 2}'s 3CosMul scores would overflow float32: "
            f"the product of (1 + |v|) / 2 over its {kind} raw vectors longer than 1 (|v| a vector's "
            f"length) must stay below 2**{limit:.0f}"
        )


def _first_past(
    terms: IntArray, amounts: npt.NDArray[np.float64], members: BoolArray, limit: float, rounding: float = 0
) -> int:
    """The first of these terms (where members) whose amount takes their running sum past limit,
    the sum of k terms counted (1 + (k - 1) x rounding) times."""
    running = 0.0
    member_terms, member_amounts = terms[members].tolist(), amounts[members].tolist()
    for index, (term, amount) in enumerate(zip(member_terms, member_amounts, strict=True)):
        running += amount  # Python floats: inf past float64's range, without a warning
        if running * (1 + index * rounding) > limit:
            return int(term)
    return int(member_terms[-1])


def _check_each(valid: BoolArray, problem: str, values: IntArray | None = None) -> None:
    """InvalidInput naming the first query where valid is False (and its value, for a {} in problem)."""
    if not valid.all():
        query = int(np.argmin(valid))
        detail = problem if values is None else problem.format(values[query])
        raise InvalidInput(f"query {query}: {detail}")
