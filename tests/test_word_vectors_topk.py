"""word_vectors.topk: the block-candidate helpers every scanner's running top-k uses."""

from __future__ import annotations

import pytest
import torch
from embedserve.server.core.word_vectors.topk import block_candidates, row_block_candidates


@pytest.mark.parametrize(("rows", "queries", "k"), [(2560, 20, 1), (2560, 20, 3), (512, 17, 2), (100, 16, 5)])
def test_rows_first_candidates_hold_the_columns_first_best(rows: int, queries: int, k: int) -> None:
    """row_block_candidates on a [rows, queries] block keeps each query's k best rows, as
    block_candidates does on the [queries, rows] one (the grouped path from 4 * 64 * k rows)."""
    scores = torch.randn(queries, rows, generator=torch.Generator().manual_seed(rows + k))

    def best_rows(candidate_scores: torch.Tensor, candidate_rows: torch.Tensor) -> torch.Tensor:
        top = torch.topk(candidate_scores, k, dim=1).indices
        return candidate_rows.gather(1, top).sort(dim=1).values

    expected = best_rows(*block_candidates(scores, k))
    assert torch.equal(best_rows(*row_block_candidates(scores.T.contiguous(), k)), expected)
