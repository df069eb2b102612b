"""Client: AsyncClient's methods for scripts and notebooks, without async/await.

Calls run on a private event loop in a background thread, so a Client also
works inside Jupyter, whose own loop is already running.
"""

from __future__ import annotations

import asyncio
import threading
import types
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Coroutine,
    Generator,
    Iterable,
    Sequence,
)
from typing import Any, Literal, TypeVar, Unpack

import numpy.typing as npt

from ._async import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TARGET, AsyncClient
from ._batch_spec import BatchSettings, BatchSpec, EmbeddingDtype
from ._shared_memory import SyncSharedMemoryRegion
from ._values import Batch, EmbeddingInfo
from ._word_vectors import SyncWordVectors

_T = TypeVar("_T")
_END = object()


# How long close() lets the calls it cancelled hear back from gRPC before it stops their loop.
_SETTLE_SECONDS = 2.0


async def _settle() -> None:
    """Waits (bounded) for the loop's other tasks: a cancelled call's status task is still pending
    until gRPC reports the cancellation, and a loop closed before then logs "Task was destroyed
    but it is pending!" (or "Event loop is closed" from the next Client's loop)."""
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks() if task is not current]
    if pending:
        await asyncio.wait(pending, timeout=_SETTLE_SECONDS)


class _Closed:
    """Stands in for a closed Client's AsyncClient, so that the channels can be freed (a process
    forked later must not inherit a live gRPC channel) and any use says the Client is closed."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError("the Client is closed")

    def __setattr__(self, name: str, value: Any) -> None:
        raise RuntimeError("the Client is closed")


_CLOSED: Any = _Closed()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if loop.is_closed():
        return
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


class Client:
    """The synchronous twin of AsyncClient; use as `with Client(target) as client:`.

    Every public method and attribute of AsyncClient is here with the same parameters (a test
    holds them together), run on the Client's own event-loop thread. What differs: streams are
    plain iterators, `embed_stream` takes a plain iterable (pulled in a worker thread), and
    `shared_memory()` gives a region used as `with client.shared_memory(n) as region:`.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 30.0,
        stream_timeout: float = 24 * 3600.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        connections: int = 4,
        api_key: str | None = None,
        root_certificates: bytes | None = None,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
    ) -> None:
        """As AsyncClient: connections, api_key, and TLS from root_certificates / client_certificate
        + client_key."""
        if timeout <= 0 or stream_timeout <= 0:
            raise ValueError("timeouts must be positive")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embedserve-client", daemon=True)
        self._thread.start()
        # A Client that is never closed still stops its thread when collected.
        self._finalizer = weakref.finalize(self, _stop_loop, self._loop, self._thread)

        async def make() -> AsyncClient:
            return AsyncClient(
                target,
                timeout=timeout,
                stream_timeout=stream_timeout,
                max_message_bytes=max_message_bytes,
                options=options,
                connections=connections,
                api_key=api_key,
                root_certificates=root_certificates,
                client_certificate=client_certificate,
                client_key=client_key,
            )

        self._regions: weakref.WeakSet[SyncSharedMemoryRegion] = weakref.WeakSet()
        try:
            self._async = self._run(make())
        except BaseException:
            self._finalizer()  # a refused argument leaves no thread behind
            raise
        self._target = self._async.target
        self.word_vectors = SyncWordVectors(self._async.word_vectors, self._run)
        """gensim-style word-vector queries, as on AsyncClient.word_vectors but without await."""

    @property
    def target(self) -> str:
        return self._target

    @property
    def timeout(self) -> float:
        """Seconds that bound every unary call; setting it changes the calls made from then on."""
        return self._async.timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._async.timeout = seconds

    @property
    def stream_timeout(self) -> float:
        """Seconds that bound every stream."""
        return self._async.stream_timeout

    @stream_timeout.setter
    def stream_timeout(self, seconds: float) -> None:
        self._async.stream_timeout = seconds

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("a Client cannot be called from its own event-loop thread")
        if self._loop.is_closed():
            coroutine.close()
            raise RuntimeError("the Client is closed")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _iterate(self, iterator: AsyncGenerator[_T, None]) -> Generator[_T, None, None]:
        async def next_item() -> tuple[bool, _T | None]:
            try:
                return True, await anext(iterator)
            except StopAsyncIteration:
                return False, None

        try:
            while True:
                more, item = self._run(next_item())
                if not more:
                    return
                yield item  # type: ignore[misc]
        finally:
            if not self._loop.is_closed():
                self._run(iterator.aclose())

    def close(self) -> None:
        """Closes the regions from `shared_memory()` still open, then the connections."""
        if self._loop.is_closed():
            return
        for region in list(self._regions):
            region.close()
        self._run(self._async.close())
        self._run(_settle())
        self._finalizer()
        # Nothing of this Client refers to its channels any more: once collected, gRPC's poller
        # thread stops, and a DataLoader may fork workers with the Client still in a variable.
        self._async = _CLOSED
        self.word_vectors = SyncWordVectors(_CLOSED, self._run)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        self.close()

    # Tokenizer

    def tokenize_batch(
        self, texts: Sequence[str], *, allowed_special: Iterable[str] | Literal["all"] = ()
    ) -> list[list[int]]:
        return self._run(self._async.tokenize_batch(texts, allowed_special=allowed_special))

    def tokenize(self, text: str, *, allowed_special: Iterable[str] | Literal["all"] = ()) -> list[int]:
        return self._run(self._async.tokenize(text, allowed_special=allowed_special))

    def detokenize(self, token_ids: npt.ArrayLike) -> str:
        return self._run(self._async.detokenize(token_ids))

    # Batches

    def stream_batches(
        self,
        *,
        text: str | None = None,
        corpus: str | None = None,
        spec: BatchSpec | None = None,
        cursor: bytes | None = None,
        reconnect_attempts: int = 5,
        **settings: Unpack[BatchSettings],
    ) -> Generator[Batch, None, None]:
        """AsyncClient.stream_batches, as a plain iterator."""
        return self._iterate(
            self._async.stream_batches(
                text=text,
                corpus=corpus,
                spec=spec,
                cursor=cursor,
                reconnect_attempts=reconnect_attempts,
                **settings,
            )
        )

    # Embedding

    def embed(
        self,
        token_ids: npt.ArrayLike,
        *,
        include_positional: bool = True,
        position_offset: int = 0,
        dtype: EmbeddingDtype = "float32",
        output: SyncSharedMemoryRegion | None = None,
        output_offset: int = 0,
    ) -> npt.NDArray[Any]:
        """As AsyncClient.embed; `output` is a region from this Client's `shared_memory()`."""
        return self._run(
            self._async.embed(
                token_ids,
                include_positional=include_positional,
                position_offset=position_offset,
                dtype=dtype,
                output=None if output is None else output._region,
                output_offset=output_offset,
            )
        )

    def shared_memory(self, byte_size: int) -> SyncSharedMemoryRegion:
        """A shared-memory region of byte_size bytes for `embed(..., output=region)`; the server must
        run on this host. Use as `with client.shared_memory(n) as region:`; leaving the block (or
        losing the connection) releases it on both sides."""
        region = SyncSharedMemoryRegion(self._async.shared_memory(byte_size), self._run)
        self._regions.add(region)
        return region

    def embed_stream(
        self,
        windows: Iterable[npt.ArrayLike],
        *,
        include_positional: bool = True,
        position_offset: int = 0,
        dtype: EmbeddingDtype = "float32",
    ) -> Generator[npt.NDArray[Any], None, None]:
        """Embeddings of each window, in order, over one bidirectional stream. `windows` is pulled in
        a worker thread, so a slow or blocking iterable stalls only this stream; an async iterable
        is refused (a TypeError): it belongs to a caller's event loop, so use AsyncClient there."""
        if isinstance(windows, AsyncIterable):
            raise TypeError("Client.embed_stream takes a plain iterable; use AsyncClient for an async one")
        source = iter(windows)

        async def pulled() -> AsyncIterator[npt.ArrayLike]:
            while (window := await asyncio.to_thread(next, source, _END)) is not _END:
                yield window  # type: ignore[misc]

        return self._iterate(
            self._async.embed_stream(
                pulled(), include_positional=include_positional, position_offset=position_offset, dtype=dtype
            )
        )

    def info(self) -> EmbeddingInfo:
        return self._run(self._async.info())
