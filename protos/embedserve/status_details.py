"""The machine-readable detail of a refusal, shared by the server and the client.

A refusal a client must act on carries a google.rpc.Status in the `grpc-status-details-bin`
trailer, holding a google.rpc.ErrorInfo (the pattern of grpc's `examples/python/errors`). The
reasons sent: LIMIT_EXCEEDED, with the limit's name, its value and what was asked for;
NOT_IN_VOCABULARY, followed by a google.rpc.ResourceInfo per missing word; SOURCE_CHANGED, for
a stream cursor whose corpus has changed since it was made (metadata: cursor_source, source);
and, for a server too busy right now, MEMORY_BUDGET or QUEUE_FULL, followed by a
google.rpc.RetryInfo (the same delay also travels as gRPC's `grpc-retry-pushback-ms`, which
gRPC's own retries honour).
docs/protocol.md documents it for clients in other languages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"
DOMAIN = "embedserve.v1"
LIMIT_EXCEEDED = "LIMIT_EXCEEDED"
NOT_IN_VOCABULARY = "NOT_IN_VOCABULARY"
# gRPC's retry pushback (gRFC A6): a server's hint, in milliseconds, that its clients' retry honours.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"


@dataclass(frozen=True)
class LimitInfo:
    """Which server limit a request went over: `limit` is the config name (max_terms_per_request),
    `flag` its command-line flag, `allowed` its value, `requested` what was asked (None: unknown)."""

    limit: str
    allowed: int
    requested: int | None = None

    @property
    def flag(self) -> str:
        return "--" + self.limit.replace("_", "-")


def _status(code: int, message: str, details: Iterable[Any]) -> bytes:
    packed = []
    for detail in details:
        wrapped = any_pb2.Any()
        wrapped.Pack(detail)
        packed.append(wrapped)
    return bytes(status_pb2.Status(code=code, message=message, details=packed).SerializeToString())


def limit_exceeded_status(code: int, message: str, info: LimitInfo) -> bytes:
    """The serialized google.rpc.Status for a LIMIT_EXCEEDED refusal (code: the numeric status)."""
    metadata = {"limit": info.limit, "flag": info.flag, "allowed": str(info.allowed)}
    if info.requested is not None:
        metadata["requested"] = str(info.requested)
    return _status(
        code, message, [error_details_pb2.ErrorInfo(reason=LIMIT_EXCEEDED, domain=DOMAIN, metadata=metadata)]
    )


def error_info_status(code: int, message: str, reason: str, metadata: Mapping[str, str]) -> bytes:
    """A refusal named by `reason` alone (SOURCE_CHANGED...), with its metadata."""
    return _status(
        code, message, [error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata))]
    )


def not_in_vocabulary_status(code: int, message: str, words: Sequence[str]) -> bytes:
    """NOT_IN_VOCABULARY: an ErrorInfo (metadata["count"]: how many words), then one
    google.rpc.ResourceInfo per missing word (resource_type "word", resource_name the word)."""
    info = error_details_pb2.ErrorInfo(
        reason=NOT_IN_VOCABULARY, domain=DOMAIN, metadata={"count": str(len(words))}
    )
    resources = [error_details_pb2.ResourceInfo(resource_type="word", resource_name=word) for word in words]
    return _status(code, message, [info, *resources])


def overloaded_trailers(
    code: int, message: str, reason: str, retry_after: float | None, metadata: Mapping[str, str]
) -> tuple[tuple[str, str | bytes], ...]:
    """The trailing metadata of a refusal by a server too busy right now: an ErrorInfo with
    `reason` and `metadata`, a RetryInfo when `retry_after` (seconds) is known, and the pushback."""
    details: list[Any] = [error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=dict(metadata))]
    if retry_after is None:
        return ((DETAILS_KEY, _status(code, message, details)),)
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(max(1, round(retry_after * 1000)))
    details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    return (
        (DETAILS_KEY, _status(code, message, details)),
        (RETRY_PUSHBACK_KEY, str(max(1, round(retry_after * 1000)))),
    )


def retry_delay_from_trailers(trailers: Iterable[Any] | None) -> float | None:
    """Seconds a refusal's RetryInfo asks the client to wait, or None (no such detail)."""
    status = _details_status(trailers)
    if status is None:
        return None
    for detail in status.details:
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return max(0.0, float(retry.retry_delay.ToMilliseconds()) / 1000)
    return None


def _details_status(trailers: Iterable[Any] | None) -> status_pb2.Status | None:
    """The google.rpc.Status of a refusal's trailing metadata, or None (absent or damaged)."""
    for key, value in trailers or ():
        if key != DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # a damaged trailer is no detail, not a second failure
            return None
        return status
    return None


def _our_error_info(status: status_pb2.Status, reason: str) -> error_details_pb2.ErrorInfo | None:
    """The status's ErrorInfo of embedserve's domain with `reason`; others' details are skipped."""
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN and info.reason == reason:
            return info
    return None


def reason_from_trailers(trailers: Iterable[Any] | None) -> str | None:
    """The reason of a refusal's embedserve ErrorInfo (SOURCE_CHANGED, LIMIT_EXCEEDED...), or None."""
    status = _details_status(trailers)
    if status is None:
        return None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == DOMAIN:
            return str(info.reason)
    return None


def missing_words_from_trailers(trailers: Iterable[Any] | None) -> list[str] | None:
    """The words a NOT_IN_VOCABULARY refusal lists, or None (another error, or no detail)."""
    status = _details_status(trailers)
    if status is None or _our_error_info(status, NOT_IN_VOCABULARY) is None:
        return None
    words = []
    for detail in status.details:
        resource = error_details_pb2.ResourceInfo()
        if detail.Unpack(resource) and resource.resource_type == "word":
            words.append(resource.resource_name)
    return words


def limit_from_trailers(trailers: Iterable[Any] | None) -> LimitInfo | None:
    """The LimitInfo a refusal's trailing metadata carries, or None (another error, or no detail)."""
    status = _details_status(trailers)
    info = None if status is None else _our_error_info(status, LIMIT_EXCEEDED)
    if info is None:
        return None
    try:
        allowed = int(info.metadata["allowed"])
        requested = int(info.metadata["requested"]) if "requested" in info.metadata else None
    except (KeyError, ValueError):
        return None
    return LimitInfo(info.metadata.get("limit", ""), allowed, requested)
