"""Encoding long texts in stretches that stop when their call ends.

A text is cut into stretches where the tokenizer says a cut cannot change its tokens
(Tokenizer.cut_before), and the stretches are encoded one by one: between two of them the
work checks `stop`, which the servicer sets when the call is cancelled or its deadline passes.

tiktoken cannot be interrupted inside one call, and one pre-tokenizer piece (a long run of one
character, a long word with no space) is encoded in one call, at a few MB/s and about fifty bytes
of memory per byte. So each stretch goes to one of two encoders, chosen in `encoder_for`:

- InThreadEncoder: tiktoken on the calling thread, for stretches short enough to end soon after
  a stop;
- ChildProcessEncoder: tiktoken in a child process, for longer ones; a stop kills the child, so
  its CPU and memory are given back at once.
"""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal, Protocol

import numpy as np

from .errors import Cancelled, InvalidInput
from .request_memory import encode_working_bytes, utf8_per_char
from .tokenizer import AllowedSpecial, TokenIds, Tokenizer, special_token_refusal

# Stretches are about this long (characters) where the text allows a cut: short enough that a
# stop is seen within a fraction of a second even at tiktoken's slowest rate.
STRETCH_CHARS = 1 << 16
# Longer stretches (no safe cut for this long) are encoded in a child process.
IN_THREAD_MAX_CHARS = 1 << 18
_WORKER = Path(__file__).with_name("_encode_worker.py")
_POLL_SECONDS = 0.05
_DISALLOWED_SPECIAL_EXIT = 2  # _encode_worker.DISALLOWED_SPECIAL_EXIT

Allowed = Literal["all"] | set[str]


_NON_SPACE = re.compile(r"\S")


@cache
def _cut_characters(cut_before: str) -> re.Pattern[str]:
    return re.compile(f"[{re.escape(cut_before)}]")


def _next_cut(text: str, start: int, cut_before: str) -> int | None:
    """The first safe cut at or after `start`: a character of `cut_before` after a non-whitespace
    one (a character class and str.isspace are scanned in C; a lookbehind is much slower)."""
    characters = _cut_characters(cut_before)
    position = start
    while (found := characters.search(text, position)) is not None:
        cut = found.start()
        if cut > 0 and not text[cut - 1].isspace():
            return cut
        after_run = _NON_SPACE.search(text, cut)  # inside a run of whitespace: past it
        if after_run is None:
            return None
        position = after_run.start()
    return None


def plan_stretches(text: str, cut_before: str, stretch_chars: int = STRETCH_CHARS) -> list[tuple[int, int]]:
    """(start, end) of each stretch of `text`, in order, covering it: each ends at the first safe
    cut at least `stretch_chars` after its start (so a stretch is longer only where the text
    has no cut). One stretch when `cut_before` is empty."""
    if not cut_before or len(text) <= stretch_chars:
        return [(0, len(text))]
    spans = []
    start = 0
    while len(text) - start > stretch_chars:
        cut = _next_cut(text, start + stretch_chars, cut_before)
        if cut is None:
            break
        spans.append((start, cut))
        start = cut
    spans.append((start, len(text)))
    return spans


class StretchEncoder(Protocol):
    """Encodes one stretch; raises Cancelled once `stop` is set, as soon as it can."""

    def encode(
        self, tokenizer: Tokenizer, text: str, allowed: Allowed, stop: threading.Event
    ) -> TokenIds: ...


class InThreadEncoder:
    """tiktoken on the calling thread: a stretch short enough to finish soon after a stop."""

    def encode(self, tokenizer: Tokenizer, text: str, allowed: Allowed, stop: threading.Event) -> TokenIds:
        if stop.is_set():
            raise Cancelled("the call ended")
        return tokenizer.encode_checked(text, allowed)


