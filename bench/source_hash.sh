#!/bin/bash
# One sha256 over embedserve's sources in this tree (server, client, protos, pyproject.toml): what
# bench/gpu_bundle.sh records and bench/gpu_check.sh compares.
set -euo pipefail
cd "$(dirname "$0")/.."
find server client protos pyproject.toml -type f \( -name '*.py' -o -name '*.pyi' -o -name '*.proto' \
    -o -name '*.toml' -o -name '*.sh' -o -name 'py.typed' \) -not -path '*/__pycache__/*' \
    | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1
