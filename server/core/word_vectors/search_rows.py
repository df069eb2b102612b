"""The rows a scan reads: the vocabulary's unit vectors on the device, and which rows never rank."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from .query import BoolArray, FloatArray, PreparedBatch


def unit_rows(vectors: FloatArray, norms: FloatArray, out: FloatArray | None = None) -> FloatArray:
    """Each row over its norm in float32, as gensim's get_vector(norm=True); zero rows stay zero."""
    out = np.empty(vectors.shape, np.float32) if out is None else out
    step = 65536
    for start in range(0, vectors.shape[0], step):
        block_norms = np.asarray(norms[start : start + step], dtype=np.float32)
        safe = np.where(block_norms > 0, block_norms, np.float32(1))
        with np.errstate(invalid="ignore"):  # a damaged row (inf / inf) is never ranked anyway
            out[start : start + step] = (
                np.asarray(vectors[start : start + step], dtype=np.float32) / safe[:, None]
            )
    return out


class BlockMask(Protocol):
    """See SearchRows.mask."""

    def __call__(self, scores: torch.Tensor, start: int, stop: int, rows_first: bool = False) -> None: ...


@dataclass(frozen=True)
class SearchRows:
    """The unit rows [vocabulary, dim] on a device, and a mask of rows never returned (None: none).

    Scans score against unit rows: dot(unit(v), q) is gensim's dot(v, q) / |v| up to float32
    rounding (about 1e-7), and saves a pass over every block of scores.
    """

    unit: torch.Tensor
    never_ranked: torch.Tensor | None = None

    @classmethod
    def on_device(cls, unit: FloatArray, never_ranked: BoolArray, device: torch.device) -> SearchRows:
        mask = torch.from_numpy(never_ranked).to(device) if np.any(never_ranked) else None
        return cls(torch.from_numpy(unit).to(device), mask)

    @property
    def device(self) -> torch.device:
        return self.unit.device

    @property
    def count(self) -> int:
        return int(self.unit.shape[0])

    @property
    def dim(self) -> int:
        return int(self.unit.shape[1])

    def mask(self, group: PreparedBatch) -> BlockMask:
        """mask(scores, start, stop, rows_first=False): -inf where a block's scores must never rank
        (zero or damaged rows, rows past a query's restrict_vocab, the query's own inputs); scores
        are [queries, rows], or [rows, queries] where rows_first."""
        device = self.device
        never_ranked = self.never_ranked
        # Exclusions sorted by row: each block masks its slice in one indexed write.
        order = np.argsort(group.excluded_row, kind="stable")
        excluded_starts = group.excluded_row[order]
        excluded_rows = torch.from_numpy(excluded_starts).to(device)
        excluded_queries = torch.from_numpy(group.excluded_query[order]).to(device)
        query_ends = torch.from_numpy(group.end).to(device)[:, None]
        smallest_end = int(group.end.min())

        def mask(scores: torch.Tensor, start: int, stop: int, rows_first: bool = False) -> None:
            if never_ranked is not None:
                never = never_ranked[start:stop]
                scores.masked_fill_(never[:, None] if rows_first else never, -math.inf)
            if smallest_end < stop:  # some query's restrict_vocab ends inside this block
                rows = torch.arange(start, stop, device=device)
                past_end = rows[:, None] >= query_ends.T if rows_first else rows[None, :] >= query_ends
                scores.masked_fill_(past_end, -math.inf)
            first, last = np.searchsorted(excluded_starts, (start, stop)).tolist()
            if first < last:
                queries, rows = excluded_queries[first:last], excluded_rows[first:last] - start
                scores.index_put_(
                    (rows, queries) if rows_first else (queries, rows),
                    torch.tensor(-math.inf, dtype=scores.dtype, device=device),
                )

        return mask
