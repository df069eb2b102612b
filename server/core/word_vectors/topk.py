"""The running top-k every scanner keeps: each query's k best (score, row) over a blocked scan.

No [queries x vocabulary] score matrix is ever held: each block's scores are reduced to a few
candidates per query (a max per group of 64 columns picks them) and merged into the k best so
far; on CPU, once every query has a k-th best, only the scores above it are collected at all.
"""

from __future__ import annotations

import math

import torch

from .query import PreparedBatch

# Columns per group in the two-stage top-k.
TOPK_GROUP = 64


def kept_per_query(group: PreparedBatch) -> int:
    """How many best rows a scan of these queries together keeps for each."""
    return min(int(group.topn.max()), int(group.end.max()))


def group_candidates(
    scores: torch.Tensor, maxima: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The columns of each row's `groups` column groups with the largest maxima, and their scores."""
    if groups == 1:
        best_groups = maxima.argmax(dim=1, keepdim=True)
    else:
        best_groups = torch.topk(maxima, groups, dim=1, sorted=False).indices
    offsets = torch.arange(TOPK_GROUP, device=scores.device)
    columns = (best_groups[:, :, None] * TOPK_GROUP + offsets).view(scores.shape[0], groups * TOPK_GROUP)
    return scores.gather(1, columns), columns


def block_candidates(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates for the k best of each row, as (scores, columns); the caller's top-k picks them.

    The k best of a row lie in the k column groups (of 64) with the largest maxima, so a cheap
    max per group picks groups and only their columns are kept. (Among exactly tied scores it
    may keep a different one, as topk itself may.)
    """
    rows, columns = scores.shape
    if columns % TOPK_GROUP or columns < 4 * TOPK_GROUP * k:
        return torch.topk(scores, k, dim=1, sorted=False)
    maxima = scores.view(rows, columns // TOPK_GROUP, TOPK_GROUP).amax(dim=2)
    return group_candidates(scores, maxima, k)


def row_block_candidates(scores_t: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """block_candidates for a [rows, queries] block: candidates as ([queries, n] scores, rows)."""
    rows, queries = scores_t.shape
    if rows % TOPK_GROUP or rows < 4 * TOPK_GROUP * k:
        values, index = torch.topk(scores_t, k, dim=0, sorted=False)
        return values.T, index.T
    maxima = scores_t.view(rows // TOPK_GROUP, TOPK_GROUP, queries).amax(dim=1)  # [groups, queries]
    if k == 1:
        best_groups = maxima.argmax(dim=0, keepdim=True)
    else:
        best_groups = torch.topk(maxima, k, dim=0, sorted=False).indices  # [k, queries]
    offsets = torch.arange(TOPK_GROUP, device=scores_t.device)
    row_index = (best_groups[:, None, :] * TOPK_GROUP + offsets[None, :, None]).view(k * TOPK_GROUP, queries)
    return scores_t.gather(0, row_index).T, row_index.T


class RunningTopK:
    """The k best (score, vocabulary row) of each query over a blocked scan, sorted best first.

    On CPU, once every query has k finite scores, a block is not merged by top-k's any more:
    a max per column group finds the few (query, group) pairs holding a score above the
    query's k-th best so far, those scores are collected, and the collection is merged now
    and then. That replaces two top-k's over every row of every block by one reduction and
    a little work. (A GPU keeps merging every block: the threshold test there would read
    back to the host each block and stall the stream.)
    """

    def __init__(
        self,
        queries: int,
        k: int,
        device: torch.device,
        prefilter: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """prefilter: the float32 query matrix and each query's prefilter_margin, for
        add_prefiltered_block."""
        self.k = k
        self.scores = torch.full((queries, 0), -math.inf, device=device)
        self.rows = torch.zeros((queries, 0), dtype=torch.int64, device=device)
        self._collect = device.type == "cpu"
        self._thresholds: torch.Tensor | None = None
        self._pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._pending_count = 0
        self._prefilter = prefilter
        # Per query, the int16 bits of a bfloat16 value at most (k-th best - margin): a column
        # group may hold a score above the k-th best only where its best bfloat16 score's bits
        # are greater. None until every query has a k-th best above its margin (int16 order is
        # value order only for positive bfloat16 values); follows _thresholds.
        self.prefilter_bits: torch.Tensor | None = None
        # The share of (query, column group) pairs of the last block that had to be looked at.
        self.hit_share = 1.0

    def _set_thresholds(self, thresholds: torch.Tensor | None) -> None:
        self._thresholds = thresholds
        self.prefilter_bits = None
        if thresholds is None or self._prefilter is None:
            return
        lowest = thresholds - self._prefilter[1]
        if bool((lowest > 0).all()):
            rounded = lowest.to(torch.bfloat16)
            bits = rounded.view(torch.int16)
            # Rounded down, not to nearest: one bfloat16 step less where rounding went up.
            self.prefilter_bits = torch.where(rounded.float() > lowest, bits - 1, bits)

    def add_prefiltered_block(
        self, approximate_bits: torch.Tensor, start: int, unit_block: torch.Tensor
    ) -> None:
        """A block scored in bfloat16 (as int16 bits, masked with -inf), once prefilter_bits is
        set: the columns that may hold a score above the k-th best are scored again in float32
        and collected."""
        lowest_bits = self.prefilter_bits
        assert lowest_bits is not None
        assert self._thresholds is not None
        assert self._prefilter is not None
        queries, columns = approximate_bits.shape
        grouped = approximate_bits.view(queries, columns // TOPK_GROUP, TOPK_GROUP)
        query_index, group_index = (grouped.amax(dim=2) > lowest_bits[:, None]).nonzero(as_tuple=True)
        self.hit_share = query_index.numel() / (queries * grouped.shape[1])
        if query_index.numel() == 0:
            return
        hit, offset = (grouped[query_index, group_index] > lowest_bits[query_index, None]).nonzero(
            as_tuple=True
        )
        query_index, column = query_index[hit], group_index[hit] * TOPK_GROUP + offset
        values = (unit_block[column] * self._prefilter[0][query_index]).sum(dim=1)
        above = values > self._thresholds[query_index]
        self._add_pending(query_index[above], values[above], column[above] + start)

    def add_block(self, scores: torch.Tensor, start: int, rows_first: bool = False) -> None:
        """A block of float32 scores, [queries, rows], or [rows, queries] where rows_first (CPU)."""
        rows = scores.shape[0] if rows_first else scores.shape[1]
        if self._thresholds is not None and rows % TOPK_GROUP == 0:
            self._collect_above_thresholds(scores, start, rows_first)
            return
        candidates = row_block_candidates if rows_first else block_candidates
        candidate_scores, candidate_rows = candidates(scores, min(self.k, rows))
        self.merge(candidate_scores, candidate_rows + start)
        if self._collect and self.scores.shape[1] == self.k:
            kth = self.scores[:, -1]
            self._set_thresholds(kth.clone() if bool(kth.isfinite().all()) else None)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        self._flush()
        return self.scores, self.rows

    def merge(self, candidate_scores: torch.Tensor, candidate_rows: torch.Tensor) -> None:
        """Candidates (scores and vocabulary rows, [queries, n]) into the k best."""
        merged_scores = torch.cat([self.scores, candidate_scores], dim=1)
        merged_rows = torch.cat([self.rows, candidate_rows], dim=1)
        self.scores, keep = torch.topk(merged_scores, min(self.k, merged_scores.shape[1]), dim=1)
        self.rows = torch.gather(merged_rows, 1, keep)

    def _collect_above_thresholds(self, scores: torch.Tensor, start: int, rows_first: bool) -> None:
        assert self._thresholds is not None
        # (query, column group) pairs whose best score beats the query's k-th best so far; rows first,
        # in group order, which _flush's sort by query makes the same order as the other's.
        if rows_first:
            grouped = scores.view(scores.shape[0] // TOPK_GROUP, TOPK_GROUP, scores.shape[1])
            maxima = grouped.amax(dim=1)
            group_index, query_index = (maxima > self._thresholds[None, :]).nonzero(as_tuple=True)
        else:
            grouped = scores.view(scores.shape[0], scores.shape[1] // TOPK_GROUP, TOPK_GROUP)
            maxima = grouped.amax(dim=2)
            query_index, group_index = (maxima > self._thresholds[:, None]).nonzero(as_tuple=True)
        self.hit_share = query_index.numel() / maxima.numel()
        if query_index.numel() == 0:
            return
        # [hits, 64]
        values = grouped[group_index, :, query_index] if rows_first else grouped[query_index, group_index]
        hit, offset = (values > self._thresholds[query_index, None]).nonzero(as_tuple=True)
        self._add_pending(
            query_index[hit], values[hit, offset], group_index[hit] * TOPK_GROUP + offset + start
        )

    def _add_pending(self, query_index: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> None:
        self._pending.append((query_index, values, rows))
        self._pending_count += query_index.numel()
        # Merged often enough that the k-th best (which decides what is looked at) stays fresh.
        if self._pending_count >= self.scores.shape[0] * min(self.k, 4):
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        query_index = torch.cat([p[0] for p in self._pending])
        values = torch.cat([p[1] for p in self._pending])
        rows = torch.cat([p[2] for p in self._pending])
        self._pending, self._pending_count = [], 0
        order = torch.argsort(query_index, stable=True)
        query_index, values, rows = query_index[order], values[order], rows[order]
        per_query = torch.bincount(query_index, minlength=self.scores.shape[0])
        slots = torch.arange(query_index.numel()) - (torch.cumsum(per_query, 0) - per_query)[query_index]
        width = int(per_query.max())
        packed_scores = self.scores.new_full((self.scores.shape[0], width), -math.inf)
        packed_rows = self.rows.new_zeros((self.scores.shape[0], width))
        packed_scores[query_index, slots] = values
        packed_rows[query_index, slots] = rows
        self.merge(packed_scores, packed_rows)
        self._set_thresholds(self.scores[:, -1].clone())
