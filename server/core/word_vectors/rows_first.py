"""The float32 scan, [rows, queries] per block: the CPU's default for many queries.

unit rows @ queries^T gives a tall, narrow product, which a CPU BLAS (MKL) computes faster than
its transpose for many queries and slower for a few: a group of fewer than min_queries goes to
the columns-first scan. Blocks are smaller than the columns-first ones (at least min_block_rows),
so that a block's scores are still in cache when its maxima are taken. Measurements:
bench/RESULTS.md, docs/performance.md.
"""

from __future__ import annotations

import torch

from .columns_first import ColumnsFirstScan
from .query import PreparedBatch
from .scanner import ScanLog
from .search_rows import BlockMask, SearchRows
from .topk import RunningTopK, kept_per_query

ROWS_FIRST_QUERIES = 16
ROWS_FIRST_BLOCK_ROWS = 2048


def add_rows_first_block(
    best: RunningTopK,
    unit: torch.Tensor,
    queries_t: torch.Tensor,
    buffer: torch.Tensor,
    mask: BlockMask,
    start: int,
    stop: int,
) -> None:
    """Rows [start, stop) scored [rows, queries] into `buffer`, masked, and merged into `best`."""
    queries, rows = queries_t.shape[1], stop - start
    scores_t = torch.mm(unit[start:stop], queries_t, out=buffer[: queries * rows].view(rows, queries))
    mask(scores_t, start, stop, rows_first=True)
    best.add_block(scores_t, start, rows_first=True)


class RowsFirstScan:
    """3CosAdd groups of min_queries or more scored [rows, queries]; the rest by `float32`."""

    name = "rows-first"
    prefilter = False

    def __init__(
        self,
        float32: ColumnsFirstScan,
        *,
        min_queries: int = ROWS_FIRST_QUERIES,
        min_block_rows: int = ROWS_FIRST_BLOCK_ROWS,
    ) -> None:
        self.float32 = float32
        self.min_queries = min_queries
        self.min_block_rows = min_block_rows

    @property
    def rows(self) -> SearchRows:
        return self.float32.rows

    def rows_per_block(self, queries: int, end: int) -> int:
        """As the columns-first scan's, but at least min_block_rows (not its 8192) on CPU."""
        float32 = self.float32
        if self.rows.device.type != "cpu" or not float32.scaled_blocks:
            return float32.rows_per_block(queries, end)
        return max(self.min_block_rows, min(end, float32.cpu_buffer_rows(queries)))

    def search(self, group: PreparedBatch, log: ScanLog | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if len(group) < self.min_queries:
            return self.float32.search(group, log)
        device = self.rows.device
        end = int(group.end.max())
        block_rows = self.rows_per_block(len(group), end)
        queries_t = torch.from_numpy(group.add_vectors).to(device).T.contiguous()
        mask = self.rows.mask(group)
        buffer = torch.empty(len(group) * min(block_rows, end), device=device)
        best = RunningTopK(len(group), kept_per_query(group), device)
        for start in range(0, end, block_rows):
            stop = min(start + block_rows, end)
            add_rows_first_block(best, self.rows.unit, queries_t, buffer, mask, start, stop)
            if log is not None:
                log.blocks.append(("rows-first", stop - start))
        return best.result()

    def search_cosmul(
        self, group: PreparedBatch, log: ScanLog | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.float32.search_cosmul(group, log)
