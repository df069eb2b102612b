"""embedserve's Python client: `AsyncClient` for asyncio code, `Client` for scripts and notebooks.

    async with AsyncClient("127.0.0.1:50051") as client:
        ids = await client.tokenize("Hello, world")
        vectors = await client.embed([ids])          # numpy [1, T, D]
        spec = BatchSpec(batch_size=8, max_length=4, stride=4)
        async for batch in client.stream_batches(text="...", spec=spec): ...

`Client` has the same methods and attributes, without await.

Importing this package needs only grpcio, protobuf, googleapis-common-protos and numpy: no torch,
tiktoken or gensim. `to_torch(array)` and `Batch.to_torch()` give torch
tensors when torch is installed.
"""

from ._async import AsyncClient
from ._batch_spec import BatchSettings, BatchSpec
from ._errors import (
    CallCancelledError,
    DataLossError,
    DeadlineExceededError,
    EmbedServeError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc,
)
from ._shared_memory import SharedMemoryRegion, SyncSharedMemoryRegion
from ._sync import Client
from ._values import Batch, EmbeddingInfo, RequestLimits, to_torch
from ._word_vectors import (
    AnalogyResult,
    AsyncWordVectors,
    Query,
    SyncWordVectors,
    WordNotFoundError,
    WordVectorsInfo,
)

__all__ = [
    "AnalogyResult",
    "AsyncClient",
    "BatchSettings",
    "BatchSpec",
    "SharedMemoryRegion",
    "SyncSharedMemoryRegion",
    "AsyncWordVectors",
    "Query",
    "SyncWordVectors",
    "WordNotFoundError",
    "WordVectorsInfo",
    "Batch",
    "CallCancelledError",
    "DataLossError",
    "Client",
    "DeadlineExceededError",
    "EmbedServeError",
    "EmbeddingInfo",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "LimitExceededError",
    "NotFoundError",
    "PermissionDeniedError",
    "RequestLimits",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "error_from_rpc",
    "to_torch",
]
