"""`client.word_vectors`: gensim KeyedVectors' query methods, answered by the server."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from embedserve.v1 import word_vectors_pb2, word_vectors_pb2_grpc

from ._errors import EmbedServeError, NotFoundError, call_idempotent
from .tensor import from_tensor_pb, to_tensor_pb

if TYPE_CHECKING:
    from collections.abc import Awaitable

_T = TypeVar("_T")
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


def _term(item: TermLike) -> word_vectors_pb2.QueryTerm | dict[str, str]:
    if type(item) is str:  # the common case, built as protobuf builds a dict fastest
        return {"word": item}
    weight: float | None = None
    value: Any = item
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], int | float):
        value, weight = item[0], float(item[1])
    term = word_vectors_pb2.QueryTerm()
    if isinstance(value, str):
        term.word = value
    else:
        term.vector.CopyFrom(to_tensor_pb(np.asarray(value, dtype=np.float32)))
    if weight is not None:
        term.weight = weight
    return term


def _terms(value: Terms) -> list[word_vectors_pb2.QueryTerm | dict[str, str]]:
    """gensim's _ensure_list: a single word or 1-D vector means [it]; a 2-D array means its rows."""
    if value is None:
        return []
    if isinstance(value, str):
        return [_term(value)]
    if isinstance(value, np.ndarray):
        return [_term(value)] if value.ndim == 1 else [_term(row) for row in value]
    return [_term(item) for item in value]  # type: ignore[union-attr]


def _query_pb(query: Query) -> word_vectors_pb2.SimilarityQuery:
    if query.topn is None:
        raise ValueError("topn=None (all scores) is not served; pass an int")
    # The stubs know only messages; protobuf initialises a message field from a dict as well.
    message = word_vectors_pb2.SimilarityQuery(
        positive=_terms(query.positive),  # type: ignore[arg-type]
        negative=_terms(query.negative),  # type: ignore[arg-type]
        topn=query.topn,
        method=word_vectors_pb2.SIMILARITY_METHOD_COS_MUL
        if query.cosmul
        else word_vectors_pb2.SIMILARITY_METHOD_COS_ADD,
    )
    if query.restrict_vocab is not None:
        message.restrict_vocab = query.restrict_vocab
    return message


class AsyncWordVectors:
    """Async gensim-style queries: `await client.word_vectors.most_similar(positive=[...])`."""

    def __init__(self, channel: grpc.aio.Channel, timeout: Callable[[], float]) -> None:
        self._stub = word_vectors_pb2_grpc.WordVectorsServiceStub(channel)
        self._timeout = timeout

    async def _call(self, method: Callable[..., Awaitable[_T]], request: Any) -> _T:
        try:
            return await call_idempotent(method, request, self._timeout())
        except NotFoundError as failure:
            raise WordNotFoundError(failure.code, failure.details) from None

    async def get_vectors(self, words: Sequence[str]) -> tuple[npt.NDArray[np.float32], list[str]]:
        """[len(words), D] raw vectors (zero rows for unknown words) and the unknown words."""
        reply = await self._call(self._stub.GetVectors, word_vectors_pb2.GetVectorsRequest(words=list(words)))
        return from_tensor_pb(reply.vectors), list(reply.missing_words)  # type: ignore[return-value]

    async def get_vector(self, word: str) -> npt.NDArray[np.float32]:
        """model[word]; WordNotFoundError (a KeyError) when it is not in the vocabulary."""
        vectors, missing = await self.get_vectors([word])
        if missing:
            raise WordNotFoundError(grpc.StatusCode.NOT_FOUND, f"not in the vocabulary: {word!r}")
        vector: npt.NDArray[np.float32] = vectors[0]
        return vector

    async def most_similar_batch(self, queries: Sequence[Query]) -> list[list[tuple[str, float]]]:
        """Many queries in one call (the server scans the vocabulary once for all of them)."""
        reply = await self._call(
            self._stub.MostSimilar,
            word_vectors_pb2.MostSimilarRequest(queries=[_query_pb(q) for q in queries]),
        )
        scores = from_tensor_pb(reply.scores).astype(float).tolist()
        words = list(reply.words)
        if len(scores) != len(words) or sum(reply.result_counts) != len(words):
            raise EmbedServeError(grpc.StatusCode.INTERNAL, "the server's ranked lists do not add up")
        ranked: list[list[tuple[str, float]]] = []
        start = 0
        for count in reply.result_counts:
            ranked.append(list(zip(words[start : start + count], scores[start : start + count], strict=True)))
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
        request = word_vectors_pb2.SimilarityRequest(
            pairs=[word_vectors_pb2.WordPair(first=a, second=b) for a, b in pairs]
        )
        reply = await self._call(self._stub.Similarity, request)
        return [float(x) for x in from_tensor_pb(reply.similarities)]

    async def similarity(self, w1: str, w2: str) -> float:
        return (await self.similarity_batch([(w1, w2)]))[0]

    async def distance_batch(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[float], list[float]]:
        """(cosine distances, euclidean distances of the raw vectors) for each pair."""
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
        )


class _Runner(Protocol):
    def __call__(self, coroutine: Coroutine[Any, Any, _T]) -> _T: ...


class SyncWordVectors:
    """The same methods without await (for `Client.word_vectors`)."""

    def __init__(self, inner: AsyncWordVectors, run: _Runner) -> None:
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
