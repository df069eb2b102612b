"""word_vectors.analogies: evaluate_analogies gives gensim's evaluate_word_analogies figures."""

from __future__ import annotations

from pathlib import Path

import pytest
from embedserve.server.core.word_vectors import WordVectors, evaluate_analogies

from .word_vector_cases import TEST_DATA, glove_reference_of, load_glove


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


@pytest.fixture(scope="module")
def glove(vector_cache: Path) -> WordVectors:
    return load_glove(vector_cache)


def test_analogy_evaluation_equals_gensim(glove: WordVectors, tmp_path: Path) -> None:
    questions = tmp_path / "questions.txt"
    questions.write_text(_questions_subset(sections=3))
    score, sections = glove_reference_of(glove).evaluate_word_analogies(str(questions), restrict_vocab=30000)
    report = glove.evaluate_analogies(questions.read_text(), restrict_vocab=30000)
    assert report.accuracy == pytest.approx(score)
    expected = [(s["section"], len(s["correct"]), len(s["incorrect"])) for s in sections[:-1]]
    assert [(s.name, s.correct, s.incorrect) for s in report.sections] == expected
    assert report.correct + report.incorrect > 100
    assert evaluate_analogies(glove, questions.read_text(), restrict_vocab=30000) == report
