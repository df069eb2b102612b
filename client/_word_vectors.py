"""`client.word_vectors`: gensim KeyedVectors' query methods, answered by the server."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from embedserve.v1 import word_vectors_pb2, word_vectors_pb2_grpc

from ._errors import EmbedServeError, LimitExceededError, NotFoundError, call_idempotent
from ._runner import Runner
from .tensor import from_tensor_pb, to_tensor_pb

_T = TypeVar("_T")
_Item = TypeVar("_Item")
_Answer = TypeVar("_Answer")
# A batch larger than a server's request limits goes out as several requests, this many at a time,
# all within one call's timeout (the time.monotonic() by which the batch must be answered).
_CHUNKS_IN_FLIGHT = 4
_BATCH_DEADLINE: ContextVar[float | None] = ContextVar("embedserve_batch_deadline", default=None)
# A term as gensim takes it: a word, a raw vector, or (word or vector, weight).
TermLike = str | npt.ArrayLike | tuple[str | npt.ArrayLike, float]
Terms = TermLike | Sequence[TermLike] | None


class WordNotFoundError(NotFoundError, KeyError):
    """A word is not in the server's vocabulary (also a KeyError, as gensim raises)."""

    def __str__(self) -> str:
        return f"{self.code.name}: {self.details}"


@dataclass(frozen=True)
class WordVectorsInfo:
    model: str
    vocab_size: int
    dim: int
    source: str
    device: str
    max_topn: int
    max_queries_per_request: int
    max_terms_per_request: int
    max_results_per_request: int


@dataclass(frozen=True)
class AnalogyResult:
    accuracy: float
    sections: list[tuple[str, int, int]]  # (name, correct, incorrect)
    correct: int
    incorrect: int
    questions: int
    out_of_vocabulary: int


@dataclass(frozen=True)
class Query:
    """One most_similar query for the batch forms."""

    positive: Terms = None
    negative: Terms = None
    topn: int = 10
    restrict_vocab: int | None = None
    cosmul: bool = False


def _items(value: Terms) -> Sequence[TermLike]:
    """gensim's _ensure_list: a single word or 1-D vector means [it]; a 2-D array means its rows."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, np.ndarray):
        return (value,) if value.ndim == 1 else list(value)
    return value  # type: ignore[return-value]


class _Packer:
    """Queries into a PackedQueries' columns (one Python pass; no message per query or term)."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.weights: list[tuple[int, float]] = []  # (term, weight) where one was given
        self.vector_terms: list[int] = []
        self.vectors: list[npt.NDArray[np.float32]] = []

    def add(self, terms: Terms) -> int:
        """Appends these terms; how many there were."""
        words = self.words
        first = len(words)
        for item in _items(terms):
            if type(item) is str:  # the common case
                words.append(item)
                continue
            value: Any = item
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int | float):
                value = item[0]
                self.weights.append((len(words), float(item[1])))
            if isinstance(value, str):
                words.append(value)
            else:
                self.vector_terms.append(len(words))
                self.vectors.append(np.asarray(value, dtype=np.float32))
                words.append("")
        return len(words) - first


def _packed(queries: Sequence[Query]) -> word_vectors_pb2.PackedQueries:
    packer = _Packer()
    positive_counts: list[int] = []
    negative_counts: list[int] = []
    for query in queries:
        positive_counts.append(packer.add(query.positive))
        negative_counts.append(packer.add(query.negative))
    topn = [q.topn for q in queries]
    if None in topn:
        raise ValueError("topn=None (all scores) is not served; pass an int")
    packed = word_vectors_pb2.PackedQueries(
        words=packer.words, positive_counts=positive_counts, negative_counts=negative_counts, topn=topn
    )
    if any(q.restrict_vocab is not None for q in queries):
        packed.restrict_vocab.extend([q.restrict_vocab or 0 for q in queries])
    if any(q.cosmul for q in queries):
        packed.methods.extend(
            [
                word_vectors_pb2.SIMILARITY_METHOD_COS_MUL
                if q.cosmul
                else word_vectors_pb2.SIMILARITY_METHOD_COS_ADD
                for q in queries
            ]
        )
    if packer.weights:
        weights = [math.nan] * len(packer.words)
        for term, weight in packer.weights:
            weights[term] = weight
        packed.weights.extend(weights)
    if packer.vector_terms:
        shapes = {vector.shape for vector in packer.vectors}
        if len(shapes) > 1:
            raise ValueError(f"raw vectors of different shapes in one call: {sorted(shapes)}")
        packed.vector_terms.extend(packer.vector_terms)
        packed.vectors.CopyFrom(to_tensor_pb(np.stack(packer.vectors)))
    return packed


