#!/usr/bin/env bash
# The GPU checks in one command, for a lent GPU machine (one H100/H200, offline image): at most
# 8 minutes (DEVICE_CHECK_BUDGET_S, 450 s by default; steps are in order of importance and those
# the budget no longer covers are skipped). Logs go to $OUT (the device tool's output folder) or
# ./device_out.
#
#   bash scripts/device_check.sh
#
# 1. set-up on the offline image: scripts/setup.sh must succeed without a registry;
# 2. llama-recipes' default dataset (samsum from the hub) without `datasets`: a clean error;
# 3. the GPU tests (pytest -m gpu): NCCL + CPU offload with clipping/fp16/export, bf16/fp16 and
#    the attention-kernel choice, packed per-document attention with SDPA and flash-attn, a tiny
#    Llama 3.2 Vision in pure bf16 under NCCL with its export reloaded;
# 4. the throughput benchmark on a ~1B Llama in bf16, one GPU, padded and packed, eager and
#    with --compile (scenario throughput.gpu);
# 5. the peer benchmark: shardtune beside HF Trainer, TRL's SFTTrainer and torchtune on the same
#    1.2B Llama-3.2-1B-shaped model, batches, optimizer and steps (bf16), padded and packed, one
#    table in peers.log and $OUT/peers.json (scenario peers.gpu); its venv (.bench-venv/peers,
#    layered on .venv so the image's CUDA torch is shared) is installed from the package registry
#    first (peers_setup).
# Each step's exit code is printed in the summary at the end; the script exits non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-device_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
declare -A status

# The whole script stays under 8 minutes (the device tool allows 10 per command): each step gets
# its own limit or what is left of the budget, whichever is less; a step the budget no longer
# covers is reported as skipped, so the summary always says what ran (a skipped step counts as not
# passed: the script exits non-zero).
BUDGET_S=${DEVICE_CHECK_BUDGET_S:-450}  # + up to 15 s for a killed step's grace, + the summary

step() {  # step NAME TIMEOUT_S CMD...: run, log to $OUT/NAME.log, record the exit code
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET_S - SECONDS))
  if (( left < 30 )); then
    status[$name]="skipped (budget of ${BUDGET_S} s spent)"
    echo "=== $name: skipped, ${left} s of the budget left" | tee "$OUT/$name.log"
    return
  fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit} s): $*" | tee "$OUT/$name.log"
  local t0=$SECONDS
  timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"  # -k: a step that ignores SIGTERM is killed
  status[$name]="${PIPESTATUS[0]} ($((SECONDS - t0)) s)"
}

{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 --version; } \
  > "$OUT/machine.log" 2>&1

step setup 240 bash scripts/setup.sh
PY=.venv/bin/python
$PY -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'peft', peft.__version__, 'gpu', torch.cuda.get_device_name())" \
  >> "$OUT/machine.log" 2>&1

default_dataset_check() {
  local tiny
  tiny=$(mktemp -d)
  $PY -c "from shardtune.demo.tiny import build_tiny_llama; build_tiny_llama('$tiny')" >/dev/null 2>&1 || return 3
  if $PY -c "import datasets" 2>/dev/null; then echo "datasets is installed here: nothing to check"; return 0; fi
  local err code
  err=$(.venv/bin/shardtune finetune --nproc_per_node 2 --enable_fsdp --model_name "$tiny" 2>&1); code=$?
  echo "$err"
  [ "$code" = 2 ] && grep -q "needs the \`datasets\` package" <<<"$err" && ! grep -q Traceback <<<"$err"
}
export -f default_dataset_check; export PY
step default_dataset 120 bash -c default_dataset_check

step gpu_tests 300 $PY -m pytest -m gpu -n 0 -p no:cacheprovider -rs tests  # one process: one GPU

# The declared scenarios of benchmarks/scenarios.py (`python -m benchmarks list` prints their flags).
step throughput 300 $PY -m benchmarks run throughput.gpu

step peers_setup 240 $PY -m benchmarks run peers.setup
step peers 360 $PY -m benchmarks run peers.gpu --workdir "$OUT/peers_work" --out "$OUT/peers.json"
rm -rf "$OUT/peers_work"/llama_* "$OUT/peers_work"/*_out  # keep the logs and plans, not the 2.5 GB model

echo "=== summary (exit code, seconds)" | tee "$OUT/summary.log"
failed=0
for name in setup default_dataset gpu_tests throughput peers_setup peers; do
  echo "$name: ${status[$name]:-not run}" | tee -a "$OUT/summary.log"
  [[ "${status[$name]:-1}" == 0* ]] || failed=1
done
exit $failed
