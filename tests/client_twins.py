"""Both clients through one interface, so a test of the client API runs against each (as authzed-py does).

A test takes `AsyncClient`-typed `client` and awaits it as usual; for the synchronous `Client` it
gets `SyncAsAsync(client)`, which makes each call on the sync client itself and hands back what
that call returned: values as awaitables, iterators as async iterators, shared-memory regions as
async context managers. Nothing here re-implements a client method.

The sync calls block the test's event loop while they run, so the server a twin calls must run
on a loop of its own (conftest's ServerThread), not on the test's.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator
from typing import Any, cast

from embedserve.client import AsyncClient, Client, SyncSharedMemoryRegion, SyncWordVectors

CLIENT_KINDS = ("async", "sync")


async def _done(value: Any) -> Any:
    return value


async def _each(items: Generator[Any, None, None]) -> AsyncGenerator[Any, None]:
    try:
        for item in items:
            yield item
    finally:
        items.close()


def _unwrapped(value: Any) -> Any:
    return value.sync_object if isinstance(value, SyncAsAsync) else value


class SyncAsAsync:
    """A synchronous Client (or its word_vectors, or a region) seen through its async twin."""

    def __init__(self, sync_object: object) -> None:
        self.sync_object = sync_object

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.sync_object, name)
        if isinstance(attribute, SyncWordVectors):
            return SyncAsAsync(attribute)
        if not callable(attribute):
            return attribute
        return self._as_async(attribute)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "sync_object":
            object.__setattr__(self, name, value)
        else:
            setattr(self.sync_object, name, value)

    @staticmethod
    def _as_async(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*map(_unwrapped, args), **{k: _unwrapped(v) for k, v in kwargs.items()})
            if isinstance(result, Generator):
                return _each(result)
            if isinstance(result, SyncSharedMemoryRegion):
                return SyncAsAsync(result)
            return _done(result)

        return call

    async def __aenter__(self) -> SyncAsAsync:
        self.sync_object.__enter__()  # type: ignore[attr-defined]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        self.sync_object.__exit__(exc_type, exc, tb)  # type: ignore[attr-defined]


@contextlib.asynccontextmanager
async def open_client(kind: str, target: str, **options: Any) -> AsyncIterator[AsyncClient]:
    """An AsyncClient, or a Client behind SyncAsAsync (typed as the AsyncClient it stands in for)."""
    if kind == "async":
        async with AsyncClient(target, **options) as client:
            yield client
    else:
        with Client(target, **options) as sync_client:
            yield cast(AsyncClient, SyncAsAsync(sync_client))
