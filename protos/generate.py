"""Regenerates the committed Python code for protos/embedserve/v1/*.proto.

    python protos/generate.py            # writes beside the .proto files
    python protos/generate.py --out DIR  # writes into DIR (the drift test uses this)

Needs the pinned grpcio-tools and mypy-protobuf from the `dev` extra.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
PROTO_PACKAGE = Path("embedserve") / "v1"


def _plugin(name: str) -> str:
    beside_python = Path(sys.executable).parent / name
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: install the 'dev' extra (mypy-protobuf)")
    return found


def generate(out_dir: Path) -> list[Path]:
    """Runs protoc over every .proto file and returns the files it wrote."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    include_dir = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include_dir}",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out_dir / PROTO_PACKAGE).glob("*_pb2*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=PROTO_ROOT, help="output root (default: protos/)")
    written = generate(parser.parse_args().out)
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
