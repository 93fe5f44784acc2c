"""Which dtype each part of a run uses (weights, compute, gradient reduction, optimizer state),
from the flags and the device, and the start-up line that says so. ``runtime`` holds the
device-level defaults; this module applies them to a run's configuration."""

from __future__ import annotations

from typing import Optional

import torch

from . import runtime
from .config import Config
from .parallel.distributed import DistEnv


def compute_dtype(cfg: Config, env: DistEnv) -> torch.dtype:
    """The dtype the matmuls run in: FSDP's mixed-precision dtype or autocast's, else the weights'."""
    t, f = cfg.train, cfg.fsdp
    weights = runtime.training_dtype(env.device, pure_bf16=f.pure_bf16)
    if t.enable_fsdp:
        return fsdp_compute_dtype(cfg, env) or weights
    return runtime.autocast_dtype(env.device, t.mixed_precision, t.use_fp16 or f.use_fp16) or weights


def fsdp_compute_dtype(cfg: Config, env: DistEnv) -> Optional[torch.dtype]:
    """Under FSDP the mixed-precision policy casts weights for compute (instead of autocast)."""
    t, f = cfg.train, cfg.fsdp
    return runtime.autocast_dtype(env.device, t.mixed_precision and f.mixed_precision,
                                  t.use_fp16 or f.use_fp16)


def describe_precision(cfg: Config, env: DistEnv) -> list[str]:
    """The start-up lines: the dtype of parameters, compute, gradient reduction and optimizer
    state, and why; plus a warning when an explicit low precision will be slow on a CPU."""
    t, f = cfg.train, cfg.fsdp
    name = lambda d: str(d).removeprefix("torch.")  # noqa: E731
    params = runtime.training_dtype(env.device, pure_bf16=f.pure_bf16)
    compute = compute_dtype(cfg, env)
    reduce = "fp32 (FSDP reduce dtype)" if t.enable_fsdp else "none (one process)"
    if f.optimizer.lower() == "anyprecision":
        optim = "bfloat16 moments (anyprecision AdamW, Kahan-compensated)"
    elif t.use_peft and params != torch.float32:
        optim = "float32 (peft keeps the adapter's weights in fp32; AdamW moments follow them)"
    else:
        optim = f"{name(params)} (AdamW moments in the parameters' dtype)"
    params_text = name(params)
    if t.quantization:
        params_text = (f"{t.quantization} base (bitsandbytes, {cfg.quantization.compute_dtype} dequantized "
                       "matmuls) + float32 adapter")
    if t.quantization:
        why = ("QLoRA: peft's k-bit preparation keeps the base's unquantized layers (norms, embeddings, "
               "head) and the adapter in fp32, whatever the weights' dtype flags say")
    elif t.use_fp16 or f.use_fp16:
        why = "--use_fp16: fp16 compute with a grad scaler"
    elif f.pure_bf16:
        why = "--fsdp_config.pure_bf16: weights and compute in bf16"
    elif compute != params:
        why = f"mixed precision: {name(compute)} compute on fp32 master weights"
    elif env.device.type != "cuda" and t.mixed_precision:
        why = "CPU: --mixed_precision stays fp32 here (bf16 matmuls are ~10x slower on CPUs without bf16 units)"
    elif env.device.type == "cuda" and t.mixed_precision and not runtime.bf16_supported(env.device):
        why = "this GPU has no bf16, so fp32"
    else:
        why = "--mixed_precision False: full fp32"
    lines = [f"precision: parameters {params_text}, compute {name(compute)}, gradient reduction {reduce}, "
             f"optimizer state {optim} ({why})"]
    if env.device.type != "cuda" and compute in (torch.bfloat16, torch.float16):
        lines.append(f"warning: {name(compute)} compute on a CPU is much slower than fp32 (measured ~10x "
                     "for bf16 matmuls here); it is used because it was asked for.")
    return lines
