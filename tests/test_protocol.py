"""The committed generated code matches the protos; the protos follow buf's lint and our conventions."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from embedserve.v1 import batches_pb2, embedding_pb2, tensor_pb2, tokenizer_pb2
from google.protobuf.descriptor import FieldDescriptor, FileDescriptor

REPO = Path(__file__).resolve().parents[1]
PROTOS = REPO / "protos"
GENERATED = PROTOS / "embedserve" / "v1"
FILES: list[FileDescriptor] = [m.DESCRIPTOR for m in (tensor_pb2, tokenizer_pb2, batches_pb2, embedding_pb2)]


def test_generated_code_has_not_drifted(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(PROTOS / "generate.py"), "--out", str(tmp_path)], check=True, capture_output=True
    )
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "embedserve" / "v1").iterdir()}
    committed = {p.name: p.read_bytes() for p in GENERATED.iterdir() if "_pb2" in p.name}
    assert sorted(fresh) == sorted(committed), "run: python protos/generate.py"
    for name, content in fresh.items():
        assert committed[name] == content, f"{name} is stale: run python protos/generate.py"


def _buf() -> str | None:
    local = REPO / ".venv" / "buf" / "node_modules" / ".bin" / "buf"
    return str(local) if local.exists() else shutil.which("buf")


def test_buf_lint_is_clean() -> None:
    buf = _buf()
    if buf is None:
        if os.environ.get("EMBEDSERVE_REQUIRE_BUF"):
            pytest.fail("buf is required (EMBEDSERVE_REQUIRE_BUF) but not installed")
        pytest.skip("buf is not installed (tests/run.sh installs it)")
    result = subprocess.run([buf, "lint"], cwd=PROTOS, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_file_is_embedserve_v1_in_its_folder() -> None:
    for file in FILES:
        assert file.package == "embedserve.v1"
        assert file.name.startswith("embedserve/v1/")


def test_arrays_travel_as_tensors_never_repeated_floats() -> None:
    for file in FILES:
        for message in file.message_types_by_name.values():
            for field in message.fields:
                is_repeated_float = field.is_repeated and field.type in (
                    FieldDescriptor.TYPE_FLOAT,
                    FieldDescriptor.TYPE_DOUBLE,
                )
                assert not is_repeated_float, f"{message.full_name}.{field.name}"
    tensor = tensor_pb2.Tensor.DESCRIPTOR
    assert [f.name for f in tensor.fields] == ["dtype", "shape", "data"]


def test_each_rpc_has_its_own_request_and_response() -> None:
    seen: set[str] = set()
    for file in FILES:
        for service in file.services_by_name.values():
            for method in service.methods:
                for message in (method.input_type, method.output_type):
                    assert message.full_name not in seen
                    seen.add(message.full_name)
                assert method.input_type.name.endswith("Request")
                assert method.output_type.name.endswith("Response")
    services = {s.full_name for f in FILES for s in f.services_by_name.values()}
    assert services == {
        "embedserve.v1.TokenizerService",
        "embedserve.v1.BatchesService",
        "embedserve.v1.EmbeddingService",
    }
