"""A cancelled call, or one whose deadline passed, is not an error: the server logs no ERROR and no
traceback for it (issue 31), and still counts it as CANCELLED or DEADLINE_EXCEEDED.

The server runs as `embedserve serve` does, in a child process whose log is read back. The streams
that matter are blocked in a write when they end: a reply of megabytes that the client does not
read. A write that failed because the call had ended reached gRPC before gRPC had taken the call
for cancelled, and was logged as "ExecuteBatchError raised in core by servicer method [...]" with
a 9-line traceback: about 110 of them for the calls below. A unary reply meeting a 1 ms deadline
could end the same way.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import re
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
import pytest
from embedserve.server.call_logging import GRPC_AIO_LOGGER, EndedCallFilter
from embedserve.tensor import to_tensor_pb
from embedserve.v1 import (
    batches_pb2,
    batches_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

from .conftest import VERDICT_PATH, free_port, start_cli_server

N = 50
WAVE = 10  # streams open at once: each blocked one holds 16 to 32 MB of replies
_ERROR_LINE = re.compile(r"^\S+ \S+ (ERROR|CRITICAL) ", re.MULTILINE)
_CALLS = re.compile(r'^embedserve_calls_total\{code="(\w+)",method="(\w+)"\} (\S+)$', re.MULTILINE)
_OPEN_STREAMS = re.compile(r'^embedserve_open_streams\{method="\w+"\} (\S+)$', re.MULTILINE)

Code = grpc.StatusCode
# What a gRPC client may read instead of the status when a call ends while the client is still
# writing its requests: the client's own core reports it, the server never sent it.
_CLIENT_CORE_ERROR = "Internal error from Core"
Outcomes = Counter[tuple[str, str]]


@pytest.fixture(scope="module")
def text() -> str:
    if not VERDICT_PATH.is_file():
        pytest.skip(f"{VERDICT_PATH} is absent")
    return VERDICT_PATH.read_text(encoding="utf-8") * 8  # 40k tokens: 156 windows of 256


def _token_ids(sequences: int) -> embedding_pb2.EmbedStreamRequest:
    """`sequences` of 1000 token IDs: a 1 MB reply each (256-dim float32)."""
    ids = np.arange(1, 1001, dtype=np.int32)
    return embedding_pb2.EmbedStreamRequest(token_ids=to_tensor_pb(np.tile(ids, (sequences, 1)), "int32"))


def _large_batches(text: str) -> batches_pb2.StreamBatchesRequest:
    """Replies of 16 MB each (64 x 256 windows with 256-dim float32 embeddings)."""
    return batches_pb2.StreamBatchesRequest(
        text=text, batch_size=64, max_length=256, stride=256, include_embeddings=True
    )


async def _blocked_streams(channel: grpc.aio.Channel, text: str, *, deadline: float | None) -> list[Code]:
    """StreamBatches calls left unread until their first write blocks, then cancelled by the
    client (deadline None) or by their deadline."""
    stub = batches_pb2_grpc.BatchesServiceStub(channel)
    codes: list[Code] = []
    for _ in range(N // WAVE):
        calls = [stub.StreamBatches(_large_batches(text), timeout=deadline) for _ in range(WAVE)]
        # Initial metadata goes out with the first reply: from then on the server is writing it.
        await asyncio.gather(*(call.initial_metadata() for call in calls))
        if deadline is None:
            await asyncio.sleep(0.05)
            for call in calls:
                call.cancel()
        codes += await asyncio.gather(*(call.code() for call in calls))
    return codes


async def _embed_streams(channel: grpc.aio.Channel, *, deadline: float | None) -> list[Code]:
    """EmbedStream calls cancelled by the client after three of their 1 MB replies while it is
    still sending requests, or, with a deadline, sending two requests and reading nothing until
    the deadline passes while the server writes their 16 MB replies."""
    stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)

    async def one() -> Code:
        async def requests() -> AsyncIterator[embedding_pb2.EmbedStreamRequest]:
            if deadline is None:
                for _ in range(1000):
                    yield _token_ids(1)
            else:
                for _ in range(2):  # within the server's read-ahead window (--stream-window 8)
                    yield _token_ids(16)

        call = stub.EmbedStream(requests(), timeout=deadline)
        if deadline is None:
            for _ in range(3):
                await call.read()
            call.cancel()
        return await call.code()

    codes: list[Code] = []
    for _ in range(N // WAVE):
        codes += await asyncio.gather(*(one() for _ in range(WAVE)))
    return codes


async def _one_millisecond(channel: grpc.aio.Channel, text: str) -> Outcomes:
    """Each RPC kind N times with a 1 ms deadline."""
    tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
    batches = batches_pb2_grpc.BatchesServiceStub(channel)
    embedding = embedding_pb2_grpc.EmbeddingServiceStub(channel)
    ids = _token_ids(1).token_ids

    async def requests() -> AsyncIterator[embedding_pb2.EmbedStreamRequest]:
        yield _token_ids(1)

    async def outcome(call: grpc.aio.Call) -> str:
        code = await call.code()
        if code is Code.INTERNAL and await call.details() == _CLIENT_CORE_ERROR:
            return _CLIENT_CORE_ERROR
        return str(code.name)

    kinds: dict[str, Callable[[], grpc.aio.Call]] = {
        "Tokenize": lambda: tokenizer.Tokenize(tokenizer_pb2.TokenizeRequest(texts=[text]), timeout=0.001),
        "Embed": lambda: embedding.Embed(embedding_pb2.EmbedRequest(token_ids=ids), timeout=0.001),
        "StreamBatches": lambda: batches.StreamBatches(_large_batches(text), timeout=0.001),
        "EmbedStream": lambda: embedding.EmbedStream(requests(), timeout=0.001),
    }
    outcomes: Outcomes = Counter()
    for _ in range(N // WAVE):
        for kind, start in kinds.items():
            outcomes.update(
                (kind, name) for name in await asyncio.gather(*(outcome(start()) for _ in range(WAVE)))
            )
    return outcomes


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def _settled_calls(port: int, expected: int) -> Outcomes:
    """The server's finished calls by (method, code), once it has finished `expected` calls and
    has no stream open."""
    deadline = time.monotonic() + 10
    while True:
        text = _scrape(port)
        calls: Outcomes = Counter()
        for code, method, value in _CALLS.findall(text):
            calls[method, code] += int(float(value))
        streams_open = sum(float(value) for value in _OPEN_STREAMS.findall(text))
        if (sum(calls.values()) >= expected and streams_open == 0) or time.monotonic() > deadline:
            return calls
        time.sleep(0.1)


async def test_cancels_and_deadlines_log_no_error(text: str) -> None:
    metrics_port = free_port()
    server = start_cli_server(
        "--device", "cpu", "--word-vectors", "none", "--log-level", "INFO",
        "--metrics-port", str(metrics_port),
    )  # fmt: skip
    # Without BDP probing the client's flow-control windows stay small, so an unread reply of
    # megabytes surely blocks the server's write (with it, a window can grow past 30 MB).
    options = [("grpc.max_receive_message_length", -1), ("grpc.http2.bdp_probe", 0)]
    try:
        async with grpc.aio.insecure_channel(server.target, options=options) as channel:
            cancelled_blocked = await _blocked_streams(channel, text, deadline=None)
            deadline_blocked = await _blocked_streams(channel, text, deadline=0.3)
            cancelled_embed = await _embed_streams(channel, deadline=None)
            deadline_embed = await _embed_streams(channel, deadline=0.3)
            calls = _settled_calls(metrics_port, 4 * N)
            short = await _one_millisecond(channel, text)
            reply = await tokenizer_pb2_grpc.TokenizerServiceStub(channel).Tokenize(
                tokenizer_pb2.TokenizeRequest(texts=["Hello, world"]), timeout=10
            )
    finally:
        server.terminate()
    log = server.log
    errors = _ERROR_LINE.findall(log)
    tracebacks = log.count("Traceback")
    assert (len(errors), tracebacks) == (0, 0), f"{len(errors)} ERROR lines, {tracebacks} tracebacks:\n{log}"

    # The clients still read the codes gRPC gives, and the server counts the calls with them.
    assert Counter(cancelled_blocked) == {Code.CANCELLED: N}
    assert Counter(deadline_blocked) == {Code.DEADLINE_EXCEEDED: N}
    assert Counter(cancelled_embed) == {Code.CANCELLED: N}
    assert Counter(deadline_embed) == {Code.DEADLINE_EXCEEDED: N}
    # With 1 ms, a quick Embed may still answer in time, and a client's own core sometimes reads
    # the call's end as CANCELLED or INTERNAL (as it did before this fix); none is the server's.
    assert {name for _, name in short} <= {"DEADLINE_EXCEEDED", "OK", "CANCELLED", _CLIENT_CORE_ERROR}, short
    assert sum(short.values()) == 4 * N
    assert calls["StreamBatches", "CANCELLED"] == N, calls
    assert calls["StreamBatches", "DEADLINE_EXCEEDED"] == N, calls
    assert calls["EmbedStream", "CANCELLED"] == N, calls
    assert calls["EmbedStream", "DEADLINE_EXCEEDED"] == N, calls

    assert list(reply.lengths) == [3]
    assert list(np.frombuffer(reply.token_ids.data, dtype="<i4")) == [15496, 11, 995]


def _record(message: str, error: BaseException | None, level: int = logging.ERROR) -> logging.LogRecord:
    exc_info = None if error is None else (type(error), error, None)
    return logging.LogRecord(GRPC_AIO_LOGGER, level, "server.pyx.pxi", 1, message, None, exc_info)


def _execute_batch_error(detail: str) -> BaseException:
    """The exception grpc.aio raises (a subclass of grpc.aio.InternalError, not exported)."""
    error: BaseException = importlib.import_module("grpc._cython.cygrpc").ExecuteBatchError(detail)
    assert isinstance(error, grpc.aio.InternalError)
    return error


def test_only_a_batch_failed_on_an_ended_call_is_demoted(caplog: pytest.LogCaptureFixture) -> None:
    """The filter on gRPC's logger is narrow: one message, one exception, one failure of it."""
    method = "ExecuteBatchError raised in core by servicer method [/embedserve.v1.EmbeddingService/Embed]"
    ended = _execute_batch_error('Failed "execute_batch": (<SendMessageOperation>,)')
    refused = _execute_batch_error("Failed grpc_call_start_batch: 8 with grpc_call_error value: 'X'")
    unexpected = "Unexpected [ValueError] raised by servicer method [/embedserve.v1.EmbeddingService/Embed]"
    kept = [
        _record(method, refused),  # core refused to start the batch: a misuse, not a cancel
        _record(unexpected, ValueError("a bug")),
        _record(unexpected, ended),  # gRPC's other messages are left alone
        _record(method, None),
    ]
    accept = EndedCallFilter().filter
    logger = logging.getLogger(GRPC_AIO_LOGGER)
    with caplog.at_level(logging.DEBUG, GRPC_AIO_LOGGER):
        for record in kept:
            assert accept(record)
            assert record.levelno == logging.ERROR
        assert [record.exc_info is not None for record in kept] == [True, True, True, False]

        demoted = _record(method, ended)
        assert accept(demoted)
        assert (demoted.levelname, demoted.exc_info) == ("DEBUG", None)
        assert demoted.getMessage().endswith("[/embedserve.v1.EmbeddingService/Embed]")
        assert logger.isEnabledFor(logging.DEBUG)
    with caplog.at_level(logging.INFO, GRPC_AIO_LOGGER):
        assert not accept(_record(method, ended))  # DEBUG is not logged: the record is dropped
