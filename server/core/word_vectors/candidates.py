"""The GPU's bfloat16 scan: a few candidates per block rescored in float32, checked once at the end.

Off the CPU the prefilter cannot collect the columns above a threshold without reading back to
the host every block (which stalls the stream). Instead each block is scored in bfloat16; its
`candidates` best columns by that score are scored again in float32 and merged into the running
top k, and the best bfloat16 score left out is kept. A column left out scores at most that plus
prefilter_margin in float32, so once the scan is over, a query whose every block left out less
than its k-th best minus the margin has the float32 scan's answer (to float32 rounding: the
rescoring sums in another order than the scan's product, so words tied within about 1e-7 may
swap); the few others are scanned again in float32. No read-back until the scan is over.
"""

from __future__ import annotations

import math

import torch

from .bfloat16 import prefilter_margin
from .columns_first import GPU_SCORE_BUFFER_ELEMENTS, ColumnsFirstScan
from .query import PreparedBatch
from .scanner import ScanLog
from .search_rows import SearchRows
from .topk import TOPK_GROUP, RunningTopK, kept_per_query

# Columns per query and block scored again in float32, at least: enough that the best column
# left out rarely comes within the margin.
MIN_CANDIDATES = 32


def approximate_candidates(approximate: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of each row's `count` best bfloat16 scores, and per row a bound on the scores
    of the columns left out (-inf when none is)."""
    queries, columns = approximate.shape
    if count >= columns:
        index = torch.arange(columns, device=approximate.device).expand(queries, columns)
        return index, torch.full((queries,), -math.inf, device=approximate.device)
    if columns % TOPK_GROUP or columns < 4 * TOPK_GROUP * count:
        values, index = torch.topk(approximate, count + 1, dim=1)
        return index[:, :count], values[:, count].float()
    # The best columns lie in the column groups (of 64) with the best maxima: the groups not
    # taken hold nothing above the last maximum taken.
    maxima = approximate.view(queries, columns // TOPK_GROUP, TOPK_GROUP).amax(dim=2)
    group_maxima, groups = torch.topk(maxima, count, dim=1)
    offsets = torch.arange(TOPK_GROUP, device=approximate.device)
    in_groups = (groups[:, :, None] * TOPK_GROUP + offsets).view(queries, count * TOPK_GROUP)
    values, index = torch.topk(approximate.gather(1, in_groups), count + 1, dim=1)
    bound = torch.maximum(group_maxima[:, -1], values[:, count]).float()
    return in_groups.gather(1, index[:, :count]), bound


class CandidateScan:
    """3CosAdd by bfloat16 candidates per block; what it cannot settle goes to `float32`."""

    name = "candidates"
    prefilter = True

    def __init__(
        self,
        float32: ColumnsFirstScan,
        unit_bfloat16: torch.Tensor,
        *,
        min_candidates: int = MIN_CANDIDATES,
        rescoring_buffer_elements: int = GPU_SCORE_BUFFER_ELEMENTS,
    ) -> None:
        """unit_bfloat16: the unit rows rounded to bfloat16 (bfloat16.bfloat16_rows);
        rescoring_buffer_elements: the budget of a block's float32 rescoring (queries x candidates
        x dim), over which a group is scanned in float32 instead."""
        self.float32 = float32
        self.unit_bfloat16 = unit_bfloat16
        self.min_candidates = min_candidates
        self.rescoring_buffer_elements = rescoring_buffer_elements

    @property
    def rows(self) -> SearchRows:
        return self.float32.rows

    def candidate_count(self, k: int) -> int:
        return max(2 * k, self.min_candidates)

    def fits(self, group: PreparedBatch) -> bool:
        """Whether the float32 rescoring of a block fits its budget; a large topn does not."""
        k = kept_per_query(group)
        return (
            k > 0 and len(group) * self.candidate_count(k) * self.rows.dim <= self.rescoring_buffer_elements
        )

    def search(self, group: PreparedBatch, log: ScanLog | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows
        device, unit = rows.device, rows.unit
        queries = torch.from_numpy(group.add_vectors).to(device)
        if not self.fits(group):
            if log is not None:
                log.fallback_queries += len(group)
            return self.float32.search_queries(group, queries, log)
        end = int(group.end.max())
        k = kept_per_query(group)
        candidates = self.candidate_count(k)
        block_rows = self.float32.rows_per_block(len(group), end)
        mask = rows.mask(group)
        approximate_queries = queries.to(torch.bfloat16)
        buffer = torch.empty(len(group) * min(block_rows, end), dtype=torch.bfloat16, device=device)
        best = RunningTopK(len(group), k, device)
        left_out = torch.full((len(group),), -math.inf, device=device)
        for start in range(0, end, block_rows):
            stop = min(start + block_rows, end)
            block = stop - start
            approximate = torch.mm(
                approximate_queries,
                self.unit_bfloat16[start:stop].T,
                out=buffer[: len(group) * block].view(len(group), block),
            )
            mask(approximate, start, stop)
            columns, block_left_out = approximate_candidates(approximate, candidates)
            left_out = torch.maximum(left_out, block_left_out)
            # float32 scores of the candidates; a masked column stays -inf.
            exact = torch.bmm(unit[start:stop][columns], queries[:, :, None])[:, :, 0]
            exact.masked_fill_(approximate.gather(1, columns) == -math.inf, -math.inf)
            best.merge(exact, columns + start)
            if log is not None:
                log.blocks.append(("candidates", block))
        best_scores, best_rows = best.result()
        kth = best_scores[:, -1]
        margin = prefilter_margin(queries.norm(dim=1), rows.dim)
        settled = (left_out == -math.inf) | (left_out + margin < kth)
        unsettled = (~settled).nonzero().flatten()
        if unsettled.numel():
            again = unsettled.cpu().numpy()
            if log is not None:
                log.rescanned_queries += len(again)
            rescanned_scores, rescanned_rows = self.float32.search_queries(
                group.take(again), queries[unsettled], log
            )
            best_scores[unsettled] = -math.inf
            best_scores[unsettled, : rescanned_scores.shape[1]] = rescanned_scores
            best_rows[unsettled, : rescanned_rows.shape[1]] = rescanned_rows
        return best_scores, best_rows

    def search_cosmul(
        self, group: PreparedBatch, log: ScanLog | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.float32.search_cosmul(group, log)
