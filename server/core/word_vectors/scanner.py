"""The seam between a model and how it scans: the Scanner protocol, and the log a scan can keep.

A scanner answers a group of prepared queries with each query's k best (scores, rows), best
first, k = kept_per_query(group), -inf where fewer rows qualify. Every scanner returns what a
float32 scan of the unit rows returns; they differ in how they get there (see
docs/word-vectors.md). One is picked per model at load time (factory.choose_scanner).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from .query import PreparedBatch
from .search_rows import SearchRows

# How a block of the vocabulary was scored: [queries, rows] in float32, [rows, queries] in
# float32, in bfloat16 then the columns that may rank in float32, or its best bfloat16 columns.
BlockKind = Literal["columns-first", "rows-first", "prefiltered", "candidates"]


@dataclass
class ScanLog:
    """What scans given this log did, for tests and benchmarks (a scan given none records nothing)."""

    blocks: list[tuple[BlockKind, int]] = field(default_factory=list)  # (how it was scored, rows)
    # The candidate scan: queries it could not settle and scanned again in float32, and queries
    # it left to the float32 scan whole (their topn is over its rescoring budget).
    rescanned_queries: int = 0
    fallback_queries: int = 0

    def count(self, kind: BlockKind) -> int:
        return sum(1 for scored, _ in self.blocks if scored == kind)

    def rows(self, kind: BlockKind) -> list[int]:
        """The rows of each block scored this way, in order."""
        return [rows for scored, rows in self.blocks if scored == kind]


class Scanner(Protocol):
    """One scan strategy over one model's rows."""

    @property
    def name(self) -> str:
        """What bench/word_vectors.py --scanners and factory.build_scanner call it."""
        ...

    @property
    def rows(self) -> SearchRows: ...

    @property
    def prefilter(self) -> bool:
        """Whether it scores 3CosAdd queries in bfloat16 first."""
        ...

    def search(self, group: PreparedBatch, log: ScanLog | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """3CosAdd queries (each with topn > 0): their k best, on the device."""
        ...

    def search_cosmul(
        self, group: PreparedBatch, log: ScanLog | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """3CosMul queries (each with topn > 0): their k best, on the device."""
        ...
