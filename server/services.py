"""The gRPC servicers of Tokenizer, Batches and Embedding: decode the request, call the core,
encode the reply."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
from embedserve.tensor import encode_varint_field, to_tensor_pb
from embedserve.v1 import (
    batches_pb2,
    batches_pb2_grpc,
    embedding_pb2,
    tensor_pb2,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

from . import _codec
from .config import ServerConfig
from .core import CorpusStore, EmbeddingModel, EmbedJob, InvalidInput, NotReady, Tokenizer
from .core.corpus import tokens_sha256
from .core.embed_batcher import EmbedBatcher
from .core.embed_jobs import OutputRegion, embed_job, result_shape
from .core.limits import RequestLimits
from .core.shared_memory import SharedMemoryRegistry
from .core.stream_plan import BatchObserver, StreamPlan, StreamRequest, StreamSource, plan_stream
from .core.window_orders import InMemoryOrders, OrderStore
from .core.windows import PlannedBatch
from .errors import Context, stream_errors, unary_errors
from .metrics import Metrics, add_timings

_FAILED_STREAM_DRAIN_SECONDS = 2.0
SHUTTING_DOWN_MESSAGE = "the server is shutting down; resume from the last reply on another replica"
_Item = TypeVar("_Item")


async def _next_or_drained(queue: asyncio.Queue[_Item], draining: asyncio.Event) -> _Item:
    """The queue's next item; once the server drains, what is queued and then NotReady."""
    if not queue.empty():
        return queue.get_nowait()
    if not draining.is_set():
        get = asyncio.ensure_future(queue.get())
        drained = asyncio.ensure_future(draining.wait())
        try:
            await asyncio.wait({get, drained}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            drained.cancel()
            if not get.done():
                get.cancel()  # a cancelled Queue.get takes nothing off the queue
        if get.done() and not get.cancelled():
            return get.result()
    if not queue.empty():
        return queue.get_nowait()
    raise NotReady(SHUTTING_DOWN_MESSAGE)


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, tokenizer: Tokenizer, config: ServerConfig) -> None:
        self._tokenizer = tokenizer
        self._limits = RequestLimits.of(config)

    @unary_errors
    async def Tokenize(
        self, request: tokenizer_pb2.TokenizeRequest, context: Context
    ) -> tokenizer_pb2.TokenizeResponse:
        texts = list(request.texts)
        if not texts:
            raise InvalidInput("texts is empty")
        self._limits.check_texts(len(texts))
        allowed = "all" if request.allow_all_special else frozenset(request.allowed_special)
        ids, lengths = await asyncio.to_thread(self._tokenizer.encode_batch, texts, allowed)
        self._limits.check_reply_bytes(ids.nbytes + 10 * len(lengths), f"the {ids.size} token IDs")
        return tokenizer_pb2.TokenizeResponse(token_ids=to_tensor_pb(ids, "int32"), lengths=lengths)

    def _decode_all(self, ids: np.ndarray[Any, Any], lengths: list[int]) -> list[str]:
        texts = self._tokenizer.decode_batch(ids, lengths)
        self._limits.check_reply_bytes(sum(len(t) for t in texts) * 4, f"the text of {ids.size} token IDs")
        return texts

    @unary_errors
    async def Detokenize(
        self, request: tokenizer_pb2.DetokenizeRequest, context: Context
    ) -> tokenizer_pb2.DetokenizeResponse:
        ids = _codec.token_ids_from_pb(request.token_ids).reshape(-1)
        self._limits.check_tokens(int(ids.size))
        lengths = list(request.lengths) or [ids.size]
        self._limits.check_texts(len(lengths))
        if any(n < 0 for n in lengths) or sum(lengths) != ids.size:
            raise InvalidInput(
                f"lengths must be non-negative and add up to the {ids.size} token IDs; "
                f"{len(lengths)} lengths add up to {sum(lengths)}"
            )
        texts = await asyncio.to_thread(self._decode_all, ids, lengths)
        return tokenizer_pb2.DetokenizeResponse(texts=texts)


def embed_batcher(
    model: EmbeddingModel, config: ServerConfig, metrics: Metrics | None = None
) -> EmbedBatcher:
    def observe(requests: int, tokens: int, waits: list[float]) -> None:
        assert metrics is not None
        metrics.batch_requests.observe(requests)
        metrics.batch_tokens.observe(tokens)
        for waited in waits:
            metrics.queue_seconds.observe(waited)

    batcher = EmbedBatcher(
        model,
        max_batch_tokens=config.max_batch_tokens,
        max_wait_us=config.max_wait_us,
        max_queue_tokens=config.max_queue,
        on_batch=observe if metrics is not None else None,
        on_queue_change=metrics.queue_tokens.set if metrics is not None else None,
    )
    return batcher


