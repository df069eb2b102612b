"""The machine-readable detail of a refusal, shared by the server and the client.

A refusal a client must act on carries a google.rpc.Status in the `grpc-status-details-bin`
trailer, holding a google.rpc.ErrorInfo (the pattern of grpc's `examples/python/errors`). Today
one reason is sent: LIMIT_EXCEEDED, with the limit's name, its value and what was asked for.
docs/protocol.md documents it for clients in other languages.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"
DOMAIN = "embedserve.v1"
LIMIT_EXCEEDED = "LIMIT_EXCEEDED"


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


def limit_exceeded_status(code: int, message: str, info: LimitInfo) -> bytes:
    """The serialized google.rpc.Status for a LIMIT_EXCEEDED refusal (code: the numeric status)."""
    metadata = {"limit": info.limit, "flag": info.flag, "allowed": str(info.allowed)}
    if info.requested is not None:
        metadata["requested"] = str(info.requested)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=LIMIT_EXCEEDED, domain=DOMAIN, metadata=metadata))
    return bytes(status_pb2.Status(code=code, message=message, details=[detail]).SerializeToString())


def limit_from_trailers(trailers: Iterable[Any] | None) -> LimitInfo | None:
    """The LimitInfo a refusal's trailing metadata carries, or None (another error, or no detail)."""
    for key, value in trailers or ():
        if key != DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status()
        try:
            status.ParseFromString(value)
        except Exception:  # a damaged trailer is no detail, not a second failure
            return None
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if not detail.Unpack(info) or info.domain != DOMAIN or info.reason != LIMIT_EXCEEDED:
                continue
            try:
                allowed = int(info.metadata["allowed"])
                requested = int(info.metadata["requested"]) if "requested" in info.metadata else None
            except (KeyError, ValueError):
                return None
            return LimitInfo(info.metadata.get("limit", ""), allowed, requested)
    return None
