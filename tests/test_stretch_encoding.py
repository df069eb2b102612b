"""Texts encoded stretch by stretch give tiktoken's tokens exactly, and stop soon after they are
told to, whichever encoder a stretch went to."""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tiktoken
from embedserve.server.core import Cancelled, InvalidInput, Tokenizer, load_gpt2_tokenizer
from embedserve.server.core.stretch_encoding import (
    IN_THREAD_MAX_CHARS,
    ChildProcessEncoder,
    InThreadEncoder,
    encode_planned,
    encode_stoppable,
    encoder_for,
    plan_encoding,
    plan_stretches,
)
from hypothesis import given, settings
from hypothesis import strategies as st

# Unicode's White_Space property (PropList.txt): what the pre-tokenizer's \s matches.
WHITE_SPACE = [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029]
WHITE_SPACE += [0x202F, 0x205F, 0x3000]
PIECES = [" ", "  ", "\n", "\n\n", "\t", "\r\n", "a", "Zq", "word", "1", "234", ".", "!?", "'s", "'ll"]
PIECES += ["'", "é", "中文", "🙂", "\u00a0", "\u3000", "\u2028", "\x1c", "\x85", "<|endoftext|>", "aaaa"]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return load_gpt2_tokenizer()


def test_python_whitespace_covers_the_pre_tokenizers() -> None:
    """A cut follows a character Python's str.isspace() calls non-whitespace: never one the
    pre-tokenizer's \\s matches."""
    assert all(chr(point).isspace() for point in WHITE_SPACE)


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(PIECES), max_size=60), stretch_chars=st.integers(1, 12))
def test_stretches_encode_as_the_whole_text(
    tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding, parts: list[str], stretch_chars: int
) -> None:
    text = "".join(parts)
    spans = plan_stretches(text, tokenizer.cut_before, stretch_chars)
    assert spans[0][0] == 0
    assert spans[-1][1] == len(text)
    assert all(end == start for (_, end), (start, _) in itertools.pairwise(spans))
    joined = [
        i for start, end in spans for i in reference_encoding.encode(text[start:end], allowed_special="all")
    ]
    assert joined == reference_encoding.encode(text, allowed_special="all")


def test_long_texts_are_cut_where_they_allow_it(
    tokenizer: Tokenizer, reference_encoding: tiktoken.Encoding
) -> None:
    words = "the quick brown fox jumps over the lazy dog.\n" * 30_000
    run = "a" * (IN_THREAD_MAX_CHARS + 1000)  # one pre-tokenizer piece: no cut inside
    text = words + run + " " + words
    plan = plan_encoding(tokenizer, [text, "short"])
    stretches = plan.stretches[0]
    assert len(stretches) > 20
    longest = max(end - start for start, end in stretches)
    assert len(run) <= longest < len(run) + 70_000
    assert encoder_for(longest) is not encoder_for(1)  # the run goes to a child process
    assert plan.longest_in_child >= len(run)
    ids, lengths = encode_planned(tokenizer, plan, (), threading.Event())
    expected = [reference_encoding.encode(text), reference_encoding.encode("short")]
    assert lengths == [len(e) for e in expected]
    assert ids.dtype == np.int32
    assert ids.tolist() == expected[0] + expected[1]


def test_an_encoding_without_a_proven_cut_is_one_stretch(tokenizer: Tokenizer) -> None:
    assert plan_stretches("a b " * 100_000, "", 10) == [(0, 400_000)]


@pytest.mark.parametrize("encoder", [InThreadEncoder(), ChildProcessEncoder()], ids=["thread", "child"])
def test_each_encoder_gives_tiktokens_ids_and_refusals(
    encoder: InThreadEncoder | ChildProcessEncoder,
    tokenizer: Tokenizer,
    reference_encoding: tiktoken.Encoding,
) -> None:
    text = "Hello <|endoftext|> world " + "x" * 5000
    ids = encoder.encode(tokenizer, text, {"<|endoftext|>"}, threading.Event())
    assert ids.tolist() == reference_encoding.encode(text, allowed_special={"<|endoftext|>"})
    with pytest.raises(InvalidInput, match="allowed_special"):
        encoder.encode(tokenizer, text, set(), threading.Event())


def _children() -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        children = (task / "children").read_text().split()
        found.update(int(pid) for pid in children)
    return found


@pytest.mark.parametrize(
    ("text", "kind"),
    [("b" * (32 << 20), "one long piece: a child process, killed"), ("ab " * (16 << 20), "many stretches")],
    ids=["child", "thread"],
)
def test_a_stop_ends_the_work_within_a_second(tokenizer: Tokenizer, text: str, kind: str) -> None:
    before = _children()
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        encode_stoppable(tokenizer, text, (), stop)
    stopped_after = time.monotonic() - started - 0.5
    timer.join()
    assert stopped_after < 1.0, kind
    assert _children() <= before  # no encoder left running


def test_a_child_process_takes_a_large_stretch_whole(tokenizer: Tokenizer) -> None:
    """Tens of megabytes to and from the child (more than a pipe holds at once)."""
    text = " " * (24 << 20)  # one token a byte: 96 MiB of IDs back
    ids = ChildProcessEncoder().encode(tokenizer, text, set(), threading.Event())
    expected = tokenizer.encode(text)
    assert len(ids) == len(expected)
    assert np.array_equal(ids, expected)
