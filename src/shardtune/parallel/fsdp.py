"""FSDP2 (``fully_shard``) applied per decoder block and then to the root.

Which modules are blocks comes from the model-family table, so this file has no per-model
branches. llama-recipes' strategies map onto FSDP2 as:

============== ======================= ==================================================
strategy       mesh (replicate, shard)  parameters between forward and backward
============== ======================= ==================================================
FULL_SHARD     (1, world)              resharded (all-gathered again for backward)
SHARD_GRAD_OP  (1, world)              kept gathered (more memory, one all-gather less)
NO_SHARD       (world, 1)              every rank holds everything (DDP-like)
HYBRID_SHARD   (replicas, group)       resharded within the group, replicated across groups
============== ======================= ==================================================

Frozen parameters of the root (a LoRA run's embeddings and head, tied or not) are not sharded:
every rank keeps them whole (:func:`keeps_whole`). The root stays gathered from the start of
forward to the end of backward anyway, so this adds nothing to a step's peak; it saves the
root's all-gather of every step (at Llama-3.2-1B width a 1 GiB fp32 embedding: the gathered
buffer, gloo's flat copy of it and the unsharded parameter, each a fresh mapping the kernel
zeroes on a CPU, docs/benchmarks.md "Real shape"), and a frozen weight has no gradient to
reduce. Between steps a rank holds the whole frozen root instead of its shard.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from ..config.configs import ShardingStrategy
from ..model.family import decoder_layers


def reshard_after_forward(strategy: ShardingStrategy) -> bool:
    return strategy in (ShardingStrategy.FULL_SHARD, ShardingStrategy.HYBRID_SHARD)


def mixed_precision_policy(param_dtype: Optional[torch.dtype],
                           reduce_dtype: Optional[torch.dtype] = torch.float32) -> MixedPrecisionPolicy:
    """Compute in ``param_dtype`` (None: the weights' own dtype); reduce gradients in fp32.

    Reducing in fp32 keeps the sum over ranks exact enough that N ranks match one process; the
    reduced gradient is cast back to the weights' dtype for the optimizer.
    """
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def keeps_whole(*, in_root: bool, trainable: bool, quantized: bool, cast_for_compute: bool,
                cpu_offload: bool) -> bool:
    """Whether :func:`shard_model` leaves a parameter unsharded on every rank: a frozen plain
    weight of the root unit, when FSDP would neither cast it for compute (mixed precision) nor
    move it (CPU offload) -- it is then used exactly as FSDP's gathered copy would be. The
    planner (plan/estimate.py) counts memory by the same rule."""
    return in_root and not trainable and not quantized and not cast_for_compute and not cpu_offload


def root_params_kept_whole(model: nn.Module, *, cast_for_compute: bool, cpu_offload: bool) -> set[nn.Parameter]:
    """The parameters of ``model`` outside its decoder blocks that :func:`keeps_whole` selects."""
    in_blocks = {id(p) for block in decoder_layers(model) for p in block.parameters()}
    return {p for p in model.parameters()
            if keeps_whole(in_root=id(p) not in in_blocks, trainable=p.requires_grad,
                           quantized=type(p) is not nn.Parameter,  # bitsandbytes' Params4bit & co.
                           cast_for_compute=cast_for_compute, cpu_offload=cpu_offload)}


def _device_of(mesh: DeviceMesh) -> torch.device:
    """The device FSDP2 puts the parameters it manages on (the current one of the mesh's type)."""
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def shard_model(model: nn.Module, *, mesh: DeviceMesh, strategy: ShardingStrategy,
                param_dtype: Optional[torch.dtype] = None, cpu_offload: bool = False) -> nn.Module:
    """Shard each decoder block, then the root (embeddings, final norm, head) in place; the
    root's frozen weights stay whole on every rank (:func:`keeps_whole`)."""
    blocks = decoder_layers(model)
    if not blocks:  # pragma: no cover - family_of would have refused the model
        raise ValueError(f"No decoder blocks found in {type(model).__name__}")
    weights_dtype = next(model.parameters()).dtype
    cast = param_dtype not in (None, weights_dtype)
    policy = mixed_precision_policy(param_dtype if cast else None)
    offload = CPUOffloadPolicy(pin_memory=mesh.device_type == "cuda") if cpu_offload else None
    reshard = reshard_after_forward(strategy)
    kwargs = dict(mesh=mesh, mp_policy=policy)
    if offload is not None:
        kwargs["offload_policy"] = offload
    for block in blocks:
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    whole = root_params_kept_whole(model, cast_for_compute=cast, cpu_offload=cpu_offload)
    device = _device_of(mesh)
    for p in whole:  # FSDP moves only what it manages; a meta parameter is allocated later (low-CPU)
        if not p.is_meta and p.device != device:
            p.data = p.data.to(device)  # in place: a tied alias keeps pointing at the same Parameter
    # The root's parameters are needed again right at the start of backward: keep them gathered.
    # (The chunked loss, train/loss.py, also runs the head after the root's forward returns.)
    fully_shard(model, reshard_after_forward=False, ignored_params=whole or None, **kwargs)
    return model


def accumulation_switch(model: nn.Module, defer: bool) -> Callable[[bool], None]:
    """What gradient accumulation calls before each micro-batch's backward, with whether it is
    the step's last.

    ``defer`` (``config.defers_gradient_sync``): skip the reduction (reduce-scatter and HSDP's
    all-reduce) of all but the last micro-batch. Otherwise every micro-batch is reduce-scattered,
    and only the all-reduce across replicas (HSDP, NO_SHARD) waits for the last one: FSDP2 sums
    the partial, still sharded, results in the reduce dtype and all-reduces once (torchtitan does
    the same); no unsharded gradient is held.
    """
    if not isinstance(model, FSDPModule):
        return lambda last: None
    return model.set_requires_gradient_sync if defer else model.set_requires_all_reduce


def reshard(model: nn.Module) -> None:
    """Free gathered parameters after a forward-only pass (evaluation, generation).

    The root is sharded with ``reshard_after_forward=False`` (its parameters are needed at the
    start of backward); without a backward nothing frees them, so a forward-only pass would
    leave the full root parameters (embeddings, head) in memory and visible as plain tensors.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: Optional[float]) -> torch.Tensor:
    """The global gradient norm, clipping to ``max_norm`` (None: measure only); works for sharded
    (DTensor) and plain gradients."""
    params = list(params)
    if max_norm is None:
        grads = [p.grad for p in params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


@torch.no_grad()
def weights_finite(model: nn.Module, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor],
                   device: torch.device) -> bool:
    """Whether every trainable weight of ``model`` is finite on every rank (each rank checks its
    shards). Frozen weights are not updated, so training cannot make them non-finite, and a
    quantized base stores packed bits in a float dtype (``quant_storage``) that are no numbers."""
    bad = 0
    for p in model.parameters():
        if not p.requires_grad:
            continue
        local = p.to_local() if isinstance(p, DTensor) else p
        if local.numel() and not bool(torch.isfinite(local).all()):
            bad = 1
            break
    flag = torch.tensor([float(bad)], device=device)
    return float(all_reduce_sum(flag)[0]) == 0.0
