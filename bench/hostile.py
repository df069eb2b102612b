"""Hostile and careless clients against a real server: what it holds, what it refuses, what it
gives back.

    .venv/bin/python bench/hostile.py                          # every attack, full size
    .venv/bin/python bench/hostile.py --smoke --json out.json  # tests/reliability/test_hostile_clients.py
    .venv/bin/python bench/hostile.py --calibrate              # each request kind alone: held vs reserved
    .venv/bin/python bench/hostile.py --allocators             # the attacks under each allocator setting
    .venv/bin/python bench/hostile.py --before /tmp/old-stage  # the same attacks on an older tree first

Each attack runs against a fresh `embedserve serve` in a memory cgroup of its own (--limit; the
server's auto budget is half of it): a server that escaped its budget is OOM-killed inside that
cgroup, never the machine. Without permission to make a cgroup the server runs with an explicit
--memory-budget of half the limit instead, and OOM kills are not counted.

The attacks (issue 31): a Tokenize flood (clients send one long run of one character each and
leave after two seconds), stalled consumers (StreamBatches with embeddings, one batch read, then
nothing), and a cancel storm (streams cancelled while blocked in write, 1 ms deadlines). For each
it records peak private memory (RssAnon + RssShmem of the server and its children), the budget,
OOM kills, the status codes clients got, the CPU the server spent after its callers left, the
seconds until private memory came back near its baseline, and ERROR and Traceback lines logged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from embedserve.tensor import to_tensor_pb
from embedserve.v1 import (
    batches_pb2,
    batches_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parents[1]
VERDICT = REPO.parent / "shared" / "data" / "the-verdict.txt"
MIB = 1 << 20
GIB = 1 << 30
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
HAVE_JEMALLOC = JEMALLOC.exists()
# Private memory counts as back at its baseline within this much of it (what the last requests'
# buffers leave in the allocator's heaps: it does not grow from burst to burst).
RECOVERED_WITHIN = 128 * MIB
CLIENT_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
# Stalled clients read little ahead: they hold the server's replies, not their own buffers.
STALLED_CLIENT_OPTIONS = [*CLIENT_OPTIONS, ("grpc.http2.bdp_probe", 0)]


def _process_tree(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                queue += [int(child) for child in (task / "children").read_text().split()]
    return found


def private_bytes(pid: int) -> int:
    """RssAnon + RssShmem of the process and its descendants (a mapped file counts nowhere)."""
    total = 0
    for member in _process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith(("RssAnon:", "RssShmem:")):
                    total += int(line.split()[1]) * 1024
    return total


def cpu_seconds(pid: int) -> float:
    """CPU time of the process and its descendants, children that ended included."""
    total = 0.0
    for member in _process_tree(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            total += sum(int(value) for value in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


class MemoryCgroup:
    """A memory cgroup (v2 where the unified hierarchy has the controller, else v1) with a limit."""

    def __init__(self, limit: int) -> None:
        name = f"embedserve-hostile-{os.getpid()}-{time.monotonic_ns()}"
        self.version = 2 if _v2_memory() else 1
        root = Path("/sys/fs/cgroup") if self.version == 2 else Path("/sys/fs/cgroup/memory")
        self.path = root / name
        self.path.mkdir()
        limit_file = "memory.max" if self.version == 2 else "memory.limit_in_bytes"
        (self.path / limit_file).write_text(str(limit))

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    @property
    def oom_kills(self) -> int:
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    @property
    def peak_bytes(self) -> int:
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        with contextlib.suppress(OSError):
            return int((self.path / name).read_text())
        return 0

    def remove(self) -> None:
        for _ in range(50):
            with contextlib.suppress(OSError):
                self.path.rmdir()
                return
            time.sleep(0.1)


def _v2_memory() -> bool:
    controllers = Path("/sys/fs/cgroup/cgroup.controllers")
    return controllers.is_file() and "memory" in controllers.read_text().split()


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Any:
    """A fresh cgroup limited to `limit` bytes, or None where none can be made."""
    try:
        group = MemoryCgroup(limit)
    except OSError:
        yield None
        return
    try:
        yield group
    finally:
        group.remove()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """`embedserve serve` on a free port, in `group` when given; its log goes to a file."""

    def __init__(self, log: Path, group: MemoryCgroup | None, flags: list[str], env: dict[str, str]) -> None:
        self.port = _free_port()
        self.log_path = log
        self.group = group
        command = [
            sys.executable,
            "-m",
            "embedserve.server",
            "serve",
            "--port",
            str(self.port),
            "--device",
            "cpu",
        ]
        # The child joins the cgroup before it runs Python: everything it allocates counts there.
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [*command, *flags], stderr=out, stdout=out, env={**os.environ, **env},
                preexec_fn=(lambda: group.add(os.getpid())) if group is not None else None,
            )  # fmt: skip
        self.target = f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    async def wait_serving(self, seconds: float = 180) -> None:
        deadline = time.monotonic() + seconds
        async with grpc.aio.insecure_channel(self.target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log()}")
                with contextlib.suppress(grpc.RpcError):
                    # Every service (the word vectors once loaded) when the server offers them.
                    services = await stub.List(health_pb2.HealthListRequest(), timeout=2)
                    statuses = [status.status for status in services.statuses.values()]
                    if statuses and all(s == health_pb2.HealthCheckResponse.SERVING for s in statuses):
                        return
                await asyncio.sleep(0.2)
        raise RuntimeError(f"the server was not SERVING after {seconds} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def budget_bytes(self) -> int:
        """The budget the server logged at start (0: it has none)."""
        line = re.search(r"memory budget ([\d.]+) (GiB|MiB|KiB)", self.log())
        if line is None:
            return 0
        return int(float(line.group(1)) * {"GiB": GIB, "MiB": MIB, "KiB": 1024}[line.group(2)])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


class PeakWatch:
    """Samples a process tree's private memory every 20 ms while it runs."""

    def __init__(self, pid: int) -> None:
        self._pid = pid
        self.peak = private_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, private_bytes(self._pid))

    def __enter__(self) -> PeakWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class AttackResult:
    attack: str
    budget_mib: float
    baseline_mib: float
    peak_mib: float
    peak_over_baseline_mib: float
    codes: dict[str, int]
    oom_kills: int | None  # None: no cgroup to count them in
    cgroup_peak_mib: float | None
    cpu_after_callers_left_s: float  # from one to three seconds after the last caller left
    recovery_s: float | None  # None: not back within the wait
    error_lines: int
    traceback_lines: int
    alive: bool
    answers_after: bool  # a Tokenize answered correctly afterwards
    settings: dict[str, Any] = field(default_factory=dict)


