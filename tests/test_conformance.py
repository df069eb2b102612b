"""The language-neutral conformance cases (tests/conformance/cases.json), run through raw stubs.

The same cases run from Node.js (test_conformance_node.py) and against the built image
(test_container.py); here they also answer to the references they were drawn from.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tiktoken
import torch
from embedserve.server import ServerConfig
from embedserve.v1 import word_vectors_pb2, word_vectors_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from .conformance import runner
from .conftest import TINY_CONFIG, VERDICT_PATH, ServerThread, make_certificates, requires_glove, start_server
from .notebook_reference import create_dataloader_v1, notebook_tables

SUITE = runner.load_cases()
CASES = {case["name"]: case for case in SUITE["cases"]}
VERDICT = VERDICT_PATH if VERDICT_PATH.is_file() else None


def _targets(server: ServerThread, tiny_server: ServerThread) -> dict[str, str]:
    return {"default": server.target, "tiny": tiny_server.target}


@requires_glove
def test_every_case_passes_through_raw_stubs(server: ServerThread, tiny_server: ServerThread) -> None:
    results = runner.run_cases(_targets(server, tiny_server), verdict=VERDICT)
    failed = [f"{result.name}: {result.detail}" for result in results if result.outcome == "failed"]
    assert not failed, "\n".join(failed)
    skipped = {result.name for result in results if result.outcome == "skipped"}
    needs_verdict = {case["name"] for case in SUITE["cases"] if "the-verdict" in case.get("requires", [])}
    assert skipped == (set() if VERDICT else needs_verdict)
    assert len(results) == len(SUITE["cases"])


def test_the_suite_covers_every_rpc() -> None:
    called = {case["method"] for case in SUITE["cases"]}
    from embedserve.v1 import batches_pb2, embedding_pb2, tokenizer_pb2

    for module in (tokenizer_pb2, batches_pb2, embedding_pb2, word_vectors_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if method.name == "SharedMemorySession":  # same-host only: tests/test_shared_memory.py
                    continue
                assert f"{service.full_name}/{method.name}" in called
    refusals = [case for case in SUITE["cases"] if "status" in case]
    assert all(case["status"]["code"] not in ("INTERNAL", "UNKNOWN") for case in refusals)
    assert len(refusals) >= 20


def test_a_wrong_expectation_fails(tiny_server: ServerThread, tmp_path: Path) -> None:
    """The runner can fail: each kind of expectation, made wrong, is reported."""
    wrong: list[dict[str, Any]] = []
    rows = copy.deepcopy(CASES["embed/tiny-table-rows"])
    rows["expect"]["embeddings"]["$tensor"]["values"][4] += 1e-3
    wrong.append(rows)
    stream = copy.deepcopy(CASES["embed-stream/in-order"])
    stream["responses"][1]["sequence_id"] = "4"
    wrong.append(stream)
    status = copy.deepcopy(CASES["embed/missing-tensor"])
    status["status"]["message_contains"] = ["no such words"]
    wrong.append(status)
    ok_expected_refusal = copy.deepcopy(CASES["embed/tiny-positions"])
    ok_expected_refusal["status"] = {"code": "INVALID_ARGUMENT"}
    wrong.append(ok_expected_refusal)
    count = copy.deepcopy(CASES["embed-stream/in-order"])
    count["response_count"] = 3
    wrong.append(count)
    digest = copy.deepcopy(CASES["embed-stream/in-order"])
    digest["stream_digest"] = {"field": "embeddings", "sha256": "0" * 64}
    wrong.append(digest)
    unknown_field = copy.deepcopy(CASES["embed/tiny-positions"])
    unknown_field["request"]["options"] = {"include_positionals": True}
    wrong.append(unknown_field)
    limit = copy.deepcopy(CASES["embed/over-context-length"])
    limit["error_info"]["metadata"]["requested"] = "6"
    wrong.append(limit)
    for index, case in enumerate(wrong):
        case["name"] = f"wrong-{index}"
    path = tmp_path / "cases.json"
    path.write_text(json.dumps({"cases": wrong}))
    results = runner.run_cases({"tiny": tiny_server.target}, cases_path=path)
    assert [result.outcome for result in results] == ["failed"] * len(wrong), results


def test_the_matcher_reads_proto3_defaults_and_every_dtype() -> None:
    runner.match({"index": "0", "flag": False, "items": [], "dtype": "DTYPE_UNSPECIFIED"}, {})
    with pytest.raises(runner.Mismatch):
        runner.match({"index": "1"}, {})
    values = np.array([1.5, -2.25, 256.0], dtype=np.float32)  # exact in both
    for dtype, raw in (
        ("DTYPE_FLOAT16", values.astype("<f2").tobytes()),
        ("DTYPE_BFLOAT16", (values.view(np.uint32) >> 16).astype("<u2").tobytes()),
    ):
        import base64

        tensor = {"dtype": dtype, "shape": ["3"], "data": base64.b64encode(raw).decode()}
        runner.match({"$tensor": {"dtype": dtype, "shape": ["3"], "values": values.tolist()}}, tensor)


# ---- the golden values are the references' own


@pytest.fixture(scope="module")
def encoding(reference_encoding: tiktoken.Encoding) -> tiktoken.Encoding:
    return reference_encoding


def _tensor(case: dict[str, Any], *path: str) -> dict[str, Any]:
    node: Any = case
    for key in path:
        node = node[key] if not isinstance(node, list) else node[int(key)]
    spec: dict[str, Any] = node["$tensor"]
    return spec


def test_token_goldens_are_tiktokens(encoding: tiktoken.Encoding, verdict_text: str) -> None:
    ids = encoding.encode(verdict_text, allowed_special={"<|endoftext|>"})
    golden = _tensor(CASES["tokenize/the-verdict"], "expect", "token_ids")
    assert golden["sha256"] == hashlib.sha256(np.asarray(ids, "<i4").tobytes()).hexdigest()
    assert golden["shape"] == [str(len(ids))] == ["5154"]
    texts = CASES["tokenize/unicode-several-texts"]["request"]["texts"]
    flat = [token for text in texts for token in encoding.encode(text)]
    assert _tensor(CASES["tokenize/unicode-several-texts"], "expect", "token_ids")["values"] == flat
    assert CASES["detokenize/unicode-round-trip"]["expect"]["texts"] == texts


def test_batch_goldens_are_the_dataloaders(encoding: tiktoken.Encoding, verdict_text: str) -> None:
    first = CASES["stream-batches/notebook-first-batch"]
    loader = create_dataloader_v1(verdict_text, encoding, batch_size=8, max_length=4, stride=4, shuffle=False)
    inputs, targets = next(iter(loader))
    assert _tensor(first, "responses", "0", "inputs")["values"] == inputs.flatten().tolist()
    assert _tensor(first, "responses", "0", "targets")["values"] == targets.flatten().tolist()
    assert first["response_count"] == len(loader)
    shuffled = CASES["stream-batches/shuffled-odd-settings-inputs"]
    request = shuffled["request"]
    loader = create_dataloader_v1(
        verdict_text,
        encoding,
        batch_size=request["batch_size"],
        max_length=request["max_length"],
        stride=request["stride"],
        shuffle=True,
        drop_last=request["drop_last"],
        generator=torch.Generator().manual_seed(int(request["seed"])),
    )
    digest = hashlib.sha256()
    for batch, _ in loader:
        digest.update(batch.numpy().astype("<i4").tobytes())
    assert shuffled["stream_digest"]["sha256"] == digest.hexdigest()
    assert shuffled["response_count"] == len(loader)


def test_embedding_goldens_are_the_notebooks_tables() -> None:
    token, position = notebook_tables(6, 3, 4, 123)
    rows = _tensor(CASES["embed/tiny-table-rows"], "expect", "embeddings")["values"]
    assert np.allclose(rows, token.weight.detach().numpy().ravel(), atol=1e-7)
    offset = CASES["embed/tiny-position-offset"]
    ids = offset["request"]["token_ids"]["$tensor"]["values"]
    start = offset["request"]["options"]["position_offset"]
    expected = token.weight[ids] + position.weight[start : start + len(ids)]
    assert np.allclose(_tensor(offset, "expect", "embeddings")["values"], expected.detach().numpy().ravel())


# ---- what a client in another language meets, fixed on our side


def test_reflection_is_served_as_v1_and_v1alpha(tiny_server: ServerThread) -> None:
    with grpc.insecure_channel(tiny_server.target) as channel:
        for service in ("grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
            info = channel.stream_stream(
                f"/{service}/ServerReflectionInfo",
                request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
                response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
            )
            requests = [
                reflection_pb2.ServerReflectionRequest(list_services=""),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="embedserve.v1.EmbeddingService"
                ),
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="grpc.reflection.v1.ServerReflection"
                ),
            ]
            listed, embedding, v1 = list(info(iter(requests), timeout=10))
            names = {entry.name for entry in listed.list_services_response.service}
            assert "embedserve.v1.EmbeddingService" in names
            assert {
                "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection",
            } <= names
            assert "embedserve.v1.WordVectorsService" not in names  # --word-vectors none
            assert embedding.file_descriptor_response.file_descriptor_proto
            assert v1.file_descriptor_response.file_descriptor_proto


@requires_glove
def test_missing_words_travel_as_status_details(server: ServerThread) -> None:
    from embedserve.status_details import missing_words_from_trailers

    with grpc.insecure_channel(server.target) as channel:
        stub = word_vectors_pb2_grpc.WordVectorsServiceStub(channel)
        request = word_vectors_pb2.SimilarityRequest(
            pairs=[
                word_vectors_pb2.WordPair(first='say "hi"', second="king"),
                word_vectors_pb2.WordPair(first="ü-x"),
            ]
        )
        with pytest.raises(grpc.RpcError) as raised:
            stub.Similarity(request, timeout=30)
    error: Any = raised.value
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert error.details() == 'not in the vocabulary: "say \\"hi\\"", "ü-x", ""'
    assert missing_words_from_trailers(error.trailing_metadata()) == ['say "hi"', "ü-x", ""]


@pytest.fixture(scope="module")
def secured_tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Path]]:
    folder = tmp_path_factory.mktemp("tls")
    make_certificates(folder)
    config: ServerConfig = replace(
        TINY_CONFIG,
        tls_cert=folder / "server.pem",
        tls_key=folder / "server.key",
        api_keys=("conformance-key",),
    )
    running = start_server(config)
    yield running, folder / "ca.pem"
    running.stop()


def test_the_cases_pass_with_tls_and_a_key(secured_tiny: tuple[ServerThread, Path]) -> None:
    server, ca = secured_tiny
    results = runner.run_cases({"tiny": server.target}, api_key="conformance-key", tls_ca=ca)
    assert [r for r in results if r.outcome == "failed"] == []
    assert sum(r.outcome == "passed" for r in results) == sum(c["server"] == "tiny" for c in SUITE["cases"])
    refused = runner.run_cases({"tiny": server.target}, api_key="wrong-key", tls_ca=ca)
    guarded = [c for c in SUITE["cases"] if not c["method"].startswith("grpc.health.v1.")]
    tiny = {c["name"] for c in guarded if c["server"] == "tiny"}
    assert {r.outcome for r in refused if r.name in tiny} == {"failed"}
