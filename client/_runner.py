"""How a synchronous twin runs its async original's coroutines: on the Client's event-loop thread."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

_T = TypeVar("_T")


class Runner(Protocol):
    def __call__(self, coroutine: Coroutine[Any, Any, _T]) -> _T: ...
