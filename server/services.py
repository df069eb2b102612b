"""The gRPC servicers of Tokenizer, Batches and Embedding: decode the request, call the core,
encode the reply."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import math
from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
from embedserve.tensor import encode_message_field, encode_varint_field, to_tensor_pb
from embedserve.v1 import (
    batches_pb2,
    embedding_pb2,
    tensor_pb2,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor

from . import _codec
from .admission import SentReplies, hold_for_call
from .config import ServerConfig
from .core import CorpusStore, EmbeddingModel, EmbedJob, InvalidInput, NotReady, Tokenizer, request_memory
from .core.corpus import tokens_sha256
from .core.corpus_tokens import ArrayTokens, CorpusTokens
from .core.embed_batcher import EmbedBatcher
from .core.embed_jobs import OutputRegion, embed_job, result_shape
from .core.limits import RequestLimits
from .core.memory_budget import MemoryBudget, Reservation
from .core.shared_memory import SharedMemoryRegistry
from .core.stoppable import run_stoppable
from .core.stream_plan import BatchObserver, StreamPlan, StreamRequest, StreamSource, plan_stream
from .core.stretch_encoding import EncodePlan, encode_planned, plan_encoding
from .core.window_orders import InMemoryOrders, OrderStore
from .core.windows import PlannedBatch
from .errors import Context, stream_errors, unary_errors
from .metrics import Metrics, add_timings
from .security import check_same_host

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


# Texts of up to this many characters in all are cut into stretches on the event loop: a few
# scans in C, cheaper than the hop to a worker thread.
_PLAN_INLINE_CHARS = 1 << 20


async def _planned(tokenizer: Tokenizer, texts: list[str]) -> EncodePlan:
    if sum(map(len, texts)) <= _PLAN_INLINE_CHARS:
        return plan_encoding(tokenizer, texts)
    return await asyncio.to_thread(plan_encoding, tokenizer, texts)


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServiceServicer):
    def __init__(self, tokenizer: Tokenizer, config: ServerConfig, budget: MemoryBudget) -> None:
        self._tokenizer = tokenizer
        self._limits = RequestLimits.of(config)
        self._budget = budget

    @unary_errors
    async def Tokenize(
        self, request: tokenizer_pb2.TokenizeRequest, context: Context
    ) -> tokenizer_pb2.TokenizeResponse:
        texts = list(request.texts)
        if not texts:
            raise InvalidInput("texts is empty")
        self._limits.check_texts(len(texts))
        allowed = "all" if request.allow_all_special else frozenset(request.allowed_special)
        plan = await _planned(self._tokenizer, texts)
        held = await hold_for_call(
            self._budget, context, request_memory.texts_bytes(texts) + plan.working_bytes, "Tokenize"
        )
        ids, lengths = await run_stoppable(functools.partial(encode_planned, self._tokenizer, plan, allowed))
        held.shrink(request_memory.texts_bytes(texts) + request_memory.token_ids_reply_bytes(ids.size))
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
        self._tokenizer.check_ids(ids)
        working = request_memory.decode_working_bytes(ids.size, self._tokenizer.decoded_bytes(ids))
        await hold_for_call(
            self._budget, context, request_memory.request_bytes(request.ByteSize()) + working, "Detokenize"
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


class BatchesServicer:
    """BatchesService; registered by add_encoding_servicer, which lets replies go out pre-encoded."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        corpora: CorpusStore,
        model: EmbeddingModel,
        config: ServerConfig,
        batcher: EmbedBatcher,
        draining: asyncio.Event,
        budget: MemoryBudget,
        on_batch: BatchObserver | None = None,
    ) -> None:
        """on_batch is told of every batch whose windows a stream gathers (see BatchObserver)."""
        self._tokenizer = tokenizer
        self._corpora = corpora
        self._model = model
        self._limits = RequestLimits.of(config)
        self._batcher = batcher
        self._draining = draining
        self._budget = budget
        self._on_batch = on_batch

    async def _source(self, request: batches_pb2.StreamBatchesRequest, context: Context) -> StreamSource:
        """The source's token IDs and their sha256 (which cursors carry). A text is held against
        the memory budget for the whole stream, with its IDs and shuffled orders."""
        source = request.WhichOneof("source")
        tokens: CorpusTokens
        if source == "text":  # bounded by the request's size, so its orders stay in memory
            texts = [request.text]
            plan = await _planned(self._tokenizer, texts)
            held = await hold_for_call(
                self._budget, context, request_memory.texts_bytes(texts) + plan.working_bytes, "StreamBatches"
            )
            ids, _ = await run_stoppable(
                functools.partial(encode_planned, self._tokenizer, plan, self._tokenizer.separator)
            )
            held.shrink(request_memory.texts_bytes(texts) + request_memory.text_stream_bytes(ids.nbytes))
            tokens = ArrayTokens(ids, await asyncio.to_thread(tokens_sha256, ids))
            orders: OrderStore = InMemoryOrders()
        elif source == "corpus":
            tokens = await asyncio.to_thread(self._corpora.open, request.corpus)
            orders = self._corpora.window_orders
        else:
            raise InvalidInput("the request names no source: set text or corpus")
        return StreamSource(tokens, self._tokenizer.identity, self._tokenizer.n_vocab, orders)

    @stream_errors
    async def StreamBatches(
        self, request: batches_pb2.StreamBatchesRequest, context: Context
    ) -> AsyncIterator[bytes]:
        """Yields encoded StreamBatchesResponse messages; see add_encoding_servicer."""
        embeddings_dtype = _codec.output_dtype_from_pb(request.embeddings_dtype, "embeddings_dtype")
        # Off the event loop: a large corpus's first shuffled epoch is computed here, once.
        plan = await asyncio.to_thread(
            plan_stream,
            _stream_request(request),
            await self._source(request, context),
            limits=self._limits,
            model=self._model,
            embeddings_itemsize=embeddings_dtype.itemsize,
        )
        # What the stream runs ahead of its consumer is held against the budget: the message being
        # gathered, from its first batch, and the one before it until it has left (SentReplies).
        message_bytes = request_memory.encoded_reply_bytes(plan.batch_bytes * plan.batches_per_message)
        self._budget.check_fits(2 * message_bytes, "two StreamBatches messages")
        sent = SentReplies(context)
        pending: list[bytes] = []
        held: Reservation | None = None
        previous: PlannedBatch | None = None
        try:
            for batch in plan.batches():
                if batch.next_epoch != batch.epoch and batch.next_epoch <= plan.last_epoch:
                    await asyncio.to_thread(plan.plan_for, batch.next_epoch)  # the next epoch's order too
                if self._draining.is_set():  # at a batch boundary: the client has the cursor to resume from
                    if pending:
                        yield _packed(pending)
                    raise NotReady(SHUTTING_DOWN_MESSAGE)
                if held is None:
                    held = await self._budget.reserve(message_bytes, "StreamBatches")
                pending.append(await self._reply(plan, batch, previous, embeddings_dtype))
                previous = batch
                if len(pending) == plan.batches_per_message:
                    yield _packed(pending)
                    pending = []
                    sent.written(held)
                    held = None
            if pending:
                yield _packed(pending)
        finally:
            if held is not None:
                sent.written(held)  # given back with the call

    async def _reply(
        self,
        plan: StreamPlan,
        batch: PlannedBatch,
        previous: PlannedBatch | None,
        embeddings_dtype: torch.dtype,
    ) -> bytes:
        """The batch's StreamBatchesResponse, encoded; its embeddings are looked up straight into
        the reply's bytes (see _codec.TensorReply), so a batch is held twice at most: here and in
        gRPC's copy."""
        if plan.tokens.may_wait:  # object storage: fetch off the event loop, and ahead
            plan.prefetch_after(batch, previous)
            if not plan.ready(batch):
                inputs, targets = await asyncio.to_thread(plan.windows, batch)
            else:
                inputs, targets = plan.windows(batch)
        else:
            inputs, targets = plan.windows(batch)
        if self._on_batch is not None:
            self._on_batch(plan.settings, batch)
        fields = batches_pb2.StreamBatchesResponse(
            index=batch.index,
            inputs=to_tensor_pb(inputs, "int32"),
            targets=to_tensor_pb(targets, "int32"),
            num_batches=batch.plan.num_batches,
            num_windows=batch.plan.num_windows,
            num_tokens=batch.plan.num_tokens,
            epoch=batch.epoch,
            cursor=plan.cursor_after(batch),
        ).SerializeToString()
        if not plan.include_embeddings:
            return bytes(fields)
        # Fields may come in any order on the wire: the embeddings first, the others after them.
        shape = (*inputs.shape, self._model.dim)
        reply = _codec.TensorReply(_EMBEDDINGS_FIELD, shape, embeddings_dtype, fields)
        await self._batcher.embed(EmbedJob(inputs, output_dtype=embeddings_dtype, out=reply.tensor))
        return reply.message()


