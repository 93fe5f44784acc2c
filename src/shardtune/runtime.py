"""Device, backend and dtype defaults: the one place that decides them."""

from __future__ import annotations

import torch

from .config.configs import Device


def resolve_device(requested: Device | str = Device.auto, local_rank: int = 0) -> torch.device:
    requested = Device(requested)
    if requested == Device.cuda or (requested == Device.auto and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from .config.errors import ConfigError

            raise ConfigError("--device cuda was given but no CUDA GPU is visible. Use --device cpu "
                              "or run on a machine with a GPU.")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def dist_backend(device: torch.device, cpu_collectives: bool = False) -> str:
    """gloo on CPU; NCCL on GPU, plus gloo for CPU tensors when ``cpu_collectives`` (FSDP CPU
    offload keeps shards and gradients in host memory, and NCCL cannot reduce those: gradient
    clipping's norm, the HF export's gathers and the fp16 scaler's inf check run on them)."""
    if device.type != "cuda":
        return "gloo"
    return "cuda:nccl,cpu:gloo" if cpu_collectives else "nccl"


def bf16_supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def training_dtype(device: torch.device, use_fp16: bool = False, pure_bf16: bool = False) -> torch.dtype:
    """Dtype the weights are *stored* in. fp32 on CPU (bf16 matmuls are ~10x slower there);
    on GPU fp32 master weights under autocast unless pure bf16 is requested."""
    if pure_bf16:
        return torch.bfloat16
    return torch.float32


def autocast_dtype(device: torch.device, mixed_precision: bool, use_fp16: bool) -> torch.dtype | None:
    """Compute dtype for autocast, or None for full precision.

    ``use_fp16`` is an explicit request and is honoured everywhere (with a grad scaler).
    ``mixed_precision`` (on by default, as in llama-recipes) means bf16 where the hardware has
    it; on CPUs without bf16 units it would be ~10x slower, so CPU runs stay fp32.
    """
    if use_fp16:
        return torch.float16
    if device.type != "cuda":
        return None
    if mixed_precision and bf16_supported(device):
        return torch.bfloat16
    return None


def set_seed(seed: int) -> None:
    """Python's, torch's and numpy's global generators, as the recipe seeds them before loading data
    (a custom dataset file may shuffle with them)."""
    import random

    random.seed(seed)
    torch.manual_seed(seed)  # also seeds CUDA
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a transformers dependency
        pass
