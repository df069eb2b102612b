"""A word-vector model that loads in the background while the server already answers."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from .device_thread import DeviceThread
from .errors import Cancelled, NotReady
from .word_vectors import AnalogyEvaluator, WordVectors

_LOGGER = logging.getLogger(__name__)


class WordVectorSlot:
    """Holds the model once loaded; until then (or after a failed load) every use is NotReady.

    `load(cancel)` should check `cancel` between its steps and raise Cancelled once it is set, so
    that `close()` can stop a long first-time conversion instead of exiting under a busy thread.
    """

    def __init__(
        self,
        spec: str,
        load: Callable[[threading.Event], WordVectors | None],
        *,
        device_thread: DeviceThread | None = None,
    ) -> None:
        """device_thread: a lease on the thread of the device the model loads on (the slot takes its
        own lease on that thread and closes it in close()); None: the process's CPU thread."""
        self.spec = spec
        self._load = load
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None
        self.load_seconds = 0.0
        self._model: WordVectors | None = None
        self._analogies: AnalogyEvaluator | None = None
        self._error: str | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._started = False
        self._callbacks: list[Callable[[bool], None]] = []
        # Where vector scans run, the batchers' of every server and the analogy evaluations': the
        # process's one thread for the device, which the embedding lookups share.
        self.device_thread = DeviceThread.shared("cpu") if device_thread is None else device_thread.share()
        # Large requests' decoding, preparation and replies, off the event loop: two at a time, so
        # many large calls at once queue here rather than all holding their term vectors together.
        self.request_executor = ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="embedserve-vector-requests"
        )

    @property
    def enabled(self) -> bool:
        return self.spec != "none"

    def load_now(self) -> None:
        started = time.perf_counter()
        try:
            model = self._load(self._cancel)
            if model is not None:
                self._analogies = AnalogyEvaluator(model, self.device_thread)
            self._model = model
            self.load_seconds = time.perf_counter() - started
            # The vocabulary (a str per word and a dict) lives as long as the process. Moving it out
            # of the collector's generations stops every full collection from walking it again,
            # a pause taken from whichever call triggers it (docs/performance.md has the figure).
            gc.freeze()
        except Cancelled:
            self._error = "the server is shutting down"
            _LOGGER.info("word vectors %s: loading stopped, the server is shutting down", self.spec)
        except Exception as exc:
            self._error = str(exc)
            _LOGGER.error("word vectors %s failed to load: %s", self.spec, exc)
        finally:
            self._done.set()

    def start(self) -> None:
        """Loads in a background thread (once); callbacks run there when it is done."""
        with self._lock:
            if self._started:
                return
            self._started = True

        def run() -> None:
            self.load_now()
            with self._lock:
                callbacks, self._callbacks = self._callbacks, []
            for callback in callbacks:
                callback(self._model is not None)

        self._thread = threading.Thread(target=run, name="embedserve-vector-load", daemon=True)
        self._thread.start()

    def add_done_callback(self, callback: Callable[[bool], None]) -> None:
        """callback(ready) once loading ends; at once if it already has."""
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(callback)
                return
        callback(self._model is not None)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def model(self) -> WordVectors:
        if self._model is not None:
            return self._model
        if self._error is not None:
            raise NotReady(f"word vectors {self.spec!r} failed to load: {self._error}")
        raise NotReady(f"word vectors {self.spec!r} are still loading")

    @property
    def analogies(self) -> AnalogyEvaluator:
        """Analogy evaluations on the model (NotReady as `model` is)."""
        if self._analogies is None:
            self.model  # noqa: B018 (raises NotReady, saying why)
            raise NotReady(f"word vectors {self.spec!r} are not loaded")
        return self._analogies

    @property
    def loading(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def close(self, timeout: float = 10.0) -> bool:
        """Stops the scans and any load in progress; False when the load did not stop within `timeout`.

        The slot's queued scans are cancelled and its lease on the device thread given back."""
        self._cancel.set()
        self.device_thread.close()
        self.request_executor.shutdown(wait=False, cancel_futures=True)
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.loading
