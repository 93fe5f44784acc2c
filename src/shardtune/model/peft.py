"""PEFT methods: LoRA and LLaMA-Adapter (peft's AdaptionPrompt), and continuing from an adapter."""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from pathlib import Path
from typing import Iterator

import torch.nn as nn
from peft import AdaptionPromptConfig, LoraConfig, PeftModel, get_peft_model

from ..config.configs import PeftMethod
from ..config.errors import ConfigError, ShardtuneError
from .family import family_of
from .adapter_init import initialise_adapter


def peft_config_for(cfg, model: nn.Module):
    """Build the peft config for ``cfg.train.peft_method`` from its llama-recipes section."""
    method = cfg.train.peft_method
    if method == PeftMethod.lora:
        fields = dataclasses.asdict(cfg.lora)
        if [m.lower() for m in fields["target_modules"]] == ["all-linear"]:
            fields["target_modules"] = "all-linear"  # peft's keyword: every linear layer but the head
        fields["target_modules"] = family_of(model).lora_targets(fields["target_modules"], model)
        return LoraConfig(**fields)
    if method == PeftMethod.llama_adapter:
        n_layers = len(family_of(model).text_layers(model))
        if cfg.llama_adapter.adapter_layers > n_layers:
            raise ConfigError(
                f"--adapter_layers {cfg.llama_adapter.adapter_layers} is more than the model's "
                f"{n_layers} decoder layers; set --llama_adapter_config.adapter_layers {n_layers} or less.")
        return AdaptionPromptConfig(**dataclasses.asdict(cfg.llama_adapter))
    raise ConfigError(f"Unknown --peft_method {method!r}.")  # pragma: no cover - enum-checked


@contextlib.contextmanager
def _peft_wrapping() -> Iterator[None]:
    """peft 0.21 reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model
    (``PeftModel.__init__``), which prints a FutureWarning per rank that is neither the user's
    nor shardtune's to act on; only that warning is hidden, while peft wraps."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning,
                                message=r"`is_gradient_checkpointing` is deprecated and will be removed in v6")
        yield


def apply_peft(model: nn.Module, cfg) -> nn.Module:
    """Wrap ``model`` with a new adapter, or load ``from_peft_checkpoint`` to keep training it."""
    with _peft_wrapping():
        if cfg.train.from_peft_checkpoint:
            path = Path(cfg.train.from_peft_checkpoint)
            if not (path / "adapter_config.json").is_file():
                raise ShardtuneError(
                    f"--from_peft_checkpoint {str(path)!r} is not a PEFT adapter directory (no "
                    "adapter_config.json). Pass the folder written by a PEFT fine-tune's output_dir.")
            if any(p.is_meta for p in model.parameters()):  # --low_cpu_fsdp: the weights are read after sharding
                warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
            return PeftModel.from_pretrained(model, str(path), is_trainable=True)
        model = get_peft_model(model, peft_config_for(cfg, model))
    # New adapter weights get values that depend only on the seed and their names, so a model
    # built on the meta device (--low_cpu_fsdp, initialised after sharding) starts the same.
    if not any(p.is_meta for p in model.parameters()):
        initialise_adapter(model, cfg.train.seed)
    return model
