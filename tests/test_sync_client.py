"""What only the synchronous Client does: its own event-loop thread, worker-thread pulls, clean-up.

The API both clients share is tested against each in test_client_api.py.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
from embedserve.client import Client
from embedserve.server.app import Components

from .conftest import ServerThread


def _released(components: Components) -> bool:
    """Whether the server has let go of every region (it does when their sessions end)."""
    for _ in range(100):
        if len(components.shared_memory) == 0:
            return True
        time.sleep(0.02)
    return False


async def test_sync_client_works_inside_a_running_event_loop(server: ServerThread) -> None:
    # As in Jupyter, where a loop is already running in the caller's thread.
    with Client(server.target) as client:
        assert client.tokenize("loop") == [26268]


def test_sync_embed_stream_pulls_in_a_worker_thread(server: ServerThread) -> None:
    with Client(server.target) as client:

        def windows() -> Iterator[list[int]]:
            for text in ("one", "two words", "three more words"):
                yield client.tokenize(text)  # the same Client, called from the producer

        shapes = [e.shape for e in client.embed_stream(windows())]
        assert shapes == [(1, 256), (2, 256), (3, 256)]

        def broken() -> Iterator[list[int]]:
            yield [1]
            raise RuntimeError("producer broke")

        with pytest.raises(RuntimeError, match="producer broke"):
            list(client.embed_stream(broken()))


def test_sync_clients_leave_no_threads_behind(server: ServerThread) -> None:
    def client_threads() -> int:
        return sum(t.name == "embedserve-client" for t in threading.enumerate())

    before = client_threads()
    with pytest.raises(ValueError, match="positive"):
        Client(server.target, timeout=0)
    for _ in range(3):
        client = Client(server.target)
        client.info()
        del client
    gc.collect()
    with Client(server.target) as client:
        client.info()
    assert client_threads() == before


def test_sync_regions_close_with_their_block_or_their_client(
    server: ServerThread, default_components: Components
) -> None:
    with Client(server.target, connections=1) as client:
        expected = client.embed([[1, 2, 3]])
        with client.shared_memory(4096) as region:
            assert region.handle
            assert len(default_components.shared_memory) == 1
            np.testing.assert_array_equal(client.embed([[1, 2, 3]], output=region), expected)
        assert _released(default_components)
        left_open = client.shared_memory(4096).__enter__()
        assert len(default_components.shared_memory) == 1
    # Closing the Client ended the session and freed the memory; closing the region again does nothing.
    assert _released(default_components)
    left_open.close()
    assert not [name for name in os.listdir("/dev/shm") if name.startswith("embedserve-")]


def test_sync_client_refuses_what_only_an_event_loop_can_drive(server: ServerThread) -> None:
    async def windows() -> AsyncIterator[list[int]]:
        yield [1, 2]

    client = Client(server.target)
    client.timeout = 12.5
    assert (client.timeout, client.stream_timeout) == (12.5, 24 * 3600.0)
    with pytest.raises(TypeError, match="use AsyncClient"):
        client.embed_stream(windows())  # type: ignore[arg-type]
    client.close()
    with pytest.raises(RuntimeError, match="the Client is closed"):
        client.info()
    threads = threading.active_count()
    with pytest.raises(ValueError, match="connections"):
        Client(server.target, connections=0)
    assert threading.active_count() == threads  # the refused Client's loop thread is gone
