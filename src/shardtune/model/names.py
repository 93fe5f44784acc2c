"""Hugging Face state-dict names: the one place that maps names between a model in memory, its
files, and PEFT's wrapping.

* ``checkpoint_key``: a (possibly PEFT-wrapped) parameter name -> the base model's name
  (PEFT's ``base_model.model.`` prefix and ``.base_layer.`` removed).
* ``Renamer``: names older transformers releases wrote (Mllama's pre-v5
  ``language_model.model.layers...``) -> this version's names, through transformers' own
  conversion mapping, or the family table's ``legacy_renames`` where there is none (4.x).
* ``saved_names``: this version's names -> the names ``save_pretrained`` writes (transformers 5
  reverts its load-time renames on save), so every file shardtune writes has the names
  ``save_pretrained`` would write: the recipe's export and ``shardtune convert`` agree.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch.nn as nn

from .family import legacy_rename_rules

PEFT_PREFIX = "base_model.model."


def strip_peft_prefix(name: str) -> str:
    """``base_model.model.X`` (how peft names the wrapped model's weights) -> ``X``."""
    return name[len(PEFT_PREFIX):] if name.startswith(PEFT_PREFIX) else name


def unwrap_base_layer(name: str) -> str:
    """``...q_proj.base_layer.weight`` (the layer a LoRA wraps) -> ``...q_proj.weight``; also a
    module name ending in ``.base_layer``."""
    name = name.replace(".base_layer.", ".")
    return name[: -len(".base_layer")] if name.endswith(".base_layer") else name


def checkpoint_key(param_name: str) -> str:
    """The name a (possibly PEFT-wrapped) parameter has in the original HF checkpoint."""
    return unwrap_base_layer(strip_peft_prefix(param_name))


def unwrapped(model: nn.Module) -> nn.Module:
    """``model`` itself, or a meta-device copy of its class when FSDP wrapped it: transformers
    looks up a model's rename rules by class name, which FSDP's wrapper class
    (``FSDPMllamaForConditionalGeneration``) hides, and would then apply only part of them."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model
    from .meta import build_meta_model

    cls = next(c for c in type(model).__mro__[1:] if not issubclass(c, FSDPModule))
    return build_meta_model(model.config, cls=cls)


class Renamer:
    """Old checkpoint names -> this transformers version's names (its own conversion mapping)."""

    def __init__(self, model: nn.Module, known: set[str]):
        model = unwrapped(model)
        self._targets = known
        self._apply: Optional[Callable[[str], str]] = None
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightRenaming, rename_source_key

            renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
            prefix = getattr(model, "base_model_prefix", None) or None
            meta = dict.fromkeys(known, True)

            def apply(key: str) -> str:
                return rename_source_key(key, renamings, [], base_model_prefix=prefix, meta_state_dict=meta)[0]

            self._apply = apply
        except Exception:  # transformers 4.x: no conversion_mapping module
            import re

            rules = [(re.compile(p), r) for p, r in
                     (getattr(model, "_checkpoint_conversion_mapping", None) or {}).items()]
            rules += legacy_rename_rules(getattr(model.config, "model_type", ""))

            def apply(key: str) -> str:
                for pattern, repl in rules:
                    new = pattern.sub(repl, key, count=1)
                    if new in self._targets:
                        return new
                return key

            self._apply = apply

    def __call__(self, name: str) -> Optional[str]:
        if name in self._targets:
            return name
        try:
            new = self._apply(name)
        except Exception:
            return None
        return new if new in self._targets else None


def saved_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """The names ``save_pretrained`` writes for ``names``: transformers 5 reverts its load-time renames
    on save (Mllama is saved as ``language_model.model.layers...``, readable by transformers 4 too).
    Identity when there is nothing to revert, or when a rename does not round-trip."""
    model = unwrapped(model)
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightConverter, WeightRenaming, apply_renamings

        forward = [x for x in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(x, PrefixChange)]
        reverse = [x.reverse_transform() for x in forward[::-1]]
        renamings = [x for x in reverse if isinstance(x, WeightRenaming)]
        if not renamings or any(isinstance(x, WeightConverter) for x in reverse):
            return {n: n for n in names}
        out = {n: apply_renamings(n, renamings) for n in sorted(names)}
    except Exception:
        return {n: n for n in names}
    back = Renamer(model, set(names))
    if len(set(out.values())) != len(out) or any(back(v) != k for k, v in out.items()):
        return {n: n for n in names}
    return out
