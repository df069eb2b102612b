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


@pytest.mark.parametrize("in_place", [True, False], ids=["bytes filled in place", "bytearray"])
def test_hand_encoded_replies_equal_protobufs_encoding(
    in_place: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Embed and EmbedStream replies are encoded around the tensor the lookup writes into;
    byte for byte as protobuf would, on CPython (bytes filled in place) and elsewhere."""
    import torch
    from embedserve.server import _codec
    from embedserve.v1 import embedding_pb2

    if not in_place:
        monkeypatch.setattr(_codec, "_bytes_written_in_place", lambda: False)
    for shape in [(8, 256, 256), (3,), (1, 1, 1), (0, 5), (2, 300), (130, 2)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            tensor = torch.randn(shape).to(dtype)
            expected = embedding_pb2.EmbedResponse(embeddings=_codec.tensor_pb_from_torch(tensor))
            reply = _codec.TensorReply(1, shape, dtype)
            reply.tensor.copy_(tensor)
            assert reply.message() == expected.SerializeToString()
            for sequence_id in (1, 127, 128, 2**40):
                streamed = embedding_pb2.EmbedStreamResponse(
                    embeddings=expected.embeddings, sequence_id=sequence_id
                )
                trailer = _codec.encode_varint_field(2, sequence_id)
                reply = _codec.TensorReply(1, shape, dtype, trailer)
                reply.tensor.copy_(tensor)
                assert reply.message() == streamed.SerializeToString()


def test_a_reply_filled_in_place_lives_as_long_as_its_tensor() -> None:
    """The lookup may still write into a reply whose caller has gone (cancelled): its tensor
    alone keeps the message's memory alive."""
    import gc

    import torch
    from embedserve.server._codec import TensorReply, _bytes_written_in_place

    assert _bytes_written_in_place()  # CPython
    reply = TensorReply(1, (4, 64), torch.float32)
    message, tensor = reply.message(), reply.tensor
    alone = sys.getrefcount(b"x" * 1000)  # a bytes object held by one name
    del reply
    gc.collect()
    assert sys.getrefcount(message) == alone + 1  # `message`, and the tensor's view
    tensor.fill_(1.5)
    assert message.endswith(torch.full((4,), 1.5).numpy().tobytes())
    del tensor
    gc.collect()
    assert sys.getrefcount(message) == alone


def test_the_client_splits_a_replys_tensor_bytes_off_as_protobuf_would_parse_them() -> None:
    """Embed replies are decoded with the tensor's bytes left in the received message; whatever
    the layout, the result equals protobuf's own parse (and odd layouts fall back to it)."""
    import numpy as np
    from embedserve.client.tensor import from_tensor_pb, split_tensor_field
    from google.protobuf.message import DecodeError

    data = np.arange(12, dtype=np.float32).tobytes()
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, 4], data=data)
    region = embedding_pb2.SharedMemoryOutput(handle="h", offset=8)
    full = embedding_pb2.EmbedResponse(embeddings=tensor, written_to=region, written_bytes=48)
    tensor_bytes = tensor.SerializeToString()
    tensor_field = b"\x0a" + bytes([len(tensor_bytes)]) + tensor_bytes
    rest = full.SerializeToString()[len(tensor_field) :]
    shuffled_tensor = (
        tensor_pb2.Tensor(data=data).SerializeToString()
        + tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, 4]).SerializeToString()
    )
    layouts = {
        "as serialized": (full.SerializeToString(), True),
        "tensor last": (rest + tensor_field, True),
        "data first in the tensor": (b"\x0a" + bytes([len(shuffled_tensor)]) + shuffled_tensor + rest, True),
        "tensor field twice (merged)": (tensor_field + rest + tensor_field, False),
        "no tensor": (rest, False),
    }
    for name, (raw, split) in layouts.items():
        expected = embedding_pb2.EmbedResponse.FromString(raw)
        message, view = split_tensor_field(raw, embedding_pb2.EmbedResponse, 1)
        assert (view is not None) == split, name
        if view is not None:
            assert message.embeddings.data == b"", name
            assert view.obj is raw, name  # not a copy
            message.embeddings.data = bytes(view)
        assert message == expected, name
        if split:
            decoded = from_tensor_pb(message.embeddings, view)
            assert np.array_equal(decoded, np.arange(12, dtype=np.float32).reshape(3, 4)), name

    streamed = embedding_pb2.EmbedStreamResponse(embeddings=tensor, sequence_id=300).SerializeToString()
    stream_message, stream_view = split_tensor_field(streamed, embedding_pb2.EmbedStreamResponse, 1)
    assert stream_message.sequence_id == 300
    assert stream_view is not None
    assert bytes(stream_view) == data
    short = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[3, 5], data=data)
    message, view = split_tensor_field(
        embedding_pb2.EmbedResponse(embeddings=short).SerializeToString(), embedding_pb2.EmbedResponse, 1
    )
    with pytest.raises(ValueError, match="needs 60 bytes, got 48"):
        from_tensor_pb(message.embeddings, view)
    for garbage in (b"\x0a\xff", b"\x0b", full.SerializeToString()[:-3]):
        with pytest.raises(DecodeError):
            embedding_pb2.EmbedResponse.FromString(garbage)
        with pytest.raises(DecodeError):
            split_tensor_field(garbage, embedding_pb2.EmbedResponse, 1)
