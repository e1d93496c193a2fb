#!/usr/bin/env bash
# fedvault set-up: a virtual environment in .venv with the right PyTorch build and fedvault.
#
#   ./setup.sh                 # CPU-only machine: CPU build of torch; GPU machine: CUDA build
#   FEDVAULT_TORCH=cuda ./setup.sh   # force the CUDA build (e.g. building an image without a GPU)
#   FEDVAULT_TORCH=cpu  ./setup.sh   # force the CPU build
#   FEDVAULT_EXTRAS="" ./setup.sh    # runtime only (a partner site): no test/lint tools
#
# Why: a plain `pip install torch` on Linux pulls several GB of CUDA libraries even on
# machines without a GPU. Here the CPU build comes from a local wheel when pip's find-links
# has one, else from PyTorch's CPU index; a GPU machine gets PyPI's CUDA build.
# Set-up needs network access to the package registries; fedvault itself never downloads.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${FEDVAULT_TORCH_VERSION:-2.13.0}
EXTRAS=${FEDVAULT_EXTRAS-dev}
VENV=${FEDVAULT_VENV:-.venv}

"$PYTHON" - <<'PY' || { echo "fedvault needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

mode=${FEDVAULT_TORCH:-auto}
if [ "$mode" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then mode=cuda; else mode=cpu; fi
fi

if "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "setup: torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed"
elif [ "$mode" = cuda ]; then
  echo "setup: GPU machine: installing the CUDA build of torch $TORCH_VERSION"
  pip install -q "torch==$TORCH_VERSION"
else
  echo "setup: CPU-only machine: installing the CPU build of torch $TORCH_VERSION"
  # A local CPU wheel (pip find-links) is taken directly; PyPI has no "+cpu" build, so on
  # other machines this fails fast and PyTorch's own CPU index is asked instead.
  pip install -q "torch==$TORCH_VERSION+cpu" 2>/dev/null \
    || pip install -q "torch==$TORCH_VERSION+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi

if [ -n "$EXTRAS" ]; then target=".[$EXTRAS]"; else target="."; fi
echo "setup: installing fedvault ($target) and its dependencies"
pip install -q -e "$target"
"$VENV/bin/fedvault" --help >/dev/null
echo "setup: done. Activate with: . $VENV/bin/activate"
