"""AsyncClient: one channel, async methods returning numpy values."""

from __future__ import annotations

import asyncio
import itertools
import json
import types
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Sequence,
)
from typing import Any, Literal, TypeVar, Unpack

import grpc
import numpy as np
import numpy.typing as npt
from embedserve.v1 import (
    batches_pb2,
    batches_pb2_grpc,
    embedding_pb2,
    embedding_pb2_grpc,
    tensor_pb2,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

from ._auth import api_key_interceptors
from ._batch_spec import BatchSettings, BatchSpec, EmbeddingDtype
from ._errors import call_idempotent, error_from_rpc, retry_pause
from ._shared_memory import SharedMemoryRegion
from ._values import Batch, EmbeddingInfo, RequestLimits
from ._word_vectors import AsyncWordVectors
from .tensor import DTYPE_BY_NAME, NAME_BY_DTYPE, from_tensor_pb, tensor_field_decoder, to_tensor_pb

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_MAX_MESSAGE_BYTES = 128 * 1024 * 1024
_T = TypeVar("_T")
_EMBEDDING_SERVICE = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
_EMBED_METHOD = f"/{_EMBEDDING_SERVICE}/Embed"
_EMBED_STREAM_METHOD = f"/{_EMBEDDING_SERVICE}/EmbedStream"


def _token_ids_pb(token_ids: npt.ArrayLike) -> tensor_pb2.Tensor:
    ids = np.asarray(token_ids)
    if ids.dtype.kind not in "iu":
        if ids.size:
            raise TypeError(f"token IDs must be integers, got {ids.dtype}")
        ids = ids.astype(np.int32)
    fits_int32 = ids.size == 0 or (int(ids.min()) >= -(2**31) and int(ids.max()) < 2**31)
    return to_tensor_pb(ids, "int32" if fits_int32 else "int64")


def _embed_options(
    include_positional: bool, position_offset: int, dtype: EmbeddingDtype
) -> embedding_pb2.EmbedOptions:
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    return embedding_pb2.EmbedOptions(
        position_offset=position_offset,
        include_positional=include_positional,
        output_dtype=DTYPE_BY_NAME[dtype],
    )


async def _as_async_iterator(items: Iterable[_T] | AsyncIterable[_T]) -> AsyncIterator[_T]:
    if isinstance(items, AsyncIterable):
        async for item in items:
            yield item
    else:
        for item in items:
            yield item


# Calls that change nothing on the server are retried by gRPC on UNAVAILABLE (a restarting or
# departed replica), with exponential backoff; an overloaded server's RESOURCE_EXHAUSTED is retried
# by call_idempotent after the delay it asks for. Streams are not: stream_batches resumes from its
# cursor instead.
PACKED_MESSAGE_BYTES = 256 * 1024
RETRY_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "embedserve.v1.TokenizerService"},
                    {"service": "embedserve.v1.EmbeddingService", "method": "Embed"},
                    {"service": "embedserve.v1.EmbeddingService", "method": "Info"},
                    {"service": "embedserve.v1.WordVectorsService"},
                ],
                "retryPolicy": {
                    "maxAttempts": 5,
                    "initialBackoff": "0.1s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)


def _auto_batches_per_message(batch_size: int, max_length: int, include_embeddings: bool) -> int:
    """Small batches share messages: one message costs more than copying a few kB."""
    if include_embeddings or batch_size <= 0 or max_length <= 0:
        return 1
    token_bytes = 2 * 4 * batch_size * max_length  # inputs and targets, int32
    return max(1, min(64, PACKED_MESSAGE_BYTES // token_bytes))


def _stream_request(spec: BatchSpec, cursor: bytes | None) -> batches_pb2.StreamBatchesRequest:
    """The request for spec's stream, from cursor (None: its start), without its text or corpus."""
    batches_per_message = spec.batches_per_message
    if batches_per_message is None:
        batches_per_message = _auto_batches_per_message(
            spec.batch_size, spec.max_length, spec.include_embeddings
        )
    return batches_pb2.StreamBatchesRequest(
        batch_size=spec.batch_size,
        max_length=spec.max_length,
        stride=spec.stride,
        shuffle=spec.shuffle,
        seed=spec.seed,
        drop_last=spec.drop_last,
        include_embeddings=spec.include_embeddings,
        embeddings_dtype=DTYPE_BY_NAME[spec.embeddings_dtype],
        epoch=spec.epoch,
        epochs=spec.epochs,
        rank=spec.rank,
        world_size=spec.world_size,
        cursor=cursor or b"",
        batches_per_message=batches_per_message,
    )


def _split_scheme(target: str) -> tuple[str, bool]:
    """(gRPC target, whether TLS is asked for) of `https://host[:port]`, `http://host:port` or a
    plain gRPC target."""
    for scheme, tls, default_port in (("https://", True, 443), ("http://", False, 80)):
        if target.startswith(scheme):
            address = target[len(scheme) :].rstrip("/")
            if "/" in address:
                raise ValueError(f"{target!r}: a target has no path")
            has_port = address.rsplit("]", 1)[-1].count(":") == 1
            return (address if has_port else f"{address}:{default_port}"), tls
    return target, False


def channel_credentials(
    target: str,
    *,
    root_certificates: bytes | None = None,
    client_certificate: bytes | None = None,
    client_key: bytes | None = None,
) -> tuple[str, grpc.ChannelCredentials | None]:
    """The gRPC target, and TLS credentials when TLS is asked for (an `https://` target or any
    certificate; see AsyncClient), else None."""
    if (client_certificate is None) != (client_key is None):
        raise ValueError("client_certificate and client_key go together")
    target, tls_scheme = _split_scheme(target)
    if tls_scheme or root_certificates is not None or client_certificate is not None:
        return target, grpc.ssl_channel_credentials(root_certificates, client_key, client_certificate)
    return target, None


class AsyncClient:
    """Client of an embedserve server; use as `async with AsyncClient(target) as client:`.

    `timeout` bounds every unary call and `stream_timeout` every stream, in
    seconds. Failed calls raise `EmbedServeError` subclasses carrying the
    grpc.StatusCode. Arrays returned are read-only numpy views of the reply.
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        timeout: float = 30.0,
        stream_timeout: float = 24 * 3600.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        options: Sequence[tuple[str, Any]] = (),
        connections: int = 4,
        api_key: str | None = None,
        root_certificates: bytes | None = None,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
    ) -> None:
        """`connections`: TCP connections that concurrent Embed calls are spread over, since large
        replies multiplexed on one HTTP/2 connection stall one another in gRPC Python (measured
        in docs/performance.md).

        `api_key` is sent as `authorization: Bearer KEY`. TLS is used when the target is
        `https://host[:port]` (port 443 by default; the system's CAs unless `root_certificates`),
        or when `root_certificates` (PEM of the CA that signed the server's certificate) or a
        client certificate (mutual TLS: `client_certificate` and `client_key`, PEM) is given.
        `http://host:port` is plaintext, like a bare `host:port`."""
        if timeout <= 0 or stream_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if connections < 1:
            raise ValueError("connections must be >= 1")
        self.target = target
        target, credentials = channel_credentials(
            target,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_key=client_key,
        )
        self.timeout = timeout
        self.stream_timeout = stream_timeout
        channel_options = [
            # gRPC keeps the first of repeated channel arguments: the caller's come first, so each
            # default below can be overridden.
            *options,
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Without a local pool, channels to one target share one connection.
            ("grpc.use_local_subchannel_pool", 1),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", RETRY_SERVICE_CONFIG),
            # Pings every minute, idle or not (the server permits it), so a replica that vanished
            # without closing its connections is noticed within 80 s rather than at the next call.
            # (grpcio 1.85 times a keepalive ping out after the ping timeout, 60 s unless set;
            # the keepalive timeout is what older versions and other gRPC stacks read.)
            ("grpc.keepalive_time_ms", 60_000),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.http2.ping_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # gRPC stops pinging after two pings with no data between them unless told otherwise.
            ("grpc.http2.max_pings_without_data", 0),
        ]
        interceptors = api_key_interceptors(api_key) if api_key else None
        if credentials is not None:
            self._channels = [
                grpc.aio.secure_channel(
                    target, credentials, options=channel_options, interceptors=interceptors
                )
                for _ in range(connections)
            ]
        else:
            self._channels = [
                grpc.aio.insecure_channel(target, options=channel_options, interceptors=interceptors)
                for _ in range(connections)
            ]
        self._channel = self._channels[0]
        self._tokenizer = tokenizer_pb2_grpc.TokenizerServiceStub(self._channel)
        self._batches = batches_pb2_grpc.BatchesServiceStub(self._channel)
        self._embedding = embedding_pb2_grpc.EmbeddingServiceStub(self._channel)
        # Embed and EmbedStream replies leave their tensor's bytes in the received message.
        self._embed_pool = [
            channel.unary_unary(
                _EMBED_METHOD,
                request_serializer=embedding_pb2.EmbedRequest.SerializeToString,
                response_deserializer=tensor_field_decoder(embedding_pb2.EmbedResponse, 1),
            )
            for channel in self._channels
        ]
        self._embed_stream = self._channel.stream_stream(
            _EMBED_STREAM_METHOD,
            request_serializer=embedding_pb2.EmbedStreamRequest.SerializeToString,
            response_deserializer=tensor_field_decoder(embedding_pb2.EmbedStreamResponse, 1),
        )
        self._next_connection = 0
        self.word_vectors = AsyncWordVectors(self._channel, lambda: self.timeout)
        """gensim-style word-vector queries (most_similar, similarity, ...) on the server's model."""

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(grace=None)

    def _pooled_embed(self) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
        """The next connection's Embed, round robin."""
        self._next_connection = (self._next_connection + 1) % len(self._embed_pool)
        return self._embed_pool[self._next_connection]

    async def _unary(self, call: Callable[..., Awaitable[_T]], request: Any) -> _T:
        return await call_idempotent(call, request, self.timeout)

    # Tokenizer

    async def tokenize_batch(
        self, texts: Sequence[str], *, allowed_special: Iterable[str] | Literal["all"] = ()
    ) -> list[list[int]]:
        """GPT-2 token IDs of each text, as tiktoken's encode() gives them."""
        if isinstance(texts, str):
            raise TypeError("tokenize_batch takes a sequence of texts; use tokenize() for one")
        request = tokenizer_pb2.TokenizeRequest(texts=list(texts))
        if allowed_special == "all":
            request.allow_all_special = True
        else:
            request.allowed_special.extend(allowed_special)
        reply = await self._unary(self._tokenizer.Tokenize, request)
        flat = from_tensor_pb(reply.token_ids).tolist()
        bounds = np.cumsum([0, *reply.lengths]).tolist()
        return [flat[start:end] for start, end in itertools.pairwise(bounds)]

    async def tokenize(self, text: str, *, allowed_special: Iterable[str] | Literal["all"] = ()) -> list[int]:
        return (await self.tokenize_batch([text], allowed_special=allowed_special))[0]

    async def detokenize(self, token_ids: npt.ArrayLike) -> str:
        ids = np.asarray(token_ids).reshape(-1)
        reply = await self._unary(
            self._tokenizer.Detokenize, tokenizer_pb2.DetokenizeRequest(token_ids=_token_ids_pb(ids))
        )
        return str(reply.texts[0])

    # Batches

    def stream_batches(
        self,
        *,
        text: str | None = None,
        corpus: str | None = None,
        spec: BatchSpec | None = None,
        cursor: bytes | None = None,
        reconnect_attempts: int = 5,
        **settings: Unpack[BatchSettings],
    ) -> AsyncGenerator[Batch, None]:
        """Sliding-window batches of `text` or of a corpus in the server's --data-dir.

        `spec` (a BatchSpec) says how the windows are cut, shuffled and shared out; keywords
        (`batch_size=8, shuffle=False`, any BatchSpec field) set its fields, or change those of
        `spec` when both are given. Each Batch carries a `cursor`: pass it back as `cursor=` to
        continue right after that batch. When the server becomes UNAVAILABLE mid-stream (a
        restart, a replica going away), or refuses it for want of memory with a retry hint, the
        iterator reconnects and resumes from its last cursor, up to `reconnect_attempts` times in
        a row, with growing pauses (at least the server's hint). Closing the iterator early
        cancels the stream on the server.
        """
        spec = (spec or BatchSpec()).replace(**settings)
        return self._stream_batches(text, corpus, spec, cursor, reconnect_attempts)

    async def _stream_batches(
        self,
        text: str | None,
        corpus: str | None,
        spec: BatchSpec,
        cursor: bytes | None,
        reconnect_attempts: int,
    ) -> AsyncGenerator[Batch, None]:
        if (text is None) == (corpus is None):
            raise ValueError("pass exactly one of text= or corpus=")
        request = _stream_request(spec, cursor)
        if text is not None:
            request.text = text
        else:
            request.corpus = corpus or ""
        failures = 0
        while True:
            call = self._batches.StreamBatches(request, timeout=self.stream_timeout)
            try:
                async for message in call:
                    failures = 0
                    for reply in (message, *message.more):
                        request.cursor = reply.cursor
                        yield Batch(
                            index=reply.index,
                            inputs=from_tensor_pb(reply.inputs),  # type: ignore[arg-type]
                            targets=from_tensor_pb(reply.targets),  # type: ignore[arg-type]
                            embeddings=(
                                from_tensor_pb(reply.embeddings) if reply.HasField("embeddings") else None
                            ),
                            num_batches=reply.num_batches,
                            epoch=reply.epoch,
                            cursor=reply.cursor,
                        )
                return
            except grpc.RpcError as error:
                failure = error_from_rpc(error)
                pause = retry_pause(error, failures)  # an overloaded server's delay
                if failure.code is grpc.StatusCode.UNAVAILABLE:
                    pause = min(5.0, 0.1 * 2 ** (failures + 1))
                if pause is None or failures >= reconnect_attempts:
                    raise failure from None
                failures += 1
                await asyncio.sleep(pause)
            finally:
                call.cancel()

    # Embedding

    async def embed(
        self,
        token_ids: npt.ArrayLike,
        *,
        include_positional: bool = True,
        position_offset: int = 0,
        dtype: EmbeddingDtype = "float32",
        output: SharedMemoryRegion | None = None,
        output_offset: int = 0,
    ) -> npt.NDArray[Any]:
        """Token (+ positional) embeddings: [B, T] IDs give [B, T, D], [T] gives [T, D].

        With `output` (a region from `shared_memory()`), the server writes the result into it at
        `output_offset` and the array returned is a view of the region, not a copy of a reply.
        """
        options = _embed_options(include_positional, position_offset, dtype)
        if output is not None:
            options.output_region.CopyFrom(output.output(output_offset))
        request = embedding_pb2.EmbedRequest(token_ids=_token_ids_pb(token_ids), options=options)
        reply, data = await self._unary(self._pooled_embed(), request)
        if output is not None:
            return output.array(reply.embeddings, output_offset, reply.written_bytes)
        return from_tensor_pb(reply.embeddings, data)

    def shared_memory(self, byte_size: int) -> SharedMemoryRegion:
        """A shared-memory region of byte_size bytes for `embed(..., output=region)`; the server must
        run on this host. Use as `async with client.shared_memory(n) as region:`; leaving the block
        (or losing the connection) releases it on both sides."""
        return SharedMemoryRegion(self._embedding, byte_size)

    async def embed_stream(
        self,
        windows: Iterable[npt.ArrayLike] | AsyncIterable[npt.ArrayLike],
        *,
        include_positional: bool = True,
        position_offset: int = 0,
        dtype: EmbeddingDtype = "float32",
    ) -> AsyncGenerator[npt.NDArray[Any], None]:
        """Embeddings of each window, in order, over one bidirectional stream."""
        options = _embed_options(include_positional, position_offset, dtype)

        # grpc consumes the request iterator in a task of its own and turns an
        # exception there into a bare cancellation; keep it and raise it here.
        producer_error: list[BaseException] = []

        async def requests() -> AsyncIterator[embedding_pb2.EmbedStreamRequest]:
            sequence_id = 0
            try:
                async for window in _as_async_iterator(windows):
                    yield embedding_pb2.EmbedStreamRequest(
                        token_ids=_token_ids_pb(window), options=options, sequence_id=sequence_id
                    )
                    sequence_id += 1
            except Exception as error:
                producer_error.append(error)

        call = self._embed_stream(requests(), timeout=self.stream_timeout)
        try:
            async for reply, data in call:
                yield from_tensor_pb(reply.embeddings, data)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None
        finally:
            call.cancel()
        if producer_error:
            raise producer_error[0]

    async def info(self) -> EmbeddingInfo:
        reply = await self._unary(self._embedding.Info, embedding_pb2.EmbeddingServiceInfoRequest())
        limits = reply.limits
        return EmbeddingInfo(
            vocab_size=reply.vocab_size,
            dim=reply.dim,
            context_length=reply.context_length,
            dtype=NAME_BY_DTYPE.get(reply.dtype, "unknown"),
            device=reply.device,
            tokenizer=reply.tokenizer,
            weights_source=reply.weights_source,
            limits=RequestLimits(
                max_message_bytes=limits.max_message_bytes,
                max_tokens_per_request=limits.max_tokens_per_request,
                max_texts_per_request=limits.max_texts_per_request,
                max_batch_size=limits.max_batch_size,
                memory_budget_bytes=limits.memory_budget_bytes,
            ),
            tokenizer_vocab_size=reply.tokenizer_vocab_size,
            tokenizer_identity=reply.tokenizer_identity,
        )
