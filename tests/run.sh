#!/usr/bin/env bash
# The whole check, from a clean clone: installs into .venv on first run, then
# lints (ruff, hadolint), type-checks (mypy) and runs the test suite (pytest).
# Extra arguments go to pytest, e.g. `bash tests/run.sh -k embed -x`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/bootstrap dev
bin=.venv/bin

"$bin/ruff" check .
"$bin/ruff" format --check .

# mypy cannot follow setuptools' editable-install finder, so it checks a tree
# of links laid out as the installed package is.
stage=.typecheck/embedserve
mkdir -p "$stage"
for path in protos/embedserve/*; do  # the package root's modules, py.typed and v1
  ln -sfn "../../$path" "$stage/$(basename "$path")"
done
ln -sfn ../../server "$stage/server"
ln -sfn ../../client "$stage/client"
MYPYPATH=.typecheck "$bin/mypy" -p embedserve
MYPYPATH=.typecheck "$bin/mypy" tests protos/generate.py bench/word_vectors.py bench/window_plans.py bench/serving.py bench/device_thread.py bench/hostile.py bench/object_storage.py bench/prepare.py bench/prepare_ray.py docs/examples

if [ "${CI:-}" = true ]; then
  # In CI a missing tool fails its tests instead of skipping them.
  export EMBEDSERVE_REQUIRE_BUF=1 EMBEDSERVE_REQUIRE_NGINX=1 EMBEDSERVE_REQUIRE_NODE=1 \
    EMBEDSERVE_REQUIRE_GRPCURL=1 EMBEDSERVE_REQUIRE_CONTAINER=1 EMBEDSERVE_REQUIRE_CGROUP=1 \
    EMBEDSERVE_REQUIRE_RAY=1
fi
"$bin/python" -m pytest "$@"
