"""Who may import whom: the server never imports the client (both import the shared codec,
embedserve.tensor), and the core imports no gRPC. Read from the source's import statements."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SERVER = REPO / "server"
# `embedserve` the command serves and also calls servers: its client commands use the client SDK.
COMMAND_LINE = SERVER / "cli.py"


def _imported_modules(path: Path) -> list[str]:
    """Every absolute module an import statement of the file names (relative ones resolved)."""
    # server/ is embedserve.server; a module's relative imports start from its package (for an
    # __init__.py, the package itself).
    parts = ["embedserve", *path.relative_to(REPO).with_suffix("").parts[:-1]]
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names += [module] + [f"{module}.{alias.name}" for alias in node.names]
    return names


def _sources(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.py"))


@pytest.mark.parametrize(
    "path", [p for p in _sources(SERVER) if p != COMMAND_LINE], ids=lambda p: str(p.relative_to(REPO))
)
def test_no_server_module_imports_the_client(path: Path) -> None:
    clients = [name for name in _imported_modules(path) if name.split(".")[:2] == ["embedserve", "client"]]
    assert not clients, f"{path.relative_to(REPO)} imports {clients}: use embedserve.tensor"


@pytest.mark.parametrize("path", _sources(SERVER / "core"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_core_imports_no_grpc(path: Path) -> None:
    grpc = [name for name in _imported_modules(path) if name.split(".")[0] in ("grpc", "grpc_health")]
    assert not grpc, f"{path.relative_to(REPO)} imports {grpc}: the core stays transport-free"


def test_the_scan_sees_relative_and_absolute_imports() -> None:
    names = _imported_modules(SERVER / "services.py")
    assert "embedserve.tensor" in names  # absolute
    assert "embedserve.server.core" in names  # from .core import ...
    assert "embedserve.server.core.stream_plan.plan_stream" in names
