"""The float32 scan, [queries, rows] per block: the default, the GPU's, and every model's 3CosMul scan.

Scores are formed in gensim's order, dot(vectors, query) / norms (here against unit rows), so
they agree with gensim's to float32 rounding. The other scanners build on this one: its block
sizes, and its scan for whatever they leave to float32.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .query import IntArray, PreparedBatch
from .scanner import ScanLog
from .search_rows import BlockMask, SearchRows
from .topk import TOPK_GROUP, RunningTopK, kept_per_query

# gensim's epsilon in most_similar_cosmul's denominator.
COSMUL_EPSILON = 0.000001
# On CPU: rows per block for many queries, and the score buffer a few queries may fill instead.
CPU_BLOCK_ROWS = 8192
CPU_SCORE_BUFFER_ELEMENTS = 1024 * 1024
# On a GPU: the score buffer a block fills (256 MiB of float32); also the budget of 3CosMul's
# intermediates per block.
GPU_SCORE_BUFFER_ELEMENTS = 64 * 1024 * 1024
# (vocabulary block, a [queries, rows] buffer it may fill) -> scores
Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def add_scorer(queries: torch.Tensor) -> Scorer:
    """3CosAdd: the query matrix times the block's unit rows."""

    def score(unit_block: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # Into a reused buffer: a fresh [queries, rows] tensor per block costs as much as the product.
        return torch.mm(queries, unit_block.T, out=out)

    return score


def mul_scorer(group: PreparedBatch, device: torch.device) -> Scorer:
    """3CosMul as gensim's most_similar_cosmul scores it: the product of (1 + cos) / 2 over the
    positive terms, over that of the negative ones plus COSMUL_EPSILON."""
    term_matrix = torch.from_numpy(group.term_vectors).to(device)
    ones_column = len(group.term_vectors)  # a column of ones pads the ragged products

    def padded(starts: IntArray, counts: IntArray) -> torch.Tensor:
        offsets = np.arange(max(1, int(counts.max())))
        columns = np.where(offsets < counts[:, None], starts[:, None] + offsets, ones_column)
        return torch.from_numpy(columns).to(device)

    positive_index = padded(group.term_start, group.positive_count)
    negative_index = padded(group.term_start + group.positive_count, group.negative_count)

    def score(unit_block: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        shifted = (1 + torch.mm(term_matrix, unit_block.T)) / 2  # [terms, rows]
        shifted = torch.cat([shifted, torch.ones_like(shifted[:1])])
        numerator = shifted[positive_index].prod(dim=1)  # [queries, rows]
        denominator = shifted[negative_index].prod(dim=1) + COSMUL_EPSILON
        return numerator / denominator

    return score


def add_columns_first_block(
    best: RunningTopK,
    score: Scorer,
    unit: torch.Tensor,
    buffer: torch.Tensor,
    mask: BlockMask,
    start: int,
    stop: int,
) -> None:
    """Rows [start, stop) scored [queries, rows] into `buffer`, masked, and merged into `best`."""
    queries, rows = best.scores.shape[0], stop - start
    scores = score(unit[start:stop], buffer[: queries * rows].view(queries, rows))
    mask(scores, start, stop)
    best.add_block(scores, start)


class ColumnsFirstScan:
    """Each block scored [queries, rows] in float32 and reduced into the running top k."""

    name = "columns-first"
    prefilter = False

    def __init__(
        self,
        rows: SearchRows,
        *,
        block_rows: int | None = None,
        cpu_score_buffer_elements: int = CPU_SCORE_BUFFER_ELEMENTS,
        gpu_score_buffer_elements: int = GPU_SCORE_BUFFER_ELEMENTS,
        cosmul_buffer_elements: int = GPU_SCORE_BUFFER_ELEMENTS,
    ) -> None:
        """block_rows: None sizes blocks by the score buffers (see rows_per_block); a number: that
        many rows per block on CPU, and at least that many on a GPU."""
        self.rows = rows
        self.block_rows = block_rows or CPU_BLOCK_ROWS
        self.scaled_blocks = block_rows is None
        self.cpu_score_buffer_elements = cpu_score_buffer_elements
        self.gpu_score_buffer_elements = gpu_score_buffer_elements
        self.cosmul_buffer_elements = cosmul_buffer_elements

    def cpu_buffer_rows(self, queries: int) -> int:
        """Rows whose scores for these queries fill the CPU score buffer, in whole column groups
        (the threshold collection and the prefilter take no others)."""
        return self.cpu_score_buffer_elements // max(1, queries) // TOPK_GROUP * TOPK_GROUP

    def rows_per_block(self, queries: int, end: int) -> int:
        """Vocabulary rows scored per step.

        On CPU a block sized for the caches, with more rows for fewer queries (a lone query's
        scan in 8192-row steps spends more on the steps than on the product); on a GPU as many
        rows as keep the score buffer near 256 MiB, since each step there costs kernel launches
        rather than cache misses.
        """
        if self.rows.device.type == "cpu":
            if not self.scaled_blocks:
                return self.block_rows
            return max(self.block_rows, min(end, self.cpu_buffer_rows(queries)))
        return max(self.block_rows, min(end, self.gpu_score_buffer_elements // max(1, queries)))

    def search(self, group: PreparedBatch, log: ScanLog | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        queries = torch.from_numpy(group.add_vectors).to(self.rows.device)
        return self.search_queries(group, queries, log)

    def search_queries(
        self, group: PreparedBatch, queries: torch.Tensor, log: ScanLog | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """search, given the group's 3CosAdd query matrix already on the device."""
        block_rows = self.rows_per_block(len(group), int(group.end.max()))
        return self.scan(group, add_scorer(queries), block_rows, log)

    def search_cosmul(
        self, group: PreparedBatch, log: ScanLog | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rows.device.type == "cpu":
            block_rows = self.block_rows  # its intermediates outweigh a few queries' scores
        else:
            block_rows = self.rows_per_block(len(group), int(group.end.max()))
        # 3CosMul holds every term's scores and each query's gathered products per block row.
        width = max(1, int(group.positive_count.max())) + max(1, int(group.negative_count.max()))
        per_row = len(group.term_vectors) + 1 + len(group) * (width + 2)
        fitting = self.cosmul_buffer_elements // per_row // TOPK_GROUP * TOPK_GROUP
        block_rows = max(TOPK_GROUP, min(block_rows, fitting))
        return self.scan(group, mul_scorer(group, self.rows.device), block_rows, log)

    def scan(
        self, group: PreparedBatch, score: Scorer, block_rows: int, log: ScanLog | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The blocked scan of one group of queries: each one's k best (scores, rows), best first."""
        device = self.rows.device
        end = int(group.end.max())
        mask = self.rows.mask(group)
        buffer = torch.empty(len(group) * min(block_rows, end), device=device)
        best = RunningTopK(len(group), kept_per_query(group), device)
        for start in range(0, end, block_rows):
            stop = min(start + block_rows, end)
            add_columns_first_block(best, score, self.rows.unit, buffer, mask, start, stop)
            if log is not None:
                log.blocks.append(("columns-first", stop - start))
        return best.result()