def _stream_request(request: batches_pb2.StreamBatchesRequest) -> StreamRequest:
    return StreamRequest(
        max_length=request.max_length,
        stride=request.stride,
        batch_size=request.batch_size,
        shuffle=request.shuffle,
        seed=request.seed,
        drop_last=request.drop_last,
        epoch=request.epoch,
        epochs=request.epochs,
        rank=request.rank,
        world_size=request.world_size,
        cursor=request.cursor,
        batches_per_message=request.batches_per_message,
        include_embeddings=request.include_embeddings,
    )


class BatchesServicer(batches_pb2_grpc.BatchesServiceServicer):
    def __init__(
        self,
        tokenizer: Tokenizer,
        corpora: CorpusStore,
        model: EmbeddingModel,
        config: ServerConfig,
        batcher: EmbedBatcher,
        draining: asyncio.Event,
        on_batch: BatchObserver | None = None,
    ) -> None:
        """on_batch is told of every batch whose windows a stream gathers (see BatchObserver)."""
        self._tokenizer = tokenizer
        self._corpora = corpora
        self._model = model
        self._limits = RequestLimits.of(config)
        self._batcher = batcher
        self._draining = draining
        self._on_batch = on_batch

    async def _source(self, request: batches_pb2.StreamBatchesRequest) -> StreamSource:
        """The source's token IDs and their sha256 (which cursors carry)."""
        source = request.WhichOneof("source")
        ids: np.ndarray[Any, np.dtype[np.integer]]
        if source == "text":  # bounded by the request's size, so its orders stay in memory
            ids = await asyncio.to_thread(self._tokenizer.encode, request.text, self._tokenizer.separator)
            sha256 = await asyncio.to_thread(tokens_sha256, ids)
            orders: OrderStore = InMemoryOrders()
        elif source == "corpus":
            ids, sha256 = await asyncio.to_thread(self._corpora.tokens_and_hash, request.corpus)
            orders = self._corpora.window_orders
        else:
            raise InvalidInput("the request names no source: set text or corpus")
        return StreamSource(ids, sha256, self._tokenizer.identity, self._tokenizer.n_vocab, orders)

    @stream_errors
    async def StreamBatches(
        self, request: batches_pb2.StreamBatchesRequest, context: Context
    ) -> AsyncIterator[batches_pb2.StreamBatchesResponse]:
        embeddings_dtype = _codec.output_dtype_from_pb(request.embeddings_dtype, "embeddings_dtype")
        # Off the event loop: a large corpus's first shuffled epoch is computed here, once.
        plan = await asyncio.to_thread(
            plan_stream,
            _stream_request(request),
            await self._source(request),
            limits=self._limits,
            model=self._model,
            embeddings_itemsize=embeddings_dtype.itemsize,
        )
        pending: list[batches_pb2.StreamBatchesResponse] = []
        for batch in plan.batches():
            if batch.next_epoch != batch.epoch and batch.next_epoch <= plan.last_epoch:
                await asyncio.to_thread(plan.plan_for, batch.next_epoch)  # the next epoch's order, likewise
            if self._draining.is_set():  # at a batch boundary: the client has the cursor to resume from
                if pending:
                    yield _packed(pending)
                raise NotReady(SHUTTING_DOWN_MESSAGE)
            pending.append(await self._reply(plan, batch, embeddings_dtype))
            if len(pending) == plan.batches_per_message:
                yield _packed(pending)
                pending = []
        if pending:
            yield _packed(pending)

    async def _reply(
        self, plan: StreamPlan, batch: PlannedBatch, embeddings_dtype: torch.dtype
    ) -> batches_pb2.StreamBatchesResponse:
        inputs, targets = plan.windows(batch)
        if self._on_batch is not None:
            self._on_batch(plan.settings, batch)
        embeddings = None
        if plan.include_embeddings:
            embedded = await self._batcher.embed(EmbedJob(inputs, output_dtype=embeddings_dtype))
            embeddings = _codec.tensor_pb_from_torch(embedded)
        return batches_pb2.StreamBatchesResponse(
            index=batch.index,
            inputs=to_tensor_pb(inputs, "int32"),
            targets=to_tensor_pb(targets, "int32"),
            embeddings=embeddings,
            num_batches=batch.plan.num_batches,
            num_windows=batch.plan.num_windows,
            num_tokens=batch.plan.num_tokens,
            epoch=batch.epoch,
            cursor=plan.cursor_after(batch),
        )


