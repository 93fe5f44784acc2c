#!/usr/bin/env bash
# Create .venv and install shardtune with its test tools. Safe to run again: it only
# reinstalls when pyproject.toml changed.
#
# torch: kept if already importable (GPU users keep their CUDA build). Otherwise a machine
# with an NVIDIA GPU gets the default (CUDA) wheel, and a machine without one gets
# torch==$SHARDTUNE_TORCH_VERSION, from $TORCH_INDEX_URL when set (for example PyTorch's CPU
# wheel index) so that pip does not download a multi-GB CUDA build it cannot use.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${SHARDTUNE_TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.shardtune-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import shardtune, pytest" 2>/dev/null; then
  exit 0
fi
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    python -m pip install -q torch
  elif [ -n "${TORCH_INDEX_URL:-}" ]; then
    python -m pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
  else
    python -m pip install -q "torch==$TORCH_VERSION"
  fi
fi
python -m pip install -q -e ".[dev]"
echo "$want" > "$stamp"
echo "shardtune installed in .venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
