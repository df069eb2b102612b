"""Client: AsyncClient's methods for scripts and notebooks, without async/await.

Calls run on a private event loop in a background thread, so a Client also
works inside Jupyter, whose own loop is already running.
"""

from __future__ import annotations

import asyncio
import threading
import types
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Generator, Iterable, Sequence
from typing import Any, Literal, TypeVar

import numpy.typing as npt

from ._async import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TARGET, AsyncClient, EmbeddingDtype
from ._values import Batch, EmbeddingInfo
from ._word_vectors import SyncWordVectors

_T = TypeVar("_T")
_END = object()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    if loop.is_closed():
        return
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


class Client:
    """The synchronous twin of AsyncClient; use as `with Client(target) as client:`."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 30.0,
        stream_timeout: float = 24 * 3600.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        api_key: str | None = None,
        root_certificates: bytes | None = None,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
    ) -> None:
        """As AsyncClient: api_key, and TLS from root_certificates / client_certificate + client_key."""
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
                api_key=api_key,
                root_certificates=root_certificates,
                client_certificate=client_certificate,
                client_key=client_key,
            )

        self._async = self._run(make())
        self.word_vectors = SyncWordVectors(self._async.word_vectors, self._run)
        """gensim-style word-vector queries, as on AsyncClient.word_vectors but without await."""

    @property
    def target(self) -> str:
        return self._async.target

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("a Client cannot be called from its own event-loop thread")
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
        if self._loop.is_closed():
            return
        self._run(self._async.close())
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        self.close()

    def tokenize(self, text: str, *, allowed_special: Iterable[str] | Literal["all"] = ()) -> list[int]:
        return self._run(self._async.tokenize(text, allowed_special=allowed_special))

    def tokenize_batch(
        self, texts: Sequence[str], *, allowed_special: Iterable[str] | Literal["all"] = ()
    ) -> list[list[int]]:
        return self._run(self._async.tokenize_batch(texts, allowed_special=allowed_special))

    def detokenize(self, token_ids: npt.ArrayLike) -> str:
        return self._run(self._async.detokenize(token_ids))

    def stream_batches(
        self,
        *,
        text: str | None = None,
        corpus: str | None = None,
        batch_size: int = 4,
        max_length: int = 256,
        stride: int = 128,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        include_embeddings: bool = False,
        embeddings_dtype: EmbeddingDtype = "float32",
        epoch: int = 0,
        epochs: int = 1,
        rank: int = 0,
        world_size: int = 1,
        cursor: bytes | None = None,
        reconnect_attempts: int = 5,
        batches_per_message: int | None = None,
    ) -> Generator[Batch, None, None]:
        """AsyncClient.stream_batches, as a plain iterator."""
        return self._iterate(
            self._async.stream_batches(
                text=text,
                corpus=corpus,
                batch_size=batch_size,
                max_length=max_length,
                stride=stride,
                shuffle=shuffle,
                seed=seed,
                drop_last=drop_last,
                include_embeddings=include_embeddings,
                embeddings_dtype=embeddings_dtype,
                epoch=epoch,
                epochs=epochs,
                rank=rank,
                world_size=world_size,
                cursor=cursor,
                reconnect_attempts=reconnect_attempts,
                batches_per_message=batches_per_message,
            )
        )

    def embed(
        self,
        token_ids: npt.ArrayLike,
        *,
        include_positional: bool = True,
        position_offset: int = 0,
        dtype: EmbeddingDtype = "float32",
    ) -> npt.NDArray[Any]:
        return self._run(
            self._async.embed(
                token_ids, include_positional=include_positional, position_offset=position_offset, dtype=dtype
            )
        )

    def embed_stream(
        self,
        windows: Iterable[npt.ArrayLike],
        *,
        include_positional: bool = True,
        position_offset: int = 0,
        dtype: EmbeddingDtype = "float32",
    ) -> Generator[npt.NDArray[Any], None, None]:
        """Pulls `windows` in a worker thread, so a slow or blocking iterable stalls only this stream."""
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
