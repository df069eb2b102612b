"""One device thread: all torch work of a server process runs on one thread per device
(core/device_thread.py), shared by every lease on it and stopped with the last."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from embedserve.client import AsyncClient, Query
from embedserve.server import ServerConfig
from embedserve.server.app import load_components
from embedserve.server.core import Cancelled, EmbeddingModel, EmbedJob, seeded_embedding_tables
from embedserve.server.core.device_thread import DeviceThread, DeviceThreadClosed
from embedserve.server.core.word_vectors import PreparedBatch, RankedLists

from .conftest import TINY_CONFIG, ServerThread

# A device no other test runs torch work for, so these tests see its thread start and stop.
SPARE = "meta"


def _threads_named(prefix: str) -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith(prefix)]


def _wait_until_gone(prefix: str) -> None:
    deadline = time.monotonic() + 10
    while _threads_named(prefix) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _threads_named(prefix), f"{prefix} still runs"


def test_every_lease_on_a_device_shares_one_thread() -> None:
    cpu, again, spare = (
        DeviceThread.shared("cpu"),
        DeviceThread.shared(torch.device("cpu")),
        DeviceThread.shared(SPARE),
    )
    shared = cpu.share()
    try:
        assert cpu.ident == again.ident == shared.ident == cpu.call(threading.get_ident)
        assert spare.call(threading.get_ident) == spare.ident != cpu.ident
        assert len(_threads_named("embedserve-device-cpu")) == 1
        assert len(_threads_named(f"embedserve-device-{SPARE}")) == 1
        assert cpu.submit(lambda: "ran").result(10) == "ran"
        # From the thread itself, call() runs at once (no wait on its own queue).
        assert cpu.call(lambda: cpu.call(threading.get_ident)) == cpu.ident
    finally:
        for lease in (cpu, again, spare, shared):
            lease.close()


def test_close_is_idempotent_refuses_later_work_and_the_last_stops_the_thread() -> None:
    lease, keeper = DeviceThread.shared(SPARE), DeviceThread.shared(SPARE)
    lease.close()
    lease.close()
    assert lease.closed
    assert issubclass(DeviceThreadClosed, Cancelled)  # so a call that meets it is UNAVAILABLE
    with pytest.raises(DeviceThreadClosed, match="closed"):
        lease.submit(int)
    with pytest.raises(DeviceThreadClosed, match="closed"):
        lease.call(int)
    with pytest.raises(DeviceThreadClosed, match="closed"):
        lease.share()
    assert keeper.call(lambda: 7) == 7  # another lease keeps the thread
    keeper.close()
    _wait_until_gone(f"embedserve-device-{SPARE}")
    fresh = DeviceThread.shared(SPARE)  # after the last lease, a new one starts a fresh thread
    try:
        assert fresh.call(threading.get_ident) == fresh.ident
        assert len(_threads_named(f"embedserve-device-{SPARE}")) == 1
    finally:
        fresh.close()


def test_closing_a_lease_cancels_its_queued_work_and_no_one_elses() -> None:
    blocker, closing, other = (DeviceThread.shared(SPARE) for _ in range(3))
    started, release = threading.Event(), threading.Event()

    def block() -> bool:
        started.set()
        return release.wait(10)

    busy = blocker.submit(block)
    try:
        assert started.wait(10)
        queued, theirs = closing.submit(int), other.submit(lambda: "ran")
        waiting: list[BaseException] = []

        def call_and_keep_the_error() -> None:
            try:
                closing.call(int)
            except BaseException as error:
                waiting.append(error)

        caller = threading.Thread(target=call_and_keep_the_error)
        caller.start()
        time.sleep(0.05)  # queued behind `busy` by now; refused at once if not: the same error either way
        closing.close()
        caller.join(10)
        assert queued.cancelled()
        assert len(waiting) == 1, waiting
        assert isinstance(waiting[0], DeviceThreadClosed), waiting
        release.set()
        assert busy.result(10) is True
        assert theirs.result(10) == "ran"
    finally:
        release.set()
        for lease in (blocker, closing, other):
            lease.close()


def test_a_model_refuses_the_thread_of_another_device() -> None:
    spare = DeviceThread.shared(SPARE)
    try:
        with pytest.raises(ValueError, match="device thread"):
            EmbeddingModel(seeded_embedding_tables(6, 3, 4, 123), torch.device("cpu"), device_thread=spare)
    finally:
        spare.close()


def _vectors_config(folder: Path) -> ServerConfig:
    rows = np.random.default_rng(5).standard_normal((40, 4)).astype(np.float32)
    source = folder / "vectors.txt"
    source.write_text(
        "".join(f"w{index} " + " ".join(repr(float(v)) for v in row) + "\n" for index, row in enumerate(rows))
    )
    return ServerConfig(
        port=0,
        vocab_size=6,
        dim=3,
        context_length=4,
        device="cpu",
        word_vectors=str(source),
        cache_dir=folder / "cache",
    )


async def test_embed_most_similar_and_the_vectors_load_run_on_the_one_device_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="embedserve.server.core.word_vectors.factory")
    config = _vectors_config(tmp_path)
    components = load_components(config)
    ran: list[tuple[str, int]] = []
    embed_many = components.model.embed_many

    def recorded_embed_many(jobs: list[EmbedJob]) -> list[torch.Tensor]:
        ran.append(("embed", threading.get_ident()))
        return embed_many(jobs)

    monkeypatch.setattr(components.model, "embed_many", recorded_embed_many)
    running = ServerThread(config, components)  # which starts loading the vectors
    try:
        assert await asyncio.to_thread(components.word_vectors.wait, 60), "the word vectors did not load"
        model = components.word_vectors.model
        search_many = model.search_many

        def recorded_search_many(batches: Sequence[PreparedBatch]) -> list[RankedLists]:
            ran.append(("scan", threading.get_ident()))
            return search_many(batches)

        monkeypatch.setattr(model, "search_many", recorded_search_many)  # before the first call
        async with AsyncClient(running.target) as client:
            embedded = await asyncio.gather(*(client.embed([1, 2, 3]) for _ in range(4)))
            assert all(result.shape == (3, 3) for result in embedded)
            assert len(await client.word_vectors.most_similar(positive=["w1"], topn=3)) == 3
            batch = await client.word_vectors.most_similar_batch([Query(positive=["w2"], topn=2)] * 3)
            assert [len(ranked) for ranked in batch] == [2, 2, 2]
        ident = components.device_thread.ident
        assert {kind for kind, _ in ran} == {"embed", "scan"}
        assert {thread for _, thread in ran} == {ident}
        assert components.model.device_thread.ident == components.word_vectors.device_thread.ident == ident
        # The load's device steps (the rows onto the device, the scanner's choice) ran there too.
        chosen = [record for record in caplog.records if "word-vector scans on" in record.getMessage()]
        assert chosen
        assert {record.thread for record in chosen} == {ident}
        assert len(_threads_named("embedserve-device-cpu")) == 1
        assert not _threads_named("embedserve-embed")
        assert not _threads_named("embedserve-vectors")
    finally:
        running.stop()
        components.close()


async def test_servers_keep_working_while_other_components_close() -> None:
    first, second = load_components(TINY_CONFIG), load_components(TINY_CONFIG)
    assert first.device_thread.ident == second.device_thread.ident
    servers = [
        ServerThread(TINY_CONFIG, first),
        ServerThread(TINY_CONFIG, first),
        ServerThread(TINY_CONFIG, second),
    ]
    try:
        servers[0].stop()  # one server of two on the same components
        async with AsyncClient(servers[1].target) as client:
            assert (await client.embed([1, 2])).shape == (2, 3)
        servers[1].stop()
        assert first.close()
        assert first.close()  # idempotent
        async with AsyncClient(servers[2].target) as client:  # other components, the same thread
            assert (await client.embed([4, 5])).shape == (2, 3)
        assert len(_threads_named("embedserve-device-cpu")) == 1
    finally:
        servers[2].stop()
        second.close()
