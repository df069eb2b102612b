"""The committed generated code matches the protos; the protos follow buf's lint and our conventions,
break nothing of v1 as released, and the standard protos shipped beside them are the served ones."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
from embedserve.v1 import batches_pb2, embedding_pb2, tensor_pb2, tokenizer_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FieldDescriptor, FileDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[1]
PROTOS = REPO / "protos"
GENERATED = PROTOS / "embedserve" / "v1"
BASELINE = PROTOS / "baseline" / "embedserve-v1.json"  # v1 as released: see its README
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


@pytest.fixture(scope="module")
def buf() -> str:
    local = REPO / ".venv" / "buf" / "node_modules" / ".bin" / "buf"
    found = str(local) if local.exists() else shutil.which("buf")
    if found is None:
        if os.environ.get("EMBEDSERVE_REQUIRE_BUF"):
            pytest.fail("buf is required (EMBEDSERVE_REQUIRE_BUF) but not installed")
        pytest.skip("buf is not installed (tests/run.sh installs it)")
    return found


def test_buf_lint_is_clean(buf: str) -> None:
    result = subprocess.run([buf, "lint"], cwd=PROTOS, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_change_breaks_v1_against_its_baseline(buf: str) -> None:
    result = subprocess.run(
        [buf, "breaking", "--against", str(BASELINE)], cwd=PROTOS, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_breaking_catches_a_deleted_field(buf: str, tmp_path: Path) -> None:
    # The check above must be able to fail: a copy of the protos without one field of v1.
    copy = tmp_path / "protos"
    shutil.copytree(PROTOS, copy, ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    batches = copy / "embedserve" / "v1" / "batches.proto"
    text = batches.read_text()
    assert "  int64 num_tokens = 7;\n" in text
    batches.write_text(text.replace("  int64 num_tokens = 7;\n", ""))
    result = subprocess.run(
        [buf, "breaking", "--against", str(BASELINE)], cwd=copy, capture_output=True, text=True
    )
    assert result.returncode != 0
    assert 'name "num_tokens" on message "StreamBatchesResponse" was deleted' in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("path", "packaged"),
    [
        ("grpc/health/v1/health.proto", health_pb2),
        ("google/rpc/status.proto", status_pb2),
        ("google/rpc/error_details.proto", error_details_pb2),
    ],
)
def test_the_third_party_protos_are_those_the_server_speaks(
    path: str, packaged: ModuleType, tmp_path: Path
) -> None:
    """protos/third_party/ describes the same messages and services as the packages the server runs."""
    out = tmp_path / "set.pb"
    include = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    args = ["protoc", f"-I{include}", f"-I{PROTOS / 'third_party'}", f"--descriptor_set_out={out}", path]
    assert protoc.main(args) == 0
    shipped = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    served = descriptor_pb2.FileDescriptorProto.FromString(packaged.DESCRIPTOR.serialized_pb)
    # The packages' copies differ only in their file name (grpc_health/v1/...) and in carrying no
    # json_name, which protoc fills in from the field names.
    for file in (shipped, served):
        file.ClearField("name")
        for message in _messages(file.message_type):
            for field in message.field:
                field.ClearField("json_name")
    assert shipped == served


def _messages(messages: Iterable[descriptor_pb2.DescriptorProto]) -> Iterator[descriptor_pb2.DescriptorProto]:
    for message in messages:
        yield message
        yield from _messages(message.nested_type)


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
