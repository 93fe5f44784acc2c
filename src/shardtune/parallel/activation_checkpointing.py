"""Activation memory: checkpointing per decoder block (non-reentrant), for every tower of the model,
with a choice of what is recomputed, and offloading the saved activations to CPU memory.

transformers' text decoder blocks are ``GradientCheckpointingLayer``s, so switching it on through
the model keeps parameter names unchanged (no ``_checkpoint_wrapped_module`` in the state dict,
unlike torch's ``checkpoint_wrapper``) and composes with FSDP2: the block's parameters are
all-gathered again when its forward is recomputed in backward. Blocks the family table lists
that transformers cannot checkpoint (Mllama's vision encoder layers) get torch's composable
``checkpoint``, which also keeps their names.

Policies (``--activation_checkpointing_policy``):

* ``full``: every block keeps only its input and recomputes everything in backward;
* ``every_k``: blocks 0, k, 2k, ... are checkpointed, the others keep all their activations;
* ``ops``: every block is checkpointed, but the outputs of matmuls and attention are saved
  (``torch.utils.checkpoint``'s selective checkpointing), so the backward recomputes only the
  cheap element-wise ops (norms, activation functions, rotary embeddings, residual adds).
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
import torch.nn as nn

from ..config.configs import CheckpointingPolicy
from ..config.errors import ShardtuneError
from ..model.family import decoder_layers

T = TypeVar("T")


def enable_activation_checkpointing(model: nn.Module, policy: CheckpointingPolicy = CheckpointingPolicy.full,
                                    every_k: int = 1) -> int:
    """Recompute decoder blocks' activations in backward instead of storing them; returns how
    many blocks are checkpointed."""
    from torch.distributed._composable import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", True):
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
    every = every_k if policy == CheckpointingPolicy.every_k else 1
    if every < 1:
        raise ValueError(f"every_k must be at least 1, got {every_k}")
    kwargs: dict = {"use_reentrant": False}
    if policy == CheckpointingPolicy.ops:
        kwargs["context_fn"] = selective_checkpoint_contexts
    # transformers 5.2x renamed the method; older releases (4.x, 5.1x) only have the old name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    checkpointed = 0
    for i, block in enumerate(decoder_layers(model)):
        chosen = i % every == 0
        checkpointed += chosen
        if isinstance(block, GradientCheckpointingLayer):
            block.gradient_checkpointing = chosen  # transformers' own per-layer switch
        elif chosen:
            checkpoint(block, **{k: v for k, v in kwargs.items() if k != "use_reentrant"})
    return checkpointed


@functools.lru_cache(maxsize=None)
def _saved_ops() -> frozenset:
    """Ops whose outputs the ``ops`` policy keeps: matmuls and the attention kernels (the ones
    torch has on this build; flash-attn's op when it is installed)."""
    aten = torch.ops.aten
    names = [(aten, "mm"), (aten, "addmm"), (aten, "bmm"), (aten, "_scaled_dot_product_flash_attention"),
             (aten, "_scaled_dot_product_efficient_attention"), (aten, "_scaled_dot_product_cudnn_attention"),
             (aten, "_scaled_dot_product_flash_attention_for_cpu")]
    ops = {getattr(ns, name).default for ns, name in names if hasattr(ns, name)}
    flash = getattr(torch.ops, "flash_attn", None)
    for name in ("_flash_attn_forward", "_flash_attn_varlen_forward"):
        op = getattr(flash, name, None) if flash is not None else None
        if op is not None:
            ops.add(op.default)
    return frozenset(ops)


def _ops_policy(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _saved_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint_contexts():
    """``context_fn`` of the ``ops`` policy: a fresh pair of contexts for every checkpointed call."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_ops_policy)


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Tensors the forward saves for backward go to pinned CPU memory and come back for the
    backward (``torch.autograd.graph.save_on_cpu``), except weights (parameters and views of
    them: FSDP frees or reshards those itself, copying them would only cost time) and tensors
    under ``min_bytes``. With activation checkpointing, what is saved, and so offloaded, is
    mostly each checkpointed block's input."""

    def __init__(self, min_bytes: int = 1 << 20) -> None:
        def pack(tensor: torch.Tensor):
            if (tensor.device.type == "cpu" or tensor.numel() * tensor.element_size() < min_bytes
                    or isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)):
                return tensor
            packed = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=True)
            packed.copy_(tensor, non_blocking=True)  # ordered before any reuse of the memory on this stream
            return (tensor.device, packed)

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, tensor = packed
            return tensor.to(device, non_blocking=True)

        super().__init__(pack, unpack)


def check_activation_offload(device: torch.device) -> None:
    if device.type != "cuda":
        raise ShardtuneError(
            f"--activation_offload moves saved activations from the GPU to CPU memory; this run computes on "
            f"{device.type}, where they are in CPU memory already, so there is nothing to offload. Remove "
            "--activation_offload.")


def with_activation_offload(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` (a micro-batch's forward and loss) run under :class:`OffloadActivations`."""
    def offloaded(*args, **kwargs) -> T:
        with OffloadActivations():
            return fn(*args, **kwargs)

    return offloaded
