"""Reading a prepared corpus's files straight from its manifest, without the server's reader."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

DTYPES = {"uint16": "<u2", "uint32": "<u4", "int32": "<i4"}


def manifest_of(data_dir: Path, name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((data_dir / f"{name}.json").read_text())
    return data


def shard_paths(data_dir: Path, name: str) -> list[Path]:
    return [data_dir / shard["file"] for shard in manifest_of(data_dir, name)["shards"]]


def prepared_tokens(data_dir: Path, name: str) -> npt.NDArray[np.integer]:
    """Every token of the corpus: its shards' tokens, concatenated in the manifest's order."""
    manifest = manifest_of(data_dir, name)
    dtype = np.dtype(DTYPES[manifest["dtype"]])
    parts = [
        np.fromfile(data_dir / shard["file"], dtype=dtype, offset=shard.get("header_bytes", 0))
        for shard in manifest["shards"]
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def document_starts(data_dir: Path, name: str) -> list[int]:
    """Where documents start in the whole corpus, from the shards' offsets files."""
    starts: list[int] = []
    base = 0
    for shard in manifest_of(data_dir, name)["shards"]:
        offsets = shard.get("document_offsets")
        if offsets:
            starts += (np.fromfile(data_dir / offsets["file"], dtype="<u8") + base).tolist()
        base += shard["tokens"]
    return starts
