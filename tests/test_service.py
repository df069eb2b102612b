"""The whole stack over gRPC: a real server on an ephemeral port and the async client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tiktoken
import torch
from embedserve.client import (
    AsyncClient,
    Batch,
    EmbedServeError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    to_torch,
)
from embedserve.server import ServerConfig
from embedserve.v1 import embedding_pb2, embedding_pb2_grpc, tensor_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from safetensors.torch import save_file

from .conftest import ServerThread, start_server
from .notebook_reference import create_dataloader_v1, notebook_tables
from .test_core_embedding import NOTEBOOK_ROWS_2_3_5_1
from .test_core_windows import FIRST_BATCH


async def test_notebook_flow_tokenize_batches_embeddings(server: ServerThread, verdict_text: str) -> None:
    token_layer, pos_layer = notebook_tables()
    async with AsyncClient(server.target) as client:
        ids = await client.tokenize(verdict_text)
        assert len(ids) == 5154
        batches = [
            batch
            async for batch in client.stream_batches(
                corpus="the-verdict.txt",
                batch_size=8,
                max_length=4,
                stride=4,
                shuffle=False,
                include_embeddings=True,
            )
        ]
    assert len(batches) == 161 == batches[0].num_batches
    first = batches[0]
    assert first.index == 0
    assert first.inputs.tolist() == FIRST_BATCH
    assert first.targets[:, :-1].tolist() == [row[1:] for row in FIRST_BATCH]
    assert first.embeddings is not None
    assert first.embeddings.shape == (8, 4, 256)
    expected = token_layer(torch.tensor(FIRST_BATCH)) + pos_layer(torch.arange(4))
    np.testing.assert_array_equal(first.embeddings, expected.detach().numpy())
    assert [b.index for b in batches] == list(range(161))


async def test_inline_text_and_corpus_give_the_same_batches(server: ServerThread, verdict_text: str) -> None:
    settings = {"batch_size": 4, "max_length": 16, "stride": 8, "shuffle": True, "seed": 5}
    async with AsyncClient(server.target) as client:
        inline = [b async for b in client.stream_batches(text=verdict_text, **settings)]  # type: ignore[arg-type]
        named = [b async for b in client.stream_batches(corpus="the-verdict.txt", **settings)]  # type: ignore[arg-type]
    assert len(inline) == len(named) > 0
    for a, b in zip(inline, named, strict=True):
        np.testing.assert_array_equal(a.inputs, b.inputs)


@pytest.mark.parametrize("seed", [0, 123])
async def test_shuffle_order_equals_the_dataloader(
    server: ServerThread, verdict_text: str, reference_encoding: tiktoken.Encoding, seed: int
) -> None:
    loader = create_dataloader_v1(
        verdict_text,
        reference_encoding,
        batch_size=8,
        max_length=32,
        stride=16,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    async with AsyncClient(server.target) as client:
        got = [
            b
            async for b in client.stream_batches(
                text=verdict_text,
                batch_size=8,
                max_length=32,
                stride=16,
                shuffle=True,
                seed=seed,
                drop_last=True,
            )
        ]
    expected = list(loader)
    assert len(got) == len(expected)
    for batch, (x, y) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(batch.inputs, x.numpy())
        np.testing.assert_array_equal(batch.targets, y.numpy())
        inputs, targets = batch.to_torch()
        assert inputs.dtype == torch.int64
        assert torch.equal(inputs, x)
        assert torch.equal(targets, y)


async def test_tiny_model_golden_rows(tiny_server: ServerThread) -> None:
    async with AsyncClient(tiny_server.target) as client:
        rows = await client.embed([2, 3, 5, 1], include_positional=False)
        info = await client.info()
    assert rows.shape == (4, 3)
    np.testing.assert_allclose(rows, NOTEBOOK_ROWS_2_3_5_1, atol=1e-4)
    assert (info.vocab_size, info.dim, info.context_length) == (6, 3, 4)
    assert info.weights_source == "seed:123"


async def test_embed_options_and_dtypes(server: ServerThread) -> None:
    token_layer, pos_layer = notebook_tables()
    ids = np.array([[40, 367, 2885], [1807, 3619, 402]], dtype=np.int64)
    expected = (token_layer(torch.from_numpy(ids)) + pos_layer(torch.arange(7, 10))).detach()
    async with AsyncClient(server.target) as client:
        full = await client.embed(ids, position_offset=7)
        half = await client.embed(ids, position_offset=7, dtype="float16")
        brain = await client.embed(ids, position_offset=7, dtype="bfloat16")
        plain = await client.embed(ids[0].tolist(), include_positional=False)
    np.testing.assert_array_equal(full, expected.numpy())
    assert half.dtype == np.float16
    np.testing.assert_array_equal(half, expected.half().numpy())
    assert brain.dtype == np.float32
    np.testing.assert_array_equal(brain, expected.bfloat16().float().numpy())
    np.testing.assert_array_equal(plain, token_layer(torch.from_numpy(ids[0])).detach().numpy())


async def test_embed_stream_keeps_order(server: ServerThread) -> None:
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, 50257, size=(rng.integers(1, 5), rng.integers(1, 40))) for _ in range(25)]
    async with AsyncClient(server.target) as client:
        expected = [await client.embed(w) for w in windows]

        async def produce() -> AsyncIterator[np.ndarray]:
            for w in windows:
                await asyncio.sleep(0)
                yield w

        from_sync = [e async for e in client.embed_stream(windows)]
        from_async = [e async for e in client.embed_stream(produce())]
    for got in (from_sync, from_async):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)


async def test_embed_stream_echoes_sequence_ids(server: ServerThread) -> None:
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        requests = [
            embedding_pb2.EmbedStreamRequest(
                token_ids=tensor_pb2.Tensor(
                    dtype=tensor_pb2.DTYPE_INT32, shape=[1], data=np.array([i], dtype=np.int32).tobytes()
                ),
                sequence_id=1000 + i,
            )
            for i in range(5)
        ]
        replies = [r async for r in stub.EmbedStream(iter(requests))]
    assert [r.sequence_id for r in replies] == [1000, 1001, 1002, 1003, 1004]


async def test_tokenize_batch_detokenize_and_specials(
    server: ServerThread, reference_encoding: tiktoken.Encoding
) -> None:
    texts = ["Hello, world.", "", "Akwirw ier", "<|endoftext|> special"]
    async with AsyncClient(server.target) as client:
        with pytest.raises(InvalidArgumentError, match="disallowed special token") as raised:
            await client.tokenize_batch(texts)
        assert raised.value.code is grpc.StatusCode.INVALID_ARGUMENT
        allowed = await client.tokenize_batch(texts, allowed_special={"<|endoftext|>"})
        assert await client.tokenize_batch(texts, allowed_special="all") == allowed
        assert allowed == [reference_encoding.encode(t, allowed_special="all") for t in texts]
        assert await client.detokenize(allowed[0]) == "Hello, world."
        assert await client.detokenize(allowed[3]) == texts[3]


async def _drain(stream: AsyncIterator[Batch]) -> None:
    async for _ in stream:
        pass


async def _stream_status(stream: AsyncIterator[Batch]) -> grpc.StatusCode:
    with pytest.raises(EmbedServeError) as raised:
        await _drain(stream)
    return raised.value.code


async def test_bad_input_gets_clear_statuses_and_the_server_stays_up(server: ServerThread) -> None:
    async with AsyncClient(server.target) as client:
        with pytest.raises(InvalidArgumentError, match=r"token id 50257 at position \[0, 1\]"):
            await client.embed([[1, 50257, 2]])
        with pytest.raises(InvalidArgumentError, match=r"token id -3 at position \[2\]"):
            await client.embed([0, 1, -3])
        with pytest.raises(InvalidArgumentError, match=r"token id 60000 at position \[1, 0\]"):
            await client.embed([[0, 1, 2], [60000, 3, -1], [99999, 0, 0]])  # the first in row-major order
        with pytest.raises(InvalidArgumentError, match="exceeds the context length 1024"):
            await client.embed(np.zeros((1, 1000), dtype=np.int32), position_offset=30)
        with pytest.raises(InvalidArgumentError, match="empty"):
            await client.embed(np.zeros((0,), dtype=np.int32))
        with pytest.raises(InvalidArgumentError, match="texts is empty"):
            await client.tokenize_batch([])
        # Empty text and no IDs are each other's round trip, as in tiktoken: not errors.
        assert await client.tokenize("") == []
        assert await client.detokenize([]) == ""
        with pytest.raises(InvalidArgumentError, match="empty"):
            await _drain_any(client.embed_stream([[1, 2], []]))
        for bad in ({"batch_size": 0}, {"max_length": -4}, {"stride": 0}):
            settings = {"text": "word " * 100, "batch_size": 2, "max_length": 4, "stride": 4, **bad}
            assert await _stream_status(client.stream_batches(**settings)) is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentError, match="needs at least 257"):
            await _drain(client.stream_batches(text="too short"))
        with pytest.raises(InvalidArgumentError, match="exceeds the context length"):
            await _drain(client.stream_batches(text="word " * 3000, max_length=2000, include_embeddings=True))
        with pytest.raises(NotFoundError, match="not found"):
            await _drain(client.stream_batches(corpus="no-such-corpus.txt"))
        for escape in ("../outside.txt", "/etc/passwd", "nested/../../x"):
            assert await _stream_status(client.stream_batches(corpus=escape)) in (
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.NOT_FOUND,
            )
        assert (await client.embed([1, 2])).shape == (2, 256)
        assert await client.tokenize("still alive") == [24219, 6776]


async def test_malformed_tensors_are_invalid_argument(server: ServerThread) -> None:
    bad_tensors = [
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[2, 2], data=b"\0" * 12),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1], data=b"\0" * 4),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[-1], data=b""),
        tensor_pb2.Tensor(dtype=77, shape=[1], data=b"\0" * 4),  # type: ignore[arg-type]
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT64, shape=[2**40, 2**40], data=b""),
    ]
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        for tensor in bad_tensors:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Embed(embedding_pb2.EmbedRequest(token_ids=tensor))
            assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT, tensor
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Embed(
                embedding_pb2.EmbedRequest(
                    token_ids=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[1], data=b"\0" * 4),
                    options=embedding_pb2.EmbedOptions(output_dtype=tensor_pb2.DTYPE_INT32),
                )
            )
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_request_limits_name_the_limit(small_limits_server: ServerThread) -> None:
    async with AsyncClient(small_limits_server.target) as client:
        info = await client.info()
        assert info.limits.max_tokens_per_request == 2048
        with pytest.raises(InvalidArgumentError, match="--max-tokens-per-request 2048"):
            await client.embed(np.zeros((3, 700), dtype=np.int32))
        with pytest.raises(InvalidArgumentError, match="--max-message-bytes 1048576"):
            await client.embed(np.zeros((2, 1000), dtype=np.int32))
        with pytest.raises(InvalidArgumentError, match="--max-texts-per-request 3"):
            await client.tokenize_batch(["a", "b", "c", "d"])
        with pytest.raises(InvalidArgumentError, match="--max-batch-size 16"):
            await _drain(client.stream_batches(text="word " * 2000, batch_size=17, max_length=4, stride=4))
        with pytest.raises(InvalidArgumentError, match="--max-message-bytes"):
            await _drain(
                client.stream_batches(
                    text="word " * 5000, batch_size=16, max_length=256, stride=256, include_embeddings=True
                )
            )
        # The transport's own limit: a request larger than the server accepts.
        with pytest.raises(ResourceExhaustedError):
            await client.tokenize("x" * (2 << 20))
        assert await client.tokenize("fine") == [38125]


async def test_client_side_message_limit(server: ServerThread) -> None:
    async with AsyncClient(server.target, max_message_bytes=64 * 1024) as client:
        with pytest.raises(ResourceExhaustedError):
            await client.embed(np.zeros((1, 128), dtype=np.int32))


async def test_closing_a_stream_early_cancels_it(server: ServerThread) -> None:
    async with AsyncClient(server.target) as client:
        stream = client.stream_batches(text="word " * 5000, batch_size=2, max_length=8, stride=1)
        seen: list[Batch] = []
        async for batch in stream:
            seen.append(batch)
            if len(seen) == 3:
                break
        await stream.aclose()
        assert [b.index for b in seen] == [0, 1, 2]
        assert await client.tokenize("ok") == [482]


async def test_timeouts_are_deadline_exceeded(server: ServerThread) -> None:
    async with AsyncClient(server.target, timeout=1e-6) as client:
        with pytest.raises(EmbedServeError) as raised:
            await client.tokenize("x" * 100_000)
    assert raised.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


async def test_unreachable_server_is_unavailable() -> None:
    async with AsyncClient("127.0.0.1:1", timeout=2) as client:
        with pytest.raises(EmbedServeError) as raised:
            await client.info()
    assert raised.value.code is grpc.StatusCode.UNAVAILABLE


async def test_batches_with_embeddings_refuse_ids_past_a_small_vocabulary(tiny_server: ServerThread) -> None:
    # GPT-2 IDs run to 50256; the tiny model has 6 rows. On CUDA an out-of-range
    # lookup would poison the device for every later call.
    async with AsyncClient(tiny_server.target) as client:
        with pytest.raises(InvalidArgumentError, match=r"outside the embedding model's vocabulary \[0, 6\)"):
            await _drain(
                client.stream_batches(
                    text="word " * 50, batch_size=2, max_length=4, stride=4, include_embeddings=True
                )
            )
        plain = [
            b async for b in client.stream_batches(text="word " * 50, batch_size=2, max_length=4, stride=4)
        ]
        assert plain
        assert (await client.embed([2, 3, 5, 1], include_positional=False)).shape == (4, 3)


async def test_hostile_shapes_and_names_are_not_internal(server: ServerThread) -> None:
    hostile = [
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[0, 2**62], data=b""),
        # Found by the reliability suite: no dimension alone is huge, their product is.
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[0, 2**31, 2**31, 2**31], data=b""),
        tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[1] * 65, data=b"\0" * 4),
    ]
    async with grpc.aio.insecure_channel(server.target) as channel:
        stub = embedding_pb2_grpc.EmbeddingServiceStub(channel)
        for tensor in hostile:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Embed(embedding_pb2.EmbedRequest(token_ids=tensor))
            assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    async with AsyncClient(server.target) as client:
        assert await _stream_status(client.stream_batches(corpus="x" * 5000)) is grpc.StatusCode.NOT_FOUND
    async with grpc.aio.insecure_channel(server.target) as channel:
        tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(channel)
        many_empty_texts = tokenizer_pb2.DetokenizeRequest(
            token_ids=tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_INT32, shape=[0], data=b""), lengths=[0] * 5000
        )
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await tokenizer.Detokenize(many_empty_texts)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "--max-texts-per-request 4096" in (raised.value.details() or "")


async def test_corpus_escapes_are_refused_even_when_the_target_exists(
    server: ServerThread, data_dir: Path
) -> None:
    (data_dir.parent / "outside.txt").write_text("secret " * 100)
    link = data_dir / "link-out.txt"
    link.symlink_to(data_dir.parent / "outside.txt")
    try:
        async with AsyncClient(server.target) as client:
            for escape in ("../outside.txt", f"{data_dir.parent}/outside.txt", "nested/../../outside.txt"):
                assert await _stream_status(client.stream_batches(corpus=escape, max_length=4, stride=4)) in (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    grpc.StatusCode.NOT_FOUND,
                )
            # The link's target exists and is readable, but lies outside the data folder.
            status = await _stream_status(client.stream_batches(corpus=link.name, max_length=4, stride=4))
            assert status == grpc.StatusCode.NOT_FOUND
    finally:
        link.unlink()


async def test_embed_stream_raises_the_producers_own_error(server: ServerThread) -> None:
    async def failing() -> AsyncIterator[list[int]]:
        yield [1, 2]
        raise RuntimeError("producer broke")

    async with AsyncClient(server.target) as client:
        received: list[object] = []

        async def collect() -> None:
            async for embeddings in client.embed_stream(failing()):
                received.append(embeddings)

        with pytest.raises(RuntimeError, match="producer broke"):
            await collect()
        assert len(received) == 1
        with pytest.raises(TypeError, match="must be integers"):
            await _drain_any(client.embed_stream([[0.5, 1.5]]))
        assert (await client.embed([1])).shape == (1, 256)


async def _drain_any(stream: AsyncIterator[object]) -> None:
    async for _ in stream:
        pass


async def test_a_cancelled_stream_stops_generating_on_the_server(
    server: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    from embedserve.server import services
    from embedserve.server.core import gather_windows

    gathered = 0
    original = gather_windows

    def counting(*args: Any) -> Any:
        nonlocal gathered
        gathered += 1
        return original(*args)

    monkeypatch.setattr(services, "gather_windows", counting)
    async with AsyncClient(server.target) as client:
        stream = client.stream_batches(
            text="word " * 5000, batch_size=2, max_length=8, stride=1, batches_per_message=1
        )
        first = await anext(stream)
        assert first.num_batches > 2000
        await stream.aclose()
        await asyncio.sleep(0.5)
        after_close = gathered
        await asyncio.sleep(0.5)
    assert gathered == after_close
    assert gathered < 100


async def test_embed_stream_window_errors_and_early_exit(server: ServerThread) -> None:
    rng = np.random.default_rng(5)
    windows = [rng.integers(0, 50257, size=(2, 16)) for _ in range(40)]
    async with AsyncClient(server.target) as client:
        expected = [await client.embed(w) for w in windows[:10]]
        got: list[np.ndarray] = []

        async def consume() -> None:
            async for embeddings in client.embed_stream([*windows[:10], np.array([[1, 99999]]), *windows]):
                got.append(embeddings)

        with pytest.raises(InvalidArgumentError, match="outside the vocabulary"):
            await consume()
        assert len(got) == 10  # everything before the bad window, in order
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
        stream = client.embed_stream(windows * 50)
        async for _ in stream:  # leave after one of 2,000 windows
            break
        await stream.aclose()
        concurrent = await asyncio.gather(*(client.embed(w) for w in windows))
        for window, embeddings in zip(windows, concurrent, strict=True):
            np.testing.assert_array_equal(embeddings, await client.embed(window))


async def test_a_server_on_pretrained_tables_serves_them(tmp_path: Path) -> None:
    # GPT-2's names with the prefix Hugging Face checkpoints carry, and other tensors beside them.
    generator = torch.Generator().manual_seed(5)
    token, position = torch.randn(50257, 8, generator=generator), torch.randn(16, 8, generator=generator)
    weights = tmp_path / "gpt2-like.safetensors"
    save_file(
        {
            "transformer.wte.weight": token,
            "transformer.wpe.weight": position,
            "lm_head.weight": token.clone(),
        },
        str(weights),
    )
    running = start_server(ServerConfig(port=0, device="cpu", word_vectors="none", weights=weights))
    try:
        async with AsyncClient(running.target) as client:
            info = await client.info()
            assert (info.vocab_size, info.dim, info.context_length) == (50257, 8, 16)
            assert (info.dtype, info.device, info.tokenizer) == ("float32", "cpu", "gpt2")
            assert str(weights) in info.weights_source
            ids = [[15, 50256, 0], [7, 7, 7]]
            expected = token[torch.tensor(ids)] + position[:3]
            np.testing.assert_array_equal(await client.embed(ids), expected.numpy())
            as_torch = to_torch(await client.embed(ids))  # the README's way to torch tensors
            assert torch.equal(as_torch, expected)
            as_torch += 1  # a copy of its own, not the read-only reply
            assert to_torch(np.array(ids, np.int32)).dtype == torch.int64  # as nn.Embedding takes
            np.testing.assert_array_equal(
                await client.embed([50256], position_offset=15), (token[50256] + position[15])[None].numpy()
            )
            with pytest.raises(InvalidArgumentError, match="exceeds the context length 16"):
                await client.embed([1, 2], position_offset=15)
            settings: dict[str, Any] = {"batch_size": 2, "max_length": 3, "stride": 3, "shuffle": False}
            (batch,) = [
                b
                async for b in client.stream_batches(
                    text="a b c d e f g h", include_embeddings=True, **settings
                )
            ]
            assert batch.inputs.dtype == np.int32  # as on the wire: int32 tensors
            assert batch.embeddings is not None
            np.testing.assert_array_equal(
                batch.embeddings, (token[torch.tensor(batch.inputs, dtype=torch.long)] + position[:3]).numpy()
            )
    finally:
        running.stop()
