"""The servicers' way into the memory budget: what a call reserves is held until the call ends."""

from __future__ import annotations

from typing import Any

from .core.memory_budget import MemoryBudget, Reservation


async def hold_for_call(budget: MemoryBudget, context: Any, nbytes: int, what: str) -> Reservation:
    """`nbytes` of the budget (waiting for room; see MemoryBudget.reserve), given back when the
    call ends however it ends: a reply is held until gRPC has sent it, or the caller has gone.
    The holder may shrink it meanwhile."""
    reservation = await budget.reserve(nbytes, what)
    context.add_done_callback(lambda _: reservation.release())
    if context.done():  # ended while it waited: the callback may never run
        reservation.release()
    return reservation


class SentReplies:
    """The reservations of a stream's replies, each given back once the reply after it has been
    written too, the last one when the call ends: gRPC may still hold a reply's bytes after its
    write has returned, until it has passed them to the socket, but not past the next write."""

    def __init__(self, context: Any) -> None:
        self._last: Reservation | None = None
        context.add_done_callback(lambda _: self._release_last())

    def written(self, reservation: Reservation) -> None:
        """`reservation`'s reply has been written: the one before it has surely left."""
        self._release_last()
        self._last = reservation

    def _release_last(self) -> None:
        if self._last is not None:
            self._last.release()
            self._last = None
