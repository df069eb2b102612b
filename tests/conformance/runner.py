"""The conformance cases (cases.json) run through grpcio and the generated messages alone, no SDK.

    python -m tests.conformance.runner --target default=127.0.0.1:50051 --target tiny=127.0.0.1:50061

The format is in README.md beside this file; node/runner.js is the same runner for Node.js.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from embedserve.v1 import batches_pb2, embedding_pb2, tokenizer_pb2, word_vectors_pb2
from google.protobuf import descriptor_pool, json_format, message_factory
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2

CASES_PATH = Path(__file__).with_name("cases.json")
# The messages' modules: imported so that their descriptors are in the default pool.
PROTOCOL_MODULES = (tokenizer_pb2, batches_pb2, embedding_pb2, word_vectors_pb2, health_pb2)
DETAILS_KEY = "grpc-status-details-bin"
READY_TIMEOUT_S = 180.0
CALL_TIMEOUT_S = 120.0
# How each Dtype's `data` decodes: numpy's little-endian types (bfloat16 is handled apart).
NUMPY_DTYPES = {
    "DTYPE_INT32": "<i4",
    "DTYPE_INT64": "<i8",
    "DTYPE_UINT16": "<u2",
    "DTYPE_FLOAT32": "<f4",
    "DTYPE_FLOAT16": "<f2",
}
PROTO3_DEFAULTS: tuple[object, ...] = (0, "0", "", False, [], 0.0)


@dataclass(frozen=True)
class CaseResult:
    name: str
    outcome: str  # "passed", "failed" or "skipped"
    detail: str = ""

    def to_json(self) -> str:
        return json.dumps({"name": self.name, "outcome": self.outcome, "detail": self.detail})


class Mismatch(Exception):
    """A reply that does not match its case; the message says where."""


def load_cases(path: Path = CASES_PATH) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded


# ---- requests: the two substitutions


def encode_tensor(spec: Mapping[str, Any]) -> dict[str, Any]:
    """A `$tensor` request spec as a proto3 JSON Tensor."""
    if "data_base64" in spec:
        data = str(spec["data_base64"])
    else:
        values = np.asarray(spec["values"], dtype=NUMPY_DTYPES[spec["dtype"]])
        data = base64.b64encode(values.tobytes()).decode()
    return {"dtype": spec["dtype"], "shape": [str(d) for d in spec["shape"]], "data": data}


def substitute(value: Any, files: Mapping[str, str]) -> Any:
    if isinstance(value, dict):
        if "$tensor" in value:
            return encode_tensor(value["$tensor"])
        if "$text_file" in value:
            return files[value["$text_file"]]
        return {key: substitute(item, files) for key, item in value.items()}
    if isinstance(value, list):
        return [substitute(item, files) for item in value]
    return value


# ---- replies: the matcher


def decode_tensor_values(tensor: Mapping[str, Any]) -> np.ndarray[Any, Any]:
    data = base64.b64decode(tensor.get("data", ""))
    dtype = tensor.get("dtype", "DTYPE_UNSPECIFIED")
    if dtype == "DTYPE_BFLOAT16":  # the top 16 bits of a float32
        halves = np.frombuffer(data, dtype="<u2").astype(np.uint32)
        return (halves << 16).view(np.float32)
    return np.frombuffer(data, dtype=NUMPY_DTYPES[dtype])


def match_tensor(expected: Mapping[str, Any], actual: Any, where: str) -> None:
    if not isinstance(actual, dict):
        raise Mismatch(f"{where}: expected a Tensor, got {actual!r}")
    for key in ("dtype", "shape"):
        if key in expected:
            match(expected[key], actual.get(key), f"{where}.{key}")
    data = base64.b64decode(actual.get("data", ""))
    if "sha256" in expected and hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise Mismatch(f"{where}: data's sha256 is {hashlib.sha256(data).hexdigest()}")
    if "byte_length" in expected and len(data) != expected["byte_length"]:
        raise Mismatch(f"{where}: {len(data)} bytes, expected {expected['byte_length']}")
    if "values" in expected:
        got = decode_tensor_values(actual)
        want = np.asarray(expected["values"], dtype=np.float64).ravel()
        if got.shape != want.shape:
            raise Mismatch(f"{where}: {got.size} values, expected {want.size}")
        atol = float(expected.get("atol", 0.0))
        diff = np.abs(got.astype(np.float64) - want)
        if not np.all(diff <= atol):
            worst = int(np.argmax(diff))
            raise Mismatch(f"{where}: value {worst} is {got[worst]}, expected {want[worst]} (atol {atol})")


def match(expected: Any, actual: Any, where: str = "reply") -> None:
    """Raises Mismatch unless `actual` (proto3 JSON) matches `expected` as README.md defines."""
    if isinstance(expected, dict):
        if "$tensor" in expected:
            match_tensor(expected["$tensor"], actual, where)
        elif "$contains" in expected:
            if not isinstance(actual, str) or expected["$contains"] not in actual:
                raise Mismatch(f"{where}: {actual!r} does not contain {expected['$contains']!r}")
        elif "$approx" in expected:
            if not isinstance(actual, int | float) or not math.isclose(
                actual, expected["$approx"], rel_tol=0, abs_tol=float(expected.get("atol", 0.0))
            ):
                atol = expected.get("atol")
                raise Mismatch(f"{where}: {actual!r} is not within {atol} of {expected['$approx']}")
        else:
            if not isinstance(actual, dict):
                raise Mismatch(f"{where}: expected an object, got {actual!r}")
            for key, value in expected.items():
                if key in actual:
                    match(value, actual[key], f"{where}.{key}")
                elif not is_default(value):
                    raise Mismatch(f"{where}.{key} is missing, expected {value!r}")
    elif isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            raise Mismatch(f"{where}: expected {len(expected)} items, got {actual!r}")
        for index, (want, got) in enumerate(zip(expected, actual, strict=True)):
            match(want, got, f"{where}[{index}]")
    elif expected != actual:
        raise Mismatch(f"{where}: {actual!r}, expected {expected!r}")


def is_default(value: Any) -> bool:
    if isinstance(value, str) and value.endswith("_UNSPECIFIED"):
        return True
    return any(type(value) is type(default) and value == default for default in PROTO3_DEFAULTS)


# ---- calls


class Connection:
    """One channel per target, and the generic calls the cases make through it."""

    def __init__(self, target: str, *, api_key: str | None, tls_ca: Path | None) -> None:
        options = [("grpc.max_receive_message_length", 256 << 20)]
        if tls_ca is None:
            self.channel = grpc.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(tls_ca.read_bytes())
            self.channel = grpc.secure_channel(target, credentials, options=options)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def close(self) -> None:
        self.channel.close()

    def call(self, method: str, kind: str, requests: Sequence[Message]) -> list[Message]:
        _, reply_type = message_types(method)
        path = "/" + method
        codec: dict[str, Any] = {
            "request_serializer": lambda message: message.SerializeToString(),
            "response_deserializer": reply_type.FromString,
        }
        timeout = CALL_TIMEOUT_S
        if kind == "unary":
            call = self.channel.unary_unary(path, **codec)
            return [call(requests[0], timeout=timeout, metadata=self.metadata)]
        if kind == "server_stream":
            stream = self.channel.unary_stream(path, **codec)
            return list(stream(requests[0], timeout=timeout, metadata=self.metadata))
        if kind == "bidi_stream":
            bidi = self.channel.stream_stream(path, **codec)
            return list(bidi(iter(requests), timeout=timeout, metadata=self.metadata))
        raise ValueError(f"unknown kind {kind!r}")

    def wait_serving(self, service: str, timeout: float = READY_TIMEOUT_S) -> None:
        """Polls grpc.health.v1 until `service` is SERVING (the word vectors load after the start)."""
        deadline = time.monotonic() + timeout
        check = self.channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        while True:
            try:
                reply = check(health_pb2.HealthCheckRequest(service=service), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{service or 'the server'} is not SERVING after {timeout:.0f} s")
            time.sleep(0.25)


def message_types(method: str) -> tuple[type[Message], type[Message]]:
    """The request and reply classes of `package.Service/Method`, from the generated descriptors."""
    service, name = method.split("/")
    descriptor = descriptor_pool.Default().FindMethodByName(f"{service}.{name}")
    return (
        message_factory.GetMessageClass(descriptor.input_type),
        message_factory.GetMessageClass(descriptor.output_type),
    )


def to_json(message: Message) -> dict[str, Any]:
    converted: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return converted


def error_infos(error: grpc.RpcError) -> list[dict[str, Any]]:
    """The google.rpc.ErrorInfo details a refusal carries (none without grpc-status-details-bin)."""
    call: Any = error  # a failed call's RpcError is also its grpc.Call
    infos: list[dict[str, Any]] = []
    key: str
    value: Any
    for key, value in call.trailing_metadata() or ():
        if key != DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                infos.append(to_json(info))
    return infos


def check_case(case: Mapping[str, Any], connection: Connection, files: Mapping[str, str]) -> None:
    request_type, _ = message_types(case["method"])
    raw = case["requests"] if case["kind"] == "bidi_stream" else [case["request"]]
    try:
        requests = [json_format.ParseDict(substitute(item, files), request_type()) for item in raw]
    except json_format.ParseError as error:  # a field or enum name the protos lack: this case fails
        raise Mismatch(f"the request does not fit the protos: {error}") from None
    try:
        replies = connection.call(case["method"], case["kind"], requests)
    except grpc.RpcError as error:
        if "status" not in case:
            raise Mismatch(f"failed with {error.code().name}: {error.details()}") from None
        check_status(case, error)
        return
    if "status" in case:
        raise Mismatch(f"ended OK, expected {case['status']['code']}")
    check_replies(case, [to_json(reply) for reply in replies], replies)


def check_status(case: Mapping[str, Any], error: grpc.RpcError) -> None:
    expected = case["status"]
    code, details = error.code().name, error.details() or ""
    if code != expected["code"]:
        raise Mismatch(f"status {code} ({details!r}), expected {expected['code']}")
    for fragment in expected.get("message_contains", []):
        if fragment not in details:
            raise Mismatch(f"status message {details!r} lacks {fragment!r}")
    if "error_info" in case:
        infos = error_infos(error)
        if not infos:
            raise Mismatch("the status carries no google.rpc.ErrorInfo")
        match(case["error_info"], infos[0], "error_info")


def check_replies(case: Mapping[str, Any], replies: list[dict[str, Any]], messages: list[Message]) -> None:
    if "expect" in case:
        match(case["expect"], replies[0])
    if "response_count" in case and len(replies) != case["response_count"]:
        raise Mismatch(f"{len(replies)} replies, expected {case['response_count']}")
    expected_replies = case.get("responses", [])
    if len(replies) < len(expected_replies):
        raise Mismatch(f"{len(replies)} replies, expected at least {len(expected_replies)}")
    for index, expected in enumerate(expected_replies):
        match(expected, replies[index], f"reply[{index}]")
    if "stream_digest" in case:
        digest = hashlib.sha256()
        field = case["stream_digest"]["field"]
        for message in messages:
            digest.update(getattr(message, field).data)
        if digest.hexdigest() != case["stream_digest"]["sha256"]:
            raise Mismatch(f"the stream's {field} digest is {digest.hexdigest()}")


def run_cases(
    targets: Mapping[str, str],
    *,
    verdict: Path | None = None,
    api_key: str | None = None,
    tls_ca: Path | None = None,
    cases_path: Path = CASES_PATH,
) -> list[CaseResult]:
    """Runs every case against the named servers; a case whose server has no target is skipped."""
    return list(iter_results(targets, verdict=verdict, api_key=api_key, tls_ca=tls_ca, cases_path=cases_path))


def iter_results(
    targets: Mapping[str, str],
    *,
    verdict: Path | None,
    api_key: str | None,
    tls_ca: Path | None,
    cases_path: Path,
) -> Iterator[CaseResult]:
    suite = load_cases(cases_path)
    files = {"the-verdict": verdict.read_text(encoding="utf-8")} if verdict is not None else {}
    connections = {
        name: Connection(target, api_key=api_key, tls_ca=tls_ca) for name, target in targets.items()
    }
    try:
        for ready in suite.get("ready", []):
            if ready["server"] in connections:
                connections[ready["server"]].wait_serving(ready["service"])
        for case in suite["cases"]:
            connection = connections.get(case["server"])
            if connection is None:
                yield CaseResult(case["name"], "skipped", f"no target for server {case['server']!r}")
                continue
            absent = [name for name in case.get("requires", []) if name not in files]
            if absent:
                yield CaseResult(case["name"], "skipped", f"needs {', '.join(absent)}")
                continue
            try:
                check_case(case, connection, files)
            except Mismatch as mismatch:
                yield CaseResult(case["name"], "failed", str(mismatch))
            else:
                yield CaseResult(case["name"], "passed")
    finally:
        for connection in connections.values():
            connection.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", action="append", default=[], metavar="NAME=HOST:PORT", required=True)
    parser.add_argument("--verdict", type=Path, help="the-verdict.txt, for the cases that need it")
    parser.add_argument("--api-key", help="sent as authorization: Bearer KEY")
    parser.add_argument("--tls-ca", type=Path, help="connect with TLS, trusting this CA certificate")
    parser.add_argument("--cases", type=Path, default=CASES_PATH)
    args = parser.parse_args(argv)
    targets = dict(item.split("=", 1) for item in args.target)
    failed = False
    for result in iter_results(
        targets, verdict=args.verdict, api_key=args.api_key, tls_ca=args.tls_ca, cases_path=args.cases
    ):
        print(result.to_json(), flush=True)
        failed |= result.outcome == "failed"
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
