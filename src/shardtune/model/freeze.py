"""Freezing options: llama-recipes' freeze_layers / num_freeze_layers / freeze_LLM_only, and
freeze_vision_tower. Which weights each freezes is the family table's (``model/family.py``).

Applied to the plain model before any FSDP wrapping, so they behave the same with and without
FSDP (llama-recipes only honours them in its FSDP branch).
"""

from __future__ import annotations

import torch.nn as nn

from ..config.errors import ConfigError
from .family import family_of


def freeze_first_layers(model: nn.Module, num_layers: int) -> None:
    """Freeze the first ``num_layers`` decoder layers of the language model."""
    layers = family_of(model).text_layers(model)
    if num_layers > len(layers):
        raise ConfigError(f"--num_freeze_layers {num_layers} is more than the model's {len(layers)} "
                          "decoder layers.")
    for layer in layers[:num_layers]:
        for p in layer.parameters():
            p.requires_grad_(False)


def freeze_group(model: nn.Module, group: str, flag: str) -> None:
    """Freeze one of the family's freeze groups (``model/family.py``); ``flag`` names the option."""
    family = family_of(model)
    if group not in family.freeze_groups:
        raise ConfigError(f"{flag} is for vision models (Llama 3.2 Vision / Mllama), which have a language "
                          "model and a vision tower to freeze separately. This model has no vision part; "
                          "use --freeze_layers or --use_peft instead.")
    names = family.params_of(model, group)
    for name, p in model.named_parameters():
        if name in names:
            p.requires_grad_(False)


def freeze_llm_only(model: nn.Module) -> None:
    """llama-recipes' --freeze_LLM_only: freeze the language model (embeddings, self-attention
    decoder layers, final norm, LM head); its cross-attention decoder layers, the vision tower
    and the projector stay trainable."""
    freeze_group(model, "language_model", "--freeze_LLM_only")


def freeze_vision_tower(model: nn.Module) -> None:
    """--freeze_vision_tower: freeze the vision encoder and the projector; train the language model."""
    freeze_group(model, "vision_tower", "--freeze_vision_tower")


def trainable_summary(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
