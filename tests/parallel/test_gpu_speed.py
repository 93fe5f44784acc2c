"""Speed and memory options on a CUDA GPU (NCCL, one rank under FSDP), run as a user runs them:
activation offloading (GPU only), the chunked loss, the fused AdamW and --compile with Triton.

Marked ``gpu``: skipped without a GPU, run by ``scripts/device_check.sh`` (``pytest -m gpu``).
fp32 compute (``--mixed_precision false``), so the runs compare at fp32 tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _losses(tmp_path, model_dir, name: str, *flags: str) -> tuple[list[float], str]:
    data = tmp_path / "alpaca.json"
    if not data.exists():
        data.write_text(json.dumps([{"instruction": f"Add {i} and {i + 1}.", "output": f"The answer is {2 * i + 1}."}
                                    for i in range(64)]))
    out = tmp_path / name
    cmd = [sys.executable, "-m", "shardtune", "finetune", "--model_name", str(model_dir), "--dataset", "alpaca_dataset",
           "--alpaca_dataset.data_path", str(data), "--output_dir", str(out), "--device", "cuda", "--num_epochs", "1",
           "--max_train_step", "4", "--context_length", "128", "--batch_size_training", "4", "--lr", "1e-3",
           "--save_model", "False", "--save_metrics", "--enable_fsdp", "--mixed_precision", "false",
           "--batching_strategy", "packing", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads((out / "metrics.json").read_text())["train_step_loss"], proc.stdout


def test_offload_chunked_loss_and_fused_adamw_give_the_plain_losses(tmp_path, tiny_model_dir):
    plain, _ = _losses(tmp_path, tiny_model_dir, "plain", "--loss", "plain", "--optimizer_impl", "for_loop")
    for name, flags in (("offload", ("--activation_offload",)),
                        ("chunked_fused", ("--loss", "chunked", "--optimizer_impl", "fused"))):
        got, _ = _losses(tmp_path, tiny_model_dir, name, *flags)
        assert got == pytest.approx(plain, rel=1e-4), (name, got, plain)


def test_compile_on_gpu_gives_the_eager_losses(tmp_path, tiny_model_dir):
    eager, _ = _losses(tmp_path, tiny_model_dir, "eager")
    compiled, out = _losses(tmp_path, tiny_model_dir, "compiled", "--compile")
    assert "compile: compiled 2 decoder layers in" in out
    assert compiled == pytest.approx(eager, rel=1e-3)
