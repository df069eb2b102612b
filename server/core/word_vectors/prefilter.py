"""The CPU's bfloat16 prefilter: blocks scored in bfloat16 first, in float32 only where a score may rank.

Once every query has a k-th best so far (the running top-k's thresholds), a block is scored in
bfloat16 and only the columns whose bfloat16 score comes within prefilter_margin of that k-th
best are scored again in float32 (a max per group of 64 columns finds them). No float32 score
that could enter the top k is skipped, so the results are the float32 scan's. It pays where the
CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), faster than float32.
"""

from __future__ import annotations

import torch

from .bfloat16 import prefilter_margin
from .columns_first import ColumnsFirstScan, add_columns_first_block, add_scorer
from .query import PreparedBatch
from .rows_first import ROWS_FIRST_QUERIES, add_rows_first_block
from .scanner import BlockKind, ScanLog
from .search_rows import SearchRows
from .topk import TOPK_GROUP, RunningTopK, kept_per_query

# The prefilter pays only where few (query, column group) pairs need a second look: early in a
# scan, when the k-th best scores so far are still low, blocks are scored in float32 alone.
PREFILTER_MAX_HIT_SHARE = 0.2


class Bfloat16PrefilterScan:
    """3CosAdd in bfloat16 where few columns can rank; float32 (rows first for many queries) until then."""

    name = "prefilter"
    prefilter = True

    def __init__(
        self,
        float32: ColumnsFirstScan,
        unit_bfloat16: torch.Tensor,
        *,
        rows_first_queries: int = ROWS_FIRST_QUERIES,
        max_hit_share: float = PREFILTER_MAX_HIT_SHARE,
    ) -> None:
        """unit_bfloat16: the unit rows rounded to bfloat16 (bfloat16.bfloat16_rows); blocks
        before the prefilter pays are scored [rows, queries] for rows_first_queries or more."""
        self.float32 = float32
        self.unit_bfloat16 = unit_bfloat16
        self.rows_first_queries = rows_first_queries
        self.max_hit_share = max_hit_share

    @property
    def rows(self) -> SearchRows:
        return self.float32.rows

    def rows_per_block(self, queries: int, end: int) -> int:
        """The columns-first scan's blocks: whole column groups, which the prefilter needs."""
        return self.float32.rows_per_block(queries, end)

    def search(self, group: PreparedBatch, log: ScanLog | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        device, unit = self.rows.device, self.rows.unit
        queries = torch.from_numpy(group.add_vectors).to(device)
        end = int(group.end.max())
        block_rows = self.rows_per_block(len(group), end)
        mask = self.rows.mask(group)
        buffer_size = len(group) * min(block_rows, end)
        buffer = torch.empty(buffer_size, device=device)
        score = add_scorer(queries)
        queries_t = None
        if device.type == "cpu" and len(group) >= self.rows_first_queries:
            queries_t = queries.T.contiguous()
        prefilter = (queries, prefilter_margin(queries.norm(dim=1), self.rows.dim))
        approximate_queries = queries.to(torch.bfloat16)
        approximate_buffer = torch.empty(buffer_size, dtype=torch.bfloat16, device=device)
        best = RunningTopK(len(group), kept_per_query(group), device, prefilter)
        kind: BlockKind
        for start in range(0, end, block_rows):
            stop = min(start + block_rows, end)
            rows = stop - start
            if (
                best.prefilter_bits is not None  # set once every query has a k-th best above its margin
                and rows % TOPK_GROUP == 0
                and best.hit_share <= self.max_hit_share
            ):
                approximate = torch.mm(
                    approximate_queries,
                    self.unit_bfloat16[start:stop].T,
                    out=approximate_buffer[: len(group) * rows].view(len(group), rows),
                )
                mask(approximate, start, stop)
                best.add_prefiltered_block(approximate.view(torch.int16), start, unit[start:stop])
                kind = "prefiltered"
            elif queries_t is not None:
                add_rows_first_block(best, unit, queries_t, buffer, mask, start, stop)
                kind = "rows-first"
            else:
                add_columns_first_block(best, score, unit, buffer, mask, start, stop)
                kind = "columns-first"
            if log is not None:
                log.blocks.append((kind, rows))
        return best.result()

    def search_cosmul(
        self, group: PreparedBatch, log: ScanLog | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.float32.search_cosmul(group, log)
