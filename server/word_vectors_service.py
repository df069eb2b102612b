"""The WordVectors servicer: decode, call the core (batched), encode."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from importlib import resources
from typing import TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from embedserve.tensor import to_tensor_pb
from embedserve.v1 import tensor_pb2, word_vectors_pb2, word_vectors_pb2_grpc

from . import _codec
from .admission import hold_for_call
from .config import ServerConfig
from .core import InvalidInput, request_memory
from .core.batcher import Batcher
from .core.limits import RequestLimits
from .core.memory_budget import MemoryBudget
from .core.stoppable import run_stoppable
from .core.word_vector_slot import WordVectorSlot
from .core.word_vectors import PreparedBatch, QueryColumns, RankedLists, SimilarityQuery, Term
from .errors import Context, unary_errors
from .metrics import add_timings

_T = TypeVar("_T")
# Requests with more items than these (terms, pairs or words; ranked results) are decoded, computed
# and answered in a worker thread, so a large one cannot hold every other call on the event loop;
# a small one stays on the loop, where the thread hop would cost more than its work.
_INLINE_ITEMS = 256
_INLINE_RESULTS = 16384

_METHODS = {
    word_vectors_pb2.SIMILARITY_METHOD_UNSPECIFIED: "add",
    word_vectors_pb2.SIMILARITY_METHOD_COS_ADD: "add",
    word_vectors_pb2.SIMILARITY_METHOD_COS_MUL: "mul",
}


def _float32_pb(values: list[float]) -> tensor_pb2.Tensor:
    return to_tensor_pb(np.asarray(values, dtype=np.float32))


def _term(term: word_vectors_pb2.QueryTerm) -> Term:
    weight = term.weight if term.HasField("weight") else None
    kind = term.WhichOneof("term")
    if kind == "word":
        return Term(word=term.word, weight=weight)
    if kind == "vector":
        return Term(vector=_raw_vectors(term.vector, "vector"), weight=weight)
    raise InvalidInput("a query term has neither a word nor a vector")


def _raw_vectors(tensor: tensor_pb2.Tensor, field: str) -> npt.NDArray[np.float32]:
    if tensor.dtype not in (tensor_pb2.DTYPE_FLOAT32, tensor_pb2.DTYPE_FLOAT16):
        raise InvalidInput("a raw vector must be float32 or float16")
    return _codec.array_from_pb(tensor, field).astype(np.float32)


def _packed_columns(packed: word_vectors_pb2.PackedQueries) -> QueryColumns:
    count = len(packed.topn)
    methods = np.array(packed.methods, np.int64) if packed.methods else np.ones(count, np.int64)
    if not set(packed.methods) <= _METHODS.keys():
        raise InvalidInput(f"unknown similarity method {min(set(packed.methods) - _METHODS.keys())}")
    return QueryColumns(
        words=packed.words,
        positive_counts=np.array(packed.positive_counts, np.int64),
        negative_counts=np.array(packed.negative_counts, np.int64),
        topn=np.array(packed.topn, np.int64),
        restrict_vocab=np.array(packed.restrict_vocab, np.int64)
        if packed.restrict_vocab
        else np.zeros(count, np.int64),
        cosmul=methods == word_vectors_pb2.SIMILARITY_METHOD_COS_MUL,
        weights=np.array(packed.weights, np.float64) if packed.weights else None,
        vector_terms=np.array(packed.vector_terms, np.int64),
        vectors=_raw_vectors(packed.vectors, "packed.vectors") if packed.HasField("vectors") else None,
        field_prefix="packed.",
    )


def _query(query: word_vectors_pb2.SimilarityQuery) -> SimilarityQuery:
    if query.method not in _METHODS:
        raise InvalidInput(f"unknown similarity method {query.method}")
    method = _METHODS[query.method]
    for term in (*query.positive, *query.negative) if method == "mul" else ():
        if term.HasField("weight"):
            raise InvalidInput("weights apply to 3CosAdd only")
    return SimilarityQuery(
        positive=tuple(_term(t) for t in query.positive),
        negative=tuple(_term(t) for t in query.negative),
        topn=query.topn if query.HasField("topn") else 10,
        restrict_vocab=query.restrict_vocab if query.HasField("restrict_vocab") else None,
        method=method,  # type: ignore[arg-type]
    )


class WordVectorsServicer(word_vectors_pb2_grpc.WordVectorsServiceServicer):
    def __init__(self, slot: WordVectorSlot, config: ServerConfig, budget: MemoryBudget) -> None:
        self._slot = slot
        self._limits = RequestLimits.of(config)
        self._budget = budget
        self._batcher: Batcher[PreparedBatch, RankedLists] | None = None

    async def _in_worker_if(self, large: bool, work: Callable[[], _T]) -> _T:
        if not large:
            return work()
        return await asyncio.get_running_loop().run_in_executor(self._slot.request_executor, work)

    def _check_count(self, count: int, what: str) -> None:
        if count == 0:
            raise InvalidInput(f"{what} is empty")
        self._limits.check_queries(count, what)

    @unary_errors
    async def GetVectors(
        self, request: word_vectors_pb2.GetVectorsRequest, context: Context
    ) -> word_vectors_pb2.GetVectorsResponse:
        self._check_count(len(request.words), "words")
        model = self._slot.model
        words = len(request.words)
        reply = request_memory.words_bytes(words) + request_memory.reply_bytes(words * model.dim * 4)
        await hold_for_call(
            self._budget, context, request_memory.request_bytes(request.ByteSize()) + reply, "GetVectors"
        )
        vectors, missing = await self._in_worker_if(
            len(request.words) > _INLINE_ITEMS, lambda: model.get_vectors(list(request.words))
        )
        return word_vectors_pb2.GetVectorsResponse(
            vectors=to_tensor_pb(vectors),
            missing_words=missing,
        )

    @unary_errors
    async def MostSimilar(
        self, request: word_vectors_pb2.MostSimilarRequest, context: Context
    ) -> word_vectors_pb2.MostSimilarResponse:
        if request.queries and request.HasField("packed"):
            raise InvalidInput("a request carries queries or packed, not both")
        packed = request.packed if request.HasField("packed") else None
        self._check_count(len(packed.topn) if packed else len(request.queries), "queries")
        terms = (
            len(packed.words) if packed else sum(len(q.positive) + len(q.negative) for q in request.queries)
        )
        self._limits.check_terms(terms)
        model = self._slot.model

        def prepared() -> PreparedBatch:
            if packed:
                columns = _packed_columns(packed)
            else:
                columns = model.query_columns([_query(q) for q in request.queries])
            self._limits.check_results(columns.topn, columns.restrict_vocab, model.vocab_size)
            return model.prepare(columns)

        batch = await self._in_worker_if(terms > _INLINE_ITEMS, prepared)
        results = int(np.minimum(batch.topn, batch.end).sum())
        await hold_for_call(
            self._budget,
            context,
            request_memory.request_bytes(request.ByteSize()) + request_memory.ranked_results_bytes(results),
            "MostSimilar",
        )
        if self._batcher is None:
            self._batcher = Batcher(
                model.search_many, executor=self._slot.device_thread, max_batch=1024, size=len, unit="queries"
            )
        timed = await self._batcher.submit([batch])
        add_timings(context, queue=timed.queue_seconds, compute=timed.compute_seconds)
        ranked = timed.outputs[0]
        return await self._in_worker_if(
            len(ranked.rows) > _INLINE_RESULTS,
            lambda: word_vectors_pb2.MostSimilarResponse(
                result_counts=ranked.counts.tolist(),
                words=ranked.words(model.words),
                scores=to_tensor_pb(ranked.scores),
            ),
        )

    def _pairs(self, pairs: list[word_vectors_pb2.WordPair]) -> list[tuple[str, str]]:
        self._check_count(len(pairs), "pairs")
        return [(p.first, p.second) for p in pairs]

    @unary_errors
    async def Similarity(
        self, request: word_vectors_pb2.SimilarityRequest, context: Context
    ) -> word_vectors_pb2.SimilarityResponse:
        pairs, model = self._pairs(list(request.pairs)), self._slot.model
        similarities = await self._in_worker_if(len(pairs) > _INLINE_ITEMS, lambda: model.similarity(pairs))
        return word_vectors_pb2.SimilarityResponse(similarities=_float32_pb(similarities))

    @unary_errors
    async def Distance(
        self, request: word_vectors_pb2.DistanceRequest, context: Context
    ) -> word_vectors_pb2.DistanceResponse:
        pairs, model = self._pairs(list(request.pairs)), self._slot.model
        cosine, euclidean = await self._in_worker_if(
            len(pairs) > _INLINE_ITEMS, lambda: model.distance(pairs)
        )
        return word_vectors_pb2.DistanceResponse(cosine=_float32_pb(cosine), euclidean=_float32_pb(euclidean))

    @unary_errors
    async def DoesntMatch(
        self, request: word_vectors_pb2.DoesntMatchRequest, context: Context
    ) -> word_vectors_pb2.DoesntMatchResponse:
        self._check_count(len(request.words), "words")
        words, model = list(request.words), self._slot.model
        odd_one = await self._in_worker_if(len(words) > _INLINE_ITEMS, lambda: model.doesnt_match(words))
        return word_vectors_pb2.DoesntMatchResponse(word=odd_one)

    @unary_errors
    async def EvaluateAnalogies(
        self, request: word_vectors_pb2.EvaluateAnalogiesRequest, context: Context
    ) -> word_vectors_pb2.EvaluateAnalogiesResponse:
        analogies = self._slot.analogies
        questions = request.questions or _bundled_questions()
        restrict = request.restrict_vocab if request.HasField("restrict_vocab") else 300000
        if restrict <= 0:
            raise InvalidInput(f"restrict_vocab must be positive, got {restrict}")
        case_insensitive = request.case_insensitive if request.HasField("case_insensitive") else True
        working = request_memory.evaluation_bytes(
            request_memory.utf8_bound(questions), min(restrict, self._slot.model.vocab_size)
        )
        await hold_for_call(self._budget, context, working, "EvaluateAnalogies")
        # A client gone (deadline, cancel) stops the work.
        report = await run_stoppable(
            lambda stop: analogies.evaluate(
                questions, restrict_vocab=restrict, case_insensitive=case_insensitive, cancel=stop
            ),
            self._slot.request_executor,
        )
        return word_vectors_pb2.EvaluateAnalogiesResponse(
            accuracy=report.accuracy,
            sections=[
                word_vectors_pb2.AnalogySection(name=s.name, correct=s.correct, incorrect=s.incorrect)
                for s in report.sections
            ],
            correct=report.correct,
            incorrect=report.incorrect,
            questions=report.questions,
            out_of_vocabulary=report.out_of_vocabulary,
        )

    @unary_errors
    async def Info(
        self, request: word_vectors_pb2.WordVectorsServiceInfoRequest, context: Context
    ) -> word_vectors_pb2.WordVectorsServiceInfoResponse:
        model = self._slot.model
        return word_vectors_pb2.WordVectorsServiceInfoResponse(
            model=model.name,
            vocab_size=model.vocab_size,
            dim=model.dim,
            source=model.source,
            device=str(model.device),
            max_topn=model.max_topn,
            max_queries_per_request=self._limits.max_queries_per_request,
            max_terms_per_request=self._limits.max_terms_per_request,
            max_results_per_request=self._limits.max_results_per_request,
        )


def _bundled_questions() -> str:
    try:
        return (resources.files("gensim") / "test" / "test_data" / "questions-words.txt").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        raise InvalidInput("no questions given, and gensim's questions-words.txt is not installed") from None


DISABLED_MESSAGE = "WordVectorsService is disabled on this server (it was started with --word-vectors none)"


def disabled_word_vectors_handler(service_name: str) -> grpc.GenericRpcHandler[bytes, None]:
    """What answers WordVectors calls with --word-vectors none: UNIMPLEMENTED, as for any service a
    server does not offer, but saying why rather than gRPC's bare "Method not found!"."""

    async def refuse(request: bytes, context: Context) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, DISABLED_MESSAGE)

    methods = word_vectors_pb2.DESCRIPTOR.services_by_name["WordVectorsService"].methods_by_name
    return grpc.method_handlers_generic_handler(
        service_name, {name: grpc.unary_unary_rpc_method_handler(refuse) for name in methods}
    )
