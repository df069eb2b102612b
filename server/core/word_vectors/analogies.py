"""Analogy evaluation: gensim's KeyedVectors.evaluate_word_analogies on a questions-words file."""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import CancelledError, Executor
from dataclasses import dataclass
from typing import Protocol

from ..errors import Cancelled, InvalidInput
from .query import SimilarityQuery, Term

_LOGGER = logging.getLogger(__name__)


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


class AnalogyModel(Protocol):
    """What the evaluation asks of a model (WordVectors has it)."""

    @property
    def words(self) -> Sequence[str]: ...

    @property
    def key_to_index(self) -> Mapping[str, int]: ...

    def most_similar(self, queries: Sequence[SimilarityQuery]) -> list[list[tuple[str, float]]]: ...


def evaluate_analogies(
    model: AnalogyModel,
    questions: str,
    *,
    restrict_vocab: int = 300000,
    case_insensitive: bool = True,
    batch_size: int = 512,
    cancel: threading.Event | None = None,
) -> AnalogyReport:
    """KeyedVectors.evaluate_word_analogies on the text of a questions-words file (3CosAdd, topn 5):
    b - a + c among the first restrict_vocab words, the best answer that is not a, b or c.
    Raises Cancelled before the next batch once `cancel` is set."""
    words, key_to_index = model.words, model.key_to_index
    ok_keys = words[:restrict_vocab]
    fold = str.upper if case_insensitive else str
    ok_vocab = {fold(k): key_to_index[k] for k in reversed(ok_keys)}
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
            if cancel is not None and cancel.is_set():
                raise Cancelled("the call ended before its analogy evaluation finished")
            chunk = quads[first : first + batch_size]
            answers = model.most_similar(
                [
                    SimilarityQuery(
                        positive=(Term(words[ok_vocab[b]]), Term(words[ok_vocab[c]])),
                        negative=(Term(words[ok_vocab[a]]),),
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
    return AnalogyReport(report_sections, total_correct, total_incorrect, questions_seen, out_of_vocabulary)


class _ScansOn:
    """A model whose scans run on `executor` (the scan thread), one batch at a time."""

    def __init__(self, model: AnalogyModel, executor: Executor) -> None:
        self._model, self._executor = model, executor
        self.words, self.key_to_index = model.words, model.key_to_index

    def most_similar(self, queries: Sequence[SimilarityQuery]) -> list[list[tuple[str, float]]]:
        try:
            scan = self._executor.submit(self._model.most_similar, queries)
            return scan.result()
        except CancelledError as stopped:  # the executor shut down with this scan queued
            raise Cancelled("the server is shutting down") from stopped
        except RuntimeError as stopped:
            if "shutdown" not in str(stopped):  # "cannot schedule new futures after shutdown"
                raise
            raise Cancelled("the server is shutting down") from stopped


class AnalogyEvaluator:
    """Evaluations on one loaded model, for a server.

    Each batch's scan waits its turn on the scan thread, so the similarity queries of other calls
    wait for one batch, not for a whole evaluation. The model never changes, so a finished report
    is kept (the newest `keep`) and the same evaluation asked again costs nothing.
    """

    def __init__(self, model: AnalogyModel, scan_executor: Executor, keep: int = 8) -> None:
        self._model = _ScansOn(model, scan_executor)
        self._keep = keep
        self._reports: OrderedDict[tuple[bytes, int, bool], AnalogyReport] = OrderedDict()
        self._lock = threading.Lock()

    def evaluate(
        self,
        questions: str,
        *,
        restrict_vocab: int = 300000,
        case_insensitive: bool = True,
        cancel: threading.Event | None = None,
    ) -> AnalogyReport:
        # Every restrict_vocab past the vocabulary means the whole vocabulary.
        restrict = min(restrict_vocab, len(self._model.words))
        key = (hashlib.sha256(questions.encode()).digest(), restrict, case_insensitive)
        with self._lock:
            if (report := self._reports.get(key)) is not None:
                self._reports.move_to_end(key)
                return report
        try:
            report = evaluate_analogies(
                self._model, questions, restrict_vocab=restrict, case_insensitive=case_insensitive,
                cancel=cancel,
            )  # fmt: skip
        except Cancelled:
            _LOGGER.info("analogy evaluation stopped: its call ended first")
            raise
        with self._lock:
            self._reports[key] = report
            while len(self._reports) > self._keep:
                self._reports.popitem(last=False)
        return report
