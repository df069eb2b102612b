"""The server's core: tokenizer, sliding windows and stream plans, request limits, batching,
embedding model, corpora.

Nothing here imports grpc; the transport layer decodes requests into these
types and maps the errors in `errors` to status codes.
"""

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    Cancelled,
    CorruptData,
    EmbedServeCoreError,
    InvalidInput,
    LimitExceeded,
    NotFound,
    NotInVocabulary,
    NotPermitted,
    NotReady,
    Overloaded,
    PreconditionFailed,
    StartupError,
    Unavailable,
)
from .tokenizer import GPT2_BPE_SHA256, Tokenizer, load_gpt2_tokenizer
from .tokenizer_sources import DEFAULT_TOKENIZER, load_tokenizer

if TYPE_CHECKING:
    from .corpus import CorpusStore
    from .embedding import (
        OUTPUT_DTYPES,
        EmbeddingModel,
        EmbeddingTables,
        EmbedJob,
        load_embedding_tables,
        resolve_device,
        seeded_embedding_tables,
    )
    from .window_orders import InMemoryOrders, MappedOrders, OrderStore, WindowOrder, shuffled_window_order
    from .windows import (
        PlannedBatch,
        WindowPlan,
        count_windows,
        gather_windows,
        iterate_batches,
        plan_windows,
    )

# Names whose modules import torch load when first used, so that what only tokenizes (`embedserve
# prepare`, its Ray tasks, imports) starts without torch.
_WITH_TORCH = {
    "corpus": {"CorpusStore"},
    "embedding": {
        "OUTPUT_DTYPES",
        "EmbeddingModel",
        "EmbeddingTables",
        "EmbedJob",
        "load_embedding_tables",
        "resolve_device",
        "seeded_embedding_tables",
    },
    "window_orders": {"InMemoryOrders", "MappedOrders", "OrderStore", "WindowOrder", "shuffled_window_order"},
    "windows": {
        "PlannedBatch",
        "WindowPlan",
        "count_windows",
        "gather_windows",
        "iterate_batches",
        "plan_windows",
    },
}


def __getattr__(name: str) -> Any:
    for module, names in _WITH_TORCH.items():
        if name in names:
            return getattr(importlib.import_module(f".{module}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_TOKENIZER",
    "GPT2_BPE_SHA256",
    "OUTPUT_DTYPES",
    "Cancelled",
    "CorruptData",
    "CorpusStore",
    "EmbedServeCoreError",
    "EmbeddingModel",
    "EmbedJob",
    "EmbeddingTables",
    "InvalidInput",
    "LimitExceeded",
    "NotFound",
    "NotInVocabulary",
    "NotPermitted",
    "NotReady",
    "Overloaded",
    "PreconditionFailed",
    "StartupError",
    "Unavailable",
    "Tokenizer",
    "PlannedBatch",
    "WindowPlan",
    "iterate_batches",
    "count_windows",
    "gather_windows",
    "load_embedding_tables",
    "load_gpt2_tokenizer",
    "load_tokenizer",
    "plan_windows",
    "resolve_device",
    "seeded_embedding_tables",
    "shuffled_window_order",
    "InMemoryOrders",
    "MappedOrders",
    "OrderStore",
    "WindowOrder",
]
