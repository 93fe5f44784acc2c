"""``--compile``: ``torch.compile`` of every decoder block, the torchtitan way.

Order (finetuning.setup_model): PEFT, then activation checkpointing, then compile, then FSDP.
Each block is compiled on its own (``module.compile()``: the module object, its class and its
parameter names stay as they are, so checkpoints, PEFT and FSDP see the same model), which keeps
graphs small and lets identical blocks share one compiled graph; FSDP2's hooks run around the
compiled forward. Compilation is lazy: it happens at the first forward and backward, which the
recipe runs once at start-up (:func:`warm_up`) so that its time is reported apart from training.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from typing import Callable, ContextManager, Optional

import torch
import torch.nn as nn

from ..config.errors import ShardtuneError
from ..model.family import decoder_layers


def check_compile(device: torch.device) -> None:
    """Refuse --compile, before any work, where inductor cannot generate code for ``device``."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        import sys

        raise ShardtuneError(f"--compile: torch.compile does not support Python {sys.version.split()[0]} with "
                             f"torch {torch.__version__}. Drop --compile.")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ShardtuneError("--compile on a GPU needs Triton (inductor writes its GPU kernels in it), and it is "
                                 "not installed: pip install triton (the version your torch build names), or drop "
                                 "--compile.")
    elif device.type == "cpu" and _cpp_compiler() is None:
        raise ShardtuneError("--compile on CPU needs a C++ compiler (inductor compiles the CPU kernels it writes): "
                             "none was found (g++, or $CXX). Install one (apt-get install g++) or drop --compile.")


def _cpp_compiler() -> Optional[str]:
    """The compiler inductor would use, or None."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: look for the usual name
        return shutil.which("g++")
    try:
        return get_cpp_compiler()
    except Exception:  # inductor's InvalidCxxCompiler: none of its candidates runs
        return None


def compile_decoder_layers(model: nn.Module, dynamic: Optional[bool] = None) -> int:
    """``torch.compile`` each decoder block of ``model`` in place; returns how many."""
    blocks = decoder_layers(model)
    for block in blocks:
        block.compile(dynamic=dynamic)
    return len(blocks)


def warm_up(model: nn.Module, batch: dict, loss: Callable[[nn.Module, dict], torch.Tensor],
            autocast: Callable[[], ContextManager] = contextlib.nullcontext) -> float:
    """One forward and backward of ``batch`` that compiles the blocks; returns its seconds. The
    gradients are dropped and the RNG (dropout) is left where it was, so training afterwards is the
    same as without the warm-up. Under FSDP every rank must call it (the backward reduces
    gradients)."""
    device = next(model.parameters()).device
    model.train()  # the mode training runs in (a loaded model is in eval mode: another graph)
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        with autocast():
            value = loss(model, batch)
        value.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start
