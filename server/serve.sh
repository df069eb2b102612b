#!/usr/bin/env bash
# From a clean clone: installs the server into .venv on first run, then runs
# `embedserve serve` with any flags given (default: 127.0.0.1:50051, the
# embedded GPT-2 tokenizer and seeded 50257 x 256 / 1024 x 256 tables).
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/bootstrap server
exec .venv/bin/embedserve serve "$@"
