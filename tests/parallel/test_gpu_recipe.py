"""The recipe on a CUDA GPU (NCCL), run as a user runs it: paths that only exist on GPUs.

Marked ``gpu``: skipped without a GPU, run by ``scripts/device_check.sh`` on a lent GPU machine.
One GPU, so FSDP runs one NCCL rank; what is checked is that every collective finds a backend
(CPU offload's host-resident shards), that bf16/fp16 and the fast-kernel choice train, and that
what is saved reloads with the trained logits.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def _rows(n: int) -> list[dict]:
    return [{"instruction": f"Add {i} and {i + 1}.", "output": f"The answer is {2 * i + 1}."} for i in range(n)]


def _finetune(tmp_path, model_dir, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    data = tmp_path / "alpaca.json"
    data.write_text(json.dumps(_rows(64)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shardtune", "finetune", "--model_name", str(model_dir),
           "--dataset", "alpaca_dataset", "--alpaca_dataset.data_path", str(data), "--output_dir", str(out),
           "--device", "cuda", "--num_epochs", "1", "--max_train_step", "4", "--context_length", "128",
           "--batch_size_training", "4", "--lr", "1e-3", "--save_metrics", *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(math.isfinite(x) for x in metrics["train_step_loss"])
    return proc, {"out": out, "metrics": metrics}


def _reload_logits(path, model_dir) -> torch.Tensor:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    ids = torch.tensor([tok.encode("Add 3 and 4.")], device="cuda")
    with torch.no_grad():
        return model(input_ids=ids).logits.float().cpu()


def test_cpu_offload_under_nccl_clips_scales_fp16_and_exports(tmp_path, tiny_model_dir):
    """NCCL cannot reduce host tensors: the group must carry gloo for them (cuda:nccl,cpu:gloo)."""
    _, run = _finetune(tmp_path, tiny_model_dir, "--enable_fsdp", "--fsdp_config.fsdp_cpu_offload",
                       "--gradient_clipping", "--gradient_clipping_threshold", "0.5", "--use_fp16")
    logits = _reload_logits(run["out"], tiny_model_dir)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("flags, kernel", [
    (("--enable_fsdp", "--use_fast_kernels", "--batching_strategy", "packing"), None),  # flash if installed
    (("--enable_fsdp", "--use_fast_kernels", "--mixed_precision", "False"), "sdpa"),  # fp32: never flash
    (("--enable_fsdp", "--fsdp_config.pure_bf16", "--low_cpu_fsdp", "--use_peft"), "sdpa"),
    (("--use_fast_kernels",), None),  # no FSDP: autocast bf16
])
def test_gpu_precisions_and_kernels_train(tmp_path, tiny_tied_model_dir, flags, kernel):
    from shardtune.model.attention import flash_attn_installed

    proc, _ = _finetune(tmp_path, tiny_tied_model_dir, *flags)
    expected = kernel or ("flash_attention_2" if flash_attn_installed() else "sdpa")
    assert f"attention: {expected} (" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize("attn", ["sdpa", "flash_attention_2"])
def test_packed_batches_attend_per_document_on_gpu(tiny_model_dir, attn):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from shardtune.config import BatchingStrategy
    from shardtune.data import build_dataloader
    from shardtune.model.attention import flash_attn_installed
    from shardtune.train.loop import _MODEL_INPUTS, to_device

    if attn == "flash_attention_2" and not flash_attn_installed():
        pytest.skip("flash-attn is not installed")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16,
                                                 attn_implementation=attn).cuda().eval()
    g = torch.Generator().manual_seed(0)
    samples = []
    for n in (20, 7, 30, 1, 12, 40, 9):
        ids = [1] + torch.randint(5, len(tok), (n - 1,), generator=g).tolist()
        samples.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * n})
    loader = build_dataloader(samples, tokenizer=tok, strategy=BatchingStrategy.packing, batch_size=2,
                              context_length=64, shuffle=False, seed=0, drop_last=False,
                              packed_varlen=attn == "flash_attention_2")
    batch = to_device(next(iter(loader)), torch.device("cuda"))
    packed_err = crossing_err = 0.0  # over every document after a row's first
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k in _MODEL_INPUTS}, use_cache=False).logits
        for row in range(batch["input_ids"].shape[0]):
            crossing = model(input_ids=batch["input_ids"][row:row + 1], use_cache=False).logits[0]
            pos = batch["position_ids"][row].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, b in list(zip(starts, starts[1:]))[1:]:
                alone = model(input_ids=batch["input_ids"][row:row + 1, a:b], use_cache=False).logits[0].float()
                packed_err = max(packed_err, float((logits[row, a:b].float() - alone).abs().max()))
                crossing_err = max(crossing_err, float((crossing[a:b].float() - alone).abs().max()))
    # bf16 noise is far below what attending across documents changes
    assert crossing_err > 0 and packed_err < 0.2 * crossing_err, (packed_err, crossing_err)


def test_qlora_4bit_bf16_on_gpu(tmp_path, tiny_model_dir):
    pytest.importorskip("bitsandbytes")
    _, run = _finetune(tmp_path, tiny_model_dir, "--use_peft", "--quantization", "4bit",
                       "--quantization_config.quant_type", "nf4", "--quantization_config.use_double_quant")
    assert (run["out"] / "adapter_model.safetensors").is_file()


def test_vision_model_trains_in_bf16_under_nccl_and_exports(tmp_path, tiny_vision_model_dir, colour_rows):
    """Llama 3.2 Vision (tiny Mllama): pure bf16 FSDP on a GPU, activation checkpointing of both
    towers, the export reloads and gives finite image logits."""
    from transformers import MllamaForConditionalGeneration

    from shardtune.model.probes import probe_inputs, probe_logits

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "shardtune", "finetune", "--model_name", str(tiny_vision_model_dir),
           "--dataset", "ocrvqa_dataset", "--ocrvqa_dataset.data_path", str(colour_rows),
           "--batching_strategy", "padding", "--output_dir", str(out), "--device", "cuda", "--num_epochs", "1",
           "--max_train_step", "4", "--batch_size_training", "4", "--lr", "1e-3", "--save_metrics",
           "--enable_fsdp", "--fsdp_config.pure_bf16", "--use_fast_kernels"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    losses = json.loads((out / "metrics.json").read_text())["train_step_loss"]
    assert all(math.isfinite(x) for x in losses)
    model = MllamaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).cuda().eval()
    assert torch.isfinite(probe_logits(model, probe_inputs(model))).all()
