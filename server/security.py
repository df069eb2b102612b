"""Transport security: TLS / mutual TLS credentials, API keys, and refusing to listen exposed."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from .config import ServerConfig, env_name
from .core import NotPermitted, StartupError

# Health checks stay open: load balancers and orchestrators probe without keys.
_EXEMPT_PREFIXES = ("/grpc.health.v1.Health/",)


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_same_host(peer: str) -> bool:
    """Whether a gRPC peer ("ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:...") is on this host."""
    kind, _, address = peer.partition(":")
    if kind == "unix":
        return True
    if kind not in ("ipv4", "ipv6"):
        return False
    host = address.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def check_same_host(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """NotPermitted unless the call comes from this host (a loopback address or a Unix socket):
    shared memory is for same-host clients only. The refusal says nothing about the server's files."""
    if not is_same_host(context.peer()):
        raise NotPermitted("shared memory is for clients on the server's own host (loopback, Unix socket)")


def check_exposure(config: ServerConfig) -> None:
    """StartupError for TLS flags that do not pair up, or an exposed address with no protection."""
    if (config.tls_cert is None) != (config.tls_key is None):
        raise StartupError("--tls-cert and --tls-key go together")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise StartupError("--tls-client-ca (mutual TLS) needs --tls-cert and --tls-key")
    if any(not key or key.strip() != key for key in config.api_keys):
        raise StartupError("an API key is empty or has surrounding spaces")
    exposed = not _is_loopback(config.host)
    if exposed and config.tls_cert is None and not config.api_keys and not config.insecure:
        # Containers are configured by environment, not flags: name both.
        raise StartupError(
            f"--host {config.host} is reachable from other machines: give --tls-cert/--tls-key "
            f"({env_name('tls_cert')}/{env_name('tls_key')}) or --api-key ({env_name('api_keys')}), "
            f"or --insecure ({env_name('insecure')}=1) to serve it unprotected anyway"
        )
    check_metrics_exposure(config)


def check_metrics_exposure(config: ServerConfig) -> None:
    """StartupError for a metrics token that cannot be sent as is, or a metrics listener beyond
    loopback that asks for no token. The metrics credential is its own: API keys are not accepted
    there, and the token is no API key."""
    token = config.metrics_token
    if token is not None and (not token or token.strip() != token):
        raise StartupError("the metrics token is empty or has surrounding spaces")
    if not config.metrics_port or _is_loopback(config.metrics_host):
        return
    if token is None and not config.insecure:
        raise StartupError(
            f"--metrics-host {config.metrics_host} is reachable from other machines: give --metrics-token "
            f"({env_name('metrics_token')}), or --insecure ({env_name('insecure')}=1) to serve the metrics "
            "unprotected anyway"
        )


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    try:
        chain = config.tls_cert.read_bytes()
        key = config.tls_key.read_bytes()
        client_ca = config.tls_client_ca.read_bytes() if config.tls_client_ca is not None else None
    except OSError as error:
        raise StartupError(f"cannot read a TLS file: {error}") from None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _refusal(handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as `handler` that refuses the call as UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "missing or unknown API key (authorization: Bearer KEY)"
        )

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await refuse(request, context)
        yield  # pragma: no cover - never reached; makes this an async generator

    kinds: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    streaming = (handler.request_streaming, handler.response_streaming)
    return kinds[streaming](
        refuse_stream if handler.response_streaming else refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    _ServerInterceptor = grpc.aio.ServerInterceptor


class ApiKeyInterceptor(_ServerInterceptor):
    """Lets through calls whose `authorization` is `Bearer <one of the keys>` (compared in constant time)."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [key.encode() for key in keys]

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        for name, value in metadata or ():
            if name == "authorization":
                raw = value if isinstance(value, bytes) else value.encode()
                if not raw.startswith(b"Bearer "):
                    return False
                offered = raw[len(b"Bearer ") :]
                matched = False
                for key in self._keys:  # every key is compared: the time says nothing about which
                    matched |= hmac.compare_digest(offered, key)
                return matched
        return False

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method or ""
        if handler is None or method.startswith(_EXEMPT_PREFIXES):
            return handler
        if self._authorized(handler_call_details.invocation_metadata):
            return handler
        return _refusal(handler)
