"""Which scanner a model uses: picked once, at load time, from the device, the CPU and the config."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt
import torch

from .bfloat16 import bfloat16_prefilter_available, bfloat16_rows, within_margin
from .candidates import CandidateScan
from .columns_first import ColumnsFirstScan
from .prefilter import Bfloat16PrefilterScan
from .rows_first import RowsFirstScan
from .scanner import Scanner
from .search_rows import SearchRows

_LOGGER = logging.getLogger(__name__)

PrefilterSetting = Literal["auto", "on", "off"]
ScannerName = Literal["columns-first", "rows-first", "prefilter", "candidates"]
SCANNER_NAMES: tuple[ScannerName, ...] = get_args(ScannerName)
_PREFILTER_SETTINGS: dict[str, bool | None] = {"auto": None, "on": True, "off": False}

# name -> (float32 scan, its unit rows in bfloat16 when asked for) -> scanner
_BUILDERS: dict[ScannerName, Callable[[ColumnsFirstScan, Callable[[], torch.Tensor]], Scanner]] = {
    "columns-first": lambda float32, _: float32,
    "rows-first": lambda float32, _: RowsFirstScan(float32),
    "prefilter": lambda float32, bfloat16: Bfloat16PrefilterScan(float32, bfloat16()),
    "candidates": lambda float32, bfloat16: CandidateScan(float32, bfloat16()),
}


def prefilter_wanted(setting: PrefilterSetting | bool | None) -> bool | None:
    """--word-vector-prefilter as WordVectors(prefilter=...) takes it: None (auto), True or False."""
    if setting is None or isinstance(setting, bool):
        return setting
    if setting not in _PREFILTER_SETTINGS:
        raise ValueError(f"the prefilter is auto, on or off, not {setting!r}")
    return _PREFILTER_SETTINGS[setting]


def build_scanner(
    name: ScannerName,
    rows: SearchRows,
    *,
    block_rows: int | None = None,
    unit_bfloat16: npt.NDArray[np.uint16] | torch.Tensor | None = None,
) -> Scanner:
    """The scanner of this name over these rows, as the factory builds it (no checks, no log).

    unit_bfloat16: for the bfloat16 scanners, the rows' bfloat16 bits (as uint16, e.g. from the
    cache) or tensor; None rounds the unit rows.
    """
    if name not in _BUILDERS:
        raise ValueError(f"no scanner {name!r}; there are {', '.join(SCANNER_NAMES)}")

    def rounded() -> torch.Tensor:
        if isinstance(unit_bfloat16, torch.Tensor):
            return unit_bfloat16
        with warnings.catch_warnings():
            # Memory-mapped caches are read-only; nothing here writes to them.
            warnings.simplefilter("ignore", UserWarning)
            return bfloat16_rows(rows, unit_bfloat16)

    return _BUILDERS[name](ColumnsFirstScan(rows, block_rows=block_rows), rounded)


def choose_scanner(
    rows: SearchRows,
    *,
    prefilter: PrefilterSetting | bool | None = None,
    block_rows: int | None = None,
    unit_bfloat16: npt.NDArray[np.uint16] | None = None,
) -> Scanner:
    """The scanner for a model's rows, logged once.

    Float32: columns-first on a GPU, rows-first on CPU (which scans a few queries columns-first).
    bfloat16, where the prefilter is on, or auto and this CPU multiplies bfloat16 natively: the
    prefilter on CPU, the candidate scan elsewhere, unless this machine's bfloat16 products
    stray past the margin (checked here), when it stays float32.
    """
    device = rows.device
    wanted = prefilter_wanted(prefilter)
    use_bfloat16 = bfloat16_prefilter_available(device) if wanted is None else wanted
    on_cpu = device.type == "cpu"
    name: ScannerName = "rows-first" if on_cpu else "columns-first"
    reason = "float32: the bfloat16 prefilter is off"
    if wanted is None and not use_bfloat16:
        reason = "float32: this device does not multiply bfloat16 natively"
    if use_bfloat16:
        bfloat16 = build_scanner(
            "prefilter" if on_cpu else "candidates", rows, block_rows=block_rows, unit_bfloat16=unit_bfloat16
        )
        assert isinstance(bfloat16, Bfloat16PrefilterScan | CandidateScan)
        if within_margin(rows, bfloat16.unit_bfloat16):
            why = "the prefilter is on" if wanted else "auto: this CPU multiplies bfloat16 natively"
            _LOGGER.info(
                "word-vector scans on %s: %s (bfloat16 first: %s)", device, type(bfloat16).__name__, why
            )
            return bfloat16
        _LOGGER.warning(
            "bfloat16 products on %s stray past the prefilter's margin; scanning in float32", device
        )
        reason = "float32: bfloat16 products stray past the margin"
    scanner = build_scanner(name, rows, block_rows=block_rows)
    _LOGGER.info("word-vector scans on %s: %s (%s)", device, type(scanner).__name__, reason)
    return scanner
