"""WordVectors: a vocabulary and its vectors, answering as gensim's KeyedVectors (4.x) does.

Lookups and pair queries are plain numpy on the host. most_similar queries are prepared
(query.prepare, gensim's semantics) and scanned by the model's Scanner, picked at load time
(factory.choose_scanner): one matrix product of the queries against the vocabulary, in row
blocks with a running top-k, on the model's torch device.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import torch

from ..device_thread import DeviceThread
from ..errors import InvalidInput
from .analogies import AnalogyReport, evaluate_analogies
from .factory import PrefilterSetting, choose_scanner
from .query import (
    FloatArray,
    PreparedBatch,
    QueryColumns,
    QueryVocabulary,
    RankedLists,
    SimilarityQuery,
    not_in_vocabulary,
    prepare,
    query_columns,
)
from .scanner import ScanLog, Scanner
from .search_rows import SearchRows, unit_rows

_LOGGER = logging.getLogger(__name__)


def _unitvec(vector: FloatArray) -> FloatArray:
    """gensim.matutils.unitvec for a dense float vector (a zero vector stays zero)."""
    norm = np.sqrt(np.sum(vector**2))
    if norm > 0:
        return (vector / norm).astype(vector.dtype)  # type: ignore[no-any-return]
    return vector


class WordVectors:
    """A vocabulary and its raw vectors (on the host), with unit-length copies on a torch device."""

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
        prefilter: PrefilterSetting | bool | None = None,
        unit_bfloat16: npt.NDArray[np.uint16] | None = None,
        device_thread: DeviceThread | None = None,
    ) -> None:
        """prefilter: scan 3CosAdd queries in bfloat16 first and score in float32 only the
        columns that may rank ("auto" or None: where this CPU multiplies bfloat16 natively); the
        results are the float32 scan's (see factory.choose_scanner). unit_bfloat16: the unit rows
        already rounded to bfloat16 (as uint16 bits, e.g. memory-mapped from the cache).
        block_rows: rows per scanned block (None: sized by the scanner).
        device_thread: where the torch steps (the rows onto the device, the scanner's choice and
        its checks) run; None: the calling thread. The host steps run on the calling thread.
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
        self._vocabulary = QueryVocabulary(self.key_to_index, self._rows, self._row_norms)
        self.max_topn = max_topn
        # gensim would score a zero vector NaN; here it is never returned. Nor is a vector holding
        # NaN or infinities (a damaged file), whose every score gensim would make NaN.
        damaged = ~np.isfinite(self.norms)
        if np.any(damaged):
            _LOGGER.warning(
                "%s: %d vectors hold NaN or infinite values; they are never returned",
                name,
                int(np.sum(damaged)),
            )
        with warnings.catch_warnings():
            # Memory-mapped caches are read-only; nothing here writes to them.
            warnings.simplefilter("ignore", UserWarning)
            unit = unit_rows(self._rows, self._row_norms) if unit is None else unit
        never_ranked = damaged | (self.norms == 0)

        def placed() -> tuple[SearchRows, Scanner]:
            with warnings.catch_warnings():  # torch warns of read-only arrays, as above
                warnings.simplefilter("ignore", UserWarning)
                rows = SearchRows.on_device(unit, never_ranked, device)
            scanner = choose_scanner(
                rows, prefilter=prefilter, block_rows=block_rows, unit_bfloat16=unit_bfloat16
            )
            return rows, scanner

        self.search_rows, self._scanner = placed() if device_thread is None else device_thread.call(placed)

    @property
    def scanner(self) -> Scanner:
        """How searches scan the vocabulary (picked at load time; tests and benchmarks swap it)."""
        return self._scanner

    @scanner.setter
    def scanner(self, scanner: Scanner) -> None:
        if scanner.rows is not self.search_rows:
            raise ValueError("a scanner of another model's rows")
        self._scanner = scanner

    @property
    def prefilter(self) -> bool:
        """Whether 3CosAdd scans use the bfloat16 prefilter (on CPU) or candidate scan (elsewhere)."""
        return self._scanner.prefilter

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
            raise not_in_vocabulary(missing)

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

    def query_columns(self, queries: Sequence[SimilarityQuery]) -> QueryColumns:
        """Queries, one object each, as the columns that prepare() reads."""
        return query_columns(queries, self.dim)

    def prepare(self, queries: QueryColumns | Sequence[SimilarityQuery]) -> PreparedBatch:
        """Checks queries and reduces them to what the search needs (cheap; raises on bad input)."""
        return prepare(queries, self._vocabulary, max_topn=self.max_topn)

    def most_similar(
        self, queries: Sequence[SimilarityQuery], log: ScanLog | None = None
    ) -> list[list[tuple[str, float]]]:
        """One ranked (word, score) list per query; all queries share one blocked scan."""
        return self.search(self.prepare(queries), log).lists(self.words)

    def search_many(self, batches: Sequence[PreparedBatch]) -> list[RankedLists]:
        """Several prepared batches (e.g. concurrent requests) in one scan, answered each."""
        return self.search(PreparedBatch.concat(batches)).split([len(b) for b in batches])

    def search(self, batch: PreparedBatch, log: ScanLog | None = None) -> RankedLists:
        """The scan itself, for queries from prepare(): 3CosAdd and 3CosMul queries apart."""
        scanner = self._scanner
        searched = batch.topn > 0
        if len(batch) and searched.all() and not batch.cosmul.any():  # the common case: one group
            with torch.inference_mode():
                scores, rows = scanner.search(batch, log)
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
                scores, rows = scanner.search_cosmul(group, log) if cosmul else scanner.search(group, log)
                best_scores[members, : scores.shape[1]] = scores.cpu().numpy()
                best_rows[members, : rows.shape[1]] = rows.cpu().numpy()
        return RankedLists.from_best(best_scores, best_rows, batch.topn)

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
        return evaluate_analogies(
            self,
            questions,
            restrict_vocab=restrict_vocab,
            case_insensitive=case_insensitive,
            batch_size=batch_size,
        )
