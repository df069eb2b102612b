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

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
import torch

from .errors import InvalidInput, LimitExceeded, NotFound

FloatArray = npt.NDArray[np.float32]
Method = Literal["add", "mul"]
# gensim's epsilon in most_similar_cosmul's denominator.
COSMUL_EPSILON = 0.000001
# (vocabulary block, its norms, a [queries, rows] buffer it may fill) -> scores
_Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# Columns per group in the two-stage top-k.
_TOPK_GROUP = 64


@dataclass(frozen=True)
class Term:
    """One positive or negative term: a word or a raw vector, with an optional weight (3CosAdd only)."""

    word: str | None = None
    vector: FloatArray | None = None
    weight: float | None = None


@dataclass(frozen=True)
class SimilarityQuery:
    positive: Sequence[Term] = ()
    negative: Sequence[Term] = ()
    topn: int = 10
    restrict_vocab: int | None = None
    method: Method = "add"


@dataclass
class PreparedQuery:
    """A query reduced to what the search needs."""

    topn: int
    end: int  # search rows [0, end)
    excluded: list[int]
    add_vector: FloatArray | None = None
    mul_positive: list[FloatArray] = field(default_factory=list)
    mul_negative: list[FloatArray] = field(default_factory=list)


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


class WordVectors:
    """A vocabulary and its raw vectors, resident on a torch device with their norms."""

    def __init__(
        self,
        words: Sequence[str],
        vectors: FloatArray,
        *,
        name: str,
        source: str,
        device: torch.device,
        norms: FloatArray | None = None,
        block_rows: int = 32768,
        max_topn: int = 10000,
    ) -> None:
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
        self._block_rows = block_rows
        self.max_topn = max_topn
        with warnings.catch_warnings():
            # Memory-mapped caches are read-only; nothing here writes to them.
            warnings.simplefilter("ignore", UserWarning)
            self._vectors = torch.from_numpy(vectors).to(device)
            self._norms = torch.from_numpy(self.norms).to(device)
        # gensim would score a zero vector NaN; here it is never returned.
        self._zero_rows = torch.from_numpy(self.norms == 0).to(device) if np.any(self.norms == 0) else None

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
            raise NotFound(f"not in the vocabulary: {', '.join(repr(w) for w in missing)}")

    def get_vectors(self, words: Sequence[str]) -> tuple[FloatArray, list[str]]:
        """Raw vectors [len(words), D]; rows of missing words are zero and the words are listed."""
        out = np.zeros((len(words), self.dim), dtype=np.float32)
        for row, word in enumerate(words):
            index = self.key_to_index.get(word)
            if index is not None:
                out[row] = self.vectors[index]
        return out, self.missing(words)

    def unit_vector(self, word: str) -> FloatArray:
        """get_vector(word, norm=True)."""
        index = self.key_to_index[word]
        return self.vectors[index] / self.norms[index]  # type: ignore[no-any-return]

    # Pairs

    def similarity(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """KeyedVectors.similarity for each pair: dot(unitvec(v1), unitvec(v2))."""
        self._require([w for pair in pairs for w in pair])
        return [
            float(
                np.dot(
                    _unitvec(self.vectors[self.key_to_index[a]]), _unitvec(self.vectors[self.key_to_index[b]])
                )
            )
            for a, b in pairs
        ]

    def distance(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[float], list[float]]:
        """(cosine distance as KeyedVectors.distance, euclidean norm of the raw difference)."""
        cosine = [1 - s for s in self.similarity(pairs)]
        euclidean = [
            float(np.linalg.norm(self.vectors[self.key_to_index[a]] - self.vectors[self.key_to_index[b]]))
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

    def _mean_vector(self, query: SimilarityQuery) -> FloatArray:
        """most_similar's query: get_mean_vector(pre_normalize=True, post_normalize=True), step by step."""
        terms = [*query.positive, *query.negative]
        weights = np.concatenate((np.ones(len(query.positive)), -1.0 * np.ones(len(query.negative))))
        for index, term in enumerate(terms):
            if term.weight is not None:
                weights[index] = term.weight
        mean = np.zeros(self.dim, np.float32)
        total_weight = 0.0
        for index, term in enumerate(terms):
            vec = (
                self._check_vector(term.vector)
                if term.vector is not None
                else self.unit_vector(term.word or "")
            )
            mean += weights[index] * vec
            total_weight += abs(weights[index])
        if total_weight > 0:
            mean = mean / total_weight
        return _unitvec(mean).astype(np.float32)

    def _prepare(self, query: SimilarityQuery) -> PreparedQuery:
        terms = [*query.positive, *query.negative]
        if not terms:
            raise InvalidInput("a query needs at least one positive or negative term")
        if query.method == "mul" and not query.positive:
            raise InvalidInput("3CosMul needs at least one positive term")
        for term in terms:
            if (term.word is None) == (term.vector is None):
                raise InvalidInput("each term is either a word or a vector")
        self._require([t.word for t in terms if t.word is not None])
        if query.topn < 0:
            raise InvalidInput(f"topn must be >= 0, got {query.topn}")
        if query.topn > self.max_topn:
            raise LimitExceeded(f"topn {query.topn} is over the server's --max-topn {self.max_topn}")
        restrict = query.restrict_vocab
        if restrict is not None and restrict < 0:
            raise InvalidInput(f"restrict_vocab must be >= 0, got {restrict}")
        # gensim: `if restrict_vocab:` so 0 and None both search everything.
        end = min(restrict, self.vocab_size) if restrict else self.vocab_size
        excluded = sorted({self.key_to_index[t.word] for t in terms if t.word is not None})
        prepared = PreparedQuery(topn=query.topn, end=end, excluded=excluded)
        if query.method == "add":
            prepared.add_vector = self._mean_vector(query)
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
        return [self._prepare(q) for q in queries]

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
                self._search(add, prepared, results, self._add_scorer([prepared[i] for i in add]))
            if mul:
                self._search(mul, prepared, results, self._mul_scorer([prepared[i] for i in mul]))
        return results

    def _add_scorer(self, group: list[PreparedQuery]) -> _Scorer:
        queries = torch.from_numpy(np.stack([p.add_vector for p in group if p.add_vector is not None]))
        queries = queries.to(self.device)

        def score(block: torch.Tensor, norms: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            # Into a reused buffer: a fresh [queries, rows] tensor per block costs as much as the product.
            return torch.mm(queries, block.T, out=out).div_(norms)

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

        def score(block: torch.Tensor, norms: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
            shifted = (1 + torch.mm(term_matrix, block.T) / norms) / 2  # [terms, rows]
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
    ) -> None:
        group = [prepared[i] for i in members]
        end = max(p.end for p in group)
        k = min(max(p.topn for p in group), end)
        best_scores = torch.full((len(group), 0), -math.inf, device=self.device)
        best_rows = torch.zeros((len(group), 0), dtype=torch.int64, device=self.device)
        buffer = torch.empty(len(group) * min(self._block_rows, end), device=self.device)
        for start in range(0, end, self._block_rows):
            stop = min(start + self._block_rows, end)
            scores = score(
                self._vectors[start:stop],
                self._norms[start:stop],
                buffer[: len(group) * (stop - start)].view(len(group), stop - start),
            )
            if self._zero_rows is not None:
                scores.masked_fill_(self._zero_rows[start:stop], -math.inf)
            for row, p in enumerate(group):
                if p.end < stop:
                    scores[row, max(p.end - start, 0) :] = -math.inf
                for index in p.excluded:
                    if start <= index < stop:
                        scores[row, index - start] = -math.inf
            block_scores, block_rows = _block_topk(scores, min(k, stop - start))
            best_scores = torch.cat([best_scores, block_scores], dim=1)
            best_rows = torch.cat([best_rows, block_rows + start], dim=1)
            best_scores, keep = torch.topk(best_scores, min(k, best_scores.shape[1]), dim=1)
            best_rows = torch.gather(best_rows, 1, keep)
        top_scores, top_rows = best_scores.cpu().tolist(), best_rows.cpu().tolist()
        for row, member in enumerate(members):
            topn = prepared[member].topn
            results[member] = [
                (self.words[index], float(value))
                for index, value in zip(top_rows[row][:topn], top_scores[row][:topn], strict=True)
                if value != -math.inf
            ]

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


def _block_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(scores, k, dim=1), in two stages when the rows are long.

    The k best of a row lie in the k column groups with the largest maxima, so
    a cheap max per group of 64 picks k groups and topk runs on those alone.
    (Among exactly tied scores it may keep a different one, as topk itself may.)
    """
    rows, columns = scores.shape
    if columns % _TOPK_GROUP or columns < 4 * _TOPK_GROUP * k:
        return torch.topk(scores, k, dim=1, sorted=False)
    grouped = scores.view(rows, columns // _TOPK_GROUP, _TOPK_GROUP)
    best_groups = torch.topk(grouped.amax(dim=2), k, dim=1, sorted=False).indices
    offsets = torch.arange(_TOPK_GROUP, device=scores.device)
    candidates = (best_groups[:, :, None] * _TOPK_GROUP + offsets).view(rows, k * _TOPK_GROUP)
    values, picked = torch.topk(scores.gather(1, candidates), k, dim=1, sorted=False)
    return values, candidates.gather(1, picked)
