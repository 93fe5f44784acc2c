"""Freezing options: llama-recipes' freeze_layers / num_freeze_layers / freeze_LLM_only.

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


def freeze_llm_only(model: nn.Module) -> None:
    """Freeze the language model; keep the vision tower, projector and cross-attention trainable."""
    keep = family_of(model).trainable_when_llm_frozen
    if not keep:
        raise ConfigError("--freeze_LLM_only is for vision models (Llama 3.2 Vision / Mllama): it "
                          "freezes the language model and trains the vision parts. This model has "
                          "none; use --freeze_layers or --use_peft instead.")
    for name, p in model.named_parameters():
        p.requires_grad_(any(part in name for part in keep))


def trainable_summary(model: nn.Module) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable params: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
