"""Work on a worker thread that stops when the call it serves ends.

A gRPC call that is cancelled, or whose deadline passes, cancels the task awaiting its work; a
thread cannot be cancelled, so the work is given a `stop` event to check between its steps, set
as soon as the awaiting task ends, however it ends.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TypeVar

_T = TypeVar("_T")


async def run_stoppable(work: Callable[[threading.Event], _T], executor: Executor | None = None) -> _T:
    """work(stop) in `executor` (the loop's default: None); `stop` is set once this returns or is
    cancelled, so work that checks it (raising core.errors.Cancelled) ends soon after its call."""
    stop = threading.Event()
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, work, stop)
    finally:
        stop.set()