def _by_count(items: Sequence[_Item], limits: WordVectorsInfo) -> list[Sequence[_Item]]:
    """Items in chunks of the server's --max-queries-per-request."""
    size = limits.max_queries_per_request or len(items)
    return [items[start : start + size] for start in range(0, len(items), size)]


async def _in_order(
    send: Callable[[Sequence[_Item]], Awaitable[_Answer]], chunks: Sequence[Sequence[_Item]]
) -> list[_Answer]:
    """send(chunk) for each chunk, _CHUNKS_IN_FLIGHT at a time (the server scans concurrent
    MostSimilar requests together); the answers in order, or the first failure, the rest cancelled."""
    gate = asyncio.Semaphore(_CHUNKS_IN_FLIGHT)

    async def gated(chunk: Sequence[_Item]) -> _Answer:
        async with gate:
            return await send(chunk)

    tasks = [asyncio.ensure_future(gated(chunk)) for chunk in chunks]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            failure = task.exception() if task.done() and not task.cancelled() else None
            if failure is not None:
                raise failure
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _query_chunks(
    queries: Sequence[Query], limits: WordVectorsInfo, packed: word_vectors_pb2.PackedQueries | None = None
) -> list[Sequence[Query]]:
    """Consecutive runs of queries that each fit the server's per-request limits (a limit of 0,
    from a server that does not report it, is no limit). A query over a limit by itself goes
    alone, for the server to refuse. `packed`: these queries' columns, where already made."""
    if packed is None:
        packed = _packed(queries)
    terms = np.add(packed.positive_counts, packed.negative_counts, dtype=np.int64)
    vocab_size = limits.vocab_size
    rows = np.full(len(queries), vocab_size, np.int64)
    if packed.restrict_vocab:
        restrict_vocab = np.array(packed.restrict_vocab, np.int64)
        rows = np.where(restrict_vocab > 0, np.minimum(restrict_vocab, vocab_size), vocab_size)
    results = np.clip(np.minimum(np.array(packed.topn, np.int64), rows), 0, None)
    most_queries = limits.max_queries_per_request or math.inf
    most_terms = limits.max_terms_per_request or math.inf
    most_results = limits.max_results_per_request or math.inf
    if len(queries) <= most_queries and terms.sum() <= most_terms and results.sum() <= most_results:
        return [queries]
    chunks: list[Sequence[Query]] = []
    first = chunk_terms = chunk_results = 0
    for index, (query_terms, query_results) in enumerate(zip(terms.tolist(), results.tolist(), strict=True)):
        over = (
            index - first >= most_queries
            or chunk_terms + query_terms > most_terms
            or chunk_results + query_results > most_results
        )
        if over and index > first:
            chunks.append(queries[first:index])
            first, chunk_terms, chunk_results = index, 0, 0
        chunk_terms += query_terms
        chunk_results += query_results
    chunks.append(queries[first:])
    return chunks