_EMBEDDINGS_FIELD = batches_pb2.StreamBatchesResponse.DESCRIPTOR.fields_by_name["embeddings"].number
_MORE_FIELD = batches_pb2.StreamBatchesResponse.DESCRIPTOR.fields_by_name["more"].number


def _packed(batches: list[bytes]) -> bytes:
    """One encoded message: the first batch, with the others in `more`."""
    if len(batches) == 1:
        return batches[0]
    return batches[0] + b"".join(encode_message_field(_MORE_FIELD, batch) for batch in batches[1:])


class EmbeddingServicer:
    """EmbeddingService; registered by add_encoding_servicer, which lets replies go out pre-encoded."""

    def __init__(
        self,
        model: EmbeddingModel,
        tokenizer: Tokenizer,
        config: ServerConfig,
        batcher: EmbedBatcher,
        shared_memory: SharedMemoryRegistry,
        draining: asyncio.Event,
        budget: MemoryBudget,
    ) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._limits = RequestLimits.of(config)
        self._stream_window = config.stream_window
        self._batcher = batcher
        self._shared_memory = shared_memory
        self._draining = draining
        self._budget = budget

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
        self, request: embedding_pb2.EmbedStreamRequest, held_by_stream: set[Reservation]
    ) -> tuple[bytes, Reservation]:
        """An encoded EmbedStreamResponse (see _codec.TensorReply), and its memory, held against
        the budget until the caller has sent it (and in `held_by_stream` until then, so that the
        stream gives back what it never sent)."""
        options = request.options
        if options.HasField("output_region"):
            raise InvalidInput("output_region is for Embed, not EmbedStream")
        trailer = encode_varint_field(2, request.sequence_id) if request.sequence_id else b""
        job = self._job(request.token_ids, options, None)
        shape = result_shape(job, self._model.dim)
        held = await self._budget.reserve(
            request_memory.request_bytes(request.ByteSize())
            + request_memory.encoded_reply_bytes(math.prod(shape) * job.output_dtype.itemsize),
            "an EmbedStream window",
        )
        held_by_stream.add(held)
        try:
            reply = _codec.TensorReply(1, shape, job.output_dtype, trailer)
            await self._batcher.embed(dataclasses.replace(job, out=reply.tensor))
        except BaseException:
            held.release()
            raise
        return reply.message(), held

    @unary_errors
    async def Embed(
        self, request: embedding_pb2.EmbedRequest, context: Context
    ) -> embedding_pb2.EmbedResponse | bytes:
        """Returns the reply encoded (bytes) unless it went to shared memory; see add_encoding_servicer."""
        options = request.options
        written_to = options.output_region if options.HasField("output_region") else None
        region = None if written_to is None else OutputRegion(written_to.handle, written_to.offset)
        if region is not None:
            check_same_host(context)
        job = self._job(request.token_ids, options, region)
        shape = result_shape(job, self._model.dim)
        result_bytes = 0 if region is not None else math.prod(shape) * job.output_dtype.itemsize
        await hold_for_call(
            self._budget,
            context,
            request_memory.request_bytes(request.ByteSize()) + request_memory.reply_bytes(result_bytes),
            "Embed",
        )
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
        check_same_host(context)
        if request.name:
            raise InvalidInput(
                "name must be empty: the server creates the region itself and returns its name "
                "(a client that creates its own region is from before embedserve 0.2; update it)"
            )
        if request.byte_size <= 0:
            raise InvalidInput("byte_size must be positive")
        # The region is the server's memory (tmpfs pages) for as long as the session lasts.
        await hold_for_call(self._budget, context, request.byte_size, "a shared-memory region")
        grant = self._shared_memory.create(context.peer(), request.byte_size)
        try:
            yield embedding_pb2.SharedMemorySessionResponse(
                handle=grant.handle, byte_size=grant.byte_size, name=grant.name
            )
            await asyncio.Event().wait()  # until the client cancels the session or goes away
        finally:
            self._shared_memory.release(grant.handle)

    @stream_errors
    async def EmbedStream(
        self, request_iterator: AsyncIterator[embedding_pb2.EmbedStreamRequest], context: Context
    ) -> AsyncIterator[bytes]:
        """Yields encoded EmbedStreamResponse messages; see add_encoding_servicer."""
        # Up to stream_window windows are read ahead and in the batcher at once (so one stream
        # can fill a batch); past that the reader waits, which is the stream's backpressure.
        in_flight: asyncio.Queue[asyncio.Task[tuple[bytes, Reservation]] | None] = asyncio.Queue(
            maxsize=self._stream_window
        )
        finished = False  # the reader stops at its next read
        failed = False  # the reader discards what the client still sends
        held: set[Reservation] = set()  # replies made and not yet sent

        async def read_ahead() -> None:
            try:
                async for request in request_iterator:
                    if finished:
                        return
                    if failed or self._draining.is_set():
                        continue
                    task = asyncio.create_task(self._embed(request, held))
                    # A window that fails once the stream has ended is nobody's to report.
                    task.add_done_callback(lambda done: done.cancelled() or done.exception())
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
        sent = SentReplies(context)
        try:
            while (task := await _next_or_drained(in_flight, self._draining)) is not None:
                reply, window_held = await task
                held.discard(window_held)
                try:
                    yield reply
                finally:
                    sent.written(window_held)
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
            for reservation in held:
                reservation.release()

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
                memory_budget_bytes=self._budget.total_bytes,
            ),
        )


def _pass_through(reply: Any) -> bytes:
    """Replies already encoded go out as they are; messages are serialized as usual."""
    return reply if isinstance(reply, bytes) else bytes(reply.SerializeToString())


_HANDLER_BY_KIND = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def add_encoding_servicer(servicer: Any, service: ServiceDescriptor, server: Any) -> None:
    """The generated add_...Servicer_to_server, except that a method may return its replies already
    encoded (bytes): a reply built around its tensor (Embed, EmbedStream, StreamBatches with
    embeddings) then costs gRPC's copy alone."""
    handlers = {
        method.name: _HANDLER_BY_KIND[method.client_streaming, method.server_streaming](
            getattr(servicer, method.name),
            request_deserializer=message_factory.GetMessageClass(method.input_type).FromString,
            response_serializer=_pass_through,
        )
        for method in service.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
