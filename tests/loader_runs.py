"""Runs StreamingDataset under real loaders in a child process, for tests/test_training_loaders.py.

    python -m tests.loader_runs '{"target": ..., "text": ..., "settings": {...}, "steps": [...]}'

runs the steps in order, in one process (so each starts with the gRPC state the ones before left),
and prints one JSON line: each step's reply, its batches as [inputs rows, targets rows]. A step is
{"scenario": ..., "settings": {...}, ...}, its settings added to the job's. The loaders fork their
workers (the default start method), which the test process itself cannot do safely: it runs a
gRPC server. Scenarios:

- resume: a StatefulDataLoader's uninterrupted pass, and for each k: k batches, state_dict()
  through torch.save, a fresh dataset and loader, load_state_dict(), the rest, for k = 0, 1,
  N / 2, N - 1 and N;
- passes: two passes of one loader, then the next pass after set_epoch(1), for several loaders;
- fork_after_grpc: gRPC used in this process first (`use`), then a DataLoader with workers.
"""

from __future__ import annotations

import io
import itertools
import json
import sys
from collections.abc import Iterable
from typing import Any

import torch
from embedserve.client import Client
from embedserve.client.torch import StreamingDataset
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader  # type: ignore[import-untyped]

Rows = list[list[list[int]]]  # [inputs rows, targets rows] of one batch


def _rows(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[Rows]:
    return [[inputs.tolist(), targets.tolist()] for inputs, targets in batches]


def _dataset(job: dict[str, Any]) -> StreamingDataset:
    return StreamingDataset(job["target"], text=job["text"], **job["settings"])


def _resume(job: dict[str, Any]) -> dict[str, Any]:
    workers = job["num_workers"]

    def loader(dataset: StreamingDataset) -> StatefulDataLoader:
        return StatefulDataLoader(dataset, batch_size=None, num_workers=workers)

    full = _rows(loader(_dataset(job)))
    resumed: dict[str, list[Rows]] = {}
    n = len(full)
    for k in sorted({0, 1, n // 2, n - 1, n}):
        first_loader = loader(_dataset(job))
        first = _rows(itertools.islice(first_loader, k))
        saved = io.BytesIO()
        torch.save(first_loader.state_dict(), saved)
        saved.seek(0)
        rest_loader = loader(_dataset(job))
        rest_loader.load_state_dict(torch.load(saved, weights_only=True))
        resumed[str(k)] = first + _rows(rest_loader)
    return {"full": full, "resumed": resumed}


def _passes(job: dict[str, Any]) -> dict[str, Any]:
    """For each (num_workers, stateful) of job["loaders"]: two passes, then one after set_epoch(1)."""
    runs = {}
    for num_workers, stateful in job["loaders"]:
        dataset = _dataset(job)
        loader = (StatefulDataLoader if stateful else DataLoader)(
            dataset, batch_size=None, num_workers=num_workers
        )
        first, second = _rows(loader), _rows(loader)
        dataset.set_epoch(1)
        runs[f"{num_workers},{stateful}"] = {"first": first, "second": second, "epoch_1": _rows(loader)}
    return runs


def _fork_after_grpc(job: dict[str, Any]) -> dict[str, Any]:
    use = job["use"]
    if use == "info":
        Client(job["target"]).info()
    elif use == "pass":
        _rows(DataLoader(_dataset(job), batch_size=None))
    kept = None
    if use == "closed":  # closed, but still referred to while the workers fork
        kept = Client(job["target"])
        kept.info()
        kept.close()
    client = Client(job["target"]) if use == "open" else None
    if client is not None:
        client.info()
    loader = DataLoader(_dataset(job), batch_size=None, num_workers=job["num_workers"])
    try:
        reply: dict[str, Any] = {"batches": _rows(loader)}
        if kept is not None:
            try:
                kept.info()
            except RuntimeError as error:
                reply["after_close"] = str(error)
        return reply
    except RuntimeError as error:
        return {"error": str(error)}
    finally:
        if client is not None:
            client.close()


def main() -> None:
    job = json.loads(sys.argv[1])
    scenarios = {"resume": _resume, "passes": _passes, "fork_after_grpc": _fork_after_grpc}
    replies = []
    for step in job["steps"]:
        settings = {**job["settings"], **step.get("settings", {})}
        replies.append(scenarios[step["scenario"]]({**job, **step, "settings": settings}))
    print(json.dumps(replies))


if __name__ == "__main__":
    main()
