"""Analogy evaluation: gensim's KeyedVectors.evaluate_word_analogies on a questions-words file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import InvalidInput
from .query import SimilarityQuery, Term


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
) -> AnalogyReport:
    """KeyedVectors.evaluate_word_analogies on the text of a questions-words file (3CosAdd, topn 5):
    b - a + c among the first restrict_vocab words, the best answer that is not a, b or c."""
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
