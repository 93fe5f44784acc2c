"""The attention kernel a run uses (and why), from the flags, device and compute dtype."""

from __future__ import annotations

import pytest
import torch

from shardtune.config import parse_args
from shardtune.finetuning import attention_for
from shardtune.precision import compute_dtype
from shardtune.model.attention import FLASH_ATTENTION_2, SDPA, choose_attention
from shardtune.model.packed_attention import PACKED_SDPA
from shardtune.parallel.distributed import DistEnv

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
MODEL = ""


@pytest.mark.parametrize("fast, device, dtype, installed, impl, why", [
    (False, CUDA, torch.bfloat16, True, SDPA, "the default"),
    (True, CPU, torch.float32, True, SDPA, "needs a CUDA GPU"),
    (True, CUDA, torch.float32, True, SDPA, "computes in float32"),
    (True, CUDA, torch.bfloat16, False, SDPA, "not installed"),
    (True, CUDA, torch.bfloat16, True, FLASH_ATTENTION_2, "varlen"),
    (True, CUDA, torch.float16, True, FLASH_ATTENTION_2, "float16"),
])
def test_kernel_choice_and_reason(fast, device, dtype, installed, impl, why):
    choice = choose_attention(fast, device, dtype, flash_installed=installed)
    assert choice.implementation == impl and why in choice.reason
    assert choice.packed_needs_varlen == (impl == FLASH_ATTENTION_2)
    assert choice.describe().startswith(f"attention: {impl} (")
    # packed batches: SDPA attends per document (packed_attention.py); flash keeps its varlen kernel
    packed = choose_attention(fast, device, dtype, flash_installed=installed, packing=True)
    assert packed.implementation == (PACKED_SDPA if impl == SDPA else impl)
    assert packed.packed_needs_varlen and why in packed.reason


def test_a_packing_run_on_cpu_uses_per_document_sdpa_and_sends_document_lengths():
    cpu = DistEnv(device=CPU)
    packing = attention_for(_cfg("--batching_strategy", "packing"), cpu)
    assert packing.implementation == PACKED_SDPA and "without a block mask" in packing.reason
    assert packing.packed_needs_varlen
    padding = attention_for(_cfg("--batching_strategy", "padding"), cpu)
    assert padding.implementation == SDPA and not padding.packed_needs_varlen


@pytest.fixture(autouse=True)
def _model_dir(tiny_model_dir):
    global MODEL
    MODEL = str(tiny_model_dir)  # attention_for asks the model's class whether it has a flash path


def _cfg(*flags: str):
    """Padded batches unless ``flags`` say otherwise: the kernel choice without packing's variant."""
    return parse_args(["--model_name", MODEL, "--use_fast_kernels", "--batching_strategy", "padding",
                       *flags]).config


def test_fp32_compute_on_a_gpu_never_selects_flash():
    env = DistEnv(device=CUDA)
    cfg = _cfg("--mixed_precision", "False")
    assert compute_dtype(cfg, env) == torch.float32
    assert attention_for(cfg, env).implementation == SDPA
    fsdp = _cfg("--enable_fsdp", "--fsdp_config.mixed_precision", "False")
    assert compute_dtype(fsdp, env) == torch.float32 and attention_for(fsdp, env).implementation == SDPA


def test_compute_dtype_follows_the_precision_flags():
    env = DistEnv(device=CPU)
    assert compute_dtype(_cfg(), env) == torch.float32  # CPU: fp32 even with mixed_precision on
    assert compute_dtype(_cfg("--use_fp16"), env) == torch.float16
    assert compute_dtype(_cfg("--enable_fsdp", "--fsdp_config.pure_bf16"), env) == torch.bfloat16
    assert compute_dtype(_cfg("--enable_fsdp", "--use_fp16"), DistEnv(device=CUDA)) == torch.float16


def test_precision_line_says_each_dtype_and_why():
    from shardtune.precision import describe_precision

    cpu = DistEnv(device=CPU)
    (line,) = describe_precision(_cfg(), cpu)
    assert "parameters float32, compute float32, gradient reduction none" in line and "CPU: --mixed_precision" in line
    lines = describe_precision(_cfg("--enable_fsdp", "--fsdp_config.pure_bf16"), cpu)
    assert "parameters bfloat16, compute bfloat16, gradient reduction fp32" in lines[0] and "pure_bf16" in lines[0]
    assert lines[1].startswith("warning: bfloat16 compute on a CPU is much slower")
    (line,) = describe_precision(_cfg("--enable_fsdp", "--fsdp_config.optimizer", "anyprecision"), cpu)
    assert "optimizer state bfloat16 moments" in line
    (line,) = describe_precision(_cfg("--mixed_precision", "False"), DistEnv(device=CUDA))
    assert "compute float32" in line and "full fp32" in line


def test_a_model_without_a_flash_path_keeps_sdpa_on_a_gpu():
    """Llama 3.2 Vision (Mllama) has no flash-attn path: --use_fast_kernels must not ask for it."""
    from transformers import MllamaForConditionalGeneration

    assert MllamaForConditionalGeneration._supports_flash_attn is False
    choice = choose_attention(True, torch.device("cuda"), torch.bfloat16, flash_installed=True,
                              model_supports_flash=False, model_name="MllamaForConditionalGeneration")
    assert choice.implementation == "sdpa" and "MllamaForConditionalGeneration" in choice.describe()


def test_the_recipe_asks_the_vision_model_class(tiny_vision_model_dir):
    cfg = parse_args(["--model_name", str(tiny_vision_model_dir), "--use_fast_kernels", "--enable_fsdp",
                      "--fsdp_config.pure_bf16", "--batching_strategy", "padding"]).config
    choice = attention_for(cfg, DistEnv(device=CUDA))
    assert choice.implementation == SDPA and "has no flash-attn path" in choice.reason
