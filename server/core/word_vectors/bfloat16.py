"""What the bfloat16 scanners share: the unit rows in bfloat16, the error bound, the kernels' check."""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt
import torch

from .search_rows import SearchRows

_LOGGER = logging.getLogger(__name__)


def prefilter_margin(query_norms: torch.Tensor, dim: int) -> torch.Tensor:
    """How far a bfloat16 product of a query with a unit row can fall from the float32 one.

    Rounding each factor to bfloat16 (8 significant bits) moves each term by at most
    2 * 2**-8 + 2**-16 of itself, so the sum by that share of |q| |u| = |q| (Cauchy-Schwarz);
    rounding the float32-accumulated result to bfloat16 adds 2**-8 of it, and accumulation
    (in either precision) dim * 2**-24 each: under 2**-6 + dim * 2**-22 of |q| in all.
    """
    return query_norms * (2**-6 + dim * 2**-22)


def bfloat16_prefilter_available(device: torch.device) -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), so the prefilter pays."""
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def bfloat16_rows(rows: SearchRows, given: npt.NDArray[np.uint16] | None = None) -> torch.Tensor:
    """The unit rows rounded to bfloat16 on their device; given: those bits as uint16 already (e.g.
    memory-mapped from the cache)."""
    if rows.device.type == "cuda" and torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction:
        # Otherwise cuBLAS may sum a bfloat16 product's partial sums in bfloat16 (split-K), beyond
        # the margin, which assumes float32 accumulation. Only bfloat16 matrix products are
        # affected, and the server runs no others.
        _LOGGER.info("bfloat16 matrix products: reduced-precision reductions off")
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    if given is None:
        return rows.unit.to(torch.bfloat16)
    return torch.from_numpy(given).view(torch.bfloat16).to(rows.device)


def within_margin(rows: SearchRows, unit_bfloat16: torch.Tensor) -> bool:
    """Whether this machine's bfloat16 products keep within half of prefilter_margin.

    The margin assumes products accumulate in float32, which is this machine's kernels'
    business: a check on some rows against the others, before any query relies on it.
    """
    sample = rows.unit[: min(4096, rows.count)]
    queries = sample[:: max(1, len(sample) // 64)]
    with torch.inference_mode():
        approximate = torch.mm(queries.to(torch.bfloat16), unit_bfloat16[: len(sample)].T)
        exact = torch.mm(queries, sample.T)
        # Rows holding NaN (never ranked) say nothing about the kernels.
        error = torch.where(exact.isfinite(), (approximate.float() - exact).abs(), 0)
        return bool((error <= prefilter_margin(queries.norm(dim=1), rows.dim)[:, None] / 2).all())
