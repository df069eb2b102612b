"""A CLI server process for the reliability suite, with what the tests measure about it."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import numpy.typing as npt
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..conftest import CliServer, start_cli_server
from ..notebook_reference import notebook_tables


def start(port: int, cache_dir: Path, *flags: str) -> CliServer:
    """`embedserve serve` on 127.0.0.1:port with the default model and word vectors from cache_dir."""
    return start_cli_server(
        "--port", str(port), "--device", "cpu", *flags,
        env={"EMBEDSERVE_CACHE_DIR": str(cache_dir)},
    )  # fmt: skip


async def wait_serving(target: str, service: str = "", seconds: float = 120.0) -> None:
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{target} {service or 'server'} not SERVING after {seconds} s")
            await asyncio.sleep(0.2)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


class ReferenceEmbeddings:
    """The server's default tables, built as the notebook builds them: the direct computation."""

    def __init__(self) -> None:
        token, position = notebook_tables()
        self.token = token.weight.detach().numpy()
        self.position = position.weight.detach().numpy()

    def embed(self, ids: npt.NDArray[np.integer]) -> npt.NDArray[np.float32]:
        summed: npt.NDArray[np.float32] = self.token[ids] + self.position[np.arange(ids.shape[-1])]
        return summed


def windows(ids: list[int], max_length: int, stride: int) -> Counter[tuple[int, ...]]:
    """Every sliding window of the notebook's loop, as a multiset."""
    return Counter(tuple(ids[i : i + max_length]) for i in range(0, len(ids) - max_length, stride))
