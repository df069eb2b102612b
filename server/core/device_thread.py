"""The one thread per torch device on which a server process runs all of its torch work.

Every thread that has run a parallel torch operator leads an OpenMP team of its own. Once a
process's teams hold more threads than there are cores, libgomp stops spinning, and every operator
then wakes sleeping threads through the kernel, in every team (docs/performance.md, "Design: one
device thread"). So embedding lookups, word-vector scans and the device steps of loading models all
run on one long-lived thread per device, fed by the batchers.

Holders take a lease: `DeviceThread.shared(device)` in the process's registry, or `share()` of a
lease they were given. A lease's `close()` cancels its own queued work and is idempotent; the thread
stops when the last lease on it closes, and the next `shared()` starts a fresh one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Any, ParamSpec, TypeVar

import torch

from .errors import Cancelled

__all__ = ["DeviceThread", "DeviceThreadClosed"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

THREAD_NAME_PREFIX = "embedserve-device"


class DeviceThreadClosed(Cancelled):
    """Work given to a closed lease, or cancelled because its lease closed: the holder is shutting down."""


class _Worker:
    """The thread itself and how many leases hold it; only the registry creates and stops one."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.leases = 0
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{THREAD_NAME_PREFIX}-{key}")
        # Started now, not at the first lookup, so its identity is known from the start.
        self.ident: int = self.executor.submit(threading.get_ident).result()


_registry_lock = threading.Lock()
# The process's threads, by device: one process, one thread per device, whoever asks.
_workers: dict[str, _Worker] = {}


def _acquire(key: str) -> _Worker:
    with _registry_lock:
        worker = _workers.get(key)
        if worker is None:
            worker = _workers[key] = _Worker(key)
        worker.leases += 1
        return worker


def _release(worker: _Worker) -> None:
    with _registry_lock:
        worker.leases -= 1
        if worker.leases > 0:
            return
        if _workers.get(worker.key) is worker:
            del _workers[worker.key]
    # No lease is left to submit: whatever is still queued belongs to no one.
    worker.executor.shutdown(wait=False, cancel_futures=True)


class DeviceThread(Executor):
    """One holder's lease on the thread that runs this process's torch work on `device`.

    An Executor (the batchers run their batches on it); `call` runs a function there and waits.
    """

    def __init__(self, worker: _Worker, device: torch.device) -> None:
        """Use `shared()` or `share()`."""
        self._worker = worker
        self.device = device
        self._lock = threading.Lock()
        self._closed = False
        self._pending: set[Future[Any]] = set()

    @classmethod
    def shared(cls, device: torch.device | str) -> DeviceThread:
        """A new lease on this process's thread for `device` (started if none runs).

        Name CUDA devices with their index (`resolve_device` does): "cuda" and "cuda:0" are two keys.
        """
        device = torch.device(device)
        return cls(_acquire(str(device)), device)

    def share(self) -> DeviceThread:
        """Another lease on the same thread, closed on its own (for a component this holder builds)."""
        with self._lock:
            if self._closed:
                raise DeviceThreadClosed(f"the device thread lease for {self.device} is closed")
            return DeviceThread.shared(self.device)

    @property
    def ident(self) -> int:
        """The thread's `threading.get_ident()` (equal for every lease on one device's thread)."""
        return self._worker.ident

    @property
    def closed(self) -> bool:
        return self._closed

    def on_thread(self) -> bool:
        """Whether the caller is running on this thread."""
        return threading.get_ident() == self._worker.ident

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        """Queues fn(*args, **kwargs) on the thread; DeviceThreadClosed once this lease is closed."""
        with self._lock:
            if self._closed:
                raise DeviceThreadClosed(
                    f"the device thread for {self.device} is closed: the server is shutting down"
                )
            future = self._worker.executor.submit(fn, *args, **kwargs)
            self._pending.add(future)
        future.add_done_callback(self._done)
        return future

    def _done(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    def call(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """fn(*args, **kwargs) on the thread, waiting for its result (at once when already on it).

        DeviceThreadClosed when this lease closes before it ran."""
        if self.on_thread():
            if self._closed:
                raise DeviceThreadClosed(f"the device thread for {self.device} is closed")
            return fn(*args, **kwargs)
        future = self.submit(fn, *args, **kwargs)
        try:
            return future.result()
        except CancelledError:
            raise DeviceThreadClosed(
                f"the device thread for {self.device} closed before this work ran"
            ) from None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Closes this lease (the Executor interface); the thread stops with the last lease."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending = list(self._pending)
        if cancel_futures:
            for future in pending:
                future.cancel()
        if wait and not self.on_thread():
            wait_for(pending)
        _release(self._worker)

    def close(self) -> None:
        """Closes this lease at once, cancelling its queued work (work running now finishes).
        Idempotent."""
        self.shutdown(wait=False, cancel_futures=True)

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"DeviceThread({str(self.device)!r}, ident={self.ident}, {state})"