async def _recovery_seconds(pid: int, baseline: int, wait: float) -> float | None:
    started = time.monotonic()
    while time.monotonic() - started < wait:
        if private_bytes(pid) <= baseline + RECOVERED_WITHIN:
            return round(time.monotonic() - started, 1)
        await asyncio.sleep(0.25)
    return None


async def _answers(target: str) -> bool:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        try:
            reply = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=["hello world"]), timeout=30)
        except grpc.RpcError:
            return False
    return bytes(reply.token_ids.data) == np.array([31373, 995], "<i4").tobytes()


def _code_of(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        return str(error.code().name)
    return type(error).__name__


async def tokenize_flood(target: str, clients: int, mib: int, leave_after: float) -> Counter[str]:
    """`clients` Tokenize calls at once, each one run of one character of `mib` MiB (the worst
    case tiktoken has), each abandoned by its caller after `leave_after` seconds."""
    text = "a" * (mib * MIB)
    codes: Counter[str] = Counter()

    async def one() -> None:
        async with grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS) as channel:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            try:
                await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=[text]), timeout=leave_after)
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[_code_of(error)] += 1

    await asyncio.gather(*(one() for _ in range(clients)))
    return codes


def _stream_text() -> str:
    base = VERDICT.read_text() if VERDICT.is_file() else "The quick brown fox jumps over the lazy dog. " * 120
    return base * 20