class ChildProcessEncoder:
    """tiktoken in a child process of its own, which a stop kills: a long stretch without a safe
    cut (one long pre-tokenizer piece) is work that tiktoken cannot interrupt.

    The child reads its job from a file and writes the IDs to another (no pipes: the parent only
    waits, so nothing can block on a full pipe)."""

    def encode(self, tokenizer: Tokenizer, text: str, allowed: Allowed, stop: threading.Event) -> TokenIds:
        if stop.is_set():
            raise Cancelled("the call ended")
        with (
            tempfile.TemporaryFile() as job,
            tempfile.TemporaryFile() as output,
            tempfile.TemporaryFile() as errors,
        ):
            pickle.dump(
                {**tokenizer.definition(), "allowed_special": allowed, "text": text},
                job,
                protocol=pickle.HIGHEST_PROTOCOL,
            )
            job.seek(0)
            child = subprocess.Popen(
                [sys.executable, "-I", str(_WORKER)], stdin=job, stdout=output, stderr=errors
            )
            try:
                while True:
                    try:
                        child.wait(_POLL_SECONDS)
                        break
                    except subprocess.TimeoutExpired:
                        if stop.is_set():
                            raise Cancelled("the call ended") from None
            finally:
                if child.returncode is None:
                    child.kill()
                    child.wait()
            errors.seek(0)
            if child.returncode == _DISALLOWED_SPECIAL_EXIT:
                raise special_token_refusal(errors.read().decode(errors="replace"))
            if child.returncode != 0:
                raise RuntimeError(
                    f"the encoding child process failed ({child.returncode}): "
                    f"{errors.read().decode(errors='replace')}"
                )
            output.seek(0)
            return np.frombuffer(output.read(), dtype="<u4").view(np.int32)


_IN_THREAD = InThreadEncoder()
_CHILD_PROCESS = ChildProcessEncoder()


def encoder_for(stretch_chars: int) -> StretchEncoder:
    """The one place that chooses: long stretches go to a child process."""
    return _IN_THREAD if stretch_chars <= IN_THREAD_MAX_CHARS else _CHILD_PROCESS


@dataclass(frozen=True)
class EncodePlan:
    """Texts cut into stretches, and what encoding them holds in memory at most."""

    texts: Sequence[str]
    stretches: Sequence[Sequence[tuple[int, int]]]  # per text, (start, end) of each stretch
    text_bytes: int  # UTF-8 bytes of the texts, at most
    longest_in_thread: int  # UTF-8 bytes of the longest stretch encoded on the thread, at most
    longest_in_child: int  # ... and in a child process (0: none)

    @property
    def working_bytes(self) -> int:
        return encode_working_bytes(self.text_bytes, self.longest_in_thread, self.longest_in_child)


def plan_encoding(tokenizer: Tokenizer, texts: Sequence[str]) -> EncodePlan:
    """Where each text is cut (see plan_stretches), and the encoders' memory."""
    stretches = []
    text_bytes = in_thread = in_child = 0
    for text in texts:
        spans = plan_stretches(text, tokenizer.cut_before)
        per_char = utf8_per_char(text)
        text_bytes += per_char * len(text)
        for start, end in spans:
            if encoder_for(end - start) is _IN_THREAD:
                in_thread = max(in_thread, per_char * (end - start))
            else:
                in_child = max(in_child, per_char * (end - start))
        stretches.append(spans)
    return EncodePlan(texts, stretches, text_bytes, in_thread, in_child)


def encode_planned(
    tokenizer: Tokenizer, plan: EncodePlan, allowed_special: AllowedSpecial, stop: threading.Event
) -> tuple[TokenIds, list[int]]:
    """tokenizer.encode() of every text of the plan, stretch by stretch: all IDs concatenated, and
    each text's length. Cancelled once `stop` is set; InvalidInput names the text at fault."""
    allowed = tokenizer.allowed(allowed_special)
    parts: list[TokenIds] = []
    lengths = []
    for index, (text, spans) in enumerate(zip(plan.texts, plan.stretches, strict=True)):
        length = 0
        for start, end in spans:
            try:
                ids = encoder_for(end - start).encode(tokenizer, text[start:end], allowed, stop)
            except InvalidInput as exc:
                raise InvalidInput(f"texts[{index}]: {exc}") from None
            parts.append(ids)
            length += len(ids)
        lengths.append(length)
    if len(parts) == 1:
        return parts[0], lengths
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return flat, lengths


def encode_stoppable(
    tokenizer: Tokenizer, text: str, allowed_special: AllowedSpecial, stop: threading.Event
) -> TokenIds:
    """tokenizer.encode(text, allowed_special), stretch by stretch; Cancelled once `stop` is set."""
    return encode_planned(tokenizer, plan_encoding(tokenizer, [text]), allowed_special, stop)[0]
