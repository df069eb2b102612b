"""word_vectors.analogies: evaluate_analogies gives gensim's evaluate_word_analogies figures."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from embedserve.server.core.errors import Cancelled
from embedserve.server.core.word_vectors import AnalogyEvaluator, WordVectors, evaluate_analogies

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


class _RecordingExecutor(ThreadPoolExecutor):
    """One thread, like the scan thread; it records what ran, in order."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.ran: list[str] = []
        self.first_scan = threading.Event()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        name = getattr(fn, "__name__", "?")
        self.ran.append(name)
        if name == "most_similar":
            self.first_scan.set()
        return super().submit(fn, *args, **kwargs)


def test_an_evaluation_lets_other_scans_run_between_its_batches(glove: WordVectors) -> None:
    questions = _questions_subset(sections=5)  # a few thousand questions: several batches of 512
    executor = _RecordingExecutor()
    evaluator = AnalogyEvaluator(glove, executor)
    reports: list[Any] = []
    evaluating = threading.Thread(target=lambda: reports.append(evaluator.evaluate(questions)))
    evaluating.start()
    assert executor.first_scan.wait(60)

    def other_query() -> None: ...

    executor.submit(other_query).result(timeout=60)
    evaluating.join(120)
    executor.shutdown()
    scans = executor.ran.count("most_similar")
    assert scans >= 4
    assert executor.ran.index("other_query") < len(executor.ran) - 1, executor.ran
    assert reports == [glove.evaluate_analogies(questions)]


def test_a_finished_evaluation_is_kept_and_a_cancelled_one_is_not(glove: WordVectors) -> None:
    questions = _questions_subset(sections=2)
    executor = _RecordingExecutor()
    evaluator = AnalogyEvaluator(glove, executor)
    stopped = threading.Event()
    stopped.set()
    with pytest.raises(Cancelled, match="call ended"):
        evaluator.evaluate(questions, cancel=stopped)
    assert executor.ran == []
    report = evaluator.evaluate(questions, restrict_vocab=glove.vocab_size)
    scans = len(executor.ran)
    assert scans > 0
    # A restrict_vocab past the vocabulary is the same evaluation: answered from the kept report.
    assert evaluator.evaluate(questions, restrict_vocab=10**9, cancel=stopped) is report
    assert len(executor.ran) == scans
    evaluator.evaluate(questions, restrict_vocab=30000)
    assert len(executor.ran) > scans
    executor.shutdown()
    with pytest.raises(Cancelled, match="shutting down"):
        evaluator.evaluate(questions + ": more\n" + questions.splitlines()[1] + "\n")