async def stalled_consumers(
    target: str, consumers: int, hold: float, batch_size: int = 64, max_length: int = 1024
) -> Counter[str]:
    """`consumers` StreamBatches streams with embeddings that read one batch, then nothing for
    `hold` seconds, then go away."""
    request = batches_pb2.StreamBatchesRequest(
        text=_stream_text(), batch_size=batch_size, max_length=max_length, stride=max_length // 4,
        include_embeddings=True,
    )  # fmt: skip
    codes: Counter[str] = Counter()
    channels = [grpc.aio.insecure_channel(target, options=STALLED_CLIENT_OPTIONS) for _ in range(consumers)]
    calls = [batches_pb2_grpc.BatchesServiceStub(channel).StreamBatches(request) for channel in channels]

    async def read_one(call: Any) -> None:
        try:
            message = await call.read()
            codes["read one batch" if message is not grpc.aio.EOF else "EOF"] += 1  # type: ignore[attr-defined]
        except grpc.RpcError as error:
            codes[_code_of(error)] += 1

    async def watch_status(call: Any) -> None:
        with contextlib.suppress(grpc.RpcError, asyncio.CancelledError):
            code = await call.code()
            if code is not grpc.StatusCode.CANCELLED:
                codes[f"then {code.name}"] += 1

    try:
        await asyncio.gather(*(read_one(call) for call in calls))
        watchers = [asyncio.create_task(watch_status(call)) for call in calls]
        await asyncio.sleep(hold)
    finally:
        for call in calls:
            call.cancel()
        await asyncio.sleep(0.2)
        for watcher in watchers:
            watcher.cancel()
        for channel in channels:
            await channel.close(None)
    return codes


async def cancel_storm(target: str, count: int) -> Counter[str]:
    """Streams cancelled while the server is blocked writing to them, calls with a 1 ms deadline,
    and EmbedStreams cancelled mid-way: `count` of each."""
    codes: Counter[str] = Counter()
    request = batches_pb2.StreamBatchesRequest(
        text=_stream_text(), batch_size=64, max_length=256, stride=64, include_embeddings=True
    )
    async with grpc.aio.insecure_channel(target, options=STALLED_CLIENT_OPTIONS) as channel:
        batches = batches_pb2_grpc.BatchesServiceStub(channel)
        embedding = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(channel)

        async def blocked_then_cancelled() -> None:
            call = batches.StreamBatches(request)
            with contextlib.suppress(grpc.RpcError):
                await call.read()
                await asyncio.sleep(0.3)  # the server fills the window and blocks in write
            call.cancel()
            codes["stream cancelled"] += 1

        ids = to_tensor_pb(np.arange(4096, dtype=np.int32).reshape(4, 1024), "int32")

        async def deadline(call: Callable[[], Awaitable[Any]]) -> None:
            try:
                await call()
                codes["OK"] += 1
            except grpc.RpcError as error:
                codes[_code_of(error)] += 1

        async def embed_stream_cancelled() -> None:
            async def windows() -> Any:
                for sequence_id in range(64):
                    yield embedding_pb2.EmbedStreamRequest(token_ids=ids, sequence_id=sequence_id)

            call = embedding.EmbedStream(windows())
            with contextlib.suppress(grpc.RpcError):
                await call.read()
            call.cancel()
            codes["EmbedStream cancelled"] += 1

        text = "word " * 200_000
        one_ms = 0.001
        work: list[Awaitable[None]] = []
        for _ in range(count):
            work += [
                blocked_then_cancelled(),
                deadline(
                    lambda: tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(texts=[text]), timeout=one_ms)
                ),
                deadline(lambda: embedding.Embed(embedding_pb2.EmbedRequest(token_ids=ids), timeout=one_ms)),
                deadline(lambda: _first(batches.StreamBatches(request, timeout=one_ms))),
                embed_stream_cancelled(),
            ]
        for start in range(0, len(work), 50):  # 50 at once
            await asyncio.gather(*work[start : start + 50])
    return codes