class AsyncWordVectors:
    """Async gensim-style queries: `await client.word_vectors.most_similar(positive=[...])`."""

    def __init__(self, channel: grpc.aio.Channel, timeout: Callable[[], float]) -> None:
        self._stub = word_vectors_pb2_grpc.WordVectorsServiceStub(channel)
        self._timeout = timeout
        self._info: WordVectorsInfo | None = None

    async def _limits(self) -> WordVectorsInfo:
        """The server's Info, asked once: batches are split to fit its request limits."""
        if self._info is None:
            self._info = await self.info()
        return self._info

    async def _batched(
        self,
        items: Sequence[_Item],
        split: Callable[[Sequence[_Item], WordVectorsInfo], list[Sequence[_Item]]],
        send: Callable[[Sequence[_Item]], Awaitable[_Answer]],
    ) -> list[_Answer]:
        """Each chunk's answer, in order: one request for one item, else chunks that fit the
        server's limits, a few in flight, within one call's timeout. The first failure cancels the
        rest and is raised. A chunk refused as over a limit makes the batch ask the limits again:
        where they changed (asked of another replica, or before a restart with other flags), it
        is split anew and sent once more."""
        if len(items) <= 1:
            return [await send(items)]
        deadline = _BATCH_DEADLINE.set(time.monotonic() + self._timeout())
        try:
            for attempt in range(2):
                limits = await self._limits()
                try:
                    return await _in_order(send, split(items, limits))
                except LimitExceededError:
                    if attempt:
                        raise
                    self._info = None
                    if await self._limits() == limits:  # the request itself is over a limit
                        raise
            raise AssertionError("unreachable")
        finally:
            _BATCH_DEADLINE.reset(deadline)

    async def _call(self, method: Callable[..., Awaitable[_T]], request: Any) -> _T:
        seconds = self._timeout()
        batch_deadline = _BATCH_DEADLINE.get()
        if batch_deadline is not None:
            seconds = min(seconds, max(0.0, batch_deadline - time.monotonic()))
        try:
            return await call_idempotent(method, request, seconds)
        except NotFoundError as failure:
            raise WordNotFoundError(failure.code, failure.details, failure.missing_words) from None

    async def get_vectors(self, words: Sequence[str]) -> tuple[npt.NDArray[np.float32], list[str]]:
        """[len(words), D] raw vectors (zero rows for unknown words) and the unknown words."""
        parts = await self._batched(words, _by_count, self._get_vectors)
        if len(parts) == 1:
            return parts[0]
        missing = dict.fromkeys(word for _, part_missing in parts for word in part_missing)
        return np.concatenate([vectors for vectors, _ in parts]), list(missing)

    async def _get_vectors(self, words: Sequence[str]) -> tuple[npt.NDArray[np.float32], list[str]]:
        reply = await self._call(self._stub.GetVectors, word_vectors_pb2.GetVectorsRequest(words=list(words)))
        return from_tensor_pb(reply.vectors), list(reply.missing_words)  # type: ignore[return-value]

    async def get_vector(self, word: str) -> npt.NDArray[np.float32]:
        """model[word]; WordNotFoundError (a KeyError) when it is not in the vocabulary."""
        vectors, missing = await self.get_vectors([word])
        if missing:
            message = f"not in the vocabulary: {json.dumps(word, ensure_ascii=False)}"
            raise WordNotFoundError(grpc.StatusCode.NOT_FOUND, message, [word])
        vector: npt.NDArray[np.float32] = vectors[0]
        return vector

    async def most_similar_batch(self, queries: Sequence[Query]) -> list[list[tuple[str, float]]]:
        """Many queries, scanned together: one request, or several where the batch is over the
        server's limits on queries, terms or results per request."""
        # Packed once: the columns size the chunks, and a batch that fits goes out as it is.
        packed = _packed(queries)
        parts = await self._batched(
            queries,
            lambda items, limits: _query_chunks(items, limits, packed),
            lambda chunk: self._most_similar(chunk, packed if len(chunk) == len(queries) else None),
        )
        return [ranked for part in parts for ranked in part]

    async def _most_similar(
        self, queries: Sequence[Query], packed: word_vectors_pb2.PackedQueries | None = None
    ) -> list[list[tuple[str, float]]]:
        request = word_vectors_pb2.MostSimilarRequest(packed=_packed(queries) if packed is None else packed)
        reply = await self._call(self._stub.MostSimilar, request)
        counts = list(reply.result_counts)
        words = list(reply.words)
        scores = from_tensor_pb(reply.scores).tolist()
        if len(scores) != len(words) or sum(counts) != len(words) or len(counts) != len(queries):
            raise EmbedServeError(grpc.StatusCode.INTERNAL, "the server's ranked lists do not add up")
        pairs = list(zip(words, scores, strict=True))
        ranked: list[list[tuple[str, float]]] = []
        start = 0
        for count in counts:
            ranked.append(pairs[start : start + count])
            start += count
        return ranked

    async def most_similar(
        self,
        positive: Terms = None,
        negative: Terms = None,
        topn: int = 10,
        restrict_vocab: int | None = None,
    ) -> list[tuple[str, float]]:
        return (await self.most_similar_batch([Query(positive, negative, topn, restrict_vocab)]))[0]

    async def most_similar_cosmul(
        self,
        positive: Terms = None,
        negative: Terms = None,
        topn: int = 10,
        restrict_vocab: int | None = None,
    ) -> list[tuple[str, float]]:
        return (
            await self.most_similar_batch([Query(positive, negative, topn, restrict_vocab, cosmul=True)])
        )[0]

    async def similar_by_word(
        self, word: str, topn: int = 10, restrict_vocab: int | None = None
    ) -> list[tuple[str, float]]:
        return await self.most_similar(positive=[word], topn=topn, restrict_vocab=restrict_vocab)

    async def similar_by_vector(
        self, vector: npt.ArrayLike, topn: int = 10, restrict_vocab: int | None = None
    ) -> list[tuple[str, float]]:
        return await self.most_similar(positive=[vector], topn=topn, restrict_vocab=restrict_vocab)

    async def similarity_batch(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        parts = await self._batched(pairs, _by_count, self._similarity)
        return [similarity for part in parts for similarity in part]

    async def _similarity(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        request = word_vectors_pb2.SimilarityRequest(
            pairs=[word_vectors_pb2.WordPair(first=a, second=b) for a, b in pairs]
        )
        reply = await self._call(self._stub.Similarity, request)
        return [float(x) for x in from_tensor_pb(reply.similarities)]

    async def similarity(self, w1: str, w2: str) -> float:
        return (await self.similarity_batch([(w1, w2)]))[0]

    async def distance_batch(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[float], list[float]]:
        """(cosine distances, euclidean distances of the raw vectors) for each pair."""
        parts = await self._batched(pairs, _by_count, self._distance)
        return [x for cosine, _ in parts for x in cosine], [x for _, euclidean in parts for x in euclidean]

    async def _distance(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[float], list[float]]:
        request = word_vectors_pb2.DistanceRequest(
            pairs=[word_vectors_pb2.WordPair(first=a, second=b) for a, b in pairs]
        )
        reply = await self._call(self._stub.Distance, request)
        return [float(x) for x in from_tensor_pb(reply.cosine)], [
            float(x) for x in from_tensor_pb(reply.euclidean)
        ]

    async def distance(self, w1: str, w2: str) -> float:
        """Cosine distance, 1 - similarity, as gensim's distance()."""
        return (await self.distance_batch([(w1, w2)]))[0][0]

    async def euclidean_distance(self, w1: str, w2: str) -> float:
        """np.linalg.norm(model[w1] - model[w2])."""
        return (await self.distance_batch([(w1, w2)]))[1][0]

    async def doesnt_match(self, words: Sequence[str]) -> str:
        reply = await self._call(
            self._stub.DoesntMatch, word_vectors_pb2.DoesntMatchRequest(words=list(words))
        )
        return str(reply.word)

    async def evaluate_word_analogies(
        self, questions: str | None = None, restrict_vocab: int = 300000, case_insensitive: bool = True
    ) -> AnalogyResult:
        """gensim's evaluate_word_analogies on the text of an analogy file (default: questions-words.txt)."""
        request = word_vectors_pb2.EvaluateAnalogiesRequest(
            questions=questions or "", restrict_vocab=restrict_vocab, case_insensitive=case_insensitive
        )
        reply = await self._call(self._stub.EvaluateAnalogies, request)
        return AnalogyResult(
            accuracy=reply.accuracy,
            sections=[(s.name, s.correct, s.incorrect) for s in reply.sections],
            correct=reply.correct,
            incorrect=reply.incorrect,
            questions=reply.questions,
            out_of_vocabulary=reply.out_of_vocabulary,
        )

    async def info(self) -> WordVectorsInfo:
        reply = await self._call(self._stub.Info, word_vectors_pb2.WordVectorsServiceInfoRequest())
        return WordVectorsInfo(
            model=reply.model,
            vocab_size=reply.vocab_size,
            dim=reply.dim,
            source=reply.source,
            device=reply.device,
            max_topn=reply.max_topn,
            max_queries_per_request=reply.max_queries_per_request,
            max_terms_per_request=reply.max_terms_per_request,
            max_results_per_request=reply.max_results_per_request,
        )


class SyncWordVectors:
    """The same methods without await (for `Client.word_vectors`)."""

    def __init__(self, inner: AsyncWordVectors, run: Runner) -> None:
        self._inner = inner
        self._run = run

    def get_vectors(self, words: Sequence[str]) -> tuple[npt.NDArray[np.float32], list[str]]:
        return self._run(self._inner.get_vectors(words))

    def get_vector(self, word: str) -> npt.NDArray[np.float32]:
        return self._run(self._inner.get_vector(word))

    def most_similar_batch(self, queries: Sequence[Query]) -> list[list[tuple[str, float]]]:
        return self._run(self._inner.most_similar_batch(queries))

    def most_similar(
        self,
        positive: Terms = None,
        negative: Terms = None,
        topn: int = 10,
        restrict_vocab: int | None = None,
    ) -> list[tuple[str, float]]:
        return self._run(self._inner.most_similar(positive, negative, topn, restrict_vocab))

    def most_similar_cosmul(
        self,
        positive: Terms = None,
        negative: Terms = None,
        topn: int = 10,
        restrict_vocab: int | None = None,
    ) -> list[tuple[str, float]]:
        coroutine = self._inner.most_similar_cosmul(positive, negative, topn, restrict_vocab)
        return self._run(coroutine)

    def similar_by_word(
        self, word: str, topn: int = 10, restrict_vocab: int | None = None
    ) -> list[tuple[str, float]]:
        return self._run(self._inner.similar_by_word(word, topn, restrict_vocab))

    def similar_by_vector(
        self, vector: npt.ArrayLike, topn: int = 10, restrict_vocab: int | None = None
    ) -> list[tuple[str, float]]:
        return self._run(self._inner.similar_by_vector(vector, topn, restrict_vocab))

    def similarity_batch(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return self._run(self._inner.similarity_batch(pairs))

    def similarity(self, w1: str, w2: str) -> float:
        return self._run(self._inner.similarity(w1, w2))

    def distance_batch(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[float], list[float]]:
        return self._run(self._inner.distance_batch(pairs))

    def distance(self, w1: str, w2: str) -> float:
        return self._run(self._inner.distance(w1, w2))

    def euclidean_distance(self, w1: str, w2: str) -> float:
        return self._run(self._inner.euclidean_distance(w1, w2))

    def doesnt_match(self, words: Sequence[str]) -> str:
        return self._run(self._inner.doesnt_match(words))

    def evaluate_word_analogies(
        self, questions: str | None = None, restrict_vocab: int = 300000, case_insensitive: bool = True
    ) -> AnalogyResult:
        coroutine = self._inner.evaluate_word_analogies(questions, restrict_vocab, case_insensitive)
        return self._run(coroutine)

    def info(self) -> WordVectorsInfo:
        return self._run(self._inner.info())
