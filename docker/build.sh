#!/usr/bin/env bash
# Build fedvault's two images: localhost/fedvault-coordinator:TORCH and localhost/fedvault-site:TORCH.
#
#   docker/build.sh                         # CPU build of PyTorch (tag :cpu)
#   FEDVAULT_TORCH=cuda docker/build.sh     # PyPI's CUDA build of PyTorch (tag :cuda; GBs of wheels)
#   FEDVAULT_BASE=localhost/fedvault-base:bookworm docker/build.sh   # a local base (docker/test.sh)
#
# The wheels (fedvault and every dependency) are gathered on this machine with pip first, into
# docker/wheels/ (not in git); the image build itself then runs with no network.
# FEDVAULT_ENGINE=docker builds with Docker instead of Podman.
set -euo pipefail
cd "$(dirname "$0")"
TORCH=${FEDVAULT_TORCH:-cpu}
TORCH_VERSION=${FEDVAULT_TORCH_VERSION:-2.13.0}
BASE=${FEDVAULT_BASE:-python:3.11-slim-bookworm}
ENGINE=${FEDVAULT_ENGINE:-podman}
PYTHON=${PYTHON:-python3}
fail() { echo "build.sh: $*" >&2; exit 1; }

case "$TORCH" in
  cpu) torch="torch==$TORCH_VERSION+cpu" ;;
  cuda) torch="torch==$TORCH_VERSION" ;;
  *) fail "FEDVAULT_TORCH must be cpu or cuda, got '$TORCH'" ;;
esac
command -v "$ENGINE" > /dev/null || fail "$ENGINE is not installed (docker/test.sh sets up Podman on Debian)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || fail "the wheels must be gathered with Python 3.11, the images' Python (set PYTHON=...)"

echo "build.sh: gathering the wheels for fedvault and $torch in docker/wheels/"
rm -f wheels/fedvault-*.whl  # always this checkout's fedvault
args=()
[ "$TORCH" = cpu ] && args=(--extra-index-url https://download.pytorch.org/whl/cpu)
# A local CPU wheel (pip's find-links) is taken first; PyTorch's CPU index otherwise.
wheel() {  # pip wheel, without the warnings about absent local index folders
  "$PYTHON" -m pip wheel -q --disable-pip-version-check -w wheels "$@" "$torch" .. \
    2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
}
wheel || wheel "${args[@]}" || fail "pip could not gather the wheels (see above)"

hash_of() { sha256sum -- "$@" | cut -d' ' -f1 | sha256sum | cut -c1-16; }
dependencies=$(cd wheels && hash_of $(ls -- *.whl | grep -v '^fedvault-'))
fedvault=$(cd wheels && hash_of fedvault-*.whl)
format=()  # Podman writes OCI images by default, which drop HEALTHCHECK
[ "$ENGINE" = podman ] && format=(--format docker)
for role in coordinator site; do
  echo "build.sh: building localhost/fedvault-$role:$TORCH from $BASE"
  previous=$("$ENGINE" image inspect --format '{{.Id}}' "localhost/fedvault-$role:$TORCH" 2> /dev/null || true)
  "$ENGINE" build -q --network none "${format[@]}" --target "$role" \
    --build-arg BASE="$BASE" --build-arg TORCH="$TORCH" --build-arg TORCH_VERSION="$TORCH_VERSION" \
    --build-arg DEPENDENCIES="$dependencies" --build-arg FEDVAULT="$fedvault" \
    --tag "localhost/fedvault-$role:$TORCH" --file Dockerfile . > /dev/null \
    || fail "building the $role image failed (see above)"
  current=$("$ENGINE" image inspect --format '{{.Id}}' "localhost/fedvault-$role:$TORCH")
  if [ -n "$previous" ] && [ "$previous" != "$current" ]; then  # the build it replaces
    "$ENGINE" rmi "$previous" > /dev/null 2>&1 || true  # kept while a container uses it
  fi
done
echo "build.sh: built localhost/fedvault-coordinator:$TORCH and localhost/fedvault-site:$TORCH"