async def _first(call: Any) -> None:
    await call.read()
    call.cancel()


def _log_counts(log: str) -> tuple[int, int]:
    lines = log.splitlines()
    errors = sum(1 for line in lines if re.search(r"\b(ERROR|CRITICAL)\b", line))
    return errors, sum(1 for line in lines if line.startswith("Traceback"))


@dataclass(frozen=True)
class Settings:
    limit: int
    flood_clients: int
    floods_mib: tuple[int, ...]  # one flood of each size
    stalled: tuple[int, ...]
    hold: float
    storm: int
    recovery_wait: float
    memory_wait: float = 2.0


SMOKE = Settings(
    limit=3 * GIB, flood_clients=6, floods_mib=(8,), stalled=(20,), hold=4.0, storm=40, recovery_wait=30
)
# The flood (50 MiB texts: each needs more than the whole budget), and one the budget admits.
FULL = Settings(limit=4 * GIB, flood_clients=6, floods_mib=(50, 12), stalled=(20, 200), hold=10.0, storm=200,
                recovery_wait=60)  # fmt: skip


async def run_attack(
    name: str,
    attack: Callable[[str], Awaitable[Counter[str]]],
    settings: Settings,
    workdir: Path,
    flags: list[str],
    env: dict[str, str],
    budgeted: bool = True,
) -> AttackResult:
    """`budgeted`: the server has a memory budget to set (not an older tree's)."""
    with memory_cgroup(settings.limit) as group:
        budget_flags = [] if group is not None else ["--memory-budget", str(settings.limit // 2)]
        memory_flags = ["--memory-wait", str(settings.memory_wait), *budget_flags] if budgeted else []
        server = Server(workdir / f"{name}.log", group, [*memory_flags, *flags], env)
        try:
            await server.wait_serving()
            await asyncio.sleep(1.0)  # loading's garbage collected and trimmed
            baseline = private_bytes(server.pid)
            log_start = len(server.log())
            with PeakWatch(server.pid) as watch:
                codes = await attack(server.target)
            left = time.monotonic()
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - left)))
            cpu_before = cpu_seconds(server.pid)
            await asyncio.sleep(2.0)
            cpu_after = cpu_seconds(server.pid) - cpu_before
            recovery = await _recovery_seconds(server.pid, baseline, settings.recovery_wait)
            alive = server.alive()
            answers = alive and await _answers(server.target)
            errors, tracebacks = _log_counts(server.log()[log_start:])
            return AttackResult(
                attack=name,
                budget_mib=round(server.budget_bytes() / MIB, 1),
                baseline_mib=round(baseline / MIB, 1),
                peak_mib=round(watch.peak / MIB, 1),
                peak_over_baseline_mib=round((watch.peak - baseline) / MIB, 1),
                codes=dict(codes),
                oom_kills=None if group is None else group.oom_kills,
                cgroup_peak_mib=None if group is None else round(group.peak_bytes / MIB, 1),
                cpu_after_callers_left_s=round(cpu_after, 2),
                recovery_s=recovery,
                error_lines=errors,
                traceback_lines=tracebacks,
                alive=alive,
                answers_after=answers,
                settings={"limit_mib": settings.limit // MIB, "flags": flags, "env": sorted(env)},
            )
        finally:
            server.stop()


def attacks(settings: Settings) -> list[tuple[str, Callable[[str], Awaitable[Counter[str]]]]]:
    chosen: list[tuple[str, Callable[[str], Awaitable[Counter[str]]]]] = [
        (
            f"tokenize flood ({settings.flood_clients} x {mib} MiB, left after 2 s)",
            lambda target, mib=mib: tokenize_flood(target, settings.flood_clients, mib, 2.0),  # type: ignore[misc]
        )
        for mib in settings.floods_mib
    ]
    for count in settings.stalled:
        chosen.append(
            (
                f"{count} stalled consumers (64 x 1024 with embeddings)",
                lambda target, count=count: stalled_consumers(target, count, settings.hold),  # type: ignore[misc]
            )
        )
    chosen.append(
        (f"cancel storm ({settings.storm} of each kind)", lambda target: cancel_storm(target, settings.storm))
    )
    return chosen


def _vm_hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak(pid: int) -> None:
    """VmHWM counts again from now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _reserved_peak(metrics_port: int) -> int:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        for line in reply.read().decode().splitlines():
            if line.startswith("embedserve_memory_reserved_peak_bytes "):
                return int(float(line.split()[1]))
    raise AssertionError("no embedserve_memory_reserved_peak_bytes")


def _calibration_requests() -> list[tuple[str, bool, Callable[[grpc.aio.Channel], Awaitable[Any]]]]:
    """(what, needs word vectors, the call) of each request kind's worst case."""
    from embedserve.v1 import word_vectors_pb2, word_vectors_pb2_grpc

    ordinary = _stream_text()

    def tokenize(text: str) -> Callable[[grpc.aio.Channel], Awaitable[Any]]:
        async def call(channel: grpc.aio.Channel) -> Any:
            stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
            return await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=[text]), timeout=300)

        return call

    async def detokenize(channel: grpc.aio.Channel) -> Any:
        ids = np.resize(np.array([31373, 995, 13, 220], np.int32), 1 << 20)
        stub = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        return await stub.Detokenize(
            tokenizer_pb2.DetokenizeRequest(token_ids=to_tensor_pb(ids, "int32")), timeout=60
        )

    async def embed(channel: grpc.aio.Channel) -> Any:
        ids = to_tensor_pb(np.arange(64 * 1024, dtype=np.int32).reshape(64, 1024) % 50257, "int32")
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        return await stub.Embed(embedding_pb2.EmbedRequest(token_ids=ids), timeout=60)

    async def stream(channel: grpc.aio.Channel) -> Any:
        request = batches_pb2.StreamBatchesRequest(
            text=ordinary * 20, batch_size=64, max_length=1024, stride=1024, include_embeddings=True
        )
        call = batches_pb2_grpc.BatchesServiceStub(channel).StreamBatches(request, timeout=120)
        async for _ in call:
            pass

    async def most_similar(channel: grpc.aio.Channel) -> Any:
        queries = [
            word_vectors_pb2.SimilarityQuery(positive=[word_vectors_pb2.QueryTerm(word="king")], topn=256)
            for _ in range(4096)
        ]
        stub = word_vectors_pb2_grpc.WordVectorsServiceStub(channel)
        return await stub.MostSimilar(word_vectors_pb2.MostSimilarRequest(queries=queries), timeout=120)

    async def evaluate(channel: grpc.aio.Channel) -> Any:
        stub = word_vectors_pb2_grpc.WordVectorsServiceStub(channel)
        return await stub.EvaluateAnalogies(word_vectors_pb2.EvaluateAnalogiesRequest(), timeout=300)

    async def get_vectors(channel: grpc.aio.Channel) -> Any:
        stub = word_vectors_pb2_grpc.WordVectorsServiceStub(channel)
        words = ["king", "queen", "the"] * 1365
        return await stub.GetVectors(word_vectors_pb2.GetVectorsRequest(words=words), timeout=60)

    return [
        ("Tokenize: one run of one character, 8 MiB (a child process)", False, tokenize("a" * (8 * MIB))),
        (
            "Tokenize: one run of one character, 256 KiB (on the thread)",
            False,
            tokenize("a" * (IN_THREAD_CHARS)),
        ),
        ("Tokenize: ordinary text, 32 MiB", False, tokenize((ordinary * 80)[: 32 * MIB])),
        ("Tokenize: spaces, 16 MiB (one token a byte)", False, tokenize(" " * (16 * MIB))),
        (
            "Tokenize: emoji among words, 2M characters (four bytes each in a str)",
            False,
            tokenize(("🙂 a b " * MIB)[: 2 * MIB]),
        ),
        ("Detokenize: 1M token IDs", False, detokenize),
        ("Embed: [64, 1024] float32", False, embed),
        ("StreamBatches: 64 x 1024 with embeddings, a text", False, stream),
        ("MostSimilar: 4096 queries x topn 256", True, most_similar),
        ("GetVectors: 4095 words", True, get_vectors),
        ("EvaluateAnalogies: gensim's questions-words.txt", True, evaluate),
    ]


