"""StreamingDataset under torch's DataLoader and torchdata's StatefulDataLoader, with forked workers.

The loaders run in a child process (tests/loader_runs.py): this process runs a gRPC server, and a
process forked from it could not use gRPC. Every row is checked against its offset in the token
stream; "resumed" means k batches, a checkpoint through torch.save, a fresh loader, the rest.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from embedserve.client import BatchSettings, Client

from .conftest import ServerThread

REPO = Path(__file__).resolve().parents[1]
# 1,219 tokens: 152 windows of 8, so 50 batches of 3 and a short one of 2 windows, which with two
# workers goes to the first (51 batches there, 50 with drop_last).
TEXT = " ".join(f"w{i % 41} {i}" for i in range(404))
SETTINGS: BatchSettings = {"batch_size": 3, "max_length": 8, "stride": 8, "seed": 5}
Rows = list[list[list[int]]]


class TokenStream:
    """The source's token IDs, and each window's offset in them."""

    def __init__(self, target: str, text: str, max_length: int, stride: int) -> None:
        with Client(target) as client:
            self.ids = client.tokenize(text, allowed_special="all")
        self.max_length = max_length
        self.starts = list(range(0, len(self.ids) - max_length, stride))
        self._offset = {tuple(self.ids[i : i + max_length]): i for i in self.starts}
        assert len(self._offset) == len(self.starts), "windows must be distinct to be located"

    def offsets(self, batches: list[Rows]) -> list[int]:
        """Each row's offset, in order, checking that its target is the window shifted by one."""
        found = []
        for inputs, targets in batches:
            for row, target in zip(inputs, targets, strict=True):
                start = self._offset[tuple(row)]
                assert target == self.ids[start + 1 : start + 1 + self.max_length]
                found.append(start)
        return found


@pytest.fixture(scope="module")
def stream(tiny_server: ServerThread) -> TokenStream:
    return TokenStream(tiny_server.target, TEXT, SETTINGS["max_length"], SETTINGS["stride"])


LOADERS = [(num_workers, stateful) for num_workers in (0, 2) for stateful in (False, True)]
STEPS: list[dict[str, Any]] = [
    # First, before anything else used gRPC here: one call of a Client, then forked workers.
    {"scenario": "fork_after_grpc", "use": "info", "num_workers": 2, "settings": {"drop_last": False}},
    {"scenario": "fork_after_grpc", "use": "pass", "num_workers": 2, "settings": {"drop_last": False}},
    {"scenario": "fork_after_grpc", "use": "closed", "num_workers": 2, "settings": {"drop_last": False}},
    *(
        {"scenario": "resume", "num_workers": num_workers, "settings": {"drop_last": drop_last}}
        for num_workers in (0, 2)
        for drop_last in (True, False)
    ),
    {"scenario": "passes", "loaders": LOADERS, "settings": {"drop_last": False}},
    {"scenario": "fork_after_grpc", "use": "open", "num_workers": 2},
]


@pytest.fixture(scope="module")
def replies(tiny_server: ServerThread) -> list[dict[str, Any]]:
    """Every step of STEPS, run in one child process (the interpreter starts once: seconds)."""
    job = {"target": tiny_server.target, "text": TEXT, "settings": SETTINGS, "steps": STEPS}
    done = subprocess.run(
        [sys.executable, "-m", "tests.loader_runs", json.dumps(job)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "Task was destroyed" not in done.stderr, done.stderr[-4000:]
    assert "Event loop is closed" not in done.stderr, done.stderr[-4000:]
    found: list[dict[str, Any]] = json.loads(done.stdout.strip().splitlines()[-1])
    return found


def _reply(replies: list[dict[str, Any]], **step: Any) -> dict[str, Any]:
    """The reply of the step whose fields include `step`."""
    (index,) = [i for i, s in enumerate(STEPS) if step.items() <= {**s, **s.get("settings", {})}.items()]
    return replies[index]


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("drop_last", [True, False])
def test_a_stateful_loader_resumes_after_any_batch_with_exactly_the_rest(
    replies: list[dict[str, Any]], stream: TokenStream, num_workers: int, drop_last: bool
) -> None:
    reply = _reply(replies, scenario="resume", num_workers=num_workers, drop_last=drop_last)
    full = reply["full"]
    n = len(full)
    assert sorted(int(k) for k in reply["resumed"]) == sorted({0, 1, n // 2, n - 1, n})
    offsets = stream.offsets(full)
    assert len(set(offsets)) == len(offsets)
    assert len(stream.starts) == 152
    if drop_last:
        assert n == 50
        assert len(offsets) == 150
    else:
        assert n == 51
        assert sorted(offsets) == stream.starts  # every window once, the short batch included
    for k, batches in reply["resumed"].items():
        assert batches == full, f"resumed after {k} of {n} batches"


@pytest.mark.slow
def test_passes_repeat_and_set_epoch_moves_on_with_and_without_workers(
    replies: list[dict[str, Any]], stream: TokenStream
) -> None:
    """Both paths agree: each iteration of a loader is a whole pass from the dataset's epoch."""
    runs = _reply(replies, scenario="passes")
    for num_workers, stateful in LOADERS:
        run = runs[f"{num_workers},{stateful}"]
        where = f"num_workers={num_workers}, stateful={stateful}"
        first = stream.offsets(run["first"])
        assert Counter(first) == Counter(stream.starts), where  # each window exactly once
        assert run["second"] == run["first"], where
        epoch_1 = stream.offsets(run["epoch_1"])
        assert Counter(epoch_1) == Counter(stream.starts), where
        assert epoch_1 != first, where


@pytest.mark.slow
def test_workers_forked_after_grpc_use_in_the_parent_work_or_say_why(
    replies: list[dict[str, Any]], stream: TokenStream
) -> None:
    """The default start method (fork) after a Client's call, a pass at num_workers=0, or a closed
    Client still in a variable, in the parent: the workers read every window once. With a Client
    still open there they refuse with a message naming the fix instead of crashing."""
    for use in ("info", "pass", "closed"):
        reply = _reply(replies, scenario="fork_after_grpc", use=use)
        assert "error" not in reply, (use, reply)
        assert Counter(stream.offsets(reply["batches"])) == Counter(stream.starts), use
    assert _reply(replies, scenario="fork_after_grpc", use="closed")["after_close"] == "the Client is closed"
    error = _reply(replies, scenario="fork_after_grpc", use="open")["error"]
    assert "forked while its parent held a gRPC channel" in error
    assert "multiprocessing_context='forkserver'" in error


def test_closing_a_stream_early_leaves_no_pending_task(
    tiny_server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """A Client closed right after an abandoned stream waits for gRPC to report the cancellation:
    no "Task was destroyed but it is pending!", no "Event loop is closed" from the next loop."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    for _ in range(30):
        with Client(tiny_server.target) as client:
            batches = client.stream_batches(text=TEXT, **SETTINGS)
            next(batches)
            batches.close()
    gc.collect()
    with Client(tiny_server.target) as client:  # a later loop handles any late event
        client.info()
    gc.collect()
    assert not [r.getMessage() for r in caplog.records], caplog.text
