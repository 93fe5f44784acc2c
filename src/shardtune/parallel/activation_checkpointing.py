"""Activation checkpointing per decoder block (non-reentrant), for every tower of the model.

transformers' text decoder blocks are ``GradientCheckpointingLayer``s, so switching it on through
the model keeps parameter names unchanged (no ``_checkpoint_wrapped_module`` in the state dict,
unlike torch's ``checkpoint_wrapper``) and composes with FSDP2: the block's parameters are
all-gathered again when its forward is recomputed in backward. Blocks the family table lists
that transformers cannot checkpoint (Mllama's vision encoder layers) get torch's composable
``checkpoint``, which also keeps their names.
"""

from __future__ import annotations

import torch.nn as nn

from ..model.family import decoder_layers


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block's activations in backward instead of storing them."""
    from torch.distributed._composable import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not getattr(model, "supports_gradient_checkpointing", True):
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
    kwargs = {"use_reentrant": False}
    # transformers 5.2x renamed the method; older releases (4.x, 5.1x) only have the old name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    for block in decoder_layers(model):
        if not isinstance(block, GradientCheckpointingLayer):
            checkpoint(block)
