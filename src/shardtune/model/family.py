"""The one model-family table: which module classes are the decoder layers to shard and checkpoint.

Everything that needs to know a model's structure (FSDP wrapping, activation checkpointing,
layer freezing) asks this table instead of testing ``model_type`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from ..config.errors import ShardtuneError


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    decoder_layer_classes: tuple[str, ...]  # class names of the blocks to shard / checkpoint
    # Returns the list of language-model decoder layers, in order (what num_freeze_layers counts).
    text_layers: Callable[[nn.Module], list[nn.Module]]
    # Module name prefixes that freeze_LLM_only leaves trainable (vision tower, projector, ...).
    trainable_when_llm_frozen: tuple[str, ...] = ()


def _llama_layers(model: nn.Module) -> list[nn.Module]:
    return list(_find_attr(model, "layers"))


def _mllama_text_layers(model: nn.Module) -> list[nn.Module]:
    return list(_find_submodule(model, "language_model").layers)


def _find_attr(model: nn.Module, attr: str):
    for module in model.modules():
        value = getattr(module, attr, None)
        if isinstance(value, nn.ModuleList):
            return value
    raise ShardtuneError(f"Could not find the decoder layers ({attr}) in {type(model).__name__}.")


def _find_submodule(model: nn.Module, name: str) -> nn.Module:
    for mod_name, module in model.named_modules():
        if mod_name.split(".")[-1] == name:
            return module
    raise ShardtuneError(f"Could not find submodule {name!r} in {type(model).__name__}.")


FAMILIES = (
    ModelFamily(
        name="llama",
        model_types=("llama", "mistral", "qwen2", "qwen3"),
        decoder_layer_classes=("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer",
                               "Qwen3DecoderLayer"),
        text_layers=_llama_layers,
    ),
    ModelFamily(
        name="mllama",
        model_types=("mllama",),
        decoder_layer_classes=("MllamaSelfAttentionDecoderLayer", "MllamaCrossAttentionDecoderLayer",
                               "MllamaVisionEncoderLayer"),
        text_layers=_mllama_text_layers,
        trainable_when_llm_frozen=("vision_model", "multi_modal_projector", "cross_attn"),
    ),
)


def family_of(model: nn.Module) -> ModelFamily:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    base = getattr(model, "get_base_model", None)  # PEFT wrappers keep the HF config on the base
    if model_type is None and base is not None:
        model_type = getattr(base().config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    supported = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise ShardtuneError(f"Model type {model_type!r} is not supported; supported types: {supported}.")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """Every module whose class the family table lists as a decoder block, outermost first."""
    classes = family_of(model).decoder_layer_classes
    return [m for m in model.modules() if type(m).__name__ in classes]
