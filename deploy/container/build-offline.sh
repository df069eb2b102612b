#!/usr/bin/env bash
# Builds the repository's Dockerfile, unmodified, with podman, on a machine that reaches no
# container registry and no Python index from inside a build:
#   bash deploy/container/build-offline.sh [IMAGE]      # IMAGE defaults to localhost/embedserve:test
# 1. the base python:3.11-slim is made locally from Debian's packages (debootstrap through apt's
#    own mirror) when no image of that name exists;
# 2. the Python packages are downloaded on the host into a wheelhouse, pinned to the versions
#    installed in .venv (the ones the tests ran), again only when those pins change;
# 3. `podman build --network=none` installs from that wheelhouse alone (deploy/container/pip.conf).
# Caches live in build/container/ (EMBEDSERVE_CONTAINER_CACHE moves them); podman's settings come
# from deploy/container/containers.conf unless CONTAINERS_CONF names another file.
# Exit status: 0 built; 2 a tool or .venv is missing; 3 podman cannot run a container here;
# anything else, the build failed.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
image="${1:-localhost/embedserve:test}"
cache="${EMBEDSERVE_CONTAINER_CACHE:-$repo/build/container}"
venv_python="${EMBEDSERVE_PYTHON:-$repo/.venv/bin/python}"
# Debian bookworm's python3 is 3.11; the Dockerfile's FROM becomes python:3.11-slim.
python_version=3.11
base="docker.io/library/python:${python_version}-slim"
base_label=org.embedserve.offline-base
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
export PATH="$PATH:/usr/sbin:/sbin"

say() { echo "build-offline: $*" >&2; }
step_started=$SECONDS
step() { say "$* (at ${SECONDS}s)"; step_started=$SECONDS; }
done_step() { say "  done in $((SECONDS - step_started))s"; }

missing=()
for tool in podman runc debootstrap; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  say "missing: ${missing[*]}; install them with: apt-get install -y podman runc debootstrap"
  exit 2
fi
if [ ! -x "$venv_python" ]; then
  say "$venv_python is missing: run 'bash .ci/bootstrap server' first (its versions pin the image's)"
  exit 2
fi

mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9  # one build at a time per cache

# apt's own Debian mirror (not -security), from deb822 or one-line sources.
debian_mirror() {
  if [ -n "${EMBEDSERVE_DEBIAN_MIRROR:-}" ]; then
    echo "$EMBEDSERVE_DEBIAN_MIRROR"
    return
  fi
  local found
  found="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
    | sed -nE 's/^URIs:[[:space:]]+//p; s/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+).*/\2/p' \
    | tr ' ' '\n' | grep -E '/debian/?$' | head -n 1 || true)"
  echo "${found:-http://deb.debian.org/debian}"
}

# 1. The base image.
if podman image exists "$base"; then
  say "base $base exists"
else
  mirror="$(debian_mirror)"
  step "making $base with debootstrap from $mirror"
  rootfs="$cache/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$rootfs" "$mirror" >"$cache/debootstrap.log" 2>&1 \
    || { tail -n 20 "$cache/debootstrap.log" >&2; exit 1; }
  ln -sfn python3 "$rootfs/usr/bin/python"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar --numeric-owner -C "$rootfs" -c . | podman import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "LABEL $base_label=bookworm" \
    --change 'CMD ["python3"]' \
    - "$base" >/dev/null
  rm -rf "$rootfs"
  done_step
fi
if ! probe="$(podman run --rm --network=none "$base" python3 -c 'print("ok")' 2>&1)" || [ "$probe" != ok ]; then
  say "podman cannot run a container here: podman run --rm --network=none $base python3 -c ... said:"
  echo "$probe" >&2
  exit 3
fi

# 2. The wheelhouse, pinned to .venv's versions; downloaded again only when the pins or the
# project's requirements change.
constraints="$cache/constraints.txt"
"$venv_python" -m pip freeze --all --exclude-editable \
  | grep -E '^[A-Za-z0-9_.-]+==' | grep -viE '^(pip|embedserve)==' >"$constraints.new"
requirements="$(cd "$repo" && "$venv_python" -c '
import json, tomllib
with open("pyproject.toml", "rb") as f:
    data = tomllib.load(f)
print(json.dumps([data["build-system"]["requires"], data["project"]["dependencies"],
                  data["project"]["optional-dependencies"]["server"],
                  data["project"]["optional-dependencies"]["s3"]]))')"
inputs="$(printf '%s\n%s\n' "$requirements" "$(cat "$constraints.new")" | sha256sum | cut -c1-16)"
wheelhouse="$cache/wheelhouse"
if [ "$(cat "$wheelhouse/.inputs" 2>/dev/null || true)" = "$inputs" ]; then
  say "wheelhouse is current ($inputs)"
  rm -f "$constraints.new"
else
  step "downloading the wheelhouse ($inputs)"
  rm -rf "$wheelhouse.new"
  mkdir -p "$wheelhouse.new"
  # The build backend too: `pip install .` inside the build sets up setuptools and wheel from here.
  build_requires="$(cd "$repo" && "$venv_python" -c '
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))')"
  mapfile -t build_requires <<<"$build_requires"
  # `pip wheel`, not `pip download`: a dependency published only as source (future) is built
  # here, so nothing but embedserve itself is built inside the image.
  (cd "$repo" && "$venv_python" -m pip wheel --wheel-dir "$wheelhouse.new" \
    --constraint "$constraints.new" "${build_requires[@]}" ".[server,s3]") >"$cache/wheelhouse.log" 2>&1 \
    || { grep -v '^WARNING: Location' "$cache/wheelhouse.log" | tail -n 20 >&2; exit 1; }
  rm -f "$wheelhouse.new"/embedserve-*.whl  # the image installs the checkout's own source
  mv "$constraints.new" "$wheelhouse.new/constraints.txt"
  echo "$inputs" >"$wheelhouse.new/.inputs"
  rm -rf "$wheelhouse"
  mv "$wheelhouse.new" "$wheelhouse"
  cp "$wheelhouse/constraints.txt" "$constraints"
  say "  $(find "$wheelhouse" -name '*.whl' | wc -l) wheels, $(du -sh "$wheelhouse" | cut -f1)"
  done_step
fi

# 3. The image.
previous="$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
step "building $image"
# --format docker keeps the HEALTHCHECK (the OCI format has no field for it).
podman build --format docker --pull=never --network=none --layers \
  --build-arg "PYTHON_VERSION=$python_version" \
  --volume "$wheelhouse:/wheelhouse:ro" --volume "$here/pip.conf:/etc/pip.conf:ro" \
  --file "$repo/Dockerfile" --tag "$image" "$repo" >"$cache/build.log" 2>&1 \
  || { tail -n 40 "$cache/build.log" >&2; say "the build failed; its log: $cache/build.log"; exit 1; }
done_step
current="$(podman image inspect --format '{{.Id}}' "$image")"
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
  podman rmi "$previous" >/dev/null 2>&1 || true  # the image this one replaced, unless in use
fi
say "built $image ${current:0:12}, $(podman image inspect --format '{{.Size}}' "$image" \
  | awk '{printf "%.2f GB", $1 / 1e9}'), in ${SECONDS}s"
