"""The reliability suite's scale: reduced by default (CI), full with EMBEDSERVE_RELIABILITY=full.

    EMBEDSERVE_RELIABILITY=full bash tests/run.sh tests/reliability -s

The full run writes its figures to tests/reliability/last-full-run.json (bench/RESULTS.md quotes them).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPORT = Path(__file__).with_name("last-full-run.json")


@dataclass(frozen=True)
class Scale:
    full: bool
    hostile_examples: int  # hypothesis examples per RPC and kind of input
    load_clients: int
    load_seconds: float

    def record(self, section: str, figures: dict[str, Any]) -> None:
        """Prints the figures; a full run also keeps them in REPORT."""
        print(f"\n[{section}] " + json.dumps(figures, sort_keys=True))
        if not self.full:
            return
        report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
        report[section] = figures
        REPORT.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


@pytest.fixture(scope="session")
def scale() -> Scale:
    if os.environ.get("EMBEDSERVE_RELIABILITY") == "full":
        return Scale(full=True, hostile_examples=400, load_clients=200, load_seconds=60.0)
    return Scale(full=False, hostile_examples=25, load_clients=40, load_seconds=5.0)
