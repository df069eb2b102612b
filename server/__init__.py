"""The embedserve gRPC server.

    from embedserve.server import ServerConfig, load_components, build_server

`build_server(config)` returns an EmbedServer: the grpc.aio server with every
service registered, its bound port, and the health, metrics and draining it owns;
`serve(config)` runs one until a signal.
The names load lazily so that the CLI's client commands start without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import ServerConfig, parse_server_config

if TYPE_CHECKING:
    from .app import Components, EmbedServer, build_server, load_components, serve

__all__ = [
    "Components",
    "EmbedServer",
    "ServerConfig",
    "build_server",
    "load_components",
    "parse_server_config",
    "serve",
]


def __getattr__(name: str) -> Any:
    if name in {"Components", "EmbedServer", "build_server", "load_components", "serve"}:
        return getattr(importlib.import_module(".app", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
