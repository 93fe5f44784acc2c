#!/usr/bin/env bash
# Create .venv and install shardtune with its test tools. Safe to run again: it only
# reinstalls when pyproject.toml changed.
#
# Two cases:
# - $PYTHON already has torch (a GPU image, a conda env with a CUDA build): .venv is layered on
#   that environment (a .pth file puts its site-packages after .venv's own), so its torch and
#   every other package it has are used as they are, and nothing already satisfied is
#   downloaded. The install is tried with --no-index first, so it works on a machine without a
#   package registry when everything shardtune needs is there (the optional `datasets`,
#   `bitsandbytes`, `lm_eval`, `tensorboard` and `wandb` too, if present: they are only needed for
#   hub datasets, QLoRA, `shardtune eval --tasks` and the two loggers).
# - otherwise: a plain .venv; a machine with an NVIDIA GPU gets pip's default (CUDA) torch, one
#   without gets torch==$SHARDTUNE_TORCH_VERSION, from $TORCH_INDEX_URL when set (for example
#   PyTorch's CPU wheel index) so that pip does not download a multi-GB CUDA build it cannot use.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${SHARDTUNE_TORCH_VERSION:-2.13.0}

if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    # --without-pip: no ensurepip needed; the parent environment's pip serves .venv.
    "$PYTHON" -m venv --without-pip .venv
    site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    "$PYTHON" -c "import site, sys; print('\n'.join(p for p in site.getsitepackages() + [site.getusersitepackages()] if p))" \
      > "$site/_shardtune_parent_env.pth"
    echo "layered .venv on $("$PYTHON" -c 'import sys; print(sys.prefix)') (keeps its torch)"
  else
    "$PYTHON" -m venv .venv
  fi
fi
. .venv/bin/activate
stamp=.venv/.shardtune-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && python -c "import shardtune, pytest" 2>/dev/null; then
  exit 0
fi

offline_install() {  # succeeds only when every requirement is already installed
  python -m pip install -q --no-index --no-build-isolation -e ".[$1]" >/dev/null 2>&1
}
link_source() {
  # No registry and no usable build backend here (setuptools older than pyproject asks for):
  # put src/ on .venv's path and write the console script, which is what an editable install
  # does, once everything shardtune imports is known to be installed.
  python -c "import torch, transformers, peft, safetensors, tokenizers, yaml, tqdm, matplotlib, psutil, accelerate, pyarrow, pytest" || return 1
  site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  echo "$PWD/src" > "$site/_shardtune_src.pth"
  printf '#!%s\nimport sys\nfrom shardtune.cli import main\nsys.exit(main())\n' "$PWD/.venv/bin/python" > .venv/bin/shardtune
  chmod +x .venv/bin/shardtune
  echo "linked src/ into .venv (offline, no build backend)"
}

if python -c "import torch" 2>/dev/null && { offline_install dev || link_source; }; then
  offline_install dev,hub || python -c "import datasets" 2>/dev/null ||
    echo "note: 'datasets' is not installed (only needed for hub datasets: pip install 'shardtune[hub]')"
  offline_install dev,qlora || python -c "import bitsandbytes" 2>/dev/null ||
    echo "note: 'bitsandbytes' is not installed (only needed for --quantization: pip install 'shardtune[qlora]')"
  offline_install dev,eval || python -c "import lm_eval" 2>/dev/null ||
    echo "note: 'lm_eval' is not installed (only needed for shardtune eval --tasks: pip install 'shardtune[eval]')"
  offline_install dev,tensorboard || python -c "import tensorboard" 2>/dev/null ||
    echo "note: 'tensorboard' is not installed (only needed for --use_tensorboard: pip install 'shardtune[tensorboard]')"
  offline_install dev,wandb || python -c "import wandb" 2>/dev/null ||
    echo "note: 'wandb' is not installed (only needed for --use_wandb: pip install 'shardtune[wandb]')"
else
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
  python -m pip install -q -e ".[dev,hub,qlora,eval,tensorboard,wandb]"
fi
echo "$want" > "$stamp"
echo "shardtune installed in .venv ($(python -c 'import torch; print("torch", torch.__version__)'))"
