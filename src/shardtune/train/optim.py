"""Optimizer and learning-rate schedule.

The schedule is one ``LambdaLR`` stepped once per optimizer step, so it is exact under
gradient accumulation and resumable from a step count: linear warm-up for ``warmup_steps``,
then ``steplr`` (llama-recipes: multiply by ``gamma`` after each epoch), ``cosine`` or
``linear`` decay to zero over the run, or ``constant``.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..config.configs import OptimizerImpl, Scheduler


def build_optimizer(params: Iterable[torch.nn.Parameter], train_cfg, fsdp_cfg) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters only (frozen ones never get optimizer state)."""
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        from ..config.errors import ConfigError

        raise ConfigError("No parameter is trainable: the freeze options froze the whole model.")
    if fsdp_cfg.optimizer.lower() == "anyprecision":
        from ..parallel.anyprecision_adamw import AnyPrecisionAdamW

        return AnyPrecisionAdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    # torch 2.13's fused kernel fails on FSDP's sharded parameters when the fp16 grad scaler passes
    # it its inf flag (a [1]-shaped tensor against DTensor steps): keep torch's default there.
    scaled_sharded = train_cfg.enable_fsdp and (train_cfg.use_fp16 or fsdp_cfg.use_fp16)
    return torch.optim.AdamW(trainable, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                             **adamw_kwargs(train_cfg.optimizer_impl, trainable, scaled_sharded))


# Devices with torch's fused AdamW kernel (torch.optim.adamw: "fused" supports these).
_FUSED_DEVICES = ("cuda", "cpu", "mps", "xpu")


def adamw_kwargs(requested: OptimizerImpl, params: list[torch.nn.Parameter], scaled_sharded: bool = False) -> dict:
    """``foreach``/``fused`` for ``torch.optim.AdamW``. ``auto``: the fused kernel (all of a step's
    parameters in one kernel: on this CPU several times faster than torch's default per-parameter
    loop, docs/benchmarks.md) where the parameters' device has it, else torch's own default
    (foreach on CUDA, the loop on CPU)."""
    if requested == OptimizerImpl.fused:
        return {"fused": True}
    if requested == OptimizerImpl.foreach:
        return {"foreach": True}
    if requested == OptimizerImpl.for_loop:
        return {"foreach": False}
    fusable = all(p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in params)
    return {"fused": True} if fusable and not scaled_sharded else {}


def lr_factor(step: int, *, scheduler: Scheduler, warmup_steps: int, steps_per_epoch: int,
              total_steps: int, gamma: float, resumed_epoch: Optional[tuple[int, int]] = None) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based). ``resumed_epoch`` is
    ``(epoch, step at which it ends)`` for a run resumed in a layout with another number of steps per
    epoch: steplr then counts epochs from there (``step // steps_per_epoch`` would not)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if scheduler == Scheduler.steplr:
        return warm * gamma ** epoch_of_step(step, max(steps_per_epoch, 1), resumed_epoch)
    if scheduler == Scheduler.constant or step < warmup_steps:
        return warm
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if scheduler == Scheduler.cosine:
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - progress  # linear


def epoch_of_step(step: int, steps_per_epoch: int, resumed_epoch: Optional[tuple[int, int]] = None) -> int:
    """The epoch optimizer step ``step`` (0-based) belongs to."""
    if resumed_epoch is None:
        return step // steps_per_epoch
    epoch, end = resumed_epoch
    return epoch if step < end else epoch + 1 + (step - end) // steps_per_epoch


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg, *, steps_per_epoch: int,
                    total_steps: int, resumed_epoch: Optional[tuple[int, int]] = None) -> LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, scheduler=train_cfg.scheduler, warmup_steps=train_cfg.warmup_steps,
                         steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                         gamma=train_cfg.gamma, resumed_epoch=resumed_epoch)

    return LambdaLR(optimizer, factor)