IN_THREAD_CHARS = 1 << 18


async def calibrate(workdir: Path, only: str = "") -> list[dict[str, Any]]:
    """Each request kind's worst case alone against a server with room for it: the private memory
    it really held (peak over the baseline, the server and its children) against what it reserved.
    `only`: the kinds whose description holds this text."""
    rows = []
    for what, vectors, call in _calibration_requests():
        if only not in what:
            continue
        metrics_port = _free_port()
        flags = ["--memory-budget", "100%", "--metrics-port", str(metrics_port)]
        if not vectors:
            flags += ["--word-vectors", "none"]
        server = Server(workdir / "calibrate.log", None, flags, {})
        try:
            await server.wait_serving()
            await asyncio.sleep(1.0)
            baseline_private, baseline_rss = private_bytes(server.pid), _rss(server.pid)
            _reset_peak(server.pid)
            async with grpc.aio.insecure_channel(server.target, options=CLIENT_OPTIONS) as channel:
                with PeakWatch(server.pid) as watch:
                    await call(channel)
            held = max(watch.peak - baseline_private, _vm_hwm(server.pid) - baseline_rss)
            reserved = _reserved_peak(metrics_port)
            rows.append(
                {"request": what, "held_mib": round(held / MIB, 1), "reserved_mib": round(reserved / MIB, 1),
                 "reserved_over_held": round(reserved / max(1, held), 2)}
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
        finally:
            server.stop()
    return rows


# Each variant: the server's flags, its environment, and whether it has a memory budget to set.
Variant = tuple[list[str], dict[str, str], bool]
ALLOCATORS: dict[str, Variant] = {
    "tuned + trim (default)": ([], {}, True),
    "tuned, no trim": (["--memory-trim-interval", "0"], {}, True),
    "jemalloc": ([], {"LD_PRELOAD": str(JEMALLOC)}, True),
}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    settings = SMOKE if args.smoke else FULL
    workdir = args.workdir
    if args.calibrate:
        return {
            "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {os.cpu_count()} cores",
            "calibration": await calibrate(workdir, args.only),
        }
    variants = {"tuned + trim (default)": ALLOCATORS["tuned + trim (default)"]}
    if args.allocators:
        variants = {
            name: value for name, value in ALLOCATORS.items() if "LD_PRELOAD" not in value[1] or HAVE_JEMALLOC
        }
    if args.before:
        variants = {f"before ({args.before})": ([], {"PYTHONPATH": args.before}, False), **variants}
    results = []
    for variant, (flags, env, budgeted) in variants.items():
        for name, attack in attacks(settings):
            if args.only not in name:
                continue
            result = await run_attack(name, attack, settings, workdir, flags, env, budgeted)
            result.settings["allocator"] = variant
            results.append(result)
            print(json.dumps(asdict(result)), flush=True)
    return {
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {os.cpu_count()} cores",
        "smoke": args.smoke,
        "results": [asdict(result) for result in results],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="the small, quick version CI runs")
    parser.add_argument("--allocators", action="store_true", help="repeat under each allocator setting")
    parser.add_argument("--calibrate", action="store_true", help="each request kind alone: held vs reserved")
    parser.add_argument("--only", default="", help="the attacks (or calibrations) whose name holds this")
    parser.add_argument(
        "--before", metavar="PYTHONPATH",
        help="first run the attacks against servers of another tree (laid out as tests/run.sh lays out "
        ".typecheck/), with no memory flags: what they do without this code",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--workdir", help="where the servers' logs go")
    args = parser.parse_args()
    args.workdir = Path(args.workdir or f"/tmp/embedserve-hostile-{os.getpid()}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    report = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
