"""WordVectorSlot: a model loading in the background, and a close that stops the load."""

from __future__ import annotations

import threading

import pytest
from embedserve.server.core import Cancelled, NotReady
from embedserve.server.core.word_vector_slot import WordVectorSlot
from embedserve.server.core.word_vectors import WordVectors


def test_slot_close_stops_a_load_and_reports_one_that_will_not_stop() -> None:
    def cooperative(cancel: threading.Event) -> WordVectors | None:
        cancel.wait(60)
        raise Cancelled("stopped")

    slot = WordVectorSlot("model", cooperative)
    slot.start()
    assert slot.loading
    assert slot.close(timeout=10)
    with pytest.raises(NotReady, match="shutting down"):
        _ = slot.model

    release = threading.Event()

    def stubborn(cancel: threading.Event) -> WordVectors | None:
        release.wait(60)
        return None

    slot = WordVectorSlot("model", stubborn)
    slot.start()
    assert not slot.close(timeout=0.1)
    release.set()
    assert slot.wait(10)
