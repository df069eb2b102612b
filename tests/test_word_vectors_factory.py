"""word_vectors.factory: the scanner a model gets, from the device, the CPU and the config, logged once.

(The GPU's choices, the candidate scan or float32 columns-first, are tests/test_gpu.py's.)
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from embedserve.server.core.word_vectors import (
    SCANNER_NAMES,
    Bfloat16PrefilterScan,
    PrefilterSetting,
    RowsFirstScan,
    WordVectors,
    bfloat16_prefilter_available,
    build_scanner,
    choose_scanner,
)
from embedserve.server.core.word_vectors.factory import prefilter_wanted

from .word_vector_cases import CPU

FACTORY_LOGGER = "embedserve.server.core.word_vectors.factory"


def _model(prefilter: PrefilterSetting | bool | None, block_rows: int | None = None) -> WordVectors:
    vectors = np.random.default_rng(0).standard_normal((5000, 16)).astype(np.float32)
    words = [f"w{i}" for i in range(5000)]
    return WordVectors(
        words, vectors, name="m", source="m", device=CPU, prefilter=prefilter, block_rows=block_rows
    )


@pytest.mark.parametrize(
    ("prefilter", "expected"),
    [
        ("off", RowsFirstScan),
        (False, RowsFirstScan),
        ("on", Bfloat16PrefilterScan),  # forced, whatever this CPU is: the margin check passes here
        (True, Bfloat16PrefilterScan),
        ("auto", None),
        (None, None),
    ],
)
def test_the_scanner_follows_the_config_and_the_cpu_and_is_logged_once(
    prefilter: PrefilterSetting | bool | None, expected: type | None, caplog: pytest.LogCaptureFixture
) -> None:
    if expected is None:  # auto: the prefilter where this CPU multiplies bfloat16 natively
        expected = Bfloat16PrefilterScan if bfloat16_prefilter_available(CPU) else RowsFirstScan
    with caplog.at_level(logging.INFO, logger=FACTORY_LOGGER):
        model = _model(prefilter=prefilter, block_rows=256)
    assert type(model.scanner) is expected
    assert model.prefilter == (expected is Bfloat16PrefilterScan)
    choices = [r.getMessage() for r in caplog.records if r.name == FACTORY_LOGGER]
    assert len(choices) == 1, choices
    assert expected.__name__ in choices[0]
    assert isinstance(model.scanner, RowsFirstScan | Bfloat16PrefilterScan)
    assert model.scanner.float32.block_rows == 256


def test_prefilter_settings() -> None:
    assert [prefilter_wanted(s) for s in ("auto", "on", "off", None, True, False)] == [
        None,
        True,
        False,
        None,
        True,
        False,
    ]
    with pytest.raises(ValueError, match="auto, on or off"):
        prefilter_wanted("sometimes")  # type: ignore[arg-type]


def test_scanners_by_name() -> None:
    model = _model(prefilter="off")
    for name in SCANNER_NAMES:
        scanner = build_scanner(name, model.search_rows, block_rows=512)
        assert scanner.name == name
        assert scanner.rows is model.search_rows
        model.scanner = scanner
        assert model.prefilter == (name in ("prefilter", "candidates"))
    with pytest.raises(ValueError, match="no scanner 'fastest'"):
        build_scanner("fastest", model.search_rows)  # type: ignore[arg-type]


def test_cached_bfloat16_rows_are_used_and_checked(caplog: pytest.LogCaptureFixture) -> None:
    """The cache's bfloat16 copy serves as it is; one that does not match the rows (a damaged cache)
    fails the kernels' check, and the model scans in float32."""
    model = _model(prefilter="off")
    bits = model.search_rows.unit.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    scanner = choose_scanner(model.search_rows, prefilter="on", unit_bfloat16=bits)
    assert isinstance(scanner, Bfloat16PrefilterScan)
    assert np.array_equal(scanner.unit_bfloat16.view(torch.int16).numpy().view(np.uint16), bits)
    with caplog.at_level(logging.WARNING, logger=FACTORY_LOGGER):
        float32 = choose_scanner(model.search_rows, prefilter="on", unit_bfloat16=bits[::-1].copy())
    assert isinstance(float32, RowsFirstScan)
    assert "stray past the prefilter's margin" in caplog.text


def test_the_config_offers_exactly_the_factorys_prefilter_settings() -> None:
    """--word-vector-prefilter's choices (declared in the light config module, which imports no
    torch) are the ones the factory takes."""
    from typing import get_args

    from embedserve.server.config import Prefilter
    from embedserve.server.core.word_vectors.factory import PrefilterSetting

    assert get_args(Prefilter) == get_args(PrefilterSetting)
