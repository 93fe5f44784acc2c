"""What the LoRA merge (``shardtune convert --merge``, and the recipe's ``--merge_lora``, which runs
it on the saved adapter) folds in exactly, checked on a live PEFT model so the recipe refuses it
before training rather than after.

The merge folds Linear and Embedding LoRA layers (``lora_A/B``, ``lora_embedding_A/B``, any
``alpha_pattern`` / ``rank_pattern`` / rsLoRA scaling) and ``modules_to_save`` copies into the base
weights. It cannot merge exactly: DoRA (a per-column norm, not a sum), a LoRA bias (the base layer
has none to add it to) and anything on a weight tied to another (``tie_word_embeddings``: the
merged model would change both weights, or tie the trained copy to the untrained one again).
``convert/plan.build_plan`` refuses the same things when it reads an adapter's tensors.
"""

from __future__ import annotations

import torch.nn as nn

from ..config.errors import ShardtuneError
from ..model.names import checkpoint_key


def check_mergeable(model: nn.Module) -> None:
    """Refuse a PEFT LoRA model whose adapter the merge cannot fold in exactly."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import ModulesToSaveWrapper

    tied = tied_parameter_names(model)
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            kinds = _unmergeable_parts(name, module, tied)
            if kinds:
                raise ShardtuneError(
                    f"--merge_lora cannot merge the LoRA layer {checkpoint_key(name)} ({', '.join(kinds)}); "
                    "the merged model would differ from the trained one. Save the adapter without "
                    "--merge_lora and load it with PeftModel.from_pretrained.")
        elif isinstance(module, ModulesToSaveWrapper) and any(
                f"{name}.original_module.{leaf}" in tied for leaf, _ in module.original_module.named_parameters()):
            raise ShardtuneError(
                f"--merge_lora cannot write the trained copy of {checkpoint_key(name)} (modules_to_save): "
                "its weight is tied to another (tie_word_embeddings), and a merged model would tie the "
                "trained copy to the untrained one again. Save the adapter without --merge_lora and load "
                "it with PeftModel.from_pretrained.")


def _unmergeable_parts(name: str, layer: nn.Module, tied: set[str]) -> list[str]:
    kinds = []
    if len(getattr(layer, "lora_magnitude_vector", None) or {}):
        kinds.append("DoRA (use_dora)")
    if any(getattr(layer, "lora_bias", {}).values()):
        kinds.append("a LoRA bias (lora_bias)")
    if f"{name}.base_layer.weight" in tied:
        kinds.append("a weight tied to another (tie_word_embeddings)")
    return kinds


def tied_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that share their tensor with another parameter."""
    by_id: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(param), []).append(name)
    return {n for names in by_id.values() if len(names) > 1 for n in names}