def _packed(batches: list[batches_pb2.StreamBatchesResponse]) -> batches_pb2.StreamBatchesResponse:
    """One message: the first batch, with the others in `more`."""
    first = batches[0]
    first.more.extend(batches[1:])
    return first


class EmbeddingServicer:
    """EmbeddingService; registered by add_embedding_service, which lets replies go out pre-encoded."""

    def __init__(
        self,
        model: EmbeddingModel,
        tokenizer: Tokenizer,
        config: ServerConfig,
        batcher: EmbedBatcher,
        shared_memory: SharedMemoryRegistry,
        draining: asyncio.Event,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._limits = RequestLimits.of(config)
        self._stream_window = config.stream_window
        self._batcher = batcher
        self._shared_memory = shared_memory
        self._draining = draining

    def _job(
        self, token_ids: tensor_pb2.Tensor, options: embedding_pb2.EmbedOptions, region: OutputRegion | None
    ) -> EmbedJob:
        """The request decoded and checked, as a job for the batcher."""
        return embed_job(
            self._model,
            _codec.token_ids_from_pb(token_ids),
            position_offset=options.position_offset,
            include_positional=options.include_positional if options.HasField("include_positional") else True,
            output_dtype=_codec.output_dtype_from_pb(options.output_dtype),
            region=region,
            limits=self._limits,
            shared_memory=self._shared_memory,
        )

    async def _embed(
        self, token_ids: tensor_pb2.Tensor, options: embedding_pb2.EmbedOptions, sequence_id: int = 0
    ) -> bytes:
        """An encoded EmbedStreamResponse (see _codec.TensorReply)."""
        if options.HasField("output_region"):
            raise InvalidInput("output_region is for Embed, not EmbedStream")
        trailer = encode_varint_field(2, sequence_id) if sequence_id else b""
        job = self._job(token_ids, options, None)
        reply = _codec.TensorReply(1, result_shape(job, self._model.dim), job.output_dtype, trailer)
        await self._batcher.embed(dataclasses.replace(job, out=reply.tensor))
        return reply.message()

    @unary_errors
    async def Embed(
        self, request: embedding_pb2.EmbedRequest, context: Context
    ) -> embedding_pb2.EmbedResponse | bytes:
        """Returns the reply encoded (bytes) unless it went to shared memory; see add_embedding_service."""
        options = request.options
        written_to = options.output_region if options.HasField("output_region") else None
        region = None if written_to is None else OutputRegion(written_to.handle, written_to.offset)
        job = self._job(request.token_ids, options, region)
        shape = result_shape(job, self._model.dim)
        reply = None
        if region is None:
            reply = _codec.TensorReply(1, shape, job.output_dtype)
            out = reply.tensor
        else:
            out = self._shared_memory.view(region.handle, region.offset, shape, job.output_dtype)
        timed = await self._batcher.embed_timed(dataclasses.replace(job, out=out))
        add_timings(context, queue=timed.queue_seconds, compute=timed.compute_seconds)
        if reply is not None:
            return reply.message()  # an encoded EmbedResponse
        described = tensor_pb2.Tensor(dtype=_codec.wire_dtype(job.output_dtype), shape=list(shape))
        return embedding_pb2.EmbedResponse(
            embeddings=described, written_to=written_to, written_bytes=out.numel() * out.element_size()
        )

    @stream_errors
    async def SharedMemorySession(
        self, request: embedding_pb2.SharedMemorySessionRequest, context: Context
    ) -> AsyncIterator[embedding_pb2.SharedMemorySessionResponse]:
        handle = self._shared_memory.register(request.name, request.byte_size)
        try:
            yield embedding_pb2.SharedMemorySessionResponse(handle=handle, byte_size=request.byte_size)
            await asyncio.Event().wait()  # until the client cancels the session or goes away
        finally:
            self._shared_memory.release(handle)

    @stream_errors
    async def EmbedStream(
        self, request_iterator: AsyncIterator[embedding_pb2.EmbedStreamRequest], context: Context
    ) -> AsyncIterator[bytes]:
        """Yields encoded EmbedStreamResponse messages; see add_embedding_service."""
        # Up to stream_window windows are read ahead and in the batcher at once (so one stream
        # can fill a batch); past that the reader waits, which is the stream's backpressure.
        in_flight: asyncio.Queue[asyncio.Task[bytes] | None] = asyncio.Queue(maxsize=self._stream_window)
        finished = False  # the reader stops at its next read
        failed = False  # the reader discards what the client still sends

        async def read_ahead() -> None:
            try:
                async for request in request_iterator:
                    if finished:
                        return
                    if failed or self._draining.is_set():
                        continue
                    task = asyncio.create_task(
                        self._embed(request.token_ids, request.options, request.sequence_id)
                    )
                    await in_flight.put(task)
            except Exception:
                if not (finished or failed):  # once the call has ended, a failing read is expected
                    raise
            finally:
                if not (finished or failed):
                    await in_flight.put(None)

        def cancel_queued() -> None:
            while not in_flight.empty():  # frees a reader blocked on a full window, too
                task = in_flight.get_nowait()
                if task is not None:
                    task.cancel()

        # The reader is never cancelled: cancelling a read that gRPC's core still holds turns the
        # status this stream ends with into INTERNAL. It ends by itself once the call is over.
        reader = asyncio.create_task(read_ahead())
        reader.add_done_callback(lambda task: task.cancelled() or task.exception())
        try:
            while (task := await _next_or_drained(in_flight, self._draining)) is not None:
                yield await task
            await reader  # a failure reading the requests ends the stream with it
        except Exception:
            # A client still writing when the call ends with an error may see INTERNAL instead of
            # this error (a gRPC race), so take what it is still sending, for a bounded time, first.
            failed = True
            cancel_queued()
            await asyncio.wait({reader}, timeout=_FAILED_STREAM_DRAIN_SECONDS)
            raise
        finally:
            finished = True
            cancel_queued()

    @unary_errors
    async def Info(
        self, request: embedding_pb2.EmbeddingServiceInfoRequest, context: Context
    ) -> embedding_pb2.EmbeddingServiceInfoResponse:
        return embedding_pb2.EmbeddingServiceInfoResponse(
            vocab_size=self._model.vocab_size,
            dim=self._model.dim,
            context_length=self._model.context_length,
            dtype=_codec.wire_dtype(self._model.dtype),
            device=str(self._model.device),
            tokenizer=self._tokenizer.name,
            tokenizer_vocab_size=self._tokenizer.n_vocab,
            tokenizer_identity=self._tokenizer.identity,
            weights_source=self._model.source,
            limits=embedding_pb2.RequestLimits(
                max_message_bytes=self._limits.max_message_bytes,
                max_tokens_per_request=self._limits.max_tokens_per_request,
                max_texts_per_request=self._limits.max_texts_per_request,
                max_batch_size=self._limits.max_batch_size,
            ),
        )


def _pass_through(reply: Any) -> bytes:
    """Replies already encoded go out as they are; messages are serialized as usual."""
    return reply if isinstance(reply, bytes) else bytes(reply.SerializeToString())


def add_embedding_service(servicer: EmbeddingServicer, server: Any) -> None:
    """The generated add_EmbeddingServiceServicer_to_server, except that Embed and EmbedStream may
    return their replies already encoded: a 2 MB result then costs one copy instead of three."""
    handlers = {
        "Embed": grpc.unary_unary_rpc_method_handler(
            servicer.Embed,
            request_deserializer=embedding_pb2.EmbedRequest.FromString,
            response_serializer=_pass_through,
        ),
        "EmbedStream": grpc.stream_stream_rpc_method_handler(
            servicer.EmbedStream,
            request_deserializer=embedding_pb2.EmbedStreamRequest.FromString,
            response_serializer=_pass_through,
        ),
        "Info": grpc.unary_unary_rpc_method_handler(
            servicer.Info,
            request_deserializer=embedding_pb2.EmbeddingServiceInfoRequest.FromString,
            response_serializer=_pass_through,
        ),
        "SharedMemorySession": grpc.unary_stream_rpc_method_handler(
            servicer.SharedMemorySession,
            request_deserializer=embedding_pb2.SharedMemorySessionRequest.FromString,
            response_serializer=_pass_through,
        ),
    }
    name = embedding_pb2.DESCRIPTOR.services_by_name["EmbeddingService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
